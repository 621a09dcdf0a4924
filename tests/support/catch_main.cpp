// Test runner: Catch2's session, with Flotilla's logs quiet unless asked for
// (FLOTILLA_TEST_LOG_LEVEL=debug shows them).
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <cstdlib>

#include "flotilla/common/log.hpp"

int main(int argc, char** argv) {
  const char* level = std::getenv("FLOTILLA_TEST_LOG_LEVEL");
  flotilla::log::setup(level ? level : "off");
  return Catch::Session().run(argc, argv);
}

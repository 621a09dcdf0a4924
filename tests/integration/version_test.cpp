// [integration] One version in every shipped binary: --version prints the
// build's flotilla::version() (CMake project version plus git describe).
#include <catch2/catch.hpp>

#include "flotilla/common/process.hpp"
#include "flotilla/common/version.hpp"
#include "tests/support/harness.hpp"

using namespace flotilla;

TEST_CASE("every binary's --version prints the one build version", "[integration][version]") {
  const std::string v = version();
  REQUIRE_FALSE(v.empty());
  for (const std::string name : {"flotilla-hub", "flotilla-agent", "flotilla", "flotilla-sim"}) {
    INFO(name);
    auto r = proc::run({test::bin_dir() + "/" + name, "--version"}, std::chrono::seconds(20));
    REQUIRE(r);
    CHECK(r->exit_code == 0);
    CHECK(r->out == name + " " + v + "\n");
  }
}

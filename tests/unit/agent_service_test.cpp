// Which init system runs k3s, detected from the device root the way
// systemd and OpenRC mark a running system.
#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>

#include "flotilla/agent/direct_runtime.hpp"
#include "tests/support/temp_dir.hpp"

using flotilla::agent::detect_service_manager;

TEST_CASE("service-manager auto: systemd, then OpenRC, else direct supervision", "[unit][agent][service]") {
  flotilla::test::TempDir root;
  CHECK(detect_service_manager(root.path()) == "direct");
  std::filesystem::create_directories(root.path() / "sbin");
  std::ofstream(root.path() / "sbin/openrc-run") << "#!/bin/sh\n";
  CHECK(detect_service_manager(root.path()) == "openrc");
  // systemd creates /run/systemd/system at boot; it wins over a leftover openrc-run.
  std::filesystem::create_directories(root.path() / "run/systemd/system");
  CHECK(detect_service_manager(root.path()) == "systemd");
}

// [unit] The hub's data directory when none is configured: a fixed system
// path for root, the XDG state directory otherwise, never the current one.
#include <catch2/catch.hpp>

#include <unistd.h>

#include <cstdlib>

#include "flotilla/common/options.hpp"
#include "flotilla/hub/app.hpp"

using namespace flotilla;

TEST_CASE("the hub's default data-dir is /var/lib/flotilla as root, else the XDG state directory",
          "[unit][hub][config]") {
  CHECK(hub::default_data_dir(true, "/home/u/.state", "/home/u") == "/var/lib/flotilla");
  CHECK(hub::default_data_dir(false, "/home/u/.state", "/home/u") == "/home/u/.state/flotilla");
  CHECK(hub::default_data_dir(false, nullptr, "/home/u") == "/home/u/.local/state/flotilla");
  // A relative XDG_STATE_HOME is invalid by the XDG spec and ignored.
  CHECK(hub::default_data_dir(false, "state", "/home/u") == "/home/u/.local/state/flotilla");
  CHECK(hub::default_data_dir(false, "", "/home/u") == "/home/u/.local/state/flotilla");
  // Nothing sensible: no default at all, rather than the current directory.
  CHECK(hub::default_data_dir(false, nullptr, nullptr) == "");
  CHECK(hub::default_data_dir(false, nullptr, "relative") == "");
}

TEST_CASE("flotilla-hub's data-dir option defaults to that directory, an absolute path", "[unit][hub][config]") {
  Options o("flotilla-hub", "", "FLOTILLA_HUB_UNIT_TEST_");
  hub::add_hub_options(o);
  std::vector<std::string> args = {"flotilla-hub", "--config", ""};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  REQUIRE(o.parse(int(argv.size()), argv.data()));
  CHECK(o.source("data-dir") == "default");
  CHECK(o.get("data-dir") == hub::default_data_dir(::geteuid() == 0, std::getenv("XDG_STATE_HOME"), std::getenv("HOME")));
  REQUIRE_FALSE(o.get("data-dir").empty());
  CHECK(o.get("data-dir").front() == '/');
}

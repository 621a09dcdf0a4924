// [unit] The files under packaging/ say what the code does: the example
// /etc/flotilla/hub.yaml is accepted by the hub's own config parser and names
// every hub setting, and nothing that is not one.
#include <catch2/catch.hpp>

#include <fstream>
#include <regex>
#include <set>
#include <sstream>

#include "flotilla/common/options.hpp"
#include "flotilla/hub/app.hpp"

using namespace flotilla;

namespace {
const std::string kHubYaml = std::string(FLOTILLA_SOURCE_DIR) + "/packaging/hub.yaml";

Options hub_options() {
  Options o("flotilla-hub", "", "FLOTILLA_HUB_");
  hub::add_hub_options(o);
  return o;
}
}  // namespace

TEST_CASE("packaging/hub.yaml is a config the hub accepts", "[unit][packaging]") {
  Options o = hub_options();
  std::string config = kHubYaml;
  std::vector<char*> argv = {const_cast<char*>("flotilla-hub"), const_cast<char*>("--config"), config.data()};
  auto pos = o.parse(int(argv.size()), argv.data());
  REQUIRE(pos);
  auto cfg = hub::hub_config_from(o);
  INFO((cfg ? std::string() : cfg.error().message));
  REQUIRE(cfg);
  // Everything is commented out: the file documents the defaults, it sets none.
  CHECK(o.source("listen") == "default");
  CHECK(cfg->listen_port == 8080);
}

TEST_CASE("packaging/hub.yaml names every hub setting and only those", "[unit][packaging]") {
  std::ifstream in(kHubYaml);
  REQUIRE(in);
  std::set<std::string> in_file;
  const std::regex key_line(R"(^#?([a-z][a-z0-9-]*):( |$))");
  for (std::string line; std::getline(in, line);) {
    std::smatch m;
    if (std::regex_search(line, m, key_line)) in_file.insert(m[1]);
  }
  const Options o = hub_options();
  for (const auto& key : in_file) {
    INFO("hub.yaml names " << key);
    CHECK(o.has(key));
  }
  // Every setting of `flotilla-hub --help` is in the example ("config" names the file itself).
  std::istringstream help(o.help());
  const std::regex flag(R"(^  --([a-z][a-z0-9-]*))");
  size_t settings = 0;
  for (std::string line; std::getline(help, line);) {
    std::smatch m;
    if (!std::regex_search(line, m, flag) || m[1] == "config" || m[1] == "help" || m[1] == "version") continue;
    ++settings;
    INFO("flotilla-hub --" << m[1] << " is missing from packaging/hub.yaml");
    CHECK(in_file.count(m[1]) == 1);
  }
  CHECK(settings > 20);
}

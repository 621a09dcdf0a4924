// The hub's broker TLS settings: each inconsistent or unreadable value is
// refused with a message naming the setting, before anything starts.
#include <catch2/catch.hpp>

#include <fstream>
#include <string>
#include <vector>

#include "flotilla/hub/app.hpp"
#include "tests/support/temp_dir.hpp"

namespace {

flotilla::Result<flotilla::hub::HubConfig> hub_config(std::vector<std::string> args) {
  flotilla::Options opts("flotilla-hub", "", "FLOTILLA_HUB_TEST_UNSET_");
  flotilla::hub::add_hub_options(opts);
  std::vector<std::string> argv = {"flotilla-hub", "--config", ""};
  argv.insert(argv.end(), args.begin(), args.end());
  std::vector<char*> cargv;
  for (auto& a : argv) cargv.push_back(a.data());
  REQUIRE(opts.parse(static_cast<int>(cargv.size()), cargv.data()));
  return flotilla::hub::hub_config_from(opts);
}

std::string error_of(const flotilla::Result<flotilla::hub::HubConfig>& r) {
  REQUIRE_FALSE(r);
  return r.error().message;
}

}  // namespace

TEST_CASE("hub config: broker TLS settings are checked together", "[unit][hub][config]") {
  flotilla::test::TempDir tmp;
  const std::string cert = (tmp.path() / "broker.pem").string();
  const std::string key = (tmp.path() / "broker.key").string();
  const std::string ca = (tmp.path() / "ca.pem").string();
  for (const auto& f : {cert, key, ca}) std::ofstream(f) << "x\n";

  auto plain = hub_config({});
  REQUIRE(plain);
  CHECK(plain->broker_tls_cert_file.empty());

  auto tls = hub_config({"--broker-tls-cert", cert, "--broker-tls-key", key, "--broker-tls-ca", ca,
                         "--broker-public-url", "ssl://hub.example:8883"});
  REQUIRE(tls);
  CHECK(tls->broker_tls_cert_file == cert);
  CHECK(tls->broker_tls_key_file == key);
  CHECK(tls->broker_tls_ca_file == ca);

  CHECK(error_of(hub_config({"--broker-tls-cert", cert})).find("broker-tls-key") != std::string::npos);
  CHECK(error_of(hub_config({"--broker-tls-key", key})).find("broker-tls-cert is not") != std::string::npos);
  CHECK(error_of(hub_config({"--broker-tls-cert", cert, "--broker-tls-key", key, "--broker-url", "ssl://b:8883"}))
            .find("external") != std::string::npos);
  CHECK(error_of(hub_config({"--broker-tls-cert", cert, "--broker-tls-key", key, "--broker-public-url",
                             "tcp://hub.example:1883"}))
            .find("use ssl://") != std::string::npos);
  CHECK(error_of(hub_config({"--broker-tls-ca", ca})).find("not reached over TLS") != std::string::npos);
  const std::string missing = (tmp.path() / "missing.pem").string();
  auto unreadable = error_of(hub_config({"--broker-tls-cert", missing, "--broker-tls-key", key}));
  CHECK(unreadable.find("broker-tls-cert: cannot read") != std::string::npos);
  CHECK(unreadable.find(missing) != std::string::npos);
  // An external ssl:// broker may have its CA pinned.
  auto external = hub_config({"--broker-url", "ssl://broker.example:8883", "--broker-tls-ca", ca});
  REQUIRE(external);
  CHECK(external->broker_tls_ca_file == ca);
}

TEST_CASE("hub config: the dashboard's settings are off by default and checked", "[unit][hub][config]") {
  auto def = hub_config({});
  REQUIRE(def);
  CHECK(def->ui_listen_host.empty());  // no dashboard listener unless asked
  CHECK(def->ui_max_streams == 64);
  CHECK(def->ui_event_interval == std::chrono::seconds(1));
  CHECK(def->views_timeline_interval == std::chrono::seconds(5));
  CHECK(def->views_scan_limit == 200000);

  auto on = hub_config({"--ui-listen", "127.0.0.1:8081", "--ui-max-streams", "10", "--ui-max-connections", "40",
                        "--ui-event-interval", "500ms", "--views-timeline-interval", "2s", "--views-scan-limit",
                        "5000"});
  REQUIRE(on);
  CHECK(on->ui_listen_host == "127.0.0.1");
  CHECK(on->ui_listen_port == 8081);
  CHECK(on->ui_max_streams == 10);
  CHECK(on->ui_max_connections == 40);
  CHECK(on->ui_event_interval == std::chrono::milliseconds(500));
  CHECK(on->views_timeline_interval == std::chrono::seconds(2));
  CHECK(on->views_scan_limit == 5000);

  const std::vector<std::pair<std::vector<std::string>, std::string>> bad = {
      {{"--ui-listen", "8081"}, "ui-listen must look like HOST:PORT"},
      {{"--ui-listen", "127.0.0.1:70000"}, "ui-listen: bad port"},
      {{"--ui-listen", "127.0.0.1:8080"}, "same address"},
      {{"--ui-max-streams", "0"}, "ui-max-streams"},
      {{"--ui-max-streams", "100", "--ui-max-connections", "50"}, "must be above ui-max-streams"},
      {{"--ui-event-interval", "10ms"}, "ui-event-interval must be from 100ms to 1m"},
      {{"--ui-event-interval", "soon"}, "ui-event-interval"},
      {{"--views-timeline-interval", "2h"}, "views-timeline-interval must be from 1s to 1h"},
      {{"--views-scan-limit", "10"}, "views-scan-limit"},
  };
  for (const auto& [args, says] : bad) {
    INFO(args.front() << " " << args.back());
    CHECK_THAT(error_of(hub_config(args)), Catch::Contains(says));
  }
}

// The hub's broker TLS settings: each inconsistent or unreadable value is
// refused with a message naming the setting, before anything starts.
#include <catch2/catch.hpp>

#include <fstream>
#include <string>
#include <vector>

#include <sys/stat.h>

#include "flotilla/bundles/keys.hpp"
#include "flotilla/common/fs.hpp"
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
  // The embedded broker speaks TLS by default: its CA may be named; only
  // the development mode without TLS makes that a contradiction.
  CHECK(hub_config({"--broker-tls-ca", ca}));
  CHECK(error_of(hub_config({"--broker-tls-ca", ca, "--dev-plain-mqtt", "true"})).find("not reached over TLS") !=
        std::string::npos);
  CHECK(error_of(hub_config({"--dev-plain-mqtt", "yes"})).find("dev-plain-mqtt must be true or false") !=
        std::string::npos);
  CHECK(error_of(hub_config({"--dev-plain-mqtt", "true", "--broker-tls-cert", cert, "--broker-tls-key", key}))
            .find("contradicts broker-tls-cert") != std::string::npos);
  CHECK(error_of(hub_config({"--device-cert-lifetime", "5s"})).find("between 10s and 3650d") != std::string::npos);
  CHECK(error_of(hub_config({"--device-ca-cert", cert})).find("device-ca-key is not") != std::string::npos);
  CHECK(hub_config({"--device-cert-lifetime", "30d"})->device_cert_lifetime_s == 30 * 86400);
  const std::string missing = (tmp.path() / "missing.pem").string();
  auto unreadable = error_of(hub_config({"--broker-tls-cert", missing, "--broker-tls-key", key}));
  CHECK(unreadable.find("broker-tls-cert: cannot read") != std::string::npos);
  CHECK(unreadable.find(missing) != std::string::npos);
  // An external ssl:// broker may have its CA pinned.
  auto external = hub_config({"--broker-url", "ssl://broker.example:8883", "--broker-tls-ca", ca});
  REQUIRE(external);
  CHECK(external->broker_tls_ca_file == ca);
}

TEST_CASE("hub config: git-sync is true or false, nothing else", "[unit][hub][config]") {
  auto on = hub_config({});
  REQUIRE(on);
  CHECK(on->git_sync);
  auto off = hub_config({"--git-sync", "false"});
  REQUIRE(off);
  CHECK_FALSE(off->git_sync);
  CHECK_THAT(error_of(hub_config({"--git-sync", "maybe"})),
             Catch::Contains("git-sync must be true or false, got 'maybe' (from flag)"));
}

TEST_CASE("hub config: the director key is made once (0600), kept, or read from director-key", "[unit][hub][config]") {
  flotilla::test::TempDir tmp;
  namespace bundles = flotilla::bundles;
  auto mode_of = [](const std::filesystem::path& p) {
    struct stat st {};
    REQUIRE(::stat(p.c_str(), &st) == 0);
    return st.st_mode & 07777;
  };
  const auto data = tmp.path() / "data";
  std::filesystem::create_directories(data);
  auto made = flotilla::hub::load_director_key(data, "");
  REQUIRE(made);
  CHECK(mode_of(data / "director.key") == 0600);
  auto pub = bundles::read_public_key((data / "director.pub").string());
  REQUIRE(pub);
  CHECK(pub->key == made->pub.key);
  // The next start signs with the same key.
  auto again = flotilla::hub::load_director_key(data, "");
  REQUIRE(again);
  CHECK(again->pub.key == made->pub.key);

  // An operator's key file.
  const auto own = tmp.path() / "own.key";
  const auto kp = bundles::generate_key();
  REQUIRE(bundles::write_private_key(own, kp));
  auto given = flotilla::hub::load_director_key(data, own.string());
  REQUIRE(given);
  CHECK(given->pub.key == kp.pub.key);
  CHECK(bundles::read_public_key((data / "director.pub").string())->key == kp.pub.key);
  auto cfg = hub_config({"--director-key", own.string()});
  REQUIRE(cfg);
  CHECK(cfg->director_key_file == own.string());

  // Refused, with the reason: readable by others, passphrase-protected, missing.
  ::chmod(own.c_str(), 0640);
  auto shared = flotilla::hub::load_director_key(data, own.string());
  REQUIRE_FALSE(shared);
  CHECK(shared.error().message.find("readable by others") != std::string::npos);
  const auto sealed = tmp.path() / "sealed.key";
  REQUIRE(bundles::write_private_key(sealed, kp, "pass", bundles::PassphraseCost{1, 8192}));
  auto enc = flotilla::hub::load_director_key(data, sealed.string());
  REQUIRE_FALSE(enc);
  CHECK(enc.error().message.find("cannot ask for a passphrase") != std::string::npos);
  CHECK(error_of(hub_config({"--director-key", (tmp.path() / "missing.key").string()})).find("director-key: cannot read") !=
        std::string::npos);
}

TEST_CASE("hub config: the input limits are settings with safe defaults, and bad values name the setting",
          "[unit][hub][config]") {
  auto defaults = hub_config({});
  REQUIRE(defaults);
  CHECK(defaults->http_max_connections == 1024);
  CHECK(defaults->http_max_connections_per_peer == 256);
  CHECK(defaults->enroll_rate == 200);
  CHECK(defaults->enroll_rate_per_token == 50);
  CHECK(defaults->broker_max_queued_messages == 1000000);
  CHECK(defaults->broker_max_queued_mib == 256);
  auto set = hub_config({"--http-max-connections", "10", "--http-max-connections-per-peer", "0", "--enroll-rate", "0",
                         "--enroll-rate-per-token", "5", "--broker-max-queued-messages", "1000",
                         "--broker-max-queued-mib", "64"});
  REQUIRE(set);
  CHECK(set->http_max_connections == 10);
  CHECK(set->http_max_connections_per_peer == 0);
  CHECK(set->enroll_rate == 0);
  CHECK(set->enroll_rate_per_token == 5);
  CHECK(set->broker_max_queued_messages == 1000);
  CHECK(set->broker_max_queued_mib == 64);
  for (const std::string key : {"http-max-connections", "http-max-connections-per-peer", "enroll-rate",
                                "enroll-rate-per-token", "broker-max-queued-messages", "broker-max-queued-mib"}) {
    INFO(key);
    CHECK(error_of(hub_config({"--" + key + "=-1"})).find(key) != std::string::npos);
    CHECK(error_of(hub_config({"--" + key + "=lots"})).find(key) != std::string::npos);
  }
  CHECK_FALSE(hub_config({"--broker-max-queued-messages", "0"}));  // mosquitto's 0 would mean unbounded
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

TEST_CASE("hub config: the role is hub or federation", "[unit][hub][config][federation]") {
  auto plain = hub_config({});
  REQUIRE(plain);
  CHECK(plain->role == "hub");
  auto fed = hub_config({"--role", "federation", "--federation-poll-interval", "500ms"});
  REQUIRE(fed);
  CHECK(fed->role == "federation");
  CHECK(fed->federation_poll_interval == std::chrono::milliseconds(500));
  CHECK(error_of(hub_config({"--role", "regional"})).find("role must be hub or federation") != std::string::npos);
  CHECK(error_of(hub_config({"--federation-region-timeout", "1h"})).find("federation-region-timeout") !=
        std::string::npos);
}

TEST_CASE("hub config: cells is 1 to 64, needs the embedded broker and fits the port range", "[unit][hub][config]") {
  auto one = hub_config({});
  REQUIRE(one);
  CHECK(one->cells == 1);
  auto four = hub_config({"--cells", "4", "--broker-listen", "127.0.0.1:18830"});
  REQUIRE(four);
  CHECK(four->cells == 4);
  for (const char* bad : {"0", "65", "many"}) {
    INFO(bad);
    CHECK_THAT(error_of(hub_config({"--cells", bad})), Catch::Contains("cells"));
  }
  CHECK_THAT(error_of(hub_config({"--cells", "2", "--broker-url", "tcp://broker.test:1883"})),
             Catch::Contains("cells > 1 needs the embedded broker"));
  CHECK_THAT(error_of(hub_config({"--cells", "3", "--broker-listen", "127.0.0.1:65534"})),
             Catch::Contains("runs past port 65535"));
}

TEST_CASE("hub config: cell-broker lists shared cells' brokers (ssl:// only) and excludes the hub's own broker",
          "[unit][hub][config]") {
  auto shared = hub_config({"--cell-broker", "ssl://10.0.0.1:8883", "--cell-broker", "ssl://b1.test:8883",
                            "--cell-lease-ttl", "5s"});
  REQUIRE(shared);
  CHECK(shared->cell_brokers == std::vector<std::string>{"ssl://10.0.0.1:8883", "ssl://b1.test:8883"});
  CHECK(shared->cells == 2);  // follows the list
  CHECK(shared->cell_lease_ttl == std::chrono::seconds(5));
  CHECK(hub_config({})->cell_lease_ttl == std::chrono::seconds(10));
  CHECK(hub_config({})->cell_brokers.empty());
  for (const char* bad : {"tcp://b.test:1883", "ssl://b.test", "b.test:8883", "ssl://b.test:8883/x", "ssl://:8883"}) {
    INFO(bad);
    CHECK_THAT(error_of(hub_config({"--cell-broker", bad})), Catch::Contains("cell-broker must look like ssl://"));
  }
  CHECK_THAT(error_of(hub_config({"--cell-broker", "ssl://b.test:8883", "--broker-url", "ssl://x.test:8883"})),
             Catch::Contains("broker-url configures the hub's own broker"));
  CHECK_THAT(error_of(hub_config({"--cell-broker", "ssl://b.test:8883", "--broker-public-url", "ssl://x.test:1"})),
             Catch::Contains("broker-public-url configures the hub's own broker"));
  CHECK_THAT(error_of(hub_config({"--cell-broker", "ssl://b.test:8883", "--dev-plain-mqtt", "true"})),
             Catch::Contains("dev-plain-mqtt"));
  CHECK_THAT(error_of(hub_config({"--cell-broker", "ssl://b.test:8883", "--cells", "3"})),
             Catch::Contains("cells is 3 but cell-broker names 1"));
  // Cells' own device files: a yes or no, and not yet with shared cells.
  CHECK(hub_config({})->cell_files);  // on by default, for a hub.db with no devices yet
  CHECK_FALSE(hub_config({})->cell_files_asked);
  CHECK(hub_config({"--cells", "2", "--cell-files", "true"})->cell_files_asked);
  CHECK_FALSE(hub_config({"--cell-files", "false"})->cell_files);
  CHECK_THAT(error_of(hub_config({"--cell-files", "yes"})), Catch::Contains("cell-files must be true or false"));
  CHECK(hub_config({"--cell-broker", "ssl://b.test:8883", "--cell-files", "true"})->cell_files);
  for (const char* bad : {"1s", "61s", "2500ms", "soon"}) {
    INFO(bad);
    CHECK_THAT(error_of(hub_config({"--cell-lease-ttl", bad})), Catch::Contains("cell-lease-ttl"));
  }
  // peer-ca: only with shared cells, and a file that can be read.
  CHECK_THAT(error_of(hub_config({"--peer-ca", "/etc/hostname"})), Catch::Contains("peer-ca names the CAs"));
  CHECK_THAT(error_of(hub_config({"--cell-broker", "ssl://b.test:8883", "--peer-ca", "/nonexistent/ca.pem"})),
             Catch::Contains("peer-ca: cannot read '/nonexistent/ca.pem'"));
  auto peers = hub_config({"--cell-broker", "ssl://b.test:8883", "--peer-ca", "/etc/hostname"});
  REQUIRE(peers);
  CHECK(peers->peer_ca_file == "/etc/hostname");
}

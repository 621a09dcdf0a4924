// [integration] Control data shared by hub processes through etcd
// (docs/adr/0016): a real 3-member etcd cluster on loopback, real
// flotilla-hub processes with their own data dirs and brokers. What one hub
// writes the others serve; one member down changes nothing; every member
// down refuses control writes with a 503 naming etcd while reads go on;
// etcd back, writes work again without restarting anything; a hub started
// late catches up.
#include <catch2/catch.hpp>

#include <chrono>
#include <filesystem>
#include <set>
#include <string>
#include <vector>

#include "flotilla/bundles/bundle.hpp"
#include "flotilla/bundles/keys.hpp"
#include "flotilla/common/process.hpp"
#include "flotilla/hub/coord.hpp"
#include "tests/support/etcd_cluster.hpp"
#include "tests/support/harness.hpp"
#include "tests/support/pki.hpp"

using namespace flotilla;
using namespace flotilla::test;

namespace {

// Hubs sharing control data sign with one director key and issue from one
// device CA: those `first` made in its data dir.
std::vector<std::string> etcd_args(const EtcdCluster& cluster, const Hub* first = nullptr) {
  std::vector<std::string> args = {"--coordination", "etcd", "--etcd-timeout", "2s"};
  for (const auto& u : cluster.client_urls()) {  // the flag repeats, one member each
    args.push_back("--etcd-endpoints");
    args.push_back(u);
  }
  if (first) {
    for (const auto& [flag, file] : {std::pair{"--director-key", "director.key"},
                                     std::pair{"--device-ca-cert", "ca/device-ca.pem"},
                                     std::pair{"--device-ca-key", "ca/device-ca.key"}}) {
      args.push_back(flag);
      args.push_back((first->data_dir() / file).string());
    }
  }
  return args;
}

std::set<std::string> ids(const json& body) {
  std::set<std::string> out;
  if (!body.contains("items")) return out;
  for (const auto& i : body["items"]) out.insert(i["id"].get<std::string>());
  return out;
}

// POST /v1/tokens with the admin token; the status and body.
std::pair<int, json> new_token(Hub& hub, const std::string& admin, const std::string& name) {
  return hub.call("POST", "/v1/tokens", json{{"name", name}, {"role", "viewer"}, {"project", "default"}}.dump(),
                  "application/json", admin);
}

}  // namespace

TEST_CASE("control log on etcd: hubs share control data, degrade to read-only with etcd away and recover",
          "[integration][etcd][control]") {
  REQUIRE(EtcdCluster::available());
  TempDir tmp("control-etcd");
  EtcdCluster cluster(tmp.path() / "etcd", 3);
  cluster.start();
  Hub a(tmp.path() / "hub-a");
  a.start(etcd_args(cluster));
  const std::string admin = a.admin_token();  // made by A, in the log: it works on every hub
  // A hub with a director key and device CA of its own is refused at start,
  // naming both keys, and writes nothing to the log.
  {
    auto refused = run_hub_expecting_exit(tmp.path() / "hub-own-keys", etcd_args(cluster));
    INFO(refused.out << refused.err);
    CHECK(refused.exit_code != 0);
    CHECK_FALSE(refused.timed_out);
    CHECK((refused.out + refused.err).find("director key is ") != std::string::npos);
    CHECK((refused.out + refused.err).find("start it with the same --director-key") != std::string::npos);
  }
  Hub b(tmp.path() / "hub-b");
  b.start(etcd_args(cluster, &a));
  INFO("hub A log:\n" << a.log() << "\nhub B log:\n" << b.log());

  // A token made through A's REST API works on B's.
  auto made = new_token(a, admin, "ops");
  REQUIRE(made.first == 201);
  const std::string ops = made.second["token"].get<std::string>();
  CHECK(wait_until([&] { return b.call("GET", "/v1/bundles", "", "application/json", ops).first == 200; },
                   std::chrono::seconds(15)));

  // A bundle uploaded on A is listed on B.
  const auto release = bundles::generate_key();
  auto env = bundles::wrap(make_manifest("edge-shared", 1));
  REQUIRE(bundles::sign(env, release));
  auto up = a.call("POST", "/v1/bundles", bundles::serialize_envelope(env), "application/octet-stream", admin);
  INFO(up.second.dump());
  REQUIRE(up.first == 201);
  const std::string bundle = up.second["id"].get<std::string>();
  CHECK(wait_until([&] { return ids(b.call("GET", "/v1/bundles", "", "application/json", admin).second).count(bundle); },
                   std::chrono::seconds(15)));

  // One member stopped: writes still work, on both hubs.
  cluster.stop_member(0);
  auto one_down = new_token(a, admin, "one-down");
  CHECK(one_down.first == 201);
  CHECK(new_token(b, admin, "one-down-b").first == 201);

  // Every member stopped: control writes on both hubs get 503 naming etcd,
  // GETs still answer, nothing is written.
  cluster.stop_all();
  auto env2 = bundles::wrap(make_manifest("edge-shared", 2));
  REQUIRE(bundles::sign(env2, release));
  auto before_a = a.call("GET", "/v1/tokens", "", "application/json", admin);
  REQUIRE(before_a.first == 200);
  for (Hub* h : {&a, &b}) {
    auto refused = new_token(*h, admin, "while-down");
    CHECK(refused.first == 503);
    CHECK(refused.second.dump().find("etcd") != std::string::npos);
    auto upload = h->call("POST", "/v1/bundles", bundles::serialize_envelope(env2), "application/octet-stream", admin);
    CHECK(upload.first == 503);
    CHECK(h->call("GET", "/v1/bundles", "", "application/json", admin).first == 200);
    CHECK(h->call("GET", "/v1/tokens", "", "application/json", admin).first == 200);
  }
  CHECK(a.call("GET", "/v1/tokens", "", "application/json", admin).second["items"].size() ==
        before_a.second["items"].size());
  CHECK(a.call("GET", "/v1/bundles", "", "application/json", admin).second["items"].size() == 1);

  // etcd back: writes work again without restarting the hubs.
  cluster.start_all();
  std::string after;
  CHECK(wait_until(
      [&] {
        auto r = new_token(a, admin, "after");
        if (r.first != 201) return false;
        after = r.second["token"].get<std::string>();
        return true;
      },
      std::chrono::seconds(30)));
  CHECK(wait_until([&] { return b.call("GET", "/v1/bundles", "", "application/json", after).first == 200; },
                   std::chrono::seconds(15)));
  CHECK(wait_until([&] { return new_token(b, admin, "after-b").first == 201; }, std::chrono::seconds(30)));

  // A third hub started late sees everything.
  Hub c(tmp.path() / "hub-c");
  c.start(etcd_args(cluster, &a));
  auto tokens_a = a.call("GET", "/v1/tokens", "", "application/json", admin);
  CHECK(wait_until(
      [&] {
        auto tokens_c = c.call("GET", "/v1/tokens", "", "application/json", admin);
        return tokens_c.first == 200 && tokens_c.second["items"].size() >= tokens_a.second["items"].size();
      },
      std::chrono::seconds(15)));
  CHECK(ids(c.call("GET", "/v1/bundles", "", "application/json", admin).second).count(bundle) == 1);
  CHECK(c.call("GET", "/v1/bundles", "", "application/json", ops).first == 200);
  CHECK_FALSE(std::filesystem::exists(c.data_dir() / "admin.token"));  // the fleet's admin token was already there
  c.stop();
  b.stop();
  a.stop();
}

// The hub's --etcd-ca/--etcd-cert/--etcd-key against a member that takes
// only clients with a certificate from its CA: the hub's control writes go
// through, a real agent enrolls and applies a campaign's bundle, and what
// the hub wrote is in etcd.
TEST_CASE("control log on etcd over TLS: a hub with etcd's client certificate writes through it and a real agent "
          "applies a campaign through it",
          "[integration][etcd][control]") {
  REQUIRE(EtcdCluster::available());
  TempDir tmp("control-etcd-tls");
  const auto pki = tmp.path() / "pki";
  std::filesystem::create_directories(pki);
  const auto f = [&](const std::string& name) { return (pki / name).string(); };
  make_ca(pki, "etcd-ca");
  make_cert(pki, "etcd-ca", "member", "serverAuth,clientAuth");
  make_cert(pki, "etcd-ca", "hub", "clientAuth");
  EtcdCluster cluster(tmp.path() / "etcd", 1, EtcdTls{f("etcd-ca.pem"), f("member.pem"), f("member.key")});
  cluster.start();
  auto args = etcd_args(cluster);
  for (const auto& [flag, file] : {std::pair{"--etcd-ca", "etcd-ca.pem"}, std::pair{"--etcd-cert", "hub.pem"},
                                   std::pair{"--etcd-key", "hub.key"}}) {
    args.push_back(flag);
    args.push_back(f(file));
  }
  Hub a(tmp.path() / "hub-a");
  a.start(args);
  INFO("hub log:\n" << a.log());
  const std::string admin = a.admin_token();
  auto made = new_token(a, admin, "over-tls");
  INFO(made.second.dump());
  REQUIRE(made.first == 201);

  // A real agent through it: its enrollment, the bundle and the campaign's
  // decisions are control writes through etcd over TLS, and it applies.
  const auto release = bundles::generate_key();
  AgentOptions ao;
  ao.root_keys = {bundles::public_key_text(release.pub)};
  Agent agent(tmp.path() / "dev", a.url(), a.enrollment_token({{"env", "it"}}, 1), ao);
  agent.start();
  const bool online = wait_agent_online(a, agent, std::chrono::seconds(60));
  INFO("agent log:\n" << agent.log() << "\nhub log:\n" << a.log());
  REQUIRE(online);
  auto pushed = a.call("POST", "/v1/bundles", make_bundle("edge-base", 1, {}, {&release}).bytes,
                       "application/octet-stream", admin);
  INFO(pushed.second.dump());
  REQUIRE(pushed.first == 201);
  const json c = run_campaign(a, pushed.second["id"].get<std::string>(), "env=it");
  INFO(c.dump());
  CHECK(c["state"] == "completed");
  CHECK(a.device(agent.device_id())["applied_version"] == 1);

  hub::coord::EtcdOptions o;
  o.endpoints = cluster.client_urls();
  o.ca_file = f("etcd-ca.pem");
  o.cert_file = f("hub.pem");
  o.key_file = f("hub.key");
  auto etcd = hub::coord::open_etcd_coordinator(o);
  REQUIRE(etcd.ok());
  auto head = (*etcd)->get("/flotilla/control/head");
  REQUIRE(head.ok());
  REQUIRE(*head);
  CHECK((*head)->mod_revision > 0);
}

// The log does not grow for ever: a hub snapshots the control data into
// etcd and deletes the entries behind it; etcd then compacts its history
// (as ETCD_AUTO_COMPACTION_RETENTION does); a hub started afterwards from an
// empty data dir loads the snapshot and serves what the trimmed entries
// wrote.
TEST_CASE("control log on etcd: snapshotted and trimmed, etcd compacted, and a hub started later loads the snapshot",
          "[integration][etcd][control]") {
  REQUIRE(EtcdCluster::available());
  TempDir tmp("control-etcd-snap");
  EtcdCluster cluster(tmp.path() / "etcd", 1);
  cluster.start();
  auto snap_args = [&](const Hub* first) {
    auto args = etcd_args(cluster, first);
    for (const char* a : {"--control-snapshot-every", "20", "--control-keep-entries", "4"}) args.push_back(a);
    return args;
  };
  Hub a(tmp.path() / "hub-a");
  a.start(snap_args(nullptr));
  const std::string admin = a.admin_token();
  std::vector<std::string> early;  // their entries are trimmed below
  for (int i = 0; i < 15; ++i) {
    auto made = new_token(a, admin, "early-" + std::to_string(i));
    REQUIRE(made.first == 201);
    early.push_back(made.second["token"].get<std::string>());
  }
  // The watcher looks every 5 s: a snapshot is written and the log trimmed.
  const bool written = wait_until([&] { return a.log().find("control log: snapshot of seq=") != std::string::npos; },
                                  std::chrono::seconds(30));
  INFO("hub A log:\n" << a.log());
  REQUIRE(written);
  CHECK(metric(metrics_text(a), "flotilla_control_log_snapshots_total{op=\"written\"}") >= 1);
  CHECK(metric(metrics_text(a), "flotilla_control_log_entries_trimmed_total") >= 10);

  hub::coord::EtcdOptions o;
  o.endpoints = cluster.client_urls();
  auto etcd = hub::coord::open_etcd_coordinator(o);
  REQUIRE(etcd.ok());
  auto first = (*etcd)->get("/flotilla/control/log/00000000000000000001");
  REQUIRE(first.ok());
  CHECK_FALSE(*first);  // trimmed
  auto manifest = (*etcd)->get("/flotilla/control/snapshot");
  REQUIRE(manifest.ok());
  REQUIRE(*manifest);
  const json m = json::parse((*manifest)->value);
  CHECK(m["seq"].get<int64_t>() >= 20);
  CHECK(m["log_from"].get<int64_t>() > 1);

  // etcd compacts its history up to now, physically.
  auto now = (*etcd)->range("/flotilla/control/head", 1);
  REQUIRE(now.ok());
  auto compacted = proc::run({"/usr/bin/curl", "-sS", "-X", "POST", cluster.client_urls()[0] + "/v3/kv/compaction", "-d",
                              json{{"revision", std::to_string(now->revision)}, {"physical", true}}.dump()},
                             std::chrono::seconds(10));
  REQUIRE(compacted.ok());
  INFO(compacted->out << compacted->err);
  REQUIRE(compacted->exit_code == 0);
  REQUIRE(compacted->out.find("\"header\"") != std::string::npos);

  // One more write after the snapshot, then a hub from an empty data dir.
  auto late = new_token(a, admin, "late");
  REQUIRE(late.first == 201);
  Hub c(tmp.path() / "hub-c");
  c.start(snap_args(&a));
  INFO("hub C log:\n" << c.log());
  CHECK(c.log().find("control log: loaded the snapshot of seq=") != std::string::npos);
  // The fleet's admin token is copied to hubs started later (operations.md).
  std::filesystem::copy_file(a.data_dir() / "admin.token", c.data_dir() / "admin.token");
  CHECK(metric(metrics_text(c), "flotilla_control_log_snapshots_total{op=\"loaded\"}") == 1);
  CHECK(metric(metrics_text(c), "flotilla_control_log_stuck") == 0);
  for (const auto& t : early) CHECK(c.call("GET", "/v1/bundles", "", "application/json", t).first == 200);
  CHECK(wait_until(
      [&] {
        return c.call("GET", "/v1/bundles", "", "application/json", late.second["token"].get<std::string>()).first ==
               200;
      },
      std::chrono::seconds(15)));
  auto tokens_a = a.call("GET", "/v1/tokens", "", "application/json", admin);
  auto tokens_c = c.call("GET", "/v1/tokens", "", "application/json", admin);
  REQUIRE(tokens_c.first == 200);
  CHECK(ids(tokens_c.second) == ids(tokens_a.second));
  // And C writes on top of it, which A serves.
  auto from_c = new_token(c, admin, "from-c");
  REQUIRE(from_c.first == 201);
  CHECK(wait_until(
      [&] {
        return a.call("GET", "/v1/bundles", "", "application/json", from_c.second["token"].get<std::string>()).first ==
               200;
      },
      std::chrono::seconds(15)));
  c.stop();
  a.stop();
}

// An existing one-hub install (coordination sqlite) restarted on an empty
// etcd becomes the fleet's first hub: its store seeds the control log, and
// a hub started after it serves the install's tokens and bundles. A second
// one-hub install is refused, keeping its own data, not merged.
TEST_CASE("control log on etcd: a one-hub install switched to etcd seeds the log, a second install is refused",
          "[integration][etcd][control]") {
  REQUIRE(EtcdCluster::available());
  TempDir tmp("control-etcd-seed");
  EtcdCluster cluster(tmp.path() / "etcd", 1);
  cluster.start();
  Hub a(tmp.path() / "hub-a");
  a.start();  // one hub, coordination sqlite
  const std::string admin = a.admin_token();
  auto ops = new_token(a, admin, "ops");
  REQUIRE(ops.first == 201);
  const auto release = bundles::generate_key();
  auto env = bundles::wrap(make_manifest("edge-before-etcd", 1));
  REQUIRE(bundles::sign(env, release));
  auto up = a.call("POST", "/v1/bundles", bundles::serialize_envelope(env), "application/octet-stream", admin);
  REQUIRE(up.first == 201);
  const std::string bundle = up.second["id"].get<std::string>();
  a.stop();

  a.start(etcd_args(cluster));
  INFO("hub A log:\n" << a.log());
  CHECK(a.log().find("control log: this hub's store seeded the fleet's control log") != std::string::npos);
  CHECK(a.call("GET", "/v1/bundles", "", "application/json", ops.second["token"].get<std::string>()).first == 200);

  Hub b(tmp.path() / "hub-b");
  b.start(etcd_args(cluster, &a));
  INFO("hub B log:\n" << b.log());
  CHECK(b.log().find("control log: loaded the snapshot of seq=1") != std::string::npos);
  CHECK(b.call("GET", "/v1/bundles", "", "application/json", ops.second["token"].get<std::string>()).first == 200);
  CHECK(ids(b.call("GET", "/v1/bundles", "", "application/json", admin).second).count(bundle) == 1);
  CHECK_FALSE(std::filesystem::exists(b.data_dir() / "admin.token"));  // the install's admin token is the fleet's

  // A second one-hub install started on the same etcd: refused, unchanged.
  Hub x(tmp.path() / "hub-x");
  x.start();
  const std::string x_admin = x.admin_token();
  const auto x_tokens = x.call("GET", "/v1/tokens", "", "application/json", x_admin);
  REQUIRE(x_tokens.first == 200);
  x.stop();
  auto refused = run_hub_expecting_exit(x.data_dir(), etcd_args(cluster, &a));
  INFO(refused.out << refused.err);
  CHECK(refused.exit_code != 0);
  CHECK_FALSE(refused.timed_out);
  CHECK((refused.out + refused.err).find("control data of its own") != std::string::npos);
  CHECK((refused.out + refused.err).find("nothing was changed") != std::string::npos);
  CHECK(a.call("GET", "/v1/bundles", "", "application/json", x_admin).first == 401);
  // Its data is as it was: back on its own, it serves the same tokens.
  x.start();
  auto x_after = x.call("GET", "/v1/tokens", "", "application/json", x_admin);
  CHECK(x_after.first == 200);
  CHECK(ids(x_after.second) == ids(x_tokens.second));
  x.stop();
  b.stop();
  a.stop();
}

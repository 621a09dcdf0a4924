// Access control with real parts: flotilla-hub with its embedded mosquitto,
// real agents, the real CLI. Roles and projects over HTTP, revocation, the
// audit log, and decommissioning enforced by the broker.
#include <catch2/catch.hpp>

#include <optional>
#include <set>

#include "flotilla/common/sqlite.hpp"
#include "flotilla/common/transport.hpp"
#include "tests/support/harness.hpp"

using namespace flotilla;
using namespace flotilla::test;

namespace {

std::set<std::string> ids(const json& items) {
  std::set<std::string> out;
  for (const auto& i : items) out.insert(i["id"].get<std::string>());
  return out;
}

std::unique_ptr<test::Agent> start_agent(TempDir& tmp, Hub& hub, const std::string& name, const std::string& token,
                                         const bundles::KeyPair& release) {
  AgentOptions o;
  o.root_keys = {bundles::public_key_text(release.pub)};
  auto a = std::make_unique<test::Agent>(tmp.path() / name, hub.url(), token, o);
  a->start();
  return a;
}

void wait_online(Hub& hub, const test::Agent& a) {
  const bool ok = wait_until(
      [&] {
        try {
          return hub.device(a.device_id())["online"] == true;
        } catch (const std::exception&) {
          return false;  // not enrolled yet
        }
      },
      std::chrono::seconds(60));
  if (!ok) FAIL("agent did not come online; hub log:\n" << hub.log() << "\nagent log:\n" << a.log());
}

Status broker_login(Hub& hub, const test::Agent& a, const std::string& client_id) {
  auto t = transport::make_paho_transport();
  transport::ConnectOptions co = a.broker_options(hub.broker_url());
  co.client_id = client_id;  // the broker names the session after the certificate anyway
  auto s = t->connect(co);
  if (s) t->disconnect();
  return s;
}

}  // namespace

TEST_CASE("the hub enforces roles and projects, revocation and the audit log over HTTP",
          "[integration][security]") {
  TempDir tmp;
  Hub hub(tmp.path() / "hub");
  hub.start();
  const auto release = bundles::generate_key();
  auto ax = start_agent(tmp, hub, "dev-x", hub.project_enrollment_token("team-x", {{"env", "it"}}, 1), release);
  auto ay = start_agent(tmp, hub, "dev-y", hub.project_enrollment_token("team-y", {{"env", "it"}}, 1), release);
  wait_online(hub, *ax);
  wait_online(hub, *ay);
  const std::string x_dev = ax->device_id(), y_dev = ay->device_id();
  const size_t audit_start = hub.audit().size();

  // No token: 401 with a JSON error, for reads and writes.
  auto [s_none, b_none] = hub.call("GET", "/v1/devices", "", "application/json", std::string());
  CHECK(s_none == 401);
  CHECK(b_none["error"]["code"] == "unauthenticated");

  // A viewer creating a campaign: 403, and nothing stored.
  const std::string x_viewer = hub.api_token("viewer", "team-x");
  const std::string y_op = hub.api_token("operator", "team-y");
  const auto bundle = make_bundle("edge-base", 1,
                                  {std::make_tuple(v1::FILE_KIND_MANIFEST, std::string("a.yaml"),
                                                   std::string("kind: ConfigMap\n"))},
                                  {&release});
  auto [s_b, b_b] = hub.call("POST", "/v1/bundles", bundle.bytes, "application/octet-stream", y_op);
  REQUIRE(s_b == 201);
  const std::string bundle_id = b_b["id"].get<std::string>();
  auto [s_v, b_v] = hub.call("POST", "/v1/campaigns", json{{"bundle", bundle_id}, {"selector", "env=it"}}.dump(),
                             "application/json", x_viewer);
  CHECK(s_v == 403);
  CHECK(b_v["error"]["code"] == "permission_denied");
  CHECK(hub.call("GET", "/v1/campaigns").second["items"].empty());

  // Project X sees its own device only; Y's is "not found".
  auto [s_l, b_l] = hub.call("GET", "/v1/devices", "", "application/json", x_viewer);
  REQUIRE(s_l == 200);
  CHECK(ids(b_l["items"]) == std::set<std::string>{x_dev});
  CHECK(hub.call("GET", "/v1/devices/" + y_dev, "", "application/json", x_viewer).first == 404);
  CHECK(hub.call("GET", "/v1/devices/" + x_dev, "", "application/json", x_viewer).first == 200);
  CHECK(ids(hub.devices()) == std::set<std::string>{x_dev, y_dev});  // the "*" admin sees both

  // Y's campaign targets Y's device only, and X cannot see it.
  auto [s_c, b_c] = hub.call("POST", "/v1/campaigns", json{{"bundle", bundle_id}, {"selector", "env=it"}}.dump(),
                             "application/json", y_op);
  REQUIRE(s_c == 201);
  const std::string campaign = b_c["id"].get<std::string>();
  CHECK(b_c["counts"]["total"] == 1);
  CHECK(hub.call("GET", "/v1/campaigns", "", "application/json", x_viewer).second["items"].empty());
  CHECK(hub.call("GET", "/v1/campaigns/" + campaign, "", "application/json", x_viewer).first == 404);
  CHECK(hub.call("GET", "/v1/bundles/" + bundle_id, "", "application/json", x_viewer).first == 404);

  // Bad input on the new routes: a JSON 4xx, and nothing stored.
  const json tokens_before = hub.call("GET", "/v1/tokens").second["items"];
  const json labels_before = hub.device(x_dev)["labels"];
  const std::vector<std::tuple<std::string, std::string, std::string>> bad = {
      {"POST", "/v1/tokens", "{\"name\": "},
      {"POST", "/v1/tokens", R"({"name":"n","role":"viewer","colour":"red"})"},
      {"POST", "/v1/tokens", "{\"name\":\"" + std::string(2u << 20, 'a') + "\",\"role\":\"viewer\"}"},
      {"PATCH", "/v1/devices/" + x_dev, "{\"labels\": "},
      {"PATCH", "/v1/devices/" + x_dev, R"({"labels":{"tier":"edge"},"colour":"red"})"},
      {"PATCH", "/v1/devices/" + x_dev, R"({"labels":{"bad key!":"x"}})"},
      {"PATCH", "/v1/devices/" + x_dev, "{\"labels\":{\"tier\":\"" + std::string(2u << 20, 'a') + "\"}}"},
  };
  for (const auto& [method, path, body] : bad) {
    INFO(method << " " << path << " " << body.substr(0, 60));
    auto [s, b] = hub.call(method, path, body);
    CHECK(s >= 400);
    CHECK(s < 500);
    CHECK(b.is_object());
    CHECK(b["error"]["code"].is_string());
  }
  CHECK(hub.call("GET", "/v1/tokens").second["items"] == tokens_before);
  CHECK(hub.device(x_dev)["labels"] == labels_before);

  // The CLI: make a token, see it listed, revoke it; from then on it is refused.
  auto made = hub.cli({"token", "create", "ci-bot", "--role", "operator", "--project", "team-x", "-o", "json"});
  INFO(made.err);
  REQUIRE(made.exit_code == 0);
  const json made_j = json::parse(made.out);
  const std::string ci_secret = made_j["token"].get<std::string>();
  const std::string ci_id = made_j["id"].get<std::string>();
  CHECK(hub.call("GET", "/v1/devices", "", "application/json", ci_secret).first == 200);
  auto listed = hub.cli({"token", "list"});
  REQUIRE(listed.exit_code == 0);
  CHECK(listed.out.find(ci_id) != std::string::npos);
  CHECK(listed.out.find(ci_secret) == std::string::npos);
  REQUIRE(hub.cli({"token", "revoke", ci_id}).exit_code == 0);
  auto [s_r, b_r] = hub.call("GET", "/v1/devices", "", "application/json", ci_secret);
  CHECK(s_r == 401);
  CHECK(b_r["error"]["code"] == "unauthenticated");

  // Labels through the CLI: set one, remove one.
  REQUIRE(hub.cli({"device", "label", x_dev, "tier=edge"}).exit_code == 0);
  REQUIRE(hub.cli({"device", "label", x_dev, "tier-", "zone=a"}).exit_code == 0);
  CHECK(hub.device(x_dev)["labels"]["zone"] == "a");
  CHECK_FALSE(hub.device(x_dev)["labels"].contains("tier"));

  // Every mutating call above is in the audit log with its outcome, in order.
  const json audit = hub.audit();
  std::vector<std::tuple<std::string, std::string, int>> got;
  for (size_t i = audit_start; i < audit.size(); ++i) {
    got.emplace_back(audit[i]["method"].get<std::string>(), audit[i]["path"].get<std::string>(),
                     audit[i]["status"].get<int>());
  }
  std::vector<std::tuple<std::string, std::string, int>> want = {
      {"POST", "/v1/tokens", 201},  // x_viewer
      {"POST", "/v1/tokens", 201},  // y_op
      {"POST", "/v1/bundles", 201},
      {"POST", "/v1/campaigns", 403},
      {"POST", "/v1/campaigns", 201},
  };
  for (const auto& [method, path, body] : bad) {
    (void)body;
    want.emplace_back(method, path, 0);
  }
  want.insert(want.end(), {{"POST", "/v1/tokens", 201},
                           {"DELETE", "/v1/tokens/" + ci_id, 200},
                           {"PATCH", "/v1/devices/" + x_dev, 200},
                           {"PATCH", "/v1/devices/" + x_dev, 200}});
  REQUIRE(got.size() == want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    INFO(i);
    CHECK(std::get<0>(got[i]) == std::get<0>(want[i]));
    CHECK(std::get<1>(got[i]) == std::get<1>(want[i]));
    if (std::get<2>(want[i]) == 0) {
      CHECK(std::get<2>(got[i]) >= 400);  // the bad-input calls: refused
    } else {
      CHECK(std::get<2>(got[i]) == std::get<2>(want[i]));
    }
  }
  // Who: the viewer's refused campaign names the viewer's token.
  CHECK(audit[audit_start + 3]["role"] == "viewer");
  CHECK(audit[audit_start + 3]["project"] == "team-x");
  // No secret ever reaches the log.
  const std::string dump = audit.dump();
  for (const auto& secret : {x_viewer, y_op, ci_secret, hub.admin_token()}) CHECK(dump.find(secret) == std::string::npos);

  // The table refuses rewrites even to someone with the database file.
  auto db = sql::Db::open((hub.data_dir() / "hub.db").string());
  REQUIRE(db);
  CHECK_FALSE((*db)->exec("UPDATE audit_log SET status = 200"));
  CHECK_FALSE((*db)->exec("DELETE FROM audit_log"));
  CHECK(hub.audit().size() == audit.size());
}

TEST_CASE("a decommissioned device cannot reconnect to the broker", "[integration][security]") {
  TempDir tmp;
  Hub hub(tmp.path() / "hub");
  hub.start();
  const auto release = bundles::generate_key();
  const std::string token = hub.enrollment_token({{"env", "it"}}, 2);
  auto a = start_agent(tmp, hub, "dev-a", token, release);
  auto b = start_agent(tmp, hub, "dev-b", token, release);
  wait_online(hub, *a);
  wait_online(hub, *b);
  const std::string id = a->device_id();
  a->stop();  // the broker ties client id to username: the probe below would displace it
  REQUIRE(broker_login(hub, *a, id + "-probe-before"));

  auto r = hub.cli({"device", "decommission", id});
  CHECK(r.exit_code == 2);  // refuses without --yes
  CHECK(hub.device(id)["state"] != "decommissioned");
  // A confirmation never comes from the environment: FLOTILLA_YES=true is ignored.
  auto env_yes = proc::run({"/usr/bin/env", "FLOTILLA_YES=true", bin_dir() + "/flotilla", "device", "decommission", id,
                            "--hub", hub.url(), "--token-file", (hub.data_dir() / "admin.token").string()},
                           std::chrono::seconds(60));
  REQUIRE(env_yes);
  CHECK(env_yes->exit_code == 2);
  CHECK(env_yes->err.find("add --yes to confirm") != std::string::npos);
  CHECK(hub.device(id)["state"] != "decommissioned");
  r = hub.cli({"device", "decommission", id, "--yes", "-o", "json"});
  INFO(r.err);
  REQUIRE(r.exit_code == 0);
  CHECK(json::parse(r.out)["state"] == "decommissioned");

  // A's certificate is on the revocation list the broker reloaded: refused.
  std::optional<Error> refusal;
  CHECK(wait_until(
      [&] {
        auto login = broker_login(hub, *a, id + "-probe-after");
        if (!login) refusal = login.error();
        return !login;
      },
      std::chrono::seconds(10)));
  REQUIRE(refusal);
  CHECK(refusal->code == Errc::unauthenticated);
  // Its agent, restarted, cannot get back in either (nor re-enroll); once the
  // refusals outlast revoked-after it says plainly that it was revoked.
  a->append_config("revoked-after: 2s\n");
  const auto restarted = std::chrono::steady_clock::now();
  a->start();
  CHECK_FALSE(wait_until([&] { return hub.device(id)["online"] == true; }, std::chrono::seconds(5)));
  CHECK(wait_until([&] { return a->log().find("state=credentials_revoked") != std::string::npos; },
                   std::chrono::seconds(20)));
  CHECK(std::chrono::steady_clock::now() - restarted >= std::chrono::seconds(2));
  CHECK(hub.device(id)["state"] == "decommissioned");

  // Out of the default list, kept for history; B is unaffected.
  CHECK(ids(hub.devices()) == std::set<std::string>{b->device_id()});
  auto [s_all, all] = hub.call("GET", "/v1/devices?include_decommissioned=true");
  REQUIRE(s_all == 200);
  CHECK(ids(all["items"]) == std::set<std::string>{id, b->device_id()});
  CHECK(hub.device(b->device_id())["online"] == true);
}

// Access control, audit log, device edits and /metrics, through the REST
// handler over a real HubService and SQLite store in a temporary directory.
#include <catch2/catch.hpp>

#include <algorithm>

#include "tests/support/hub_fixtures.hpp"
#include "tests/support/hub_test_support.hpp"
#include "tests/support/temp_dir.hpp"

#include <atomic>
#include <cmath>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "flotilla/bundles/bundle.hpp"
#include "flotilla/bundles/keys.hpp"
#include "flotilla/common/clock.hpp"
#include "flotilla/common/crypto.hpp"
#include "flotilla/common/transport.hpp"
#include "flotilla/hub/api.hpp"
#include "flotilla/hub/service.hpp"
#include "flotilla/hub/store.hpp"
#include "flotilla/v1/enroll.pb.h"
#include "flotilla/v1/report.pb.h"

namespace {

using flotilla::FakeClock;
using flotilla::hub::Api;
using flotilla::hub::AuditRecord;
using flotilla::hub::HttpResponse;
using flotilla::hub::HubService;
using flotilla::hub::Labels;
using flotilla::hub::ServiceConfig;
using flotilla::hub::Store;
using flotilla::hub::TokenRecord;
using nlohmann::json;
namespace bundles = flotilla::bundles;
namespace transport = flotilla::transport;
namespace v1 = flotilla::v1;

using flotilla::test::body_of;
using flotilla::test::error_code;
using flotilla::test::RecordingTransport;
using flotilla::test::TempDir;

// A hub whose first admin token covers every project, like the bootstrap
// token in <data-dir>/admin.token.
class Hub {
 public:
  Hub() {
    auto s = Store::open((dir_.path() / "hub.db").string());
    REQUIRE(s);
    store_ = std::move(*s);
    ServiceConfig cfg;
    cfg.broker_url = "tcp://127.0.0.1:1883";
    cfg.public_url = "http://hub.test:8080";
    service_ = std::make_unique<HubService>(*store_, clock, cfg);
    api_ = std::make_unique<Api>(*service_);
    const auto t = flotilla::test::make_token(*service_, "api", "root", "admin");
    root = t.secret;
    root_id = t.record.id;
    REQUIRE(service_->attach_transport(transport_));
  }
  ~Hub() { service_->stop(); }

  HttpResponse call(const std::string& method, const std::string& target, const std::string& body = "",
                    std::optional<std::string> token = std::nullopt) {
    return api_->handle(flotilla::test::api_request(method, target, body, token ? *token : root));
  }
  json get(const std::string& target, std::optional<std::string> token = std::nullopt) {
    auto r = call("GET", target, "", token);
    INFO(target << ": " << r.body);
    REQUIRE(r.status == 200);
    return body_of(r);
  }

  // An API token made through the API, as an admin would.
  std::pair<std::string, std::string> token(const std::string& role, const std::string& project,
                                            std::optional<std::string> as = std::nullopt) {
    auto r = call("POST", "/v1/tokens", json{{"name", role + "-" + project}, {"role", role}, {"project", project}}.dump(),
                  as);
    INFO(r.body);
    REQUIRE(r.status == 201);
    const json j = body_of(r);
    return {j["token"].get<std::string>(), j["id"].get<std::string>()};
  }

  // Enrolls a device with an enrollment token of the project; returns its id.
  std::string enroll_device(const std::string& project, const Labels& labels = {}) {
    TokenRecord rec;
    rec.name = "enroll-" + project;
    rec.role = "enroll";
    rec.project = project;
    for (const auto& [k, v] : labels) rec.device_label_keys.push_back(k);  // the device names its own
    auto t = service_->create_token("enroll", rec);
    REQUIRE(t);
    auto r = enroll(t->secret, labels);
    INFO(r.body);
    REQUIRE(r.status == 200);
    v1::EnrollResponse resp;
    REQUIRE(resp.ParseFromString(r.body));
    return resp.device_id();
  }

  HttpResponse enroll(const std::string& token, const Labels& labels = {},
                      std::optional<bundles::KeyPair> key = std::nullopt) {
    if (!key) key = bundles::generate_key();
    last_key = *key;
    return call("POST", "/v1/enroll", flotilla::test::enroll_request(token, *key, labels).SerializeAsString(),
                std::string());
  }

  std::string upload_bundle(const std::string& token) {
    const auto env = flotilla::test::signed_bundle(clock.now_unix(), "edge-base-" + std::to_string(++bundle_seq_), 1,
                                                   "kind: ConfigMap\n", {&signing_key_});
    auto r = call("POST", "/v1/bundles", bundles::serialize_envelope(env), token);
    INFO(r.body);
    REQUIRE(r.status == 201);
    return body_of(r)["id"].get<std::string>();
  }

  std::vector<AuditRecord> audit() {
    auto rows = store_->list_audit(0, 100000, "*");
    REQUIRE(rows);
    return *rows;
  }
  int64_t token_count(const std::string& kind) {
    auto n = store_->count_tokens(kind);
    REQUIRE(n);
    return *n;
  }

  HubService& service() { return *service_; }
  Store& store() { return *store_; }

  FakeClock clock;
  std::string root, root_id;
  RecordingTransport transport_;
  bundles::KeyPair last_key;

 private:
  TempDir dir_;
  std::unique_ptr<Store> store_;
  std::unique_ptr<HubService> service_;
  std::unique_ptr<Api> api_;
  bundles::KeyPair signing_key_ = bundles::generate_key();
  int bundle_seq_ = 0;
};

using flotilla::test::ids_of;

}  // namespace

TEST_CASE("hub roles: a viewer reads, an operator changes the fleet, an admin manages tokens", "[unit][hub][access]") {
  Hub hub;
  const std::string dev = hub.enroll_device("default");
  const auto viewer = hub.token("viewer", "default").first;
  const auto op = hub.token("operator", "default").first;
  const auto admin = hub.token("admin", "default").first;
  const std::string et = json{{"ttl", "1h"}}.dump();
  const std::string labels = json{{"labels", {{"tier", "edge"}}}}.dump();
  const std::string tok = json{{"name", "x"}, {"role", "viewer"}}.dump();

  struct Case {
    std::string method, target, body;
    int viewer, op, admin;
  };
  const std::vector<Case> cases = {
      {"GET", "/v1/devices", "", 200, 200, 200},
      {"GET", "/v1/devices/" + dev, "", 200, 200, 200},
      {"GET", "/v1/bundles", "", 200, 200, 200},
      {"GET", "/v1/campaigns", "", 200, 200, 200},
      {"PATCH", "/v1/devices/" + dev, labels, 403, 200, 200},
      {"POST", "/v1/enrollment-tokens", et, 403, 201, 201},
      {"GET", "/v1/enrollment-tokens", "", 403, 200, 200},
      {"POST", "/v1/campaigns", json{{"bundle", "nope"}, {"selector", ""}}.dump(), 403, 404, 404},
      {"POST", "/v1/tokens", tok, 403, 403, 201},
      {"GET", "/v1/tokens", "", 403, 403, 200},
      {"GET", "/v1/audit", "", 403, 403, 200},
  };
  for (const auto& c : cases) {
    for (const auto& [who, secret, want] :
         {std::tuple{"viewer", viewer, c.viewer}, std::tuple{"operator", op, c.op}, std::tuple{"admin", admin, c.admin}}) {
      INFO(who << " " << c.method << " " << c.target);
      auto r = hub.call(c.method, c.target, c.body, secret);
      INFO(r.body);
      CHECK(r.status == want);
      if (want == 403) CHECK(error_code(r) == "permission_denied");
    }
  }
  // Refused calls changed nothing: one enrollment token per allowed role,
  // one API token from the admin (plus root and the three above).
  CHECK(hub.token_count("enroll") == 1 + 2);
  CHECK(hub.token_count("api") == 1 + 3 + 1);
}

TEST_CASE("hub API tokens: the secret is shown once, stored hashed, and revocation is immediate",
          "[unit][hub][access]") {
  Hub hub;
  auto created = hub.call("POST", "/v1/tokens", json{{"name", "ci"}, {"role", "operator"}, {"project", "default"},
                                                     {"ttl", "1h"}}.dump());
  REQUIRE(created.status == 201);
  const json t = body_of(created);
  const std::string secret = t["token"].get<std::string>();
  const std::string id = t["id"].get<std::string>();
  CHECK(secret.rfind("flt_api_", 0) == 0);
  CHECK(t["role"] == "operator");
  CHECK(t["project"] == "default");
  CHECK(t["expires_at"] == bundles::format_rfc3339(hub.clock.now_unix() + 3600));

  // The list names tokens but never shows a secret or a hash.
  const json list = hub.get("/v1/tokens");
  CHECK(ids_of(list["items"]) == std::set<std::string>{hub.root_id, id});
  const std::string dump = list.dump();
  CHECK(dump.find(secret) == std::string::npos);
  CHECK(dump.find(flotilla::crypto::sha256_hex(secret)) == std::string::npos);
  for (const auto& item : list["items"]) CHECK_FALSE(item.contains("token"));
  // The store has the hash and not the secret.
  auto st = hub.store().db().prepare("SELECT COUNT(*) FROM tokens WHERE secret_hash = ? AND id = ?");
  REQUIRE(st);
  st->bind(1, std::string_view(flotilla::crypto::sha256_hex(secret))).bind(2, std::string_view(id));
  REQUIRE(st->step());
  CHECK(st->col_int(0) == 1);

  CHECK(hub.call("GET", "/v1/devices", "", secret).status == 200);
  auto revoked = hub.call("DELETE", "/v1/tokens/" + id);
  REQUIRE(revoked.status == 200);
  CHECK(body_of(revoked)["revoked"] == true);
  auto after = hub.call("GET", "/v1/devices", "", secret);
  CHECK(after.status == 401);
  CHECK(error_code(after) == "unauthenticated");
  CHECK(hub.call("DELETE", "/v1/tokens/tok-nope").status == 404);

  // Expiry is by the hub's clock.
  const auto short_lived = hub.call("POST", "/v1/tokens", json{{"name", "s"}, {"role", "viewer"}, {"ttl", "10s"}}.dump());
  REQUIRE(short_lived.status == 201);
  const std::string s2 = body_of(short_lived)["token"].get<std::string>();
  CHECK(hub.call("GET", "/v1/devices", "", s2).status == 200);
  hub.clock.advance(std::chrono::seconds(11));
  CHECK(hub.call("GET", "/v1/devices", "", s2).status == 401);
}

TEST_CASE("hub refuses bad API token requests and stores nothing", "[unit][hub][access]") {
  Hub hub;
  const int64_t before = hub.token_count("api");
  const size_t audit_before = hub.audit().size();
  const std::vector<std::string> bad = {
      "{\"name\": ",                                                     // malformed
      "[1,2]",                                                           // not an object
      json{{"name", "x"}, {"role", "viewer"}, {"colour", "red"}}.dump(),  // unknown field
      json{{"name", "x"}, {"role", "root"}}.dump(),                      // bad role
      json{{"role", "viewer"}}.dump(),                                   // no name
      json{{"name", ""}, {"role", "viewer"}}.dump(),                     // empty name
      json{{"name", "x"}, {"role", "viewer"}, {"project", "has space"}}.dump(),
      json{{"name", "x"}, {"role", "viewer"}, {"ttl", "forever"}}.dump(),
      json{{"name", "x"}, {"role", "viewer"}, {"ttl", 5}}.dump(),
      "{\"name\":\"" + std::string(2u << 20, 'a') + "\"}",  // oversized
  };
  for (const auto& b : bad) {
    INFO(b.substr(0, 80));
    auto r = hub.call("POST", "/v1/tokens", b);
    CHECK(r.status >= 400);
    CHECK(r.status < 500);
    CHECK_FALSE(error_code(r).empty());
  }
  CHECK(hub.token_count("api") == before);
  // Each refusal is audited with its outcome, and no body reaches the log.
  const auto rows = hub.audit();
  REQUIRE(rows.size() == audit_before + bad.size());
  for (size_t i = audit_before; i < rows.size(); ++i) {
    CHECK(rows[i].status >= 400);
    CHECK(rows[i].path == "/v1/tokens");
    CHECK(rows[i].detail.find("colour") == std::string::npos);
  }
}

TEST_CASE("hub project scoping: a project token never sees another project's fleet", "[unit][hub][access]") {
  Hub hub;
  const std::string x_dev = hub.enroll_device("team-x", {{"env", "prod"}});
  const std::string y_dev = hub.enroll_device("team-y", {{"env", "prod"}});
  const auto [x_admin, x_admin_id] = hub.token("admin", "team-x");
  const auto x_op = hub.token("operator", "team-x", x_admin).first;
  const auto x_viewer = hub.token("viewer", "team-x", x_admin).first;
  const auto y_op = hub.token("operator", "team-y").first;

  // Devices: list filtered, the other project's device is "not found" for every verb.
  CHECK(ids_of(hub.get("/v1/devices", x_viewer)["items"]) == std::set<std::string>{x_dev});
  CHECK(ids_of(hub.get("/v1/devices?selector=env%3Dprod", x_viewer)["items"]) == std::set<std::string>{x_dev});
  CHECK(ids_of(hub.get("/v1/devices")["items"]) == std::set<std::string>{x_dev, y_dev});
  CHECK(hub.call("GET", "/v1/devices/" + y_dev, "", x_viewer).status == 404);
  auto patch = hub.call("PATCH", "/v1/devices/" + y_dev, json{{"labels", {{"owned", "x"}}}}.dump(), x_op);
  CHECK(patch.status == 404);
  CHECK(hub.call("DELETE", "/v1/devices/" + y_dev, "", x_op).status == 404);
  const json y_after = hub.get("/v1/devices/" + y_dev);
  CHECK_FALSE(y_after["labels"].contains("owned"));
  CHECK(y_after["state"] != "decommissioned");

  // Tokens: an X admin makes X tokens only, and sees and revokes only X's.
  for (const std::string p : {"team-y", "*"}) {
    auto r = hub.call("POST", "/v1/tokens", json{{"name", "n"}, {"role", "viewer"}, {"project", p}}.dump(), x_admin);
    CHECK(r.status == 403);
  }
  auto defaulted = hub.call("POST", "/v1/tokens", json{{"name", "n"}, {"role", "viewer"}}.dump(), x_admin);
  REQUIRE(defaulted.status == 201);
  CHECK(body_of(defaulted)["project"] == "team-x");
  const json x_tokens = hub.get("/v1/tokens", x_admin);  // a range-for over a temporary's member dangles
  for (const auto& t : x_tokens["items"]) CHECK(t["project"] == "team-x");
  CHECK(hub.call("DELETE", "/v1/tokens/" + hub.root_id, "", x_admin).status == 404);
  CHECK(hub.call("GET", "/v1/devices", "", hub.root).status == 200);  // root still works

  // Enrollment tokens: created in, listed from and revoked within one's own project.
  auto y_et = hub.call("POST", "/v1/enrollment-tokens", json{{"ttl", "1h"}}.dump(), y_op);
  REQUIRE(y_et.status == 201);
  CHECK(body_of(y_et)["project"] == "team-y");
  const std::string y_et_id = body_of(y_et)["id"].get<std::string>();
  CHECK(hub.call("POST", "/v1/enrollment-tokens", json{{"project", "team-y"}}.dump(), x_op).status == 403);
  const json x_enrollment_tokens = hub.get("/v1/enrollment-tokens", x_op);
  for (const auto& t : x_enrollment_tokens["items"]) CHECK(t["project"] == "team-x");
  CHECK(hub.call("DELETE", "/v1/enrollment-tokens/" + y_et_id, "", x_op).status == 404);
  auto y_tok = hub.store().get_token("enroll", y_et_id);
  REQUIRE(y_tok);
  REQUIRE(*y_tok);
  CHECK_FALSE((*y_tok)->revoked);
  CHECK(hub.call("DELETE", "/v1/enrollment-tokens/" + y_et_id, "", y_op).status == 200);
  // A revoked enrollment token enrolls nothing.
  CHECK(hub.enroll(body_of(y_et)["token"].get<std::string>()).status == 401);

  // Bundles: Y's bundle is invisible to X.
  const std::string y_bundle = hub.upload_bundle(y_op);
  CHECK(hub.get("/v1/bundles", x_viewer)["items"].empty());
  CHECK(hub.call("GET", "/v1/bundles/" + y_bundle, "", x_viewer).status == 404);
  CHECK(ids_of(hub.get("/v1/bundles", y_op)["items"]) == std::set<std::string>{y_bundle});

  // The audit log: an X admin reads X's rows only.
  const json x_audit = hub.get("/v1/audit?limit=1000", x_admin);
  for (const auto& a : x_audit["items"]) CHECK(a["project"] == "team-x");
  CHECK_FALSE(hub.get("/v1/audit?limit=1000", x_admin)["items"].empty());
}

TEST_CASE("hub ?project= narrows a reader of every project to one project, and a project-scoped reader names only its own",
          "[unit][hub][access]") {
  Hub hub;
  const std::string x_dev = hub.enroll_device("team-x", {{"env", "prod"}});
  const std::string y_dev = hub.enroll_device("team-y", {{"env", "prod"}});
  const auto x_op = hub.token("operator", "team-x").first;
  const auto y_op = hub.token("operator", "team-y").first;
  const std::string x_bundle = hub.upload_bundle(x_op);
  const std::string y_bundle = hub.upload_bundle(y_op);
  std::map<std::string, std::string> campaign_of;
  for (const auto& [project, tok, bundle] :
       {std::tuple{"team-x", x_op, x_bundle}, std::tuple{"team-y", y_op, y_bundle}}) {
    auto r = hub.call("POST", "/v1/campaigns", json{{"bundle", bundle}, {"selector", "env=prod"}}.dump(), tok);
    INFO(r.body);
    REQUIRE(r.status == 201);
    campaign_of[project] = body_of(r)["id"].get<std::string>();
  }

  // A caller of every project: narrowed by ?project=, everything without it
  // (or with project=*).
  CHECK(ids_of(hub.get("/v1/devices?project=team-x")["items"]) == std::set<std::string>{x_dev});
  CHECK(ids_of(hub.get("/v1/devices?project=team-y&selector=env%3Dprod")["items"]) == std::set<std::string>{y_dev});
  CHECK(ids_of(hub.get("/v1/devices")["items"]) == std::set<std::string>{x_dev, y_dev});
  CHECK(ids_of(hub.get("/v1/devices?project=%2A")["items"]) == std::set<std::string>{x_dev, y_dev});
  CHECK(ids_of(hub.get("/v1/devices?project=team-z")["items"]).empty());
  CHECK(hub.call("GET", "/v1/devices/" + y_dev + "?project=team-x").status == 404);
  CHECK(hub.get("/v1/devices/" + y_dev + "?project=team-y")["id"] == y_dev);
  CHECK(ids_of(hub.get("/v1/campaigns?project=team-x")["items"]) == std::set<std::string>{campaign_of["team-x"]});
  CHECK(ids_of(hub.get("/v1/campaigns")["items"]) ==
        std::set<std::string>{campaign_of["team-x"], campaign_of["team-y"]});
  CHECK(hub.call("GET", "/v1/campaigns/" + campaign_of["team-y"] + "?project=team-x").status == 404);
  CHECK(hub.get("/v1/campaigns/" + campaign_of["team-y"] + "?devices=true&project=team-y")["id"] ==
        campaign_of["team-y"]);

  // A project-scoped caller: its own project is the same as no parameter;
  // another project, or all of them, is refused and shows nothing.
  CHECK(ids_of(hub.get("/v1/devices?project=team-x", x_op)["items"]) == std::set<std::string>{x_dev});
  CHECK(ids_of(hub.get("/v1/campaigns?project=team-x", x_op)["items"]) == std::set<std::string>{campaign_of["team-x"]});
  for (const std::string& target : std::vector<std::string>{
           "/v1/devices?project=team-y", "/v1/devices?project=%2A", "/v1/devices/" + y_dev + "?project=team-y",
           "/v1/campaigns?project=team-y", "/v1/campaigns/" + campaign_of["team-y"] + "?project=team-y"}) {
    INFO(target);
    auto r = hub.call("GET", target, "", x_op);
    CHECK(r.status == 403);
    CHECK(error_code(r) == "permission_denied");
    CHECK_THAT(r.body, Catch::Contains("your token is for project team-x"));
    CHECK(r.body.find(y_dev) == std::string::npos);
  }
  // A project that is no project name is a clear 400, for every caller.
  for (const std::string target : {"/v1/devices?project=", "/v1/devices?project=has%20space",
                                   "/v1/campaigns?project=a%2Fb"}) {
    INFO(target);
    auto r = hub.call("GET", target);
    CHECK(r.status == 400);
    CHECK_THAT(r.body, Catch::Contains("bad project"));
  }
  // Uploading a bundle names its project the same way (one check for both).
  auto up = hub.call("POST", "/v1/bundles?project=team-y", "x", x_op);
  CHECK(up.status == 403);
  CHECK_THAT(up.body, Catch::Contains("cannot act for project team-y"));
}

TEST_CASE("hub audit log records every mutating call with who, what and outcome", "[unit][hub][access]") {
  Hub hub;
  const auto [viewer, viewer_id] = hub.token("viewer", "default");
  const std::string dev = hub.enroll_device("default");
  const size_t start = hub.audit().size();

  // A scripted sequence: (status, actor) expected for each.
  CHECK(hub.call("POST", "/v1/enrollment-tokens", json{{"ttl", "1h"}, {"name", "rack"}}.dump()).status == 201);
  CHECK(hub.call("POST", "/v1/enrollment-tokens", json{{"ttl", "1h"}}.dump(), viewer).status == 403);
  CHECK(hub.call("POST", "/v1/enrollment-tokens", json{{"ttl", "1h"}}.dump(), std::string()).status == 401);
  CHECK(hub.call("POST", "/v1/enrollment-tokens", json{{"ttl", "1h"}}.dump(), std::string("flt_api_bogus")).status ==
        401);
  CHECK(hub.call("PATCH", "/v1/devices/" + dev, json{{"labels", {{"tier", "edge"}}}}.dump()).status == 200);
  CHECK(hub.call("DELETE", "/v1/devices/d-unknown").status == 404);
  CHECK(hub.call("GET", "/v1/devices").status == 200);  // reads are not audited
  CHECK(hub.call("GET", "/v1/audit").status == 200);

  const auto rows = hub.audit();
  REQUIRE(rows.size() == start + 6);
  struct Want {
    std::string method, path, actor;
    int status;
  };
  const std::vector<Want> want = {
      {"POST", "/v1/enrollment-tokens", hub.root_id, 201}, {"POST", "/v1/enrollment-tokens", viewer_id, 403},
      {"POST", "/v1/enrollment-tokens", "anonymous", 401}, {"POST", "/v1/enrollment-tokens", "anonymous", 401},
      {"PATCH", "/v1/devices/" + dev, hub.root_id, 200},   {"DELETE", "/v1/devices/d-unknown", hub.root_id, 404}};
  for (size_t i = 0; i < want.size(); ++i) {
    const auto& a = rows[start + i];
    INFO(i << ": " << a.method << " " << a.path << " " << a.actor << " " << a.status);
    CHECK(a.method == want[i].method);
    CHECK(a.path == want[i].path);
    CHECK(a.actor == want[i].actor);
    CHECK(a.status == want[i].status);
    CHECK(a.time_ms == hub.clock.now_unix_ms());
    CHECK(a.detail.find("flt_") == std::string::npos);  // never a secret
  }
  CHECK(rows[start].role == "admin");
  CHECK(rows[start].project == "*");
  CHECK(rows[start].detail.find("enrollment token enr-") == 0);
  CHECK(rows[start + 1].role == "viewer");
  CHECK(rows[start + 4].detail.find("tier") != std::string::npos);

  // The REST view pages by id, oldest first.
  const json page1 = hub.get("/v1/audit?limit=2");
  REQUIRE(page1["items"].size() == 2);
  const int64_t next = page1["next"].get<int64_t>();
  CHECK(next == page1["items"][1]["id"].get<int64_t>());
  const json page2 = hub.get("/v1/audit?limit=2&after=" + std::to_string(next));
  REQUIRE(page2["items"].size() == 2);
  CHECK(page2["items"][0]["id"].get<int64_t>() > next);
  CHECK(hub.call("GET", "/v1/audit?limit=0").status == 400);
  CHECK(hub.call("GET", "/v1/audit?after=x").status == 400);
}

TEST_CASE("hub audit log is append-only in the store itself", "[unit][hub][access]") {
  Hub hub;
  REQUIRE(hub.call("POST", "/v1/enrollment-tokens", json{{"ttl", "1h"}}.dump()).status == 201);
  const auto before = hub.audit();
  REQUIRE_FALSE(before.empty());
  auto upd = hub.store().db().exec("UPDATE audit_log SET status = 200, actor = 'someone-else'");
  REQUIRE_FALSE(upd);
  CHECK(upd.error().message.find("append-only") != std::string::npos);
  CHECK_FALSE(hub.store().db().exec("DELETE FROM audit_log"));
  const auto after = hub.audit();
  REQUIRE(after.size() == before.size());
  CHECK(after.back().actor == before.back().actor);
  CHECK(after.back().status == before.back().status);
}

TEST_CASE("hub audits enrollment by enrollment token id, and refusals as anonymous", "[unit][hub][access]") {
  Hub hub;
  TokenRecord rec;
  rec.name = "rack";
  rec.role = "enroll";
  auto t = hub.service().create_token("enroll", rec);
  REQUIRE(t);
  REQUIRE(hub.enroll(t->secret).status == 200);
  CHECK(hub.enroll("flt_enr_wrong").status == 401);
  const auto rows = hub.audit();
  REQUIRE(rows.size() >= 2);
  const auto& ok = rows[rows.size() - 2];
  CHECK(ok.actor == "enrollment-token:" + t->record.id);
  CHECK(ok.path == "/v1/enroll");
  CHECK(ok.status == 200);
  CHECK(ok.detail.find("enrolled device d-") == 0);
  CHECK(ok.method == "POST");
  CHECK_FALSE(ok.peer.empty());
  // Exactly one row for it: written in the enrollment's own transaction, not again after.
  CHECK(std::count_if(rows.begin(), rows.end(), [](const auto& a) { return a.path == "/v1/enroll" && a.status == 200; }) ==
        1);
  CHECK(rows.back().actor == "anonymous");
  CHECK(rows.back().status == 401);
  for (const auto& a : rows) CHECK(a.detail.find(t->secret) == std::string::npos);
}

TEST_CASE("hub edits device labels: set and remove, validated, nothing changed on bad input", "[unit][hub][access]") {
  Hub hub;
  const std::string dev = hub.enroll_device("default", {{"env", "prod"}, {"zone", "a"}});
  auto r = hub.call("PATCH", "/v1/devices/" + dev, R"({"labels": {"tier": "edge", "zone": null}})");
  INFO(r.body);
  REQUIRE(r.status == 200);
  CHECK(body_of(r)["labels"] == json{{"env", "prod"}, {"tier", "edge"}});
  CHECK(hub.get("/v1/devices/" + dev)["labels"] == json{{"env", "prod"}, {"tier", "edge"}});
  // Selectors see the new labels.
  CHECK(ids_of(hub.get("/v1/devices?selector=tier%3Dedge")["items"]) == std::set<std::string>{dev});

  const std::vector<std::string> bad = {
      R"({"labels": {"bad key!": "x"}})",  R"({"labels": {"tier": "has space"}})", R"({"labels": {"tier": 5}})",
      R"({"labels": "tier=core"})",        R"({"labels": {}})",                     R"({"labels": {"a": "b"}, "x": 1})",
      R"({"labels": {"tier": "core", "bad key!": "x"}})",  // one bad key spoils the whole edit
      "not json"};
  for (const auto& b : bad) {
    INFO(b);
    auto e = hub.call("PATCH", "/v1/devices/" + dev, b);
    CHECK(e.status == 400);
    CHECK(error_code(e) == "invalid_argument");
  }
  CHECK(hub.get("/v1/devices/" + dev)["labels"] == json{{"env", "prod"}, {"tier", "edge"}});
  CHECK(hub.call("PATCH", "/v1/devices/d-nope", R"({"labels": {"a": "b"}})").status == 404);
}

TEST_CASE("hub decommissions a device: credential gone, desired state cleared, row kept", "[unit][hub][access]") {
  Hub hub;
  const std::string dev = hub.enroll_device("default", {{"env", "prod"}});
  const auto key = hub.last_key;
  const std::string other = hub.enroll_device("default", {{"env", "prod"}});
  auto has_credential = [&](const std::string& id) {
    auto creds = hub.store().credentials();
    REQUIRE(creds);
    for (const auto& [user, hash] : *creds) if (user == id) return true;
    return false;
  };
  REQUIRE(has_credential(dev));
  hub.transport_.clear();

  auto r = hub.call("DELETE", "/v1/devices/" + dev);
  INFO(r.body);
  REQUIRE(r.status == 200);
  CHECK(body_of(r)["state"] == "decommissioned");
  CHECK_FALSE(has_credential(dev));
  CHECK(has_credential(other));
  // The retained desired state is cleared with an empty retained message.
  const auto published = hub.transport_.published();
  REQUIRE(published.size() == 1);
  CHECK(published[0].topic == transport::device_topic(dev, "desired"));
  CHECK(published[0].payload.empty());
  CHECK(published[0].retained);

  // Out of the default list, still there for history.
  CHECK(ids_of(hub.get("/v1/devices")["items"]) == std::set<std::string>{other});
  CHECK(ids_of(hub.get("/v1/devices?include_decommissioned=true")["items"]) == std::set<std::string>{dev, other});
  CHECK(hub.call("GET", "/v1/devices?include_decommissioned=maybe").status == 400);
  CHECK(hub.get("/v1/devices/" + dev)["state"] == "decommissioned");
  CHECK(hub.call("PATCH", "/v1/devices/" + dev, R"({"labels": {"a": "b"}})").status == 409);

  // A report still queued from before cannot revive it.
  v1::Report rep;
  rep.set_device_id(dev);
  rep.set_seq(99);
  rep.set_state(v1::AGENT_STATE_APPLIED);
  transport::Message m{transport::device_topic(dev, "report"), rep.SerializeAsString(), 1, false};
  hub.service().on_message(std::move(m));
  hub.service().drain();
  CHECK(hub.get("/v1/devices/" + dev)["state"] == "decommissioned");

  // Nor can the same identity enroll again, even with a fresh token.
  TokenRecord rec;
  rec.role = "enroll";
  auto t = hub.service().create_token("enroll", rec);
  REQUIRE(t);
  auto again = hub.enroll(t->secret, {}, key);
  CHECK(again.status == 403);
  CHECK_FALSE(has_credential(dev));
  // Decommissioning twice is harmless.
  CHECK(hub.call("DELETE", "/v1/devices/" + dev).status == 200);
}

// ---- /metrics ---------------------------------------------------------------

namespace {

// A strict reader of the Prometheus text exposition format 0.0.4: every line
// is a HELP, a TYPE or a sample; names and labels follow the grammar; a
// family's TYPE comes before its samples and once; no series repeats;
// histograms have cumulative buckets ending in le="+Inf" equal to _count.
struct Sample {
  std::string name;
  std::map<std::string, std::string> labels;
  double value = 0;
};

std::vector<Sample> parse_exposition(const std::string& text) {
  static const std::regex help(R"(^# HELP ([a-zA-Z_:][a-zA-Z0-9_:]*) (.*)$)");
  static const std::regex type(R"(^# TYPE ([a-zA-Z_:][a-zA-Z0-9_:]*) (counter|gauge|histogram|summary|untyped)$)");
  static const std::regex sample(R"(^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)( -?[0-9]+)?$)");
  static const std::regex label(R"(^([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)\"(,|$))");
  std::map<std::string, std::string> types;
  std::set<std::string> helped, series;
  std::vector<Sample> out;
  REQUIRE_FALSE(text.empty());
  REQUIRE(text.back() == '\n');
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    INFO("line: " << line);
    REQUIRE_FALSE(line.empty());
    std::smatch m;
    if (line.rfind("# HELP ", 0) == 0) {
      REQUIRE(std::regex_match(line, m, help));
      CHECK(helped.insert(m[1]).second);
      continue;
    }
    if (line.rfind("# TYPE ", 0) == 0) {
      REQUIRE(std::regex_match(line, m, type));
      CHECK(types.emplace(m[1], m[2]).second);
      continue;
    }
    REQUIRE(line[0] != '#');
    REQUIRE(std::regex_match(line, m, sample));
    Sample s;
    s.name = m[1];
    std::string rest = m[3];
    while (!rest.empty()) {
      std::smatch lm;
      REQUIRE(std::regex_search(rest, lm, label));
      CHECK(s.labels.emplace(lm[1], lm[2]).second);
      rest = lm.suffix().str();
    }
    const std::string v = m[4];
    if (v == "+Inf") s.value = INFINITY;
    else if (v == "-Inf") s.value = -INFINITY;
    else if (v == "NaN") s.value = NAN;
    else {
      size_t used = 0;
      s.value = std::stod(v, &used);
      REQUIRE(used == v.size());
    }
    // The family a sample belongs to must be typed before it.
    std::string family = s.name;
    for (const char* suffix : {"_bucket", "_sum", "_count"}) {
      const std::string sf(suffix);
      if (!types.count(family) && family.size() > sf.size() && family.ends_with(sf)) {
        family = family.substr(0, family.size() - sf.size());
      }
    }
    INFO("family " << family);
    REQUIRE(types.count(family));
    if (types[family] == "counter") CHECK(s.value >= 0);
    std::string key = s.name + "{";
    for (const auto& [k, lv] : s.labels) key += k + "=" + lv + ",";
    CHECK(series.insert(key).second);
    out.push_back(s);
  }
  // Histograms: cumulative, +Inf last and equal to _count.
  for (const auto& [family, t] : types) {
    if (t != "histogram") continue;
    double prev = 0, inf = -1, count = -2;
    for (const auto& s : out) {
      if (s.name == family + "_bucket") {
        CHECK(s.value >= prev);
        prev = s.value;
        if (s.labels.at("le") == "+Inf") inf = s.value;
      }
      if (s.name == family + "_count") count = s.value;
    }
    CHECK(inf == count);
  }
  return out;
}

double value_of(const std::vector<Sample>& samples, const std::string& name,
                const std::map<std::string, std::string>& labels = {}) {
  for (const auto& s : samples) {
    if (s.name != name) continue;
    bool ok = true;
    for (const auto& [k, v] : labels) ok = ok && s.labels.count(k) && s.labels.at(k) == v;
    if (ok) return s.value;
  }
  FAIL("no sample " << name);
  return -1;
}

}  // namespace

TEST_CASE("hub /metrics is valid exposition format and counts devices, messages and requests", "[unit][hub][access]") {
  Hub hub;
  const std::string a = hub.enroll_device("default");
  const std::string b = hub.enroll_device("default");
  (void)b;
  // Two reports and a presence message through the queue.
  for (uint64_t seq : {1, 2}) {
    v1::Report r;
    r.set_device_id(a);
    r.set_seq(seq);
    r.set_state(v1::AGENT_STATE_IDLE);
    hub.service().on_message({transport::device_topic(a, "report"), r.SerializeAsString(), 1, false});
  }
  v1::Presence p;
  p.set_online(true);
  // As the broker forwards a live publish: retain flag clear (a retained
  // "online" delivered at subscribe time proves nothing and is ignored).
  hub.service().on_message({transport::device_topic(a, "presence"), p.SerializeAsString(), 1, false});
  hub.service().drain();
  // The service's worker may hold a batch: wait (bounded) until it is folded in.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (hub.service().mqtt_counters().presence_processed < 1 || hub.service().reports_processed() < 2) {
    REQUIRE(std::chrono::steady_clock::now() < deadline);
    std::this_thread::yield();
  }
  REQUIRE(hub.call("GET", "/v1/devices").status == 200);

  auto r = hub.call("GET", "/metrics");
  INFO(r.body);
  REQUIRE(r.status == 200);
  CHECK(r.content_type.rfind("text/plain; version=0.0.4", 0) == 0);
  const auto samples = parse_exposition(r.body);
  CHECK(value_of(samples, "flotilla_devices", {{"state", "idle"}}) == 1);
  CHECK(value_of(samples, "flotilla_devices", {{"state", "enrolled"}}) == 1);
  CHECK(value_of(samples, "flotilla_devices_presence", {{"presence", "online"}}) == 1);
  CHECK(value_of(samples, "flotilla_devices_presence", {{"presence", "offline"}}) == 1);
  CHECK(value_of(samples, "flotilla_mqtt_messages_received_total", {{"kind", "report"}}) == 2);
  CHECK(value_of(samples, "flotilla_mqtt_messages_received_total", {{"kind", "presence"}}) == 1);
  CHECK(value_of(samples, "flotilla_mqtt_messages_processed_total", {{"kind", "report"}}) == 2);
  CHECK(value_of(samples, "flotilla_report_queue_depth") == 0);
  CHECK(value_of(samples, "flotilla_store_report_commit_seconds_count") >= 1);
  CHECK(value_of(samples, "flotilla_http_requests_total",
                 {{"method", "GET"}, {"route", "/v1/devices"}, {"code", "200"}}) == 1);
  CHECK(value_of(samples, "flotilla_http_requests_total",
                 {{"method", "POST"}, {"route", "/v1/enroll"}, {"code", "200"}}) == 2);

  // Metrics span every project: a project-scoped token may not read them.
  CHECK(hub.call("GET", "/metrics", "", std::string()).status == 401);
  const auto scoped = hub.token("admin", "default").first;
  CHECK(hub.call("GET", "/metrics", "", scoped).status == 403);
  const auto global_viewer = hub.token("viewer", "*").first;
  CHECK(hub.call("GET", "/metrics", "", global_viewer).status == 200);
}

TEST_CASE("hub metrics escape label values", "[unit][hub][access]") {
  CHECK(flotilla::hub::prom_escape("a\"b\\c\nd") == "a\\\"b\\\\c\\nd");
  CHECK(flotilla::hub::prom_escape("c-abc") == "c-abc");
}

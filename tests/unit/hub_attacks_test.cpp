// Attacks on the hub from its API and from devices, each asserting the
// refusal and that nothing was written or changed, through the REST handler
// over a real HubService and SQLite store in a temporary directory.
#include <catch2/catch.hpp>

#include "tests/support/hub_fixtures.hpp"
#include "tests/support/hub_test_support.hpp"
#include "tests/support/temp_dir.hpp"

#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>
#include <spdlog/sinks/ostream_sink.h>

#include "flotilla/bundles/bundle.hpp"
#include "flotilla/bundles/keys.hpp"
#include "flotilla/common/clock.hpp"
#include "flotilla/common/crypto.hpp"
#include "flotilla/common/log.hpp"
#include "flotilla/common/sqlite.hpp"
#include "flotilla/common/transport.hpp"
#include "flotilla/hub/api.hpp"
#include "flotilla/hub/rate_limit.hpp"
#include "flotilla/hub/service.hpp"
#include "flotilla/hub/store.hpp"
#include "flotilla/v1/desired.pb.h"
#include "flotilla/v1/enroll.pb.h"
#include "flotilla/v1/report.pb.h"

namespace {

using flotilla::FakeClock;
using flotilla::hub::Api;
using flotilla::hub::HttpResponse;
using flotilla::hub::HubService;
using flotilla::hub::Labels;
using flotilla::hub::ServiceConfig;
using flotilla::hub::Store;
using flotilla::hub::TokenRecord;
using nlohmann::json;
namespace bundles = flotilla::bundles;
namespace hub = flotilla::hub;
namespace transport = flotilla::transport;
namespace v1 = flotilla::v1;

using flotilla::test::body_of;
using flotilla::test::error_code;
using flotilla::test::RecordingTransport;
using flotilla::test::TempDir;

using flotilla::test::bytes_string;

// A hub whose first admin token covers every project; the engine is ticked
// by the tests, and a recording transport stands in for the broker.
class Hub {
 public:
  explicit Hub(hub::ApiLimits limits = {}, ServiceConfig cfg = {}) {
    auto s = Store::open((dir_.path() / "hub.db").string());
    REQUIRE(s);
    store_ = std::move(*s);
    cfg.broker_url = "tcp://127.0.0.1:1883";
    cfg.public_url = "http://hub.test:8080";
    cfg.engine_thread = false;
    service_ = std::make_unique<HubService>(*store_, clock, cfg);
    api_ = std::make_unique<Api>(*service_, limits);
    root = flotilla::test::make_token(*service_, "api", "root", "admin").secret;
    REQUIRE(service_->attach_transport(transport_));
  }
  ~Hub() { service_->stop(); }

  HubService& service() { return *service_; }
  Store& store() { return *store_; }
  RecordingTransport& broker() { return transport_; }
  Api& api() { return *api_; }
  const std::filesystem::path& dir() const { return dir_.path(); }

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
  // An API token made through the API.
  std::string token(const std::string& role, const std::string& project) {
    auto r = call("POST", "/v1/tokens", json{{"name", role + "-" + project}, {"role", role}, {"project", project}}.dump());
    INFO(r.body);
    REQUIRE(r.status == 201);
    return body_of(r)["token"].get<std::string>();
  }
  // An enrollment token made through the API; body fields as given.
  json enrollment_token(json body, std::optional<std::string> as = std::nullopt) {
    auto r = call("POST", "/v1/enrollment-tokens", body.dump(), as);
    INFO(r.body);
    REQUIRE(r.status == 201);
    return body_of(r);
  }

  // An enrollment request signed by key, with the timestamped proof agents send.
  v1::EnrollRequest enroll_request(const std::string& token, const bundles::KeyPair& key, const Labels& labels = {},
                                   std::optional<uint64_t> issued_ms = std::nullopt) {
    return flotilla::test::enroll_request(token, key, labels,
                                          issued_ms ? *issued_ms : static_cast<uint64_t>(clock.now_unix_ms()));
  }
  HttpResponse post_enroll(const v1::EnrollRequest& req, const std::string& path = "/v1/enroll") {
    return call("POST", path, req.SerializeAsString(), std::string());
  }
  // Enrolls a new device with a fresh single-use token of project; returns its id.
  std::string enroll_device(const std::string& project, const Labels& labels = {}) {
    json keys = json::array();
    for (const auto& [k, v] : labels) keys.push_back(k);
    const std::string tok =
        enrollment_token({{"project", project}, {"device_label_keys", keys}})["token"].get<std::string>();
    auto key = bundles::generate_key();
    keys_.push_back(key);
    auto r = post_enroll(enroll_request(tok, key, labels));
    INFO(r.body);
    REQUIRE(r.status == 200);
    v1::EnrollResponse resp;
    REQUIRE(resp.ParseFromString(r.body));
    return resp.device_id();
  }

  v1::SignedBundle bundle(const std::string& name, uint64_t version, const std::string& content,
                          const std::vector<const bundles::KeyPair*>& signers) {
    return flotilla::test::signed_bundle(clock.now_unix(), name, version, content, signers);
  }
  // Uploads a bundle as token (default: root); returns the answer.
  HttpResponse upload(const v1::SignedBundle& b, std::optional<std::string> token = std::nullopt,
                      const std::string& query = "") {
    return call("POST", "/v1/bundles" + query, bundles::serialize_envelope(b), token);
  }

  // Queues one device message as the broker would deliver it, and processes it.
  void deliver(const std::string& topic, const std::string& payload) {
    transport::Message m;
    m.topic = topic;
    m.payload = payload;
    service_->on_message(std::move(m));
    service_->drain();
  }

  // Desired states published to a device, decoded.
  std::vector<v1::DesiredState> desired_for(const std::string& device_id) {
    std::vector<v1::DesiredState> out;
    for (const auto& m : transport_.published()) {
      if (m.topic != transport::device_topic(device_id, "desired") || m.payload.empty()) continue;
      v1::DesiredState ds;
      REQUIRE(ds.ParseFromString(m.payload));
      out.push_back(ds);
    }
    return out;
  }

  // Whole-table snapshot, to show a refusal changed nothing.
  std::vector<std::string> rows(const std::string& table) {
    std::vector<std::string> out;
    auto st = store_->db().prepare("SELECT * FROM " + table + " ORDER BY 1");
    REQUIRE(st);
    auto cols = store_->db().prepare("SELECT COUNT(*) FROM pragma_table_info('" + table + "')");
    REQUIRE(cols);
    REQUIRE(cols->step());
    const int n = static_cast<int>(cols->col_int(0));
    REQUIRE(st->each([&](const flotilla::sql::Stmt& s) {
      std::string row;
      for (int i = 0; i < n; ++i) row += s.col_blob(i) + "\x1f";
      out.push_back(row);
    }));
    return out;
  }

  FakeClock clock;
  std::string root;

 private:
  TempDir dir_;
  std::unique_ptr<Store> store_;
  RecordingTransport transport_;
  std::unique_ptr<HubService> service_;
  std::unique_ptr<Api> api_;
  std::vector<bundles::KeyPair> keys_;
};

}  // namespace

// ---- durability ---------------------------------------------------------------

TEST_CASE("hub store commits control writes with synchronous=FULL, relaxing it only for report batches",
          "[unit][hub][security]") {
  Hub h;
  // 2 = FULL: a decommission, a revocation or a new token is on disk when the
  // API answers. SQLite's NORMAL (1) in WAL mode may lose them to a power cut.
  auto sync = h.store().synchronous();
  REQUIRE(sync);
  CHECK(*sync == 2);
  const std::string dev = h.enroll_device("default");
  v1::Report r;
  r.set_device_id(dev);
  r.set_seq(1);
  r.set_state(v1::AGENT_STATE_IDLE);
  h.deliver(transport::device_topic(dev, "report"), r.SerializeAsString());
  CHECK(h.service().reports_processed() == 1);
  // After the report batch, back to FULL for whatever comes next.
  sync = h.store().synchronous();
  REQUIRE(sync);
  CHECK(*sync == 2);
  CHECK(h.call("DELETE", "/v1/devices/" + dev).status == 200);
  sync = h.store().synchronous();
  REQUIRE(sync);
  CHECK(*sync == 2);
}

// ---- rate limits ----------------------------------------------------------------

TEST_CASE("token buckets admit a burst, then the rate, per key and for all keys, by the injected clock",
          "[unit][hub][security]") {
  FakeClock clock;
  hub::KeyedLimiter l(clock, /*rate per key*/ 1, /*burst*/ 2, /*rate all*/ 3, /*burst all*/ 4, /*max keys*/ 3);
  CHECK(l.admit("a"));
  CHECK(l.admit("a"));
  int64_t retry = 0;
  CHECK_FALSE(l.admit("a", &retry));
  CHECK(retry == 1000);
  CHECK(l.admit_all());
  CHECK(l.admit_all());
  CHECK(l.admit_all());
  CHECK(l.admit_all());
  CHECK_FALSE(l.admit_all(&retry));
  CHECK(retry == 334);
  clock.advance(std::chrono::milliseconds(1000));
  CHECK(l.admit("a"));
  CHECK_FALSE(l.admit("a"));
  // A clock that goes back hands out nothing.
  clock.advance(std::chrono::milliseconds(-5000));
  CHECK_FALSE(l.admit("a"));
  // The key table is bounded.
  for (int i = 0; i < 100; ++i) (void)l.admit("k" + std::to_string(i));
  CHECK(l.keys() <= 3);

  hub::LogLimiter logs(clock, /*lines per s*/ 0.5, /*burst*/ 2);
  CHECK(logs.admit("dev") == std::optional<uint64_t>(0));
  CHECK(logs.admit("dev") == std::optional<uint64_t>(0));
  for (int i = 0; i < 10; ++i) CHECK_FALSE(logs.admit("dev"));
  CHECK(logs.admit("other") == std::optional<uint64_t>(0));
  clock.advance(std::chrono::seconds(2));
  CHECK(logs.admit("dev") == std::optional<uint64_t>(10));
  CHECK(logs.suppressed_total() == 10);
}

// ---- tenancy --------------------------------------------------------------------

namespace {

// The desired state a device was last sent, decoded.
v1::BundleManifest manifest_of(const v1::DesiredState& ds) {
  v1::BundleManifest m;
  REQUIRE(m.ParseFromString(ds.bundle().manifest()));
  return m;
}

std::string content_of(const v1::DesiredState& ds) {
  const auto m = manifest_of(ds);
  REQUIRE(m.files_size() == 1);
  return m.files(0).content();
}

v1::Report report(const std::string& device, uint64_t seq, v1::AgentState state, uint64_t generation,
                  const std::string& campaign, const std::string& bundle, uint64_t version) {
  v1::Report r;
  r.set_device_id(device);
  r.set_seq(seq);
  r.set_state(state);
  r.set_generation(generation);
  r.set_campaign_id(campaign);
  if (!bundle.empty()) {
    r.mutable_applied()->set_name(bundle);
    r.mutable_applied()->set_channel("stable");
    r.mutable_applied()->set_version(version);
  }
  return r;
}

}  // namespace

TEST_CASE("only an admin of every project may replace the hub-wide trust", "[unit][hub][security]") {
  Hub h;
  const auto root_key = bundles::generate_key();
  // A well-formed trust message (its signatures are the devices' to judge).
  v1::KeyringManifest k;
  k.set_type("flotilla-root-keyring");
  k.set_version(1);
  k.set_expires_unix(h.clock.now_unix() + 86400);
  k.set_threshold(1);
  auto* key = k.add_keys();
  key->set_key_id(root_key.pub.key_id);
  key->set_public_key(bytes_string(root_key.pub.key));
  v1::Trust t;
  v1::SignedKeyring* root = t.add_roots();
  root->set_keyring(k.SerializeAsString());
  REQUIRE(h.call("PUT", "/v1/trust", t.SerializeAsString()).status == 200);
  const auto before = h.rows("trust");

  // A project's admin, operator and viewer: refused, and the trust is unchanged.
  v1::KeyringManifest other = k;
  other.set_version(2);
  v1::Trust t2;
  t2.add_roots()->set_keyring(other.SerializeAsString());
  for (const char* role : {"admin", "operator", "viewer"}) {
    INFO(role);
    auto r = h.call("PUT", "/v1/trust", t2.SerializeAsString(), h.token(role, "team-a"));
    CHECK(r.status == 403);
    CHECK(error_code(r) == "permission_denied");
    CHECK(h.rows("trust") == before);
  }
  // Reading it is every project's right: it holds public keys only.
  CHECK(h.call("GET", "/v1/trust", "", h.token("viewer", "team-a")).status == 200);
}

TEST_CASE("bundles are scoped: another project can neither merge signatures into nor shadow yours",
          "[unit][hub][security]") {
  Hub h;
  const auto signer_a = bundles::generate_key(), signer_b = bundles::generate_key();
  const std::string op_a = h.token("operator", "team-a"), op_b = h.token("operator", "team-b");
  const auto env_a = h.bundle("web", 1, "team-a config", {&signer_a});
  auto up_a = h.upload(env_a, op_a);
  REQUIRE(up_a.status == 201);
  const std::string id_a = body_of(up_a)["id"].get<std::string>();
  const auto bundles_before = h.rows("bundles");

  // The same manifest signed by someone else, uploaded by team B: a bundle
  // of B's own. A's stored envelope keeps exactly its signature.
  v1::SignedBundle same = env_a;
  same.clear_signatures();
  REQUIRE(bundles::sign(same, signer_b));
  auto up_b = h.upload(same, op_b);
  REQUIRE(up_b.status == 201);
  const std::string id_b = body_of(up_b)["id"].get<std::string>();
  CHECK(id_b != id_a);
  auto stored_a = h.store().get_bundle(id_a, true);
  REQUIRE(stored_a);
  REQUIRE(*stored_a);
  CHECK((*stored_a)->signatures == 1);
  CHECK((*stored_a)->envelope == bundles::serialize_envelope(env_a));
  CHECK(h.rows("bundles").size() == bundles_before.size() + 1);
  // B cannot see A's bundle by id, nor learn it exists.
  CHECK(h.call("GET", "/v1/bundles/" + id_a, "", op_b).status == 404);
  CHECK(h.get("/v1/bundles", op_b)["items"].size() == 1);

  // B uploads its own web:1 later (other files): A's name:version still
  // means A's bundle, for lookups and for campaigns.
  REQUIRE(h.upload(h.bundle("web", 1, "team-b secret", {&signer_b}), op_b).status == 201);
  h.clock.advance(std::chrono::seconds(1));
  CHECK(h.get("/v1/bundles/web:1", op_a)["id"] == id_a);
  // A caller of every project must say which one it means.
  auto ambiguous = h.call("GET", "/v1/bundles/web:1");
  CHECK(ambiguous.status == 409);
  CHECK(error_code(ambiguous) == "conflict");
  auto no_campaign = h.call("POST", "/v1/campaigns", json{{"bundle", "web:1"}, {"selector", ""}}.dump());
  CHECK(no_campaign.status == 409);
  CHECK(h.get("/v1/campaigns")["items"].empty());

  // A's campaign by name:version sends A's files to A's devices only.
  const std::string dev_a = h.enroll_device("team-a"), dev_b = h.enroll_device("team-b");
  auto c = h.call("POST", "/v1/campaigns", json{{"bundle", "web:1"}, {"selector", ""}}.dump(), op_a);
  INFO(c.body);
  REQUIRE(c.status == 201);
  CHECK(body_of(c)["bundle"]["id"] == id_a);
  h.service().tick();
  const auto sent = h.desired_for(dev_a);
  REQUIRE(sent.size() == 1);
  CHECK(content_of(sent[0]) == "team-a config");
  CHECK(h.desired_for(dev_b).empty());
}

TEST_CASE("a campaign of every project's admin targets only its bundle's project", "[unit][hub][security]") {
  Hub h;
  const auto signer = bundles::generate_key();
  const std::string dev_a = h.enroll_device("team-a", {{"tier", "prod"}});
  const std::string dev_b = h.enroll_device("team-b", {{"tier", "prod"}});
  auto up = h.upload(h.bundle("web", 1, "team-a config", {&signer}), std::nullopt, "?project=team-a");
  REQUIRE(up.status == 201);
  CHECK(body_of(up)["id"] != bundles::manifest_digest_hex(h.bundle("web", 1, "team-a config", {})).substr(0, 16));
  // A project's token cannot upload into another project.
  CHECK(h.upload(h.bundle("web", 2, "x", {&signer}), h.token("operator", "team-b"), "?project=team-a").status == 403);
  auto c = h.call("POST", "/v1/campaigns",
                  json{{"bundle", body_of(up)["id"]}, {"selector", "tier=prod"}}.dump());
  INFO(c.body);
  REQUIRE(c.status == 201);
  const json campaign = body_of(c);
  CHECK(campaign["project"] == "team-a");
  CHECK(campaign["counts"]["total"] == 1);
  h.service().tick();
  CHECK(h.desired_for(dev_a).size() == 1);
  CHECK(h.desired_for(dev_b).empty());
  // And team B never sees it.
  CHECK(h.get("/v1/campaigns", h.token("viewer", "team-b"))["items"].empty());
}

TEST_CASE("a rollback returns a device to its own project's previous bundle, never another's",
          "[unit][hub][security]") {
  Hub h;
  const auto signer = bundles::generate_key();
  const std::string op_a = h.token("operator", "team-a"), op_b = h.token("operator", "team-b");
  const std::string dev = h.enroll_device("team-a");
  REQUIRE(h.upload(h.bundle("web", 1, "team-a v1", {&signer}), op_a).status == 201);
  const std::string v2 = body_of(h.upload(h.bundle("web", 2, "team-a v2", {&signer}), op_a))["id"].get<std::string>();
  // The device runs A's web v1. Later, team B uploads a "web" version 1 of its own.
  h.deliver(transport::device_topic(dev, "report"),
            report(dev, 1, v1::AGENT_STATE_IDLE, 0, "", "web", 1).SerializeAsString());
  h.clock.advance(std::chrono::seconds(1));
  REQUIRE(h.upload(h.bundle("web", 1, "team-b secret", {&signer}), op_b).status == 201);

  auto c = h.call("POST", "/v1/campaigns", json{{"bundle", v2}, {"selector", ""}}.dump(), op_a);
  REQUIRE(c.status == 201);
  const std::string id = body_of(c)["id"].get<std::string>();
  h.service().tick();
  REQUIRE(h.desired_for(dev).size() == 1);
  CHECK(h.call("POST", "/v1/campaigns/" + id + "/rollback", "", op_a).status == 200);
  const auto sent = h.desired_for(dev);
  REQUIRE(sent.size() == 2);
  CHECK(sent[1].rollback());
  CHECK(content_of(sent[1]) == "team-a v1");
}

TEST_CASE("enrollment stays in one project: no other project's gateway, no moving a device",
          "[unit][hub][security]") {
  Hub h;
  // Gateway G of team A; a device of team B tries to enroll behind it.
  const json tok_a = h.enrollment_token({{"project", "team-a"}, {"max_uses", 5}});
  const json tok_b = h.enrollment_token({{"project", "team-b"}, {"max_uses", 5}});
  const auto gw_key = bundles::generate_key();
  auto gw = h.post_enroll(h.enroll_request(tok_a["token"], gw_key));
  REQUIRE(gw.status == 200);
  v1::EnrollResponse gw_resp;
  REQUIRE(gw_resp.ParseFromString(gw.body));
  const auto devices_before = h.rows("devices");
  const auto tokens_before = h.rows("tokens");

  const auto dev_key = bundles::generate_key();
  auto req = h.enroll_request(tok_b["token"], dev_key);
  req.set_gateway_id(gw_resp.device_id());
  req.set_gateway_proof(bytes_string(
      bundles::sign_detached(gw_key, bundles::enroll_proof_message(tok_b["token"], dev_key.pub.key))));
  auto behind = h.post_enroll(req);
  CHECK(behind.status == 403);
  CHECK(error_code(behind) == "permission_denied");

  // Team A's device enrolling again with team B's token: refused, it stays A's.
  h.clock.advance(std::chrono::seconds(1));
  auto moved = h.post_enroll(h.enroll_request(tok_b["token"], gw_key));
  CHECK(moved.status == 409);
  CHECK(h.rows("devices") == devices_before);
  CHECK(h.rows("tokens") == tokens_before);
}

// ---- stale bundle cache ----------------------------------------------------------------

TEST_CASE("signatures added to a bundle after its first use reach the devices", "[unit][hub][security]") {
  Hub h;
  const auto first = bundles::generate_key(), second = bundles::generate_key();
  const std::string dev1 = h.enroll_device("default", {{"ring", "1"}});
  const std::string dev2 = h.enroll_device("default", {{"ring", "2"}});
  const auto env = h.bundle("web", 1, "config", {&first});
  auto up = h.upload(env);
  REQUIRE(up.status == 201);
  const std::string id = body_of(up)["id"].get<std::string>();
  REQUIRE(h.call("POST", "/v1/campaigns", json{{"bundle", id}, {"selector", "ring=1"}}.dump()).status == 201);
  h.service().tick();
  REQUIRE(h.desired_for(dev1).size() == 1);
  CHECK(h.desired_for(dev1)[0].bundle().signatures_size() == 1);

  // The second signer's signature, uploaded as the multi-signer workflow says.
  v1::SignedBundle more = env;
  more.clear_signatures();
  REQUIRE(bundles::sign(more, second));
  auto again = h.upload(more);
  REQUIRE(again.status == 200);
  CHECK(body_of(again)["signatures"] == 2);
  REQUIRE(h.call("POST", "/v1/campaigns", json{{"bundle", id}, {"selector", "ring=2"}}.dump()).status == 201);
  h.service().tick();
  const auto sent = h.desired_for(dev2);
  REQUIRE(sent.size() == 1);
  CHECK(sent[0].bundle().signatures_size() == 2);
}

// ---- enrollment -----------------------------------------------------------------

TEST_CASE("enrollment tokens are bounded by default: one use, an expiry, labels only from the token",
          "[unit][hub][security]") {
  Hub h;
  const json t = h.enrollment_token({{"labels", {{"site", "berlin"}}}});
  CHECK(t["max_uses"] == 1);
  CHECK(t["unlimited_uses"] == false);
  CHECK(t["device_label_keys"] == json::array());
  CHECK_FALSE(t["expires_at"].get<std::string>().empty());
  const auto tokens_before = h.rows("tokens");

  // Unbounded or malformed asks are refused and store nothing.
  for (const json& bad : {json{{"max_uses", 0}}, json{{"max_uses", -1}}, json{{"ttl", "400d"}},
                          json{{"unlimited_uses", true}, {"max_uses", 5}}, json{{"unlimited_uses", "yes"}},
                          json{{"device_label_keys", {"bad key!"}}}, json{{"device_label_keys", "tier"}},
                          json{{"labels", {{"tier", "prod"}}}, {"device_label_keys", {"tier"}}}}) {
    INFO(bad.dump());
    auto r = h.call("POST", "/v1/enrollment-tokens", bad.dump());
    CHECK(r.status == 400);
    CHECK(h.rows("tokens") == tokens_before);
  }
  // No use limit only when asked for.
  CHECK(h.enrollment_token({{"unlimited_uses", true}})["max_uses"] == 0);

  // The one use: a second device is refused, nothing stored.
  REQUIRE(h.post_enroll(h.enroll_request(t["token"], bundles::generate_key())).status == 200);
  const auto devices_before = h.rows("devices");
  auto second = h.post_enroll(h.enroll_request(t["token"], bundles::generate_key()));
  CHECK(second.status == 403);
  CHECK(h.rows("devices") == devices_before);
}

TEST_CASE("a device cannot choose labels its token does not allow", "[unit][hub][security]") {
  Hub h;
  // A leaked token of the shop fleet: the attacker's device asks for tier=prod.
  const json t = h.enrollment_token({{"labels", {{"fleet", "shops"}}}, {"device_label_keys", {"shelf"}}, {"max_uses", 5}});
  const auto devices_before = h.rows("devices");
  const auto tokens_before = h.rows("tokens");
  for (const Labels& bad : {Labels{{"tier", "prod"}}, Labels{{"fleet", "factory"}}, Labels{{"shelf", "1"}, {"tier", "prod"}}}) {
    auto r = h.post_enroll(h.enroll_request(t["token"], bundles::generate_key(), bad));
    CHECK(r.status == 403);
    CHECK(error_code(r) == "permission_denied");
  }
  CHECK(h.rows("devices") == devices_before);
  CHECK(h.rows("tokens") == tokens_before);  // no use spent

  // What the token allows: its own labels (repeated) and the keys it lists.
  auto ok = h.post_enroll(h.enroll_request(t["token"], bundles::generate_key(), {{"fleet", "shops"}, {"shelf", "7"}}));
  REQUIRE(ok.status == 200);
  v1::EnrollResponse resp;
  REQUIRE(resp.ParseFromString(ok.body));
  CHECK(h.get("/v1/devices/" + resp.device_id())["labels"] == json{{"fleet", "shops"}, {"shelf", "7"}});
}

TEST_CASE("enrollment is rate limited overall and per token, and a refused request changes nothing",
          "[unit][hub][security]") {
  hub::ApiLimits limits;
  limits.enroll_per_s = 4;  // every request counts here, also one a token's limit refuses
  limits.enroll_per_token_per_s = 2;
  Hub h(limits);
  const std::string t1 = h.enrollment_token({{"unlimited_uses", true}})["token"];
  const std::string t2 = h.enrollment_token({{"unlimited_uses", true}})["token"];
  const size_t audit_before = h.rows("audit_log").size();
  CHECK(h.post_enroll(h.enroll_request(t1, bundles::generate_key())).status == 200);
  CHECK(h.post_enroll(h.enroll_request(t1, bundles::generate_key())).status == 200);
  const auto devices_before = h.rows("devices");
  const auto tokens_before = h.rows("tokens");
  // Token 1 has had its share for this second.
  auto per_token = h.post_enroll(h.enroll_request(t1, bundles::generate_key()));
  CHECK(per_token.status == 429);
  CHECK(error_code(per_token) == "rate_limited");
  CHECK(per_token.headers.at("Retry-After") == "1");
  // Token 2 may, until the hub's overall share is spent.
  CHECK(h.post_enroll(h.enroll_request(t2, bundles::generate_key())).status == 200);
  const auto devices_mid = h.rows("devices");
  const auto tokens_mid = h.rows("tokens");
  auto overall = h.post_enroll(h.enroll_request(t2, bundles::generate_key()));
  CHECK(overall.status == 429);
  CHECK(h.rows("devices") == devices_mid);
  CHECK(h.rows("tokens") == tokens_mid);
  CHECK(devices_mid.size() == devices_before.size() + 1);
  CHECK(tokens_mid != tokens_before);  // only token 2's one use
  // Refusals are counted, not audited: a flood cannot grow the audit log.
  CHECK(h.rows("audit_log").size() == audit_before + 3);
  const auto metrics = h.call("GET", "/metrics").body;
  CHECK(metrics.find("flotilla_rate_limited_total{limit=\"enroll_token\"} 1") != std::string::npos);
  CHECK(metrics.find("flotilla_rate_limited_total{limit=\"enroll\"} 1") != std::string::npos);
  // A second later there is room again.
  h.clock.advance(std::chrono::seconds(1));
  CHECK(h.post_enroll(h.enroll_request(t1, bundles::generate_key())).status == 200);
}

TEST_CASE("a replayed enrollment request cannot reset an enrolled device's credentials", "[unit][hub][security]") {
  Hub h;
  const std::string tok = h.enrollment_token({{"max_uses", 10}})["token"];
  const auto key = bundles::generate_key();
  const v1::EnrollRequest captured = h.enroll_request(tok, key);
  auto first = h.post_enroll(captured);
  REQUIRE(first.status == 200);
  v1::EnrollResponse resp;
  REQUIRE(resp.ParseFromString(first.body));
  const auto creds_before = h.rows("broker_credentials");
  const auto devices_before = h.rows("devices");
  const auto tokens_before = h.rows("tokens");

  h.clock.advance(std::chrono::minutes(5));
  // The same bytes again; an older request; the older proof without a time.
  v1::EnrollRequest legacy;
  legacy.set_enrollment_token(tok);
  legacy.set_device_public_key(bytes_string(key.pub.key));
  legacy.set_proof(bytes_string(bundles::sign_detached(key, bundles::enroll_proof_message(tok, key.pub.key))));
  for (const v1::EnrollRequest* replay : {&captured, static_cast<const v1::EnrollRequest*>(&legacy)}) {
    auto r = h.post_enroll(*replay);
    INFO(r.body);
    CHECK(r.status == 409);
    CHECK(error_code(r) == "conflict");
  }
  auto older = h.post_enroll(h.enroll_request(tok, key, {}, captured.issued_unix_ms() - 1));
  CHECK(older.status == 409);
  CHECK(h.rows("broker_credentials") == creds_before);  // the real device's password still works
  CHECK(h.rows("devices") == devices_before);
  CHECK(h.rows("tokens") == tokens_before);

  // The device itself, asking afresh (it lost its credentials), is taken.
  auto fresh = h.post_enroll(h.enroll_request(tok, key));
  REQUIRE(fresh.status == 200);
  v1::EnrollResponse again;
  REQUIRE(again.ParseFromString(fresh.body));
  CHECK(again.device_id() == resp.device_id());
  CHECK(again.mqtt_password() != resp.mqtt_password());
}

// ---- bounded input ----------------------------------------------------------------

TEST_CASE("the API authenticates a request on its headers and names each route's body limit",
          "[unit][hub][security]") {
  Hub h;
  auto headers = [](const std::string& method, const std::string& target, const std::string& token,
                    const std::string& length = "100") {
    auto req = flotilla::test::api_request(method, target, "", token);
    req.peer = "192.0.2.1";
    req.headers["content-length"] = length;
    return req;
  };
  const size_t audit_before = h.rows("audit_log").size();
  // No token: refused before a body byte is read, and audited once.
  auto a = h.api().admit(headers("POST", "/v1/bundles", "", "8000000"));
  REQUIRE(a.refusal);
  CHECK(a.refusal->status == 401);
  a = h.api().admit(headers("PUT", "/v1/trust", "flt_api_not-a-token", "4000000"));
  REQUIRE(a.refusal);
  CHECK(a.refusal->status == 401);
  // A caller who may, announcing more than the route takes: 413 on the headers.
  a = h.api().admit(headers("POST", "/v1/tokens", h.root, "2000000"));
  REQUIRE(a.refusal);
  CHECK(a.refusal->status == 413);
  a = h.api().admit(headers("POST", "/v1/enroll", "", "100000"));
  REQUIRE(a.refusal);
  CHECK(a.refusal->status == 413);
  CHECK(h.rows("audit_log").size() == audit_before + 4);
  // A viewer cannot upload: 403 on the headers too.
  a = h.api().admit(headers("POST", "/v1/bundles", h.token("viewer", "*")));
  REQUIRE(a.refusal);
  CHECK(a.refusal->status == 403);
  // Allowed: the route's own limit, not the server's hard cap.
  a = h.api().admit(headers("POST", "/v1/bundles", h.root));
  CHECK_FALSE(a.refusal);
  CHECK(a.max_body == bundles::kMaxEnvelopeBytes);
  a = h.api().admit(headers("POST", "/v1/tokens", h.root));
  CHECK(a.max_body == hub::kMaxJsonBody);
  a = h.api().admit(headers("GET", "/v1/devices", h.root));
  CHECK(a.max_body == hub::kMaxNoBody);
  // Enrollment carries its credential in the body: no token needed, small limits.
  a = h.api().admit(headers("POST", "/v1/enroll", ""));
  CHECK_FALSE(a.refusal);
  CHECK(a.max_body == hub::kMaxEnrollBody);
  a = h.api().admit(headers("POST", "/v1/enroll/batch", ""));
  CHECK(a.max_body == hub::kMaxEnrollBatchBody);
  a = h.api().admit(headers("GET", "/healthz", ""));
  CHECK(a.max_body == hub::kMaxNoBody);
}

TEST_CASE("device messages larger than any legitimate one are dropped before they are queued",
          "[unit][hub][security]") {
  Hub h;
  const std::string dev = h.enroll_device("default");
  const auto devices_before = h.rows("devices");
  // A report carrying 300 KiB (its error message, say), a fat presence, and
  // an oversized gateway batch: none is queued, parsed or stored.
  v1::Report r = report(dev, 1, v1::AGENT_STATE_FAILED, 0, "", "", 0);
  r.mutable_error()->set_message(std::string(300 << 10, 'x'));
  h.deliver(transport::device_topic(dev, "report"), r.SerializeAsString());
  v1::Presence p;
  p.set_online(true);
  p.set_agent_version(std::string(8 << 10, 'v'));
  h.deliver(transport::device_topic(dev, "presence"), p.SerializeAsString());
  h.deliver(transport::gateway_reports_topic(dev), std::string((1u << 20) + 1, '\0'));
  CHECK(h.service().queue_depth() == 0);
  CHECK(h.service().reports_processed() == 0);
  CHECK(h.service().mqtt_counters().dropped_too_large == 3);
  CHECK(h.rows("devices") == devices_before);
  // A report of a legitimate size still goes through.
  h.deliver(transport::device_topic(dev, "report"), report(dev, 2, v1::AGENT_STATE_IDLE, 0, "", "", 0).SerializeAsString());
  CHECK(h.service().reports_processed() == 1);
}

TEST_CASE("one message naming a thousand devices does not write a thousand log lines", "[unit][hub][security]") {
  std::ostringstream captured;
  auto sink = std::make_shared<spdlog::sinks::ostream_sink_mt>(captured);
  // The hub's log goes only to this sink, at warn, for this test (before any
  // thread of the hub exists).
  auto logger = flotilla::log::get("hub");
  struct Restore {
    std::shared_ptr<spdlog::logger> l;
    std::vector<spdlog::sink_ptr> sinks;
    spdlog::level::level_enum level;
    ~Restore() {
      l->sinks() = sinks;
      l->set_level(level);
    }
  } restore{logger, logger->sinks(), logger->level()};
  logger->sinks() = {sink};
  logger->set_level(spdlog::level::warn);
  {
    Hub h;
    const std::string gw = h.enroll_device("default");
    // A gateway's batch of 1,000 small reports for devices that are not behind it.
    v1::GatewayReports batch;
    for (int i = 0; i < 1000; ++i) {
      *batch.add_reports() = report("d-" + std::to_string(10000000 + i), 1, v1::AGENT_STATE_IDLE, 0, "", "", 0);
    }
    const std::string payload = batch.SerializeAsString();
    REQUIRE(payload.size() < 64 * 1024);
    h.deliver(transport::gateway_reports_topic(gw), payload);
    CHECK(h.service().reports_processed() == 0);
    CHECK(h.service().mqtt_counters().log_lines_suppressed >= 990);
    CHECK(h.call("GET", "/metrics").body.find("flotilla_log_lines_suppressed_total") != std::string::npos);
  }
  size_t lines = 0;
  const std::string out = captured.str();
  for (size_t at = out.find("report from unknown device"); at != std::string::npos;
       at = out.find("report from unknown device", at + 1)) {
    ++lines;
  }
  CHECK(lines >= 1);
  CHECK(lines <= 10);
}

TEST_CASE("a store from before bundles were scoped is migrated and keeps its bundles and campaigns",
          "[unit][hub][security]") {
  TempDir dir;
  const std::string path = (dir.path() / "hub.db").string();
  {
    auto s = Store::open(path);
    REQUIRE(s);
    auto& db = (*s)->db();
    // The old table: one row per manifest for the whole hub.
    REQUIRE(db.exec("PRAGMA foreign_keys = OFF; DROP TABLE bundles; CREATE TABLE bundles ("
                    "id TEXT PRIMARY KEY, digest TEXT NOT NULL UNIQUE, name TEXT NOT NULL, channel TEXT NOT NULL, "
                    "version INTEGER NOT NULL, expires_unix INTEGER NOT NULL, signatures INTEGER NOT NULL, "
                    "uploaded_ms INTEGER NOT NULL, envelope BLOB NOT NULL, project TEXT NOT NULL DEFAULT 'default');"
                    "PRAGMA foreign_keys = ON;"));
    REQUIRE(db.exec("INSERT INTO bundles VALUES ('0123456789abcdef', 'digest-1', 'web', 'stable', 1, 0, 1, 1, x'00', "
                    "'team-a');"
                    "INSERT INTO campaigns (id, name, bundle_id, selector, state, created_ms, updated_ms, project) "
                    "VALUES ('c-1', 'c', '0123456789abcdef', '', 'completed', 1, 1, 'team-a');"));
  }
  auto s = Store::open(path);
  REQUIRE(s);
  auto& db = (*s)->db();
  auto ddl = db.prepare("SELECT sql FROM sqlite_master WHERE name = 'bundles'");
  REQUIRE(ddl);
  REQUIRE(ddl->step());
  CHECK(ddl->col_text(0).find("digest TEXT NOT NULL UNIQUE") == std::string::npos);
  auto b = (*s)->get_bundle("0123456789abcdef", false, "team-a");
  REQUIRE(b);
  REQUIRE(*b);
  CHECK((*b)->name == "web");
  auto c = (*s)->get_campaign("c-1");
  REQUIRE(c);
  REQUIRE(*c);
  CHECK((*c)->bundle_id == "0123456789abcdef");
  // The same manifest may now be stored by another project, and the
  // campaign's foreign key still holds.
  hub::BundleRecord other = **b;
  other.id = hub::bundle_id("team-b", "digest-1");
  other.project = "team-b";
  CHECK((*s)->insert_bundle(other));
  auto check = db.prepare("PRAGMA foreign_key_check");
  REQUIRE(check);
  auto bad = check->step();
  REQUIRE(bad);
  CHECK_FALSE(*bad);
  CHECK_FALSE(db.exec("INSERT INTO campaigns (id, name, bundle_id, selector, state, created_ms, updated_ms) "
                      "VALUES ('c-2', 'c', 'no-such-bundle', '', 'running', 1, 1)"));
}

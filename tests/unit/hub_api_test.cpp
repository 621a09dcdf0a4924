// The hub's REST handler over a real HubService and a real SQLite store in a
// temporary directory, with no broker attached.
#include <catch2/catch.hpp>

#include "tests/support/hub_fixtures.hpp"
#include "tests/support/hub_test_support.hpp"
#include "tests/support/temp_dir.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <set>
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
#include "flotilla/v1/desired.pb.h"
#include "flotilla/v1/enroll.pb.h"
#include "flotilla/v1/report.pb.h"

namespace {

namespace bundles = flotilla::bundles;

// Keys made by the tests, by public key, so enroll() can sign its proof of
// possession like a real agent does.
std::map<std::string, bundles::KeyPair>& key_registry() {
  static std::map<std::string, bundles::KeyPair> keys;
  return keys;
}
bundles::KeyPair registered_key() {
  auto k = bundles::generate_key();
  key_registry()[std::string(k.pub.key.begin(), k.pub.key.end())] = k;
  return k;
}
std::string enroll_proof(const std::string& token, const std::string& public_key) {
  auto it = key_registry().find(public_key);
  if (it == key_registry().end()) return {};
  auto sig = bundles::sign_detached(it->second, bundles::enroll_proof_message(token, it->second.pub.key));
  return std::string(sig.begin(), sig.end());
}
using flotilla::test::next_issued_ms;
void sign_enroll_request(flotilla::v1::EnrollRequest& req) {
  auto it = key_registry().find(req.device_public_key());
  if (it == key_registry().end()) return;
  req.set_issued_unix_ms(next_issued_ms());
  auto sig = bundles::sign_detached(
      it->second, bundles::enroll_proof_message(req.enrollment_token(), it->second.pub.key, req.issued_unix_ms()));
  req.set_proof(std::string(sig.begin(), sig.end()));
}

using flotilla::FakeClock;
using flotilla::hub::Api;
using flotilla::hub::HttpRequest;
using flotilla::hub::HttpResponse;
using flotilla::hub::HubService;
using flotilla::hub::Labels;
using flotilla::hub::ServiceConfig;
using flotilla::hub::Store;
using flotilla::hub::TokenRecord;
using nlohmann::json;
namespace bundles = flotilla::bundles;
namespace v1 = flotilla::v1;

using flotilla::test::body_of;
using flotilla::test::error_code;
using flotilla::test::RecordingTransport;
using flotilla::test::TempDir;

std::string error_message(const HttpResponse& r) {
  const json j = body_of(r);
  REQUIRE(j.contains("error"));
  return j["error"]["message"].get<std::string>();
}

bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

using flotilla::test::bytes_string;

const std::string kGarbage = "\xff\xff\xff\xff not a protobuf message";

// A hub with no broker unless a test attaches one: publishing desired state
// then only logs a warning.
class Hub {
 public:
  Hub() {
    auto s = Store::open((dir_.path() / "hub.db").string());
    REQUIRE(s);
    store_ = std::move(*s);
    ServiceConfig cfg;
    cfg.broker_url = "tcp://127.0.0.1:1883";
    cfg.public_url = "http://hub.test:8080";
    // The fixture ticks the engine itself (create_campaign, report): an
    // engine thread would publish concurrently and race the assertions.
    cfg.engine_thread = false;
    service_ = std::make_unique<HubService>(*store_, clock, cfg);
    api_ = std::make_unique<Api>(*service_);
    admin = flotilla::test::make_token(*service_, "api", "test-admin", "admin", "default").secret;
  }

  RecordingTransport& attach_broker() {
    transport_ = std::make_unique<RecordingTransport>();
    REQUIRE(service_->attach_transport(*transport_));
    return *transport_;
  }

  HubService& service() { return *service_; }
  Api& api() { return *api_; }
  Store& store() { return *store_; }

  HttpResponse call(const std::string& method, const std::string& target, const std::string& body = "",
                    std::optional<std::string> authorization = std::nullopt) {
    HttpRequest req;
    req.method = method;
    req.target = target;
    req.body = body;
    req.peer = "127.0.0.1";
    req.headers["authorization"] = authorization ? *authorization : "Bearer " + admin;
    if (authorization && authorization->empty()) req.headers.erase("authorization");
    return api_->handle(req);
  }
  HttpResponse anonymous(const std::string& method, const std::string& target, const std::string& body = "") {
    return call(method, target, body, std::string());
  }
  json get(const std::string& target) {
    auto r = call("GET", target);
    INFO(r.body);
    REQUIRE(r.status == 200);
    return body_of(r);
  }

  // Devices may set the label keys these tests use, except those the token sets.
  std::string enrollment_token(const Labels& labels = {}, int64_t max_uses = 0) {
    TokenRecord rec;
    rec.name = "enroll-test";
    rec.role = "enroll";
    rec.labels = labels;
    rec.max_uses = max_uses;
    for (const char* k : {"site", "env", "ring"}) {
      if (!labels.count(k)) rec.device_label_keys.push_back(k);
    }
    auto t = service_->create_token("enroll", rec);
    REQUIRE(t);
    return t->secret;
  }

  HttpResponse enroll(const std::string& token, const std::string& public_key, const Labels& labels = {},
                      const std::string& hostname = "edge-host") {
    v1::EnrollRequest req;
    req.set_enrollment_token(token);
    req.set_device_public_key(public_key);
    sign_enroll_request(req);
    req.set_hostname(hostname);
    req.set_arch("arm64");
    req.set_agent_version("0.1.0");
    for (const auto& [k, v] : labels) (*req.mutable_labels())[k] = v;
    return anonymous("POST", "/v1/enroll", req.SerializeAsString());
  }

  // Enrolls a new device through the service (no broker needed) and returns its id.
  std::string enroll_device(const Labels& labels) {
    v1::EnrollRequest req;
    req.set_enrollment_token(enrollment_token());
    req.set_device_public_key(bytes_string(registered_key().pub.key));
    sign_enroll_request(req);
    req.set_hostname("edge-host");
    req.set_arch("arm64");
    for (const auto& [k, v] : labels) (*req.mutable_labels())[k] = v;
    auto resp = service_->enroll(req);
    REQUIRE(resp);
    return resp->device_id();
  }

  v1::SignedBundle bundle(uint64_t version = 1) {
    return flotilla::test::signed_bundle(clock.now_unix(), "edge-base", version, "kind: ConfigMap\n", {&signing_key_});
  }

  std::string upload_bundle() {
    auto r = call("POST", "/v1/bundles", bundles::serialize_envelope(bundle()));
    INFO(r.body);
    REQUIRE(r.status == 201);
    return body_of(r)["id"].get<std::string>();
  }

  // Creates a campaign and lets the engine release its (single) wave.
  json create_campaign(const std::string& bundle_id, const std::string& selector) {
    auto r = call("POST", "/v1/campaigns", json{{"bundle", bundle_id}, {"selector", selector}}.dump());
    INFO(r.body);
    REQUIRE(r.status == 201);
    service_->tick();
    return get("/v1/campaigns/" + body_of(r)["id"].get<std::string>());
  }

  size_t campaign_count() { return get("/v1/campaigns")["items"].size(); }
  size_t device_count() { return get("/v1/devices")["items"].size(); }

  // Queues one message as the broker would deliver it.
  void deliver(const std::string& device_id, const std::string& payload) {
    flotilla::transport::Message m;
    m.topic = flotilla::transport::device_topic(device_id, "report");
    m.payload = payload;
    service_->on_message(std::move(m));
  }

  // The service's own worker drains the queue too, so drain() returning does
  // not mean a batch the worker took is done: wait (with a deadline) until the
  // service has counted the reports it should have taken.
  void settle(uint64_t processed) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (service_->reports_processed() < processed) {
      if (std::chrono::steady_clock::now() >= deadline) FAIL("the hub did not process the reports within 10 s");
      std::this_thread::yield();
    }
  }

  // Delivers a report that must be taken, and waits until it has been.
  void report(const std::string& device_id, const std::string& payload) {
    const uint64_t before = service_->reports_processed();
    deliver(device_id, payload);
    service_->drain();
    settle(before + 1);
    service_->tick();  // the engine judges waves and completion
  }

  FakeClock clock;
  std::string admin;

 private:
  TempDir dir_;
  std::unique_ptr<Store> store_;
  std::unique_ptr<RecordingTransport> transport_;  // outlives the service that uses it
  std::unique_ptr<HubService> service_;
  std::unique_ptr<Api> api_;
  bundles::KeyPair signing_key_ = registered_key();
};

std::string report_bytes(const std::string& device_id, uint64_t seq, v1::AgentState state, uint64_t generation,
                         const std::string& campaign_id, v1::Reason reason = v1::REASON_NONE) {
  v1::Report r;
  r.set_device_id(device_id);
  r.set_seq(seq);
  r.set_time_unix_ms(1'800'000'000'000);
  r.set_state(state);
  r.set_generation(generation);
  r.set_campaign_id(campaign_id);
  r.set_bundle_name("edge-base");
  r.set_bundle_version(1);
  if (reason != v1::REASON_NONE) {
    r.mutable_error()->set_reason(reason);
    r.mutable_error()->set_message("refused by test");
  }
  if (state == v1::AGENT_STATE_APPLIED) {
    r.mutable_applied()->set_name("edge-base");
    r.mutable_applied()->set_channel("stable");
    r.mutable_applied()->set_version(1);
  }
  return r.SerializeAsString();
}

// The counts these tests follow (campaigns report more: waiting, skipped, rollbacks...).
json counts_of(const json& campaign) {
  json out;
  for (const char* k : {"total", "pending", "in_progress", "applied", "failed", "superseded", "offline"}) {
    out[k] = campaign["counts"][k];
  }
  return out;
}

}  // namespace

TEST_CASE("hub health endpoints", "[unit][hub]") {
  Hub hub;
  auto h = hub.anonymous("GET", "/healthz");
  CHECK(h.status == 200);
  CHECK(body_of(h)["status"] == "ok");

  auto r = hub.anonymous("GET", "/readyz");
  CHECK(r.status == 503);
  CHECK(error_code(r) == "unavailable");

  auto& broker = hub.attach_broker();
  // Devices' own topics, those of devices behind gateways, and gateways' report batches.
  CHECK(broker.subscriptions() == std::vector<std::string>{"flotilla/v1/d/+/report", "flotilla/v1/g/+/d/+/report",
                                                         "flotilla/v1/d/+/presence", "flotilla/v1/g/+/d/+/presence",
                                                         "flotilla/v1/g/+/reports"});
  CHECK(hub.anonymous("GET", "/readyz").status == 200);
  broker.disconnect();
  CHECK(hub.anonymous("GET", "/readyz").status == 503);
}

TEST_CASE("hub API refuses requests without a valid API token", "[unit][hub]") {
  Hub hub;
  const std::string bundle_id = hub.upload_bundle();
  hub.enroll_device({{"env", "prod"}});
  const std::string campaign = json{{"bundle", bundle_id}, {"selector", "env=prod"}}.dump();

  auto none = hub.anonymous("POST", "/v1/campaigns", campaign);
  CHECK(none.status == 401);
  CHECK(error_code(none) == "unauthenticated");

  auto wrong = hub.call("POST", "/v1/campaigns", campaign, "Bearer flt_api_0123456789abcdef");
  CHECK(wrong.status == 401);
  CHECK(error_code(wrong) == "unauthenticated");

  auto basic = hub.call("POST", "/v1/campaigns", campaign, "Basic " + hub.admin);
  CHECK(basic.status == 401);

  // An enrollment token is not an API token.
  auto enroll_tok = hub.call("POST", "/v1/campaigns", campaign, "Bearer " + hub.enrollment_token());
  CHECK(enroll_tok.status == 401);

  CHECK(hub.campaign_count() == 0);
  // The same request with the admin token works, so the token was the only problem.
  CHECK(hub.call("POST", "/v1/campaigns", campaign).status == 201);
  CHECK(hub.campaign_count() == 1);
}

TEST_CASE("hub API answers unknown routes with a JSON 404", "[unit][hub]") {
  Hub hub;
  for (const std::string target : {"/nope", "/v1/nope", "/v1/devices/d-1/extra", "/v2/devices"}) {
    INFO(target);
    auto r = hub.call("GET", target);
    CHECK(r.status == 404);
    CHECK(r.content_type == "application/json");
    CHECK(error_code(r) == "not_found");
  }
}

TEST_CASE("hub API rejects bad campaign bodies and stores nothing", "[unit][hub]") {
  Hub hub;
  const std::string bundle_id = hub.upload_bundle();
  const std::string device = hub.enroll_device({{"env", "prod"}});

  auto malformed = hub.call("POST", "/v1/campaigns", "{\"bundle\": \"" + bundle_id + "\", ");
  CHECK(malformed.status == 400);
  CHECK(error_code(malformed) == "invalid_argument");

  auto unknown = hub.call("POST", "/v1/campaigns",
                          json{{"bundle", bundle_id}, {"selectr", "env=prod"}}.dump());
  CHECK(unknown.status == 400);
  CHECK(error_code(unknown) == "invalid_argument");
  CHECK(contains(error_message(unknown), "selectr"));

  auto wrong_type = hub.call("POST", "/v1/campaigns", json{{"bundle", 42}}.dump());
  CHECK(wrong_type.status == 400);
  CHECK(contains(error_message(wrong_type), "bundle"));

  auto not_object = hub.call("POST", "/v1/campaigns", "[]");
  CHECK(not_object.status == 400);

  // Valid JSON that would create a campaign, but over the 1 MiB cap.
  const std::string huge =
      json{{"bundle", bundle_id}, {"selector", "env=prod"}, {"name", std::string(flotilla::hub::kMaxJsonBody, 'x')}}.dump();
  auto too_large = hub.call("POST", "/v1/campaigns", huge);
  CHECK(too_large.status == 413);
  CHECK(error_code(too_large) == "too_large");

  CHECK(hub.get("/v1/campaigns")["items"].empty());
  CHECK(hub.get("/v1/devices/" + device)["generation"] == 0);
  // The fixture was able to create one all along.
  CHECK(hub.call("POST", "/v1/campaigns", json{{"bundle", bundle_id}}.dump()).status == 201);
}

TEST_CASE("hub API names the missing id in its 404s", "[unit][hub]") {
  Hub hub;
  hub.enroll_device({{"env", "prod"}});

  auto c = hub.call("GET", "/v1/campaigns/c-missing123");
  CHECK(c.status == 404);
  CHECK(contains(error_message(c), "c-missing123"));

  auto b = hub.call("GET", "/v1/bundles/0123456789abcdef");
  CHECK(b.status == 404);
  CHECK(contains(error_message(b), "0123456789abcdef"));

  auto d = hub.call("GET", "/v1/devices/d-nosuchdevice");
  CHECK(d.status == 404);
  CHECK(contains(error_message(d), "d-nosuchdevice"));

  auto cb = hub.call("POST", "/v1/campaigns", json{{"bundle", "feedfacefeedface"}}.dump());
  CHECK(cb.status == 404);
  CHECK(contains(error_message(cb), "feedfacefeedface"));
  CHECK(hub.campaign_count() == 0);
}

TEST_CASE("hub API stores only signed bundles, once per manifest", "[unit][hub]") {
  Hub hub;
  v1::SignedBundle probe;
  REQUIRE_FALSE(probe.ParseFromString(kGarbage));

  auto garbage = hub.call("POST", "/v1/bundles", kGarbage);
  CHECK(garbage.status == 400);
  CHECK(hub.get("/v1/bundles")["items"].empty());

  auto env = hub.bundle();
  auto unsigned_env = env;
  unsigned_env.clear_signatures();
  auto unsigned_r = hub.call("POST", "/v1/bundles", bundles::serialize_envelope(unsigned_env));
  CHECK(unsigned_r.status == 400);
  CHECK(contains(error_message(unsigned_r), "not signed"));
  CHECK(hub.get("/v1/bundles")["items"].empty());

  const std::string bytes = bundles::serialize_envelope(env);
  auto first = hub.call("POST", "/v1/bundles", bytes);
  REQUIRE(first.status == 201);
  const json b = body_of(first);
  CHECK(b["id"] == bundles::manifest_digest_hex(env).substr(0, 16));
  CHECK(b["digest"] == bundles::manifest_digest_hex(env));
  CHECK(b["name"] == "edge-base");
  CHECK(b["version"] == 1);
  CHECK(b["signatures"] == 1);

  auto again = hub.call("POST", "/v1/bundles", bytes);
  CHECK(again.status == 200);
  CHECK(body_of(again)["id"] == b["id"]);

  const json list = hub.get("/v1/bundles");
  REQUIRE(list["items"].size() == 1);
  CHECK(list["items"][0]["id"] == b["id"]);
  CHECK(hub.get("/v1/bundles/" + b["id"].get<std::string>())["name"] == "edge-base");
}

TEST_CASE("hub enrolls a device with a valid enrollment token", "[unit][hub]") {
  Hub hub;
  hub.attach_broker();
  const std::string token = hub.enrollment_token();
  const auto key = registered_key();
  auto r = hub.enroll(token, bytes_string(key.pub.key), {{"site", "berlin"}}, "rpi-7");

  REQUIRE(r.status == 200);
  CHECK(r.content_type == "application/x-protobuf");
  v1::EnrollResponse resp;
  REQUIRE(resp.ParseFromString(r.body));
  CHECK(resp.device_id().rfind("d-", 0) == 0);
  CHECK(resp.device_id().size() > 2);
  CHECK(resp.mqtt_username() == resp.device_id());
  CHECK_FALSE(resp.mqtt_password().empty());
  CHECK(resp.broker_url() == "tcp://127.0.0.1:1883");
  CHECK(resp.topic_prefix() == "flotilla/v1/d/" + resp.device_id());

  const json d = hub.get("/v1/devices/" + resp.device_id());
  CHECK(d["hostname"] == "rpi-7");
  CHECK(d["arch"] == "arm64");
  CHECK(d["labels"] == json{{"site", "berlin"}});
  CHECK(d["state"] == "enrolled");

  // The id derives from the device key: enrolling again keeps it.
  auto again = hub.enroll(token, bytes_string(key.pub.key));
  REQUIRE(again.status == 200);
  v1::EnrollResponse resp2;
  REQUIRE(resp2.ParseFromString(again.body));
  CHECK(resp2.device_id() == resp.device_id());
  CHECK(hub.device_count() == 1);
}

TEST_CASE("hub refuses bad enrollments and stores no device", "[unit][hub]") {
  Hub hub;
  hub.attach_broker();
  const std::string key = bytes_string(registered_key().pub.key);

  auto bad_token = hub.enroll("flt_enr_not-a-real-token", key);
  CHECK(bad_token.status == 401);
  CHECK(error_code(bad_token) == "unauthenticated");

  // An API token is not an enrollment token.
  auto api_token = hub.enroll(hub.admin, key);
  CHECK(api_token.status == 401);

  auto short_key = hub.enroll(hub.enrollment_token(), std::string(10, '\x01'));
  CHECK(short_key.status == 400);
  CHECK(error_code(short_key) == "invalid_argument");

  auto garbage = hub.anonymous("POST", "/v1/enroll", kGarbage);
  CHECK(garbage.status == 400);

  CHECK(hub.device_count() == 0);
}

TEST_CASE("hub refuses enrollment until it listens to device reports", "[unit][hub]") {
  Hub hub;
  const std::string token = hub.enrollment_token({}, 1);
  const std::string key = bytes_string(registered_key().pub.key);

  auto r = hub.enroll(token, key);
  CHECK(r.status == 503);
  CHECK(error_code(r) == "unavailable");
  CHECK(r.headers.count("Retry-After") == 1);
  CHECK(hub.device_count() == 0);

  // The refusal did not use up the single-use token.
  hub.attach_broker();
  CHECK(hub.enroll(token, key).status == 200);
  CHECK(hub.device_count() == 1);
}

TEST_CASE("hub enrollment token with max_uses=1 enrolls one device only", "[unit][hub]") {
  Hub hub;
  hub.attach_broker();
  const std::string token = hub.enrollment_token({}, 1);

  CHECK(hub.enroll(token, bytes_string(registered_key().pub.key)).status == 200);
  auto second = hub.enroll(token, bytes_string(registered_key().pub.key));
  CHECK(second.status == 403);
  CHECK(error_code(second) == "permission_denied");
  CHECK(hub.device_count() == 1);
}

TEST_CASE("hub takes labels from the token: a device may repeat them, never change them", "[unit][hub]") {
  Hub hub;
  hub.attach_broker();
  const std::string token = hub.enrollment_token({{"env", "prod"}});  // devices may choose site
  auto other = hub.enroll(token, bytes_string(registered_key().pub.key), {{"env", "dev"}, {"site", "berlin"}});
  CHECK(other.status == 403);
  CHECK(error_code(other) == "permission_denied");
  CHECK(hub.device_count() == 0);
  auto r = hub.enroll(token, bytes_string(registered_key().pub.key), {{"env", "prod"}, {"site", "berlin"}});
  REQUIRE(r.status == 200);
  v1::EnrollResponse resp;
  REQUIRE(resp.ParseFromString(r.body));
  CHECK(hub.get("/v1/devices/" + resp.device_id())["labels"] == json{{"env", "prod"}, {"site", "berlin"}});
}

TEST_CASE("hub device list filters by selector and pages with limit and after", "[unit][hub]") {
  Hub hub;
  const std::string p1 = hub.enroll_device({{"env", "prod"}});
  const std::string p2 = hub.enroll_device({{"env", "prod"}});
  const std::string d1 = hub.enroll_device({{"env", "dev"}});

  const json prod = hub.get("/v1/devices?selector=env%3Dprod");
  std::vector<std::string> prod_ids;
  for (const auto& d : prod["items"]) {
    CHECK(d["labels"]["env"] == "prod");
    prod_ids.push_back(d["id"].get<std::string>());
  }
  std::vector<std::string> want_prod{p1, p2};
  std::sort(want_prod.begin(), want_prod.end());
  CHECK(prod_ids == want_prod);

  std::vector<std::string> want_all{p1, p2, d1};
  std::sort(want_all.begin(), want_all.end());
  std::vector<std::string> walked;
  std::string after;
  for (int page = 0; page < 10; ++page) {
    const json r = hub.get("/v1/devices?limit=1" + (after.empty() ? std::string() : "&after=" + after));
    REQUIRE(r["items"].size() == 1);
    walked.push_back(r["items"][0]["id"].get<std::string>());
    after = r["next"].get<std::string>();
    if (after.empty()) break;
    CHECK(after == walked.back());
  }
  CHECK(walked == want_all);

  CHECK(hub.call("GET", "/v1/devices?limit=0").status == 400);
  CHECK(hub.call("GET", "/v1/devices?selector=env%20in%20(").status == 400);
}

// A typo in a query parameter (?projet=) must not silently become "no
// filter": every route refuses a parameter it does not take, naming it and
// the ones it takes, before its handler runs (the routes without a token,
// probes, enrollment, the device CA and artifact downloads, take none).
TEST_CASE("hub API refuses an unknown query parameter on every route, names it, and changes nothing", "[unit][hub]") {
  Hub hub;
  const std::string prod = hub.enroll_device({{"env", "prod"}});
  hub.enroll_device({{"env", "dev"}});
  const std::string bundle_id = hub.upload_bundle();
  // What the routes could change: a refused call changes none of it.
  const auto snapshot = [&] {
    std::string out;
    for (const char* list :
         {"/v1/devices?include_decommissioned=true", "/v1/campaigns", "/v1/bundles", "/v1/tokens", "/v1/enrollment-tokens"}) {
      out += hub.get(list).dump() + "\n";
    }
    return out;
  };
  const std::string before = snapshot();
  int checked = 0;
  for (const auto& [method, pattern] : hub.api().routes()) {
    std::string target = pattern;
    for (size_t open; (open = target.find('{')) != std::string::npos;) {
      target.replace(open, target.find('}', open) - open + 1, pattern.find("{sha256}") != std::string::npos
                                                                 ? std::string(64, 'a')
                                                                 : prod);
    }
    auto r = hub.call(method, target + "?projet=default", json{{"bundle", bundle_id}, {"selector", "env=prod"}}.dump());
    INFO(method << " " << target << ": " << r.body);
    CHECK(r.status == 400);
    if (method == "HEAD") continue;  // no body to read the message from
    CHECK(error_code(r) == "invalid_argument");
    CHECK(contains(error_message(r), "unknown query parameter 'projet' for " + method + " " + pattern + "; it takes "));
    ++checked;
  }
  CHECK(checked > 40);
  CHECK(snapshot() == before);
  CHECK(error_message(hub.call("GET", "/healthz?verbose=1")) ==
        "unknown query parameter 'verbose' for GET /healthz; it takes none");
  CHECK(hub.call("GET", "/healthz").status == 200);

  // The message lists what the route takes.
  CHECK(error_message(hub.call("GET", "/v1/devices?selector=env%3Dprod&projet=default")) ==
        "unknown query parameter 'projet' for GET /v1/devices; it takes after, certExpiresBefore, held, "
        "include_decommissioned, limit, project, selector, until");
  CHECK(error_message(hub.call("GET", "/v1/tokens?limit=5")) ==
        "unknown query parameter 'limit' for GET /v1/tokens; it takes none");
  // The parameters a route takes still work.
  const json page = hub.get("/v1/devices?selector=env%3Dprod&project=default&limit=10&include_decommissioned=false");
  REQUIRE(page["items"].size() == 1);
  CHECK(page["items"][0]["id"] == prod);
  CHECK(hub.get("/v1/campaigns?project=default")["items"].empty());
  CHECK(hub.get("/v1/audit?limit=1&after=0")["items"].size() == 1);
  // And a value above 1 KiB is still refused.
  CHECK(hub.call("GET", "/v1/devices?selector=" + std::string(1025, 'a')).status == 400);
}

TEST_CASE("hub refuses a campaign whose selector matches no device", "[unit][hub]") {
  Hub hub;
  const std::string bundle_id = hub.upload_bundle();
  const std::string device = hub.enroll_device({{"env", "prod"}});

  auto r = hub.call("POST", "/v1/campaigns", json{{"bundle", bundle_id}, {"selector", "env=staging"}}.dump());
  CHECK(r.status == 400);
  CHECK(error_code(r) == "invalid_argument");
  CHECK(contains(error_message(r), "env=staging"));
  CHECK(hub.campaign_count() == 0);
  CHECK(hub.get("/v1/devices/" + device)["generation"] == 0);
  CHECK(hub.get("/v1/devices/" + device)["campaign_id"] == "");
}

TEST_CASE("hub campaign counts follow device reports to completion", "[unit][hub]") {
  Hub hub;
  const std::string bundle_id = hub.upload_bundle();
  const std::string p1 = hub.enroll_device({{"env", "prod"}});
  const std::string p2 = hub.enroll_device({{"env", "prod"}});
  const std::string dev = hub.enroll_device({{"env", "dev"}});

  const json created = hub.create_campaign(bundle_id, "env=prod");
  const std::string id = created["id"].get<std::string>();
  // Both devices are offline (no presence yet): every wave is out, nothing blocks.
  CHECK(created["state"] == "converging");
  CHECK(created["bundle"]["id"] == bundle_id);
  CHECK(counts_of(created) == json{{"total", 2}, {"pending", 2}, {"in_progress", 0}, {"applied", 0},
                                   {"failed", 0}, {"superseded", 0}, {"offline", 2}});
  CHECK(hub.get("/v1/devices/" + p1)["generation"] == 1);
  CHECK(hub.get("/v1/devices/" + p1)["campaign_id"] == id);
  CHECK(hub.get("/v1/devices/" + dev)["generation"] == 0);

  hub.report(p1, report_bytes(p1, 100, v1::AGENT_STATE_INSTALLING, 1, id));
  json c = hub.get("/v1/campaigns/" + id);
  CHECK(counts_of(c)["in_progress"] == 1);
  CHECK(counts_of(c)["pending"] == 1);

  hub.report(p1, report_bytes(p1, 101, v1::AGENT_STATE_APPLIED, 1, id));
  c = hub.get("/v1/campaigns/" + id);
  CHECK(counts_of(c) == json{{"total", 2}, {"pending", 1}, {"in_progress", 0}, {"applied", 1},
                             {"failed", 0}, {"superseded", 0}, {"offline", 1}});
  CHECK(c["state"] == "converging");  // p2 is still away

  hub.report(p2, report_bytes(p2, 7, v1::AGENT_STATE_APPLIED, 1, id));
  c = hub.get("/v1/campaigns/" + id + "?devices=true");
  CHECK(counts_of(c) == json{{"total", 2}, {"pending", 0}, {"in_progress", 0}, {"applied", 2},
                             {"failed", 0}, {"superseded", 0}, {"offline", 0}});
  CHECK(c["state"] == "completed");
  CHECK(c["failure_reasons"].empty());
  REQUIRE(c["devices"].size() == 2);
  for (const auto& d : c["devices"]) CHECK(d["status"] == "applied");

  const json d = hub.get("/v1/devices/" + p1);
  CHECK(d["state"] == "applied");
  CHECK(d["applied_bundle"] == "edge-base");
  CHECK(d["applied_version"] == 1);
  CHECK(d["online"] == true);
}

TEST_CASE("hub publishes retained desired state to each targeted device", "[unit][hub]") {
  Hub hub;
  auto& broker = hub.attach_broker();
  const std::string bundle_id = hub.upload_bundle();
  const std::string p1 = hub.enroll_device({{"env", "prod"}});
  const std::string dev = hub.enroll_device({{"env", "dev"}});
  broker.clear();

  const std::string id = hub.create_campaign(bundle_id, "env=prod")["id"].get<std::string>();

  const auto published = broker.published();
  REQUIRE(published.size() == 1);
  const auto& m = published[0];
  CHECK(m.topic == flotilla::transport::device_topic(p1, "desired"));
  CHECK(m.retained);
  CHECK(m.qos == 1);
  v1::DesiredState ds;
  REQUIRE(ds.ParseFromString(m.payload));
  CHECK(ds.device_id() == p1);
  CHECK(ds.generation() == 1);
  CHECK(ds.campaign_id() == id);
  CHECK(bundles::manifest_digest_hex(ds.bundle()).substr(0, 16) == bundle_id);
  CHECK(ds.bundle().signatures_size() == 1);
}

TEST_CASE("hub does not count a report with an already seen seq", "[unit][hub]") {
  Hub hub;
  const std::string bundle_id = hub.upload_bundle();
  const std::string p1 = hub.enroll_device({{"env", "prod"}});
  const std::string p2 = hub.enroll_device({{"env", "prod"}});
  const std::string id = hub.create_campaign(bundle_id, "env=prod")["id"].get<std::string>();

  const std::string applied = report_bytes(p1, 10, v1::AGENT_STATE_APPLIED, 1, id);
  hub.report(p1, applied);
  REQUIRE(counts_of(hub.get("/v1/campaigns/" + id))["applied"] == 1);

  // A QoS 1 redelivery, and a report reusing seq 10 that would flip the outcome.
  const uint64_t processed = hub.service().reports_processed();
  hub.deliver(p1, applied);
  hub.deliver(p1, report_bytes(p1, 10, v1::AGENT_STATE_REFUSED, 1, id, v1::REASON_UNKNOWN_KEY));
  // Only the service's worker takes these (no drain() here), in order, so once
  // this later report from another device is counted the two above were handled.
  hub.deliver(p2, report_bytes(p2, 1, v1::AGENT_STATE_INSTALLING, 1, id));
  hub.settle(processed + 1);

  const json c = hub.get("/v1/campaigns/" + id);
  CHECK(counts_of(c)["applied"] == 1);
  CHECK(counts_of(c)["failed"] == 0);
  CHECK(counts_of(c)["in_progress"] == 1);
  CHECK(c["failure_reasons"].empty());
  const json d = hub.get("/v1/devices/" + p1);
  CHECK(d["state"] == "applied");
  CHECK(d["last_reason"] == "");
}

TEST_CASE("hub counts a refused device as failed with its reason", "[unit][hub]") {
  Hub hub;
  const std::string bundle_id = hub.upload_bundle();
  const std::string dev = hub.enroll_device({{"env", "dev"}});
  hub.enroll_device({{"env", "prod"}});
  const std::string id = hub.create_campaign(bundle_id, "env=dev")["id"].get<std::string>();

  hub.report(dev, report_bytes(dev, 5, v1::AGENT_STATE_REFUSED, 1, id, v1::REASON_UNKNOWN_KEY));

  const json c = hub.get("/v1/campaigns/" + id + "?devices=true");
  CHECK(counts_of(c) == json{{"total", 1}, {"pending", 0}, {"in_progress", 0}, {"applied", 0},
                             {"failed", 1}, {"superseded", 0}, {"offline", 0}});
  CHECK(c["failure_reasons"] == json{{"unknown_key", 1}});
  CHECK(c["state"] == "completed");
  REQUIRE(c["devices"].size() == 1);
  CHECK(c["devices"][0]["reason"] == "unknown_key");
  const json d = hub.get("/v1/devices/" + dev);
  CHECK(d["state"] == "refused");
  CHECK(d["last_reason"] == "unknown_key");
}

TEST_CASE("hub ignores reports from unknown devices and unparsable reports", "[unit][hub]") {
  Hub hub;
  const std::string bundle_id = hub.upload_bundle();
  const std::string p1 = hub.enroll_device({{"env", "prod"}});
  const std::string p2 = hub.enroll_device({{"env", "prod"}});
  const std::string id = hub.create_campaign(bundle_id, "env=prod")["id"].get<std::string>();
  v1::Report probe;
  REQUIRE_FALSE(probe.ParseFromString(kGarbage));

  const uint64_t processed = hub.service().reports_processed();
  const std::string ghost = "d-0000000000ghost0000";
  hub.deliver(ghost, report_bytes(ghost, 1, v1::AGENT_STATE_APPLIED, 1, id));
  hub.deliver(p1, kGarbage);
  // Worker-only and in order: once p2's report is counted the two above were handled.
  hub.deliver(p2, report_bytes(p2, 1, v1::AGENT_STATE_HEALTH_CHECK, 1, id));
  hub.settle(processed + 1);

  const json c = hub.get("/v1/campaigns/" + id);
  CHECK(counts_of(c) == json{{"total", 2}, {"pending", 1}, {"in_progress", 1}, {"applied", 0},
                             {"failed", 0}, {"superseded", 0}, {"offline", 1}});
  CHECK(c["state"] == "converging");  // released; p1 is away, p2 still applying
  CHECK(hub.call("GET", "/v1/devices/" + ghost).status == 404);
  CHECK(hub.device_count() == 2);
  const json d = hub.get("/v1/devices/" + p1);
  CHECK(d["state"] == "enrolled");
  CHECK(d["online"] == false);
  CHECK(d["last_seen_at"] == "");
}

TEST_CASE("hub creates enrollment tokens and validates their fields", "[unit][hub]") {
  Hub hub;
  auto count = [&] {
    auto n = hub.store().count_tokens("enroll");
    REQUIRE(n);
    return *n;
  };
  REQUIRE(count() == 0);

  auto ok = hub.call("POST", "/v1/enrollment-tokens",
                     json{{"name", "rack-7"}, {"labels", {{"site", "berlin"}}}, {"ttl", "2h"}, {"max_uses", 3}}.dump());
  REQUIRE(ok.status == 201);
  const json t = body_of(ok);
  CHECK(t["token"].get<std::string>().rfind("flt_enr_", 0) == 0);
  CHECK(t["id"].get<std::string>().rfind("enr-", 0) == 0);
  CHECK(t["labels"] == json{{"site", "berlin"}});
  CHECK(t["max_uses"] == 3);
  CHECK(count() == 1);

  for (const json& bad : {json{{"labels", {{"bad key!", "x"}}}}, json{{"labels", {{"site", 5}}}},
                          json{{"labels", "site=berlin"}}}) {
    INFO(bad.dump());
    auto r = hub.call("POST", "/v1/enrollment-tokens", bad.dump());
    CHECK(r.status == 400);
    CHECK(contains(error_message(r), "label"));
  }
  for (const std::string ttl : {"forever", "10x", "h"}) {
    INFO(ttl);
    auto r = hub.call("POST", "/v1/enrollment-tokens", json{{"ttl", ttl}}.dump());
    CHECK(r.status == 400);
    CHECK(contains(error_message(r), "ttl"));
  }
  CHECK(hub.call("POST", "/v1/enrollment-tokens", json{{"max_uses", -1}}.dump()).status == 400);
  CHECK(hub.call("POST", "/v1/enrollment-tokens", json{{"uses", 1}}.dump()).status == 400);
  CHECK(count() == 1);
}

TEST_CASE("hub enrollment tokens from the API expire by the hub's clock", "[unit][hub]") {
  // Known bug: the enrollment-tokens handler takes its expiry from
  // SystemClock instead of the service's clock, which authenticate() uses.
  Hub hub;
  hub.attach_broker();
  auto r = hub.call("POST", "/v1/enrollment-tokens", json{{"ttl", "24h"}}.dump());
  REQUIRE(r.status == 201);
  const json t = body_of(r);
  CHECK(t["expires_at"] == bundles::format_rfc3339(hub.clock.now_unix() + 86400));
  auto e = hub.enroll(t["token"].get<std::string>(), bytes_string(registered_key().pub.key));
  CHECK(e.status == 200);
}

TEST_CASE("hub answers a malformed ttl with 400 rather than throwing", "[unit][hub]") {
  // parse_duration once handed "." to std::stod, which throws.
  Hub hub;
  HttpResponse r;
  CHECK_NOTHROW(r = hub.call("POST", "/v1/enrollment-tokens", json{{"ttl", "."}}.dump()));
  CHECK(r.status == 400);
  auto n = hub.store().count_tokens("enroll");
  REQUIRE(n);
  CHECK(*n == 0);
}

TEST_CASE("hub single-use enrollment token holds under concurrent enrollments", "[unit][hub]") {
  // The use is checked and counted in one statement inside the enrollment
  // transaction; an earlier check in authenticate() alone let concurrent
  // requests all pass.
  Hub hub;
  hub.attach_broker();
  const std::string token = hub.enrollment_token({}, 1);
  constexpr int kClients = 8;
  std::vector<std::string> keys;
  for (int i = 0; i < kClients; ++i) keys.push_back(bytes_string(registered_key().pub.key));
  std::atomic<bool> go{false};
  std::vector<int> status(kClients, 0);
  std::vector<std::thread> clients;
  for (int i = 0; i < kClients; ++i) {
    clients.emplace_back([&, i] {
      while (!go) std::this_thread::yield();
      status[i] = hub.enroll(token, keys[i]).status;
    });
  }
  go = true;
  for (auto& t : clients) t.join();

  CHECK(std::count(status.begin(), status.end(), 200) == 1);
  CHECK(std::count(status.begin(), status.end(), 403) == kClients - 1);
  CHECK(hub.device_count() == 1);
}

TEST_CASE("hub enrollment requires proof that the device holds its key", "[unit][hub]") {
  Hub hub;
  hub.attach_broker();
  const std::string token = hub.enrollment_token();
  const auto victim = registered_key();
  const std::string victim_pub(victim.pub.key.begin(), victim.pub.key.end());

  // Someone who knows only the public key (and has a token) cannot enroll as it.
  v1::EnrollRequest forged;
  forged.set_enrollment_token(token);
  forged.set_device_public_key(victim_pub);
  auto other = bundles::generate_key();
  auto sig = bundles::sign_detached(other, bundles::enroll_proof_message(token, victim.pub.key));
  forged.set_proof(std::string(sig.begin(), sig.end()));
  auto r = hub.anonymous("POST", "/v1/enroll", forged.SerializeAsString());
  CHECK(r.status == 400);
  CHECK(contains(error_message(r), "proof"));
  forged.clear_proof();
  CHECK(hub.anonymous("POST", "/v1/enroll", forged.SerializeAsString()).status == 400);
  CHECK(hub.get("/v1/devices")["items"].empty());

  // A proof made for another token does not carry over either.
  const std::string token2 = hub.enrollment_token();
  v1::EnrollRequest replay;
  replay.set_enrollment_token(token2);
  replay.set_device_public_key(victim_pub);
  replay.set_proof(enroll_proof(token, victim_pub));
  CHECK(hub.anonymous("POST", "/v1/enroll", replay.SerializeAsString()).status == 400);
  CHECK(hub.get("/v1/devices")["items"].empty());

  // The holder of the key enrolls.
  CHECK(hub.enroll(token, victim_pub).status == 200);
  CHECK(hub.get("/v1/devices")["items"].size() == 1);
}

TEST_CASE("hub keeps the union of signatures when a bundle is uploaded again", "[unit][hub]") {
  Hub hub;
  auto env = hub.bundle(1);
  const auto second = registered_key();
  REQUIRE(hub.call("POST", "/v1/bundles", bundles::serialize_envelope(env)).status == 201);
  auto more = env;
  REQUIRE(bundles::sign(more, second));
  auto r = hub.call("POST", "/v1/bundles", bundles::serialize_envelope(more));
  CHECK(r.status == 200);
  CHECK(body_of(r)["signatures"] == 2);
  // Uploading the one-signature copy again loses nothing.
  CHECK(body_of(hub.call("POST", "/v1/bundles", bundles::serialize_envelope(env)))["signatures"] == 2);
  CHECK(hub.get("/v1/bundles")["items"][0]["signatures"] == 2);
}

TEST_CASE("hub: a newer campaign supersedes a device's unfinished row in an older one", "[unit][hub]") {
  Hub hub;
  const std::string bundle_id = hub.upload_bundle();
  const std::string a = hub.enroll_device({{"env", "prod"}, {"ring", "1"}});
  const std::string b = hub.enroll_device({{"env", "prod"}, {"ring", "2"}});
  const std::string first = hub.create_campaign(bundle_id, "env=prod")["id"].get<std::string>();
  const std::string second = hub.create_campaign(bundle_id, "ring=2")["id"].get<std::string>();

  json c1 = hub.get("/v1/campaigns/" + first + "?devices=true");
  CHECK(c1["counts"]["superseded"] == 1);
  CHECK(c1["counts"]["pending"] == 1);
  CHECK(c1["state"] == "converging");
  for (const auto& d : c1["devices"]) CHECK(d["status"] == (d["device_id"] == b ? "superseded" : "pending"));
  // b follows the second campaign now: its generation moved on.
  CHECK(hub.get("/v1/devices/" + b)["campaign_id"] == second);
  CHECK(hub.get("/v1/devices/" + b)["generation"] == 2);
  // b's late report about the first campaign's generation is not counted there.
  hub.report(b, report_bytes(b, 50, v1::AGENT_STATE_APPLIED, 1, first));
  CHECK(hub.get("/v1/campaigns/" + first)["counts"]["applied"] == 0);
  // Once a's outcome is in, the first campaign is complete.
  hub.report(a, report_bytes(a, 51, v1::AGENT_STATE_APPLIED, 1, first));
  c1 = hub.get("/v1/campaigns/" + first);
  CHECK(c1["state"] == "completed");
  CHECK(c1["counts"]["applied"] == 1);
  CHECK(c1["counts"]["superseded"] == 1);
  json c2 = hub.get("/v1/campaigns/" + second);
  CHECK(c2["counts"]["total"] == 1);
  CHECK(c2["counts"]["pending"] == 1);
}

namespace {

// A gateway's batch: each device signs its own proof, the gateway signs the list.
struct Batch {
  v1::EnrollBatchRequest req;
  std::vector<std::string> keys;
  void add(const bundles::KeyPair& k, const std::string& token, const std::string& hostname) {
    auto* d = req.add_devices();
    d->set_device_public_key(bytes_string(k.pub.key));
    const auto proof = bundles::sign_detached(k, bundles::enroll_proof_message(token, k.pub.key));
    d->set_proof(bytes_string(proof));
    d->set_hostname(hostname);
    d->set_arch("arm64");
    keys.push_back(d->device_public_key());
  }
  std::string signed_by(const bundles::KeyPair& gateway, const std::string& token, const std::string& gateway_id) {
    req.set_enrollment_token(token);
    req.set_gateway_id(gateway_id);
    keys.clear();
    for (const auto& d : req.devices()) keys.push_back(d.device_public_key());
    req.set_gateway_proof(bytes_string(
        bundles::sign_detached(gateway, bundles::enroll_batch_proof_message(token, gateway_id, keys))));
    return req.SerializeAsString();
  }
};

std::string enrolled_id(const HttpResponse& r) {
  INFO(r.body);
  REQUIRE(r.status == 200);
  v1::EnrollResponse resp;
  REQUIRE(resp.ParseFromString(r.body));
  return resp.device_id();
}

}  // namespace

TEST_CASE("hub enrolls a gateway's batch in one request, with one result per device", "[unit][hub]") {
  Hub hub;
  hub.attach_broker();
  const std::string token = hub.enrollment_token({{"fleet", "shops"}});
  const auto gw_key = registered_key();
  const std::string gw = enrolled_id(hub.enroll(token, bytes_string(gw_key.pub.key)));
  // A device that enrolled with its own session cannot move behind the gateway.
  const auto direct_key = registered_key();
  const std::string direct = enrolled_id(hub.enroll(token, bytes_string(direct_key.pub.key)));

  Batch b;
  std::vector<bundles::KeyPair> good;
  for (int i = 0; i < 3; ++i) good.push_back(registered_key());
  b.add(good[0], token, "shop-0");
  b.add(bundles::generate_key(), "another-token", "wrong-proof");  // proof made for another token
  b.add(good[1], token, "shop-1");
  b.add(good[1], token, "shop-1-again");                          // listed twice
  b.add(direct_key, token, "was-direct");
  b.add(good[2], token, "shop-2");
  b.req.mutable_devices(5)->mutable_labels()->insert({"bad key!", "x"});
  auto r = hub.anonymous("POST", "/v1/enroll/batch", b.signed_by(gw_key, token, gw));
  INFO(r.body);
  REQUIRE(r.status == 200);
  CHECK(r.content_type == "application/x-protobuf");
  v1::EnrollBatchResponse resp;
  REQUIRE(resp.ParseFromString(r.body));
  REQUIRE(resp.results_size() == 6);

  for (int i : {0, 2}) {
    const auto& e = resp.results(i);
    REQUIRE(e.has_enrolled());
    CHECK(e.error_code().empty());
    CHECK(e.enrolled().topic_prefix() == "flotilla/v1/g/" + gw + "/d/" + e.enrolled().device_id());
    CHECK(e.enrolled().mqtt_username().empty());  // it uses the gateway's session
    CHECK(e.enrolled().mqtt_password().empty());
    CHECK(e.enrolled().labels().at("fleet") == "shops");
    // Each device behind the gateway learns the director key it checks desired states with.
    const auto& director = hub.service().director_public_key().key;
    CHECK(e.enrolled().director_public_key() == std::string(director.begin(), director.end()));
    auto dev = hub.store().get_device(e.enrolled().device_id());
    REQUIRE(dev);
    REQUIRE(*dev);
    CHECK((*dev)->gateway == gw);
  }
  CHECK(hub.get("/v1/devices/" + resp.results(0).enrolled().device_id())["hostname"] == "shop-0");
  const std::vector<std::pair<int, std::string>> refused = {
      {1, "proof"}, {3, "twice"}, {4, "with its own session"}, {5, "bad label"}};
  for (const auto& [i, why] : refused) {
    const auto& e = resp.results(i);
    INFO(i << ": " << e.error_code() << " " << e.error_message());
    CHECK_FALSE(e.has_enrolled());
    CHECK(contains(e.error_message(), why));
  }
  CHECK(resp.results(1).error_code() == "invalid_argument");
  CHECK(resp.results(4).error_code() == "conflict");
  // The gateway, the direct device and the two good devices; nothing else,
  // and the direct device still has its own session.
  CHECK(hub.device_count() == 4);
  auto still_direct = hub.store().get_device(direct);
  REQUIRE(still_direct);
  REQUIRE(*still_direct);
  CHECK((*still_direct)->gateway.empty());
}

TEST_CASE("hub batch enrollment spends the token once per stored device", "[unit][hub]") {
  Hub hub;
  hub.attach_broker();
  const auto gw_key = registered_key();
  const std::string gw = enrolled_id(hub.enroll(hub.enrollment_token(), bytes_string(gw_key.pub.key)));
  const std::string token = hub.enrollment_token({}, 3);
  Batch b;
  for (int i = 0; i < 4; ++i) b.add(registered_key(), token, "d" + std::to_string(i));
  auto r = hub.anonymous("POST", "/v1/enroll/batch", b.signed_by(gw_key, token, gw));
  REQUIRE(r.status == 200);
  v1::EnrollBatchResponse resp;
  REQUIRE(resp.ParseFromString(r.body));
  REQUIRE(resp.results_size() == 4);
  for (int i = 0; i < 3; ++i) CHECK(resp.results(i).has_enrolled());
  CHECK(resp.results(3).error_code() == "permission_denied");
  CHECK(contains(resp.results(3).error_message(), "used up"));
  CHECK(hub.device_count() == 4);  // the gateway and three devices

  // Used up now: the next batch is refused as a whole.
  Batch again;
  again.add(registered_key(), token, "late");
  auto late = hub.anonymous("POST", "/v1/enroll/batch", again.signed_by(gw_key, token, gw));
  CHECK(late.status == 403);
  CHECK(hub.device_count() == 4);
}

TEST_CASE("hub refuses a batch as a whole for its token, gateway, signature or size, and stores nothing",
          "[unit][hub]") {
  Hub hub;
  hub.attach_broker();
  const std::string token = hub.enrollment_token();
  const auto gw_key = registered_key();
  const std::string gw = enrolled_id(hub.enroll(token, bytes_string(gw_key.pub.key)));
  const auto device_key = registered_key();
  const std::string behind =
      [&] {
        Batch one;
        one.add(device_key, token, "behind");
        auto r = hub.anonymous("POST", "/v1/enroll/batch", one.signed_by(gw_key, token, gw));
        v1::EnrollBatchResponse resp;
        REQUIRE(r.status == 200);
        REQUIRE(resp.ParseFromString(r.body));
        REQUIRE(resp.results(0).has_enrolled());
        return resp.results(0).enrolled().device_id();
      }();
  REQUIRE(hub.device_count() == 2);

  Batch b;
  for (int i = 0; i < 3; ++i) b.add(registered_key(), token, "d" + std::to_string(i));
  const auto post = [&](const std::string& body) { return hub.anonymous("POST", "/v1/enroll/batch", body); };

  SECTION("signed by a key that is not the gateway's") {
    auto r = post(b.signed_by(bundles::generate_key(), token, gw));
    CHECK(r.status == 403);
    CHECK(contains(error_message(r), "gateway proof"));
  }
  SECTION("a gateway signature over another list of devices") {
    (void)b.signed_by(gw_key, token, gw);
    b.req.mutable_devices()->SwapElements(0, 2);  // same devices, another order, the old signature
    CHECK(post(b.req.SerializeAsString()).status == 403);
  }
  SECTION("an unknown gateway, or a device behind a gateway acting as one") {
    CHECK(post(b.signed_by(gw_key, token, "d-00000000000000000000")).status == 403);
    auto r = post(b.signed_by(device_key, token, behind));
    CHECK(r.status == 403);
    CHECK(contains(error_message(r), "is not an enrolled device of project default with its own broker session"));
  }
  SECTION("no gateway") {
    auto r = post(b.signed_by(gw_key, token, ""));
    CHECK(r.status == 400);
    CHECK(contains(error_message(r), "gateway_id is required"));
  }
  SECTION("an unknown token") {
    auto r = post(b.signed_by(gw_key, "flt_enr_unknown", gw));
    CHECK(r.status == 401);
  }
  SECTION("no devices, or more than 1,000") {
    Batch empty;
    CHECK(post(empty.signed_by(gw_key, token, gw)).status == 400);
    Batch big;
    const auto k = registered_key();
    for (int i = 0; i < 1001; ++i) big.add(k, token, "same");
    auto r = post(big.signed_by(gw_key, token, gw));
    CHECK(r.status == 413);
    CHECK(contains(error_message(r), "at most 1000 devices"));
  }
  SECTION("not a batch request, or a body over 1 MiB") {
    CHECK(post(kGarbage).status == 400);
    CHECK(post(std::string((1u << 20) + 1, 'x')).status == 413);
  }
  SECTION("a device that names its own token or gateway") {
    b.req.mutable_devices(1)->set_gateway_id(gw);
    auto r = post(b.signed_by(gw_key, token, gw));
    REQUIRE(r.status == 200);
    v1::EnrollBatchResponse resp;
    REQUIRE(resp.ParseFromString(r.body));
    CHECK(resp.results(1).error_code() == "invalid_argument");
    CHECK(resp.results(0).has_enrolled());
    CHECK(hub.device_count() == 4);
    return;
  }
  CHECK(hub.device_count() == 2);
}

// Issue 15: a device's inventory lives in device_inventory only. A report
// that carries one writes that row (and no devices column: there are none);
// one without leaves it alone; GET /v1/devices, its certificate filter and
// the metrics read it from there.
TEST_CASE("a report's inventory is kept in one place and every reader sees it", "[unit][hub][inventory]") {
  Hub hub;
  const std::string dev = hub.enroll_device({{"env", "prod"}});
  const std::string other = hub.enroll_device({{"env", "prod"}});
  auto column_count = [&](const std::string& sql) {
    auto st = hub.store().db().prepare(sql);
    REQUIRE(st);
    auto r = st->step();
    REQUIRE(r);
    return st->col_int(0);
  };
  CHECK(column_count("SELECT COUNT(*) FROM pragma_table_info('devices') WHERE name IN ('k3s_role', 'cluster_id', "
                     "'k3s_cert_expiry_unix', 'os', 'disk_free_bytes', 'disk_total_bytes', 'mem_free_bytes', "
                     "'mem_total_bytes', 'clock_suspect')") == 0);
  v1::Report r;
  r.set_device_id(dev);
  r.set_seq(1);
  r.set_state(v1::AGENT_STATE_IDLE);
  auto* inv = r.mutable_inventory();
  inv->set_k3s_version("v1.30.4+k3s1");
  inv->set_k3s_role("agent");
  inv->set_cluster_id("line-1");
  inv->set_os("Linux 6.1");
  inv->set_k3s_cert_expiry_unix(hub.clock.now_unix() + 10 * 86400);
  inv->set_disk_free_bytes(uint64_t{3} << 30);
  inv->set_disk_total_bytes(uint64_t{16} << 30);
  inv->set_mem_free_bytes(uint64_t{200} << 20);
  inv->set_mem_total_bytes(uint64_t{1} << 30);
  inv->set_clock_suspect(true);
  hub.clock.advance(std::chrono::milliseconds(1000));
  hub.report(dev, r.SerializeAsString());
  const std::string row_sql = "SELECT updated_ms FROM device_inventory WHERE device_id = '" + dev + "'";
  const int64_t written = column_count(row_sql);
  CHECK(written == hub.clock.now_unix_ms());
  CHECK(column_count("SELECT COUNT(*) FROM device_inventory WHERE device_id = '" + other + "'") == 0);

  auto check_seen = [&](const json& d) {
    CHECK(d["k3s_role"] == "agent");
    CHECK(d["cluster_id"] == "line-1");
    CHECK(d["os"] == "Linux 6.1");
    CHECK(d["k3s_cert_expires_at"] != "");
    CHECK(d["disk_free_bytes"] == (uint64_t{3} << 30));
    CHECK(d["disk_total_bytes"] == (uint64_t{16} << 30));
    CHECK(d["mem_free_bytes"] == (uint64_t{200} << 20));
    CHECK(d["mem_total_bytes"] == (uint64_t{1} << 30));
    CHECK(d["clock_suspect"] == true);
  };
  check_seen(hub.get("/v1/devices/" + dev));
  // A report without inventory (most of them) does not touch the row.
  r.clear_inventory();
  r.set_seq(2);
  r.set_state(v1::AGENT_STATE_INSTALLING);
  hub.clock.advance(std::chrono::milliseconds(1000));
  hub.report(dev, r.SerializeAsString());
  CHECK(column_count(row_sql) == written);
  const json got = hub.get("/v1/devices/" + dev);
  CHECK(got["state"] == "installing");
  check_seen(got);
  // The certificate filter reads the same row.
  const std::string soon = std::to_string(hub.clock.now_unix() + 30 * 86400);
  const json expiring = hub.get("/v1/devices?certExpiresBefore=" + soon);
  REQUIRE(expiring["items"].size() == 1);
  CHECK(expiring["items"][0]["id"] == dev);
  check_seen(expiring["items"][0]);
  const std::string earlier = std::to_string(hub.clock.now_unix() + 5 * 86400);
  CHECK(hub.get("/v1/devices?certExpiresBefore=" + earlier)["items"].empty());
  // /metrics counts the same from the fleet's counts: one device's k3s
  // certificates expire within 30 days, one clock looks wrong.
  const std::string all_projects =
      flotilla::test::make_token(hub.service(), "api", "scraper", "viewer", "*").secret;
  auto metrics = hub.call("GET", "/metrics", "", "Bearer " + all_projects);
  REQUIRE(metrics.status == 200);
  CHECK(metrics.body.find("\nflotilla_devices_k3s_cert_expiring 1\n") != std::string::npos);
  CHECK(metrics.body.find("\nflotilla_devices_clock_suspect 1\n") != std::string::npos);
  CHECK(metrics.body.find("flotilla_scrape_errors 0") != std::string::npos);
  const json all = hub.get("/v1/devices");
  REQUIRE(all["items"].size() == 2);
  for (const auto& d : all["items"]) {
    if (d["id"] == other) {
      CHECK(d["os"] == "");
      CHECK(d["disk_total_bytes"] == 0);
    } else {
      check_seen(d);
    }
  }
}

// [unit] The control log (docs/adr/0016): hubs with their own SQLite stores
// sharing control data through one coordinator — here the embedded SQLite
// coordinator file, used as the shared log; the integration tier runs the
// same on a real 3-member etcd with real hub processes
// (tests/integration/hub_control_etcd_test.cpp).
// The session API, for an entry written by a store of another layout.
#define SQLITE_ENABLE_SESSION 1
#define SQLITE_ENABLE_PREUPDATE_HOOK 1
#include <sqlite3.h>

#include <catch2/catch.hpp>

#include <algorithm>
#include <filesystem>
#include <atomic>
#include <fstream>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "flotilla/bundles/bundle.hpp"
#include "flotilla/bundles/keys.hpp"
#include "flotilla/common/clock.hpp"
#include "flotilla/common/crypto.hpp"
#include "flotilla/hub/api.hpp"
#include "flotilla/hub/campaign_board.hpp"
#include "flotilla/hub/control_log.hpp"
#include "flotilla/hub/coord.hpp"
#include "flotilla/hub/device_ca.hpp"
#include "flotilla/hub/service.hpp"
#include "flotilla/hub/store.hpp"
#include "flotilla/v1/desired.pb.h"
#include "flotilla/v1/enroll.pb.h"
#include "tests/support/hub_fixtures.hpp"
#include "tests/support/hub_test_support.hpp"
#include "tests/support/store_helpers.hpp"
#include "tests/support/temp_dir.hpp"

namespace {

using namespace flotilla;
using namespace flotilla::hub;
namespace co = flotilla::hub::coord;
using nlohmann::json;
using test::body_of;
using test::RecordingTransport;
using test::TempDir;

// A watch that breaks, as etcd's stream does, while its coordinator is down.
class SwitchableWatch final : public co::Watch {
 public:
  SwitchableWatch(std::unique_ptr<co::Watch> inner, const std::atomic<bool>& down)
      : inner_(std::move(inner)), down_(down) {}
  Result<std::vector<co::WatchEvent>> next(std::chrono::milliseconds wait) override {
    if (down_) return broken();
    auto events = inner_->next(wait);
    // Down during the wait: what arrived is lost with the stream (the
    // follower starts a new watch from what it applied).
    if (down_) return broken();
    return events;
  }
  int64_t last_revision() const override { return inner_->last_revision(); }
  int64_t compacted_at() const override { return inner_->compacted_at(); }

 private:
  static Error broken() {
    return make_error(Errc::coordination_unavailable, "etcd unreachable: the watch stream broke", true);
  }
  std::unique_ptr<co::Watch> inner_;
  const std::atomic<bool>& down_;
};

// The shared coordinator, which a test can make unreachable the way etcd is
// when no member answers (the etcd backend's own error is tested against a
// stopped cluster in the integration tier).
class SwitchableCoordinator final : public co::Coordinator {
 public:
  explicit SwitchableCoordinator(co::Coordinator& inner) : inner_(inner) {}
  std::atomic<bool> down{false};
  std::string_view backend() const override { return inner_.backend(); }
  Result<co::Lease> grant_lease(std::chrono::seconds ttl) override {
    if (down) return gone();
    return inner_.grant_lease(ttl);
  }
  Result<std::chrono::seconds> keep_alive(co::LeaseId id) override {
    if (down) return gone();
    return inner_.keep_alive(id);
  }
  Result<std::chrono::seconds> lease_ttl(co::LeaseId id) override {
    if (down) return gone();
    return inner_.lease_ttl(id);
  }
  Status revoke_lease(co::LeaseId id) override {
    if (down) return gone();
    return inner_.revoke_lease(id);
  }
  Result<std::optional<co::KeyValue>> get(const std::string& key) override {
    if (down) return gone();
    return inner_.get(key);
  }
  Result<co::RangeResult> range(const std::string& prefix, size_t limit) override {
    if (down) return gone();
    return inner_.range(prefix, limit);
  }
  Result<co::TxnResult> txn(const std::vector<co::Compare>& c, const std::vector<co::Op>& ops) override {
    if (down) return gone();
    // A slow etcd: the transaction waits while `hold` is set (the control
    // write that sent it keeps the store's writer the whole time).
    if (hold) {
      ++held;
      while (hold) std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    return inner_.txn(c, ops);
  }
  std::atomic<bool> hold{false};
  std::atomic<int> held{0};
  Result<std::unique_ptr<co::Watch>> watch(const std::string& prefix, int64_t from) override {
    if (down) return gone();
    auto w = inner_.watch(prefix, from);
    if (!w) return w.error();
    return std::unique_ptr<co::Watch>(new SwitchableWatch(std::move(*w), down));
  }

 private:
  static Error gone() {
    return make_error(Errc::coordination_unavailable,
                      "etcd unreachable: no member answered (tried http://127.0.0.1:1, http://127.0.0.1:2)", true);
  }
  co::Coordinator& inner_;
};

ControlLogOptions test_options() {
  ControlLogOptions o;
  o.unreachable_hold = std::chrono::milliseconds(0);  // tests switch the coordinator back at once
  return o;
}

// A hub of these tests: no engine thread; on the control log of c (none: a
// one-hub install).
ServiceConfig service_config(co::Coordinator* c, ControlLogOptions opts = test_options()) {
  ServiceConfig cfg;
  cfg.broker_url = "tcp://127.0.0.1:1883";
  cfg.public_url = "http://hub.test:8080";
  cfg.engine_thread = false;
  cfg.control_coordinator = c;
  cfg.control_log = std::move(opts);
  return cfg;
}

// One hub process: its own SQLite store, the shared coordinator.
class Hub {
 public:
  // db: an existing store file (default: a new one of its own).
  Hub(co::Coordinator& c, FakeClock& clock, bool make_root, ControlLogOptions opts = test_options(),
      const std::string& db = "")
      : clock_(clock) {
    auto s = Store::open(db.empty() ? (dir_.path() / "hub.db").string() : db);
    REQUIRE(s);
    store_ = std::move(*s);
    service_ = std::make_unique<HubService>(*store_, clock, service_config(&c, std::move(opts)));
    REQUIRE(service_->control_log_status());
    REQUIRE(service_->control_log());
    api_ = std::make_unique<Api>(*service_);
    REQUIRE(service_->attach_transport(transport_));
    if (make_root) root = test::make_token(*service_, "api", "root", "admin").secret;
  }
  ~Hub() { service_->stop(); }

  HttpResponse call(const std::string& method, const std::string& target, const std::string& body,
                    const std::string& token) {
    return api_->handle(test::api_request(method, target, body, token));
  }
  // The same, with one extra request header.
  HttpResponse call(const std::string& method, const std::string& target, const std::string& token,
                    const std::string& header, const std::string& value) {
    auto req = test::api_request(method, target, "", token);
    req.headers[header] = value;
    return api_->handle(req);
  }
  void catch_up() { REQUIRE(log().catch_up()); }
  ControlLog& log() { return *service_->control_log(); }
  HubService& service() { return *service_; }
  Store& store() { return *store_; }

  int64_t count(const std::string& table) {
    auto st = store_->db().prepare("SELECT COUNT(*) FROM " + table);
    REQUIRE(st);
    auto r = st->step();
    REQUIRE(r);
    const int64_t n = st->col_int(0);
    st->reset();
    return n;
  }
  std::vector<std::string> audit_trail() {
    auto rows = store_->list_audit(0, 10000, "*");
    REQUIRE(rows);
    std::vector<std::string> out;
    for (const auto& a : *rows) out.push_back(std::to_string(a.id) + " " + a.method + " " + a.path + " " + a.detail);
    return out;
  }

  std::string upload_bundle(const std::string& token, const std::string& name) {
    auto r = post_bundle(token, name, "kind: ConfigMap\n");
    INFO(r.body);
    REQUIRE(r.status == 201);
    return body_of(r)["id"].get<std::string>();
  }
  // An operator token of project default, made through the API by root.
  std::string make_operator() {
    auto made = call("POST", "/v1/tokens",
                     json{{"name", "ops"}, {"role", "operator"}, {"project", "default"}}.dump(), root);
    INFO(made.body);
    REQUIRE(made.status == 201);
    return body_of(made)["token"].get<std::string>();
  }
  // A campaign of `bundle` for `selector` through the API; returns its id.
  std::string create_campaign(const std::string& token, const std::string& bundle, const std::string& selector) {
    auto camp = call("POST", "/v1/campaigns", json{{"bundle", bundle}, {"selector", selector}}.dump(), token);
    INFO(camp.body);
    REQUIRE(camp.status == 201);
    return body_of(camp)["id"].get<std::string>();
  }
  HttpResponse post_bundle(const std::string& token, const std::string& name, const std::string& content) {
    const auto env = test::signed_bundle(clock_.now_unix(), name, 1, content, {&signing_key_});
    return call("POST", "/v1/bundles", bundles::serialize_envelope(env), token);
  }

  // Enrolls a device through the API (the group commit path); returns its id.
  std::string enroll_device(const std::string& enroll_secret) {
    const auto req = test::enroll_request(enroll_secret, bundles::generate_key(), {{"site", "north"}});
    auto r = call("POST", "/v1/enroll", req.SerializeAsString(), "");
    INFO(r.body);
    REQUIRE(r.status == 200);
    v1::EnrollResponse resp;
    REQUIRE(resp.ParseFromString(r.body));
    return resp.device_id();
  }

  std::string root;

 private:
  FakeClock& clock_;
  TempDir dir_{"control-log"};
  std::unique_ptr<Store> store_;
  std::unique_ptr<HubService> service_;
  std::unique_ptr<Api> api_;
  RecordingTransport transport_;
  bundles::KeyPair signing_key_ = bundles::generate_key();
};

struct Shared {
  TempDir dir{"control-coord"};
  FakeClock clock;
  std::unique_ptr<co::Coordinator> sqlite;
  std::unique_ptr<SwitchableCoordinator> coord;
  // history: the revisions the coordinator keeps for watches (etcd's
  // compaction, in small).
  explicit Shared(int64_t history = 100000) {
    auto c = co::open_sqlite_coordinator({(dir.path() / "coord.db").string(), history}, clock);
    REQUIRE(c);
    sqlite = std::move(*c);
    coord = std::make_unique<SwitchableCoordinator>(*sqlite);
  }
  int64_t head_revision() {
    auto h = sqlite->get("/flotilla/control/head");
    REQUIRE(h);
    return *h ? (*h)->mod_revision : 0;
  }
};

TokenRecord token_rec(const std::string& name, const std::string& role, std::vector<std::string> device_keys = {}) {
  TokenRecord t;
  t.name = name;
  t.role = role;
  t.project = "default";
  t.device_label_keys = std::move(device_keys);
  return t;
}

using test::ids_of;

// A one-hub install's store (no control log): an admin token and an
// enrolled device, as `flotilla-hub` with coordination sqlite leaves them.
struct OneHubStore {
  std::string path, admin, device;
};
OneHubStore make_one_hub_store(const std::filesystem::path& dir, FakeClock& clock) {
  OneHubStore out{(dir / "hub.db").string(), "", ""};
  auto st = Store::open(out.path);
  REQUIRE(st);
  HubService svc(**st, clock, service_config(nullptr));
  RecordingTransport transport;
  REQUIRE(svc.attach_transport(transport));
  Api api(svc);
  out.admin = test::make_token(svc, "api", "root", "admin").secret;
  TokenRecord enroll;
  enroll.name = "enroll";
  enroll.role = "enroll";
  enroll.project = "default";
  enroll.device_label_keys = {"site"};
  auto enr = svc.create_token("enroll", enroll);
  REQUIRE(enr);
  const auto req = test::enroll_request(enr->secret, bundles::generate_key(), {{"site", "north"}});
  auto r = api.handle(test::api_request("POST", "/v1/enroll", req.SerializeAsString(), ""));
  REQUIRE(r.status == 200);
  v1::EnrollResponse resp;
  REQUIRE(resp.ParseFromString(r.body));
  out.device = resp.device_id();
  svc.stop();
  return out;
}

// Snapshots are taken by hand in these tests (snapshot()), never by the watcher.
ControlLogOptions snapshot_options(int64_t keep) {
  auto o = test_options();
  o.snapshot_every = 0;
  o.keep_entries = keep;
  o.snapshot_chunk_bytes = 4096;  // several chunks even for a small store
  return o;
}

std::string entry_key(int64_t seq) {
  char key[64];
  std::snprintf(key, sizeof key, "/flotilla/control/log/%020lld", static_cast<long long>(seq));
  return key;
}

// The control data as a hub serves it: tokens (with their revocation), the
// audit trail, devices' control columns, bundles and campaigns.
std::vector<std::string> control_rows(Store& store) {
  std::vector<std::string> out;
  for (const char* q : {"SELECT id || ' ' || name || ' ' || revoked FROM tokens ORDER BY id",
                        "SELECT id || ' ' || method || ' ' || path || ' ' || detail FROM audit_log ORDER BY id",
                        "SELECT id || ' ' || project || ' ' || labels || ' ' || public_key || ' ' || cell FROM devices "
                        "ORDER BY id",
                        "SELECT id || ' ' || digest FROM bundles ORDER BY id",
                        "SELECT id || ' ' || state FROM campaigns ORDER BY id"}) {
    auto rows = sql::query<std::string>(store.db(), q, [](const sql::Stmt& st) { return st.col_text(0); });
    REQUIRE(rows);
    out.insert(out.end(), rows->begin(), rows->end());
  }
  return out;
}

}  // namespace

TEST_CASE("control log: what one hub writes, another hub reads, in the same order", "[unit][control]") {
  Shared sh;
  Hub a(*sh.coord, sh.clock, true);
  Hub b(*sh.coord, sh.clock, false);  // caught up at start: A's admin token works on B

  // An API token made on A authenticates on B.
  auto made = a.call("POST", "/v1/tokens", json{{"name", "ops"}, {"role", "operator"}, {"project", "default"}}.dump(),
                     a.root);
  INFO(made.body);
  REQUIRE(made.status == 201);
  const std::string ops = body_of(made)["token"].get<std::string>();
  b.catch_up();
  CHECK(b.call("GET", "/v1/bundles", "", ops).status == 200);
  CHECK(b.call("GET", "/v1/bundles", "", "flt_api_not-a-token").status == 401);

  // A bundle uploaded on A is listed and fetched on B.
  const std::string bundle = a.upload_bundle(ops, "edge-base");
  b.catch_up();
  auto listed = b.call("GET", "/v1/bundles", "", ops);
  REQUIRE(listed.status == 200);
  CHECK(ids_of(body_of(listed)["items"]).count(bundle) == 1);
  CHECK(b.call("GET", "/v1/bundles/" + bundle, "", ops).status == 200);

  // A device enrolled on A (group commit: one log entry for the group) and
  // a campaign created on A are on B.
  auto enr = a.service().create_token("enroll", token_rec("enroll", "enroll", {"site"}));
  REQUIRE(enr);
  const std::string device = a.enroll_device(enr->secret);
  auto camp = a.call("POST", "/v1/campaigns", json{{"bundle", bundle}, {"selector", "site=north"}}.dump(), ops);
  INFO(camp.body);
  REQUIRE(camp.status == 201);
  const std::string campaign = body_of(camp)["id"].get<std::string>();
  b.catch_up();
  auto dev = b.service().get_device(device);
  REQUIRE(dev);
  REQUIRE(*dev);
  CHECK((*dev)->labels.at("site") == "north");
  auto campaigns = b.call("GET", "/v1/campaigns", "", ops);
  REQUIRE(campaigns.status == 200);
  CHECK(ids_of(body_of(campaigns)["items"]).count(campaign) == 1);

  // B writes too; the audit rows of both are on both, in the same order.
  auto b_tok = b.call("POST", "/v1/tokens", json{{"name", "viewer-b"}, {"role", "viewer"}, {"project", "default"}}.dump(),
                      a.root);
  REQUIRE(b_tok.status == 201);
  a.catch_up();
  b.catch_up();
  CHECK(a.audit_trail().size() >= 4);
  CHECK(a.audit_trail() == b.audit_trail());
  CHECK(a.log().applied_revision() == b.log().applied_revision());

  // The watcher alone brings B up to date: no catch_up() called here.
  auto more = a.call("POST", "/v1/tokens", json{{"name", "late"}, {"role", "viewer"}, {"project", "default"}}.dump(),
                     a.root);
  REQUIRE(more.status == 201);
  REQUIRE(b.log().wait_applied(a.log().applied_revision(), std::chrono::seconds(20)));
  CHECK(b.call("GET", "/v1/bundles", "", body_of(more)["token"].get<std::string>()).status == 200);

  // A hub started later catches up from the log: everything is there.
  Hub c(*sh.coord, sh.clock, false);
  CHECK(c.log().applied_revision() == a.log().applied_revision());
  CHECK(c.audit_trail() == a.audit_trail());
  CHECK(c.count("tokens") == a.count("tokens"));
  CHECK(c.call("GET", "/v1/bundles/" + bundle, "", ops).status == 200);
  // What no hub writes through the log stays each hub's own.
  CHECK(c.count("campaign_devices") == 0);
  CHECK(a.count("campaign_devices") == 1);
}

TEST_CASE("control log: what a hub releases to its devices stays in its own store, out of the log",
          "[unit][control]") {
  Shared sh;
  Hub a(*sh.coord, sh.clock, true);
  Hub b(*sh.coord, sh.clock, false);
  const std::string ops = a.make_operator();
  const std::string bundle = a.upload_bundle(ops, "edge-base");
  auto enr = a.service().create_token("enroll", token_rec("enroll", "enroll", {"site"}));
  REQUIRE(enr);
  std::vector<std::string> devices;
  for (int i = 0; i < 3; ++i) devices.push_back(a.enroll_device(enr->secret));
  const std::string campaign = a.create_campaign(ops, bundle, "site=north");
  a.service().tick();
  // The tick is a control write (its wave state is control data), and it
  // released every device: A's store says so.
  auto generation = [](Hub& h, const std::string& id) {
    auto d = h.service().get_device(id);
    REQUIRE(d);
    REQUIRE(*d);
    return std::make_pair((*d)->generation, (*d)->campaign_id);
  };
  for (const auto& id : devices) CHECK(generation(a, id) == std::make_pair(uint64_t{1}, campaign));
  // B follows the log up to and past the tick; what A released is A's own.
  // (It once travelled with the tick's entry: B's rows took A's generation,
  // and each released device added about 123 bytes to the entry.)
  b.catch_up();
  CHECK(b.log().applied_revision() == a.log().applied_revision());
  for (const auto& id : devices) CHECK(generation(b, id) == std::make_pair(uint64_t{0}, std::string()));
  // The control data of the tick did reach B.
  auto seen = b.call("GET", "/v1/campaigns/" + campaign, "", ops);
  REQUIRE(seen.status == 200);
  CHECK(body_of(seen)["state"] == body_of(a.call("GET", "/v1/campaigns/" + campaign, "", ops))["state"]);
}

TEST_CASE("control log: writes from two hubs are both kept and the one that lost the race ran again",
          "[unit][control]") {
  Shared sh;
  Hub a(*sh.coord, sh.clock, true);
  Hub b(*sh.coord, sh.clock, false);
  // B does not follow the log for a moment: its next write is based on an
  // old head and must lose the compare, catch up and run again.
  b.log().stop();
  auto t1 = a.service().create_token("api", token_rec("from-a", "viewer"));
  REQUIRE(t1);
  const auto retries_before = b.log().counters().retries;
  auto t2 = b.service().create_token("api", token_rec("from-b", "viewer"));
  REQUIRE(t2);
  CHECK(b.log().counters().retries == retries_before + 1);
  auto metrics = b.call("GET", "/metrics", "", a.root);
  REQUIRE(metrics.status == 200);
  CHECK(metrics.body.find("\nflotilla_control_write_retries_total " + std::to_string(retries_before + 1) + "\n") !=
        std::string::npos);
  CHECK(metrics.body.find("\nflotilla_control_log_revision " + std::to_string(b.log().applied_revision()) + "\n") !=
        std::string::npos);
  a.catch_up();
  CHECK(a.count("tokens") == 3);
  CHECK(b.count("tokens") == 3);

  // Truly concurrent writers on both hubs: every write is kept, on both.
  b.log().start();
  constexpr int kEach = 15;
  // A write that lost the race every time it ran answers conflict (409):
  // nothing of it was written and the caller tries again, as a client would.
  // (Catch2 asserts on this thread only: the writers report their errors.)
  std::atomic<int> conflicts{0};
  auto writer = [&conflicts](Hub& h, const std::string& who, std::string* error) {
    for (int i = 0; i < kEach; ++i) {
      for (int attempt = 0;; ++attempt) {
        auto t = h.service().create_token("api", token_rec(who + std::to_string(i), "viewer"));
        if (t) break;
        if (t.error().code != Errc::conflict || attempt > 20) {
          *error = t.error().message;
          return;
        }
        ++conflicts;
      }
    }
  };
  std::string error_a, error_b;
  std::thread ta([&] { writer(a, "a", &error_a); });
  std::thread tb([&] { writer(b, "b", &error_b); });
  ta.join();
  tb.join();
  CHECK(error_a.empty());
  CHECK(error_b.empty());
  a.catch_up();
  b.catch_up();
  CHECK(a.count("tokens") == 3 + 2 * kEach);
  CHECK(b.count("tokens") == 3 + 2 * kEach);
  CHECK(a.log().applied_seq() == b.log().applied_seq());
  CHECK(a.log().counters().refused_conflict + b.log().counters().refused_conflict == uint64_t(conflicts.load()));
}

TEST_CASE("control log: with the coordinator unreachable a control write is refused and nothing is written",
          "[unit][control]") {
  Shared sh;
  Hub a(*sh.coord, sh.clock, true);
  const int64_t head = sh.head_revision();
  const int64_t tokens = a.count("tokens"), audit = a.count("audit_log"), bundles_n = a.count("bundles");
  sh.coord->down = true;

  auto r = a.call("POST", "/v1/tokens", json{{"name", "x"}, {"role", "viewer"}, {"project", "default"}}.dump(), a.root);
  CHECK(r.status == 503);
  CHECK(r.body.find("etcd") != std::string::npos);
  CHECK(r.body.find("127.0.0.1:1") != std::string::npos);  // the members tried
  auto direct = a.service().create_token("api", token_rec("y", "viewer"));
  REQUIRE_FALSE(direct);
  CHECK(direct.error().code == Errc::coordination_unavailable);
  auto up = a.service().upload_bundle("not a bundle");
  CHECK_FALSE(up);  // refused for what it is, before the log is asked
  // Reads keep working from the mirror.
  CHECK(a.call("GET", "/v1/tokens", "", a.root).status == 200);
  // Nothing in A's SQLite (not even the refused calls' audit rows), nothing in the log.
  CHECK(a.count("tokens") == tokens);
  CHECK(a.count("audit_log") == audit);
  CHECK(a.count("bundles") == bundles_n);
  CHECK(sh.head_revision() == head);
  CHECK(a.log().counters().refused_unavailable >= 2);
  auto metrics = a.call("GET", "/metrics", "", a.root);
  REQUIRE(metrics.status == 200);
  CHECK(metrics.body.find("flotilla_control_writes_refused_total{reason=\"unavailable\"} ") != std::string::npos);

  // The coordinator is back: writes work again, nothing to restart.
  sh.coord->down = false;
  auto again = a.call("POST", "/v1/tokens", json{{"name", "x"}, {"role", "viewer"}, {"project", "default"}}.dump(),
                      a.root);
  CHECK(again.status == 201);
  CHECK(a.count("tokens") == tokens + 1);
  CHECK(sh.head_revision() > head);
}

// Read-your-writes across hubs (docs/operations.md, "Several hub processes"): a
// write's answer says the log revision it made; a read sent to another hub
// with that revision waits for that hub's mirror instead of answering from
// an older store.
TEST_CASE("control log: a read asking for the revision of a write waits for it on another hub, or is refused",
          "[unit][control]") {
  Shared sh;
  SwitchableCoordinator b_link(*sh.sqlite);  // B's own way to the shared log
  Hub a(*sh.coord, sh.clock, true);
  Hub b(b_link, sh.clock, false);
  auto listed = a.call("GET", "/v1/tokens", "", a.root);
  REQUIRE(listed.headers.count("X-Flotilla-Revision") == 1);
  CHECK(listed.headers.at("X-Flotilla-Revision") == std::to_string(a.log().applied_revision()));

  b_link.down = true;  // B cannot follow the log for now
  auto made = a.post_bundle(a.root, "edge-base", "kind: ConfigMap\n");
  INFO(made.body);
  REQUIRE(made.status == 201);
  const std::string rev = made.headers.at("X-Flotilla-Revision");
  CHECK(std::stoll(rev) == sh.head_revision());  // the write's own revision
  const std::string path = "/v1/bundles/" + body_of(made)["id"].get<std::string>();
  CHECK(b.call("GET", path, "", a.root).status == 404);  // B alone is behind

  // Behind for longer than the wait: 503 naming both revisions; B unchanged.
  const int64_t b_bundles = b.count("bundles");
  auto late = b.call("GET", path, a.root, "x-flotilla-min-revision", rev);
  CHECK(late.status == 503);
  CHECK(late.headers.count("Retry-After") == 1);
  CHECK(late.body.find("not yet " + rev) != std::string::npos);
  CHECK(b.count("bundles") == b_bundles);

  // Not a revision: 400, nothing waited for.
  for (const std::string bad : {"", "-1", "12abc", "99999999999999999999", "1.5"}) {
    INFO(bad);
    auto r = b.call("GET", path, a.root, "x-flotilla-min-revision", bad);
    CHECK(r.status == 400);
    CHECK(r.body.find("X-Flotilla-Min-Revision") != std::string::npos);
  }

  // B's link comes back while the read waits: it answers from the new store.
  std::thread heal([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    b_link.down = false;
  });
  auto fresh = b.call("GET", path, a.root, "x-flotilla-min-revision", rev);
  heal.join();
  INFO(fresh.body);
  CHECK(fresh.status == 200);
  CHECK(std::stoll(fresh.headers.at("X-Flotilla-Revision")) >= std::stoll(rev));
  // Already there: answered at once, and an old revision is no reason to wait.
  CHECK(b.call("GET", path, a.root, "x-flotilla-min-revision", "1").status == 200);
}

// The API's reads (authentication, device pages and single devices,
// campaigns, bundles, tokens, audit) go to read connections: a control write
// holding the store's writer (here: waiting on a slow etcd) does not hold
// them up, and they see what was committed before it and nothing of it.
TEST_CASE("control log: API reads answer while a control write holds the store's writer", "[unit][control]") {
  Shared sh;
  Hub a(*sh.coord, sh.clock, true);
  auto enr = a.service().create_token("enroll", token_rec("enroll", "enroll", {"site"}));
  REQUIRE(enr);
  const std::string device = a.enroll_device(enr->secret);
  const std::string bundle = a.upload_bundle(a.root, "reads");
  auto created = a.call("POST", "/v1/campaigns", json{{"name", "reads"}, {"bundle", bundle}, {"selector", "site=north"}}.dump(),
                        a.root);
  INFO(created.body);
  REQUIRE(created.status == 201);
  const std::string campaign = body_of(created)["id"].get<std::string>();

  sh.coord->hold = true;
  struct Release {
    Shared& sh;
    ~Release() { sh.coord->hold = false; }
  };
  std::optional<HttpResponse> slow;
  std::atomic<bool> answered{false};
  std::thread writer([&] {
    slow = a.call("POST", "/v1/tokens", json{{"name", "slow"}, {"role", "viewer"}, {"project", "default"}}.dump(),
                  a.root);
    answered = true;
  });
  {
    Release release{sh};
    for (int i = 0; i < 5000 && sh.coord->held == 0; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    REQUIRE(sh.coord->held == 1);  // the write is inside its etcd transaction, the writer held

    auto page = a.call("GET", "/v1/devices?limit=10", "", a.root);
    INFO(page.body);
    REQUIRE(page.status == 200);
    REQUIRE(body_of(page)["items"].size() == 1);
    CHECK(body_of(page)["items"][0]["id"] == device);
    auto labelled = a.call("GET", "/v1/devices?selector=site%3Dnorth", "", a.root);
    CHECK(body_of(labelled)["items"].size() == 1);
    CHECK(a.call("GET", "/v1/devices", "", "flt_api_not-a-token").status == 401);
    auto one = a.call("GET", "/v1/devices/" + device, "", a.root);
    INFO(one.body);
    CHECK(one.status == 200);
    CHECK(body_of(one)["id"] == device);

    auto view = a.call("GET", "/v1/campaigns/" + campaign, "", a.root);
    INFO(view.body);
    REQUIRE(view.status == 200);
    CHECK(body_of(view)["counts"]["total"] == 1);
    CHECK(body_of(view)["bundle"]["id"] == bundle);
    auto campaigns = a.call("GET", "/v1/campaigns", "", a.root);
    REQUIRE(campaigns.status == 200);
    CHECK(ids_of(body_of(campaigns)["items"]) == std::set<std::string>{campaign});
    auto bundles = a.call("GET", "/v1/bundles", "", a.root);
    REQUIRE(bundles.status == 200);
    CHECK(ids_of(body_of(bundles)["items"]) == std::set<std::string>{bundle});
    CHECK(a.call("GET", "/v1/bundles/" + bundle, "", a.root).status == 200);
    // The token being written is not there yet: nothing uncommitted is read.
    auto tokens = a.call("GET", "/v1/tokens", "", a.root);
    INFO(tokens.body);
    REQUIRE(tokens.status == 200);
    const json listed = body_of(tokens);
    std::vector<std::string> names;
    for (const auto& t : listed["items"]) names.push_back(t["name"].get<std::string>());
    CHECK(std::find(names.begin(), names.end(), "root") != names.end());
    CHECK(std::find(names.begin(), names.end(), "slow") == names.end());
    auto audit = a.call("GET", "/v1/audit", "", a.root);
    REQUIRE(audit.status == 200);
    CHECK_FALSE(body_of(audit)["items"].empty());
    CHECK_FALSE(answered);  // still waiting: the reads did not queue behind it
  }
  writer.join();
  REQUIRE(slow);
  CHECK(slow->status == 201);
}

// A campaign leader's decisions are fenced by the leader key (ADR 17): a
// leader deposed meanwhile (its lease gone, another hub leading) has its
// write refused, not serialised after its successor's.
TEST_CASE("control log: a write guarded by the leader key goes through while it leads and is refused once another "
          "hub leads, writing nothing",
          "[unit][control]") {
  Shared sh;
  Hub a(*sh.coord, sh.clock, true);
  Hub b(*sh.coord, sh.clock, false);
  auto token_write = [&](Hub& h, const std::string& id) {
    return [&h, id]() -> Status {
      TokenRecord t = token_rec(id, "viewer");
      t.id = id;
      return h.store().insert_token("api", t, crypto::sha256_hex(id));
    };
  };
  Leadership first(*sh.coord, "hub-a", std::chrono::seconds(10), sh.clock);
  REQUIRE(first.tick().value_or(false));
  const auto guard = first.guard();
  REQUIRE(guard.size() == 2);
  const int64_t tokens = a.count("tokens");
  CHECK(a.log().write(token_write(a, "tok-led"), guard));
  CHECK(a.count("tokens") == tokens + 1);
  // Another hub wrote first (the head moved) while A still leads: A catches
  // up and writes, as any control write does.
  REQUIRE(b.log().write(token_write(b, "tok-other")));
  CHECK(a.log().write(token_write(a, "tok-after"), guard));
  CHECK(a.count("tokens") == tokens + 3);

  // A is deposed: its lease is gone and B leads now.
  REQUIRE(first.resign());
  Leadership second(*sh.coord, "hub-b", std::chrono::seconds(10), sh.clock);
  REQUIRE(second.tick().value_or(false));
  CHECK(first.guard().empty());
  const int64_t head = sh.head_revision();
  auto late = a.log().write(token_write(a, "tok-late"), guard);
  REQUIRE_FALSE(late);
  CHECK(late.error().code == Errc::refused);
  CHECK_THAT(late.error().message, Catch::Contains("/flotilla/leader is no longer as this hub holds it"));
  CHECK(a.count("tokens") == tokens + 3);  // nothing here
  CHECK(sh.head_revision() == head);       // nothing in the log
  b.catch_up();
  CHECK(b.count("tokens") == tokens + 3);
  CHECK(a.log().counters().refused_guard == 1);
  auto metrics = a.call("GET", "/metrics", "", a.root);
  CHECK(metrics.body.find("flotilla_control_writes_refused_total{reason=\"deposed\"} 1") != std::string::npos);
  // The new leader's guard holds.
  CHECK(b.log().write(token_write(b, "tok-new-leader"), second.guard()));
}

// Hubs sharing control data must sign with one director key and issue from
// one device CA: a hub started with another is refused, naming both, and
// writes nothing.
TEST_CASE("control log: a hub whose director key or device CA is not the other hubs' does not start and writes "
          "nothing",
          "[unit][control]") {
  Shared sh;
  auto start_on = [](Shared& on, const std::optional<bundles::KeyPair>& key, const DeviceCa* ca) {
    TempDir dir("identity");
    auto store = Store::open((dir.path() / "hub.db").string());
    if (!store) return Status(store.error());
    ServiceConfig cfg = service_config(on.coord.get());
    cfg.director_key = key;
    cfg.device_ca = ca;
    HubService svc(**store, on.clock, cfg);
    Status st = svc.control_log_status();
    svc.stop();
    return st;
  };
  auto start = [&](const std::optional<bundles::KeyPair>& key, const DeviceCa* ca) { return start_on(sh, key, ca); };
  const auto key = bundles::generate_key(), other_key = bundles::generate_key();
  auto ca = DeviceCa::ephemeral(sh.clock.now_unix());
  auto other_ca = DeviceCa::ephemeral(sh.clock.now_unix());
  REQUIRE(ca);
  REQUIRE(other_ca);
  REQUIRE(start(key, ca->get()));  // the first records both
  auto identity = sh.sqlite->get("/flotilla/identity");
  REQUIRE(identity);
  REQUIRE(*identity);
  const int64_t recorded = (*identity)->mod_revision;
  const int64_t head = sh.head_revision();

  auto wrong_key = start(other_key, ca->get());
  REQUIRE_FALSE(wrong_key);
  CHECK_THAT(wrong_key.error().message, Catch::Contains("this hub's director key is " + other_key.pub.key_id) &&
                                            Catch::Contains(key.pub.key_id) && Catch::Contains("--director-key"));
  auto wrong_ca = start(key, other_ca->get());
  REQUIRE_FALSE(wrong_ca);
  CHECK_THAT(wrong_ca.error().message, Catch::Contains("device CA") && Catch::Contains("--device-ca-cert"));
  // Refused hubs changed nothing: not the record, not the log.
  identity = sh.sqlite->get("/flotilla/identity");
  REQUIRE(identity);
  CHECK((*identity)->mod_revision == recorded);
  CHECK(sh.head_revision() == head);
  // The same key and CA: it starts. A hub without a configured key (an
  // embedder's ephemeral one) is not compared on it.
  CHECK(start(key, ca->get()));
  CHECK(start(std::nullopt, ca->get()));

  // Hubs started at the same moment (systemd at boot) with the same key and
  // CA all start, whichever records them first.
  Shared fresh;
  std::vector<Status> started(4);
  {
    std::vector<std::thread> threads;
    for (auto& st : started) threads.emplace_back([&] { st = start_on(fresh, key, ca->get()); });
    for (auto& t : threads) t.join();
  }
  for (const auto& st : started) CHECK(st);
}

TEST_CASE("control log: a control table written outside a control write is refused by the store", "[unit][control]") {
  Shared sh;
  Hub a(*sh.coord, sh.clock, true);
  const int64_t tokens = a.count("tokens");
  TokenRecord t;
  t.id = "tok-bypass";
  t.name = "bypass";
  t.role = "admin";
  t.project = "*";
  auto s = a.store().insert_token("api", t, crypto::sha256_hex("secret"));
  REQUIRE_FALSE(s);
  CHECK(s.error().message.find("outside a control write") != std::string::npos);
  CHECK(a.count("tokens") == tokens);
  // Report columns of a device row are not control data: they stay writable.
  auto enr = a.service().create_token("enroll", token_rec("enroll", "enroll", {"site"}));
  REQUIRE(enr);
  const std::string device = a.enroll_device(enr->secret);
  auto dev = a.store().get_device(device);
  REQUIRE(dev);
  REQUIRE(*dev);
  DeviceRecord d = **dev;
  d.online = true;
  d.state = "applied";
  CHECK(a.store().save_device_state(d));
  // Its labels are, and so is a decommission: the state that follows one
  // is refused on a row whose directory column does not say so.
  CHECK_FALSE(a.store().set_device_labels(device, {{"site", "south"}}));
  CHECK_FALSE(a.store().db().exec("UPDATE devices SET state = 'decommissioned' WHERE id = '" + device + "'"));
  CHECK(a.store().get_device(device).value()->state == "applied");
}

namespace {

// Puts `value` in the log as its next entry, behind the hubs' backs, and has
// b (its follower stopped) catch up: the entry must stop b's mirror, named
// by its key, with nothing of it applied and not skipped. The refusal.
Error refused_entry(Shared& sh, Hub& a, Hub& b, const std::string& value) {
  const int64_t seq = a.log().applied_seq();
  const int64_t head = sh.head_revision();
  char key[64];
  std::snprintf(key, sizeof key, "/flotilla/control/log/%020lld", static_cast<long long>(seq + 1));
  auto w = sh.sqlite->txn({co::Compare::mod_revision_is("/flotilla/control/head", head)},
                          {co::Op::put(key, value), co::Op::put("/flotilla/control/head", std::to_string(seq + 1))});
  REQUIRE(w);
  REQUIRE(w->succeeded);
  const int64_t tokens = b.count("tokens");
  auto caught = b.log().catch_up();
  REQUIRE_FALSE(caught);
  CHECK(caught.error().message.find(key) != std::string::npos);
  CHECK(b.log().stuck_reason().find("cannot be applied") != std::string::npos);
  CHECK(b.log().counters().apply_failures >= 1);
  CHECK(b.log().applied_seq() == seq);  // not skipped
  CHECK(b.count("tokens") == tokens);
  return caught.error();
}

}  // namespace

TEST_CASE("control log: an entry that cannot be applied is reported and stops the mirror, never skipped",
          "[unit][control]") {
  Shared sh;
  Hub a(*sh.coord, sh.clock, true);
  Hub b(*sh.coord, sh.clock, false);
  b.log().stop();  // driven by hand below
  refused_entry(sh, a, b, "this is not a changeset");
  // Writes on a stuck mirror are refused with the reason.
  auto t = b.service().create_token("api", token_rec("z", "viewer"));
  REQUIRE_FALSE(t);
  CHECK(t.error().message.find("stuck") != std::string::npos);
}

// A hub of another version (a control table with a column more) writes an
// entry; SQLite alone would skip that table's changes and report success.
// The entry stops the mirror with why, and nothing is applied.
TEST_CASE("control log: an entry from a store whose control table has other columns stops the mirror, never skipped",
          "[unit][control]") {
  Shared sh;
  Hub a(*sh.coord, sh.clock, true);
  Hub b(*sh.coord, sh.clock, false);
  b.log().stop();  // driven by hand below
  // The changeset of a token row as a store whose tokens table has one
  // column more than this version's would write it.
  auto ddl = sql::query<std::string>(b.store().db(), "SELECT sql FROM sqlite_master WHERE name = 'tokens'",
                                     [](const sql::Stmt& st) { return st.col_text(0); });
  REQUIRE(ddl);
  REQUIRE(ddl->size() == 1);
  auto columns = sql::query<std::string>(b.store().db(), "SELECT COUNT(*) FROM pragma_table_info('tokens')",
                                         [](const sql::Stmt& st) { return st.col_text(0); });
  REQUIRE(columns);
  std::string changeset;
  {
    sqlite3* other = nullptr;
    REQUIRE(sqlite3_open(":memory:", &other) == SQLITE_OK);
    REQUIRE(sqlite3_exec(other, (ddl->front() + "; ALTER TABLE tokens ADD COLUMN added_later INTEGER").c_str(),
                         nullptr, nullptr, nullptr) == SQLITE_OK);
    sqlite3_session* session = nullptr;
    REQUIRE(sqlite3session_create(other, "main", &session) == SQLITE_OK);
    REQUIRE(sqlite3session_attach(session, "tokens") == SQLITE_OK);
    REQUIRE(sqlite3_exec(other,
                         "INSERT INTO tokens (id, kind, secret_hash, name, role, project, labels, expires_unix, "
                         "max_uses, created_ms, added_later) VALUES ('t-new', 'api', 'h', 'from a newer hub', "
                         "'viewer', 'default', '{}', 0, 0, 1, 7)",
                         nullptr, nullptr, nullptr) == SQLITE_OK);
    int n = 0;
    void* bytes = nullptr;
    REQUIRE(sqlite3session_changeset(session, &n, &bytes) == SQLITE_OK);
    REQUIRE(n > 0);
    changeset.assign(static_cast<const char*>(bytes), static_cast<size_t>(n));
    sqlite3_free(bytes);
    sqlite3session_delete(session);
    sqlite3_close(other);
  }
  const Error why = refused_entry(sh, a, b, changeset);
  CHECK(why.message.find("table tokens as a table of " + std::to_string(std::stoi(columns->front()) + 1) +
                         " columns") != std::string::npos);
  CHECK(why.message.find("another version") != std::string::npos);
}

TEST_CASE("control log: a control write too large for one log entry is refused whole", "[unit][control]") {
  Shared sh;
  Hub a(*sh.coord, sh.clock, true);
  const int64_t head = sh.head_revision();
  const int64_t bundles_n = a.count("bundles");
  // Legal for one hub (bundles may carry 4 MiB inline), not for one entry.
  auto r = a.post_bundle(a.root, "huge", std::string(1200 * 1024, 'x'));
  CHECK(r.status == 413);
  CHECK(r.body.find("entry limit") != std::string::npos);
  CHECK(a.count("bundles") == bundles_n);
  CHECK(a.log().counters().refused_too_large == 1);
  // The refused call's audit row is a small write of its own: it is kept.
  CHECK(sh.head_revision() > head);
  CHECK(a.post_bundle(a.root, "small", "kind: ConfigMap\n").status == 201);
}

TEST_CASE("control log: a snapshot trims the log, and a hub that needs trimmed entries loads it and keeps its own "
          "columns",
          "[unit][control]") {
  Shared sh;
  Hub a(*sh.coord, sh.clock, true, snapshot_options(3));
  Hub b(*sh.coord, sh.clock, false, snapshot_options(3));
  b.log().stop();  // B falls behind; driven by hand below

  // A device enrolled on A; B has it and has seen it report (its own columns).
  auto enr = a.service().create_token("enroll", token_rec("enroll", "enroll", {"site"}));
  REQUIRE(enr);
  const std::string device = a.enroll_device(enr->secret);
  const std::string retired = a.enroll_device(enr->secret);
  b.catch_up();
  REQUIRE(b.store().db().exec("UPDATE devices SET last_message = 'seen by b', online = 1 WHERE id = '" + device + "'"));
  const int64_t b_seq = b.log().applied_seq();

  // A goes on: tokens made and one revoked, the device relabelled.
  std::string revoked_secret, kept_secret, revoked_id;
  for (int i = 0; i < 8; ++i) {
    auto made = a.call("POST", "/v1/tokens",
                       json{{"name", "t" + std::to_string(i)}, {"role", "viewer"}, {"project", "default"}}.dump(), a.root);
    REQUIRE(made.status == 201);
    if (i == 0) {
      revoked_secret = body_of(made)["token"].get<std::string>();
      revoked_id = body_of(made)["id"].get<std::string>();
    }
    kept_secret = body_of(made)["token"].get<std::string>();
  }
  REQUIRE(a.call("DELETE", "/v1/tokens/" + revoked_id, "", a.root).status == 200);
  auto relabel = a.call("PATCH", "/v1/devices/" + device, json{{"labels", {{"site", "south"}}}}.dump(), a.root);
  INFO(relabel.body);
  REQUIRE(relabel.status == 200);
  REQUIRE(a.call("DELETE", "/v1/devices/" + retired, "", a.root).status == 200);

  // No snapshot yet; then one at A's entry, and the log trimmed behind it.
  auto none = a.log().last_snapshot();
  REQUIRE(none);
  CHECK_FALSE(*none);
  const int64_t seq = a.log().applied_seq();
  auto taken = a.log().snapshot();
  REQUIRE(taken);
  CHECK(*taken == seq);
  auto m = a.log().last_snapshot();
  REQUIRE(m);
  REQUIRE(*m);
  CHECK((*m)->seq == seq);
  CHECK((*m)->log_from == seq - 2);  // 3 entries kept
  CHECK((*m)->chunks > 1);
  for (int64_t i = 1; i < seq - 2; ++i) {
    auto gone = sh.sqlite->get(entry_key(i));
    REQUIRE(gone);
    CHECK_FALSE(*gone);
  }
  auto kept = sh.sqlite->get(entry_key(seq - 2));
  REQUIRE(kept);
  CHECK(*kept);
  CHECK(a.log().counters().entries_trimmed == static_cast<uint64_t>(seq - 3));
  // Nothing new since: not written again.
  auto again = a.log().snapshot();
  REQUIRE(again);
  CHECK(*again == 0);

  // B needs entries that are gone: it loads the snapshot.
  REQUIRE(b_seq + 1 < seq - 2);
  b.catch_up();
  CHECK(b.log().applied_seq() == seq);
  CHECK(b.log().counters().snapshots_loaded == 1);
  CHECK(control_rows(b.store()) == control_rows(a.store()));
  CHECK(b.call("GET", "/v1/bundles", "", kept_secret).status == 200);
  CHECK(b.call("GET", "/v1/bundles", "", revoked_secret).status == 401);
  auto dev = b.service().get_device(device);
  REQUIRE(dev);
  REQUIRE(*dev);
  CHECK((*dev)->labels.at("site") == "south");
  // What B saw of the device itself is B's and stays.
  CHECK((*dev)->last_message == "seen by b");
  CHECK((*dev)->online);
  // A decommission follows the snapshot, and the trigger-kept counts match
  // a recount of the loaded rows.
  auto gone = b.service().get_device(retired);
  REQUIRE(gone);
  REQUIRE(*gone);
  CHECK((*gone)->state == "decommissioned");
  auto kept_counts = b.store().fleet_counts();
  auto recount = b.store().recount_fleet();
  REQUIRE(kept_counts);
  REQUIRE(recount);
  std::sort(kept_counts->begin(), kept_counts->end());
  std::sort(recount->begin(), recount->end());
  CHECK(*kept_counts == *recount);

  // And B follows the log from there.
  b.log().start();
  auto late = a.call("POST", "/v1/tokens", json{{"name", "late"}, {"role", "viewer"}, {"project", "default"}}.dump(),
                     a.root);
  REQUIRE(late.status == 201);
  REQUIRE(b.log().wait_applied(a.log().applied_revision(), std::chrono::seconds(20)));
  CHECK(b.call("GET", "/v1/bundles", "", body_of(late)["token"].get<std::string>()).status == 200);

  // A hub started from an empty store starts from the snapshot too.
  Hub c(*sh.coord, sh.clock, false, snapshot_options(3));
  CHECK(c.log().counters().snapshots_loaded == 1);
  CHECK(c.log().applied_seq() == a.log().applied_seq());
  CHECK(control_rows(c.store()) == control_rows(a.store()));
  CHECK(c.audit_trail() == a.audit_trail());
}

TEST_CASE("control log: a hub behind a compacted history reads the entries it missed by key", "[unit][control]") {
  Shared sh(20);  // the coordinator keeps 20 revisions of history
  Hub a(*sh.coord, sh.clock, true);
  Hub b(*sh.coord, sh.clock, false);
  b.log().stop();
  const int64_t b_rev = b.log().applied_revision();
  for (int i = 0; i < 15; ++i) {
    REQUIRE(a.call("POST", "/v1/tokens",
                   json{{"name", "t" + std::to_string(i)}, {"role", "viewer"}, {"project", "default"}}.dump(), a.root)
                .status == 201);
  }
  // The history B would watch from is gone.
  auto w = sh.sqlite->watch("/flotilla/control/log/", b_rev + 1);
  REQUIRE(w);
  (void)(*w)->next(std::chrono::milliseconds(0));
  REQUIRE((*w)->compacted_at() > b_rev + 1);
  b.catch_up();
  CHECK(b.log().stuck_reason().empty());
  CHECK(b.log().applied_seq() == a.log().applied_seq());
  CHECK(b.log().counters().snapshots_loaded == 0);  // every entry was still there
  CHECK(control_rows(b.store()) == control_rows(a.store()));
}

TEST_CASE("control log: a snapshot that does not match its manifest is refused and the store keeps what it had",
          "[unit][control]") {
  Shared sh(20);  // history compacted: a new hub cannot replay the entries from it either
  Hub a(*sh.coord, sh.clock, true, snapshot_options(1));
  for (int i = 0; i < 4; ++i) {
    REQUIRE(a.call("POST", "/v1/tokens",
                   json{{"name", "t" + std::to_string(i)}, {"role", "viewer"}, {"project", "default"}}.dump(), a.root)
                .status == 201);
  }
  REQUIRE(a.log().snapshot());
  auto m = a.log().last_snapshot();
  REQUIRE(m);
  REQUIRE(*m);
  // One chunk altered in the coordinator.
  char chunk[160];
  std::snprintf(chunk, sizeof chunk, "/flotilla/control/snapshots/%s/%06d", (*m)->id.c_str(), 1);
  auto orig = sh.sqlite->get(chunk);
  REQUIRE(orig);
  REQUIRE(*orig);
  std::string bad = (*orig)->value;
  bad[bad.size() / 2] ^= 0x5a;
  REQUIRE(sh.sqlite->put(chunk, bad));

  Hub d(*sh.coord, sh.clock, false, snapshot_options(1));
  CHECK(d.log().stuck_reason().find("does not match its manifest") != std::string::npos);
  CHECK(d.log().applied_seq() == 0);
  CHECK(d.count("tokens") == 0);
  CHECK(d.count("audit_log") == 0);
  auto refused = d.service().create_token("api", token_rec("z", "viewer"));
  REQUIRE_FALSE(refused);
  CHECK(refused.error().message.find("stuck") != std::string::npos);

  // A new snapshot repairs it: D loads that one.
  REQUIRE(a.call("POST", "/v1/tokens", json{{"name", "fix"}, {"role", "viewer"}, {"project", "default"}}.dump(), a.root)
              .status == 201);
  auto retaken = a.log().snapshot();
  REQUIRE(retaken);
  REQUIRE(*retaken > 0);
  REQUIRE(d.log().catch_up());
  CHECK(d.log().stuck_reason().empty());
  CHECK(control_rows(d.store()) == control_rows(a.store()));
}

TEST_CASE("control log: a one-hub store switched to the log seeds it, and a second one is refused with its data kept",
          "[unit][control]") {
  Shared sh;
  TempDir one("one-hub"), other("other-hub");
  const OneHubStore first = make_one_hub_store(one.path(), sh.clock);
  const OneHubStore second = make_one_hub_store(other.path(), sh.clock);

  // A hub from an empty store is already following the (empty) log.
  Hub early(*sh.coord, sh.clock, false, snapshot_options(3));
  CHECK(early.log().applied_seq() == 0);

  // The first store switched to the log starts it: its control data is the
  // log's first snapshot.
  Hub a(*sh.coord, sh.clock, false, snapshot_options(3), first.path);
  CHECK(a.log().applied_seq() == 1);
  auto m = a.log().last_snapshot();
  REQUIRE(m);
  REQUIRE(*m);
  CHECK((*m)->seq == 1);
  CHECK((*m)->log_from == 2);
  CHECK((*m)->revision == a.log().applied_revision());
  CHECK(a.call("GET", "/v1/bundles", "", first.admin).status == 200);
  // The early hub's watcher meets the seed and loads its snapshot.
  REQUIRE(early.log().wait_applied(a.log().applied_revision(), std::chrono::seconds(20)));
  CHECK(early.log().counters().snapshots_loaded == 1);
  CHECK(early.log().stuck_reason().empty());
  CHECK(control_rows(early.store()) == control_rows(a.store()));

  // A hub from an empty store has all of it.
  Hub b(*sh.coord, sh.clock, false, snapshot_options(3));
  CHECK(b.log().counters().snapshots_loaded == 1);
  CHECK(control_rows(b.store()) == control_rows(a.store()));
  CHECK(b.call("GET", "/v1/bundles", "", first.admin).status == 200);
  auto dev = b.service().get_device(first.device);
  REQUIRE(dev);
  REQUIRE(*dev);
  CHECK((*dev)->labels.at("site") == "north");
  // And the log goes on from there, on both.
  auto made = b.call("POST", "/v1/tokens", json{{"name", "ops"}, {"role", "viewer"}, {"project", "default"}}.dump(),
                     first.admin);
  REQUIRE(made.status == 201);
  REQUIRE(a.log().wait_applied(b.log().applied_revision(), std::chrono::seconds(20)));
  CHECK(a.call("GET", "/v1/bundles", "", body_of(made)["token"].get<std::string>()).status == 200);
  // The next snapshot trims the seed's marker (entry 1) with the rest.
  for (int i = 0; i < 4; ++i) {
    REQUIRE(a.call("POST", "/v1/tokens", json{{"name", "t" + std::to_string(i)}, {"role", "viewer"},
                                              {"project", "default"}}.dump(), first.admin).status == 201);
  }
  auto marker = sh.sqlite->get(entry_key(1));
  REQUIRE(marker);
  REQUIRE(*marker);
  auto next_snapshot = a.log().snapshot();
  REQUIRE(next_snapshot);
  REQUIRE(*next_snapshot > 1);
  for (int64_t i = 1; i < *next_snapshot - 2; ++i) {
    auto gone = sh.sqlite->get(entry_key(i));
    REQUIRE(gone);
    CHECK_FALSE(*gone);
  }

  // The second store would lose its own rows to the log's snapshot: it is
  // refused — with the coordinator away too — and keeps everything.
  auto rows_before = [&] {
    auto st = Store::open(second.path);
    REQUIRE(st);
    return control_rows(**st);
  }();
  for (bool down : {true, false}) {
    sh.coord->down = down;
    auto st = Store::open(second.path);
    REQUIRE(st);
    HubService svc(**st, sh.clock, service_config(sh.coord.get(), snapshot_options(3)));
    auto status = svc.control_log_status();
    REQUIRE_FALSE(status);
    INFO(status.error().message);
    CHECK(status.error().message.find("control data of its own") != std::string::npos);
    CHECK(status.error().message.find(down ? "start the hub again when it can" : "empty data dir") !=
          std::string::npos);
    svc.stop();
    CHECK(control_rows(**st) == rows_before);
    CHECK(a.call("GET", "/v1/bundles", "", second.admin).status == 401);  // not in the fleet's log
  }
}

TEST_CASE("control log: work files a killed hub left behind are removed at start, and nothing else is",
          "[unit][control]") {
  Shared sh;
  TempDir dir("stale-work");
  auto write = [&](const std::string& name) {
    std::ofstream(dir.path() / name) << "partial";
    return dir.path() / name;
  };
  const auto load = write("control-snapshot-load-ab12cd.db.part");
  const auto taken = write("control-snapshot-x9y8z7.db.part");
  const auto seed = write("control-seed-q1w2e3.db.part");
  const auto notes = write("control-snapshot-notes.txt");
  const auto other = write("backup.db.part");
  Hub h(*sh.coord, sh.clock, true, snapshot_options(3), (dir.path() / "hub.db").string());
  CHECK_FALSE(std::filesystem::exists(load));
  CHECK_FALSE(std::filesystem::exists(taken));
  CHECK_FALSE(std::filesystem::exists(seed));
  CHECK(std::filesystem::exists(notes));
  CHECK(std::filesystem::exists(other));
  CHECK(std::filesystem::exists(dir.path() / "hub.db"));
}

// One hub process sharing two cells by leases on the shared coordinator,
// alone, so it holds both; with cell_files, each cell's device rows in a
// file of its own (ADR 18).
struct SharedCellsHub {
  TempDir dir;
  Result<std::unique_ptr<Store>> store;
  std::vector<std::unique_ptr<Store>> files;
  RecordingTransport t0, t1;
  std::unique_ptr<HubService> svc;
  SharedCellsHub(Shared& sh, const std::string& name, bool cell_files = false)
      : dir(name), store(Store::open((dir.path() / "hub.db").string())) {
    REQUIRE(store);
    ServiceConfig cfg = service_config(sh.coord.get());
    cfg.cell_broker_urls = {"ssl://cell0.test:8883", "ssl://cell1.test:8884"};
    cfg.broker_url = cfg.cell_broker_urls[0];
    cfg.coordinator = sh.coord.get();
    cfg.share_cells = true;
    cfg.coord_holder = "hub-a";
    for (int cell = 0; cell_files && cell < 2; ++cell) {
      files.push_back(test::open_cell_file(dir.path(), cell));
      cfg.cell_files.push_back(files.back().get());
    }
    svc = std::make_unique<HubService>(**store, sh.clock, cfg);
    REQUIRE(svc->control_log_status());
    REQUIRE(svc->attach_transport(0, t0));
    REQUIRE(svc->attach_transport(1, t1));
    svc->tick();  // the only live hub: it holds both cells
    REQUIRE(svc->serves_cell(0));
    REQUIRE(svc->serves_cell(1));
  }
  ~SharedCellsHub() { svc->stop(); }
};

// Hub processes sharing cells (docs/adr/0019): a device that arrives from a
// draining cell changes its cell in a control write. With etcd away that
// write waits; the device is served meanwhile, and the move is recorded once
// etcd answers again, with nothing written while it was away.
TEST_CASE("shared cells: a device that arrives from a draining cell while etcd is away is served, and its move is "
          "recorded when etcd is back",
          "[unit][control][cells][drain]") {
  Shared sh;
  const bool cell_files = GENERATE(false, true);  // the device rows in hub.db, then in each cell's file
  INFO("cell files: " << cell_files);
  SharedCellsHub hub(sh, "shared-arrival", cell_files);
  auto& svc = *hub.svc;
  auto& t0 = hub.t0;

  auto enr = svc.create_token("enroll", token_rec("enroll", "enroll", {"site"}));
  REQUIRE(enr);
  std::vector<std::string> ids;
  for (int i = 0; i < 2; ++i) {
    auto r = svc.enroll(test::enroll_request(enr->secret, bundles::generate_key(), {{"site", "north"}}));
    REQUIRE(r);
    ids.push_back(r->device_id());
  }
  auto device = [&](const std::string& id) {
    auto d = svc.get_device(id);  // the directory's cell, then that cell's rows
    REQUIRE(d);
    REQUIRE(*d);
    return **d;
  };
  auto presence = [&](int cell, const std::string& id, bool up) {
    v1::Presence p;
    p.set_online(up);
    svc.on_message(cell, {transport::device_topic(id, "presence"), p.SerializeAsString(), 1, false});
    svc.drain();
  };
  const std::string mover = device(ids[0]).cell == 0 ? ids[0] : ids[1];
  REQUIRE(device(mover).cell == 0);
  presence(0, mover, true);

  REQUIRE(svc.drain_cell_devices(0));
  svc.tick();  // asks it to move, on cell 0's broker
  bool asked = false;
  for (const auto& m : t0.published()) {
    v1::DesiredState ds;
    asked = asked || (m.topic == transport::device_topic(mover, "desired") && ds.ParseFromString(m.payload) &&
                      ds.device_id() == mover);
  }
  REQUIRE(asked);

  // etcd goes away; the device arrives on cell 1's broker.
  sh.coord->down = true;
  const int64_t head = sh.head_revision();
  presence(0, mover, false);
  presence(1, mover, true);
  // Served: what it says is applied, though its move is not recorded yet.
  CHECK(device(mover).online);
  CHECK(device(mover).cell == 0);
  CHECK(sh.head_revision() == head);
  presence(1, mover, false);
  CHECK_FALSE(device(mover).online);
  presence(1, mover, true);
  CHECK(device(mover).online);
  CHECK(svc.cell(1).moved_in == 0);

  // Back: the next batch after the retry interval (5 s) records it.
  sh.coord->down = false;
  sh.clock.advance(std::chrono::seconds(6));
  presence(1, mover, true);
  CHECK(device(mover).cell == 1);
  CHECK(device(mover).online);
  CHECK(sh.head_revision() > head);
  CHECK(svc.cell(0).moved_out == 1);
  CHECK(svc.cell(1).moved_in == 1);
  // A late message from the broker it left changes nothing now.
  presence(0, mover, false);
  CHECK(device(mover).online);
  CHECK(device(mover).cell == 1);
}

// Live membership follows the directory (ADR 18): an enrollment or a label
// change made through any hub reaches the campaign's rows on the hub that
// holds them, from the control log's entry, not only on the hub that took
// the write. A hub holding no rows of the campaign makes none for another
// hub's write.
namespace {
// Caught up, and what the entries changed followed: the watcher thread may
// have applied an entry just before, and follows it right after.
void settle(Hub& h) {
  h.catch_up();
  for (int i = 0; i < 2000 && h.count("directory_outbox") != 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  REQUIRE(h.count("directory_outbox") == 0);
}
}  // namespace

TEST_CASE("control log: a device enrolled or relabelled through another hub joins or leaves a live campaign where "
          "its rows are",
          "[unit][control]") {
  Shared sh;
  Hub a(*sh.coord, sh.clock, true);
  Hub b(*sh.coord, sh.clock, false);
  const std::string ops = a.make_operator();
  const std::string bundle = a.upload_bundle(ops, "edge-base");
  auto enr = a.service().create_token("enroll", token_rec("enroll", "enroll", {"site"}));
  REQUIRE(enr);
  const std::string first = a.enroll_device(enr->secret);
  const std::string second = a.enroll_device(enr->secret);
  const std::string campaign = a.create_campaign(ops, bundle, "site=north");
  auto row_on = [&](Hub& h, const std::string& device) {
    auto r = h.store().campaign_device(campaign, device);
    REQUIRE(r);
    return *r;
  };
  REQUIRE(a.count("campaign_devices") == 2);
  settle(b);
  REQUIRE(b.count("campaign_devices") == 0);

  // Relabelled through B so that it no longer matches: it leaves on A.
  REQUIRE(b.service().edit_device_labels(first, {{"site", std::string("south")}}));
  settle(a);
  auto left = row_on(a, first);
  REQUIRE(left);
  CHECK(left->status == "skipped");
  CHECK(left->reason == "left_selector");

  // Relabelled through A to match again: A's row rejoins; B, which holds no
  // row of the campaign, makes none.
  REQUIRE(a.service().edit_device_labels(first, {{"site", std::string("north")}}));
  CHECK(row_on(a, first)->status == "waiting");
  settle(b);
  CHECK(b.count("campaign_devices") == 0);

  // Enrolled through B, matching: it joins on A.
  const std::string late = b.enroll_device(enr->secret);
  settle(a);
  auto joined = row_on(a, late);
  REQUIRE(joined);
  CHECK(joined->status == "waiting");
  CHECK(a.count("campaign_devices") == 3);
  CHECK(row_on(a, second)->status == "waiting");
  CHECK(a.count("directory_outbox") == 0);
}

// A hub's own directory write is its own whichever follow takes it: the
// outbox entry carries the mark (DirectoryChange::local), so a follow
// started by another write, or a start after a crash, does not take it for
// another hub's. Here A's own follow fails, the entry stays, and the follow
// that an entry from B starts takes it: A makes the row of its own write,
// although it holds no row of the campaign.
TEST_CASE("control log: a hub's own label change is followed as its own by a later follow", "[unit][control]") {
  Shared sh;
  Hub a(*sh.coord, sh.clock, true);
  Hub b(*sh.coord, sh.clock, false);
  const std::string ops = a.make_operator();
  const std::string bundle = a.upload_bundle(ops, "edge-base");
  auto enr = a.service().create_token("enroll", token_rec("enroll", "enroll", {"site"}));
  REQUIRE(enr);
  const std::string mine = a.enroll_device(enr->secret);
  const std::string theirs = a.enroll_device(enr->secret);
  const std::string seed = a.enroll_device(enr->secret);
  b.catch_up();
  REQUIRE(b.service().edit_device_labels(seed, {{"site", std::string("east")}}));
  const std::string campaign = b.create_campaign(ops, bundle, "site=east");
  settle(a);
  REQUIRE(a.count("campaign_devices") == 0);

  // A's follow of its own relabelling fails (its entries cannot be
  // forgotten, so the batch rolls back): the entry is kept, marked A's.
  REQUIRE(a.store().db().exec("CREATE TRIGGER keep_outbox BEFORE DELETE ON directory_outbox "
                              "BEGIN SELECT RAISE(ABORT, 'test: the follow fails'); END"));
  REQUIRE(a.service().edit_device_labels(mine, {{"site", std::string("east")}}));
  auto kept = a.store().directory_outbox(10);
  REQUIRE(kept);
  REQUIRE(kept->size() == 1);
  CHECK(kept->front().device_id == mine);
  CHECK(kept->front().local);
  CHECK(a.count("campaign_devices") == 0);
  REQUIRE(a.store().db().exec("DROP TRIGGER keep_outbox"));

  // B's relabelling (not matching) reaches A: the follow it starts takes
  // both entries.
  REQUIRE(b.service().edit_device_labels(theirs, {{"site", std::string("west")}}));
  settle(a);
  auto own = a.store().campaign_device(campaign, mine);
  REQUIRE(own);
  REQUIRE(*own);
  CHECK((*own)->status == "waiting");
  auto other = a.store().campaign_device(campaign, theirs);
  REQUIRE(other);
  CHECK_FALSE(*other);
  CHECK(a.count("campaign_devices") == 1);
  // B holds the campaign's rows: A's relabelling joined there too.
  settle(b);
  CHECK(b.count("campaign_devices") == 2);
}

// ADR 18: a hub sharing cells builds its cells' membership rows in their
// own store before the tick's decisions, not inside their control write:
// the rows are cell data. So a hub whose store has none of a campaign's rows
// (the campaign made on another hub, a cell taken over) builds them while
// etcd is away too; only the decisions wait for etcd.
TEST_CASE("shared cells: a cell's membership rows are built while etcd is away, outside the tick's control write",
          "[unit][control][cells]") {
  Shared sh;
  const bool cell_files = GENERATE(false, true);  // the device rows in hub.db, then in each cell's file
  INFO("cell files: " << cell_files);
  SharedCellsHub hub(sh, "shared-members", cell_files);
  auto& st = hub.store;
  auto& svc = *hub.svc;
  Api api(svc);
  const std::string admin = test::make_token(svc, "api", "root", "admin").secret;
  auto enr = svc.create_token("enroll", token_rec("enroll", "enroll", {"site"}));
  REQUIRE(enr);
  for (int i = 0; i < 6; ++i) {
    REQUIRE(svc.enroll(test::enroll_request(enr->secret, bundles::generate_key(), {{"site", "north"}})));
  }
  const auto key = bundles::generate_key();
  const auto env = test::signed_bundle(sh.clock.now_unix(), "edge", 1, "kind: ConfigMap\n", {&key});
  auto up = api.handle(test::api_request("POST", "/v1/bundles", bundles::serialize_envelope(env), admin));
  INFO(up.body);
  REQUIRE(up.status == 201);
  auto camp = api.handle(test::api_request(
      "POST", "/v1/campaigns", json{{"bundle", body_of(up)["id"]}, {"selector", "site=north"}}.dump(), admin));
  INFO(camp.body);
  REQUIRE(camp.status == 201);
  std::vector<sql::Db*> row_dbs = {&(*st)->db()};
  if (cell_files) row_dbs = {&hub.files[0]->db(), &hub.files[1]->db()};
  auto rows = [&] {
    int64_t n = 0;
    for (sql::Db* db : row_dbs) {
      auto s = db->prepare("SELECT COUNT(*) FROM campaign_devices");
      REQUIRE(s);
      REQUIRE(*s->step());
      n += s->col_int(0);
    }
    return n;
  };
  REQUIRE(rows() == 6);

  // As if made on another hub: this store has none of its rows. etcd away.
  for (sql::Db* db : row_dbs) REQUIRE(db->exec("DELETE FROM campaign_devices; DELETE FROM campaign_counts"));
  sh.coord->down = true;
  const int64_t head = sh.head_revision();
  svc.tick();
  CHECK(rows() == 6);                   // built from the directory by the rank
  CHECK(sh.head_revision() == head);    // and no decision written
  auto v = svc.campaign_view(body_of(camp)["id"].get<std::string>(), false);
  REQUIRE(v);
  REQUIRE(*v);
  CHECK((*v)->counts.total == 6);
  CHECK((*v)->counts.waiting == 6);
}

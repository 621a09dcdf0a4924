// [integration] The UI listener over real sockets: event streams (a snapshot
// when something changed and only then, the end of a stream whose token is
// revoked), the caps on streams and connections, and the dashboard's files
// over plain HTTP and TLS. The hub's service, store and read models run in
// this process on a temporary SQLite file; every wait has a deadline.
#include <catch2/catch.hpp>

#include <boost/asio/connect.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/write.hpp>
#include <chrono>
#include <optional>
#include <regex>
#include <thread>

#include "flotilla/common/http_client.hpp"
#include "flotilla/hub/aggregates.hpp"
#include "flotilla/hub/api.hpp"
#include "flotilla/hub/ui_server.hpp"
#include "flotilla/bundles/bundle.hpp"
#include "flotilla/hub/service.hpp"
#include "flotilla/v1/desired.pb.h"
#include "tests/support/hub_test_support.hpp"
#include "tests/support/temp_dir.hpp"
#include "tests/support/pki.hpp"

using namespace flotilla;
using namespace flotilla::hub;
using nlohmann::json;
namespace asio = boost::asio;
using tcp = asio::ip::tcp;

namespace {

bool wait_until(const std::function<bool()>& pred, std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!pred()) {
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return true;
}

Result<http::Response> get(const std::string& url, std::chrono::milliseconds timeout) {
  http::Request req;
  req.url = url;
  req.timeout = timeout;
  return http::send(req);
}

// The hub's service over a SQLite file, with a recording transport, devices
// enrolled through the service and reports written by the test. (Not
// campaign_fleet.hpp's Fleet: this binary has harness.hpp's Fleet.)
struct InProcessHub {
  test::TempDir dir;
  FakeClock clock;
  std::unique_ptr<Store> store;
  std::unique_ptr<HubService> hub;
  test::RecordingTransport broker;
  bundles::KeyPair key = bundles::generate_key();
  std::vector<std::string> devices;
  uint64_t seq = 1000;

  InProcessHub() {
    auto s = Store::open((dir.path() / "hub.db").string());
    REQUIRE(s);
    store = std::move(*s);
    ServiceConfig cfg;
    cfg.broker_url = "tcp://127.0.0.1:1";
    cfg.public_url = "http://hub.test";
    cfg.engine_thread = false;
    hub = std::make_unique<HubService>(*store, clock, cfg);
    REQUIRE(hub->attach_transport(broker));
  }
  ~InProcessHub() { hub->stop(); }
  void deliver(const std::string& device, const char* leaf, const std::string& payload) {
    hub->on_message({transport::device_topic(device, leaf), payload, 1, false});
    hub->drain();
  }
  void enroll(int n) {
    TokenRecord t;
    t.role = "enroll";
    t.labels = {{"env", "prod"}};
    auto tok = hub->create_token("enroll", t);
    REQUIRE(tok);
    for (int i = 0; i < n; ++i) {
      auto k = bundles::generate_key();
      v1::EnrollRequest req;
      req.set_enrollment_token(tok->secret);
      req.set_device_public_key(std::string(k.pub.key.begin(), k.pub.key.end()));
      auto proof = bundles::sign_detached(k, bundles::enroll_proof_message(tok->secret, k.pub.key));
      req.set_proof(std::string(proof.begin(), proof.end()));
      auto r = hub->enroll(req);
      REQUIRE(r);
      devices.push_back(r->device_id());
      v1::Presence p;
      p.set_online(true);
      deliver(r->device_id(), "presence", p.SerializeAsString());
    }
  }
  std::string create_campaign(const json& strategy) {
    v1::BundleManifest m;
    m.set_format_version(1);
    m.set_name("edge-base");
    m.set_channel("stable");
    m.set_version(1);
    m.set_expires_unix(clock.now_unix() + 86400);
    auto env = bundles::wrap(m);
    REQUIRE(bundles::sign(env, key));
    auto up = hub->upload_bundle(bundles::serialize_envelope(env));
    REQUIRE(up);
    auto s = Strategy::from_json(strategy);
    REQUIRE(s);
    auto c = hub->create_campaign("", up->first.id, "env=prod", *s, "*");
    REQUIRE(c);
    hub->tick();
    return c->id;
  }
  // Reports `state` for a device the campaign released, as its agent would.
  void report(const std::string& device, v1::AgentState state) {
    std::optional<v1::DesiredState> ds;
    for (const auto& m : broker.published()) {
      v1::DesiredState d;
      if (d.ParseFromString(m.payload) && d.device_id() == device) ds = d;
    }
    REQUIRE(ds);
    v1::Report r;
    r.set_device_id(device);
    r.set_seq(++seq);
    r.set_state(state);
    r.set_generation(ds->generation());
    r.set_campaign_id(ds->campaign_id());
    deliver(device, "report", r.SerializeAsString());
  }
  std::vector<std::string> released(const std::string& campaign) {
    auto rows = store->campaign_devices_with_status(campaign, {"pending", "in_progress"});
    REQUIRE(rows);
    std::vector<std::string> out;
    for (const auto& r : *rows) out.push_back(r.device_id);
    return out;
  }
};

struct UiHub {
  InProcessHub f;
  std::unique_ptr<AggregateStore> agg;
  std::unique_ptr<Api> api;
  std::unique_ptr<UiServer> ui;
  std::string admin, admin_id;

  explicit UiHub(UiServerConfig cfg) {
    auto a = AggregateStore::open((f.dir.path() / "hub.db").string(), {});
    REQUIRE(a);
    agg = std::move(*a);
    f.hub->set_aggregates(agg.get());
    api = std::make_unique<Api>(*f.hub);
    TokenRecord t;
    t.name = "ui-test";
    t.role = "admin";
    t.project = "*";
    auto tok = f.hub->create_token("api", t);
    REQUIRE(tok);
    admin = tok->secret;
    admin_id = tok->record.id;
    auto s = UiServer::start(cfg, *api, *f.hub);
    REQUIRE(s);
    ui = std::move(*s);
  }
  ~UiHub() {
    ui->stop();
    f.hub->set_aggregates(nullptr);
  }
  std::string url() const { return "http://127.0.0.1:" + std::to_string(ui->port()); }
};

// A blocking client for one streamed response.
class Stream {
 public:
  Stream(int port, const std::string& target, const std::string& token) : socket_(io_) {
    socket_.connect(tcp::endpoint(asio::ip::make_address("127.0.0.1"), static_cast<unsigned short>(port)));
    const std::string req = "GET " + target + " HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + token +
                            "\r\n\r\n";
    asio::write(socket_, asio::buffer(req));
  }
  // Reads until `pred(text so far)` holds, the peer closes, or the deadline.
  bool read_until(const std::function<bool(const std::string&)>& pred, std::chrono::milliseconds timeout) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    socket_.non_blocking(true);
    while (!pred(text_)) {
      if (std::chrono::steady_clock::now() >= deadline) return false;
      std::array<char, 4096> buf{};
      boost::system::error_code ec;
      const size_t n = socket_.read_some(asio::buffer(buf), ec);
      if (ec == asio::error::would_block) {
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
        continue;
      }
      if (ec) {
        closed_ = true;
        return pred(text_);
      }
      text_.append(buf.data(), n);
    }
    return true;
  }
  const std::string& text() const { return text_; }
  bool closed() const { return closed_; }
  void close() {
    boost::system::error_code ec;
    socket_.close(ec);
  }
  size_t count(const std::string& needle) const {
    size_t n = 0;
    for (size_t at = text_.find(needle); at != std::string::npos; at = text_.find(needle, at + 1)) ++n;
    return n;
  }
  // The data of the last snapshot event.
  json last_snapshot() const {
    const auto at = text_.rfind("event: snapshot\n");
    REQUIRE(at != std::string::npos);
    const auto data = text_.find("data: ", at);
    const auto end = text_.find("\n\n", data);
    return json::parse(text_.substr(data + 6, end - data - 6));
  }

 private:
  asio::io_context io_;
  tcp::socket socket_;
  std::string text_;
  bool closed_ = false;
};

}  // namespace

TEST_CASE("UI event stream: a snapshot when something changed and only then, ended when the token is revoked",
          "[integration][ui]") {
  UiServerConfig cfg;
  cfg.event_interval = std::chrono::milliseconds(50);
  cfg.heartbeat = std::chrono::milliseconds(300);
  cfg.token_recheck = std::chrono::milliseconds(200);
  UiHub h(cfg);
  h.f.enroll(2);
  const std::string id = h.f.create_campaign(json::parse(R"({"canary": 1})"));

  Stream s(h.ui->port(), "/v1/events?topic=campaign&id=" + id, h.admin);
  REQUIRE(s.read_until([](const std::string& t) { return t.find("event: snapshot") != std::string::npos &&
                                                          t.find("\n\n", t.find("event: snapshot")) != std::string::npos; },
                       std::chrono::seconds(10)));
  CHECK(s.text().rfind("HTTP/1.1 200 OK\r\n", 0) == 0);
  CHECK_THAT(s.text(), Catch::Contains("Content-Type: text/event-stream"));
  CHECK(s.last_snapshot()["counts"]["applied"] == 0);

  // A device applies: the open stream says so.
  const auto released = h.f.released(id);
  REQUIRE(released.size() == 1);
  h.f.report(released[0], v1::AGENT_STATE_APPLIED);
  REQUIRE(s.read_until([&](const std::string&) { return s.count("event: snapshot") >= 2 &&
                                                        s.text().rfind("\n\n") == s.text().size() - 2; },
                       std::chrono::seconds(10)));
  CHECK(s.last_snapshot()["counts"]["applied"] == 1);

  // Nothing changes: keep-alives only, no new snapshot (the clock's fields
  // do not count as a change).
  const size_t snapshots = s.count("event: snapshot");
  const size_t alive = s.count(": keep-alive");
  REQUIRE(s.read_until([&](const std::string&) { return s.count(": keep-alive") >= alive + 2; },
                       std::chrono::seconds(10)));
  CHECK(s.count("event: snapshot") == snapshots);

  // The token is revoked: the stream ends (an end event, then the hub closes).
  REQUIRE(h.f.hub->revoke_token("api", h.admin_id));
  REQUIRE(s.read_until([&](const std::string&) { return s.closed(); }, std::chrono::seconds(10)));
  CHECK_THAT(s.text(), Catch::Contains("event: end"));
  CHECK_THAT(s.text(), Catch::Contains("no longer valid"));
}

TEST_CASE("UI event streams are capped for the hub, and a closed page frees its slot", "[integration][ui]") {
  UiServerConfig cfg;
  cfg.max_streams = 2;
  cfg.event_interval = std::chrono::milliseconds(50);
  UiHub h(cfg);
  auto opened = [&](Stream& s) {
    return s.read_until([](const std::string& t) { return t.find("\r\n\r\n") != std::string::npos; },
                        std::chrono::seconds(10));
  };
  Stream a(h.ui->port(), "/v1/events?topic=fleet", h.admin);
  Stream b(h.ui->port(), "/v1/events?topic=campaigns", h.admin);
  REQUIRE(opened(a));
  REQUIRE(opened(b));
  CHECK(a.text().rfind("HTTP/1.1 200", 0) == 0);
  CHECK(b.text().rfind("HTTP/1.1 200", 0) == 0);
  Stream c(h.ui->port(), "/v1/events?topic=fleet", h.admin);
  REQUIRE(c.read_until([&](const std::string&) { return c.closed(); }, std::chrono::seconds(10)));
  CHECK(c.text().rfind("HTTP/1.1 503", 0) == 0);
  CHECK_THAT(c.text(), Catch::Contains("Retry-After: 5"));
  CHECK_THAT(c.text(), Catch::Contains("ui-max-streams"));
  CHECK(h.ui->open_streams() == 2);
  // Closing a page frees its stream's slot.
  a.close();
  REQUIRE(wait_until([&] { return h.ui->open_streams() == 1; }, std::chrono::seconds(10)));
  Stream d(h.ui->port(), "/v1/events?topic=fleet", h.admin);
  REQUIRE(opened(d));
  CHECK(d.text().rfind("HTTP/1.1 200", 0) == 0);
}

TEST_CASE("UI listener: connections above its cap are closed at once, the rest are served", "[integration][ui]") {
  UiServerConfig cfg;
  cfg.max_connections = 3;
  cfg.max_streams = 2;
  UiHub h(cfg);
  asio::io_context io;
  std::vector<std::unique_ptr<tcp::socket>> idle;
  const tcp::endpoint ep(asio::ip::make_address("127.0.0.1"), static_cast<unsigned short>(h.ui->port()));
  for (int i = 0; i < 3; ++i) {
    idle.push_back(std::make_unique<tcp::socket>(io));
    idle.back()->connect(ep);
  }
  // The fourth: closed before a byte is read.
  REQUIRE(wait_until(
      [&] {
        tcp::socket extra(io);
        extra.connect(ep);
        boost::system::error_code ec;
        asio::write(extra, asio::buffer(std::string("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")), ec);
        std::array<char, 64> buf{};
        extra.read_some(asio::buffer(buf), ec);
        return ec == asio::error::eof || ec == asio::error::connection_reset;
      },
      std::chrono::seconds(10)));
  idle.pop_back();
  REQUIRE(wait_until(
      [&] {
        auto r = get(h.url() + "/healthz", std::chrono::milliseconds(2000));
        return r && r->status == 200;
      },
      std::chrono::seconds(10)));
}

TEST_CASE("UI listener over TLS: the dashboard with its security headers, nothing in the clear", "[integration][ui]") {
  test::TempDir pki;
  test::make_ca(pki.path(), "ca");
  test::make_server_cert(pki.path(), "ca", "ui");
  UiServerConfig cfg;
  cfg.tls_cert_file = (pki.path() / "ui.pem").string();
  cfg.tls_key_file = (pki.path() / "ui.key").string();
  UiHub h(cfg);
  const std::string base = "https://127.0.0.1:" + std::to_string(h.ui->port());
  http::Request req;
  req.url = base + "/v1/whoami";
  req.headers["Authorization"] = "Bearer " + h.admin;
  req.ca_file = (pki.path() / "ca.pem").string();
  auto who = http::send(req);
  REQUIRE(who);
  CHECK(who->status == 200);
  CHECK(json::parse(who->body)["role"] == "admin");
  CHECK(who->headers["strict-transport-security"] == "max-age=31536000");
  CHECK(who->headers["cache-control"] == "no-store");
  if (!ui_assets().empty()) {
    req.url = base + "/ui/";
    req.headers.clear();
    auto index = http::send(req);
    REQUIRE(index);
    CHECK(index->status == 200);
    CHECK_THAT(index->headers["content-security-policy"], Catch::Contains("default-src 'none'"));
  }
  // Plain HTTP to the TLS port gets no answer.
  auto plain = get("http://127.0.0.1:" + std::to_string(h.ui->port()) + "/ui/", std::chrono::milliseconds(3000));
  CHECK((!plain || plain->status == 0));
}

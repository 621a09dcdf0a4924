// The many-session MQTT client (common/transport/loop/, flotilla-sim's
// direct mode) against a real mosquitto configured as the hub configures
// its own: TLS only, client certificates from a device CA, the hub's ACL.
// The peer on the other side is Paho (the hub's and agent's client), so
// each test also checks that the two agree on the wire.
#include <catch2/catch.hpp>

#include <signal.h>

#include <atomic>
#include <fstream>
#include <mutex>
#include <set>
#include <vector>

#include "flotilla/common/clock.hpp"
#include "flotilla/common/fs.hpp"
#include "flotilla/common/transport.hpp"
#include "flotilla/common/transport_loop.hpp"
#include "flotilla/hub/broker.hpp"
#include "flotilla/hub/device_ca.hpp"
#include "tests/support/harness.hpp"

using namespace flotilla;
using namespace flotilla::test;
using namespace std::chrono_literals;

namespace {

// A broker as the hub runs one, and identities from its device CA.
struct CertBroker {
  TempDir tmp;
  std::unique_ptr<hub::DeviceCa> ca;
  std::unique_ptr<hub::EmbeddedBroker> broker;
  std::string ca_file;

  CertBroker() {
    const int64_t now = SystemClock::instance().now_unix();
    auto made = hub::DeviceCa::ephemeral(now);
    REQUIRE(made);
    ca = std::move(*made);
    hub::BrokerConfig bc;
    bc.dir = tmp.path() / "broker";
    bc.auth = hub::BrokerAuth::certificate;
    bc.client_ca_pem = ca->trust_pem();
    auto crl = ca->crl_pem({}, now, 86400);
    REQUIRE(crl);
    bc.crl_pem = *crl;
    auto server = ca->issue_server({"127.0.0.1"}, now, 86400);
    REQUIRE(server);
    bc.server_cert_pem = server->pem;
    bc.server_key_pem = server->key_pem;
    auto b = hub::EmbeddedBroker::start(bc, {});
    REQUIRE(b);
    broker = std::move(*b);
    ca_file = (tmp.path() / "ca.pem").string();
    REQUIRE(fs::write_file_atomic(ca_file, ca->trust_pem(), 0644));
  }

  // Connect options for the identity `cn` (its certificate written beside
  // the broker), a persistent session as devices use.
  transport::ConnectOptions as(const std::string& cn, const hub::DeviceCa* issuer = nullptr) {
    const int64_t now = SystemClock::instance().now_unix();
    auto id = (issuer ? issuer : ca.get())->issue_client(cn, now, 86400);
    REQUIRE(id);
    // Plain writes: a synced, atomic write per file made 300 identities
    // take 20 s, and nothing here needs to survive a crash.
    const auto cert = tmp.path() / (cn + ".pem"), key = tmp.path() / (cn + ".key");
    for (const auto& [path, text] : {std::pair{cert, id->pem}, std::pair{key, id->key_pem}}) {
      std::ofstream out(path, std::ios::binary | std::ios::trunc);
      out << text;
      REQUIRE(out.good());
    }
    transport::ConnectOptions co;
    co.url = broker->url();
    co.client_id = cn;
    co.ca_file = ca_file;
    co.cert_file = cert.string();
    co.key_file = key.string();
    co.clean_session = false;
    co.timeout = 5s;
    return co;
  }
};

// What a session received, in order.
struct Inbox {
  std::mutex mu;
  std::vector<transport::Message> got;
  void attach(transport::Transport& t) {
    t.on_message([this](transport::Message&& m) {
      std::lock_guard lock(mu);
      got.push_back(std::move(m));
    });
  }
  size_t size() {
    std::lock_guard lock(mu);
    return got.size();
  }
  std::vector<std::string> payloads() {
    std::lock_guard lock(mu);
    std::vector<std::string> out;
    for (const auto& m : got) out.push_back(m.payload);
    return out;
  }
};

}  // namespace

TEST_CASE("the loop client speaks MQTT over TLS with its client certificate: QoS 1 both ways with Paho, the ACL holds",
          "[integration][mqtt-loop]") {
  CertBroker b;
  auto hub = transport::make_paho_transport();
  Inbox hub_in;
  hub_in.attach(*hub);
  REQUIRE(hub->connect(b.as("flotilla-hub")));
  REQUIRE(hub->subscribe("flotilla/v1/d/+/report", 1));

  auto loop = transport::make_session_loop();
  auto dev = transport::make_loop_transport(loop);
  Inbox dev_in;
  dev_in.attach(*dev);
  std::atomic<int> lost{0};
  dev->on_connection_lost([&](const std::string&) { ++lost; });
  auto co = b.as("d-loop1");
  co.max_inflight = 4;
  co.max_pending = 4;  // publish() waits for room: paced by the broker's acknowledgements
  REQUIRE(dev->connect(co));
  CHECK(dev->connected());
  // Another device's desired state is not this identity's to read:
  // mosquitto acknowledges the subscription (or refuses it) and withholds
  // the messages; its retained one never arrives.
  REQUIRE(hub->publish({transport::device_topic("d-other", "desired"), "not yours", 1, true}));
  REQUIRE(hub->flush(5s));
  auto other = dev->subscribe(transport::device_topic("d-other", "desired"), 1);
  if (!other) CHECK(other.error().code == Errc::permission_denied);
  REQUIRE(dev->subscribe(transport::device_topic("d-loop1", "desired"), 1));

  REQUIRE(hub->publish({transport::device_topic("d-loop1", "desired"), "generation 1", 1, true}));
  REQUIRE(wait_until([&] { return dev_in.size() == 1; }, 10s));
  CHECK(dev_in.payloads() == std::vector<std::string>{"generation 1"});
  {
    std::lock_guard lock(dev_in.mu);
    CHECK(dev_in.got[0].topic == transport::device_topic("d-loop1", "desired"));
  }

  // 200 reports through a window of 4: all arrive, in order, once each.
  std::vector<std::string> sent;
  for (int i = 0; i < 200; ++i) {
    sent.push_back("report " + std::to_string(i) + std::string(static_cast<size_t>(i) * 40, 'r'));
    REQUIRE(dev->publish({transport::device_topic("d-loop1", "report"), sent.back(), 1, false}));
  }
  REQUIRE(dev->flush(10s));
  REQUIRE(wait_until([&] { return hub_in.size() >= sent.size(); }, 10s));
  CHECK(hub_in.payloads() == sent);
  CHECK(lost == 0);

  // A payload far larger than one read or one TLS record.
  const std::string big(3u << 20, 'B');
  REQUIRE(hub->publish({transport::device_topic("d-loop1", "desired"), big, 1, true}));
  REQUIRE(wait_until([&] { return dev_in.size() == 2; }, 10s));
  CHECK(dev_in.payloads().back() == big);

  // A retained message comes again at a new subscription, flagged retained.
  dev->disconnect();
  CHECK_FALSE(dev->connected());
  co.clean_session = true;
  REQUIRE(dev->connect(co));
  REQUIRE(dev->subscribe(transport::device_topic("d-loop1", "desired"), 1));
  REQUIRE(wait_until([&] { return dev_in.size() == 3; }, 10s));
  {
    std::lock_guard lock(dev_in.mu);
    CHECK(dev_in.got.back().retained);
  }
  CHECK(lost == 0);  // a disconnect the owner asked for is not a loss
}

TEST_CASE("the loop client's persistent session: what came while it was away arrives, pings keep an idle one up",
          "[integration][mqtt-loop]") {
  CertBroker b;
  auto hub = transport::make_paho_transport();
  REQUIRE(hub->connect(b.as("flotilla-hub")));
  auto loop = transport::make_session_loop();
  auto dev = transport::make_loop_transport(loop);
  Inbox in;
  in.attach(*dev);
  std::atomic<int> lost{0};
  dev->on_connection_lost([&](const std::string&) { ++lost; });
  auto co = b.as("d-loop2");
  co.keepalive_s = 1;  // mosquitto drops a client silent for 1.5 s
  REQUIRE(dev->connect(co));
  REQUIRE(dev->subscribe(transport::device_topic("d-loop2", "desired"), 1));
  dev->disconnect();
  for (int i = 1; i <= 3; ++i) {
    REQUIRE(hub->publish({transport::device_topic("d-loop2", "desired"), "while away " + std::to_string(i), 1, false}));
  }
  REQUIRE(hub->flush(5s));
  CHECK(in.size() == 0);
  REQUIRE(dev->connect(co));  // the same client id, clean session off
  REQUIRE(wait_until([&] { return in.size() == 3; }, 10s));
  CHECK(in.payloads() == std::vector<std::string>{"while away 1", "while away 2", "while away 3"});

  // Idle for four keepalives: only its pings keep the broker from closing it.
  std::this_thread::sleep_for(4s);
  CHECK(dev->connected());
  CHECK(lost == 0);
  REQUIRE(hub->publish({transport::device_topic("d-loop2", "desired"), "after the pause", 1, false}));
  REQUIRE(wait_until([&] { return in.size() == 4; }, 10s));
  CHECK(lost == 0);
}

TEST_CASE("kill -9 of the broker: the loop client reports the loss, keeps what is published meanwhile, and sends it "
          "after reconnecting",
          "[integration][mqtt-loop]") {
  CertBroker b;
  auto loop = transport::make_session_loop();
  auto dev = transport::make_loop_transport(loop);
  std::atomic<int> lost{0};
  dev->on_connection_lost([&](const std::string&) { ++lost; });
  auto co = b.as("d-loop3");
  REQUIRE(dev->connect(co));
  const auto hub_co = b.as("flotilla-hub");

  REQUIRE(::kill(b.broker->pid(), SIGKILL) == 0);
  REQUIRE(wait_until([&] { return lost == 1; }, 10s));
  CHECK_FALSE(dev->connected());
  // Published while the broker is away: kept by the client, not refused.
  for (int i = 0; i < 5; ++i) {
    REQUIRE(dev->publish({transport::device_topic("d-loop3", "report"), "queued " + std::to_string(i), 1, false}));
  }
  // The hub's watchdog starts it again; a connect before then is retryable.
  REQUIRE(wait_until([&] { return b.broker->restarts() >= 1 && b.broker->running(); }, 30s));
  auto hub = transport::make_paho_transport();
  Inbox hub_in;
  hub_in.attach(*hub);
  REQUIRE(wait_until([&] { return hub->connect(hub_co).ok(); }, 20s));
  REQUIRE(hub->subscribe("flotilla/v1/d/+/report", 1));
  Status st;
  REQUIRE(wait_until(
      [&] {
        st = dev->connect(co);
        return st.ok();
      },
      20s));
  REQUIRE(wait_until([&] { return hub_in.size() == 5; }, 10s));
  CHECK(hub_in.payloads() ==
        std::vector<std::string>{"queued 0", "queued 1", "queued 2", "queued 3", "queued 4"});
  CHECK(lost == 1);
}

TEST_CASE("the loop client's refusals say why: untrusted broker, foreign certificate, nobody listening",
          "[integration][mqtt-loop]") {
  CertBroker b;
  auto loop = transport::make_session_loop();

  SECTION("a broker certificate from a CA the client does not pin is refused, not retried") {
    auto other = hub::DeviceCa::ephemeral(SystemClock::instance().now_unix());
    REQUIRE(other);
    auto co = b.as("d-loop4");
    const auto other_ca = b.tmp.path() / "other-ca.pem";
    REQUIRE(fs::write_file_atomic(other_ca, (*other)->trust_pem(), 0644));
    co.ca_file = other_ca.string();
    auto t = transport::make_loop_transport(loop);
    auto s = t->connect(co);
    REQUIRE_FALSE(s);
    CHECK(s.error().code == Errc::refused);
    CHECK_FALSE(s.error().retryable);
    CHECK(s.error().message.find("TLS handshake with " + co.url) != std::string::npos);
    CHECK_FALSE(t->connected());
  }
  SECTION("a client certificate from another CA is unauthenticated") {
    auto other = hub::DeviceCa::ephemeral(SystemClock::instance().now_unix());
    REQUIRE(other);
    auto co = b.as("d-loop5", other->get());
    auto t = transport::make_loop_transport(loop);
    auto s = t->connect(co);
    REQUIRE_FALSE(s);
    INFO(s.error().message);
    CHECK(s.error().code == Errc::unauthenticated);
    CHECK(s.error().message.find("refused this client's certificate") != std::string::npos);
  }
  SECTION("nobody listening is unavailable and retryable") {
    auto co = b.as("d-loop6");
    auto port = hub::free_port();
    REQUIRE(port);
    co.url = "ssl://127.0.0.1:" + std::to_string(*port);
    auto t = transport::make_loop_transport(loop);
    auto s = t->connect(co);
    REQUIRE_FALSE(s);
    CHECK(s.error().code == Errc::unavailable);
    CHECK(s.error().retryable);
    // Nothing was ever connected: a publish is refused, not queued forever.
    CHECK_FALSE(t->publish({"flotilla/v1/d/d-loop6/report", "x", 1, false}));
  }
  SECTION("a missing client certificate file is named") {
    auto co = b.as("d-loop7");
    co.cert_file = (b.tmp.path() / "missing.pem").string();
    auto t = transport::make_loop_transport(loop);
    auto s = t->connect(co);
    REQUIRE_FALSE(s);
    CHECK(s.error().message.find("missing.pem") != std::string::npos);
  }
}

TEST_CASE("one loop carries 300 TLS sessions, each getting exactly its own messages", "[integration][mqtt-loop]") {
  CertBroker b;
  auto hub = transport::make_paho_transport();
  REQUIRE(hub->connect(b.as("flotilla-hub")));
  auto loop = transport::make_session_loop();
  constexpr int kSessions = 300;
  std::vector<std::unique_ptr<transport::Transport>> devs;
  std::vector<std::unique_ptr<Inbox>> inboxes;
  for (int i = 0; i < kSessions; ++i) {
    const std::string id = "d-many" + std::to_string(i);
    devs.push_back(transport::make_loop_transport(loop));
    inboxes.push_back(std::make_unique<Inbox>());
    inboxes.back()->attach(*devs.back());
    REQUIRE(devs.back()->connect(b.as(id)));
    REQUIRE(devs.back()->subscribe(transport::device_topic(id, "desired"), 1));
  }
  for (int round = 0; round < 2; ++round) {
    for (int i = 0; i < kSessions; ++i) {
      const std::string id = "d-many" + std::to_string(i);
      REQUIRE(hub->publish({transport::device_topic(id, "desired"), id + " round " + std::to_string(round), 1, false}));
    }
  }
  REQUIRE(wait_until(
      [&] {
        for (auto& in : inboxes) {
          if (in->size() < 2) return false;
        }
        return true;
      },
      30s));
  for (int i = 0; i < kSessions; ++i) {
    const std::string id = "d-many" + std::to_string(i);
    CHECK(inboxes[static_cast<size_t>(i)]->payloads() == std::vector<std::string>{id + " round 0", id + " round 1"});
  }
  // Closing them all is quick and leaves the loop serving the rest.
  devs.resize(10);
  REQUIRE(hub->publish({transport::device_topic("d-many3", "desired"), "still here", 1, false}));
  REQUIRE(wait_until([&] { return inboxes[3]->size() == 3; }, 10s));
}

// MQTT over TLS end to end (issue 7): the real hub with its embedded
// mosquitto on a TLS-only listener, real agents pinning a CA with
// tls-ca-file for HTTPS enrollment, HTTPS artifact downloads and the ssl://
// broker. Certificates come from the openssl command line at test time.
#include <catch2/catch.hpp>

#include <arpa/inet.h>
#include <dirent.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <fstream>
#include <set>
#include <sstream>

#include "flotilla/bundles/bundle.hpp"
#include "flotilla/common/crypto.hpp"
#include "flotilla/common/encoding.hpp"
#include "flotilla/common/fs.hpp"
#include "flotilla/common/transport.hpp"
#include "flotilla/hub/broker.hpp"
#include "flotilla/v1/enroll.pb.h"
#include "tests/support/harness.hpp"
#include "tests/support/pki.hpp"

using namespace flotilla;
using namespace flotilla::test;

namespace {

int broker_port(const Hub& hub) { return std::stoi(fs::read_file(hub.data_dir() / "broker/port", 64).value()); }

// TCP ports a process listens on (IPv4 and IPv6), from /proc: its socket
// inodes matched against the kernel's tables of listening sockets.
std::set<int> listening_ports(pid_t pid) {
  std::set<std::string> inodes;
  const std::string fd_dir = "/proc/" + std::to_string(pid) + "/fd";
  for (const auto& e : stdfs::directory_iterator(fd_dir)) {
    std::error_code ec;
    const auto target = stdfs::read_symlink(e.path(), ec).string();
    if (!ec && target.rfind("socket:[", 0) == 0) inodes.insert(target.substr(8, target.size() - 9));
  }
  std::set<int> ports;
  for (const char* table : {"tcp", "tcp6"}) {
    std::istringstream in(fs::read_file("/proc/" + std::to_string(pid) + "/net/" + table, 8u << 20).value_or(""));
    std::string line;
    std::getline(in, line);  // header
    while (std::getline(in, line)) {
      std::istringstream f(line);
      std::string sl, local, remote, state, queues, timer, retr, uid, timeout, inode;
      f >> sl >> local >> remote >> state >> queues >> timer >> retr >> uid >> timeout >> inode;
      if (state == "0A" && inodes.count(inode)) ports.insert(std::stoi(local.substr(local.find(':') + 1), nullptr, 16));
    }
  }
  return ports;
}

// A plain MQTT CONNECT with the hub's own credentials; true if a CONNACK comes back.
bool plain_mqtt_connack(int port, const std::string& user, const std::string& password) {
  const std::string packet = hub::mqtt_connect_packet("plain-probe", user, password);
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  timeval tv{3, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(static_cast<uint16_t>(port));
  bool connack = false;
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0 &&
      ::send(fd, packet.data(), packet.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(packet.size())) {
    unsigned char ack[4] = {0, 0, 0, 0};
    connack = ::recv(fd, ack, sizeof ack, 0) > 0 && ack[0] == 0x20;
  }
  ::close(fd);
  return connack;
}

size_t count(const std::string& text, const std::string& what) {
  size_t n = 0;
  for (size_t p = text.find(what); p != std::string::npos; p = text.find(what, p + 1)) ++n;
  return n;
}

std::string tail(const std::string& s) { return s.size() > 6000 ? s.substr(s.size() - 6000) : s; }

// A hub and a signing key; agents pin `ca` (a file in tmp) as tls-ca-file.
struct TlsSite {
  TempDir tmp;
  Hub hub{tmp.path() / "hub"};
  bundles::KeyPair release = bundles::generate_key();
  std::vector<std::unique_ptr<test::Agent>> agents;

  TlsSite() {
    make_ca(tmp.path(), "fleet");
    make_ca(tmp.path(), "other");
    make_server_cert(tmp.path(), "fleet", "broker");
    make_server_cert(tmp.path(), "fleet", "rest");
    make_server_cert(tmp.path(), "other", "rest-other");
  }
  std::string pem(const std::string& name) const { return (tmp.path() / (name + ".pem")).string(); }
  std::string key(const std::string& name) const { return (tmp.path() / (name + ".key")).string(); }

  // An agent whose tls-ca-file holds the given CA files (none: unset).
  test::Agent& agent(const std::string& name, const std::vector<std::string>& cas) {
    AgentOptions o;
    o.root_keys = {bundles::public_key_text(release.pub)};
    o.health_timeout = "6s";
    agents.push_back(std::make_unique<test::Agent>(tmp.path() / name, hub.url(), hub.enrollment_token({{"env", "tls"}}), o));
    auto& a = *agents.back();
    a.append_config("drift-interval: 0\n");
    if (!cas.empty()) {
      set_ca(a, cas);
      a.append_config("tls-ca-file: /etc/flotilla/ca.pem\n");
    }
    return a;
  }
  static void set_ca(test::Agent& a, const std::vector<std::string>& cas) {
    std::string bundle;
    for (const auto& c : cas) bundle += fs::read_file(c).value();
    REQUIRE(fs::write_file_atomic(a.root() / "etc/flotilla/ca.pem", bundle, 0644));
  }

  // A signed bundle with a drop-in and an airgap-image artifact held by the hub.
  std::string push(uint64_t version, const std::string& image) {
    const std::string hex = crypto::sha256_hex(image);
    auto [put, put_body] = hub.call("PUT", "/v1/artifacts/" + hex, image, "application/octet-stream");
    INFO(put_body.dump());
    REQUIRE((put == 201 || put == 200));
    v1::BundleManifest m = make_manifest(
        "edge", version, {{v1::FILE_KIND_K3S_CONFIG, "10-edge.yaml", "node-label: v" + std::to_string(version) + "\n"}});
    add_airgap_artifact(m, hex, image.size(), hex);  // relative: the hub's https:// artifact base
    auto env = bundles::wrap(m);
    REQUIRE(bundles::sign(env, release));
    auto [status, body] = hub.call("POST", "/v1/bundles", bundles::serialize_envelope(env), "application/octet-stream");
    INFO(body.dump());
    REQUIRE(status == 201);
    auto [cs, cb] = hub.call("POST", "/v1/campaigns", json{{"bundle", body["id"]}, {"selector", "env=tls"}}.dump());
    INFO(cb.dump());
    REQUIRE(cs == 201);
    return cb["id"].get<std::string>();
  }
};

std::string credentials_broker_url(const test::Agent& a) {
  auto bytes = fs::read_file(a.root() / "var/lib/flotilla/credentials.pb", 64 * 1024);
  v1::EnrollResponse r;
  if (!bytes || !r.ParseFromString(*bytes)) return "";
  return r.broker_url();
}

}  // namespace

TEST_CASE("an agent enrolls over HTTPS and applies a signed bundle over ssl:// MQTT with its pinned CA",
          "[integration][tls][broker-tls]") {
  TlsSite site;
  site.hub.start({"--tls-cert", site.pem("rest"), "--tls-key", site.key("rest"), "--broker-tls-cert",
                  site.pem("broker"), "--broker-tls-key", site.key("broker"), "--broker-tls-ca", site.pem("fleet")},
                 site.pem("fleet"));
  REQUIRE(site.hub.url().rfind("https://", 0) == 0);
  const int port = broker_port(site.hub);
  INFO("hub log:\n" << tail(site.hub.log()));
  // The hub's own client is on the broker over TLS too.
  REQUIRE(wait_until([&] { return site.hub.log().find("connected to broker ssl://127.0.0.1:" + std::to_string(port)) !=
                                  std::string::npos; },
                     std::chrono::seconds(20)));

  SECTION("the broker has one listener, TLS-only: no plain port") {
    const pid_t mosquitto = std::stoi(fs::read_file(site.hub.data_dir() / "broker/mosquitto.pid", 64).value());
    CHECK(listening_ports(mosquitto) == std::set<int>{port});
    const auto conf = fs::read_file(site.hub.data_dir() / "broker/mosquitto.conf").value();
    CHECK(count(conf, "\nlistener ") == 1);
    CHECK(conf.find("tls_version tlsv1.2") != std::string::npos);
    // Plain MQTT to that port gets no CONNACK, even with valid credentials.
    CHECK_FALSE(plain_mqtt_connack(port, "flotilla-hub", site.hub.broker_password()));
  }

  SECTION("the MQTT transport pins the CA file and checks the host name") {
    auto attempt = [&](const std::string& host, const std::string& ca) {
      auto t = transport::make_paho_transport();
      transport::ConnectOptions co;
      co.url = "ssl://" + host + ":" + std::to_string(port);
      co.client_id = "tls-probe";
      co.username = "tls-probe";  // no such account: only a finished handshake gets that far
      co.password = "x";
      co.ca_file = ca;
      co.timeout = std::chrono::seconds(5);
      return t->connect(co);
    };
    // The right CA and host: the handshake works, the broker then refuses the unknown account.
    auto right = attempt("127.0.0.1", site.pem("fleet"));
    REQUIRE_FALSE(right);
    CHECK(right.error().code == Errc::unauthenticated);
    // Another CA: refused in the handshake, saying so.
    auto wrong = attempt("127.0.0.1", site.pem("other"));
    REQUIRE_FALSE(wrong);
    INFO(wrong.error().message);
    CHECK(wrong.error().code == Errc::refused);
    CHECK_FALSE(wrong.error().retryable);
    CHECK(wrong.error().message.find("certificate verify failed") != std::string::npos);
    CHECK(wrong.error().message.find(site.pem("other")) != std::string::npos);
    // The system store alone does not know this private CA.
    auto system = attempt("127.0.0.1", "");
    REQUIRE_FALSE(system);
    CHECK(system.error().code == Errc::refused);
    // The certificate names 127.0.0.1, not localhost.
    auto other_name = attempt("localhost", site.pem("fleet"));
    REQUIRE_FALSE(other_name);
    INFO(other_name.error().message);
    CHECK(other_name.error().code == Errc::refused);
    CHECK(other_name.error().message.find("does not name localhost") != std::string::npos);
  }

  SECTION("enroll over https, ssl:// session, artifact over https, bundle applied") {
    auto& a = site.agent("dev-good", {site.pem("fleet")});
    a.start();
    INFO("agent log:\n" << tail(a.log()));
    REQUIRE(wait_until([&] { return !a.device_id().empty() && site.hub.device(a.device_id())["online"] == true; },
                       std::chrono::seconds(40)));
    CHECK(credentials_broker_url(a) == "ssl://127.0.0.1:" + std::to_string(port));
    CHECK(a.log().find("connected device=" + a.device_id() + " broker=ssl://") != std::string::npos);

    const std::string image = crypto::random_token(40000);
    site.push(1, image);
    REQUIRE(wait_until(
        [&] {
          auto d = site.hub.device(a.device_id());
          return d["applied_version"] == 1 && d["state"] == "applied";
        },
        std::chrono::seconds(60)));
    CHECK(fs::read_file(a.root() / "etc/rancher/k3s/config.yaml.d/10-edge.yaml").value_or("") == "node-label: v1\n");
    CHECK(fs::read_file(a.root() / "var/lib/rancher/k3s/agent/images/images.tar").value_or("") == image);
    CHECK(a.log().find("downloaded https://127.0.0.1:") != std::string::npos);
  }
}

TEST_CASE("an agent that does not trust the broker's certificate is refused, applies nothing and keeps running",
          "[integration][tls][broker-tls]") {
  TlsSite site;
  // REST signed by "other", the broker by "fleet": this agent pins "other",
  // so it enrolls over HTTPS but must refuse the broker.
  site.hub.start({"--tls-cert", site.pem("rest-other"), "--tls-key", site.key("rest-other"), "--broker-tls-cert",
                  site.pem("broker"), "--broker-tls-key", site.key("broker"), "--broker-tls-ca", site.pem("fleet")},
                 site.pem("other"));
  auto& a = site.agent("dev-wrong-ca", {site.pem("other")});
  a.start();
  INFO("agent log:\n" << tail(a.log()));
  REQUIRE(wait_until([&] { return !a.device_id().empty(); }, std::chrono::seconds(30)));
  const std::string id = a.device_id();
  site.push(1, crypto::random_token(20000));

  // Refused with a clear TLS error, retried (reconnect-max 2s) without exiting.
  REQUIRE(wait_until([&] { return count(a.log(), "broker connect failed: TLS handshake") >= 3; },
                     std::chrono::seconds(40)));
  const std::string log = a.log();
  CHECK(count(log, "state=broker_tls_rejected") == 1);  // said once, not per retry
  CHECK(log.find("certificate verify failed") != std::string::npos);
  // The file Paho was given: the hub's device CA with tls-ca-file appended.
  CHECK(log.find("not signed by the CA in " + (a.root() / "var/lib/flotilla/tls/broker-ca.pem").string()) !=
        std::string::npos);
  CHECK_FALSE(a.wait_exit(std::chrono::milliseconds(0)).has_value());  // still running: no crash loop
  CHECK(log.find("connected device=") == std::string::npos);
  // Nothing applied: the bundle's files are not on the node, the hub never saw it online.
  CHECK_FALSE(stdfs::exists(a.root() / "etc/rancher/k3s/config.yaml.d/10-edge.yaml"));
  CHECK_FALSE(stdfs::exists(a.root() / "var/lib/rancher/k3s/agent/images/images.tar"));
  auto d = site.hub.device(id);
  CHECK(d["online"] == false);
  CHECK(d["applied_version"] == 0);

  // Lost nothing: with the right CA added, the same identity and credentials
  // connect (no new enrollment) and the retained desired state applies.
  a.stop();
  TlsSite::set_ca(a, {site.pem("other"), site.pem("fleet")});
  a.start();
  REQUIRE(wait_until(
      [&] {
        auto dd = site.hub.device(id);
        return dd["applied_version"] == 1 && dd["state"] == "applied";
      },
      std::chrono::seconds(60)));
  CHECK(a.device_id() == id);
  CHECK(count(a.log(), "enrolled device=") == 1);
}

TEST_CASE("HTTPS enrollment with a private CA works with tls-ca-file and fails clearly without it",
          "[integration][tls][enroll-tls]") {
  TlsSite site;
  site.hub.start({"--tls-cert", site.pem("rest"), "--tls-key", site.key("rest")}, site.pem("fleet"));
  auto& a = site.agent("dev-no-ca", {});
  a.start();
  INFO("agent log:\n" << tail(a.log()));
  REQUIRE(wait_until([&] { return a.log().find("state=enrollment_failed") != std::string::npos; },
                     std::chrono::seconds(30)));
  CHECK(a.log().find("certificate was rejected") != std::string::npos);
  CHECK(a.log().find("set tls-ca-file") != std::string::npos);
  CHECK_FALSE(stdfs::exists(a.root() / "var/lib/flotilla/credentials.pb"));
  CHECK(site.hub.devices().empty());
  CHECK_FALSE(a.wait_exit(std::chrono::milliseconds(0)).has_value());  // keeps trying, does not exit

  a.stop();
  TlsSite::set_ca(a, {site.pem("fleet")});
  a.append_config("tls-ca-file: /etc/flotilla/ca.pem\n");
  a.start();
  REQUIRE(wait_until([&] { return !a.device_id().empty() && site.hub.device(a.device_id())["online"] == true; },
                     std::chrono::seconds(40)));
  CHECK(site.hub.devices().size() == 1);
}

TEST_CASE("the hub refuses a broken broker TLS setup before starting mosquitto", "[integration][tls][broker-tls]") {
  TempDir tmp;
  make_ca(tmp.path(), "fleet");
  make_server_cert(tmp.path(), "fleet", "broker");
  make_server_cert(tmp.path(), "fleet", "other");
  const auto data = tmp.path() / "hub";
  auto run = [&](std::vector<std::string> extra) {
    std::vector<std::string> argv = {bin_dir() + "/flotilla-hub", "--data-dir", data.string(), "--listen",
                                     "127.0.0.1:0", "--config", ""};
    argv.insert(argv.end(), extra.begin(), extra.end());
    auto r = proc::run(argv, std::chrono::seconds(20));
    REQUIRE(r);
    return *r;
  };
  const std::string cert = (tmp.path() / "broker.pem").string();

  auto half = run({"--broker-tls-cert", cert});
  INFO(half.err);
  CHECK(half.exit_code == 2);
  CHECK(half.err.find("broker-tls-key") != std::string::npos);

  auto mismatch = run({"--broker-tls-cert", cert, "--broker-tls-key", (tmp.path() / "other.key").string()});
  INFO(mismatch.err);
  CHECK(mismatch.exit_code == 2);
  CHECK(mismatch.err.find("broker-tls-key") != std::string::npos);
  CHECK(mismatch.err.find("does not match") != std::string::npos);

  auto not_pem = run({"--broker-tls-cert", cert, "--broker-tls-key", (tmp.path() / "broker.key").string(),
                      "--broker-tls-ca", (tmp.path() / "broker.cnf").string()});
  INFO(not_pem.err);
  CHECK(not_pem.exit_code == 2);
  CHECK(not_pem.err.find("broker-tls-ca") != std::string::npos);
  // No broker was started and no key copied.
  CHECK_FALSE(stdfs::exists(data / "broker/mosquitto.pid"));
  CHECK_FALSE(stdfs::exists(data / "broker/tls"));
}

#include "flotilla/hub/broker.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>
#include <grp.h>
#include <pwd.h>
#include <sys/wait.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <random>
#include <thread>
#include <cstring>

#include "flotilla/common/crypto.hpp"
#include "flotilla/common/encoding.hpp"
#include "flotilla/common/fs.hpp"
#include "flotilla/common/log.hpp"
#include "flotilla/hub/tls_files.hpp"

namespace flotilla::hub {

std::string mosquitto_password_hash(const std::string& password, int iterations) {
  Bytes salt = crypto::random_bytes(12);
  unsigned char out[64];
  PKCS5_PBKDF2_HMAC(password.data(), static_cast<int>(password.size()), salt.data(), static_cast<int>(salt.size()),
                    iterations, EVP_sha512(), sizeof out, out);
  return "$7$" + std::to_string(iterations) + "$" + to_base64(salt) + "$" + to_base64(out, sizeof out);
}

namespace {
bool can_bind(const std::string& host, int port) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  ::inet_pton(AF_INET, host.c_str(), &addr.sin_addr);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  const bool ok = ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0;
  ::close(fd);
  return ok;
}
}  // namespace

// A port the broker keeps across restarts must not come from the kernel's
// ephemeral range: while the broker is down, a device retrying to connect to
// 127.0.0.1:P can be handed local port P and connect to itself, and the
// restarted broker then finds its port taken.
Result<int> free_listen_port(const std::string& host) {
  int lo = 32768, hi = 60999;
  if (auto r = fs::read_file("/proc/sys/net/ipv4/ip_local_port_range", 64)) {
    std::sscanf(r->c_str(), "%d %d", &lo, &hi);
  }
  std::mt19937_64 rng(crypto::random_u64());
  // Prefer the registered range below the ephemeral one; fall back above it.
  const int from = 10000, to = std::max(from + 1000, lo - 1);
  std::uniform_int_distribution<int> pick(from, to);
  for (int i = 0; i < 200; ++i) {
    const int p = pick(rng);
    if ((p < lo || p > hi) && can_bind(host, p)) return p;
  }
  return free_port(host);
}

Result<int> free_port(const std::string& host) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return make_error(Errc::io, "socket failed");
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  ::inet_pton(AF_INET, host.c_str(), &addr.sin_addr);
  addr.sin_port = 0;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    ::close(fd);
    return make_error(Errc::io, "cannot bind a free port on " + host);
  }
  socklen_t len = sizeof addr;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  ::close(fd);
  return static_cast<int>(ntohs(addr.sin_port));
}

bool wait_for_port(const std::string& host, int port, std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    ::inet_pton(AF_INET, host.c_str(), &addr.sin_addr);
    addr.sin_port = htons(static_cast<uint16_t>(port));
    bool ok = ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0;
    ::close(fd);
    if (ok) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return false;
}

namespace {
// mosquitto started as root drops to the "mosquitto" user; give that user the
// files it must read and the directory it persists to, and nothing else
// (hub.secret stays the hub's).
void hand_to_broker_user(const std::filesystem::path& p) {
  if (::geteuid() != 0) return;
  if (const passwd* pw = ::getpwnam("mosquitto")) {
    if (::chown(p.c_str(), pw->pw_uid, pw->pw_gid) != 0) {
      log::get("hub")->warn("cannot chown {} to mosquitto: {}", p.string(), std::strerror(errno));
    }
  }
}

// Whether the "mosquitto" user can reach dir (every parent traversable).
// Checked by a child that takes that identity, since ACLs and modes of all
// parents decide it.
bool broker_user_can_reach(const std::filesystem::path& dir) {
  const passwd* pw = ::getpwnam("mosquitto");
  if (!pw) return false;
  const uid_t uid = pw->pw_uid;
  const gid_t gid = pw->pw_gid;
  pid_t pid = ::fork();
  if (pid < 0) return false;
  if (pid == 0) {
    if (::setgroups(0, nullptr) != 0 || ::setgid(gid) != 0 || ::setuid(uid) != 0) _exit(2);
    _exit(::access(dir.c_str(), X_OK) == 0 ? 0 : 1);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  return WIFEXITED(status) && WEXITSTATUS(status) == 0;
}
}  // namespace

Result<std::unique_ptr<EmbeddedBroker>> EmbeddedBroker::start(const BrokerConfig& cfg, const Credentials& devices) {
  std::unique_ptr<EmbeddedBroker> b(new EmbeddedBroker());
  b->cfg_ = cfg;
  // Bad TLS files are the operator's to fix: refused before anything is
  // written or started, rather than as a line in mosquitto's log.
  if (cfg.tls()) {
    if (auto s = check_tls_key_pair("broker-tls-cert", cfg.tls_cert_file, "broker-tls-key", cfg.tls_key_file); !s) {
      return s.error();
    }
    if (!cfg.tls_ca_file.empty()) {
      if (auto s = check_ca_file("broker-tls-ca", cfg.tls_ca_file); !s) return s.error();
    }
  }
  if (auto s = fs::ensure_own_dir(cfg.dir, 0700); !s) return s.error();
  // The hub's own broker password is made once and kept, 0600, in the data dir.
  const auto secret_path = cfg.dir / "hub.secret";
  if (auto existing = fs::read_file(secret_path, 1024); existing && !existing->empty()) {
    b->hub_password_ = *existing;
  } else {
    b->hub_password_ = crypto::random_token(24);
    if (auto s = fs::write_file_atomic(secret_path, b->hub_password_, 0600); !s) return s.error();
  }
  // Keep the port across restarts: devices store the broker address they enrolled with.
  const auto port_path = cfg.dir / "port";
  if (b->cfg_.port == 0) {
    if (auto p = fs::read_file(port_path, 64); p && !p->empty()) {
      b->cfg_.port = std::stoi(*p);
    } else {
      auto fp = free_listen_port(cfg.listen_host);
      if (!fp) return fp.error();
      b->cfg_.port = *fp;
    }
  }
  if (auto s = fs::write_file_atomic(port_path, std::to_string(b->cfg_.port), 0600); !s) return s.error();
  if (::geteuid() == 0 && !broker_user_can_reach(cfg.dir.parent_path())) {
    // mosquitto started as root drops to user "mosquitto", which cannot reach
    // this data dir (a 0700 parent, say). Rather than fail, keep root and say so.
    log::get("hub")->warn("user mosquitto cannot reach {}; the embedded broker runs as root. Run the hub as "
                          "a dedicated user, or keep its data dir under a traversable path.", cfg.dir.string());
    b->run_as_root_ = true;
  }
  if (auto s = b->install_tls_files(); !s) return s.error();
  if (auto s = b->write_config(); !s) return s.error();
  if (auto s = b->write_passwords(devices); !s) return s.error();
  if (auto s = b->launch(); !s) return s.error();
  b->watchdog_ = std::thread([p = b.get()] { p->watchdog(); });
  return b;
}

EmbeddedBroker::~EmbeddedBroker() { stop(); }

std::string EmbeddedBroker::url() const {
  return (cfg_.tls() ? "ssl://" : "tcp://") + cfg_.listen_host + ":" + std::to_string(cfg_.port);
}

// The operator's files (checked in start()) are copied to <dir>/tls/: when
// the hub runs as root, mosquitto reads them as its own user, who may not
// reach the originals.
Status EmbeddedBroker::install_tls_files() {
  const auto tls_dir = cfg_.dir / "tls";
  if (!cfg_.tls()) {
    std::error_code ec;
    std::filesystem::remove_all(tls_dir, ec);  // no stale key left behind after TLS is turned off
    return {};
  }
  if (auto s = fs::ensure_own_dir(tls_dir, 0700); !s) return s;
  hand_to_broker_user(tls_dir);
  for (const auto& [from, name] : {std::pair{cfg_.tls_cert_file, "broker.pem"}, std::pair{cfg_.tls_key_file, "broker.key"}}) {
    auto bytes = fs::read_file(from, 1 << 20);
    if (!bytes) return bytes.error().with_context("read " + from);
    if (auto s = fs::write_file_atomic(tls_dir / name, *bytes, 0600); !s) return s;
    hand_to_broker_user(tls_dir / name);
  }
  return {};
}

Status EmbeddedBroker::write_config() {
  const auto d = cfg_.dir.string();
  std::string conf =
      "# Generated by flotilla-hub at every start; edits are overwritten.\n"
      "per_listener_settings false\n"
      "allow_anonymous false\n"
      "password_file " + d + "/passwd\n"
      "acl_file " + d + "/acl\n"
      "persistence true\n"
      "persistence_location " + d + "/\n"
      "autosave_interval 60\n"
      // The hub's persistent session queues every report while it is down.
      "max_queued_messages 1000000\n"

      "max_inflight_messages 100\n"
      "log_dest stderr\n"
      "log_type error\nlog_type warning\nlog_type notice\n"
      "connection_messages false\n" +
      std::string(run_as_root_ ? "user root\n" : "") +
      "listener " + std::to_string(cfg_.port) + " " + cfg_.listen_host + "\n"
      // After the listener line on purpose: before it, a listener option
      // configures mosquitto's default listener, which then also opens
      // 0.0.0.0:1883. Client id = username: no device can take over another's
      // (or the hub's) session.
      "use_username_as_clientid true\n";
  if (cfg_.tls()) {
    // The one listener is TLS-only: there is no plain port to fall back to.
    conf += "certfile " + d + "/tls/broker.pem\n"
            "keyfile " + d + "/tls/broker.key\n"
            "tls_version tlsv1.2\n";  // the minimum; TLS 1.3 is offered too
  }
  std::string acl =
      "# Generated by flotilla-hub. The hub may use every Flotilla topic; a device\n"
      "# (MQTT username = device id) may read its own desired state and write its\n"
      "# own report and presence, nothing else.\n"
      "user " + cfg_.hub_username + "\n"
      "topic readwrite flotilla/v1/#\n"
      "\n"
      "pattern read flotilla/v1/d/%u/desired\n"
      "pattern write flotilla/v1/d/%u/report\n"
      "pattern write flotilla/v1/d/%u/presence\n"
      "# A gateway (an enrolled device with its own session) carries the devices\n"
      "# enrolled behind it: exactly the subtree under its own id. The hub drops\n"
      "# a message there for a device that is not behind that gateway.\n"
      "pattern read flotilla/v1/g/%u/d/+/desired\n"
      "pattern write flotilla/v1/g/%u/d/+/report\n"
      "pattern write flotilla/v1/g/%u/d/+/presence\n"
      "# Its devices' reports, many per message (v1::GatewayReports).\n"
      "pattern write flotilla/v1/g/%u/reports\n";
  if (auto s = fs::write_file_atomic(cfg_.dir / "mosquitto.conf", conf, 0600); !s) return s;
  if (auto s = fs::write_file_atomic(cfg_.dir / "acl", acl, 0600); !s) return s;
  hand_to_broker_user(cfg_.dir);
  hand_to_broker_user(cfg_.dir / "mosquitto.conf");
  hand_to_broker_user(cfg_.dir / "acl");
  return {};
}

Status EmbeddedBroker::write_passwords(const Credentials& devices) {
  // The probe account's password changes with every rewrite: logging in
  // with it proves that mosquitto runs on this very file.
  probe_password_ = crypto::random_token(18);
  std::string text = cfg_.hub_username + ":" + mosquitto_password_hash(hub_password_) + "\n";
  text += std::string(kReloadProbeUser) + ":" + mosquitto_password_hash(probe_password_) + "\n";
  for (const auto& [user, hash] : devices) text += user + ":" + hash + "\n";
  // The file is handed to the broker's user before it takes the name: mosquitto
  // may still be reloading after the previous SIGHUP, and a passwd it cannot
  // open makes it refuse every client, the hub included (seen with
  // concurrent enrollments, flotilla-sim direct mode).
  const auto staged = cfg_.dir / "passwd.new";
  if (auto s = fs::write_file_atomic(staged, text, 0600); !s) return s;
  hand_to_broker_user(staged);
  std::error_code ec;
  std::filesystem::rename(staged, cfg_.dir / "passwd", ec);
  if (ec) return make_error(Errc::io, "rename " + staged.string() + ": " + ec.message());
  return {};
}

std::string mqtt_connect_packet(const std::string& client_id, const std::string& user, const std::string& password) {
  auto field = [](std::string& out, const std::string& v) {
    out.push_back(static_cast<char>(v.size() >> 8));
    out.push_back(static_cast<char>(v.size() & 0xff));
    out += v;
  };
  std::string body;
  field(body, "MQTT");
  body.push_back(4);                       // protocol level 3.1.1
  body.push_back(static_cast<char>(0xC2));  // username, password, clean session
  body.push_back(0);
  body.push_back(5);                       // keepalive 5 s
  field(body, client_id);
  field(body, user);
  field(body, password);
  std::string packet(1, static_cast<char>(0x10));
  for (size_t n = body.size();;) {          // remaining length, varint
    char byte = static_cast<char>(n % 128);
    n /= 128;
    packet.push_back(static_cast<char>(byte | (n ? 0x80 : 0)));
    if (!n) break;
  }
  packet += body;
  return packet;
}

// One MQTT 3.1.1 CONNECT as the probe account over a plain loopback socket
// (a full client library costs tens of milliseconds per attempt); true when
// the broker answers CONNACK 0, accepted.
bool EmbeddedBroker::probe_login() const {
  const std::string packet = mqtt_connect_packet(kReloadProbeUser, kReloadProbeUser, probe_password_);

  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  timeval tv{2, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  ::inet_pton(AF_INET, cfg_.listen_host.c_str(), &addr.sin_addr);
  addr.sin_port = htons(static_cast<uint16_t>(cfg_.port));
  bool ok = false;
  unsigned char ack[4] = {0, 0, 0, 0};
  // With TLS the probe speaks it too (the listener has no plain side). It
  // does not check the certificate: it talks to its own child over the
  // listen address, and its password opens no topic.
  std::unique_ptr<SSL_CTX, decltype(&SSL_CTX_free)> ctx(nullptr, SSL_CTX_free);
  std::unique_ptr<SSL, decltype(&SSL_free)> tls(nullptr, SSL_free);
  auto send_all = [&](const char* p, size_t n) {
    if (tls) return SSL_write(tls.get(), p, static_cast<int>(n)) == static_cast<int>(n);
    return ::send(fd, p, n, MSG_NOSIGNAL) == static_cast<ssize_t>(n);
  };
  auto recv_some = [&](unsigned char* p, size_t n) -> ssize_t {
    if (tls) return SSL_read(tls.get(), p, static_cast<int>(n));
    return ::recv(fd, p, n, 0);
  };
  bool open = ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0;
  if (open && cfg_.tls()) {
    ctx.reset(SSL_CTX_new(TLS_client_method()));
    open = ctx && SSL_CTX_set_min_proto_version(ctx.get(), TLS1_2_VERSION) == 1;
    if (open) tls.reset(SSL_new(ctx.get()));
    open = tls && SSL_set_fd(tls.get(), fd) == 1 && SSL_connect(tls.get()) == 1;
    ERR_clear_error();
  }
  if (open && send_all(packet.data(), packet.size())) {
    size_t got = 0;
    while (got < sizeof ack) {
      const ssize_t n = recv_some(ack + got, sizeof ack - got);
      if (n <= 0) break;
      got += static_cast<size_t>(n);
    }
    ok = got == sizeof ack && ack[0] == 0x20 && ack[3] == 0;
    if (ok) {
      const char disconnect[2] = {static_cast<char>(0xE0), 0};
      (void)send_all(disconnect, sizeof disconnect);
    }
  }
  if (tls) {
    (void)SSL_shutdown(tls.get());
    ERR_clear_error();
  }
  tls.reset();
  ::close(fd);
  return ok;
}

Status EmbeddedBroker::set_device_credentials(const Credentials& devices) {
  std::lock_guard lock(mu_);
  if (auto s = write_passwords(devices); !s) return s;
  // mosquitto clears its reload flag only after reloading, so a SIGHUP that
  // lands during a reload is lost (a burst of enrollments does that). Send
  // it again until the probe account proves the new file is in force.
  const auto start = std::chrono::steady_clock::now();
  const auto deadline = start + cfg_.reload_timeout;
  auto next_signal = start;
  for (;;) {
    const auto now = std::chrono::steady_clock::now();
    if (now >= next_signal) {
      if (!child_.signal(SIGHUP)) return make_error(Errc::unavailable, "broker is not running", true);
      next_signal = now + std::chrono::milliseconds(500);
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    if (probe_login()) return {};
    if (std::chrono::steady_clock::now() >= deadline) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return make_error(Errc::unavailable,
                    "mosquitto did not load the new password file within " +
                        std::to_string(cfg_.reload_timeout.count()) + " ms (see " +
                        (cfg_.dir / "mosquitto.log").string() + ")",
                    true);
}

Status EmbeddedBroker::launch() {
  stop_stale();
  proc::SpawnOptions so;
  so.argv = {cfg_.mosquitto_bin, "-c", (cfg_.dir / "mosquitto.conf").string()};
  // If the hub is killed outright, its broker goes with it.
  so.die_with_parent = true;
  so.stdout_path = (cfg_.dir / "mosquitto.log").string();
  so.stderr_path = "stdout";
  auto child = proc::spawn(so);
  if (!child) {
    return child.error().with_context("start mosquitto (install it with apt-get install mosquitto, or pass "
                                      "--broker-url to use an external broker)");
  }
  child_ = std::move(*child);
  bool up = false;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (!up && !child_.poll() && std::chrono::steady_clock::now() < deadline) {
    up = wait_for_port(cfg_.listen_host, cfg_.port, std::chrono::milliseconds(100));
  }
  if (!up || child_.poll()) {
    auto tail = fs::read_file(cfg_.dir / "mosquitto.log", 1 << 20).value_or("");
    if (tail.size() > 600) tail = tail.substr(tail.size() - 600);
    child_.kill_now();
    return make_error(Errc::unavailable, "mosquitto did not start listening on " + url() + "; its log ends: " + tail);
  }
  (void)fs::write_file_atomic(cfg_.dir / "mosquitto.pid", std::to_string(child_.pid()), 0600);
  log::get("hub")->info("embedded broker started url={} pid={}", url(), child_.pid());
  return {};
}

void EmbeddedBroker::stop_stale() {
  // A broker left behind by a hub that was killed before PDEATHSIG could act
  // (or by an older hub) would hold the port with stale credentials.
  auto text = fs::read_file(cfg_.dir / "mosquitto.pid", 64);
  if (!text) return;
  pid_t pid = 0;
  try {
    pid = static_cast<pid_t>(std::stol(*text));
  } catch (const std::exception&) {
    return;
  }
  if (pid <= 0 || !proc::alive(pid) || pid == child_.pid()) return;
  auto cmdline = fs::read_file("/proc/" + std::to_string(pid) + "/cmdline", 4096).value_or("");
  if (cmdline.find((cfg_.dir / "mosquitto.conf").string()) == std::string::npos) return;
  log::get("hub")->warn("stopping a stale embedded broker pid={} left by an earlier hub", pid);
  proc::Child stale(pid);
  stale.terminate(std::chrono::seconds(5));
}

void EmbeddedBroker::watchdog() {
  auto logger = log::get("hub");
  auto delay = std::chrono::milliseconds(250);
  while (!stopping_) {
    std::this_thread::sleep_for(delay);
    std::lock_guard lock(mu_);
    if (stopping_) break;
    if (auto code = child_.poll()) {
      logger->error("embedded broker exited code={}; restarting", *code);
      if (auto s = launch(); !s) {
        logger->error("broker restart failed: {}", s.error().message);
        delay = std::min(delay * 2, std::chrono::milliseconds(10000));
        continue;
      }
    }
    delay = std::chrono::milliseconds(250);
  }
}

void EmbeddedBroker::stop() {
  if (stopping_.exchange(true)) return;
  if (watchdog_.joinable()) watchdog_.join();
  std::lock_guard lock(mu_);
  child_.terminate(std::chrono::milliseconds(5000));
}

}  // namespace flotilla::hub

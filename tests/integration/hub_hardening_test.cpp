// The hub against attacks from below: a root hub and the directory its
// broker's user could once write, and devices that send more than any
// legitimate message. Real flotilla-hub, real mosquitto, real agents.
#include <catch2/catch.hpp>

#include <arpa/inet.h>
#include <dirent.h>
#include <fcntl.h>
#include <grp.h>
#include <netinet/in.h>
#include <pwd.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <fstream>
#include <functional>
#include <set>

#include "flotilla/common/fs.hpp"
#include "flotilla/common/http_client.hpp"
#include "flotilla/common/transport.hpp"
#include "flotilla/hub/broker.hpp"
#include "flotilla/hub/http_server.hpp"
#include "flotilla/hub/service.hpp"
#include "flotilla/v1/report.pb.h"
#include "tests/support/harness.hpp"

using namespace flotilla;
using namespace flotilla::test;

namespace {

// Runs f in a child process as the broker's user (as mosquitto would run
// code planted in it); returns f's result, or -1 if the child could not
// take that identity.
int as_broker_user(const std::function<int()>& f) {
  const passwd* pw = ::getpwnam("mosquitto");
  if (!pw) return -1;
  const uid_t uid = pw->pw_uid;
  const gid_t gid = pw->pw_gid;
  const pid_t pid = ::fork();
  if (pid < 0) return -1;
  if (pid == 0) {
    if (::setgroups(0, nullptr) != 0 || ::setgid(gid) != 0 || ::setuid(uid) != 0) _exit(255);
    _exit(f());
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

struct Owner {
  uid_t uid = 0;
  gid_t gid = 0;
  mode_t mode = 0;
  std::string content;
  bool operator==(const Owner&) const = default;
};

Owner owner_of(const stdfs::path& p) {
  struct stat st {};
  REQUIRE(::lstat(p.c_str(), &st) == 0);
  return {st.st_uid, st.st_gid, st.st_mode & 07777, S_ISREG(st.st_mode) ? fs::read_file(p).value_or("?") : ""};
}

uid_t process_uid(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("Uid:", 0) == 0) return static_cast<uid_t>(std::stoul(line.substr(4)));
  }
  return static_cast<uid_t>(-1);
}

void wait_online(Hub& hub, const test::Agent& a) {
  const bool ok = wait_until(
      [&] {
        try {
          return hub.device(a.device_id())["online"] == true;
        } catch (const std::exception&) {
          return false;
        }
      },
      std::chrono::seconds(60));
  if (!ok) FAIL("agent did not come online; hub log:\n" << hub.log() << "\nagent log:\n" << a.log());
}

// A raw TCP client, so a test controls exactly what is sent (headers
// without the body they announce) and how long it waits for an answer.
class RawClient {
 public:
  explicit RawClient(int port) {
    fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    REQUIRE(fd_ >= 0);
    timeval tv{15, 0};  // a bounded wait; the refusal comes at once
    ::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    ::inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
    addr.sin_port = htons(static_cast<uint16_t>(port));
    REQUIRE(::connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
  }
  ~RawClient() { close(); }
  void close() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }
  void send(const std::string& bytes) { REQUIRE(::send(fd_, bytes.data(), bytes.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(bytes.size())); }
  // Reads until the header block is in (or the peer closes or the wait ends).
  std::string head() {
    std::string got;
    char buf[4096];
    while (got.find("\r\n\r\n") == std::string::npos) {
      const ssize_t n = ::recv(fd_, buf, sizeof buf, 0);
      if (n <= 0) break;
      got.append(buf, static_cast<size_t>(n));
    }
    return got;
  }

 private:
  int fd_ = -1;
};

int port_of(const std::string& url) { return std::stoi(url.substr(url.rfind(':') + 1)); }

}  // namespace

TEST_CASE("a root hub follows no link the broker's user planted and keeps the broker's directory its own",
          "[integration][security]") {
  if (::geteuid() != 0 || !::getpwnam("mosquitto")) {
    WARN("needs root and a mosquitto user: skipped");
    return;
  }
  const passwd* pw = ::getpwnam("mosquitto");
  const uid_t broker_uid = pw->pw_uid;
  const gid_t broker_gid = pw->pw_gid;
  TempDir tmp;
  // Root's own files the attack aims at: a secret, and a directory in which
  // a log must not appear.
  const stdfs::path vault = tmp.path() / "vault";
  stdfs::create_directories(vault);
  ::chmod(vault.c_str(), 0700);
  REQUIRE(fs::write_file_atomic(vault / "secret", "TOPSECRET", 0600));
  const Owner secret_before = owner_of(vault / "secret");

  // The layout an older hub left: broker/ owned by the broker's user, who
  // replaced the hub's files with links into root's vault.
  const stdfs::path data = tmp.path() / "hub";
  stdfs::create_directories(data / "broker");
  ::chmod(data.c_str(), 0711);
  REQUIRE(::chown((data / "broker").c_str(), broker_uid, broker_gid) == 0);
  const std::vector<std::pair<std::string, stdfs::path>> planted = {
      {"mosquitto.log", vault / "created.log"}, {"passwd.new", vault / "secret"}, {"passwd", vault / "secret"},
      {"mosquitto.conf", vault / "secret"},     {"acl", vault / "secret"},        {"hub.secret", vault / "secret"},
      {"mosquitto.pid", vault / "secret"},      {"mosquitto.db", vault / "secret"}, {"tls", vault}};
  std::vector<std::pair<std::string, std::string>> links;  // made before fork: the child only makes system calls
  for (const auto& [name, target] : planted) links.emplace_back(target.string(), (data / "broker" / name).string());
  REQUIRE(as_broker_user([&] {
            for (const auto& [target, link] : links) {
              if (::symlink(target.c_str(), link.c_str()) != 0) return 1;
            }
            return 0;
          }) == 0);

  Hub hub(data);
  hub.start();
  const auto release = bundles::generate_key();
  AgentOptions o;
  o.root_keys = {bundles::public_key_text(release.pub)};
  auto agent = std::make_unique<test::Agent>(tmp.path() / "dev", hub.url(), hub.enrollment_token({{"env", "it"}}, 1), o);
  agent->start();
  // The agent's certificate opens mosquitto, which runs as its own user.
  wait_online(hub, *agent);

  // Nothing of root's was touched: not chowned, not written, no log created.
  CHECK(owner_of(vault / "secret") == secret_before);
  CHECK_FALSE(stdfs::exists(vault / "created.log"));
  std::set<std::string> in_vault;
  for (const auto& e : stdfs::directory_iterator(vault)) in_vault.insert(e.path().filename().string());
  CHECK(in_vault == std::set<std::string>{"secret"});

  // The directory is the hub's again, and nothing in it is a link.
  const stdfs::path broker = data / "broker";
  const Owner dir = owner_of(broker);
  CHECK(dir.uid == 0);
  CHECK(dir.gid == broker_gid);
  CHECK(dir.mode == 0710);
  for (const auto& e : stdfs::directory_iterator(broker)) {
    INFO(e.path());
    CHECK_FALSE(e.is_symlink());
  }
  // With certificates there is no password file at all (the planted link is gone);
  // mosquitto reads its TLS files, the device CA and the CRL instead.
  CHECK_FALSE(stdfs::exists(stdfs::symlink_status(broker / "passwd")));
  for (const char* name : {"mosquitto.conf", "acl", "tls/broker.pem", "tls/broker.key", "tls/client-ca.pem",
                           "tls/crl.pem"}) {
    INFO(name);
    const Owner f = owner_of(broker / name);
    CHECK(f.uid == 0);
    CHECK(f.gid == broker_gid);
    CHECK(f.mode == 0640);
  }
  for (const char* name : {"hub.secret", "port", "mosquitto.pid", "mosquitto.log"}) {
    INFO(name);
    const Owner f = owner_of(broker / name);
    CHECK(f.uid == 0);
    CHECK(f.mode == 0600);
  }
  CHECK(owner_of(broker / "hub.secret").content != "TOPSECRET");
  CHECK(owner_of(broker / "state").uid == broker_uid);

  // mosquitto runs as its own user, and that user may write only state/.
  const pid_t mosquitto_pid = static_cast<pid_t>(std::stol(fs::read_file(broker / "mosquitto.pid").value()));
  CHECK(process_uid(mosquitto_pid) == broker_uid);
  const std::string in_broker = (broker / "planted").string(), in_state = (broker / "state" / "own").string();
  const std::string secret = (vault / "secret").string(), state_link = (broker / "state" / "mosquitto.db.new").string();
  CHECK(as_broker_user([&] {
          const bool denied = ::open(in_broker.c_str(), O_WRONLY | O_CREAT | O_EXCL, 0600) < 0 && errno == EACCES;
          const int fd = ::open(in_state.c_str(), O_WRONLY | O_CREAT | O_EXCL, 0600);
          const bool own = fd >= 0;
          if (fd >= 0) ::close(fd);
          // A link in its own directory is all it can still plant.
          const bool linked = ::symlink(secret.c_str(), state_link.c_str()) == 0;
          return denied && own && linked ? 0 : 1;
        }) == 0);

  // A restart reads the hub's own files again and touches nothing through
  // the new link; the device comes back on the same broker port.
  const std::string port = fs::read_file(broker / "port").value();
  hub.stop();
  hub.start();
  CHECK(fs::read_file(broker / "port").value() == port);
  wait_online(hub, *agent);
  CHECK(owner_of(vault / "secret") == secret_before);
  CHECK_FALSE(stdfs::exists(vault / "created.log"));
}

TEST_CASE("the hub refuses a request on its headers and never buffers an unauthenticated body",
          "[integration][security]") {
  TempDir tmp;
  Hub hub(tmp.path() / "hub");
  hub.start();
  const int port = port_of(hub.url());
  const std::string viewer = hub.api_token("viewer", "*");
  struct Case {
    std::string request;
    std::string status;
  };
  // Each announces a body it never sends: the answer must come without it
  // (before, the hub waited for 8 MiB, buffering it, then answered 401).
  const std::vector<Case> cases = {
      {"POST /v1/bundles HTTP/1.1\r\nHost: hub\r\nContent-Length: 8000000\r\n\r\n", "401"},
      {"PUT /v1/trust HTTP/1.1\r\nHost: hub\r\nAuthorization: Bearer flt_api_forged\r\nContent-Length: 4000000\r\n\r\n",
       "401"},
      {"POST /v1/bundles HTTP/1.1\r\nHost: hub\r\nAuthorization: Bearer " + viewer +
           "\r\nContent-Length: 4000000\r\n\r\n",
       "403"},
      // Allowed callers, bodies above the route's own limit (JSON 1 MiB,
      // enrollment 64 KiB), refused on Content-Length alone.
      {"POST /v1/tokens HTTP/1.1\r\nHost: hub\r\nAuthorization: Bearer " + hub.admin_token() +
           "\r\nContent-Length: 2000000\r\n\r\n",
       "413"},
      {"POST /v1/enroll HTTP/1.1\r\nHost: hub\r\nContent-Length: 1000000\r\n\r\n", "413"},
  };
  const size_t audit_before = hub.audit().size();
  for (const auto& c : cases) {
    INFO(c.request.substr(0, 60));
    RawClient client(port);
    client.send(c.request);
    const std::string head = client.head();
    CHECK(head.rfind("HTTP/1.1 " + c.status, 0) == 0);
  }
  // Nothing was stored; the refusals on headers are audited like any other.
  CHECK(hub.call("GET", "/v1/bundles").second["items"].empty());
  CHECK(hub.call("GET", "/v1/tokens").second["items"].size() == 2);  // bootstrap and the viewer
  CHECK(hub.audit().size() >= audit_before + 3);
}

TEST_CASE("the REST server caps connections in total and per peer", "[integration][security]") {
  std::atomic<int> served{0};
  auto handler = [&](const flotilla::hub::HttpRequest&) {
    ++served;
    flotilla::hub::HttpResponse r;
    r.body = "{}";
    return r;
  };
  const std::string get = "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
  SECTION("in total: at the cap it stops accepting until a connection closes") {
    flotilla::hub::HttpServerConfig cfg;
    cfg.port = 0;
    cfg.max_connections = 2;
    cfg.max_connections_per_peer = 0;
    auto server = flotilla::hub::HttpServer::start(cfg, handler);
    REQUIRE(server);
    const auto& stats = (*server)->stats();
    RawClient a((*server)->port()), b((*server)->port());
    REQUIRE(wait_until([&] { return stats.connections == 2 && stats.accept_paused >= 1; }, std::chrono::seconds(10)));
    RawClient c((*server)->port());  // waits in the kernel's backlog
    c.send(get);
    CHECK(stats.connections == 2);
    a.close();
    CHECK(c.head().rfind("HTTP/1.1 200", 0) == 0);
    CHECK(served == 1);
  }
  SECTION("per peer: one over the share is answered 503 and closed at once") {
    flotilla::hub::HttpServerConfig cfg;
    cfg.port = 0;
    cfg.max_connections = 0;
    cfg.max_connections_per_peer = 2;
    auto server = flotilla::hub::HttpServer::start(cfg, handler);
    REQUIRE(server);
    const auto& stats = (*server)->stats();
    RawClient a((*server)->port()), b((*server)->port());
    REQUIRE(wait_until([&] { return stats.connections == 2; }, std::chrono::seconds(10)));
    RawClient c((*server)->port());
    c.send(get);
    CHECK(c.head().rfind("HTTP/1.1 503", 0) == 0);
    CHECK(stats.refused_per_peer == 1);
    CHECK(served == 0);
    a.close();
    REQUIRE(wait_until([&] { return stats.connections == 1; }, std::chrono::seconds(10)));
    RawClient d((*server)->port());
    d.send(get);
    CHECK(d.head().rfind("HTTP/1.1 200", 0) == 0);
  }
}

TEST_CASE("out of file descriptors, the REST server pauses accepting instead of spinning and recovers",
          "[integration][security]") {
  std::atomic<int> served{0};
  flotilla::hub::HttpServerConfig cfg;
  cfg.port = 0;
  cfg.max_connections = 0;
  cfg.max_connections_per_peer = 0;
  auto server = flotilla::hub::HttpServer::start(cfg, [&](const flotilla::hub::HttpRequest&) {
    ++served;
    return flotilla::hub::HttpResponse{};
  });
  REQUIRE(server);
  const auto& stats = (*server)->stats();
  const int port = (*server)->port();
  // A client in another process (it may raise its own descriptor limit),
  // started before this process runs out.
  int go[2];
  REQUIRE(::pipe(go) == 0);
  const pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    char c;
    if (::read(go[0], &c, 1) != 1) _exit(3);
    const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    timeval tv{20, 0};
    ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = htons(static_cast<uint16_t>(port));
    if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) _exit(4);
    const char req[] = "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    if (::send(fd, req, sizeof req - 1, 0) != static_cast<ssize_t>(sizeof req - 1)) _exit(5);
    char buf[12] = {0};
    ssize_t n = 0;
    while (n < 12) {  // only system calls here: this child was forked from a threaded process
      const ssize_t got = ::recv(fd, buf + n, sizeof buf - static_cast<size_t>(n), 0);
      if (got <= 0) break;
      n += got;
    }
    _exit(n >= 12 && std::memcmp(buf, "HTTP/1.1 200", 12) == 0 ? 0 : 6);
  }
  ::close(go[0]);
  // Use up this process's descriptors: the server's accept() gets EMFILE.
  rlimit old{};
  REQUIRE(::getrlimit(RLIMIT_NOFILE, &old) == 0);
  rlimit low = old;
  low.rlim_cur = 256;
  REQUIRE(::setrlimit(RLIMIT_NOFILE, &low) == 0);
  std::vector<int> fillers;
  for (;;) {
    const int fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (fd < 0) break;
    fillers.push_back(fd);
  }
  REQUIRE(::write(go[1], "g", 1) == 1);
  // The failing accept is retried after a pause that doubles (10, 20, 40 ms
  // ...): a handful of errors, where a loop that retried at once made
  // hundreds of thousands in the same time and kept a core busy.
  REQUIRE(wait_until([&] { return stats.accept_errors >= 3; }, std::chrono::seconds(20)));
  CHECK(stats.accept_errors < 50);
  // Descriptors free again: the waiting client is served.
  for (int fd : fillers) ::close(fd);
  REQUIRE(::setrlimit(RLIMIT_NOFILE, &old) == 0);
  ::close(go[1]);
  int status = 0;
  REQUIRE(::waitpid(child, &status, 0) == child);
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
  CHECK(served == 1);
}

TEST_CASE("the embedded broker drops a client that sends more than the largest legitimate message",
          "[integration][security]") {
  TempDir tmp;
  Hub hub(tmp.path() / "hub");
  hub.start();
  const auto release = bundles::generate_key();
  AgentOptions o;
  o.root_keys = {bundles::public_key_text(release.pub)};
  auto agent = std::make_unique<test::Agent>(tmp.path() / "dev", hub.url(), hub.enrollment_token({{"env", "it"}}, 1), o);
  agent->start();
  wait_online(hub, *agent);
  agent->stop();  // its session would displace ours (client id = user name)
  const std::string dev = agent->device_id();
  const double reports_before = metric(metrics_text(hub), "flotilla_mqtt_messages_received_total{kind=\"report\"}");
  REQUIRE(reports_before >= 0);

  auto t = transport::make_paho_transport();
  transport::ConnectOptions co = agent->broker_options(hub.broker_url());
  REQUIRE(t->connect(co));
  // 9 MiB on its own report topic: above the broker's max_packet_size.
  const std::string huge(flotilla::hub::broker_max_packet_size() + 1024, 'x');
  (void)t->publish({transport::device_topic(dev, "report"), huge, 1, false});
  CHECK(wait_until([&] { return !t->connected(); }, std::chrono::seconds(20)));
  t->disconnect();
  // The hub never saw it; a report of a legitimate size still gets through.
  REQUIRE(t->connect(co));
  v1::Report r;
  r.set_device_id(dev);
  r.set_seq(1u << 30);
  r.set_state(v1::AGENT_STATE_IDLE);
  REQUIRE(t->publish({transport::device_topic(dev, "report"), r.SerializeAsString(), 1, false}));
  CHECK(wait_until([&] {
    return metric(metrics_text(hub), "flotilla_mqtt_messages_received_total{kind=\"report\"}") == reports_before + 1;
  }, std::chrono::seconds(20)));
  t->disconnect();
}

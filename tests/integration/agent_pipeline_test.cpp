// The edge agent against real parts: flotilla-hub with its mosquitto and
// artifact store, the static flotilla-agent, the k3s stand-in. Covers the
// journal (kill -9 at every step), artifacts (download with resume, hash
// mismatch), disk reserve, a broker outage during an apply and the static
// binary's size budget.
#include <catch2/catch.hpp>

#include <arpa/inet.h>
#include <elf.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <fstream>
#include <thread>

#include "flotilla/bundles/bundle.hpp"
#include "flotilla/common/crypto.hpp"
#include "flotilla/common/fs.hpp"
#include "flotilla/common/http_client.hpp"
#include "tests/support/harness.hpp"

using namespace flotilla;
using namespace flotilla::test;

namespace {

// A one-connection-at-a-time HTTP server for download tests: serves one body
// with Range support and can cut the first response after `cut_after` bytes.
class RangeServer {
 public:
  RangeServer(std::string body, size_t cut_after) : body_(std::move(body)), cut_after_(cut_after) {
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    REQUIRE(::bind(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
    socklen_t len = sizeof a;
    ::getsockname(fd_, reinterpret_cast<sockaddr*>(&a), &len);
    port_ = ntohs(a.sin_port);
    ::listen(fd_, 8);
    thread_ = std::thread([this] { serve(); });
  }
  ~RangeServer() {
    stop_ = true;
    ::shutdown(fd_, SHUT_RDWR);
    ::close(fd_);
    thread_.join();
  }
  std::string url() const { return "http://127.0.0.1:" + std::to_string(port_) + "/a"; }
  std::vector<std::string> ranges;  // Range header of each request ("" when none)

 private:
  void serve() {
    while (!stop_) {
      int c = ::accept(fd_, nullptr, nullptr);
      if (c < 0) return;
      std::string req;
      char buf[4096];
      while (req.find("\r\n\r\n") == std::string::npos) {
        ssize_t n = ::recv(c, buf, sizeof buf, 0);
        if (n <= 0) break;
        req.append(buf, static_cast<size_t>(n));
      }
      std::string range;
      if (auto p = req.find("Range: bytes="); p != std::string::npos) {
        range = req.substr(p + 13, req.find("\r\n", p) - p - 13);
      }
      ranges.push_back(range);
      size_t from = range.empty() ? 0 : std::stoul(range);
      std::string head;
      std::string part;
      if (from >= body_.size()) {
        head = "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */" + std::to_string(body_.size()) +
               "\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
      } else {
        part = body_.substr(from);
        head = range.empty() ? "HTTP/1.1 200 OK\r\n"
                             : "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes " + std::to_string(from) + "-" +
                                   std::to_string(body_.size() - 1) + "/" + std::to_string(body_.size()) + "\r\n";
        head += "Content-Length: " + std::to_string(part.size()) + "\r\nConnection: close\r\n\r\n";
      }
      if (ranges.size() == 1 && cut_after_ < part.size()) part.resize(cut_after_);  // the link drops
      std::string out = head + part;
      for (size_t off = 0; off < out.size();) {
        ssize_t n = ::send(c, out.data() + off, out.size() - off, MSG_NOSIGNAL);
        if (n <= 0) break;
        off += static_cast<size_t>(n);
      }
      ::close(c);
    }
  }
  std::string body_;
  size_t cut_after_;
  int fd_ = -1;
  uint16_t port_ = 0;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

// A slow-drip server: answers every GET with a 200 and a large
// Content-Length, then sends one byte every `every` until the client leaves.
// Each byte arrives well inside any per-read timeout, so only an overall
// deadline ends the download.
class DripServer {
 public:
  DripServer(size_t claimed, std::chrono::milliseconds every) : claimed_(claimed), every_(every) {
    fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    REQUIRE(::bind(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
    socklen_t len = sizeof a;
    ::getsockname(fd_, reinterpret_cast<sockaddr*>(&a), &len);
    port_ = ntohs(a.sin_port);
    ::listen(fd_, 8);
    thread_ = std::thread([this] { serve(); });
  }
  ~DripServer() {
    stop_ = true;
    ::shutdown(fd_, SHUT_RDWR);
    ::close(fd_);
    thread_.join();
  }
  std::string url() const { return "http://127.0.0.1:" + std::to_string(port_) + "/slow"; }
  std::atomic<size_t> sent{0};
  std::atomic<int> connections{0};

 private:
  void serve() {
    while (!stop_) {
      int c = ::accept(fd_, nullptr, nullptr);
      if (c < 0) return;
      ++connections;
      std::string req;
      char buf[4096];
      while (req.find("\r\n\r\n") == std::string::npos) {
        ssize_t n = ::recv(c, buf, sizeof buf, 0);
        if (n <= 0) break;
        req.append(buf, static_cast<size_t>(n));
      }
      const std::string head = "HTTP/1.1 200 OK\r\nContent-Length: " + std::to_string(claimed_) + "\r\n\r\n";
      bool open = ::send(c, head.data(), head.size(), MSG_NOSIGNAL) > 0;
      while (open && !stop_) {
        std::this_thread::sleep_for(every_);  // the server's pace, not the test's wait
        open = ::send(c, "x", 1, MSG_NOSIGNAL) == 1;
        if (open) ++sent;
      }
      ::close(c);
    }
  }
  size_t claimed_;
  std::chrono::milliseconds every_;
  int fd_ = -1;
  uint16_t port_ = 0;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

std::string random_blob(size_t n) {
  std::string s = crypto::random_token(n / 2 + 1);
  s.resize(n);
  return s;
}

struct Node {
  TempDir tmp;
  Hub hub{tmp.path() / "hub"};
  bundles::KeyPair release = bundles::generate_key();
  std::unique_ptr<test::Agent> agent;

  // fake_init_tool: "systemctl" or "rc-service" puts the FAKE init tool
  // (tests/fakes/fake-init-tool) on the agent's PATH under that name.
  explicit Node(const std::string& extra_config = "", const std::string& fake_init_tool = "") {
    hub.start();
    AgentOptions o;
    o.root_keys = {bundles::public_key_text(release.pub)};
    o.health_timeout = "6s";
    agent = std::make_unique<test::Agent>(tmp.path() / "dev", hub.url(), hub.enrollment_token({{"env", "it"}}), o);
    agent->append_config("drift-interval: 0\n" + extra_config);
    std::map<std::string, std::string> env;
    if (!fake_init_tool.empty()) {
      const auto fakebin = tmp.path() / "fakebin";
      stdfs::create_directories(fakebin);
      stdfs::copy_file(source_dir() + "/tests/fakes/fake-init-tool", fakebin / fake_init_tool);
      const char* path = std::getenv("PATH");
      env["PATH"] = fakebin.string() + ":" + (path ? path : "/usr/bin:/bin");
      env["FAKE_INIT_ROOT"] = agent->root().string();
    }
    agent->start_with_env(env);
    REQUIRE(wait_until([&] { return !agent->device_id().empty() && hub.device(agent->device_id())["online"] == true; },
                       std::chrono::seconds(30)));
  }

  // Uploads an artifact to the hub (content-addressed) and returns its hex sha256.
  std::string upload(const std::string& content) {
    const std::string hex = crypto::sha256_hex(content);
    auto [status, body] = hub.call("PUT", "/v1/artifacts/" + hex, content, "application/octet-stream");
    INFO(body.dump());
    REQUIRE((status == 201 || status == 200));
    return hex;
  }

  // A signed bundle: a drop-in naming the version, a manifest per version and
  // an airgap image artifact (relative URL: the hub's artifact base).
  std::string push(uint64_t version, const std::string& image, const std::string& claimed_hex = "",
                   const std::string& extra_dropin = "") {
    v1::BundleManifest m =
        make_manifest("edge", version,
                      {{v1::FILE_KIND_K3S_CONFIG, "10-edge.yaml", "node-label: v" + std::to_string(version) + "\n" + extra_dropin},
                       {v1::FILE_KIND_MANIFEST, "app-" + std::to_string(version) + ".yaml", "kind: ConfigMap\n"}});
    if (!image.empty()) {
      const std::string hex = claimed_hex.empty() ? upload(image) : claimed_hex;
      add_airgap_artifact(m, hex, image.size(), hex);
    }
    auto env = bundles::wrap(m);
    REQUIRE(bundles::sign(env, release));
    auto [status, body] = hub.call("POST", "/v1/bundles", bundles::serialize_envelope(env), "application/octet-stream");
    INFO(body.dump());
    REQUIRE(status == 201);
    return body["id"].get<std::string>();
  }

  std::string campaign(const std::string& bundle_id) {
    auto [status, body] = hub.call("POST", "/v1/campaigns", json{{"bundle", bundle_id}, {"selector", "env=it"}}.dump());
    INFO(body.dump());
    REQUIRE(status == 201);
    return body["id"].get<std::string>();
  }

  std::string file(const std::string& rel) const { return fs::read_file(agent->root() / rel).value_or("<missing>"); }

  bool k3s_ready() const {
    auto r = proc::run({(agent->root() / "usr/local/bin/k3s").string(), "kubectl", "--kubeconfig",
                        (agent->root() / "etc/rancher/k3s/k3s.yaml").string(), "get", "--raw", "/readyz"},
                       std::chrono::seconds(5));
    return r && r->exit_code == 0 && r->out == "ok";
  }

  // The node runs exactly bundle `version` (with `image`): files, k3s, the hub's view.
  void require_runs(uint64_t version, const std::string& image) {
    INFO("agent log:\n" << agent->log().substr(agent->log().size() > 6000 ? agent->log().size() - 6000 : 0));
    REQUIRE(wait_until(
        [&] {
          auto d = hub.device(agent->device_id());
          return d["applied_version"] == version && d["state"] == "applied";
        },
        std::chrono::seconds(40)));
    CHECK(file("etc/rancher/k3s/config.yaml.d/10-edge.yaml") == "node-label: v" + std::to_string(version) + "\n");
    CHECK(stdfs::exists(agent->root() / ("var/lib/rancher/k3s/server/manifests/app-" + std::to_string(version) + ".yaml")));
    size_t manifests = 0;
    for (const auto& e : stdfs::directory_iterator(agent->root() / "var/lib/rancher/k3s/server/manifests")) {
      manifests += e.path().filename().string().rfind("app-", 0) == 0 ? 1 : 0;
    }
    CHECK(manifests == 1);
    if (!image.empty()) CHECK(file("var/lib/rancher/k3s/agent/images/images.tar") == image);
    const bool backups_left = stdfs::exists(agent->root() / "var/lib/flotilla/backup") &&
                              !stdfs::is_empty(agent->root() / "var/lib/flotilla/backup");
    CHECK_FALSE(backups_left);
    CHECK(wait_until([&] { return k3s_ready(); }, std::chrono::seconds(20)));
  }
};

}  // namespace

TEST_CASE("artifact download resumes with Range after the connection drops", "[integration][agent][artifacts]") {
  TempDir tmp;
  const std::string body = random_blob(300000);
  RangeServer server(body, 70000);
  const auto dest = tmp.path() / "a.part";
  http::DownloadOptions o;
  o.max_bytes = body.size();
  o.io_timeout = std::chrono::seconds(5);
  auto r = http::download_to_file(server.url(), dest, o);
  INFO((r ? std::string() : r.error().message));
  REQUIRE(r);
  CHECK(r->size == body.size());
  CHECK(r->requests == 2);
  CHECK(fs::read_file(dest).value() == body);
  REQUIRE(server.ranges.size() == 2);
  CHECK(server.ranges[0].empty());
  CHECK(server.ranges[1] == "70000-");

  // A complete file asks once more, gets 416, and stays as it is.
  auto again = http::download_to_file(server.url(), dest, o);
  REQUIRE(again);
  CHECK(again->size == body.size());
  CHECK(server.ranges.back() == std::to_string(body.size()) + "-");

  // More bytes than allowed: too_large, and the caller learns it.
  const auto small = tmp.path() / "b.part";
  o.max_bytes = 1000;
  auto big = http::download_to_file(server.url(), small, o);
  REQUIRE_FALSE(big);
  CHECK(big.error().code == Errc::too_large);
}

TEST_CASE("a slow-drip server cannot hold a download past its overall deadline", "[integration][agent][artifacts]") {
  TempDir tmp;
  DripServer server(1'000'000, std::chrono::milliseconds(20));
  const auto dest = tmp.path() / "a.part";
  http::DownloadOptions o;
  o.max_bytes = 1'000'000;
  o.io_timeout = std::chrono::seconds(10);   // never reached: a byte comes every 20 ms
  o.deadline = std::chrono::milliseconds(800);
  auto r = http::download_to_file(server.url(), dest, o);
  REQUIRE_FALSE(r);
  INFO(r.error().message);
  CHECK(r.error().code == Errc::timeout);
  CHECK(r.error().message.find("overall deadline") != std::string::npos);
  // What arrived stays for a resume; it is far from complete.
  CHECK(stdfs::exists(dest));
  CHECK(stdfs::file_size(dest) < 1'000'000);
  CHECK(stdfs::file_size(dest) <= server.sent.load());
}

TEST_CASE("the agent gives up on a slow-drip artifact server at its deadline and changes nothing",
          "[integration][agent][artifacts]") {
  // The deadline is max(download-deadline-min, size / download-min-rate): 2 s here.
  Node n("download-deadline-min: 2s\ndownload-min-rate: 1MiB\ndownload-timeout: 30s\n");
  const std::vector<std::string> exclude = {"var/lib/flotilla", "run/", "var/log/", "etc/rancher/k3s/k3s.yaml"};
  const auto before = snapshot(n.agent->root(), exclude);
  DripServer server(300000, std::chrono::milliseconds(20));
  v1::BundleManifest m = make_manifest("edge", 1);
  add_airgap_artifact(m, crypto::sha256_hex(std::string(300000, 'x')), 300000, server.url());
  auto env = bundles::wrap(m);
  REQUIRE(bundles::sign(env, n.release));
  auto [status, body] = n.hub.call("POST", "/v1/bundles", bundles::serialize_envelope(env), "application/octet-stream");
  INFO(body.dump());
  REQUIRE(status == 201);
  n.campaign(body["id"].get<std::string>());
  INFO("agent log:\n" << n.agent->log());
  REQUIRE(wait_until([&] { return n.hub.device(n.agent->device_id())["last_reason"] == "download_failed"; },
                     std::chrono::seconds(60)));
  auto d = n.hub.device(n.agent->device_id());
  CHECK(d["last_message"].get<std::string>().find("overall deadline") != std::string::npos);
  CHECK(d["applied_version"] == 0);
  CHECK(server.connections.load() >= 1);
  CHECK(snapshot(n.agent->root(), exclude) == before);
  CHECK_FALSE(stdfs::exists(n.agent->root() / "var/lib/rancher/k3s/agent/images/images.tar"));
}

TEST_CASE("the static agent binary is statically linked, stripped and within its size budget",
          "[integration][agent][footprint]") {
  const std::string path = bin_dir() + "/flotilla-agent";
  auto bytes = fs::read_file(path, 64u << 20);
  REQUIRE(bytes);
  REQUIRE(bytes->size() > sizeof(Elf64_Ehdr));
  const auto* eh = reinterpret_cast<const Elf64_Ehdr*>(bytes->data());
  REQUIRE(std::string(bytes->data(), 4) == "\x7f" "ELF");
  bool interp = false, dynamic = false;
  for (int i = 0; i < eh->e_phnum; ++i) {
    const auto* ph = reinterpret_cast<const Elf64_Phdr*>(bytes->data() + eh->e_phoff + i * eh->e_phentsize);
    interp |= ph->p_type == PT_INTERP;
    dynamic |= ph->p_type == PT_DYNAMIC;
  }
  CHECK_FALSE(interp);   // no dynamic loader: "statically linked"
  CHECK_FALSE(dynamic);
  bool symtab = false;
  for (int i = 0; i < eh->e_shnum; ++i) {
    const auto* sh = reinterpret_cast<const Elf64_Shdr*>(bytes->data() + eh->e_shoff + i * eh->e_shentsize);
    symtab |= sh->sh_type == SHT_SYMTAB;
  }
  CHECK_FALSE(symtab);   // stripped
  // 8 MiB with TLS included: the agent links the minimal OpenSSL of
  // scripts/build-openssl-min.sh (docs/agent.md, "Static build and footprint").
  const size_t budget = 8u << 20;
  WARN("flotilla-agent is " << bytes->size() << " bytes (" << bytes->size() / 1024 << " KiB)");
  CHECK(bytes->size() <= budget);
}

TEST_CASE("fresh install, upgrade v1 to v2 with artifacts, then kill -9 of the agent at every step",
          "[integration][agent][journal]") {
  Node n;
  // Fresh install: an empty node gets v1 with its airgap image.
  const std::string img1 = random_blob(200000);
  n.campaign(n.push(1, img1));
  n.require_runs(1, img1);

  // Upgrade v1 -> v2.
  const std::string img2 = random_blob(250000);
  n.campaign(n.push(2, img2));
  n.require_runs(2, img2);

  // kill -9 (the test hook _exits with 137) at every step boundary of an
  // apply; the restarted agent must leave the node on v(k-1) or v(k), whole,
  // and then complete v(k) from the retained desired state.
  uint64_t version = 2;
  std::string image = img2;
  for (const auto& step : {"verify", "space", "download", "backup", "install", "restart", "health", "commit"}) {
    for (const char* phase : {"begin", "end"}) {
      const std::string at = std::string(step) + ":" + phase;
      INFO("crash at " << at);
      n.agent->stop();
      n.agent->start_with_env({{"FLOTILLA_AGENT_CRASH_AT", at}});
      ++version;
      image = random_blob(100000 + version);
      n.campaign(n.push(version, image));
      auto code = n.agent->wait_exit(std::chrono::seconds(40));
      REQUIRE(code.has_value());
      CHECK(*code == 137);
      CHECK(n.agent->log().find("test hook: crashing at " + at) != std::string::npos);
      n.agent->start();
      n.require_runs(version, image);
      if (std::string(step) != "verify" && std::string(step) != "space" && at != "commit:end") {
        CHECK(n.agent->log().find("found unfinished apply") != std::string::npos);
      }
    }
  }
}

TEST_CASE("an artifact whose hash does not match is refused and nothing is installed",
          "[integration][agent][artifacts]") {
  Node n;
  const std::string img1 = random_blob(50000);
  n.campaign(n.push(1, img1));
  n.require_runs(1, img1);
  const std::vector<std::string> exclude = {"var/lib/flotilla", "run/", "var/log/", "etc/rancher/k3s/k3s.yaml"};
  const auto before = snapshot(n.agent->root(), exclude);

  // The hub holds bytes under one hash; the manifest claims them under it
  // but they are not what was signed: upload other content and point at it.
  const std::string real = random_blob(60000);
  const std::string hex = n.upload(real);
  std::string evil = real;
  evil[100] ^= 1;
  // The manifest says sha256(evil) but the URL serves `real`.
  const std::string evil_hex = crypto::sha256_hex(evil);
  {
    v1::BundleManifest m = make_manifest("edge", 2);
    add_airgap_artifact(m, evil_hex, evil.size(), hex);  // relative URL of the other content
    auto env = bundles::wrap(m);
    REQUIRE(bundles::sign(env, n.release));
    auto [status, body] = n.hub.call("POST", "/v1/bundles", bundles::serialize_envelope(env), "application/octet-stream");
    if (status != 201) {
      // The hub itself may refuse a bundle whose artifact it does not hold.
      SUCCEED("hub refused the mismatched bundle at push: " << body.dump());
      return;
    }
    n.campaign(body["id"].get<std::string>());
  }
  REQUIRE(wait_until([&] { return n.hub.device(n.agent->device_id())["last_reason"] == "artifact_hash"; },
                     std::chrono::seconds(30)));
  auto d = n.hub.device(n.agent->device_id());
  CHECK(d["applied_version"] == 1);
  CHECK(snapshot(n.agent->root(), exclude) == before);
  CHECK(n.k3s_ready());
}

TEST_CASE("not enough disk: a clear error and nothing changed", "[integration][agent][disk]") {
  Node n("min-free: 1000000GiB\n");
  const std::vector<std::string> exclude = {"var/lib/flotilla", "run/", "var/log/", "etc/rancher/k3s/k3s.yaml"};
  const auto before = snapshot(n.agent->root(), exclude);
  n.campaign(n.push(1, random_blob(1000)));
  REQUIRE(wait_until([&] { return n.hub.device(n.agent->device_id())["last_reason"] == "disk_full"; },
                     std::chrono::seconds(30)));
  auto d = n.hub.device(n.agent->device_id());
  CHECK(d["applied_version"] == 0);
  CHECK(d["last_message"].get<std::string>().find("not enough disk space") != std::string::npos);
  CHECK(snapshot(n.agent->root(), exclude) == before);
  CHECK_FALSE(stdfs::exists(n.agent->root() / "var/lib/rancher/k3s/agent/images/images.tar"));
}

TEST_CASE("the broker dies during an apply: the apply finishes and the result reaches the hub",
          "[integration][agent][offline]") {
  Node n;
  const auto broker = n.hub.data_dir() / "broker";
  // k3s takes 3 s to become ready after the restart: time to take the broker away.
  const std::string img = random_blob(10000);
  n.campaign(n.push(1, img, "", "standin-ready-delay-ms: 3000\n"));
  REQUIRE(wait_until([&] { return n.agent->log().find("started k3s") != std::string::npos; },
                     std::chrono::seconds(30)));
  const auto pid = static_cast<pid_t>(std::stol(fs::read_file(broker / "mosquitto.pid", 64).value()));
  REQUIRE(::kill(pid, SIGKILL) == 0);
  // The apply finishes while the broker is gone ...
  REQUIRE(wait_until([&] { return n.agent->log().find("applied bundle=edge version=1") != std::string::npos; },
                     std::chrono::seconds(30)));
  // ... and the hub learns the outcome once its watchdog brought the broker back.
  REQUIRE(wait_until(
      [&] {
        auto d = n.hub.device(n.agent->device_id());
        return d["applied_version"] == 1 && d["state"] == "applied";
      },
      std::chrono::seconds(60)));
  CHECK(n.file("var/lib/rancher/k3s/agent/images/images.tar") == img);
}

// systemd and OpenRC: the agent asks the init system to (re)start k3s and
// whether it runs. The init tools are FAKES (tests/fakes/fake-init-tool) that
// really run the k3s stand-in the way a k3s unit or OpenRC script would.
TEST_CASE("under systemd and OpenRC the agent drives k3s through the init tool and rolls back when it refuses",
          "[integration][agent][service]") {
  for (const auto& [manager, tool, restart_call] :
       {std::make_tuple(std::string("systemd"), std::string("systemctl"), std::string("systemctl restart k3s")),
        std::make_tuple(std::string("openrc"), std::string("rc-service"), std::string("rc-service k3s restart"))}) {
    DYNAMIC_SECTION(manager) {
      Node n("service-manager: " + manager + "\nsupervise-interval: 1s\n", tool);
      const auto calls = [&] { return n.file("fake-init.log"); };
      CHECK_THAT(n.agent->log(), Catch::Contains("k3s service manager=" + manager));

      n.campaign(n.push(1, ""));
      n.require_runs(1, "");
      CHECK_THAT(calls(), Catch::Contains(restart_call));
      // k3s runs under the init system: its pidfile, not the agent's child.
      CHECK(n.k3s_ready());

      // The init system refuses to restart k3s: the agent puts v1 back and
      // says why, with the init tool's own words.
      REQUIRE(fs::write_file_atomic(n.agent->root() / "fake-init.fail", "", 0644));
      n.campaign(n.push(2, ""));
      REQUIRE(wait_until([&] { return n.hub.device(n.agent->device_id())["last_reason"] == "service_failed"; },
                         std::chrono::seconds(40)));
      auto d = n.hub.device(n.agent->device_id());
      CHECK(d["applied_version"] == 1);
      CHECK_THAT(d["last_message"].get<std::string>(),
                 Catch::Contains(manager == "systemd" ? "Job for k3s.service failed" : "k3s failed to start"));
      // The reason arrives with the rolling-back progress report; the files
      // are back once the rollback finished.
      CHECK(wait_until([&] { return n.file("etc/rancher/k3s/config.yaml.d/10-edge.yaml") == "node-label: v1\n"; },
                       std::chrono::seconds(20)));

      // Once the init system works again, the agent's supervision starts k3s.
      stdfs::remove(n.agent->root() / "fake-init.fail");
      CHECK(wait_until([&] { return n.k3s_ready(); }, std::chrono::seconds(30)));
      CHECK_THAT(calls(), Catch::Contains(manager == "systemd" ? "systemctl start k3s" : "rc-service k3s start"));
    }
  }
}

TEST_CASE("an artifact far above the API's body cap uploads, streams to the agent and installs",
          "[integration][agent][artifacts]") {
  Node n;
  // 12 MB: above max_body_bytes (8 MiB), which holds every route but uploads.
  const std::string img = random_blob(12u << 20);
  n.campaign(n.push(1, img));
  n.require_runs(1, img);
}

TEST_CASE("an agent pinning the hub's director key applies, one pinning another key keeps no credentials",
          "[integration][agent][director]") {
  TempDir tmp;
  Hub hub(tmp.path() / "hub");
  hub.start();
  const auto release = bundles::generate_key();
  AgentOptions o;
  o.root_keys = {bundles::public_key_text(release.pub)};
  // The hub made its director key at first start and published the public half.
  auto director = bundles::read_public_key((hub.data_dir() / "director.pub").string());
  REQUIRE(director);

  test::Agent pinned(tmp.path() / "pinned", hub.url(), hub.enrollment_token({{"env", "it"}}), o);
  pinned.append_config("director-key: \"" + bundles::public_key_text(*director) + "\"\n");
  pinned.start();
  test::Agent stranger(tmp.path() / "stranger", hub.url(), hub.enrollment_token({{"env", "other"}}), o);
  stranger.append_config("director-key: \"" + bundles::public_key_text(bundles::generate_key().pub) + "\"\n");
  stranger.start();

  REQUIRE(wait_until([&] { return !pinned.device_id().empty() && hub.device(pinned.device_id())["online"] == true; },
                     std::chrono::seconds(30)));
  CHECK(wait_until([&] { return stranger.log().find("state=enrollment_refused") != std::string::npos; },
                   std::chrono::seconds(30)));
  CHECK_FALSE(stdfs::exists(stranger.root() / "var/lib/flotilla/credentials.pb"));

  // The pinned agent takes the hub's signed desired state.
  v1::BundleManifest m = make_manifest("edge", 1, {{v1::FILE_KIND_MANIFEST, "app.yaml", "kind: ConfigMap\n"}});
  auto env = bundles::wrap(m);
  REQUIRE(bundles::sign(env, release));
  auto [status, body] = hub.call("POST", "/v1/bundles", bundles::serialize_envelope(env), "application/octet-stream");
  REQUIRE(status == 201);
  auto [cs, cb] = hub.call("POST", "/v1/campaigns", json{{"bundle", body["id"]}, {"selector", "env=it"}}.dump());
  INFO(cb.dump());
  REQUIRE(cs == 201);
  INFO("agent log:\n" << pinned.log());
  CHECK(wait_until([&] { return hub.device(pinned.device_id())["applied_version"] == 1; }, std::chrono::seconds(40)));
  CHECK(pinned.log().find("director key_id=" + director->key_id) != std::string::npos);
}

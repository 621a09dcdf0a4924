#pragma once
// A real etcd cluster on loopback for integration tests (Debian's
// etcd-server, scripts/setup.sh): N members in a temp dir, free ports, each
// member stoppable and restartable on its own data. Every wait has a
// deadline. The cells/failover tests reuse it.
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "flotilla/common/http_client.hpp"
#include "flotilla/common/fs.hpp"
#include "flotilla/common/process.hpp"
#include "tests/support/harness.hpp"

namespace flotilla::test {

// Client TLS for every member: https client URLs, the members' own
// certificate (cert/key, for 127.0.0.1; etcd's gateway also presents it as a
// client, so it needs clientAuth too) and, with client_cert_auth, only
// clients with a certificate from `ca` get in.
struct EtcdTls {
  std::string ca, cert, key;
  bool client_cert_auth = true;
};

class EtcdCluster {
 public:
  // etcd's binary: $FLOTILLA_ETCD or /usr/bin/etcd.
  static std::string binary() {
    const char* e = std::getenv("FLOTILLA_ETCD");
    return e && *e ? e : "/usr/bin/etcd";
  }
  static bool available() { return std::filesystem::exists(binary()); }

  EtcdCluster(std::filesystem::path dir, int members, std::optional<EtcdTls> tls = std::nullopt)
      : dir_(std::move(dir)), tls_(std::move(tls)) {
    std::filesystem::create_directories(dir_);  // the members' logs go there
    for (int i = 0; i < members; ++i) {
      Member m;
      m.name = "m" + std::to_string(i);
      members_.push_back(std::move(m));
    }
    pick_ports();
  }
  ~EtcdCluster() {
    for (auto& m : members_) {
      if (m.child.valid()) m.child.terminate(std::chrono::milliseconds(2000));
    }
  }
  EtcdCluster(const EtcdCluster&) = delete;
  EtcdCluster& operator=(const EtcdCluster&) = delete;

  // Starts every member and waits until each answers /health. A member that
  // exits before it is healthy (its port taken between our check and its
  // bind) restarts the whole new cluster on fresh ports and fresh data, a
  // bounded number of times; the error then carries the member's log.
  void start() {
    std::string why;
    for (int attempt = 0; attempt < 3; ++attempt) {
      if (attempt > 0) {
        for (auto& m : members_) {
          if (m.child.valid()) m.child.terminate(std::chrono::milliseconds(2000));
          std::error_code ec;
          std::filesystem::remove_all(dir_ / m.name, ec);
        }
        pick_ports();
      }
      for (size_t i = 0; i < members_.size(); ++i) start_member(i, false);
      bool all = true;
      for (size_t i = 0; i < members_.size() && all; ++i) {
        if (!wait_healthy(i, std::chrono::seconds(60))) {
          why = "etcd member " + members_[i].name + " not healthy" +
                (members_[i].child.poll() ? " (it exited)" : "") + "; its log ends: " + log_tail(i);
          all = false;
        }
      }
      if (all) return;
    }
    throw std::runtime_error(why);
  }

  // Starts member i again on its data dir (wait = until healthy).
  void start_member(size_t i, bool wait = true) {
    auto& m = members_[i];
    std::string cluster;
    for (const auto& o : members_) cluster += (cluster.empty() ? "" : ",") + o.name + "=" + o.peer;
    proc::SpawnOptions so;
    so.argv = {binary(), "--name", m.name, "--data-dir", (dir_ / m.name).string(),
               "--listen-client-urls", m.client, "--advertise-client-urls", m.client,
               "--listen-peer-urls", m.peer, "--initial-advertise-peer-urls", m.peer,
               "--initial-cluster", cluster, "--initial-cluster-state", "new",
               "--initial-cluster-token", "flotilla-test",
               // Fast elections, so a lost member costs the tests little time.
               "--heartbeat-interval", "50", "--election-timeout", "500",
               "--listen-metrics-urls", m.metrics, "--logger", "zap", "--log-level", "warn"};
    if (tls_) {
      for (const std::string& a : {std::string("--cert-file"), tls_->cert, std::string("--key-file"), tls_->key,
                                   std::string("--trusted-ca-file"), tls_->ca}) {
        so.argv.push_back(a);
      }
      if (tls_->client_cert_auth) so.argv.push_back("--client-cert-auth");
    }
    so.stdout_path = (dir_ / (m.name + ".log")).string();
    so.stderr_path = "stdout";
    so.die_with_parent = true;
    auto c = proc::spawn(so);
    if (!c) throw std::runtime_error("cannot start etcd: " + c.error().message);
    m.child = std::move(*c);
    if (wait && !wait_healthy(i, std::chrono::seconds(60))) {
      throw std::runtime_error("etcd member " + m.name + " not healthy after restart; its log ends: " + log_tail(i));
    }
  }

  // SIGTERM (etcd shuts down cleanly), reaped.
  void stop_member(size_t i) { members_[i].child.terminate(std::chrono::milliseconds(5000)); }
  void stop_all() {
    for (size_t i = 0; i < members_.size(); ++i) stop_member(i);
  }
  void start_all() {
    for (size_t i = 0; i < members_.size(); ++i) start_member(i, false);
    for (size_t i = 0; i < members_.size(); ++i) {
      if (!wait_healthy(i, std::chrono::seconds(60))) {
        throw std::runtime_error("etcd member " + members_[i].name + " not healthy after restart; its log ends: " +
                                 log_tail(i));
      }
    }
  }

  // /health is true only with a leader and a working quorum. False at once
  // when the member has exited.
  bool wait_healthy(size_t i, std::chrono::milliseconds timeout) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < deadline) {
      if (members_[i].child.valid() && members_[i].child.poll()) return false;
      http::Request r;
      r.url = members_[i].metrics + "/health";
      r.timeout = std::chrono::milliseconds(1000);
      auto resp = http::send(r);
      if (resp && resp->status == 200 && resp->body.find("\"true\"") != std::string::npos) return true;
      ::usleep(100 * 1000);  // a poll interval, not a wait for an outcome
    }
    return false;
  }

  std::vector<std::string> client_urls() const {
    std::vector<std::string> out;
    for (const auto& m : members_) out.push_back(m.client);
    return out;
  }
  size_t size() const { return members_.size(); }
  const std::filesystem::path& dir() const { return dir_; }

 private:
  void pick_ports() {
    for (auto& m : members_) {
      m.client = std::string(tls_ ? "https" : "http") + "://127.0.0.1:" + std::to_string(free_loopback_port());
      m.peer = "http://127.0.0.1:" + std::to_string(free_loopback_port());
      // /health (and /metrics) in plain HTTP whatever the client port asks.
      m.metrics = "http://127.0.0.1:" + std::to_string(free_loopback_port());
    }
  }
  // The last lines of member i's log, for an error message.
  std::string log_tail(size_t i) const {
    const auto path = dir_ / (members_[i].name + ".log");
    std::string text;
    if (auto r = fs::read_file(path.string(), 1 << 20)) text = *r;
    if (text.size() > 2000) text = "..." + text.substr(text.size() - 2000);
    return text.empty() ? "(empty: " + path.string() + ")" : text;
  }

  struct Member {
    std::string name, client, peer, metrics;
    proc::Child child;
  };
  std::filesystem::path dir_;
  std::optional<EtcdTls> tls_;
  std::vector<Member> members_;
};

}  // namespace flotilla::test

// `k3s server` and `k3s agent` of the stand-in: an HTTP API on loopback that
// serves what the agent reads (readyz, nodes, workloads), a datastore that
// outlives restarts (so a restarted server shows its node Ready from before),
// the deploy controller for auto-deployed manifests, an embedded "kubelet"
// that posts its node's status, and agent nodes that register with a server.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <map>
#include <optional>
#include <set>
#include <stdexcept>
#include <thread>

#include "standin.hpp"

namespace flotilla::standin {

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

constexpr std::size_t kMaxRequestBytes = 16 * 1024;
constexpr std::size_t kMaxBodyBytes = 64 * 1024;
constexpr auto kRequestTimeout = std::chrono::seconds(2);

const std::vector<std::string> kValueFlags = {
    "write-kubeconfig", "node-name",  "data-dir",       "https-listen-port", "token",
    "token-file",       "server",     "cluster-reset-restore-path", "node-label", "node-taint",
    "tls-san",          "disable",    "kubelet-arg",    "kube-apiserver-arg", "kube-controller-manager-arg",
    "write-kubeconfig-mode", "flannel-backend", "cluster-cidr", "service-cidr", "node-ip"};

// Behaviour knobs: a config key (this node) or a build flag (this binary).
struct Knobs {
  long start_delay_ms = 0;     // before anything (a slow device unpacking and starting)
  long ready_delay_ms = 300;   // until the API answers ready and the kubelet posts
  bool never_ready = false;    // the API never gets ready (and the kubelet never posts)
  bool kubelet_never_ready = false;  // the API is up, the kubelet never posts its node's status
  long crash_after_ready_ms = -1;    // exits with 2 this long after becoming ready
  long heartbeat_ms = 10000;   // kubelet status updates (nodeStatusUpdateFrequency)
  long grace_ms = 40000;       // node-monitor-grace-period: stale Ready turns Unknown after it
  int cert_days = 365;         // k3s issues its certificates for a year
  bool fail_start = false;
};

bool parse_bool(const std::string& key, const std::string& value) {
  if (value == "true" || value == "yes" || value == "on" || value == "1") return true;
  if (value == "false" || value == "no" || value == "off" || value == "0") return false;
  throw std::runtime_error("invalid boolean for " + key + ": " + value);
}

long parse_long(const std::string& key, const std::string& value, long min, long max) {
  long out = 0;
  const auto [end, ec] = std::from_chars(value.data(), value.data() + value.size(), out);
  if (ec != std::errc() || end != value.data() + value.size() || out < min || out > max) {
    throw std::runtime_error("invalid number for " + key + ": " + value);
  }
  return out;
}

Knobs knobs_of(const ConfigValues& cfg, const Build& build) {
  Knobs k;
  auto num = [&](const std::string& key, long fallback, long max) {
    const std::string v = cfg.get("standin-" + key);
    if (!v.empty()) return parse_long("standin-" + key, v, -1, max);
    return build.number(key, fallback);
  };
  auto flag = [&](const std::string& key) {
    const std::string v = cfg.get("standin-" + key);
    if (!v.empty()) return parse_bool("standin-" + key, v);
    return build.flag(key);
  };
  k.start_delay_ms = num("start-delay-ms", 0, 86'400'000);
  k.ready_delay_ms = num("ready-delay-ms", 300, 86'400'000);
  k.never_ready = flag("never-ready");
  k.kubelet_never_ready = flag("kubelet-never-ready");
  k.crash_after_ready_ms = num("crash-after-ready-ms", -1, 86'400'000);
  k.heartbeat_ms = std::max<long>(100, num("heartbeat-ms", 10000, 3'600'000));
  k.grace_ms = num("node-monitor-grace-ms", 40000, 86'400'000);
  k.cert_days = static_cast<int>(num("cert-days", 365, 3650));
  k.fail_start = flag("fail-start");
  return k;
}

volatile std::sig_atomic_t g_stop_signal = 0;
extern "C" void on_stop_signal(int sig) { g_stop_signal = sig; }

// Stop signals stay blocked except inside ppoll()/sleep_interruptible(), so
// one arriving between checks cannot be lost.
void setup_signals() {
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  sigprocmask(SIG_BLOCK, &stop_signals, nullptr);
  struct sigaction action {};
  action.sa_handler = on_stop_signal;
  sigaction(SIGTERM, &action, nullptr);
  sigaction(SIGINT, &action, nullptr);
  std::signal(SIGPIPE, SIG_IGN);
}

// Waits up to `ms` with stop signals deliverable; false when one arrived.
bool sleep_interruptible(long ms) {
  sigset_t unblocked;
  sigemptyset(&unblocked);
  const auto until = Clock::now() + std::chrono::milliseconds(ms);
  while (g_stop_signal == 0) {
    const auto left = std::chrono::duration_cast<std::chrono::nanoseconds>(until - Clock::now()).count();
    if (left <= 0) return true;
    const timespec t{static_cast<time_t>(left / 1'000'000'000), static_cast<long>(left % 1'000'000'000)};
    ::ppoll(nullptr, 0, &t, &unblocked);
  }
  return false;
}

std::string required_data_dir(const ConfigValues& cfg) {
  std::string dir = cfg.get("data-dir");
  if (dir.empty()) {
    // A safety net for test machines: real k3s would write /var/lib/rancher/k3s.
    if (!env("K3S_STANDIN_ALLOW_DEFAULT_DATA_DIR")) {
      throw std::runtime_error("data-dir is not set; the stand-in does not write into " +
                               std::string(kDefaultDataDir) + " (set data-dir, or K3S_STANDIN_ALLOW_DEFAULT_DATA_DIR=1)");
    }
    dir = std::string(kDefaultDataDir);
  }
  return dir;
}

std::optional<Clock::time_point> lifetime_deadline() {
  if (const auto max_s = env("K3S_STANDIN_MAX_LIFETIME_S")) {
    long seconds = 0;
    std::from_chars(max_s->data(), max_s->data() + max_s->size(), seconds);
    if (seconds > 0) return Clock::now() + std::chrono::seconds(seconds);
  }
  return std::nullopt;
}

void write_pidfile() {
  if (const auto pidfile = env("K3S_STANDIN_PIDFILE")) {
    if (FILE* f = std::fopen(pidfile->c_str(), "w")) {
      std::fprintf(f, "%d\n", static_cast<int>(::getpid()));
      std::fclose(f);
    } else {
      log_line("warning: cannot write pidfile " + *pidfile);
    }
  }
}

void remove_pidfile() {
  if (const auto pidfile = env("K3S_STANDIN_PIDFILE")) ::unlink(pidfile->c_str());
}

// k3s renews certificates that are missing or within 90 days of expiry every
// time it starts (docs.k3s.io, "Certificate Management").
void ensure_cert(const std::string& cert, const std::string& key, const std::string& cn, int days) {
  const auto not_after = cert_not_after(cert);
  if (not_after && *not_after - now_unix() > 90 * 86400) return;
  write_self_signed(cert, key, cn, days);
  log_line("issued certificate " + cert + " valid for " + std::to_string(days) + " days");
}

std::string kubeconfig_text(const std::string& server, const std::string& token) {
  return "# Written by the k3s stand-in (Flotilla tests and demos), not by real k3s.\n"
         "apiVersion: v1\n"
         "clusters:\n"
         "- cluster:\n"
         "    server: " + server + "\n"
         "  name: default\n"
         "contexts:\n"
         "- context:\n"
         "    cluster: default\n"
         "    user: default\n"
         "  name: default\n"
         "current-context: default\n"
         "kind: Config\n"
         "preferences: {}\n"
         "users:\n"
         "- name: default\n"
         "  user:\n"
         "    token: " + token + "\n";
}

// ---- HTTP -------------------------------------------------------------------

struct Request {
  std::string method, target, authorization, body;
};

struct Response {
  int code = 200;
  std::string content_type = "text/plain; charset=utf-8";
  std::string body;
};

const char* reason_phrase(int code) {
  switch (code) {
    case 200: return "OK";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 413: return "Payload Too Large";
    case 431: return "Request Header Fields Too Large";
    default: return "Internal Server Error";
  }
}

Response status_json(int code, const std::string& reason, const std::string& message) {
  return {code, "application/json",
          R"({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":")" +
              json_escape(message) + R"(","reason":")" + reason + R"(","code":)" + std::to_string(code) + "}\n"};
}

void send_response(int fd, const Response& response) {
  std::string out = "HTTP/1.1 " + std::to_string(response.code) + " " + reason_phrase(response.code) +
                    "\r\nContent-Type: " + response.content_type +
                    "\r\nContent-Length: " + std::to_string(response.body.size()) + "\r\nConnection: close\r\n\r\n" +
                    response.body;
  for (std::size_t off = 0; off < out.size();) {
    const auto n = ::send(fd, out.data() + off, out.size() - off, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;  // client went away or SO_SNDTIMEO hit
    off += static_cast<std::size_t>(n);
  }
}

// One request per connection, bounded in size and time so a stuck client
// cannot wedge the single-threaded loop for long.
std::optional<Request> read_request(int fd) {
  const timeval send_timeout{2, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &send_timeout, sizeof send_timeout);
  const auto deadline = Clock::now() + kRequestTimeout;
  std::string raw;
  std::size_t header_end = std::string::npos;
  auto receive = [&]() -> bool {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    pollfd pfd{fd, POLLIN, 0};
    if (left.count() <= 0 || ::poll(&pfd, 1, static_cast<int>(left.count())) <= 0) return false;
    char buf[4096];
    const auto n = ::recv(fd, buf, sizeof buf, 0);
    if (n <= 0) return false;
    raw.append(buf, static_cast<std::size_t>(n));
    return true;
  };
  while ((header_end = raw.find("\r\n\r\n")) == std::string::npos && raw.size() <= kMaxRequestBytes) {
    if (!receive()) return std::nullopt;
  }
  if (header_end == std::string::npos || header_end > kMaxRequestBytes) {
    send_response(fd, status_json(431, "RequestHeaderFieldsTooLarge", "request too large"));
    return std::nullopt;
  }
  const std::string head = raw.substr(0, header_end);
  const auto line_end = head.find("\r\n");
  const std::string request_line = head.substr(0, line_end);
  const auto sp1 = request_line.find(' ');
  const auto sp2 = sp1 == std::string::npos ? sp1 : request_line.find(' ', sp1 + 1);
  if (sp1 == std::string::npos || sp2 == std::string::npos) {
    send_response(fd, status_json(400, "BadRequest", "malformed request line"));
    return std::nullopt;
  }
  Request req;
  req.method = request_line.substr(0, sp1);
  req.target = request_line.substr(sp1 + 1, sp2 - sp1 - 1);
  std::size_t content_length = 0;
  for (auto pos = line_end; pos != std::string::npos && pos < head.size();) {
    const auto next = head.find("\r\n", pos + 2);
    const std::string header = head.substr(pos + 2, next == std::string::npos ? next : next - pos - 2);
    const auto colon = header.find(':');
    if (colon != std::string::npos) {
      const std::string name = header.substr(0, colon);
      const std::string value = trim(header.substr(colon + 1));
      if (iequals(name, "authorization")) req.authorization = value;
      if (iequals(name, "content-length")) {
        std::from_chars(value.data(), value.data() + value.size(), content_length);
      }
    }
    pos = next;
  }
  if (content_length > kMaxBodyBytes) {
    send_response(fd, status_json(413, "RequestEntityTooLarge", "request body too large"));
    return std::nullopt;
  }
  req.body = raw.substr(header_end + 4);
  while (req.body.size() < content_length) {
    const std::size_t before = raw.size();
    if (!receive()) return std::nullopt;
    req.body += raw.substr(before);
  }
  req.body.resize(std::min(req.body.size(), content_length));
  return req;
}

int listen_loopback(int port, int& bound_port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) throw std::runtime_error(std::string("socket: ") + std::strerror(errno));
  const int one = 1;
  ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<std::uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 || ::listen(fd, 64) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    const std::string reason = std::strerror(errno);
    ::close(fd);
    throw std::runtime_error("cannot listen on 127.0.0.1:" + std::to_string(port) + ": " + reason);
  }
  bound_port = ntohs(addr.sin_port);
  return fd;
}

// ---- the server ---------------------------------------------------------------

struct Server {
  ConfigValues cfg;
  Build build;
  Knobs knobs;
  std::string data_dir, node_name, store_path, admin_token, node_secret;
  bool etcd = false;
  Datastore store;
  int64_t started = 0;  // unix seconds (device clock)
  Clock::time_point ready_at;
  std::map<std::string, std::pair<int64_t, uintmax_t>> applied;  // manifest -> (mtime, size) applied

  bool api_ready() const { return !knobs.never_ready && Clock::now() >= ready_at; }
  bool kubelet_ready() const { return api_ready() && !knobs.kubelet_never_ready; }

  void save() { save_datastore(store_path, store); }

  // The Ready condition as the node lifecycle controller shows it: a status
  // nobody refreshed within the grace period (counted from the later of the
  // last heartbeat and this controller's start) becomes Unknown. Right after
  // a restart the node therefore still shows the Ready it had before.
  std::string node_ready(const NodeRecord& n) const {
    const int64_t seen = std::max(n.heartbeat, started);
    if ((now_unix() - seen) * 1000 > knobs.grace_ms) return "Unknown";
    return n.ready;
  }

  std::string node_json(const NodeRecord& n) const {
    const std::string ready = node_ready(n);
    const std::string reason = ready == "True" ? "KubeletReady" : ready == "False" ? "KubeletNotReady"
                                                                                  : "NodeStatusUnknown";
    std::string roles = n.role == "server" ? R"("node-role.kubernetes.io/control-plane":"true","node-role.kubernetes.io/master":"true",)"
                                           : "";
    if (n.role == "server" && etcd) roles += R"("node-role.kubernetes.io/etcd":"true",)";
    return R"({"kind":"Node","apiVersion":"v1","metadata":{"name":")" + json_escape(n.name) +
           R"(","creationTimestamp":")" + rfc3339(n.created) + R"(","labels":{)" + roles +
           R"("kubernetes.io/hostname":")" + json_escape(n.name) +
           R"("},"annotations":{"flotilla.io/k3s-standin":"true"}},"status":{"conditions":[{"type":"Ready","status":")" +
           ready + R"(","reason":")" + reason + R"(","lastHeartbeatTime":")" + rfc3339(n.heartbeat) +
           R"("}],"nodeInfo":{"kubeletVersion":")" + json_escape(n.kubelet_version) + R"("}}})";
  }

  // The embedded kubelet of a server node: registers the node at start (its
  // stored status untouched), then posts Ready with a fresh heartbeat once up.
  void kubelet_post() {
    NodeRecord& n = store.nodes[node_name];
    n.name = node_name;
    n.role = "server";
    if (n.created == 0) n.created = now_unix();
    n.ready = "True";
    n.heartbeat = now_unix();
    n.kubelet_version = build.version;
    save();
  }

  // pkg/deploy: every manifest is applied at start and whenever it changes on
  // disk; what a changed file no longer lists is pruned (the Addon's object
  // set). Deleting the file deletes nothing (docs.k3s.io, "Auto-Deploying
  // Manifests").
  void deploy_scan() {
    const fs::path dir = fs::path(data_dir) / "server/manifests";
    std::error_code ec;
    bool changed = false;
    for (const auto& e : fs::directory_iterator(dir, ec)) {
      const std::string file = e.path().filename().string();
      const std::string ext = e.path().extension().string();
      if (file.empty() || file[0] == '.' || !(iequals(ext, ".yaml") || iequals(ext, ".yml"))) continue;
      if (fs::exists(e.path().string() + ".skip", ec)) continue;
      struct stat st {};
      if (::stat(e.path().c_str(), &st) != 0) continue;
      const auto sig = std::make_pair(static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec,
                                      static_cast<uintmax_t>(st.st_size));
      auto it = applied.find(file);
      if (it != applied.end() && it->second == sig) continue;
      applied[file] = sig;
      const std::string addon = e.path().stem().string();
      const auto text = read_file(e.path().string());
      if (!text) continue;
      auto objects = parse_manifest(*text, addon);
      std::set<std::string> keep;
      std::vector<Resource> all;
      for (auto& r : objects) {
        all.push_back(r);
        if (r.kind == "HelmChart") {
          // helm-controller runs the chart's install as a Job next to it.
          Resource job;
          job.kind = "Job";
          job.api_version = "batch/v1";
          job.ns = r.ns;
          job.name = "helm-install-" + r.name;
          job.addon = addon;
          job.never_ready = r.never_ready;
          all.push_back(job);
        }
      }
      Resource addon_obj;
      addon_obj.kind = "Addon";
      addon_obj.api_version = "k3s.cattle.io/v1";
      addon_obj.ns = "kube-system";
      addon_obj.name = addon;
      addon_obj.addon = addon;
      all.push_back(addon_obj);
      for (auto& r : all) {
        keep.insert(r.key());
        auto existing = store.resources.find(r.key());
        if (existing != store.resources.end()) r.generation = existing->second.generation + 1;
        store.resources[r.key()] = r;
      }
      for (auto rit = store.resources.begin(); rit != store.resources.end();) {
        rit = rit->second.addon == addon && !keep.count(rit->first) ? store.resources.erase(rit) : std::next(rit);
      }
      changed = true;
      log_line("deployed manifest " + file + ": " + std::to_string(objects.size()) + " object(s)");
    }
    if (changed) save();
  }

  Response route(const Request& req) {
    std::string target = req.target.substr(0, req.target.find('?'));
    const bool bearer = iequals(req.authorization.substr(0, 7), "Bearer ");
    const std::string token = bearer ? req.authorization.substr(7) : "";
    const bool admin = bearer && token == admin_token;
    // Agent nodes present "node:<name>:<secret>" (their kubelet identity).
    std::string node_identity;
    if (bearer && !admin && token.rfind("node:", 0) == 0) {
      const auto colon = token.find(':', 5);
      if (colon != std::string::npos && token.substr(colon + 1) == node_secret) {
        node_identity = token.substr(5, colon - 5);
      }
    }
    if (!admin && node_identity.empty()) return status_json(401, "Unauthorized", "Unauthorized");
    if (target == "/livez" && req.method == "GET") return {200, "text/plain; charset=utf-8", "ok"};
    if (target == "/readyz" && req.method == "GET") {
      if (api_ready()) return {200, "text/plain; charset=utf-8", "ok"};
      return {500, "text/plain; charset=utf-8", "[-]poststarthook/k3s-ready failed: not ready"};
    }
    if (target == "/version" && req.method == "GET") {
      return {200, "application/json", R"({"gitVersion":")" + json_escape(build.version) + "\"}\n"};
    }
    constexpr std::string_view kNodes = "/api/v1/nodes";
    if (target == kNodes && req.method == "GET") {
      std::string items;
      for (const auto& [name, n] : store.nodes) items += (items.empty() ? "" : ",") + node_json(n);
      return {200, "application/json", R"({"kind":"NodeList","apiVersion":"v1","items":[)" + items + "]}\n"};
    }
    if (target.starts_with(std::string(kNodes) + "/")) {
      std::string name = target.substr(kNodes.size() + 1);
      const bool status = name.ends_with("/status");
      if (status) name.resize(name.size() - 7);
      if (req.method == "PUT" && status) {
        if (!admin && node_identity != name) {
          return status_json(403, "Forbidden", "node \"" + node_identity + "\" may not update node \"" + name + "\"");
        }
        NodeRecord& n = store.nodes[name];
        n.name = name;
        n.role = json_string_field(req.body, "role").value_or("agent");
        n.ready = json_string_field(req.body, "ready").value_or("True");
        n.kubelet_version = json_string_field(req.body, "kubeletVersion").value_or("");
        if (n.created == 0) n.created = now_unix();
        n.heartbeat = now_unix();
        save();
        return {200, "application/json", node_json(n) + "\n"};
      }
      if (req.method != "GET") return status_json(405, "MethodNotAllowed", "method not allowed");
      auto it = store.nodes.find(name);
      if (it == store.nodes.end()) return status_json(404, "NotFound", "nodes \"" + name + "\" not found");
      return {200, "application/json", node_json(it->second) + "\n"};
    }
    if (!admin) return status_json(403, "Forbidden", "a node may only read nodes");
    // /api/v1[/namespaces/<ns>]/<plural>/<name>, /apis/<group>/<version>[/namespaces/<ns>]/<plural>/<name>
    std::vector<std::string> parts;
    for (size_t at = 1; at <= target.size();) {
      const auto slash = target.find('/', at);
      parts.push_back(target.substr(at, slash == std::string::npos ? std::string::npos : slash - at));
      if (slash == std::string::npos) break;
      at = slash + 1;
    }
    size_t i = 0;
    std::string group;
    if (parts.size() >= 2 && parts[0] == "api") {
      i = 2;
    } else if (parts.size() >= 3 && parts[0] == "apis") {
      group = parts[1];
      i = 3;
    } else {
      return status_json(404, "NotFound", "the server could not find the requested resource");
    }
    std::string ns;
    if (parts.size() >= i + 2 && parts[i] == "namespaces" && parts.size() >= i + 4) {
      ns = parts[i + 1];
      i += 2;
    }
    if (parts.size() != i + 2) return status_json(404, "NotFound", "the server could not find the requested resource");
    const KindInfo k = kind_info(parts[i] + (group.empty() ? "" : "." + group));
    const std::string name = parts[i + 1];
    const std::string key = k.kind + "/" + (k.namespaced ? ns : "") + "/" + name;
    const std::string qualified = k.plural + (k.group.empty() ? "" : "." + k.group);
    auto it = store.resources.find(key);
    if (it == store.resources.end()) {
      return status_json(404, "NotFound", qualified + " \"" + name + "\" not found");
    }
    if (req.method == "GET") return {200, "application/json", resource_json(it->second, store.nodes.size())};
    if (req.method == "DELETE") {
      const Resource gone = it->second;
      store.resources.erase(it);
      if (gone.kind == "HelmChart") {
        // helm-controller uninstalls the chart; its install job goes with it.
        store.resources.erase("Job/" + gone.ns + "/helm-install-" + gone.name);
      }
      save();
      log_line("deleted " + gone.kind + " " + (gone.ns.empty() ? "" : gone.ns + "/") + gone.name);
      return {200, "application/json",
              R"({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Success","details":{"name":")" +
                  json_escape(name) + R"(","kind":")" + json_escape(k.plural) + "\"}}\n"};
    }
    return status_json(405, "MethodNotAllowed", "method not allowed");
  }
};

// `--cluster-reset --cluster-reset-restore-path=<snapshot>`: the old etcd
// directory moves aside to server/db/etcd-old-<time>, the snapshot becomes
// the datastore, and k3s asks to be restarted without the flag
// (docs.k3s.io/cli/etcd-snapshot, "Restoring a Cluster from a Snapshot").
int cluster_reset(const std::string& data_dir, const std::string& restore) {
  const fs::path db = fs::path(data_dir) / "server/db";
  std::error_code ec;
  if (!restore.empty()) {
    const auto snap = read_file(restore);
    if (!snap) {
      log_line("error: etcd: snapshot path does not exist: " + restore);
      return 1;
    }
    if (fs::exists(db / "etcd", ec)) fs::rename(db / "etcd", db / ("etcd-old-" + std::to_string(now_unix())), ec);
    write_file_atomic(datastore_path(data_dir, true), *snap, 0600);
    log_line("restored etcd datastore from snapshot " + restore);
  }
  log_line("Managed etcd cluster membership has been reset, restart without --cluster-reset flag now. Backup and "
           "delete ${datadir}/server/db on each peer etcd server and rejoin the nodes");
  return 0;
}

}  // namespace

int run_server(const char* argv0, const Args& args) {
  setup_signals();
  const auto lifetime = lifetime_deadline();
  Server s;
  int listen_fd = -1;
  try {
    s.cfg = load_config(args, kValueFlags);
    s.build = resolve_build(argv0);
    s.knobs = knobs_of(s.cfg, s.build);
    if (s.knobs.fail_start) {
      log_line("stand-in: configured to fail at start");
      return 1;
    }
    s.data_dir = required_data_dir(s.cfg);
    log_line("starting k3s stand-in (NOT real k3s) " + s.build.version + " pid " + std::to_string(::getpid()));
    if (s.knobs.start_delay_ms > 0) {
      log_line("slow start: " + std::to_string(s.knobs.start_delay_ms) + " ms before serving");
      if (!sleep_interruptible(s.knobs.start_delay_ms)) return 0;
    }
    extract_data_dir(s.data_dir, s.build);
    std::error_code ec;
    s.etcd = s.cfg.get("cluster-init") == "true" || fs::exists(fs::path(s.data_dir) / "server/db/etcd", ec);
    if (s.cfg.get("cluster-reset") == "true") {
      return cluster_reset(s.data_dir, s.cfg.get("cluster-reset-restore-path"));
    }
    s.store_path = datastore_path(s.data_dir, s.etcd);
    if (s.build.flag("corrupt-datastore")) {
      // A k3s build whose migration breaks the datastore (why a version
      // change is snapshotted first).
      write_file_atomic(s.store_path, "corrupted by " + s.build.version + "\n", 0600);
      log_line("error: datastore migration of " + s.build.version + " failed; " + s.store_path + " is corrupt");
      return 1;
    }
    s.store = load_datastore(s.store_path);
    char host[256] = {};
    ::gethostname(host, sizeof host - 1);
    s.node_name = s.cfg.get("node-name", host[0] ? host : "localhost");
    const fs::path server_dir = fs::path(s.data_dir) / "server";
    ensure_cert((server_dir / "tls/serving-kube-apiserver.crt").string(),
                (server_dir / "tls/serving-kube-apiserver.key").string(), "kube-apiserver", s.knobs.cert_days);
    // The cluster's join secret: server/token, and the node-token agents use.
    const std::string token_path = (server_dir / "token").string();
    if (auto t = read_file(token_path); t && !trim(*t).empty()) {
      const std::string text = trim(*t);
      s.node_secret = text.substr(text.rfind(':') + 1);
    } else {
      s.node_secret = s.cfg.get("token").empty() ? random_hex(16) : s.cfg.get("token");
      const std::string full = "K10" + random_hex(16) + "::server:" + s.node_secret;
      write_file_atomic(token_path, full + "\n", 0600);
      write_file_atomic((server_dir / "node-token").string(), full + "\n", 0600);
    }
    write_pidfile();
    if (s.etcd) write_file_atomic((server_dir / "db/etcd/standin.pid").string(), std::to_string(::getpid()), 0600);
    // Where `k3s certificate rotate` sees that this k3s runs (admin.cpp).
    write_file_atomic((server_dir / "standin.pid").string(), std::to_string(::getpid()), 0600);
    int port = 0;
    const std::string port_text = s.cfg.get("https-listen-port", "0");
    listen_fd = listen_loopback(static_cast<int>(parse_long("https-listen-port", port_text, 0, 65535)), port);
    log_line("listening on 127.0.0.1:" + std::to_string(port) + " (plain http), node " + s.node_name +
             (s.etcd ? ", embedded etcd" : ", sqlite"));
    s.admin_token = "standin-" + random_hex(16);
    const std::string kubeconfig = s.cfg.get("write-kubeconfig", std::string(kDefaultKubeconfig));
    write_file_atomic(kubeconfig, kubeconfig_text("http://127.0.0.1:" + std::to_string(port), s.admin_token), 0600);
    log_line("wrote kubeconfig " + kubeconfig);
    // Register the node (its status as stored stays until the kubelet posts).
    s.started = now_unix();
    if (!s.store.nodes.count(s.node_name)) {
      NodeRecord n;
      n.name = s.node_name;
      n.ready = "False";
      n.created = n.heartbeat = s.started;
      n.kubelet_version = s.build.version;
      s.store.nodes[n.name] = n;
      s.save();
    }
  } catch (const std::exception& e) {
    log_line(std::string("error: ") + e.what());
    if (listen_fd >= 0) ::close(listen_fd);
    return 1;
  }
  s.ready_at = Clock::now() + std::chrono::milliseconds(s.knobs.ready_delay_ms);
  if (s.knobs.never_ready) log_line("configured never to become ready");
  if (s.knobs.kubelet_never_ready) log_line("configured: the kubelet never posts its node's status");
  bool ready_logged = false;
  auto next_heartbeat = s.ready_at;
  auto next_scan = Clock::now();
  std::optional<Clock::time_point> crash_at;

  sigset_t unblocked;
  sigemptyset(&unblocked);
  int exit_code = 0;
  while (true) {
    const auto now = Clock::now();
    if (!ready_logged && s.api_ready()) {
      log_line("k3s is up and running (node " + s.node_name + ")");
      sd_notify_ready();
      ready_logged = true;
      if (s.knobs.crash_after_ready_ms >= 0) crash_at = now + std::chrono::milliseconds(s.knobs.crash_after_ready_ms);
    }
    if (crash_at && now >= *crash_at) {
      log_line("fatal: configured to crash " + std::to_string(s.knobs.crash_after_ready_ms) + " ms after ready");
      std::_Exit(2);
    }
    if (s.kubelet_ready() && now >= next_heartbeat) {
      s.kubelet_post();
      next_heartbeat = now + std::chrono::milliseconds(s.knobs.heartbeat_ms);
    }
    if (s.api_ready() && now >= next_scan) {
      s.deploy_scan();
      next_scan = now + std::chrono::seconds(1);
    }
    if (lifetime && now >= *lifetime) {
      log_line("K3S_STANDIN_MAX_LIFETIME_S reached, stopping");
      break;
    }
    auto wake = now + std::chrono::seconds(1);
    if (!ready_logged && !s.knobs.never_ready) wake = std::min(wake, s.ready_at);
    if (s.kubelet_ready()) wake = std::min(wake, next_heartbeat);
    if (crash_at) wake = std::min(wake, *crash_at);
    if (lifetime) wake = std::min(wake, *lifetime);
    const auto wait = std::max<std::chrono::nanoseconds>(
        std::chrono::nanoseconds(0), std::chrono::duration_cast<std::chrono::nanoseconds>(wake - now));
    const timespec timeout{static_cast<time_t>(wait.count() / 1'000'000'000),
                           static_cast<long>(wait.count() % 1'000'000'000)};
    pollfd pfd{listen_fd, POLLIN, 0};
    const int rc = ::ppoll(&pfd, 1, &timeout, &unblocked);
    if (g_stop_signal != 0) {
      log_line(std::string("received ") + (g_stop_signal == SIGTERM ? "SIGTERM" : "SIGINT") + ", stopping");
      break;
    }
    if (rc < 0 && errno != EINTR) {
      log_line(std::string("error: poll: ") + std::strerror(errno));
      exit_code = 1;
      break;
    }
    if (rc > 0 && (pfd.revents & POLLIN)) {
      const int client = ::accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC);
      if (client >= 0) {
        if (auto req = read_request(client)) {
          try {
            send_response(client, s.route(*req));
          } catch (const std::exception& e) {
            send_response(client, status_json(500, "InternalError", e.what()));
          }
        }
        ::close(client);
      }
    }
  }
  ::close(listen_fd);
  remove_pidfile();
  if (s.etcd) ::unlink((fs::path(s.data_dir) / "server/db/etcd/standin.pid").c_str());
  ::unlink((fs::path(s.data_dir) / "server/standin.pid").c_str());
  log_line("stopped");
  return exit_code;
}

// `k3s agent`: joins the server named by `server` with `token` (or
// `token-file`), tells systemd it is ready once the server accepted its token
// (pkg/agent/run.go), then its kubelet posts the node's status every
// heartbeat. Its kubelet kubeconfig (agent/kubelet.kubeconfig) reads the node
// through the server, as the agent's health gate does.
int run_agent(const char* argv0, const Args& args) {
  setup_signals();
  const auto lifetime = lifetime_deadline();
  try {
    const ConfigValues cfg = load_config(args, kValueFlags);
    const Build build = resolve_build(argv0);
    const Knobs knobs = knobs_of(cfg, build);
    if (knobs.fail_start) {
      log_line("stand-in: configured to fail at start");
      return 1;
    }
    const std::string data_dir = required_data_dir(cfg);
    std::string server = cfg.get("server");
    std::string token = cfg.get("token");
    if (token.empty() && !cfg.get("token-file").empty()) {
      token = trim(read_file(cfg.get("token-file")).value_or(""));
      if (token.empty()) throw std::runtime_error("token-file " + cfg.get("token-file") + " is empty or unreadable");
    }
    if (server.empty()) throw std::runtime_error("--server is required");
    if (token.empty()) throw std::runtime_error("--token is required");
    const std::string secret = token.substr(token.rfind(':') + 1);
    char host[256] = {};
    ::gethostname(host, sizeof host - 1);
    const std::string node = cfg.get("node-name", host[0] ? host : "localhost");
    log_line("starting k3s stand-in agent (NOT real k3s) " + build.version + " pid " + std::to_string(::getpid()) +
             " node " + node + " server " + server);
    if (knobs.start_delay_ms > 0 && !sleep_interruptible(knobs.start_delay_ms)) return 0;
    extract_data_dir(data_dir, build);
    const fs::path agent_dir = fs::path(data_dir) / "agent";
    ensure_cert((agent_dir / "serving-kubelet.crt").string(), (agent_dir / "serving-kubelet.key").string(), node,
                knobs.cert_days);
    const std::string node_token = "node:" + node + ":" + secret;
    write_file_atomic((agent_dir / "kubelet.kubeconfig").string(), kubeconfig_text(server, node_token), 0600);
    write_pidfile();
    write_file_atomic((agent_dir / "standin.pid").string(), std::to_string(::getpid()), 0600);
    // Wait for the server to accept the token (real k3s: "Waiting to retrieve
    // agent configuration; server is not ready").
    bool notified = false;
    bool kubelet_logged = false;
    const auto ready_at = Clock::now() + std::chrono::milliseconds(knobs.ready_delay_ms);
    auto next_post = ready_at;
    std::optional<Clock::time_point> crash_at;
    while (g_stop_signal == 0) {
      const auto now = Clock::now();
      if (lifetime && now >= *lifetime) {
        log_line("K3S_STANDIN_MAX_LIFETIME_S reached, stopping");
        break;
      }
      if (crash_at && now >= *crash_at) {
        log_line("fatal: configured to crash " + std::to_string(knobs.crash_after_ready_ms) + " ms after ready");
        std::_Exit(2);
      }
      if (!notified) {
        try {
          const auto r = http_request(endpoint_from_url(server, node_token), "GET", "/readyz", "", 2000);
          if (r.status == 200) {
            log_line("joined server " + server);
            sd_notify_ready();
            notified = true;
          } else if (r.status == 401) {
            log_line("error: the server refused this node's token");
          }
        } catch (const std::exception& e) {
          log_line(std::string("Waiting to retrieve agent configuration; server is not ready: ") + e.what());
        }
      }
      const bool kubelet = notified && !knobs.never_ready && !knobs.kubelet_never_ready && now >= ready_at;
      if (kubelet && now >= next_post) {
        try {
          const std::string body = R"({"ready":"True","role":"agent","kubeletVersion":")" +
                                   json_escape(build.version) + "\"}";
          const auto r = http_request(endpoint_from_url(server, node_token), "PUT",
                                      "/api/v1/nodes/" + node + "/status", body, 2000);
          if (r.status == 200 && !kubelet_logged) {
            log_line("kubelet: node " + node + " is Ready");
            kubelet_logged = true;
            if (knobs.crash_after_ready_ms >= 0) {
              crash_at = now + std::chrono::milliseconds(knobs.crash_after_ready_ms);
            }
          }
        } catch (const std::exception& e) {
          log_line(std::string("kubelet: cannot post node status: ") + e.what());
        }
        next_post = now + std::chrono::milliseconds(knobs.heartbeat_ms);
      }
      if (!sleep_interruptible(notified ? 200 : 1000)) break;
    }
    if (g_stop_signal != 0) {
      log_line(std::string("received ") + (g_stop_signal == SIGTERM ? "SIGTERM" : "SIGINT") + ", stopping");
    }
    remove_pidfile();
    ::unlink((agent_dir / "standin.pid").c_str());
    log_line("stopped");
    return 0;
  } catch (const std::exception& e) {
    log_line(std::string("error: ") + e.what());
    return 1;
  }
}

}  // namespace flotilla::standin

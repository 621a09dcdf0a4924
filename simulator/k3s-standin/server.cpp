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
#include <cstring>
#include <ctime>
#include <filesystem>
#include <map>
#include <optional>
#include <random>
#include <stdexcept>

#include "standin.hpp"

namespace flotilla::standin {

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

constexpr std::size_t kMaxRequestBytes = 16 * 1024;
constexpr auto kRequestTimeout = std::chrono::seconds(2);

struct ServerConfig {
  std::string write_kubeconfig{kDefaultKubeconfig};
  std::string node_name;
  std::string data_dir{"/var/lib/rancher/k3s"};  // accepted, never touched
  long ready_delay_ms = 300;
  bool never_ready = false;
  bool fail_start = false;
  int port = 0;
};

struct ServerState {
  ServerConfig config;
  std::string version;
  std::string token;
  std::string created;  // RFC 3339, the node's creationTimestamp
  Clock::time_point ready_at;

  bool ready() const { return !config.never_ready && Clock::now() >= ready_at; }
};

struct Response {
  int code = 200;
  std::string content_type = "text/plain; charset=utf-8";
  std::string body;
};

volatile std::sig_atomic_t g_stop_signal = 0;

extern "C" void on_stop_signal(int sig) { g_stop_signal = sig; }

// Throws std::runtime_error with a user-facing message.
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

// Mirrors k3s: FILE first, then FILE.d/*.yaml|*.yml in lexical order, later
// keys overriding earlier ones (k3s pkg/configfilearg dotDFiles).
std::map<std::string, std::string> load_config_files(const std::string& file, bool explicit_file) {
  std::map<std::string, std::string> values;
  const auto main_text = read_file(file);
  if (!main_text && explicit_file) {
    throw std::runtime_error("failed to read config file " + file + ": " + std::strerror(errno));
  }
  std::vector<std::string> files;
  if (main_text) files.push_back(file);
  std::error_code ec;
  std::vector<std::string> dropins;
  for (const auto& entry : fs::directory_iterator(file + ".d", ec)) {
    const auto ext = entry.path().extension().string();
    if (entry.is_regular_file(ec) && (iequals(ext, ".yaml") || iequals(ext, ".yml"))) {
      dropins.push_back(entry.path().string());
    }
  }
  std::sort(dropins.begin(), dropins.end());
  files.insert(files.end(), dropins.begin(), dropins.end());
  for (const auto& path : files) {
    const auto text = read_file(path);
    if (!text) throw std::runtime_error("failed to read config file " + path);
    for (auto& [key, value] : parse_flat_yaml(*text)) values[key] = value;
  }
  return values;
}

ServerConfig load_config(const Args& args) {
  std::string file = env("K3S_CONFIG_FILE").value_or(std::string(kDefaultConfig));
  bool explicit_file = env("K3S_CONFIG_FILE").has_value();
  // Command-line flags beat the config files, as in k3s.
  std::map<std::string, std::string> flags;
  for (std::size_t i = 0; i < args.size(); ++i) {
    std::string name = args[i];
    if (!name.starts_with("-")) continue;
    name.erase(0, name.find_first_not_of('-'));
    std::optional<std::string> value;
    if (const auto eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name.resize(eq);
    }
    if (name == "c") name = "config";
    if (name == "o") name = "write-kubeconfig";
    static const char* const kValueFlags[] = {"config", "write-kubeconfig", "node-name", "data-dir",
                                              "https-listen-port"};
    if (std::find(std::begin(kValueFlags), std::end(kValueFlags), name) == std::end(kValueFlags)) {
      continue;  // every other k3s flag is accepted and ignored
    }
    if (!value) {
      if (i + 1 >= args.size()) throw std::runtime_error("flag needs an argument: --" + name);
      value = args[++i];
    }
    if (name == "config") {
      file = *value;
      explicit_file = true;
    } else {
      flags[name] = *value;
    }
  }

  auto values = load_config_files(file, explicit_file);
  for (const auto& [key, value] : flags) values[key] = value;

  ServerConfig config;
  char host[256] = {};
  if (::gethostname(host, sizeof host - 1) == 0) config.node_name = host;
  for (const auto& [key, value] : values) {
    if (key == "write-kubeconfig") {
      config.write_kubeconfig = value;
    } else if (key == "node-name") {
      config.node_name = value;
    } else if (key == "data-dir") {
      config.data_dir = value;
    } else if (key == "standin-ready-delay-ms") {
      config.ready_delay_ms = parse_long(key, value, 0, 86'400'000);
    } else if (key == "standin-never-ready") {
      config.never_ready = parse_bool(key, value);
    } else if (key == "standin-fail-start") {
      config.fail_start = parse_bool(key, value);
    } else if (key == "https-listen-port") {
      config.port = static_cast<int>(parse_long(key, value, 0, 65535));
    }
  }
  if (config.node_name.empty()) config.node_name = "localhost";
  return config;
}

std::string random_token() {
  std::random_device rd;
  std::string token = "standin-";
  static constexpr char kHex[] = "0123456789abcdef";
  for (int i = 0; i < 32; ++i) token.push_back(kHex[rd() % 16]);
  return token;
}

std::string now_rfc3339() {
  const std::time_t now = std::time(nullptr);
  std::tm utc{};
  ::gmtime_r(&now, &utc);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &utc);
  return buf;
}

// Temp file + rename so a poller never reads a half-written kubeconfig.
void write_kubeconfig(const std::string& path, int port, const std::string& token) {
  std::string text =
      "# Written by the k3s stand-in (Flotilla tests and demos), not by real k3s.\n"
      "apiVersion: v1\n"
      "clusters:\n"
      "- cluster:\n"
      "    server: http://127.0.0.1:@PORT@\n"
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
      "    token: @TOKEN@\n";
  text.replace(text.find("@PORT@"), 6, std::to_string(port));
  text.replace(text.find("@TOKEN@"), 7, token);
  std::error_code ec;
  const auto parent = fs::path(path).parent_path();
  if (!parent.empty()) fs::create_directories(parent, ec);
  const std::string tmp = path + ".tmp-" + std::to_string(::getpid());
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0) {
    throw std::runtime_error("cannot write kubeconfig " + tmp + ": " + std::strerror(errno));
  }
  bool ok = ::fchmod(fd, 0600) == 0;  // umask must not widen or narrow it
  for (std::size_t off = 0; ok && off < text.size();) {
    const auto n = ::write(fd, text.data() + off, text.size() - off);
    if (n < 0 && errno == EINTR) continue;
    ok = n > 0;
    off += ok ? static_cast<std::size_t>(n) : 0;
  }
  ok = ok && ::fsync(fd) == 0;
  ok = (::close(fd) == 0) && ok;
  if (!ok || ::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string reason = std::strerror(errno);
    ::unlink(tmp.c_str());
    throw std::runtime_error("cannot write kubeconfig " + path + ": " + reason);
  }
}

const char* reason_phrase(int code) {
  switch (code) {
    case 200:
      return "OK";
    case 400:
      return "Bad Request";
    case 401:
      return "Unauthorized";
    case 404:
      return "Not Found";
    case 405:
      return "Method Not Allowed";
    case 431:
      return "Request Header Fields Too Large";
    default:
      return "Internal Server Error";
  }
}

Response status_json(int code, const std::string& reason, const std::string& message) {
  return {code, "application/json",
          R"({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":")" +
              json_escape(message) + R"(","reason":")" + reason + R"(","code":)" +
              std::to_string(code) + "}\n"};
}

Response node_json(const ServerState& state) {
  const std::string name = json_escape(state.config.node_name);
  const bool ready = state.ready();
  return {200, "application/json",
          R"({"kind":"Node","apiVersion":"v1","metadata":{"name":")" + name +
              R"(","creationTimestamp":")" + state.created +
              R"(","labels":{"kubernetes.io/hostname":")" + name +
              R"(","node-role.kubernetes.io/control-plane":"true",)"
              R"("node-role.kubernetes.io/master":"true"},)"
              R"("annotations":{"flotilla.io/k3s-standin":"true"}},"status":{"conditions":[)"
              R"({"type":"Ready","status":")" +
              std::string(ready ? "True" : "False") + R"(","reason":")" +
              (ready ? "KubeletReady" : "KubeletNotReady") +
              R"("}],"nodeInfo":{"kubeletVersion":")" + json_escape(state.version) +
              R"("}}})"
              "\n"};
}

Response route(const std::string& method, std::string target, const std::string& authorization,
               const ServerState& state) {
  if (!iequals(authorization.substr(0, 7), "Bearer ") || authorization.substr(7) != state.token) {
    return status_json(401, "Unauthorized", "Unauthorized");
  }
  if (method != "GET") {
    return status_json(405, "MethodNotAllowed", "only GET is supported by the k3s stand-in");
  }
  target = target.substr(0, target.find('?'));
  if (target == "/livez") return {200, "text/plain; charset=utf-8", "ok"};
  if (target == "/readyz") {
    if (state.ready()) return {200, "text/plain; charset=utf-8", "ok"};
    return {500, "text/plain; charset=utf-8", "[-]poststarthook/k3s-ready failed: not ready"};
  }
  if (target == "/version") {
    return {200, "application/json", R"({"gitVersion":")" + json_escape(state.version) + "\"}\n"};
  }
  constexpr std::string_view kNodes = "/api/v1/nodes/";
  if (target.starts_with(kNodes)) {
    const std::string name = target.substr(kNodes.size());
    if (name == state.config.node_name) return node_json(state);
    return status_json(404, "NotFound", "nodes \"" + name + "\" not found");
  }
  return status_json(404, "NotFound", "the server could not find the requested resource");
}

void send_response(int fd, const Response& response) {
  std::string out = "HTTP/1.1 " + std::to_string(response.code) + " " +
                    reason_phrase(response.code) + "\r\nContent-Type: " + response.content_type +
                    "\r\nContent-Length: " + std::to_string(response.body.size()) +
                    "\r\nConnection: close\r\n\r\n" + response.body;
  for (std::size_t off = 0; off < out.size();) {
    const auto n = ::send(fd, out.data() + off, out.size() - off, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;  // client went away or SO_SNDTIMEO hit
    off += static_cast<std::size_t>(n);
  }
}

// One request per connection, bounded in size and time so a stuck client
// cannot wedge the single-threaded loop for long.
void serve_connection(int fd, const ServerState& state) {
  const timeval send_timeout{2, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &send_timeout, sizeof send_timeout);
  const auto deadline = Clock::now() + kRequestTimeout;
  std::string request;
  std::size_t header_end = std::string::npos;
  while ((header_end = request.find("\r\n\r\n")) == std::string::npos &&
         request.size() <= kMaxRequestBytes) {
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    pollfd pfd{fd, POLLIN, 0};
    if (left.count() <= 0 || ::poll(&pfd, 1, static_cast<int>(left.count())) <= 0) return;
    char buf[4096];
    const auto n = ::recv(fd, buf, sizeof buf, 0);
    if (n <= 0) return;
    request.append(buf, static_cast<std::size_t>(n));
  }

  if (header_end == std::string::npos || header_end > kMaxRequestBytes) {
    return send_response(fd, status_json(431, "RequestHeaderFieldsTooLarge", "request too large"));
  }
  const std::string head = request.substr(0, header_end);
  const auto line_end = head.find("\r\n");
  const std::string request_line = head.substr(0, line_end);
  const auto sp1 = request_line.find(' ');
  const auto sp2 = sp1 == std::string::npos ? sp1 : request_line.find(' ', sp1 + 1);
  if (sp1 == std::string::npos || sp2 == std::string::npos) {
    return send_response(fd, status_json(400, "BadRequest", "malformed request line"));
  }
  std::string authorization;
  for (auto pos = line_end; pos != std::string::npos && pos < head.size();) {
    const auto next = head.find("\r\n", pos + 2);
    const std::string header =
        head.substr(pos + 2, next == std::string::npos ? next : next - pos - 2);
    const auto colon = header.find(':');
    if (colon != std::string::npos && iequals(header.substr(0, colon), "authorization")) {
      authorization = trim(header.substr(colon + 1));
    }
    pos = next;
  }
  send_response(fd, route(request_line.substr(0, sp1), request_line.substr(sp1 + 1, sp2 - sp1 - 1),
                          authorization, state));
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

}  // namespace

int run_server(const char* argv0, const Args& args) {
  // Stop signals stay blocked except inside ppoll(), so one arriving between
  // checks cannot be lost.
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

  std::optional<Clock::time_point> lifetime_deadline;
  if (const auto max_s = env("K3S_STANDIN_MAX_LIFETIME_S")) {
    long seconds = 0;
    std::from_chars(max_s->data(), max_s->data() + max_s->size(), seconds);
    if (seconds > 0) lifetime_deadline = Clock::now() + std::chrono::seconds(seconds);
  }
  const auto pidfile = env("K3S_STANDIN_PIDFILE");

  int listen_fd = -1;
  ServerState state;
  try {
    state.config = load_config(args);
    if (state.config.fail_start) {
      log_line("stand-in: configured to fail at start");
      return 1;
    }
    state.version = resolve_version(argv0);
    log_line("starting k3s stand-in (NOT real k3s) " + state.version + " pid " +
             std::to_string(::getpid()) + " node " + state.config.node_name);
    if (pidfile) {
      const std::string pid = std::to_string(::getpid()) + "\n";
      if (FILE* f = std::fopen(pidfile->c_str(), "w")) {
        std::fputs(pid.c_str(), f);
        std::fclose(f);
      } else {
        log_line("warning: cannot write pidfile " + *pidfile);
      }
    }
    int port = 0;
    listen_fd = listen_loopback(state.config.port, port);
    log_line("listening on 127.0.0.1:" + std::to_string(port) + " (plain http)");
    state.token = random_token();
    write_kubeconfig(state.config.write_kubeconfig, port, state.token);
    log_line("wrote kubeconfig " + state.config.write_kubeconfig);
  } catch (const std::exception& e) {
    log_line(std::string("error: ") + e.what());
    if (listen_fd >= 0) ::close(listen_fd);
    return 1;
  }
  state.created = now_rfc3339();
  state.ready_at = Clock::now() + std::chrono::milliseconds(state.config.ready_delay_ms);
  bool ready_logged = false;
  if (state.config.never_ready) log_line("configured never to become ready");

  sigset_t unblocked;
  sigemptyset(&unblocked);
  int exit_code = 0;
  while (true) {
    const auto now = Clock::now();
    if (!ready_logged && state.ready()) {
      log_line("node " + state.config.node_name + " ready");
      ready_logged = true;
    }
    if (lifetime_deadline && now >= *lifetime_deadline) {
      log_line("K3S_STANDIN_MAX_LIFETIME_S reached, stopping");
      break;
    }
    // Wake for whichever comes first: readiness (to log it) or end of life.
    auto wake = now + std::chrono::hours(1);
    if (!ready_logged && !state.config.never_ready) wake = std::min(wake, state.ready_at);
    if (lifetime_deadline) wake = std::min(wake, *lifetime_deadline);
    const auto wait = std::max<std::chrono::nanoseconds>(
        std::chrono::nanoseconds(0),
        std::chrono::duration_cast<std::chrono::nanoseconds>(wake - now));
    const timespec timeout{static_cast<time_t>(wait.count() / 1'000'000'000),
                           static_cast<long>(wait.count() % 1'000'000'000)};
    pollfd pfd{listen_fd, POLLIN, 0};
    const int rc = ::ppoll(&pfd, 1, &timeout, &unblocked);
    if (g_stop_signal != 0) {
      log_line(std::string("received ") + (g_stop_signal == SIGTERM ? "SIGTERM" : "SIGINT") +
               ", stopping");
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
        serve_connection(client, state);
        ::close(client);
      }
    }
  }
  ::close(listen_fd);
  if (pidfile) ::unlink(pidfile->c_str());
  log_line("stopped");
  return exit_code;
}

}  // namespace flotilla::standin

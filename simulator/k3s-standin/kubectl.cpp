#include <netdb.h>
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
#include <sstream>

#include "standin.hpp"

namespace flotilla::standin {

namespace {

using Clock = std::chrono::steady_clock;
constexpr std::size_t kMaxResponseBytes = 4 * 1024 * 1024;

struct KubectlArgs {
  std::string kubeconfig;
  std::optional<std::string> raw;
  Args positionals;
};

struct Endpoint {
  std::string host;
  std::string port;
  std::string token;
};

struct HttpResult {
  int status = 0;
  std::string body;
};

// A failure already worded the way kubectl would word it.
struct KubectlError {
  std::string message;
};

KubectlArgs parse_args(const Args& args) {
  KubectlArgs out;
  for (std::size_t i = 0; i < args.size(); ++i) {
    const std::string& arg = args[i];
    auto take = [&](std::string_view flag) -> std::optional<std::string> {
      if (arg == flag) {
        if (i + 1 >= args.size()) throw KubectlError{"error: flag needs an argument: " + arg};
        return args[++i];
      }
      if (arg.starts_with(std::string(flag) + "=")) return arg.substr(flag.size() + 1);
      return std::nullopt;
    };
    if (auto v = take("--kubeconfig")) {
      out.kubeconfig = *v;
    } else if (auto r = take("--raw")) {
      out.raw = *r;
    } else if (take("-o") || take("--output") || take("-n") || take("--namespace") ||
               take("--request-timeout")) {
      // Accepted for compatibility; the stand-in has one output format.
    } else if (!arg.starts_with("-")) {
      out.positionals.push_back(arg);
    }
  }
  if (out.kubeconfig.empty()) {
    // Like kubectl, only the first entry of a KUBECONFIG list is used here.
    const auto list = env("KUBECONFIG").value_or("");
    out.kubeconfig = list.substr(0, list.find(':'));
  }
  if (out.kubeconfig.empty()) out.kubeconfig = std::string(kDefaultKubeconfig);
  return out;
}

// Reads `server:` and `token:` wherever they are nested; enough for the
// kubeconfig the stand-in server writes.
Endpoint load_endpoint(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    throw KubectlError{"error: stat " + path + ": " +
                       (errno == ENOENT ? "no such file or directory" : std::strerror(errno))};
  }
  const auto text = read_file(path);
  if (!text) throw KubectlError{"error: open " + path + ": " + std::strerror(errno)};
  std::string server;
  std::string token;
  std::istringstream lines(*text);
  std::string line;
  while (std::getline(lines, line)) {
    std::string item = trim(line);
    if (item.starts_with("- ")) item = trim(item.substr(2));
    if (item.starts_with("server:") && server.empty()) server = trim(item.substr(7));
    if (item.starts_with("token:") && token.empty()) token = trim(item.substr(6));
  }
  if (server.empty()) throw KubectlError{"error: no server found in kubeconfig " + path};
  if (!server.starts_with("http://")) {
    throw KubectlError{"error: the k3s stand-in kubectl only speaks plain http, not " + server};
  }
  std::string authority = server.substr(7);
  authority = authority.substr(0, authority.find('/'));
  Endpoint endpoint;
  endpoint.token = token;
  const auto colon = authority.rfind(':');
  if (colon == std::string::npos || authority.back() == ']') {
    endpoint.host = authority;
    endpoint.port = "80";
  } else {
    endpoint.host = authority.substr(0, colon);
    endpoint.port = authority.substr(colon + 1);
  }
  if (endpoint.port.empty()) endpoint.port = "80";
  if (endpoint.host.size() > 2 && endpoint.host.front() == '[') {
    endpoint.host = endpoint.host.substr(1, endpoint.host.size() - 2);
  }
  return endpoint;
}

int remaining_ms(Clock::time_point deadline) {
  const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
  return static_cast<int>(std::max<long>(0, left.count()));
}

int connect_to(const Endpoint& endpoint, Clock::time_point deadline) {
  const std::string where = endpoint.host + ":" + endpoint.port;
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  if (::getaddrinfo(endpoint.host.c_str(), endpoint.port.c_str(), &hints, &found) != 0 || !found) {
    throw KubectlError{"Unable to connect to the server: dial tcp: lookup " + endpoint.host +
                       ": no such host"};
  }
  const int fd = ::socket(found->ai_family, found->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  int err = fd < 0 ? errno : 0;
  if (fd >= 0 && ::connect(fd, found->ai_addr, found->ai_addrlen) != 0) {
    err = errno;
    if (err == EINPROGRESS) {
      pollfd pfd{fd, POLLOUT, 0};
      const int rc = ::poll(&pfd, 1, remaining_ms(deadline));
      socklen_t len = sizeof err;
      if (rc <= 0) {
        err = ETIMEDOUT;
      } else {
        ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
      }
    }
  }
  ::freeaddrinfo(found);
  if (err == 0) return fd;
  if (fd >= 0) ::close(fd);
  if (err == ECONNREFUSED) {
    throw KubectlError{"The connection to the server " + where +
                       " was refused - did you specify the right host or port?"};
  }
  if (err == ETIMEDOUT) {
    throw KubectlError{"Unable to connect to the server: dial tcp " + where + ": i/o timeout"};
  }
  throw KubectlError{"Unable to connect to the server: dial tcp " + where +
                     ": connect: " + std::strerror(err)};
}

HttpResult http_get(const Endpoint& endpoint, const std::string& path) {
  long timeout_ms = 5000;
  if (const auto override_ms = env("K3S_STANDIN_KUBECTL_TIMEOUT_MS")) {
    std::from_chars(override_ms->data(), override_ms->data() + override_ms->size(), timeout_ms);
  }
  const auto deadline = Clock::now() + std::chrono::milliseconds(std::max(1L, timeout_ms));
  const int fd = connect_to(endpoint, deadline);

  std::string request = "GET " + path + " HTTP/1.1\r\nHost: " + endpoint.host + ":" +
                        endpoint.port +
                        "\r\nUser-Agent: k3s-standin-kubectl\r\nAccept: application/json, */*\r\n";
  if (!endpoint.token.empty()) request += "Authorization: Bearer " + endpoint.token + "\r\n";
  request += "Connection: close\r\n\r\n";

  std::string response;
  bool timed_out = false;
  for (std::size_t off = 0; off < request.size() && !timed_out;) {
    pollfd pfd{fd, POLLOUT, 0};
    if (::poll(&pfd, 1, remaining_ms(deadline)) <= 0) timed_out = true;
    const auto n =
        timed_out ? 0 : ::send(fd, request.data() + off, request.size() - off, MSG_NOSIGNAL);
    if (n < 0 && errno != EAGAIN && errno != EINTR) break;  // the read below reports it
    off += n > 0 ? static_cast<std::size_t>(n) : 0;
  }
  while (!timed_out && response.size() < kMaxResponseBytes) {
    pollfd pfd{fd, POLLIN, 0};
    if (::poll(&pfd, 1, remaining_ms(deadline)) <= 0) {
      timed_out = true;
      break;
    }
    char buf[8192];
    const auto n = ::recv(fd, buf, sizeof buf, 0);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) continue;
    if (n <= 0) break;
    response.append(buf, static_cast<std::size_t>(n));
  }
  ::close(fd);
  if (timed_out) {
    throw KubectlError{
        "Unable to connect to the server: net/http: request canceled "
        "(Client.Timeout exceeded while awaiting headers)"};
  }

  const auto header_end = response.find("\r\n\r\n");
  HttpResult result;
  if (!response.starts_with("HTTP/1.") || header_end == std::string::npos) {
    throw KubectlError{"error: malformed response from " + endpoint.host + ":" + endpoint.port};
  }
  const auto sp = response.find(' ');
  std::from_chars(response.data() + sp + 1, response.data() + response.size(), result.status);
  result.body = response.substr(header_end + 4);
  return result;
}

// Like kubectl, a Kubernetes Status body is shown by its message.
std::string server_error(const HttpResult& result) {
  const char* reason = result.status == 404   ? "NotFound"
                       : result.status == 401 ? "Unauthorized"
                                              : "InternalError";
  std::string detail = trim(result.body);
  if (result.body.find("\"kind\":\"Status\"") != std::string::npos) {
    detail = json_string_field(result.body, "message").value_or(detail);
  }
  return "Error from server (" + std::string(reason) + "): " + detail;
}

// kubectl's HumanDuration, reduced to the ranges a test or demo ever sees.
std::string human_age(long seconds) {
  const long minutes = seconds / 60;
  const long hours = minutes / 60;
  if (seconds < 120) return std::to_string(seconds) + "s";
  if (minutes < 10) return std::to_string(minutes) + "m" + std::to_string(seconds % 60) + "s";
  if (minutes < 180) return std::to_string(minutes) + "m";
  if (hours < 48) return std::to_string(hours) + "h";
  return std::to_string(hours / 24) + "d";
}

std::string node_table(const std::string& node_json) {
  const bool ready = node_json.find(R"("type":"Ready","status":"True")") != std::string::npos;
  const std::string name = json_string_field(node_json, "name").value_or("<unknown>");
  const std::string version = json_string_field(node_json, "kubeletVersion").value_or("<unknown>");
  std::string age = "<unknown>";
  if (const auto created = json_string_field(node_json, "creationTimestamp")) {
    std::tm tm{};
    if (::strptime(created->c_str(), "%Y-%m-%dT%H:%M:%SZ", &tm) != nullptr) {
      age = human_age(std::max<long>(0, static_cast<long>(std::time(nullptr) - ::timegm(&tm))));
    }
  }
  const std::vector<std::vector<std::string>> rows = {
      {"NAME", "STATUS", "ROLES", "AGE", "VERSION"},
      {name, ready ? "Ready" : "NotReady", "control-plane,master", age, version}};
  std::string out;
  for (const auto& row : rows) {
    std::string line;
    for (std::size_t col = 0; col < row.size(); ++col) {
      const std::size_t width = std::max(rows[0][col].size(), rows[1][col].size()) + 3;
      line += row[col];
      if (col + 1 < row.size()) line += std::string(width - row[col].size(), ' ');
    }
    out += line + "\n";
  }
  return out;
}

}  // namespace

int run_kubectl(const Args& args) {
  std::signal(SIGPIPE, SIG_IGN);
  try {
    const KubectlArgs parsed = parse_args(args);
    const bool is_get = !parsed.positionals.empty() && parsed.positionals[0] == "get";
    const bool node_get = is_get && parsed.positionals.size() == 3 &&
                          (parsed.positionals[1] == "node" || parsed.positionals[1] == "nodes" ||
                           parsed.positionals[1] == "no");
    if (!is_get || (!parsed.raw && !node_get)) {
      throw KubectlError{
          "error: the k3s stand-in kubectl supports only "
          "'get --raw PATH' and 'get node NAME'"};
    }
    const Endpoint endpoint = load_endpoint(parsed.kubeconfig);
    const std::string path = parsed.raw ? *parsed.raw : "/api/v1/nodes/" + parsed.positionals[2];
    const HttpResult result = http_get(endpoint, path);
    if (result.status < 200 || result.status > 299) throw KubectlError{server_error(result)};
    const std::string out = parsed.raw ? result.body : node_table(result.body);
    std::fwrite(out.data(), 1, out.size(), stdout);
    return std::fflush(stdout) == 0 ? 0 : 1;
  } catch (const KubectlError& e) {
    std::fprintf(stderr, "%s\n", e.message.c_str());
    return 1;
  }
}

}  // namespace flotilla::standin

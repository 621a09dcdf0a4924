// `k3s kubectl` of the stand-in: get --raw, get node(s), get <kind> <name>
// -o json and delete -f, against a stand-in server, with kubectl's wording.
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
#include <stdexcept>

#include "standin.hpp"

namespace flotilla::standin {

namespace {

using Clock = std::chrono::steady_clock;
constexpr std::size_t kMaxResponseBytes = 4 * 1024 * 1024;

struct KubectlArgs {
  std::string kubeconfig;
  std::optional<std::string> raw;
  std::string ns;
  std::string output;
  std::vector<std::string> files;
  bool ignore_not_found = false;
  Args positionals;
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
    } else if (auto n = take("-n"); n || (n = take("--namespace"))) {
      out.ns = *n;
    } else if (auto o = take("-o"); o || (o = take("--output"))) {
      out.output = *o;
    } else if (auto f = take("-f"); f || (f = take("--filename"))) {
      out.files.push_back(*f);
    } else if (arg == "--ignore-not-found" || arg == "--ignore-not-found=true") {
      out.ignore_not_found = true;
    } else if (take("--request-timeout") || take("--wait") || take("--timeout")) {
      // Accepted for compatibility.
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
// kubeconfigs the stand-in writes.
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
  try {
    return endpoint_from_url(server, token);
  } catch (const std::runtime_error& e) {
    throw KubectlError{e.what()};
  }
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
    throw std::runtime_error("Unable to connect to the server: dial tcp: lookup " + endpoint.host + ": no such host");
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
    throw std::runtime_error("The connection to the server " + where +
                             " was refused - did you specify the right host or port?");
  }
  if (err == ETIMEDOUT) throw std::runtime_error("Unable to connect to the server: dial tcp " + where + ": i/o timeout");
  throw std::runtime_error("Unable to connect to the server: dial tcp " + where + ": connect: " + std::strerror(err));
}

// Like kubectl, a Kubernetes Status body is shown by its message.
std::string server_error(const HttpResult& result) {
  const char* reason = result.status == 404   ? "NotFound"
                       : result.status == 401 ? "Unauthorized"
                       : result.status == 403 ? "Forbidden"
                                              : "InternalError";
  std::string detail = trim(result.body);
  if (result.body.find("\"kind\":\"Status\"") != std::string::npos) {
    detail = json_string_field(result.body, "message").value_or(detail);
  }
  return "Error from server (" + std::string(reason) + "): " + detail;
}

long timeout_ms() {
  long ms = 5000;
  if (const auto override_ms = env("K3S_STANDIN_KUBECTL_TIMEOUT_MS")) {
    std::from_chars(override_ms->data(), override_ms->data() + override_ms->size(), ms);
  }
  return std::max(1L, ms);
}

HttpResult call(const Endpoint& e, const std::string& method, const std::string& path) {
  try {
    return http_request(e, method, path, "", timeout_ms());
  } catch (const std::runtime_error& err) {
    throw KubectlError{err.what()};
  }
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

std::vector<std::string> node_row(const std::string& node_json) {
  const std::string status = json_string_field(node_json, "status").value_or("Unknown");
  const std::string name = json_string_field(node_json, "name").value_or("<unknown>");
  const std::string version = json_string_field(node_json, "kubeletVersion").value_or("<unknown>");
  // The Ready condition's status is the first "status":"..." string after "type":"Ready".
  std::string ready = "Unknown";
  if (const auto at = node_json.find(R"("type":"Ready")"); at != std::string::npos) {
    ready = json_string_field(std::string_view(node_json).substr(at), "status").value_or("Unknown");
  }
  std::string age = "<unknown>";
  if (const auto created = json_string_field(node_json, "creationTimestamp")) {
    if (auto t = parse_rfc3339(*created)) age = human_age(std::max<long>(0, static_cast<long>(now_unix() - *t)));
  }
  const bool server = node_json.find("node-role.kubernetes.io/control-plane") != std::string::npos;
  return {name, ready == "True" ? "Ready" : "NotReady", server ? "control-plane,master" : "<none>", age, version};
}

std::string table(const std::vector<std::vector<std::string>>& rows) {
  std::vector<size_t> width;
  for (const auto& row : rows) {
    width.resize(std::max(width.size(), row.size()));
    for (size_t c = 0; c < row.size(); ++c) width[c] = std::max(width[c], row[c].size() + 3);
  }
  std::string out;
  for (const auto& row : rows) {
    std::string line;
    for (size_t c = 0; c < row.size(); ++c) {
      line += row[c];
      if (c + 1 < row.size()) line += std::string(width[c] - row[c].size(), ' ');
    }
    out += line + "\n";
  }
  return out;
}

}  // namespace

Endpoint endpoint_from_url(const std::string& url, const std::string& token) {
  if (!url.starts_with("http://")) {
    throw std::runtime_error("error: the k3s stand-in only speaks plain http, not " + url);
  }
  std::string authority = url.substr(7);
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

HttpResult http_request(const Endpoint& endpoint, const std::string& method, const std::string& path,
                        const std::string& body, long timeout) {
  const auto deadline = Clock::now() + std::chrono::milliseconds(timeout);
  const int fd = connect_to(endpoint, deadline);
  std::string request = method + " " + path + " HTTP/1.1\r\nHost: " + endpoint.host + ":" + endpoint.port +
                        "\r\nUser-Agent: k3s-standin-kubectl\r\nAccept: application/json, */*\r\n";
  if (!endpoint.token.empty()) request += "Authorization: Bearer " + endpoint.token + "\r\n";
  if (!body.empty()) request += "Content-Type: application/json\r\n";
  request += "Content-Length: " + std::to_string(body.size()) + "\r\nConnection: close\r\n\r\n" + body;
  std::string response;
  bool timed_out = false;
  for (std::size_t off = 0; off < request.size() && !timed_out;) {
    pollfd pfd{fd, POLLOUT, 0};
    if (::poll(&pfd, 1, remaining_ms(deadline)) <= 0) timed_out = true;
    const auto n = timed_out ? 0 : ::send(fd, request.data() + off, request.size() - off, MSG_NOSIGNAL);
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
    throw std::runtime_error(
        "Unable to connect to the server: net/http: request canceled (Client.Timeout exceeded while awaiting headers)");
  }
  const auto header_end = response.find("\r\n\r\n");
  HttpResult result;
  if (!response.starts_with("HTTP/1.") || header_end == std::string::npos) {
    throw std::runtime_error("error: malformed response from " + endpoint.host + ":" + endpoint.port);
  }
  const auto sp = response.find(' ');
  std::from_chars(response.data() + sp + 1, response.data() + response.size(), result.status);
  result.body = response.substr(header_end + 4);
  return result;
}

int run_kubectl(const Args& args) {
  std::signal(SIGPIPE, SIG_IGN);
  try {
    const KubectlArgs parsed = parse_args(args);
    // k3s kubectl extracts the data directory first (cmd/k3s/main.go); the
    // stand-in does so only where a data-dir is configured, never into the
    // host's /var/lib/rancher/k3s.
    if (const std::string dir = find_data_dir({}); !dir.empty()) extract_data_dir(dir, resolve_build(nullptr));
    const std::string verb = parsed.positionals.empty() ? "" : parsed.positionals[0];
    if (verb == "delete" && !parsed.files.empty()) {
      const Endpoint endpoint = load_endpoint(parsed.kubeconfig);
      std::string errors;
      for (const auto& file : parsed.files) {
        const auto text = read_file(file);
        if (!text) throw KubectlError{"error: the path \"" + file + "\" does not exist"};
        for (const auto& r : parse_manifest(*text, "")) {
          const KindInfo k = kind_info(r.kind, r.api_version);
          const std::string qualified = lower(k.kind) + (k.group.empty() ? "" : "." + k.group);
          const HttpResult res = call(endpoint, "DELETE", resource_path(k, r.ns, r.name));
          if (res.status >= 200 && res.status < 300) {
            std::printf("%s \"%s\" deleted\n", qualified.c_str(), r.name.c_str());
          } else if (res.status == 404 && parsed.ignore_not_found) {
            continue;
          } else {
            errors += server_error(res) + "\n";
          }
        }
      }
      std::fflush(stdout);
      if (!errors.empty()) {
        std::fputs(errors.c_str(), stderr);
        return 1;
      }
      return 0;
    }
    if (verb != "get") {
      throw KubectlError{
          "error: the k3s stand-in kubectl supports only 'get --raw PATH', 'get node[s] [NAME]', "
          "'get KIND NAME [-n NS] -o json' and 'delete -f FILE'"};
    }
    const Endpoint endpoint = load_endpoint(parsed.kubeconfig);
    if (parsed.raw) {
      const HttpResult result = call(endpoint, "GET", *parsed.raw);
      if (result.status < 200 || result.status > 299) throw KubectlError{server_error(result)};
      std::fwrite(result.body.data(), 1, result.body.size(), stdout);
      return std::fflush(stdout) == 0 ? 0 : 1;
    }
    if (parsed.positionals.size() < 2) throw KubectlError{"error: You must specify the type of resource to get."};
    const KindInfo k = kind_info(parsed.positionals[1]);
    const std::string name = parsed.positionals.size() > 2 ? parsed.positionals[2] : "";
    if (k.kind == "Node") {
      const HttpResult result = call(endpoint, "GET", "/api/v1/nodes" + (name.empty() ? "" : "/" + name));
      if (result.status < 200 || result.status > 299) throw KubectlError{server_error(result)};
      if (parsed.output == "json") {
        std::fwrite(result.body.data(), 1, result.body.size(), stdout);
        return std::fflush(stdout) == 0 ? 0 : 1;
      }
      std::vector<std::vector<std::string>> rows = {{"NAME", "STATUS", "ROLES", "AGE", "VERSION"}};
      // One object, or a NodeList whose items are split at each Node.
      size_t at = 0;
      while ((at = result.body.find(R"({"kind":"Node",)", at)) != std::string::npos) {
        const auto next = result.body.find(R"({"kind":"Node",)", at + 1);
        rows.push_back(node_row(result.body.substr(at, next == std::string::npos ? std::string::npos : next - at)));
        at = at + 1;
      }
      const std::string out = table(rows);
      std::fwrite(out.data(), 1, out.size(), stdout);
      return std::fflush(stdout) == 0 ? 0 : 1;
    }
    if (name.empty()) throw KubectlError{"error: the stand-in kubectl gets one named object"};
    const HttpResult result = call(endpoint, "GET", resource_path(k, parsed.ns, name));
    if (result.status < 200 || result.status > 299) throw KubectlError{server_error(result)};
    if (parsed.output == "json") {
      std::fwrite(result.body.data(), 1, result.body.size(), stdout);
    } else {
      const std::string out = table({{"NAME"}, {name}});
      std::fwrite(out.data(), 1, out.size(), stdout);
    }
    return std::fflush(stdout) == 0 ? 0 : 1;
  } catch (const KubectlError& e) {
    std::fprintf(stderr, "%s\n", e.message.c_str());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
}

}  // namespace flotilla::standin

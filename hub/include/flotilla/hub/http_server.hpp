#pragma once
// Boost.Beast HTTP/1.1 server: an io_context on a few threads, one strand
// per connection, a size limit on every body and a deadline on every read;
// optionally TLS (the same session code runs over either stream).
#include <boost/asio/io_context.hpp>
#include <chrono>
#include <filesystem>
#include <functional>
#include <optional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "flotilla/common/result.hpp"
#include "flotilla/hub/api.hpp"
#include "flotilla/hub/metrics.hpp"

namespace flotilla::hub {

struct HttpServerConfig {
  std::string host = "127.0.0.1";
  int port = 8080;                   // 0 = any free port
  int threads = 2;
  size_t max_body_bytes = 8u << 20;  // hard cap; routes apply tighter ones
  std::chrono::seconds read_timeout{30};
  // Streamed uploads: PUT <upload_prefix>... bodies go to a file in upload_dir.
  std::string upload_prefix = "/v1/artifacts/";
  std::filesystem::path upload_dir;  // empty = no streamed uploads
  uint64_t max_upload_bytes = uint64_t{4} << 30;
  std::chrono::seconds upload_timeout{300};
  // Looks at an upload's headers before any body is read; a response refuses it.
  std::function<std::optional<HttpResponse>(const HttpRequest&)> precheck_upload;
  // Every other request, on its headers alone: a refusal is answered without
  // reading the body, otherwise the body may be at most max_body (and
  // max_body_bytes). Unset: max_body_bytes for every route.
  std::function<Admission(const HttpRequest&)> admit;
  // Open connections at most: at the cap the server stops accepting (new
  // clients wait in the kernel's backlog) until one closes. Per peer
  // address: a connection over it is answered 503 and closed at once.
  // 0 = no cap.
  int max_connections = 1024;
  int max_connections_per_peer = 256;
  // TLS: both set = the listener speaks only TLS 1.2+ with this PEM chain and
  // key; both empty = plain HTTP. start() refuses one without the other.
  std::string tls_cert_file;
  std::string tls_key_file;
  std::chrono::seconds handshake_timeout{10};
  bool tls() const { return !tls_cert_file.empty() || !tls_key_file.empty(); }
};

class HttpServer {
 public:
  using Handler = std::function<HttpResponse(const HttpRequest&)>;
  static Result<std::unique_ptr<HttpServer>> start(const HttpServerConfig& cfg, Handler handler);
  ~HttpServer();
  int port() const { return port_; }
  // Connection counters for /metrics; live as long as the server.
  const ServerStats& stats() const;
  void stop();

 private:
  HttpServer() = default;
  struct Impl;
  std::unique_ptr<Impl> impl_;
  int port_ = 0;
};

}  // namespace flotilla::hub

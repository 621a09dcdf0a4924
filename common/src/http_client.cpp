#include "flotilla/common/http_client.hpp"
#include "flotilla/common/version.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <limits>
#include <optional>
#include <thread>
#include <boost/asio/connect.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>

namespace flotilla::http {

namespace beast = boost::beast;
namespace bhttp = boost::beast::http;
namespace asio = boost::asio;
namespace ssl = boost::asio::ssl;
using TlsStream = beast::ssl_stream<beast::tcp_stream>;

Result<Url> parse_url(const std::string& url) {
  Url u;
  auto sep = url.find("://");
  if (sep == std::string::npos) return make_error(Errc::invalid_argument, "URL has no scheme: " + url);
  u.scheme = url.substr(0, sep);
  if (u.scheme != "http" && u.scheme != "https") {
    return make_error(Errc::invalid_argument, "unsupported URL scheme '" + u.scheme + "' in " + url);
  }
  std::string rest = url.substr(sep + 3);
  auto slash = rest.find('/');
  std::string hostport = rest.substr(0, slash);
  u.target = slash == std::string::npos ? "/" : rest.substr(slash);
  if (hostport.empty()) return make_error(Errc::invalid_argument, "URL has no host: " + url);
  if (hostport.front() == '[') {  // [::1]:8080
    auto close = hostport.find(']');
    if (close == std::string::npos) return make_error(Errc::invalid_argument, "bad IPv6 host in " + url);
    u.host = hostport.substr(1, close - 1);
    if (close + 1 < hostport.size() && hostport[close + 1] == ':') u.port = hostport.substr(close + 2);
  } else {
    auto colon = hostport.rfind(':');
    u.host = hostport.substr(0, colon);
    if (colon != std::string::npos) u.port = hostport.substr(colon + 1);
  }
  if (u.port.empty()) u.port = u.scheme == "https" ? "443" : "80";
  if (!std::all_of(u.port.begin(), u.port.end(), ::isdigit)) {
    return make_error(Errc::invalid_argument, "bad port in " + url);
  }
  return u;
}

namespace {

// TLS 1.2+, the peer's chain checked against ca_file (or the system store).
Result<ssl::context> tls_client_context(const std::string& ca_file) {
  ssl::context ctx(ssl::context::tls_client);
  if (SSL_CTX_set_min_proto_version(ctx.native_handle(), TLS1_2_VERSION) != 1) {
    return make_error(Errc::internal, "cannot require TLS 1.2");
  }
  beast::error_code ec;
  if (ca_file.empty()) {
    ctx.set_default_verify_paths(ec);
    if (ec) return make_error(Errc::unavailable, "cannot load the system CA certificates: " + ec.message());
  } else {
    // Checked first: OpenSSL reports a missing file as a bare "system lib".
    if (!std::ifstream(ca_file)) return make_error(Errc::invalid_argument, "cannot read CA file '" + ca_file + "'");
    ctx.load_verify_file(ca_file, ec);
    if (ec) return make_error(Errc::invalid_argument, "CA file '" + ca_file + "' holds no PEM certificate: " + ec.message());
  }
  ctx.set_verify_mode(ssl::verify_peer);
  return ctx;
}

// One connection to a URL's host, plain or TLS. Both streams have the same
// Beast interface, so an exchange is written once, as a generic lambda given
// to with(); deadlines always live on the TCP layer.
class Connection {
 public:
  explicit Connection(asio::io_context& ioc) : ioc_(ioc) {}

  beast::tcp_stream& tcp() { return tls_ ? beast::get_lowest_layer(*tls_) : *plain_; }

  template <class F>
  void with(F&& f) {
    if (tls_) f(*tls_);
    else f(*plain_);
  }

  // Resolves, connects and, for https, handshakes, all under one deadline of
  // `timeout` that stays set afterwards (callers may renew it per step).
  // `what` ("GET <url>") starts every error message.
  Status open(const Url& url, const std::string& ca_file, std::chrono::milliseconds timeout, const std::string& what) {
    asio::ip::tcp::resolver resolver(ioc_);
    beast::error_code ec;
    auto results = resolver.resolve(url.host, url.port, ec);
    if (ec) return make_error(Errc::unavailable, "resolve " + url.host + ": " + ec.message(), true);
    if (url.scheme == "https") {
      auto ctx = tls_client_context(ca_file);
      if (!ctx) return ctx.error().with_context(what);
      ctx_.emplace(std::move(*ctx));
      tls_.emplace(ioc_, *ctx_);
      SSL* h = tls_->native_handle();
      asio::ip::make_address(url.host, ec);
      const bool ip = !ec;
      // The certificate must name the host: OpenSSL's own check (rather than
      // a verify callback) so a mismatch is reported as "hostname mismatch".
      // SNI only for names: RFC 6066 does not allow IP literals there.
      const bool named = ip ? X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(h), url.host.c_str()) == 1
                            : SSL_set1_host(h, url.host.c_str()) == 1 && SSL_set_tlsext_host_name(h, url.host.c_str()) == 1;
      if (!named) return make_error(Errc::invalid_argument, what + ": cannot check TLS host name '" + url.host + "'");
    } else {
      plain_.emplace(ioc_);
    }
    tcp().expires_after(timeout);
    ec = {};
    tcp().async_connect(results, [&](beast::error_code e, const asio::ip::tcp::endpoint&) { ec = e; });
    run();
    if (ec == beast::error::timeout) return make_error(Errc::timeout, what + ": connect timed out", true);
    if (ec) return make_error(Errc::unavailable, what + ": connect: " + ec.message(), true);
    if (!tls_) return {};
    tls_->async_handshake(ssl::stream_base::client, [&](beast::error_code e) { ec = e; });
    run();
    if (ec == beast::error::timeout) return make_error(Errc::timeout, what + ": TLS handshake timed out", true);
    if (ec) {
      const long v = SSL_get_verify_result(tls_->native_handle());
      if (v != X509_V_OK) {
        // Not retryable: trying again will not make the certificate trusted.
        return make_error(Errc::unavailable,
                          what + ": the server's TLS certificate was rejected: " + X509_verify_cert_error_string(v) +
                              (ca_file.empty() ? " (checked against the system CA store; give the CA that signed it)"
                                               : " (checked against CA file " + ca_file + ")"));
      }
      return make_error(Errc::unavailable, what + ": TLS handshake failed: " + ec.message(), true);
    }
    return {};
  }

  // Responses are length-delimited, so there is no need to wait for the
  // server's close_notify: just end the TCP connection.
  void close() {
    beast::error_code ec;
    tcp().socket().shutdown(asio::ip::tcp::socket::shutdown_both, ec);
  }

  void run() {
    ioc_.restart();
    ioc_.run();
  }

 private:
  asio::io_context& ioc_;
  std::optional<ssl::context> ctx_;  // outlives tls_ (declared first)
  std::optional<beast::tcp_stream> plain_;
  std::optional<TlsStream> tls_;
};

}  // namespace

Result<Response> send(const Request& req) {
  auto url = parse_url(req.url);
  if (!url) return url.error();
  try {
    asio::io_context ioc;
    Connection conn(ioc);
    // One deadline, set by open(), for the whole exchange.
    if (auto s = conn.open(*url, req.ca_file, req.timeout, req.method + " " + req.url); !s) return s.error();

    beast::error_code ec;
    Response out;
    bhttp::request<bhttp::string_body> r{bhttp::string_to_verb(req.method), url->target, 11};
    r.set(bhttp::field::host, url->host);
    r.set(bhttp::field::user_agent, std::string("flotilla/") + version());
    for (const auto& [k, v] : req.headers) r.set(k, v);
    r.body() = req.body;
    r.prepare_payload();

    bhttp::response_parser<bhttp::string_body> parser;
    parser.body_limit(req.max_response_bytes);
    beast::flat_buffer buffer;

    // Run the whole exchange asynchronously so the stream's deadline applies to every step.
    conn.with([&](auto& stream) {
      bhttp::async_write(stream, r, [&](beast::error_code e2, size_t) {
        // A server may answer (413, 401) and stop reading before the body is
        // all sent; its answer is still there to read.
        if (e2 && e2 != asio::error::broken_pipe && e2 != asio::error::connection_reset) {
          ec = e2;
          return;
        }
        bhttp::async_read(stream, buffer, parser, [&, e2](beast::error_code e3, size_t) { ec = e3 ? (e2 ? e2 : e3) : e3; });
      });
    });
    conn.run();
    if (ec == beast::error::timeout) {
      return make_error(Errc::timeout, req.method + " " + req.url + " timed out", true);
    }
    if (ec == bhttp::error::body_limit) {
      return make_error(Errc::too_large, req.method + " " + req.url + ": response larger than " +
                                             std::to_string(req.max_response_bytes) + " bytes");
    }
    if (ec) return make_error(Errc::unavailable, req.method + " " + req.url + ": " + ec.message(), true);
    auto& res = parser.get();
    out.status = static_cast<int>(res.result_int());
    out.body = std::move(res.body());
    for (const auto& f : res) {
      std::string name(f.name_string());
      std::transform(name.begin(), name.end(), name.begin(), ::tolower);
      out.headers[name] = std::string(f.value());
    }
    conn.close();
    return out;
  } catch (const std::exception& e) {
    return make_error(Errc::internal, req.method + " " + req.url + ": " + e.what());
  }
}

namespace {

// One GET from `offset`, appending to fd. Returns the status and how many
// body bytes were written; a network error after some bytes is reported in
// `net_error` so the caller can resume.
struct Exchange {
  int status = 0;
  uint64_t written = 0;
  uint64_t range_start = 0;  // from Content-Range on 206
  std::string net_error;
  bool too_large = false;
};

using SteadyTime = std::chrono::steady_clock::time_point;

// The idle timeout, cut short by what is left of the overall deadline.
std::chrono::milliseconds step_timeout(const DownloadOptions& opts, SteadyTime deadline_at) {
  const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline_at - std::chrono::steady_clock::now());
  return std::max(std::chrono::milliseconds(1), std::min(opts.io_timeout, left));
}

Result<Exchange> get_into(const Url& url, const std::string& full_url, int fd, uint64_t offset,
                          const DownloadOptions& opts, SteadyTime deadline_at) {
  Exchange x;
  asio::io_context ioc;
  Connection conn(ioc);
  beast::error_code ec;
  if (auto s = conn.open(url, opts.ca_file, step_timeout(opts, deadline_at), "GET " + full_url); !s) return s.error();
  // Each step runs the io_context with a fresh idle deadline, never past the
  // overall one.
  auto run = [&](auto&& start) {
    ec = {};
    conn.tcp().expires_after(step_timeout(opts, deadline_at));
    conn.with(start);
    conn.run();
  };
  bhttp::request<bhttp::empty_body> r{bhttp::verb::get, url.target, 11};
  r.set(bhttp::field::host, url.host);
  r.set(bhttp::field::user_agent, std::string("flotilla/") + version());
  for (const auto& [k, v] : opts.headers) r.set(k, v);
  if (offset > 0) r.set(bhttp::field::range, "bytes=" + std::to_string(offset) + "-");
  run([&](auto& stream) { bhttp::async_write(stream, r, [&](beast::error_code e, size_t) { ec = e; }); });
  if (ec) return make_error(Errc::unavailable, "GET " + full_url + ": " + ec.message(), true);

  beast::flat_buffer buffer;
  bhttp::response_parser<bhttp::buffer_body> parser;
  parser.body_limit(std::numeric_limits<std::uint64_t>::max());  // enforced below against max_bytes
  run([&](auto& stream) {
    bhttp::async_read_header(stream, buffer, parser, [&](beast::error_code e, size_t) { ec = e; });
  });
  if (ec) return make_error(Errc::unavailable, "GET " + full_url + ": " + ec.message(), true);
  x.status = static_cast<int>(parser.get().result_int());
  if (x.status == 206) {
    // "bytes <start>-<end>/<total>"
    std::string cr(parser.get()[bhttp::field::content_range]);
    auto sp = cr.find(' ');
    try {
      x.range_start = std::stoull(cr.substr(sp == std::string::npos ? 0 : sp + 1));
    } catch (const std::exception&) {
      return make_error(Errc::parse, "GET " + full_url + ": bad Content-Range '" + cr + "'");
    }
    if (x.range_start != offset) return x;  // the caller restarts from zero
  }
  if (x.status != 200 && x.status != 206) return x;
  if (x.status == 200 && ::ftruncate(fd, 0) != 0) {
    return make_error(Errc::io, std::string("truncate: ") + std::strerror(errno));
  }
  if (x.status == 200) ::lseek(fd, 0, SEEK_SET);
  const uint64_t base = x.status == 200 ? 0 : offset;
  char chunk[65536];
  while (!parser.is_done()) {
    parser.get().body().data = chunk;
    parser.get().body().size = sizeof chunk;
    run([&](auto& stream) {
      bhttp::async_read_some(stream, buffer, parser, [&](beast::error_code e, size_t) { ec = e; });
    });
    if (ec == bhttp::error::need_buffer) ec = {};
    const size_t n = sizeof chunk - parser.get().body().size;
    if (base + x.written + n > opts.max_bytes) {
      x.too_large = true;
      return x;
    }
    for (size_t off = 0; off < n;) {
      ssize_t w = ::write(fd, chunk + off, n - off);
      if (w < 0 && errno == EINTR) continue;
      if (w < 0) return make_error(Errc::io, std::string("write: ") + std::strerror(errno));
      off += static_cast<size_t>(w);
    }
    x.written += n;
    if (ec) {
      x.net_error = ec.message();
      return x;
    }
  }
  conn.close();
  return x;
}

}  // namespace

Result<DownloadResult> download_to_file(const std::string& url_text, const std::filesystem::path& path,
                                        const DownloadOptions& opts) {
  auto url = parse_url(url_text);
  if (!url) return url.error();
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
  if (fd < 0) return make_error(Errc::io, "open " + path.string() + ": " + std::strerror(errno));
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  auto size_now = [&]() -> uint64_t {
    struct stat st {};
    return ::fstat(fd, &st) == 0 ? static_cast<uint64_t>(st.st_size) : 0;
  };
  DownloadResult out;
  out.resumed_from = size_now();
  std::string last_error;
  const auto started = std::chrono::steady_clock::now();
  const SteadyTime deadline_at = opts.deadline.count() > 0 ? started + opts.deadline : SteadyTime::max();
  auto past_deadline = [&]() -> std::optional<Error> {
    if (std::chrono::steady_clock::now() < deadline_at) return std::nullopt;
    (void)::fsync(fd);  // what arrived stays, for a resume
    return make_error(Errc::timeout, "GET " + url_text + ": not finished within " +
                                         std::to_string(opts.deadline.count() / 1000) +
                                         " s, the overall deadline for this download (" + std::to_string(size_now()) +
                                         " bytes so far" + (last_error.empty() ? "" : "; last: " + last_error) +
                                         "): the server is too slow");
  };
  try {
    for (int attempt = 0; attempt < std::max(1, opts.max_attempts); ++attempt) {
      if (auto e = past_deadline()) return *e;
      const uint64_t offset = size_now();
      if (offset > opts.max_bytes) {
        return make_error(Errc::too_large, url_text + ": more than " + std::to_string(opts.max_bytes) + " bytes");
      }
      ++out.requests;
      auto x = get_into(*url, url_text, fd, offset, opts, deadline_at);
      if (!x) {
        last_error = x.error().message;
        if (!x.error().retryable) return x.error();
        if (auto e = past_deadline()) return *e;
        continue;
      }
      if (x->too_large) {
        return make_error(Errc::too_large, url_text + ": more than " + std::to_string(opts.max_bytes) + " bytes");
      }
      if (x->status == 416 && offset > 0) break;  // nothing left to fetch
      if (x->status == 206 && x->range_start != offset) {
        if (::ftruncate(fd, 0) != 0) return make_error(Errc::io, "truncate " + path.string());
        last_error = "server resumed at the wrong offset";
        continue;
      }
      if (x->status == 404) return make_error(Errc::not_found, "GET " + url_text + ": 404 not found");
      if (x->status != 200 && x->status != 206) {
        return make_error(Errc::unavailable, "GET " + url_text + ": HTTP " + std::to_string(x->status),
                          x->status >= 500);
      }
      if (x->net_error.empty()) {
        if (::fsync(fd) != 0) return make_error(Errc::io, "fsync " + path.string() + ": " + std::strerror(errno));
        out.size = size_now();
        return out;
      }
      last_error = x->net_error;  // dropped mid-body: resume from what is on disk
      if (auto e = past_deadline()) return *e;
    }
  } catch (const std::exception& e) {
    return make_error(Errc::internal, "GET " + url_text + ": " + e.what());
  }
  if (::fsync(fd) != 0) return make_error(Errc::io, "fsync " + path.string());
  out.size = size_now();
  if (!last_error.empty() && out.requests >= std::max(1, opts.max_attempts)) {
    return make_error(Errc::unavailable, "GET " + url_text + ": " + last_error + " (after " +
                                             std::to_string(out.requests) + " attempts)", true);
  }
  return out;
}

std::optional<int64_t> retry_after_seconds(const Response& r) {
  auto h = r.headers.find("retry-after");
  if (h == r.headers.end()) return std::nullopt;
  int64_t seconds = 1;
  const std::string& v = h->second;
  const auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), seconds);
  if (ec != std::errc() || end != v.data() + v.size() || seconds < 0) seconds = 1;
  return seconds;
}

Result<Response> send_retrying(const Request& req, const RetryPolicy& policy) {
  const bool safe = req.method == "GET" || req.method == "HEAD";
  std::chrono::milliseconds left = policy.budget;
  for (;;) {
    auto resp = send(req);
    if (!resp || !safe || (resp->status != 503 && resp->status != 429)) return resp;
    const auto seconds = retry_after_seconds(*resp);
    if (!seconds) return resp;
    const auto wait = std::clamp<std::chrono::milliseconds>(std::chrono::milliseconds(*seconds * 1000),
                                                            std::chrono::milliseconds(100), policy.max_wait);
    if (wait > left) return resp;
    if (policy.on_wait) policy.on_wait(*resp, wait);
    std::this_thread::sleep_for(wait);
    left -= wait;
  }
}

}  // namespace flotilla::http

#include "flotilla/common/http_client.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <boost/asio/connect.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

namespace flotilla::http {

namespace beast = boost::beast;
namespace bhttp = boost::beast::http;
namespace asio = boost::asio;

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

Result<Response> send(const Request& req) {
  auto url = parse_url(req.url);
  if (!url) return url.error();
  if (url->scheme == "https") {
    return make_error(Errc::invalid_argument, "https is not supported by this build yet: " + req.url);
  }
  try {
    asio::io_context ioc;
    asio::ip::tcp::resolver resolver(ioc);
    beast::tcp_stream stream(ioc);
    stream.expires_after(req.timeout);

    beast::error_code ec;
    Response out;
    auto results = resolver.resolve(url->host, url->port, ec);
    if (ec) return make_error(Errc::unavailable, "resolve " + url->host + ": " + ec.message(), true);

    bhttp::request<bhttp::string_body> r{bhttp::string_to_verb(req.method), url->target, 11};
    r.set(bhttp::field::host, url->host);
    r.set(bhttp::field::user_agent, "flotilla/0.1");
    for (const auto& [k, v] : req.headers) r.set(k, v);
    r.body() = req.body;
    r.prepare_payload();

    bhttp::response_parser<bhttp::string_body> parser;
    parser.body_limit(req.max_response_bytes);
    beast::flat_buffer buffer;

    // Run the whole exchange asynchronously so the stream's deadline applies to every step.
    stream.async_connect(results, [&](beast::error_code e, const asio::ip::tcp::endpoint&) {
      if (e) { ec = e; return; }
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
    ioc.run();
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
    stream.socket().shutdown(asio::ip::tcp::socket::shutdown_both, ec);
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

Result<Exchange> get_into(const Url& url, const std::string& full_url, int fd, uint64_t offset,
                          const DownloadOptions& opts) {
  Exchange x;
  asio::io_context ioc;
  asio::ip::tcp::resolver resolver(ioc);
  beast::tcp_stream stream(ioc);
  beast::error_code ec;
  auto results = resolver.resolve(url.host, url.port, ec);
  if (ec) return make_error(Errc::unavailable, "resolve " + url.host + ": " + ec.message(), true);
  // Each step runs the io_context with a fresh idle deadline.
  auto run = [&](auto&& start) {
    ec = {};
    stream.expires_after(opts.io_timeout);
    start();
    ioc.restart();
    ioc.run();
  };
  run([&] { stream.async_connect(results, [&](beast::error_code e, const asio::ip::tcp::endpoint&) { ec = e; }); });
  if (ec) return make_error(Errc::unavailable, "GET " + full_url + ": connect: " + ec.message(), true);
  bhttp::request<bhttp::empty_body> r{bhttp::verb::get, url.target, 11};
  r.set(bhttp::field::host, url.host);
  r.set(bhttp::field::user_agent, "flotilla/0.1");
  for (const auto& [k, v] : opts.headers) r.set(k, v);
  if (offset > 0) r.set(bhttp::field::range, "bytes=" + std::to_string(offset) + "-");
  run([&] { bhttp::async_write(stream, r, [&](beast::error_code e, size_t) { ec = e; }); });
  if (ec) return make_error(Errc::unavailable, "GET " + full_url + ": " + ec.message(), true);

  beast::flat_buffer buffer;
  bhttp::response_parser<bhttp::buffer_body> parser;
  parser.body_limit(std::numeric_limits<std::uint64_t>::max());  // enforced below against max_bytes
  run([&] { bhttp::async_read_header(stream, buffer, parser, [&](beast::error_code e, size_t) { ec = e; }); });
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
    run([&] { bhttp::async_read_some(stream, buffer, parser, [&](beast::error_code e, size_t) { ec = e; }); });
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
  stream.socket().shutdown(asio::ip::tcp::socket::shutdown_both, ec);
  return x;
}

}  // namespace

Result<DownloadResult> download_to_file(const std::string& url_text, const std::filesystem::path& path,
                                        const DownloadOptions& opts) {
  auto url = parse_url(url_text);
  if (!url) return url.error();
  if (url->scheme == "https") {
    return make_error(Errc::invalid_argument, "https downloads are not supported by this build yet: " + url_text);
  }
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
  try {
    for (int attempt = 0; attempt < std::max(1, opts.max_attempts); ++attempt) {
      const uint64_t offset = size_now();
      if (offset > opts.max_bytes) {
        return make_error(Errc::too_large, url_text + ": more than " + std::to_string(opts.max_bytes) + " bytes");
      }
      ++out.requests;
      auto x = get_into(*url, url_text, fd, offset, opts);
      if (!x) {
        last_error = x.error().message;
        if (!x.error().retryable) return x.error();
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

}  // namespace flotilla::http

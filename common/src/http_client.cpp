#include "flotilla/common/http_client.hpp"

#include <algorithm>
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

}  // namespace flotilla::http

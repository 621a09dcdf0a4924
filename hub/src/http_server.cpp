#include "flotilla/hub/http_server.hpp"

#include <array>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/strand.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include "flotilla/common/log.hpp"

namespace flotilla::hub {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace bhttp = boost::beast::http;
using tcp = asio::ip::tcp;

namespace {

class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(tcp::socket&& socket, const HttpServerConfig& cfg, const HttpServer::Handler& handler)
      : stream_(std::move(socket)), cfg_(cfg), handler_(handler) {}

  void run() { asio::dispatch(stream_.get_executor(), [self = shared_from_this()] { self->read(); }); }

 private:
  void read() {
    parser_.emplace();
    parser_->body_limit(cfg_.max_body_bytes);
    parser_->header_limit(16 * 1024);
    stream_.expires_after(cfg_.read_timeout);
    bhttp::async_read(stream_, buffer_, *parser_,
                      [self = shared_from_this()](beast::error_code ec, size_t) { self->on_read(ec); });
  }

  void on_read(beast::error_code ec) {
    if (ec == bhttp::error::end_of_stream || ec == beast::error::timeout) return close();
    if (ec == bhttp::error::body_limit) {
      drain_ = true;
      return reply(Api::error(413, "too_large",
                              "request body is larger than " + std::to_string(cfg_.max_body_bytes) + " bytes"),
                   false, 11);
    }
    if (ec == bhttp::error::header_limit) return reply(Api::error(431, "too_large", "request headers too large"), false, 11);
    if (ec) {
      if (ec != asio::error::operation_aborted && ec != asio::error::connection_reset) {
        return reply(Api::error(400, "bad_request", "malformed HTTP request: " + ec.message()), false, 11);
      }
      return close();
    }
    auto& msg = parser_->get();
    HttpRequest req;
    req.method = std::string(msg.method_string());
    req.target = std::string(msg.target());
    for (const auto& f : msg) {
      std::string name(f.name_string());
      std::transform(name.begin(), name.end(), name.begin(), ::tolower);
      req.headers[name] = std::string(f.value());
    }
    req.body = std::move(msg.body());
    try {
      req.peer = stream_.socket().remote_endpoint().address().to_string();
    } catch (...) {
    }
    HttpResponse res;
    try {
      res = handler_(req);
    } catch (const std::exception& e) {
      log::get("hub")->error("handler threw for {} {}: {}", req.method, req.target, e.what());
      res = Api::error(500, "internal", "internal error; see the hub log");
    }
    reply(res, msg.keep_alive(), msg.version());
  }

  void reply(const HttpResponse& r, bool keep_alive, unsigned version) {
    auto res = std::make_shared<bhttp::response<bhttp::string_body>>(static_cast<bhttp::status>(r.status), version);
    res->set(bhttp::field::server, "flotilla-hub");
    res->set(bhttp::field::content_type, r.content_type);
    for (const auto& [k, v] : r.headers) res->set(k, v);
    res->keep_alive(keep_alive);
    res->body() = r.body;
    res->prepare_payload();
    stream_.expires_after(cfg_.read_timeout);
    bhttp::async_write(stream_, *res, [self = shared_from_this(), res, keep_alive](beast::error_code ec, size_t) {
      if (ec || !keep_alive) return self->close();
      self->buffer_.consume(self->buffer_.size());
      self->read();
    });
  }

  void close() {
    beast::error_code ec;
    stream_.socket().shutdown(tcp::socket::shutdown_send, ec);
    if (drain_) drain();
  }

  // After refusing a body mid-upload, read and discard what the client is
  // still sending (bounded in bytes and time) so closing does not reset the
  // connection before the client has read our answer.
  void drain() {
    if (drained_ > (64u << 20)) return;
    stream_.expires_after(std::chrono::seconds(2));
    stream_.async_read_some(asio::buffer(sink_), [self = shared_from_this()](beast::error_code ec, size_t n) {
      self->drained_ += n;
      if (!ec) self->drain();
    });
  }

  beast::tcp_stream stream_;
  beast::flat_buffer buffer_;
  std::optional<bhttp::request_parser<bhttp::string_body>> parser_;
  const HttpServerConfig& cfg_;
  const HttpServer::Handler& handler_;
  bool drain_ = false;
  size_t drained_ = 0;
  std::array<char, 16384> sink_{};
};

}  // namespace

struct HttpServer::Impl {
  HttpServerConfig cfg;
  Handler handler;
  asio::io_context ioc;
  tcp::acceptor acceptor{ioc};
  std::vector<std::thread> threads;

  void accept() {
    acceptor.async_accept(asio::make_strand(ioc), [this](beast::error_code ec, tcp::socket socket) {
      if (ec == asio::error::operation_aborted) return;
      if (!ec) std::make_shared<Session>(std::move(socket), cfg, handler)->run();
      accept();
    });
  }
};

Result<std::unique_ptr<HttpServer>> HttpServer::start(const HttpServerConfig& cfg, Handler handler) {
  std::unique_ptr<HttpServer> s(new HttpServer());
  s->impl_ = std::make_unique<Impl>();
  s->impl_->cfg = cfg;
  s->impl_->handler = std::move(handler);
  beast::error_code ec;
  auto addr = asio::ip::make_address(cfg.host, ec);
  if (ec) return make_error(Errc::invalid_argument, "listen address '" + cfg.host + "' is not an IP address");
  tcp::endpoint ep(addr, static_cast<unsigned short>(cfg.port));
  auto& acc = s->impl_->acceptor;
  acc.open(ep.protocol(), ec);
  if (!ec) acc.set_option(asio::socket_base::reuse_address(true), ec);
  if (!ec) acc.bind(ep, ec);
  if (!ec) acc.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) {
    return make_error(Errc::unavailable,
                      "cannot listen on " + cfg.host + ":" + std::to_string(cfg.port) + ": " + ec.message());
  }
  s->port_ = acc.local_endpoint().port();
  s->impl_->accept();
  for (int i = 0; i < std::max(1, cfg.threads); ++i) {
    s->impl_->threads.emplace_back([impl = s->impl_.get()] { impl->ioc.run(); });
  }
  return s;
}

HttpServer::~HttpServer() { stop(); }

void HttpServer::stop() {
  if (!impl_) return;
  impl_->ioc.stop();
  for (auto& t : impl_->threads) if (t.joinable()) t.join();
  impl_->threads.clear();
}

}  // namespace flotilla::hub

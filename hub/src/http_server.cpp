#include "flotilla/hub/http_server.hpp"

#include <array>
#include <atomic>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/asio/strand.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#include <fstream>
#include <map>
#include <mutex>
#include <type_traits>

#include "flotilla/common/crypto.hpp"
#include "flotilla/common/log.hpp"
#include "flotilla/hub/tls_files.hpp"

namespace flotilla::hub {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace bhttp = boost::beast::http;
namespace ssl = boost::asio::ssl;
using tcp = asio::ip::tcp;
using TlsStream = beast::ssl_stream<beast::tcp_stream>;

namespace {

// Open connections, in total and per peer address. Each session holds a
// Slot; when the last slot below the cap is released, accepting resumes.
struct ConnLimits {
  std::mutex mu;
  int total = 0;
  std::map<std::string, int> per_peer;
  bool paused = false;
  std::atomic<bool> stopping{false};
  ServerStats* stats = nullptr;
  int max_total = 0;
  std::function<void()> resume;  // posts accept() to the acceptor's strand
};

class Slot {
 public:
  Slot(std::shared_ptr<ConnLimits> l, std::string peer) : l_(std::move(l)), peer_(std::move(peer)) {}
  Slot(const Slot&) = delete;
  Slot& operator=(const Slot&) = delete;
  ~Slot() {
    bool resume = false;
    {
      std::lock_guard lock(l_->mu);
      --l_->total;
      if (auto it = l_->per_peer.find(peer_); it != l_->per_peer.end() && --it->second <= 0) l_->per_peer.erase(it);
      if (l_->paused && (l_->max_total <= 0 || l_->total < l_->max_total)) {
        l_->paused = false;
        resume = true;
      }
    }
    --l_->stats->connections;
    if (resume && !l_->stopping && l_->resume) l_->resume();
  }

 private:
  std::shared_ptr<ConnLimits> l_;
  std::string peer_;
};

// One implementation for both listeners: Stream is beast::tcp_stream (plain
// HTTP) or TlsStream. Deadlines and the socket always live on the TCP layer;
// only the handshake and the closing differ.
template <class Stream>
class Session : public std::enable_shared_from_this<Session<Stream>> {
  static constexpr bool kTls = std::is_same_v<Stream, TlsStream>;
  using std::enable_shared_from_this<Session<Stream>>::shared_from_this;

 public:
  Session(Stream&& stream, const HttpServerConfig& cfg, const HttpServer::Handler& handler, std::unique_ptr<Slot> slot)
      : stream_(std::move(stream)), cfg_(cfg), handler_(handler), slot_(std::move(slot)) {}

  void run() {
    asio::dispatch(stream_.get_executor(), [self = shared_from_this()] {
      if constexpr (kTls) {
        self->handshake();
      } else {
        self->read();
      }
    });
  }

 private:
  beast::tcp_stream& tcp_layer() { return beast::get_lowest_layer(stream_); }

  // A client that never finishes the handshake (or speaks plain HTTP to the
  // TLS port) is cut off: nothing is ever answered in the clear.
  void handshake() {
    tcp_layer().expires_after(cfg_.handshake_timeout);
    stream_.async_handshake(ssl::stream_base::server, [self = shared_from_this()](beast::error_code ec) {
      if (ec) {
        log::get("hub")->debug("TLS handshake failed from {}: {}", self->peer(), ec.message());
        beast::error_code ignored;
        self->tcp_layer().socket().close(ignored);
        return;
      }
      self->read();
    });
  }

  std::string peer() {
    beast::error_code ec;
    auto ep = tcp_layer().socket().remote_endpoint(ec);
    return ec ? std::string("?") : ep.address().to_string();
  }

  // The header comes first, on its own: it decides where the body goes
  // (memory with a small cap, or a file for artifact uploads) and whether the
  // request may send one at all.
  void read() {
    header_parser_.emplace();
    header_parser_->header_limit(16 * 1024);
    // Beast checks a declared Content-Length against this when the header
    // completes, before we know the route: allow the larger (upload) cap
    // here and hold other routes to max_body_bytes in on_header.
    header_parser_->body_limit(std::max<uint64_t>(cfg_.max_body_bytes, cfg_.max_upload_bytes));
    tcp_layer().expires_after(cfg_.read_timeout);
    bhttp::async_read_header(stream_, buffer_, *header_parser_,
                             [self = shared_from_this()](beast::error_code ec, size_t) { self->on_header(ec); });
  }

  HttpRequest request_from(const bhttp::request_header<>& h) {
    HttpRequest req;
    req.method = std::string(h.method_string());
    req.target = std::string(h.target());
    for (const auto& f : h) {
      std::string name(f.name_string());
      std::transform(name.begin(), name.end(), name.begin(), ::tolower);
      req.headers[name] = std::string(f.value());
    }
    if (auto p = peer(); p != "?") req.peer = p;
    return req;
  }

  bool read_failed(beast::error_code ec) {
    if (!ec) return false;
    // stream_truncated: a TLS client closed the TCP connection without a
    // close_notify between requests, which is a plain hang-up here.
    if (ec == bhttp::error::end_of_stream || ec == beast::error::timeout || ec == asio::error::operation_aborted ||
        ec == asio::error::connection_reset || ec == ssl::error::stream_truncated) {
      close();
    } else if (ec == bhttp::error::body_limit) {
      drain_ = true;
      reply(Api::error(413, "too_large", "request body is larger than the limit for this route"), false, 11);
    } else if (ec == bhttp::error::header_limit) {
      reply(Api::error(431, "too_large", "request headers too large"), false, 11);
    } else {
      reply(Api::error(400, "bad_request", "malformed HTTP request: " + ec.message()), false, 11);
    }
    return true;
  }

  void on_header(beast::error_code ec) {
    if (read_failed(ec)) return;
    const auto& h = header_parser_->get();
    const bool upload = !cfg_.upload_dir.empty() && h.method() == bhttp::verb::put &&
                        h.target().starts_with(cfg_.upload_prefix);
    if (upload) {
      HttpRequest pre = request_from(h);
      // Refuse before a single body byte is stored: wrong token, no space, bad name.
      if (cfg_.precheck_upload) {
        if (auto refusal = cfg_.precheck_upload(pre)) {
          drain_ = true;
          return reply(*refusal, false, h.version());
        }
      }
      upload_path_ = (cfg_.upload_dir / (".upload-" + crypto::random_token(8))).string();
      file_parser_.emplace(std::move(*header_parser_));
      file_parser_->body_limit(cfg_.max_upload_bytes);
      beast::error_code fec;
      file_parser_->get().body().open(upload_path_.c_str(), beast::file_mode::write, fec);
      if (fec) {
        drain_ = true;
        return reply(Api::error(500, "internal", "cannot stage the upload"), false, h.version());
      }
      // Large bodies take time; the deadline covers idle periods, renewed per chunk.
      tcp_layer().expires_after(cfg_.upload_timeout);
      bhttp::async_read(stream_, buffer_, *file_parser_,
                        [self = shared_from_this()](beast::error_code e, size_t) { self->on_file_body(e); });
      return;
    }
    // Authenticate and find the route's limit before a single body byte is
    // buffered: a client without a token never costs the hub a body.
    uint64_t limit = cfg_.max_body_bytes;
    if (cfg_.admit) {
      Admission a = cfg_.admit(request_from(h));
      if (a.refusal) {
        drain_ = true;
        return reply(*a.refusal, false, h.version());
      }
      limit = std::min<uint64_t>(limit, a.max_body);
    }
    if (auto len = header_parser_->content_length(); len && *len > limit) {
      drain_ = true;
      return reply(Api::error(413, "too_large", "request body is larger than the limit for this route (" +
                                                    std::to_string(limit) + " bytes)"),
                   false, h.version());
    }
    string_parser_.emplace(std::move(*header_parser_));
    string_parser_->body_limit(limit);
    bhttp::async_read(stream_, buffer_, *string_parser_,
                      [self = shared_from_this()](beast::error_code e, size_t) { self->on_string_body(e); });
  }

  void on_string_body(beast::error_code ec) {
    if (read_failed(ec)) return;
    auto& msg = string_parser_->get();
    HttpRequest req = request_from(msg.base());
    req.body = std::move(msg.body());
    dispatch(req, msg.keep_alive(), msg.version());
  }

  void on_file_body(beast::error_code ec) {
    auto& msg = file_parser_->get();
    msg.body().close();
    if (ec) {
      std::filesystem::remove(upload_path_);
      if (read_failed(ec)) return;
    }
    HttpRequest req = request_from(msg.base());
    req.body_file = upload_path_;
    dispatch(req, msg.keep_alive(), msg.version());
    std::error_code rm;
    std::filesystem::remove(upload_path_, rm);  // the handler moved it if it kept it
  }

  void dispatch(const HttpRequest& req, bool keep_alive, unsigned version) {
    HttpResponse res;
    try {
      res = handler_(req);
    } catch (const std::exception& e) {
      log::get("hub")->error("handler threw for {} {}: {}", req.method, req.target, e.what());
      res = Api::error(500, "internal", "internal error; see the hub log");
    }
    reply(res, keep_alive, version);
  }

  void reply(const HttpResponse& r, bool keep_alive, unsigned version) {
    if (!r.file_path.empty()) return reply_file(r, keep_alive, version);
    auto res = std::make_shared<bhttp::response<bhttp::string_body>>(static_cast<bhttp::status>(r.status), version);
    res->set(bhttp::field::server, "flotilla-hub");
    res->set(bhttp::field::content_type, r.content_type);
    for (const auto& [k, v] : r.headers) res->set(k, v);
    res->keep_alive(keep_alive && !drain_);
    res->body() = r.no_body ? std::string() : r.body;
    res->prepare_payload();
    if (r.no_body) res->content_length(r.body.size());
    tcp_layer().expires_after(cfg_.read_timeout);
    bhttp::async_write(stream_, *res, [self = shared_from_this(), res](beast::error_code ec, size_t) {
      self->after_write(ec, res->keep_alive());
    });
  }

  // Artifact downloads: the header, then the file in 64 KiB chunks, so a
  // 1 GiB airgap tarball costs the hub one buffer, not 1 GiB.
  void reply_file(const HttpResponse& r, bool keep_alive, unsigned version) {
    file_ = std::make_shared<std::ifstream>(r.file_path, std::ios::binary);
    if (!*file_) return reply(Api::error(404, "not_found", "artifact vanished"), keep_alive, version);
    file_->seekg(static_cast<std::streamoff>(r.file_offset));
    file_left_ = r.no_body ? 0 : r.file_length;
    auto res = std::make_shared<bhttp::response<bhttp::empty_body>>(static_cast<bhttp::status>(r.status), version);
    res->set(bhttp::field::server, "flotilla-hub");
    res->set(bhttp::field::content_type, r.content_type);
    for (const auto& [k, v] : r.headers) res->set(k, v);
    res->keep_alive(keep_alive);
    res->content_length(r.file_length);
    auto sr = std::make_shared<bhttp::response_serializer<bhttp::empty_body>>(*res);
    tcp_layer().expires_after(cfg_.read_timeout);
    bhttp::async_write_header(stream_, *sr, [self = shared_from_this(), res, sr](beast::error_code ec, size_t) {
      if (ec) return self->close();
      self->keep_alive_ = res->keep_alive();
      self->send_chunk();
    });
  }

  void send_chunk() {
    if (file_left_ == 0) {
      file_.reset();
      return after_write({}, keep_alive_);
    }
    const auto n = static_cast<std::streamsize>(std::min<uint64_t>(chunk_.size(), file_left_));
    file_->read(chunk_.data(), n);
    const auto got = file_->gcount();
    if (got <= 0) return close();  // the file shrank under us: cut the connection, never send garbage
    file_left_ -= static_cast<uint64_t>(got);
    tcp_layer().expires_after(cfg_.read_timeout);
    asio::async_write(stream_, asio::buffer(chunk_.data(), static_cast<size_t>(got)),
                      [self = shared_from_this()](beast::error_code ec, size_t) {
                        if (ec) return self->close();
                        self->send_chunk();
                      });
  }

  void after_write(beast::error_code ec, bool keep_alive) {
    if (ec || !keep_alive || drain_) return close();
    read();
  }

  void close() {
    if constexpr (kTls) {
      // Send close_notify so the client can tell our end from a truncation;
      // bounded, and skipped when draining (the client is still sending, so
      // a TLS shutdown would only collide with its data).
      if (!drain_ && !closing_) {
        closing_ = true;
        tcp_layer().expires_after(std::chrono::seconds(2));
        stream_.async_shutdown([self = shared_from_this()](beast::error_code) { self->close_tcp(); });
        return;
      }
    }
    close_tcp();
  }

  void close_tcp() {
    beast::error_code ec;
    tcp_layer().socket().shutdown(tcp::socket::shutdown_send, ec);
    if (drain_) drain();
  }

  // After refusing a body mid-upload, read and discard what the client is
  // still sending (bounded in bytes and time) so closing does not reset the
  // connection before the client has read our answer. The bytes are thrown
  // away, so over TLS they are read undecrypted from the TCP layer.
  void drain() {
    if (drained_ > (64u << 20)) return;
    tcp_layer().expires_after(std::chrono::seconds(2));
    tcp_layer().async_read_some(asio::buffer(chunk_), [self = shared_from_this()](beast::error_code ec, size_t n) {
      self->drained_ += n;
      if (!ec) self->drain();
    });
  }

  Stream stream_;
  beast::flat_buffer buffer_;
  std::optional<bhttp::request_parser<bhttp::empty_body>> header_parser_;
  std::optional<bhttp::request_parser<bhttp::string_body>> string_parser_;
  std::optional<bhttp::request_parser<bhttp::file_body>> file_parser_;
  std::string upload_path_;
  std::shared_ptr<std::ifstream> file_;
  uint64_t file_left_ = 0;
  bool keep_alive_ = false;
  const HttpServerConfig& cfg_;
  const HttpServer::Handler& handler_;
  bool drain_ = false;
  bool closing_ = false;
  size_t drained_ = 0;
  std::array<char, 65536> chunk_{};
  std::unique_ptr<Slot> slot_;  // released when the session ends
};

}  // namespace

struct HttpServer::Impl {
  HttpServerConfig cfg;
  Handler handler;
  ServerStats stats;
  std::shared_ptr<ConnLimits> limits = std::make_shared<ConnLimits>();
  // Before ioc: pending sessions (destroyed with ioc) hold streams made from it.
  std::optional<ssl::context> tls;  // set = every connection is TLS
  asio::io_context ioc;
  tcp::acceptor acceptor{ioc};
  // Everything about accepting runs here, one step at a time.
  asio::strand<asio::io_context::executor_type> accept_strand{asio::make_strand(ioc)};
  asio::steady_timer retry_timer{ioc};
  std::chrono::milliseconds retry_delay{10};
  std::vector<std::thread> threads;

  void accept() {
    {
      std::lock_guard lock(limits->mu);
      if (cfg.max_connections > 0 && limits->total >= cfg.max_connections) {
        // At the cap: stop accepting. New clients wait in the kernel's
        // backlog; the next session that ends resumes (Slot).
        limits->paused = true;
        ++stats.accept_paused;
        return;
      }
    }
    acceptor.async_accept(asio::make_strand(ioc), asio::bind_executor(accept_strand, [this](beast::error_code ec,
                                                                                          tcp::socket socket) {
      if (ec == asio::error::operation_aborted || limits->stopping) return;
      if (ec) {
        // Out of file descriptors (EMFILE/ENFILE), or memory: accepting again
        // at once would fail again and spin a core. Pause, longer each time.
        ++stats.accept_errors;
        log::get("hub")->warn("accept failed: {}; retrying in {} ms", ec.message(), retry_delay.count());
        retry_timer.expires_after(retry_delay);
        retry_delay = std::min(retry_delay * 2, std::chrono::milliseconds(1000));
        retry_timer.async_wait(asio::bind_executor(accept_strand, [this](beast::error_code tec) {
          if (!tec && !limits->stopping) accept();
        }));
        return;
      }
      retry_delay = std::chrono::milliseconds(10);
      start_session(std::move(socket));
      accept();
    }));
  }

  void start_session(tcp::socket socket) {
    beast::error_code ec;
    const auto ep = socket.remote_endpoint(ec);
    const std::string peer = ec ? std::string("?") : ep.address().to_string();
    {
      std::lock_guard lock(limits->mu);
      int& n = limits->per_peer[peer];
      if (cfg.max_connections_per_peer > 0 && n >= cfg.max_connections_per_peer) {
        if (n == 0) limits->per_peer.erase(peer);
        ++stats.refused_per_peer;
        refuse(std::move(socket));
        return;
      }
      ++n;
      ++limits->total;
    }
    ++stats.connections;
    auto slot = std::make_unique<Slot>(limits, peer);
    if (tls) {
      std::make_shared<Session<TlsStream>>(TlsStream(std::move(socket), *tls), cfg, handler, std::move(slot))->run();
    } else {
      std::make_shared<Session<beast::tcp_stream>>(beast::tcp_stream(std::move(socket)), cfg, handler,
                                                   std::move(slot))
          ->run();
    }
  }

  // A peer over its share: one short answer if the socket takes it at once
  // (never waiting on it), then closed. Over TLS there is no plain answer.
  void refuse(tcp::socket socket) {
    beast::error_code ec;
    if (!tls) {
      static const std::string kBusy =
          "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
          "Connection: close\r\nContent-Length: 97\r\n\r\n"
          "{\"error\":{\"code\":\"unavailable\",\"message\":\"too many connections from your address; retry later\"}}\n";
      socket.non_blocking(true, ec);
      if (!ec) socket.write_some(asio::buffer(kBusy), ec);
    }
    socket.shutdown(tcp::socket::shutdown_both, ec);
    socket.close(ec);
  }
};

namespace {

// TLS 1.2 and later only.
Result<ssl::context> make_tls_context(const HttpServerConfig& cfg) {
  if (cfg.tls_cert_file.empty() || cfg.tls_key_file.empty()) {
    return make_error(Errc::invalid_argument, cfg.tls_cert_file.empty()
                                                  ? "tls-key is set but tls-cert is not; TLS needs both"
                                                  : "tls-cert is set but tls-key is not; TLS needs both");
  }
  ssl::context ctx(ssl::context::tls_server);
  ctx.set_options(ssl::context::default_workarounds | ssl::context::no_sslv2 | ssl::context::no_sslv3 |
                  ssl::context::single_dh_use);
  if (SSL_CTX_set_min_proto_version(ctx.native_handle(), TLS1_2_VERSION) != 1) {
    return make_error(Errc::internal, "cannot require TLS 1.2: " + openssl_error());
  }
  if (auto s = load_tls_key_pair(ctx.native_handle(), "tls-cert", cfg.tls_cert_file, "tls-key", cfg.tls_key_file); !s) {
    return s.error();
  }
  return ctx;
}

}  // namespace

Result<std::unique_ptr<HttpServer>> HttpServer::start(const HttpServerConfig& cfg, Handler handler) {
  std::unique_ptr<HttpServer> s(new HttpServer());
  s->impl_ = std::make_unique<Impl>();
  s->impl_->cfg = cfg;
  s->impl_->handler = std::move(handler);
  if (cfg.tls()) {
    auto ctx = make_tls_context(cfg);
    if (!ctx) return ctx.error();
    s->impl_->tls.emplace(std::move(*ctx));
  }
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
  auto* impl = s->impl_.get();
  impl->limits->stats = &impl->stats;
  impl->limits->max_total = cfg.max_connections;
  impl->limits->resume = [impl] { asio::post(impl->accept_strand, [impl] { impl->accept(); }); };
  asio::post(impl->accept_strand, [impl] { impl->accept(); });
  for (int i = 0; i < std::max(1, cfg.threads); ++i) {
    s->impl_->threads.emplace_back([impl = s->impl_.get()] { impl->ioc.run(); });
  }
  return s;
}

HttpServer::~HttpServer() { stop(); }

const ServerStats& HttpServer::stats() const { return impl_->stats; }

void HttpServer::stop() {
  if (!impl_) return;
  impl_->limits->stopping = true;
  impl_->ioc.stop();
  for (auto& t : impl_->threads) if (t.joinable()) t.join();
  impl_->threads.clear();
}

}  // namespace flotilla::hub

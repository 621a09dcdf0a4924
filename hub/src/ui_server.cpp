// The UI listener: static files of the built frontend, the API's reads and
// campaign actions on the same origin, and server-sent-events streams.
//
// A stream is one long response (text/event-stream, ended by closing the
// connection). One feed thread computes each open topic's snapshot once per
// event interval, whatever the number of streams on it, and hands every
// stream whose last event differs the new one; a stream still writing keeps
// only the newest (coalesced), so a slow client costs one pending string.
#include "flotilla/hub/ui_server.hpp"

#include <array>
#include <atomic>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/asio/strand.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#include <condition_variable>
#include <list>
#include <map>
#include <mutex>
#include <optional>
#include <thread>
#include <type_traits>

#include "api_internal.hpp"
#include "flotilla/common/crypto.hpp"
#include "flotilla/common/log.hpp"
#include "flotilla/hub/service.hpp"
#include "flotilla/hub/tls_files.hpp"

namespace flotilla::hub {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace bhttp = boost::beast::http;
namespace ssl = boost::asio::ssl;
using tcp = asio::ip::tcp;
using TlsStream = beast::ssl_stream<beast::tcp_stream>;

namespace {

// No inline script or style, nothing from another origin: the frontend is
// built that way (a unit test checks index.html), and this header makes the
// browser hold it to that.
constexpr const char* kCsp =
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; font-src 'self'; "
    "connect-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

void security_headers(HttpResponse& r, bool tls) {
  r.headers["X-Content-Type-Options"] = "nosniff";
  r.headers["Referrer-Policy"] = "no-referrer";
  r.headers["X-Frame-Options"] = "DENY";
  r.headers["Cross-Origin-Opener-Policy"] = "same-origin";
  r.headers["Cross-Origin-Resource-Policy"] = "same-origin";
  r.headers["Permissions-Policy"] = "camera=(), microphone=(), geolocation=(), usb=()";
  if (tls) r.headers["Strict-Transport-Security"] = "max-age=31536000";
}

const UiAsset* find_asset(std::string_view path) {
  for (const auto& a : ui_assets()) {
    if (a.path == path) return &a;
  }
  return nullptr;
}

HttpResponse asset_response(const UiAsset& a, const HttpRequest& req) {
  HttpResponse r;
  r.content_type = std::string(a.content_type);
  r.headers["ETag"] = std::string(a.etag);
  // Hashed names never change content: cache for a year. index.html names
  // them, so it is checked every time (cheap: a 304 with its ETag).
  r.headers["Cache-Control"] = a.path.starts_with("assets/") ? "public, max-age=31536000, immutable" : "no-cache";
  if (a.path == "index.html") r.headers["Content-Security-Policy"] = kCsp;
  auto inm = req.headers.find("if-none-match");
  if (inm != req.headers.end() && inm->second == a.etag) {
    r.status = 304;
    return r;
  }
  r.body.assign(reinterpret_cast<const char*>(a.data), a.size);
  r.no_body = req.method == "HEAD";
  return r;
}

// The API calls the UI makes: reads, and the campaign actions. Everything
// else (uploads, tokens, enrollment, artifacts) stays on the API listener.
bool ui_may_call(const std::string& method, const std::vector<std::string>& p) {
  if (p.empty()) return false;
  if (method == "GET" || method == "HEAD") {
    if (p.size() == 1) return p[0] == "healthz" || p[0] == "readyz";
    return p[0] == "v1" && p[1] != "artifacts" && p[1] != "enroll";
  }
  if (method == "POST") {
    static const std::set<std::string> actions = {"pause", "resume", "abort", "rollback", "approve"};
    return p.size() == 4 && p[0] == "v1" && p[1] == "campaigns" && actions.count(p[3]);
  }
  return false;
}

}  // namespace

HttpResponse ui_route(Api& api, const HttpRequest& req, bool tls) {
  const std::string path = req.target.substr(0, req.target.find('?'));
  HttpResponse r;
  if (path == "/" || path == "/ui") {
    r.status = 302;
    r.headers["Location"] = "/ui/";
    r.content_type = "text/plain; charset=utf-8";
    r.body = "see /ui/\n";
  } else if (path.starts_with("/ui/")) {
    if (req.method != "GET" && req.method != "HEAD") {
      r = Api::error(405, "method_not_allowed", "the dashboard's files are read with GET");
    } else if (ui_assets().empty()) {
      r = Api::error(503, "unavailable",
                     "this flotilla-hub was built without its dashboard (npm was missing at build time); run "
                     "scripts/setup.sh and rebuild");
    } else {
      std::string file = path.substr(4);
      if (file.empty()) file = "index.html";
      if (const UiAsset* a = find_asset(file)) {
        r = asset_response(*a, req);
      } else {
        r = Api::error(404, "not_found", "no file " + path + " in the dashboard");
      }
    }
  } else {
    const rest::Target t = rest::parse_target(req.target);
    if (!ui_may_call(req.method, t.parts)) {
      r = Api::error(req.method == "GET" || req.method == "HEAD" || req.method == "POST" ? 404 : 405,
                     "not_on_this_listener",
                     "the UI listener serves the dashboard, the API's reads and the campaign actions; send " +
                         req.method + " " + path + " to the API listener");
    } else {
      HttpRequest api_req = req;
      api_req.event_streams = true;
      if (api_req.method == "HEAD") api_req.method = "GET";
      r = api.handle(api_req);
      if (req.method == "HEAD") r.no_body = true;
      // Answers carry fleet data: no cache keeps them (nor a shared proxy).
      r.headers["Cache-Control"] = "no-store";
    }
  }
  security_headers(r, tls);
  return r;
}

namespace {

class StreamSink {
 public:
  virtual ~StreamSink() = default;
  // Called on the feed thread; the sink posts to its own strand.
  virtual void send(std::string event, bool last) = 0;
  virtual bool closed() const = 0;
};

// One open stream as the feed sees it.
struct StreamEntry {
  std::weak_ptr<StreamSink> sink;
  std::string topic;
  std::string secret;        // the bearer token, to check again (never logged)
  rest::Caller caller;
  std::string last_sent;     // the last snapshot's JSON
  std::chrono::steady_clock::time_point last_write, last_auth;
  uint64_t event_id = 0;
};

}  // namespace

// The feed: which streams are open, and the thread that sends them events.
class Feed {
 public:
  Feed(const UiServerConfig& cfg, HubService& service) : cfg_(cfg), service_(service) {
    thread_ = std::thread([this] { run(); });
  }
  ~Feed() { stop(); }

  void stop() {
    {
      std::lock_guard lock(wait_mu_);
      if (stopping_) return;
      stopping_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
  }

  // Registers a stream; an error when the hub's or the token's cap is reached.
  Status add(const std::shared_ptr<StreamSink>& sink, const std::string& topic, const std::string& secret,
             const rest::Caller& caller) {
    std::lock_guard lock(mu_);
    std::erase_if(streams_, [](const StreamEntry& e) { return e.sink.expired(); });
    if (static_cast<int>(streams_.size()) >= cfg_.max_streams) {
      return make_error(Errc::unavailable, "the hub has " + std::to_string(cfg_.max_streams) +
                                               " event streams open (ui-max-streams); retry later");
    }
    // One token (one person, one script) may hold a quarter of them.
    const int per_token = std::max(4, cfg_.max_streams / 4);
    const auto mine = std::count_if(streams_.begin(), streams_.end(),
                                    [&](const StreamEntry& e) { return e.caller.token_id == caller.token_id; });
    if (mine >= per_token) {
      return make_error(Errc::unavailable, "this token has " + std::to_string(per_token) +
                                               " event streams open; close a page or retry later");
    }
    StreamEntry e;
    e.sink = sink;
    e.topic = topic;
    e.secret = secret;
    e.caller = caller;
    e.last_auth = std::chrono::steady_clock::now();
    streams_.push_back(std::move(e));
    {
      std::lock_guard wait(wait_mu_);
      wake_ = true;
    }
    cv_.notify_all();
    return {};
  }

  size_t size() {
    std::lock_guard lock(mu_);
    return static_cast<size_t>(std::count_if(streams_.begin(), streams_.end(),
                                             [](const StreamEntry& e) { return !e.sink.expired(); }));
  }

 private:
  void run() {
    std::unique_lock lock(wait_mu_);
    while (!stopping_) {
      lock.unlock();
      tick();
      lock.lock();
      cv_.wait_for(lock, cfg_.event_interval, [this] { return stopping_ || wake_; });
      wake_ = false;
    }
  }

  // One round: every topic's snapshot once per caller scope, sent to the
  // streams whose last event differs. The lock is held throughout: add()
  // waits at most one round.
  void tick() {
    std::lock_guard lock(mu_);
    std::erase_if(streams_, [](const StreamEntry& e) {
      auto s = e.sink.lock();
      return !s || s->closed();
    });
    const auto now = std::chrono::steady_clock::now();
    struct Snapshot {
      Result<std::string> data = std::string();
      std::string key;  // data without the clock's fields: what "changed" means
    };
    std::map<std::pair<std::string, std::string>, Snapshot> snapshots;  // (topic, project)
    for (auto& e : streams_) {
      auto sink = e.sink.lock();
      if (!sink) continue;
      // The token again, now and then: a revoked one ends its streams.
      if (now - e.last_auth >= cfg_.token_recheck) {
        e.last_auth = now;
        auto tok = service_.authenticate("api", e.secret);
        if (!tok || !*tok) {
          sink->send(event_text("end", ++e.event_id, R"({"reason":"the API token is no longer valid"})"), true);
          continue;
        }
        e.caller.project = (*tok)->project;
        e.caller.role = parse_role((*tok)->role).value_or(Role::viewer);
      }
      const auto key = std::make_pair(e.topic, e.caller.project);
      auto it = snapshots.find(key);
      if (it == snapshots.end()) {
        Snapshot snap;
        auto j = rest::event_snapshot(service_, e.caller, e.topic);
        if (j) {
          snap.data = j->dump();
          j->erase("generated_at");
          if (j->contains("sample")) (*j)["sample"].erase("t");
          snap.key = j->dump();
        } else {
          snap.data = j.error();
        }
        it = snapshots.emplace(key, std::move(snap)).first;
      }
      const auto& snap = it->second;
      if (!snap.data) {
        if (snap.data.error().code == Errc::not_found) {
          sink->send(event_text("end", ++e.event_id, nlohmann::json{{"reason", snap.data.error().message}}.dump()),
                     true);
        }
        continue;  // a store error: try again next round
      }
      if (snap.key != e.last_sent) {
        sink->send(event_text("snapshot", ++e.event_id, *snap.data), false);
        e.last_sent = snap.key;
        e.last_write = now;
      } else if (now - e.last_write >= cfg_.heartbeat) {
        // A comment line: keeps proxies from closing an idle stream and finds dead clients.
        sink->send(": keep-alive\n\n", false);
        e.last_write = now;
      }
    }
  }

  static std::string event_text(const std::string& name, uint64_t id, const std::string& data) {
    return "event: " + name + "\nid: " + std::to_string(id) + "\ndata: " + data + "\n\n";
  }

  const UiServerConfig& cfg_;
  HubService& service_;
  std::mutex mu_;       // streams_
  std::mutex wait_mu_;  // stopping_, wake_
  std::condition_variable cv_;
  bool stopping_ = false;
  bool wake_ = false;
  std::list<StreamEntry> streams_;
  std::thread thread_;
};

namespace {

template <class Stream>
class UiSession : public StreamSink, public std::enable_shared_from_this<UiSession<Stream>> {
  static constexpr bool kTls = std::is_same_v<Stream, TlsStream>;
  using std::enable_shared_from_this<UiSession<Stream>>::shared_from_this;

 public:
  UiSession(Stream&& stream, const UiServerConfig& cfg, Api& api, HubService& service, Feed& feed,
            std::atomic<int>& open)
      : stream_(std::move(stream)), cfg_(cfg), api_(api), service_(service), feed_(feed), open_(open) {
    ++open_;
  }
  ~UiSession() override { --open_; }

  void run() {
    asio::dispatch(stream_.get_executor(), [self = shared_from_this()] {
      if constexpr (kTls) {
        self->tcp_layer().expires_after(std::chrono::seconds(10));
        self->stream_.async_handshake(ssl::stream_base::server, [self](beast::error_code ec) {
          if (ec) return self->close_tcp();
          self->read();
        });
      } else {
        self->read();
      }
    });
  }

  // From the feed thread.
  void send(std::string event, bool last) override {
    asio::post(stream_.get_executor(), [self = shared_from_this(), event = std::move(event), last]() mutable {
      if (self->done_) return;
      if (self->writing_) {
        // Coalesce: only the newest state matters; an end always goes last.
        if (!self->pending_last_) {
          self->pending_ = std::move(event);
          self->pending_last_ = last;
        }
        return;
      }
      self->write_event(std::move(event), last);
    });
  }
  bool closed() const override { return done_; }

 private:
  beast::tcp_stream& tcp_layer() { return beast::get_lowest_layer(stream_); }

  void read() {
    parser_.emplace();
    parser_->header_limit(16 * 1024);
    parser_->body_limit(cfg_.max_body_bytes);
    tcp_layer().expires_after(cfg_.read_timeout);
    bhttp::async_read(stream_, buffer_, *parser_, [self = shared_from_this()](beast::error_code ec, size_t) {
      self->on_read(ec);
    });
  }

  void on_read(beast::error_code ec) {
    if (ec) {
      if (ec == bhttp::error::body_limit) {
        return reply(Api::error(413, "too_large", "request body is larger than the UI listener takes"), false, 11);
      }
      if (ec == bhttp::error::header_limit) return reply(Api::error(431, "too_large", "request headers too large"), false, 11);
      if (ec == bhttp::error::end_of_stream || ec == beast::error::timeout || ec == asio::error::operation_aborted ||
          ec == asio::error::connection_reset || ec == ssl::error::stream_truncated) {
        return close();
      }
      return reply(Api::error(400, "bad_request", "malformed HTTP request"), false, 11);
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
    beast::error_code pec;
    auto ep = tcp_layer().socket().remote_endpoint(pec);
    if (!pec) req.peer = ep.address().to_string();
    HttpResponse res;
    try {
      res = ui_route(api_, req, kTls);
    } catch (const std::exception& e) {
      log::get("hub")->error("UI handler threw for {} {}: {}", req.method, req.target.substr(0, 200), e.what());
      res = Api::error(500, "internal", "internal error; see the hub log");
    }
    if (!res.event_topic.empty() && res.status == 200) return start_stream(req, res, msg.version());
    reply(res, msg.keep_alive(), msg.version());
  }

  void reply(const HttpResponse& r, bool keep_alive, unsigned version) {
    auto res = std::make_shared<bhttp::response<bhttp::string_body>>(static_cast<bhttp::status>(r.status), version);
    res->set(bhttp::field::server, "flotilla-hub");
    res->set(bhttp::field::content_type, r.content_type);
    for (const auto& [k, v] : r.headers) res->set(k, v);
    res->keep_alive(keep_alive);
    res->body() = r.no_body ? std::string() : r.body;
    res->prepare_payload();
    if (r.no_body) res->content_length(r.body.size());
    tcp_layer().expires_after(cfg_.read_timeout);
    bhttp::async_write(stream_, *res, [self = shared_from_this(), res](beast::error_code ec, size_t) {
      if (ec || !res->keep_alive()) return self->close();
      self->read();
    });
  }

  void start_stream(const HttpRequest& req, const HttpResponse& r, unsigned version) {
    const auto auth = req.headers.find("authorization");
    const std::string secret = auth == req.headers.end() ? "" : auth->second.substr(7);
    // The caller as the API just authenticated it.
    rest::Caller caller;
    if (auto tok = feed_api_caller(secret)) caller = *tok;
    auto self = shared_from_this();
    if (auto s = feed_.add(std::static_pointer_cast<StreamSink>(self), r.event_topic, secret, caller); !s) {
      HttpResponse busy = Api::error(503, "unavailable", s.error().message);
      busy.headers["Retry-After"] = "5";
      busy.headers["Cache-Control"] = "no-store";
      return reply(busy, false, version);
    }
    // The header by hand: no Content-Length, the body ends when the stream does.
    std::string head = std::string(version == 10 ? "HTTP/1.0" : "HTTP/1.1") +
                       " 200 OK\r\nServer: flotilla-hub\r\nContent-Type: text/event-stream\r\n"
                       "Cache-Control: no-store\r\nX-Accel-Buffering: no\r\nX-Content-Type-Options: nosniff\r\n"
                       "Connection: close\r\n\r\n";
    // A comment first, so the client sees the stream open before the first snapshot.
    write_event(head + ": stream " + r.event_topic + "\n\n", false);
    watch_close();
  }

  // The client sends nothing more on a stream; a read that ends is its
  // going away (and keeps this session alive until then).
  void watch_close() {
    stream_.async_read_some(asio::buffer(discard_), [self = shared_from_this()](beast::error_code ec, size_t) {
      if (ec) return self->finish();
      self->watch_close();
    });
  }

  std::optional<rest::Caller> feed_api_caller(const std::string& secret) {
    auto tok = service_.authenticate("api", secret);
    if (!tok || !*tok) return std::nullopt;
    rest::Caller c;
    c.token_id = (*tok)->id;
    c.name = (*tok)->name;
    c.role = parse_role((*tok)->role).value_or(Role::viewer);
    c.project = (*tok)->project;
    return c;
  }

  void write_event(std::string event, bool last) {
    writing_ = true;
    out_ = std::move(event);
    // A client that stops reading is cut off instead of holding a buffer.
    tcp_layer().expires_after(std::chrono::seconds(30));
    asio::async_write(stream_, asio::buffer(out_), [self = shared_from_this(), last](beast::error_code ec, size_t) {
      self->writing_ = false;
      if (ec || last) return self->finish();
      if (self->pending_) {
        std::string next = std::move(*self->pending_);
        const bool next_last = self->pending_last_;
        self->pending_.reset();
        self->pending_last_ = false;
        self->write_event(std::move(next), next_last);
      } else {
        self->tcp_layer().expires_never();
      }
    });
  }

  void finish() {
    done_ = true;
    close();
  }

  void close() {
    done_ = true;
    if constexpr (kTls) {
      if (!closing_) {
        closing_ = true;
        tcp_layer().expires_after(std::chrono::seconds(2));
        stream_.async_shutdown([self = shared_from_this()](beast::error_code) { self->close_tcp(); });
        return;
      }
    }
    close_tcp();
  }

  void close_tcp() {
    done_ = true;
    beast::error_code ec;
    tcp_layer().socket().shutdown(tcp::socket::shutdown_both, ec);
    tcp_layer().socket().close(ec);
  }

  Stream stream_;
  const UiServerConfig& cfg_;
  Api& api_;
  HubService& service_;
  Feed& feed_;
  std::atomic<int>& open_;
  beast::flat_buffer buffer_;
  std::optional<bhttp::request_parser<bhttp::string_body>> parser_;
  std::string out_;
  std::optional<std::string> pending_;
  bool pending_last_ = false;
  bool writing_ = false;
  std::atomic<bool> done_{false};
  bool closing_ = false;
  std::array<char, 512> discard_{};
};

Result<ssl::context> ui_tls_context(const UiServerConfig& cfg) {
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

struct UiServer::Impl {
  UiServerConfig cfg;
  Api* api = nullptr;
  HubService* service = nullptr;
  std::optional<ssl::context> tls;
  std::unique_ptr<Feed> feed;
  std::atomic<int> open{0};
  asio::io_context ioc;
  tcp::acceptor acceptor{ioc};
  std::vector<std::thread> threads;

  void accept() {
    acceptor.async_accept(asio::make_strand(ioc), [this](beast::error_code ec, tcp::socket socket) {
      if (ec == asio::error::operation_aborted) return;
      if (!ec) {
        if (open.load() >= cfg.max_connections) {
          // Over the cap: closed at once, before a byte is read.
          beast::error_code ignored;
          socket.close(ignored);
        } else if (tls) {
          std::make_shared<UiSession<TlsStream>>(TlsStream(std::move(socket), *tls), cfg, *api, *service, *feed, open)
              ->run();
        } else {
          std::make_shared<UiSession<beast::tcp_stream>>(beast::tcp_stream(std::move(socket)), cfg, *api, *service,
                                                         *feed, open)
              ->run();
        }
      }
      accept();
    });
  }
};

Result<std::unique_ptr<UiServer>> UiServer::start(const UiServerConfig& cfg, Api& api, HubService& service) {
  std::unique_ptr<UiServer> s(new UiServer());
  s->impl_ = std::make_unique<Impl>();
  auto& impl = *s->impl_;
  impl.cfg = cfg;
  impl.api = &api;
  impl.service = &service;
  if (!cfg.tls_cert_file.empty() || !cfg.tls_key_file.empty()) {
    auto ctx = ui_tls_context(cfg);
    if (!ctx) return ctx.error();
    impl.tls.emplace(std::move(*ctx));
  }
  beast::error_code ec;
  auto addr = asio::ip::make_address(cfg.host, ec);
  if (ec) return make_error(Errc::invalid_argument, "ui-listen address '" + cfg.host + "' is not an IP address");
  tcp::endpoint ep(addr, static_cast<unsigned short>(cfg.port));
  impl.acceptor.open(ep.protocol(), ec);
  if (!ec) impl.acceptor.set_option(asio::socket_base::reuse_address(true), ec);
  if (!ec) impl.acceptor.bind(ep, ec);
  if (!ec) impl.acceptor.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) {
    return make_error(Errc::unavailable,
                      "cannot listen on " + cfg.host + ":" + std::to_string(cfg.port) + " (ui-listen): " + ec.message());
  }
  s->port_ = impl.acceptor.local_endpoint().port();
  impl.feed = std::make_unique<Feed>(impl.cfg, service);
  impl.accept();
  for (int i = 0; i < std::max(1, cfg.threads); ++i) {
    impl.threads.emplace_back([p = s->impl_.get()] { p->ioc.run(); });
  }
  return s;
}

size_t UiServer::open_streams() const { return impl_ && impl_->feed ? impl_->feed->size() : 0; }

UiServer::~UiServer() { stop(); }

void UiServer::stop() {
  if (!impl_) return;
  if (impl_->feed) impl_->feed->stop();
  impl_->ioc.stop();
  for (auto& t : impl_->threads) {
    if (t.joinable()) t.join();
  }
  impl_->threads.clear();
}

}  // namespace flotilla::hub

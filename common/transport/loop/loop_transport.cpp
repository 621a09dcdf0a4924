// Transport backend for many sessions on one epoll thread (transport_loop.hpp).
//
// Threads: callers (connect, subscribe, publish, ...) change a session's
// shared state under its mutex and post work to the loop; the loop's thread
// alone touches sockets, TLS objects and the bytes in flight. Posted work
// runs after the socket events of the same round, so a transport being
// destroyed (which posts its teardown and waits for it) is never freed while
// an event for it is still being handled.
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <future>
#include <map>
#include <mutex>
#include <optional>
#include <thread>
#include <unordered_set>
#include <vector>

#include "../tls_common.hpp"
#include "flotilla/common/log.hpp"
#include "flotilla/common/mqtt_codec.hpp"
#include "flotilla/common/transport_loop.hpp"

namespace flotilla::transport {

namespace {

using Clock = std::chrono::steady_clock;

int64_t now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now().time_since_epoch()).count();
}

// Bounds: a packet from the broker (a desired state carries a bundle inline,
// docs/bundle-format.md caps those well below this), and what a session
// keeps queued while its broker is away (Paho's maxBufferedMessages).
constexpr size_t kMaxPacket = 64u << 20;
constexpr size_t kMaxQueued = 10000;
// How often the loop checks keepalives and connect deadlines.
constexpr int kTickMs = 500;

struct Endpoint {
  bool tls = false;
  std::string host;
  std::string port;
};

Result<Endpoint> parse_url(const std::string& url) {
  Endpoint e;
  const size_t scheme_end = url.find("://");
  if (scheme_end == std::string::npos) {
    return make_error(Errc::invalid_argument, "broker URL " + url + " has no scheme (tcp:// or ssl://)");
  }
  const std::string scheme = url.substr(0, scheme_end);
  if (scheme == "ssl" || scheme == "mqtts") {
    e.tls = true;
  } else if (scheme != "tcp" && scheme != "mqtt") {
    return make_error(Errc::invalid_argument, "broker URL " + url + ": scheme " + scheme +
                                                  " is not one of tcp, mqtt, ssl, mqtts");
  }
  std::string rest = url.substr(scheme_end + 3);
  if (const size_t slash = rest.find('/'); slash != std::string::npos) rest.resize(slash);
  if (!rest.empty() && rest[0] == '[') {
    const size_t close = rest.find(']');
    if (close == std::string::npos) return make_error(Errc::invalid_argument, "broker URL " + url + ": unclosed [");
    e.host = rest.substr(1, close - 1);
    rest = rest.substr(close + 1);
    if (!rest.empty() && rest[0] == ':') e.port = rest.substr(1);
  } else {
    const size_t colon = rest.rfind(':');
    e.host = rest.substr(0, colon);
    if (colon != std::string::npos) e.port = rest.substr(colon + 1);
  }
  if (e.port.empty()) e.port = e.tls ? "8883" : "1883";
  if (e.host.empty()) return make_error(Errc::invalid_argument, "broker URL " + url + " has no host");
  return e;
}

}  // namespace

class LoopTransport;

class SessionLoop {
 public:
  SessionLoop() {
    ep_ = ::epoll_create1(EPOLL_CLOEXEC);
    ev_ = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    epoll_event e{};
    e.events = EPOLLIN;
    e.data.ptr = nullptr;
    ::epoll_ctl(ep_, EPOLL_CTL_ADD, ev_, &e);
    thread_ = std::thread([this] { run(); });
  }
  ~SessionLoop() {
    post([this] { stop_ = true; });
    thread_.join();
    for (auto& [ca, ctx] : contexts_) SSL_CTX_free(ctx);
    ::close(ev_);
    ::close(ep_);
  }
  SessionLoop(const SessionLoop&) = delete;
  SessionLoop& operator=(const SessionLoop&) = delete;

  // Runs f on the loop's thread, after the socket events of the round.
  void post(std::function<void()> f) {
    std::lock_guard lock(mu_);
    cmds_.push_back(std::move(f));
    if (!signaled_) {
      signaled_ = true;
      const uint64_t one = 1;
      (void)!::write(ev_, &one, sizeof one);
    }
  }
  bool on_loop_thread() const { return std::this_thread::get_id() == thread_.get_id(); }

  // Loop thread only.
  void watch(int fd, LoopTransport* t, uint32_t events, bool add) {
    epoll_event e{};
    e.events = events;
    e.data.ptr = t;
    ::epoll_ctl(ep_, add ? EPOLL_CTL_ADD : EPOLL_CTL_MOD, fd, &e);
  }
  void unwatch(int fd) { ::epoll_ctl(ep_, EPOLL_CTL_DEL, fd, nullptr); }
  void enlist(LoopTransport* t) { sessions_.insert(t); }
  void forget(LoopTransport* t) { sessions_.erase(t); }

  // One TLS context per CA file, shared by every session that pins it:
  // the CA store is parsed once, not once per session.
  Result<SSL_CTX*> tls_context(const std::string& ca_file) {
    std::lock_guard lock(ctx_mu_);
    if (auto it = contexts_.find(ca_file); it != contexts_.end()) return it->second;
    ERR_clear_error();
    SSL_CTX* ctx = SSL_CTX_new(TLS_client_method());
    if (!ctx) return make_error(Errc::internal, "cannot create a TLS context");
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, nullptr);
    // Idle sessions give their read and write buffers back (tens of KB each).
    SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS | SSL_MODE_ENABLE_PARTIAL_WRITE |
                              SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    const bool loaded = ca_file.empty() ? SSL_CTX_set_default_verify_paths(ctx) == 1
                                        : SSL_CTX_load_verify_locations(ctx, ca_file.c_str(), nullptr) == 1;
    if (!loaded) {
      SSL_CTX_free(ctx);
      return make_error(Errc::invalid_argument, "cannot load the broker CA " +
                                                    (ca_file.empty() ? std::string("store") : "file " + ca_file) +
                                                    ": " + detail::drain_ssl_errors());
    }
    contexts_[ca_file] = ctx;
    return ctx;
  }

 private:
  void run();

  int ep_ = -1, ev_ = -1;
  std::mutex mu_;
  std::vector<std::function<void()>> cmds_;
  bool signaled_ = false;
  bool stop_ = false;                           // loop thread
  std::unordered_set<LoopTransport*> sessions_;  // loop thread: those with a socket or a connect under way
  std::mutex ctx_mu_;
  std::map<std::string, SSL_CTX*> contexts_;
  std::thread thread_;
};

class LoopTransport final : public Transport {
 public:
  explicit LoopTransport(std::shared_ptr<SessionLoop> loop) : loop_(std::move(loop)) {}

  ~LoopTransport() override {
    if (loop_->on_loop_thread()) {
      teardown();
      return;
    }
    std::promise<void> done;
    auto fut = done.get_future();
    loop_->post([this, &done] {
      teardown();
      done.set_value();
    });
    fut.wait();
  }

  Status connect(const ConnectOptions& opts) override {
    if (loop_->on_loop_thread()) return make_error(Errc::internal, "connect called on the session loop's thread");
    auto ep = parse_url(opts.url);
    if (!ep) return ep.error();
    addrinfo hints{};
    hints.ai_socktype = SOCK_STREAM;
    addrinfo* res = nullptr;
    if (const int rc = ::getaddrinfo(ep->host.c_str(), ep->port.c_str(), &hints, &res); rc != 0 || !res) {
      return make_error(Errc::unavailable, "connect to " + opts.url + ": cannot resolve " + ep->host + ": " +
                                               ::gai_strerror(rc), true);
    }
    sockaddr_storage addr{};
    const socklen_t addr_len = res->ai_addrlen;
    std::memcpy(&addr, res->ai_addr, res->ai_addrlen);
    const int family = res->ai_family;
    ::freeaddrinfo(res);
    SSL* ssl = nullptr;
    if (ep->tls) {
      auto made = new_ssl(opts, ep->host);
      if (!made) return made.error();
      ssl = *made;
    }
    std::unique_lock lock(mu_);
    const uint64_t attempt = ++attempt_;
    connect_result_.reset();
    loop_->post([this, attempt, addr, addr_len, family, ssl, opts, host = ep->host] {
      start_connect(attempt, addr, addr_len, family, ssl, opts, host);
    });
    const auto deadline = Clock::now() + opts.timeout + std::chrono::seconds(2);
    cv_.wait_until(lock, deadline, [&] { return connect_result_.has_value() && result_attempt_ == attempt; });
    if (connect_result_ && result_attempt_ == attempt) return *connect_result_;
    // The loop gives up on its own at opts.timeout; this is the margin's end.
    loop_->post([this, attempt] {
      if (attempt_of_socket_ == attempt) close_socket();
    });
    return make_error(Errc::timeout, "connect to " + opts.url + " timed out", true);
  }

  Status subscribe(const std::string& filter, int qos) override {
    if (qos < 0 || qos > 1) return make_error(Errc::invalid_argument, "this MQTT client subscribes at QoS 0 or 1");
    if (loop_->on_loop_thread()) return make_error(Errc::internal, "subscribe called on the session loop's thread");
    std::unique_lock lock(mu_);
    if (!up_) return make_error(Errc::unavailable, "subscribe " + filter + ": not connected", true);
    const uint16_t id = next_packet_id();
    subacks_[id].reset();
    loop_->post([this, bytes = mqtt::encode_subscribe(id, filter, qos)] {
      if (phase_ != Phase::up) return;  // lost meanwhile: the waiter was failed
      out_ += bytes;
      write_out();
    });
    const auto timeout = opts_timeout_;
    const bool answered = cv_.wait_for(lock, timeout, [&] { return subacks_[id].has_value(); });
    Status s = answered ? *subacks_[id] : make_error(Errc::timeout, "subscribe " + filter + " not acknowledged", true);
    subacks_.erase(id);
    if (!s) return s.error().with_context("subscribe " + filter);
    return s;
  }

  Status publish(const Message& msg) override {
    if (msg.qos < 0 || msg.qos > 1) return make_error(Errc::invalid_argument, "this MQTT client publishes at QoS 0 or 1");
    std::unique_lock lock(mu_);
    if (!ever_up_) return make_error(Errc::unavailable, "publish " + msg.topic + ": not connected", true);
    // Paced like Paho's backend: wait while the window is full, but not on
    // the loop's thread (the acknowledgements arrive there), not while the
    // broker is away, and not longer than the timeout.
    if (max_pending_ > 0 && msg.qos > 0 && !loop_->on_loop_thread()) {
      cv_.wait_for(lock, opts_timeout_, [&] { return !up_ || in_flight_.size() + queue_.size() < max_pending_; });
    }
    if (queue_.size() >= kMaxQueued) {
      return make_error(Errc::unavailable, "publish " + msg.topic + ": " + std::to_string(kMaxQueued) +
                                               " messages already wait for the broker", true);
    }
    queue_.push_back(msg);
    schedule_pump();
    return {};
  }

  Status flush(std::chrono::milliseconds timeout) override {
    std::unique_lock lock(mu_);
    if (!ever_up_) return make_error(Errc::unavailable, "not connected", true);
    const bool empty = loop_->on_loop_thread()
                           ? in_flight_.empty() && queue_.empty()
                           : cv_.wait_for(lock, timeout, [&] { return in_flight_.empty() && queue_.empty(); });
    if (!empty) return make_error(Errc::timeout, "publishes still unacknowledged", true);
    return {};
  }

  void disconnect() override {
    {
      std::lock_guard lock(mu_);
      ++attempt_;  // a connect under way is abandoned
      up_ = false;
    }
    cv_.notify_all();
    auto goodbye = [this] {
      if (phase_ == Phase::up) {
        out_ += mqtt::encode_disconnect();
        write_out();
      }
      close_socket();
    };
    if (loop_->on_loop_thread()) return goodbye();
    std::promise<void> done;
    auto fut = done.get_future();
    loop_->post([&] {
      goodbye();
      done.set_value();
    });
    fut.wait();
  }

  bool connected() const override { return up_.load(std::memory_order_relaxed); }

  void on_message(MessageHandler h) override {
    std::lock_guard lock(mu_);
    on_message_ = std::make_shared<MessageHandler>(std::move(h));
  }
  void on_connection_lost(LostHandler h) override {
    std::lock_guard lock(mu_);
    on_lost_ = std::make_shared<LostHandler>(std::move(h));
  }

  // Loop thread: the socket is ready.
  void on_events(uint32_t events) {
    if (fd_ < 0) return;
    if (phase_ == Phase::tcp) {
      int err = 0;
      socklen_t len = sizeof err;
      ::getsockopt(fd_, SOL_SOCKET, SO_ERROR, &err, &len);
      if (err != 0) {
        return fail_connect(make_error(Errc::unavailable, "connect to " + url_ + ": " + std::strerror(err), true));
      }
      if (!(events & (EPOLLOUT | EPOLLERR | EPOLLHUP))) return;
      if (!ssl_) return send_connect();
      SSL_set_fd(ssl_, fd_);
      SSL_set_connect_state(ssl_);
      phase_ = Phase::tls;
    }
    if (phase_ == Phase::tls) return step_handshake();
    if (events & (EPOLLIN | EPOLLHUP | EPOLLERR)) read_all();
    if (fd_ >= 0 && (events & EPOLLOUT)) write_out();
  }

  // Loop thread, every kTickMs: connect deadlines and keepalive.
  void on_tick(int64_t now) {
    if (fd_ < 0) return;
    if (phase_ != Phase::up) {
      if (now >= connect_deadline_ms_) {
        fail_connect(make_error(Errc::timeout, "connect to " + url_ + " timed out", true));
      }
      return;
    }
    if (keepalive_ms_ <= 0) return;
    if (ping_sent_ms_ != 0 && now - ping_sent_ms_ > keepalive_ms_) {
      return lose("no answer to a ping within the keepalive (" + std::to_string(keepalive_ms_ / 1000) + " s)");
    }
    // The broker allows 1.5 keepalives of silence; pinging at three
    // quarters of one leaves room for the tick and the answer.
    if (ping_sent_ms_ == 0 && now - last_out_ms_ >= keepalive_ms_ * 3 / 4) {
      ping_sent_ms_ = now;
      out_ += mqtt::encode_pingreq();
      write_out();
    }
  }

 private:
  enum class Phase { idle, tcp, tls, mqtt, up };

  Result<SSL*> new_ssl(const ConnectOptions& opts, const std::string& host) {
    auto ctx = loop_->tls_context(opts.ca_file);
    if (!ctx) return ctx.error();
    ERR_clear_error();
    SSL* ssl = SSL_new(*ctx);
    if (!ssl) return make_error(Errc::internal, "cannot create a TLS session");
    detail::set_peer_name(ssl, host, opts.verify_host);
    // Read at each connect, so a renewed certificate is used from the next one.
    if (!opts.cert_file.empty()) {
      const std::string key = opts.key_file.empty() ? opts.cert_file : opts.key_file;
      if (SSL_use_certificate_chain_file(ssl, opts.cert_file.c_str()) != 1 ||
          SSL_use_PrivateKey_file(ssl, key.c_str(), SSL_FILETYPE_PEM) != 1) {
        const std::string why = detail::drain_ssl_errors();
        SSL_free(ssl);
        return make_error(Errc::invalid_argument, "cannot load the client certificate " + opts.cert_file +
                                                      " and key " + key + ": " + why);
      }
    }
    return ssl;
  }

  // Loop thread.
  void start_connect(uint64_t attempt, const sockaddr_storage& addr, socklen_t addr_len, int family, SSL* ssl,
                     const ConnectOptions& opts, const std::string& host) {
    {
      std::lock_guard lock(mu_);
      if (attempt != attempt_) {  // abandoned before it started
        if (ssl) SSL_free(ssl);
        return;
      }
      opts_timeout_ = opts.timeout;
      max_inflight_ = static_cast<size_t>(std::max(1, opts.max_inflight));
      max_pending_ = static_cast<size_t>(std::max(0, opts.max_pending));
    }
    close_socket();
    attempt_of_socket_ = attempt;
    url_ = opts.url;
    ca_file_ = opts.ca_file;
    host_ = host;
    ssl_ = ssl;
    mqtt::ConnectFields f;
    f.client_id = opts.client_id;
    f.username = opts.username;
    f.password = opts.password;
    f.clean_session = opts.clean_session;
    f.keepalive_s = static_cast<uint16_t>(std::clamp(opts.keepalive_s, 0, 65535));
    f.will = opts.will;
    connect_packet_ = mqtt::encode_connect(f);
    keepalive_ms_ = int64_t{f.keepalive_s} * 1000;
    connect_deadline_ms_ = now_ms() + opts.timeout.count();
    loop_->enlist(this);
    fd_ = ::socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd_ < 0) {
      return fail_connect(make_error(Errc::unavailable, "connect to " + url_ + ": socket: " + std::strerror(errno),
                                     true));
    }
    const int one = 1;
    ::setsockopt(fd_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    phase_ = Phase::tcp;
    if (::connect(fd_, reinterpret_cast<const sockaddr*>(&addr), addr_len) != 0 && errno != EINPROGRESS) {
      return fail_connect(make_error(Errc::unavailable, "connect to " + url_ + ": " + std::strerror(errno), true));
    }
    watched_ = EPOLLIN | EPOLLOUT;
    loop_->watch(fd_, this, watched_, true);
  }

  void step_handshake() {
    ERR_clear_error();
    const int r = SSL_do_handshake(ssl_);
    if (r == 1) return send_connect();
    const int err = SSL_get_error(ssl_, r);
    if (err == SSL_ERROR_WANT_READ) return want(EPOLLIN);
    if (err == SSL_ERROR_WANT_WRITE) return want(EPOLLIN | EPOLLOUT);
    fail_connect(tls_error());
  }

  // Why the handshake (or, with TLS 1.3, the first read after it: the
  // broker judges the client's certificate then) failed, as the Paho
  // backend words it.
  Error tls_error() {
    const long verify = SSL_get_verify_result(ssl_);
    const std::string reasons = detail::drain_ssl_errors();
    if (verify != X509_V_OK) {
      return make_error(Errc::refused, "TLS handshake with " + url_ + " failed: " + detail::verify_failure(verify, host_));
    }
    return detail::tls_handshake_error(url_, ca_file_, reasons.empty() ? "connection closed" : reasons);
  }

  // With TLS 1.3 the client's handshake is over before the broker has
  // judged its certificate. A broker that refuses it sends an alert and
  // closes; when the CONNECT then meets the closed socket, the write fails
  // with nothing said. The alert is still in the socket's receive queue:
  // read it, so that the refusal says why (as it does when the read comes
  // first) instead of passing for a broker that is away.
  Error refusal_after_failed_write() {
    const std::string write_why = detail::drain_ssl_errors();
    char buf[512];
    ERR_clear_error();
    (void)SSL_read(ssl_, buf, sizeof buf);
    Error e = tls_error();
    if (e.code == Errc::unavailable && !write_why.empty()) e.message += " (write: " + write_why + ")";
    return e;
  }

  void send_connect() {
    phase_ = Phase::mqtt;
    out_ = connect_packet_;
    out_pos_ = 0;
    write_out();
  }

  void want(uint32_t events) {
    if (fd_ < 0 || events == watched_) return;
    watched_ = events;
    loop_->watch(fd_, this, events, false);
  }

  void read_all() {
    // Acknowledge at once what arrives. mosquitto leaves Nagle on, so its
    // second small packet in a row (the CONNACK after TLS 1.3's session
    // tickets, a PUBACK after a PUBACK) waits for the first one's ACK, which
    // a quiet client delays by 40 ms: every connect took 46 ms here. Linux
    // turns quick ACKs off again by itself, so this is set at each read.
    const int one = 1;
    ::setsockopt(fd_, IPPROTO_TCP, TCP_QUICKACK, &one, sizeof one);
    char buf[16384];
    for (;;) {
      ssize_t n;
      if (ssl_) {
        ERR_clear_error();
        const int r = SSL_read(ssl_, buf, sizeof buf);
        if (r <= 0) {
          const int err = SSL_get_error(ssl_, r);
          if (err == SSL_ERROR_WANT_READ) return;
          if (err == SSL_ERROR_WANT_WRITE) return want(EPOLLIN | EPOLLOUT);
          if (phase_ != Phase::up) return fail_connect(tls_error());
          const std::string why = detail::drain_ssl_errors();
          return lose(err == SSL_ERROR_ZERO_RETURN || why.empty() ? "the broker closed the connection"
                                                                  : "TLS: " + why);
        }
        n = r;
      } else {
        n = ::recv(fd_, buf, sizeof buf, 0);
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return;
        if (n <= 0) {
          const std::string why = n == 0 ? "the broker closed the connection" : std::strerror(errno);
          if (phase_ != Phase::up) {
            return fail_connect(make_error(Errc::unavailable, "connect to " + url_ + ": " + why, true));
          }
          return lose(why);
        }
      }
      reader_.feed(buf, static_cast<size_t>(n));
      for (;;) {
        auto p = reader_.next();
        if (!p) return lose(p.error().message);
        if (!*p) break;
        handle(**p);
        if (fd_ < 0) return;
      }
    }
  }

  void handle(const mqtt::Packet& p) {
    using mqtt::PacketType;
    if (phase_ == Phase::mqtt) {
      auto ack = mqtt::decode_connack(p);
      if (!ack) return fail_connect(make_error(Errc::unavailable, "connect to " + url_ + ": " + ack.error().message,
                                               true));
      if (ack->code == 4 || ack->code == 5) {
        return fail_connect(make_error(Errc::unauthenticated, "broker refused the credentials (code " +
                                                                  std::to_string(ack->code) + ": " +
                                                                  mqtt::connack_reason(ack->code) + ")"));
      }
      if (ack->code != 0) {
        return fail_connect(make_error(Errc::refused, "connect to " + url_ + ": the broker refused the connection (" +
                                                          mqtt::connack_reason(ack->code) + ")"));
      }
      phase_ = Phase::up;
      ping_sent_ms_ = 0;
      last_out_ms_ = now_ms();
      {
        std::lock_guard lock(mu_);
        // A persistent session: what the broker never acknowledged goes
        // again, marked as a duplicate, before anything new.
        for (auto& [id, bytes] : in_flight_) {
          bytes[0] = static_cast<char>(bytes[0] | 0x08);
          out_ += bytes;
        }
        up_ = true;
        ever_up_ = true;
        result_attempt_ = attempt_of_socket_;
        connect_result_ = Status{};
      }
      cv_.notify_all();
      return pump();
    }
    switch (p.type) {
      case PacketType::publish: {
        auto m = mqtt::decode_publish(p);
        if (!m) return lose(m.error().message);
        if (m->qos > 1) return lose("the broker sent a QoS 2 message; this client subscribes at QoS 1 at most");
        std::shared_ptr<MessageHandler> h;
        {
          std::lock_guard lock(mu_);
          h = on_message_;
        }
        // Acknowledged after the handler took it: a message lost in between
        // comes again from the persistent session.
        if (h && *h) (*h)(Message{std::move(m->topic), std::move(m->payload), m->qos, m->retained});
        if (m->qos == 1 && fd_ >= 0) {
          out_ += mqtt::encode_puback(m->packet_id);
          write_out();
        }
        return;
      }
      case PacketType::puback: {
        auto id = mqtt::decode_packet_id(p);
        if (!id) return lose(id.error().message);
        {
          std::lock_guard lock(mu_);
          in_flight_.erase(*id);
        }
        cv_.notify_all();
        return pump();
      }
      case PacketType::suback: {
        auto id = mqtt::decode_packet_id(p);
        auto code = mqtt::decode_suback_code(p);
        if (!id || !code) return lose("malformed SUBACK");
        {
          std::lock_guard lock(mu_);
          if (auto it = subacks_.find(*id); it != subacks_.end()) {
            it->second = *code == 0x80 ? Status(make_error(Errc::permission_denied,
                                                           "subscription refused by the broker"))
                                       : Status{};
          }
        }
        cv_.notify_all();
        return;
      }
      case PacketType::pingresp: ping_sent_ms_ = 0; return;
      default: return;  // UNSUBACK and the like: nothing asked for them
    }
  }

  // Moves queued messages onto the wire while the in-flight window has room.
  void pump() {
    if (phase_ != Phase::up) return;
    {
      std::lock_guard lock(mu_);
      while (!queue_.empty()) {
        Message& m = queue_.front();
        if (m.qos > 0) {
          if (in_flight_.size() >= max_inflight_) break;
          const uint16_t id = next_packet_id();
          auto bytes = mqtt::encode_publish(m.topic, m.payload, m.qos, m.retained, id);
          out_ += bytes;
          in_flight_.emplace(id, std::move(bytes));
        } else {
          out_ += mqtt::encode_publish(m.topic, m.payload, 0, m.retained, 0);
        }
        queue_.pop_front();
      }
    }
    cv_.notify_all();
    write_out();
  }

  // Under mu_: a packet id no publish in flight or subscription waiting has.
  uint16_t next_packet_id() {
    for (;;) {
      const uint16_t id = next_id_++;
      if (next_id_ == 0) next_id_ = 1;
      if (id != 0 && !in_flight_.count(id) && !subacks_.count(id)) return id;
    }
  }

  // Under mu_ (callers of publish).
  void schedule_pump() {
    if (pump_posted_) return;
    pump_posted_ = true;
    loop_->post([this] {
      {
        std::lock_guard lock(mu_);
        pump_posted_ = false;
      }
      pump();
    });
  }

  void write_out() {
    if (fd_ < 0 || phase_ == Phase::tcp || phase_ == Phase::tls) return;
    while (out_pos_ < out_.size()) {
      const size_t len = std::min<size_t>(out_.size() - out_pos_, 1u << 20);
      ssize_t n;
      if (ssl_) {
        ERR_clear_error();
        const int r = SSL_write(ssl_, out_.data() + out_pos_, static_cast<int>(len));
        if (r <= 0) {
          const int err = SSL_get_error(ssl_, r);
          if (err == SSL_ERROR_WANT_WRITE) return want(EPOLLIN | EPOLLOUT);
          if (err == SSL_ERROR_WANT_READ) return want(EPOLLIN);
          if (phase_ != Phase::up) return fail_connect(refusal_after_failed_write());
          return lose("TLS write failed: " + detail::drain_ssl_errors());
        }
        n = r;
      } else {
        n = ::send(fd_, out_.data() + out_pos_, len, MSG_NOSIGNAL);
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return want(EPOLLIN | EPOLLOUT);
        if (n < 0) return lose(std::string("write failed: ") + std::strerror(errno));
      }
      out_pos_ += static_cast<size_t>(n);
      last_out_ms_ = now_ms();
    }
    // As the reader's buffer: a large publish's bytes are not kept.
    if (out_.capacity() > 64 * 1024) {
      std::string().swap(out_);
    } else {
      out_.clear();
    }
    out_pos_ = 0;
    want(EPOLLIN);
  }

  void close_socket() {
    if (fd_ >= 0) {
      loop_->unwatch(fd_);
      if (ssl_ && phase_ == Phase::up) SSL_shutdown(ssl_);
      ::close(fd_);
      fd_ = -1;
    }
    if (ssl_) {
      SSL_free(ssl_);
      ssl_ = nullptr;
    }
    loop_->forget(this);
    reader_.reset();
    out_.clear();
    out_pos_ = 0;
    watched_ = 0;
    ping_sent_ms_ = 0;
    phase_ = Phase::idle;
    std::lock_guard lock(mu_);
    up_ = false;
  }

  void fail_connect(Error e) {
    if (phase_ == Phase::up) return lose(e.message);
    const uint64_t attempt = attempt_of_socket_;
    close_socket();
    {
      std::lock_guard lock(mu_);
      result_attempt_ = attempt;
      connect_result_ = Status(std::move(e));
    }
    cv_.notify_all();
  }

  // The connection that was up is gone: waiters are told, then the owner.
  void lose(const std::string& cause) {
    if (phase_ != Phase::up) {
      return fail_connect(make_error(Errc::unavailable, "connect to " + url_ + ": " + cause, true));
    }
    close_socket();
    std::shared_ptr<LostHandler> h;
    {
      std::lock_guard lock(mu_);
      for (auto& [id, result] : subacks_) {
        if (!result) result = Status(make_error(Errc::unavailable, "connection lost", true));
      }
      h = on_lost_;
    }
    cv_.notify_all();
    if (h && *h) (*h)(cause);
  }

  void teardown() { close_socket(); }

  std::shared_ptr<SessionLoop> loop_;

  // Loop thread only.
  Phase phase_ = Phase::idle;
  int fd_ = -1;
  SSL* ssl_ = nullptr;
  uint32_t watched_ = 0;
  uint64_t attempt_of_socket_ = 0;
  std::string url_, host_, ca_file_;
  std::string connect_packet_;
  mqtt::PacketReader reader_{kMaxPacket};
  std::string out_;
  size_t out_pos_ = 0;
  int64_t keepalive_ms_ = 0, last_out_ms_ = 0, ping_sent_ms_ = 0, connect_deadline_ms_ = 0;

  // Shared, under mu_ (up_ is also read without it).
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<bool> up_{false};
  bool ever_up_ = false;
  uint64_t attempt_ = 0, result_attempt_ = 0;
  std::optional<Status> connect_result_;
  std::chrono::milliseconds opts_timeout_{10000};
  size_t max_inflight_ = 64, max_pending_ = 0;
  std::map<uint16_t, std::string> in_flight_;  // QoS 1 publishes sent, not acknowledged
  std::deque<Message> queue_;                  // not sent yet
  std::map<uint16_t, std::optional<Status>> subacks_;
  uint16_t next_id_ = 1;
  bool pump_posted_ = false;
  std::shared_ptr<MessageHandler> on_message_;
  std::shared_ptr<LostHandler> on_lost_;

  friend class SessionLoop;
};

void SessionLoop::run() {
  // A write to a connection the broker closed raises SIGPIPE in the writing
  // thread; blocked here, the write fails with EPIPE instead and the
  // session is lost like any other (OpenSSL writes with plain write()).
  sigset_t pipe;
  sigemptyset(&pipe);
  sigaddset(&pipe, SIGPIPE);
  pthread_sigmask(SIG_BLOCK, &pipe, nullptr);
  std::vector<epoll_event> events(512);
  int64_t next_tick = now_ms() + kTickMs;
  while (!stop_) {
    const int64_t wait = std::max<int64_t>(0, next_tick - now_ms());
    const int n = ::epoll_wait(ep_, events.data(), static_cast<int>(events.size()), static_cast<int>(wait));
    bool commands = false;
    for (int i = 0; i < n; ++i) {
      if (!events[i].data.ptr) {
        commands = true;
        continue;
      }
      static_cast<LoopTransport*>(events[i].data.ptr)->on_events(events[i].events);
    }
    if (commands) {
      uint64_t count = 0;
      (void)!::read(ev_, &count, sizeof count);
      std::vector<std::function<void()>> cmds;
      {
        std::lock_guard lock(mu_);
        cmds.swap(cmds_);
        signaled_ = false;
      }
      for (auto& f : cmds) f();
    }
    if (const int64_t now = now_ms(); now >= next_tick) {
      next_tick = now + kTickMs;
      // on_tick may close a session, which forgets it: iterate a copy.
      std::vector<LoopTransport*> all(sessions_.begin(), sessions_.end());
      for (auto* t : all) {
        if (sessions_.count(t)) t->on_tick(now);
      }
    }
  }
}

std::shared_ptr<SessionLoop> make_session_loop() { return std::make_shared<SessionLoop>(); }

std::unique_ptr<Transport> make_loop_transport(std::shared_ptr<SessionLoop> loop) {
  return std::make_unique<LoopTransport>(std::move(loop));
}

}  // namespace flotilla::transport

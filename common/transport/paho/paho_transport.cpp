// Transport backend over Paho's C asynchronous client (MQTTAsync).
// Paho runs its own threads; callbacks hand results back through promises.
#include <MQTTAsync.h>
#include <netdb.h>
#include <netinet/in.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <atomic>
#include <cctype>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <memory>
#include <future>
#include <mutex>
#include <thread>
#include <vector>
#include <algorithm>

#include "flotilla/common/log.hpp"
#include "flotilla/common/transport.hpp"
#include "../tls_common.hpp"

namespace flotilla::transport {

namespace {

// Set on Paho's callback threads: publish() must not wait there, the
// acknowledgements it would wait for arrive on that same thread.
thread_local bool t_in_callback = false;
struct InCallback {
  InCallback() { t_in_callback = true; }
  ~InCallback() { t_in_callback = false; }
};

// The context Paho calls back with. It lives on the heap and is kept by the
// transport long after the caller stopped waiting: Paho C 1.3.12 may call a
// failure callback late, or twice (eclipse/paho.mqtt.c#1341), and a stack
// object would be long gone by then.
struct Waiter {
  std::promise<Status> promise;
  std::atomic<bool> done{false};
  void set(Status s) {
    if (!done.exchange(true)) promise.set_value(std::move(s));
  }
};

void on_ok(void* ctx, MQTTAsync_successData* data) {
  auto* w = static_cast<Waiter*>(ctx);
  if (data && data->alt.qos == MQTT_BAD_SUBSCRIBE) {
    w->set(make_error(Errc::permission_denied, "subscription refused by the broker"));
    return;
  }
  w->set(Status{});
}

void on_fail(void* ctx, MQTTAsync_failureData* data) {
  auto* w = static_cast<Waiter*>(ctx);
  std::string msg = data && data->message ? data->message : "failed";
  int code = data ? data->code : 0;
  // Connect return codes 4 (bad user name or password) and 5 (not authorised)
  // will not get better by retrying.
  if (code == 4 || code == 5) {
    w->set(make_error(Errc::unauthenticated,
                                    "broker refused the credentials (code " + std::to_string(code) + ")"));
    return;
  }
  if (code == MQTT_BAD_SUBSCRIBE) {
    w->set(make_error(Errc::permission_denied, "subscription refused by the broker"));
    return;
  }
  w->set(make_error(Errc::unavailable, msg + " (code " + std::to_string(code) + ")", true));
}

bool is_tls_url(const std::string& url) { return url.rfind("ssl://", 0) == 0 || url.rfind("mqtts://", 0) == 0; }

// Paho checks the certificate's host name itself after the handshake and
// then says only "TCP/TLS connect failure", like for a broker that is down.
// One handshake of our own, with OpenSSL checking the same chain and name,
// tells which; empty when it finds nothing wrong (or cannot connect).
// Why a TLS connection failed, found by a handshake of our own with the
// same files (Paho reports only that it failed): the broker's certificate
// not verifying (server_why), or the broker refusing ours (client_alert:
// revoked, expired, unknown CA, none sent). With TLS 1.3 the broker judges
// the client's certificate after the handshake, so its alert arrives at the
// first read.
struct TlsDiagnosis {
  std::string server_why;
  std::string client_alert;
};

TlsDiagnosis diagnose_tls(const ConnectOptions& opts) {
  TlsDiagnosis out;
  const size_t scheme = opts.url.find("://");
  const std::string hostport = opts.url.substr(scheme == std::string::npos ? 0 : scheme + 3);
  const size_t colon = hostport.rfind(':');
  if (colon == std::string::npos) return out;
  const std::string host = hostport.substr(0, colon), port = hostport.substr(colon + 1);
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  if (::getaddrinfo(host.c_str(), port.c_str(), &hints, &res) != 0 || !res) return out;
  const int fd = ::socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  timeval tv{5, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  const bool connected = fd >= 0 && ::connect(fd, res->ai_addr, res->ai_addrlen) == 0;
  ::freeaddrinfo(res);
  ERR_clear_error();
  SSL_CTX* ctx = connected ? SSL_CTX_new(TLS_client_method()) : nullptr;
  if (ctx) {
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    bool usable = opts.ca_file.empty() ? SSL_CTX_set_default_verify_paths(ctx) == 1
                                       : SSL_CTX_load_verify_locations(ctx, opts.ca_file.c_str(), nullptr) == 1;
    if (usable && !opts.cert_file.empty()) {
      usable = SSL_CTX_use_certificate_chain_file(ctx, opts.cert_file.c_str()) == 1 &&
               SSL_CTX_use_PrivateKey_file(ctx, (opts.key_file.empty() ? opts.cert_file : opts.key_file).c_str(),
                                           SSL_FILETYPE_PEM) == 1;
    }
    SSL* ssl = usable ? SSL_new(ctx) : nullptr;
    if (ssl) {
      SSL_set_verify(ssl, SSL_VERIFY_PEER, nullptr);
      detail::set_peer_name(ssl, host, opts.verify_host);
      SSL_set_fd(ssl, fd);
      if (SSL_connect(ssl) != 1) {
        const long v = SSL_get_verify_result(ssl);
        if (v != X509_V_OK) out.server_why = detail::verify_failure(v, host);
        out.client_alert = detail::client_certificate_alert(detail::drain_ssl_errors());
      } else {
        // An MQTT PINGREQ where a CONNECT belongs: a broker that took our
        // certificate closes the connection for it; one that did not has
        // sent its alert first.
        const char ping[2] = {static_cast<char>(0xC0), 0};
        (void)SSL_write(ssl, ping, sizeof ping);
        char buf[16];
        if (SSL_read(ssl, buf, sizeof buf) <= 0) {
          out.client_alert = detail::client_certificate_alert(detail::drain_ssl_errors());
        }
        SSL_shutdown(ssl);
      }
      SSL_free(ssl);
    }
    SSL_CTX_free(ctx);
    ERR_clear_error();
  }
  if (fd >= 0) ::close(fd);
  return out;
}

class PahoTransport final : public Transport {
 public:
  ~PahoTransport() override {
    disconnect();
    if (client_) MQTTAsync_destroy(&client_);
    // Destroyed client: no callback can arrive any more, waiters can go.
  }

  Status connect(const ConnectOptions& opts) override {
    if (!client_) {
      MQTTAsync_createOptions co = MQTTAsync_createOptions_initializer;
      co.MQTTVersion = MQTTVERSION_3_1_1;
      co.sendWhileDisconnected = 1;
      co.maxBufferedMessages = 10000;
      int rc = MQTTAsync_createWithOptions(&client_, opts.url.c_str(), opts.client_id.c_str(),
                                           MQTTCLIENT_PERSISTENCE_NONE, nullptr, &co);
      if (rc != MQTTASYNC_SUCCESS) {
        client_ = nullptr;
        return make_error(Errc::invalid_argument, "cannot create MQTT client for " + opts.url +
                                                      " (code " + std::to_string(rc) + ")");
      }
      MQTTAsync_setCallbacks(client_, this, &PahoTransport::lost_cb, &PahoTransport::arrived_cb, nullptr);
    }
    opts_ = opts;
    MQTTAsync_connectOptions c = MQTTAsync_connectOptions_initializer;
    c.keepAliveInterval = opts.keepalive_s;
    c.cleansession = opts.clean_session ? 1 : 0;
    c.maxInflight = opts.max_inflight;
    c.connectTimeout = static_cast<int>(std::max<int64_t>(1, opts.timeout.count() / 1000));
    c.MQTTVersion = MQTTVERSION_3_1_1;
    c.automaticReconnect = 0;  // callers own reconnect policy (full jitter)
    if (!opts.username.empty()) c.username = opts_.username.c_str();
    if (!opts.password.empty()) c.password = opts_.password.c_str();
    MQTTAsync_willOptions will = MQTTAsync_willOptions_initializer;
    if (opts.will) {
      will.topicName = opts_.will->topic.c_str();
      will.message = nullptr;
      will.payload.data = opts_.will->payload.data();
      will.payload.len = static_cast<int>(opts_.will->payload.size());
      will.qos = opts.will->qos;
      will.retained = opts.will->retained ? 1 : 0;
      c.will = &will;
    }
    MQTTAsync_SSLOptions ssl = MQTTAsync_SSLOptions_initializer;
    const bool tls = is_tls_url(opts.url);
    if (tls) {
      // Pinned: with a CA file, that file is the whole trust store (Paho
      // would otherwise also load OpenSSL's default paths).
      if (!opts.ca_file.empty()) {
        ssl.trustStore = opts_.ca_file.c_str();
        ssl.disableDefaultTrustStore = 1;
      }
      if (!opts.cert_file.empty()) {
        ssl.keyStore = opts_.cert_file.c_str();
        ssl.privateKey = opts_.key_file.empty() ? nullptr : opts_.key_file.c_str();
      }
      ssl.enableServerCertAuth = 1;
      ssl.verify = opts.verify_host ? 1 : 0;  // host name (or IP) in the certificate
      ssl.sslVersion = MQTT_SSL_VERSION_TLS_1_2;
      ssl.ssl_error_cb = &PahoTransport::tls_error_cb;
      ssl.ssl_error_context = this;
      c.ssl = &ssl;
      std::lock_guard lock(tls_mu_);
      tls_error_.clear();
    }
    Waiter& w = new_waiter();
    auto fut = w.promise.get_future();
    c.onSuccess = on_ok;
    c.onFailure = on_fail;
    c.context = &w;
    int rc = MQTTAsync_connect(client_, &c);
    if (rc != MQTTASYNC_SUCCESS) {
      return make_error(Errc::unavailable, "connect to " + opts.url + " failed to start (code " +
                                               std::to_string(rc) + ")", true);
    }
    // Paho always calls one of the callbacks (it applies connectTimeout itself);
    // the extra margin only guards against a stuck library.
    if (fut.wait_for(opts.timeout + std::chrono::seconds(5)) != std::future_status::ready) {
      return make_error(Errc::timeout, "connect to " + opts.url + " timed out", true);
    }
    Status s = fut.get();
    if (!s && tls && s.error().code != Errc::unauthenticated) {
      std::string openssl;
      {
        std::lock_guard lock(tls_mu_);
        openssl = tls_error_;
      }
      // OpenSSL said why. A certificate it does not trust, or no protocol
      // version in common, will not change by retrying the same handshake
      // (refused, not retryable); anything else (a connection cut
      // mid-handshake) is the network's doing.
      if (!openssl.empty()) return detail::tls_handshake_error(opts.url, opts.ca_file, detail::openssl_reasons(openssl));
    }
    if (!s && tls && s.error().code == Errc::unavailable) {
      const TlsDiagnosis d = diagnose_tls(opts);
      if (!d.server_why.empty()) {
        return make_error(Errc::refused, "TLS handshake with " + opts.url + " failed: " + d.server_why);
      }
      if (!d.client_alert.empty()) {
        return make_error(Errc::unauthenticated, "the broker refused this client's certificate (" + d.client_alert +
                                                     ")");
      }
    }
    if (!s) return s.error().with_context("connect to " + opts.url);
    return s;
  }

  Status subscribe(const std::string& filter, int qos) override {
    if (!client_) return make_error(Errc::unavailable, "not connected", true);
    Waiter& w = new_waiter();
    auto fut = w.promise.get_future();
    MQTTAsync_responseOptions ro = MQTTAsync_responseOptions_initializer;
    ro.onSuccess = on_ok;
    ro.onFailure = on_fail;
    ro.context = &w;
    int rc = MQTTAsync_subscribe(client_, filter.c_str(), qos, &ro);
    if (rc != MQTTASYNC_SUCCESS) {
      return make_error(Errc::unavailable, "subscribe " + filter + " (code " + std::to_string(rc) + ")", true);
    }
    if (fut.wait_for(opts_.timeout) != std::future_status::ready) {
      return make_error(Errc::timeout, "subscribe " + filter + " not acknowledged", true);
    }
    Status s = fut.get();
    if (!s) return s.error().with_context("subscribe " + filter);
    return s;
  }

  Status publish(const Message& msg) override {
    if (!client_) return make_error(Errc::unavailable, "not connected", true);
    MQTTAsync_message m = MQTTAsync_message_initializer;
    m.payload = const_cast<char*>(msg.payload.data());
    m.payloadlen = static_cast<int>(msg.payload.size());
    m.qos = msg.qos;
    m.retained = msg.retained ? 1 : 0;
    MQTTAsync_responseOptions ro = MQTTAsync_responseOptions_initializer;
    const bool paced = opts_.max_pending > 0 && msg.qos > 0;
    if (paced) {
      if (!t_in_callback) {
        // No Paho call under pending_mu_: Paho holds its own lock while it
        // runs acked() (which takes pending_mu_), so calling into Paho here
        // would invert the lock order and deadlock. A closed session resets
        // pending_ (lost_cb, disconnect), and Paho fails queued publishes then.
        std::unique_lock lock(pending_mu_);
        pending_cv_.wait_for(lock, opts_.timeout, [this] { return pending_ < opts_.max_pending; });
      }
      ro.onSuccess = [](void* ctx, MQTTAsync_successData*) { static_cast<PahoTransport*>(ctx)->acked(); };
      ro.onFailure = [](void* ctx, MQTTAsync_failureData*) { static_cast<PahoTransport*>(ctx)->acked(); };
      ro.context = this;
      std::lock_guard lock(pending_mu_);
      ++pending_;
    }
    int rc = MQTTAsync_sendMessage(client_, msg.topic.c_str(), &m, &ro);
    if (rc != MQTTASYNC_SUCCESS) {
      if (paced) acked();
      return make_error(Errc::unavailable, "publish " + msg.topic + " (code " + std::to_string(rc) + ")",
                        true);
    }
    return {};
  }

  Status flush(std::chrono::milliseconds timeout) override {
    if (!client_) return make_error(Errc::unavailable, "not connected", true);
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    for (;;) {
      MQTTAsync_token* tokens = nullptr;
      MQTTAsync_getPendingTokens(client_, &tokens);
      bool empty = !tokens || tokens[0] == -1;
      MQTTAsync_free(tokens);
      if (empty) return {};
      if (std::chrono::steady_clock::now() >= deadline) {
        return make_error(Errc::timeout, "publishes still unacknowledged", true);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }

  void disconnect() override {
    if (!client_ || !MQTTAsync_isConnected(client_)) return;
    Waiter& w = new_waiter();
    auto fut = w.promise.get_future();
    MQTTAsync_disconnectOptions d = MQTTAsync_disconnectOptions_initializer;
    d.timeout = 2000;
    d.onSuccess = [](void* ctx, MQTTAsync_successData*) { static_cast<Waiter*>(ctx)->set(Status{}); };
    d.onFailure = [](void* ctx, MQTTAsync_failureData*) { static_cast<Waiter*>(ctx)->set(Status{}); };
    d.context = &w;
    if (MQTTAsync_disconnect(client_, &d) == MQTTASYNC_SUCCESS) fut.wait_for(std::chrono::seconds(5));
    {
      // Whoever waits for room in publish() must not wait for acknowledgements now.
      std::lock_guard lock(pending_mu_);
      pending_ = 0;
    }
    pending_cv_.notify_all();
  }

  bool connected() const override { return client_ && MQTTAsync_isConnected(client_); }

  void on_message(MessageHandler h) override {
    std::lock_guard lock(mu_);
    msg_handler_ = std::move(h);
  }
  void on_connection_lost(LostHandler h) override {
    std::lock_guard lock(mu_);
    lost_handler_ = std::move(h);
  }

 private:
  // A publish was acknowledged or failed: room for the next one.
  void acked() {
    {
      std::lock_guard lock(pending_mu_);
      if (pending_ > 0) --pending_;
    }
    pending_cv_.notify_one();
  }

  static void lost_cb(void* ctx, char* cause) {
    InCallback in_callback;
    auto* self = static_cast<PahoTransport*>(ctx);
    {
      // What was in flight is resent or failed by the library; callers
      // waiting for room must not wait on acknowledgements that may never come.
      std::lock_guard lock(self->pending_mu_);
      self->pending_ = 0;
    }
    self->pending_cv_.notify_all();
    LostHandler h;
    {
      std::lock_guard lock(self->mu_);
      h = self->lost_handler_;
    }
    if (h) h(cause ? cause : "connection lost");
  }

  static int arrived_cb(void* ctx, char* topic, int topic_len, MQTTAsync_message* m) {
    InCallback in_callback;
    auto* self = static_cast<PahoTransport*>(ctx);
    Message msg;
    msg.topic = topic_len > 0 ? std::string(topic, static_cast<size_t>(topic_len)) : std::string(topic);
    msg.payload.assign(static_cast<const char*>(m->payload), static_cast<size_t>(m->payloadlen));
    msg.qos = m->qos;
    msg.retained = m->retained != 0;
    MQTTAsync_freeMessage(&m);
    MQTTAsync_free(topic);
    MessageHandler h;
    {
      std::lock_guard lock(self->mu_);
      h = self->msg_handler_;
    }
    if (h) h(std::move(msg));
    return 1;
  }

  // OpenSSL's error queue, printed by Paho when a TLS handshake fails (on
  // Paho's thread). Bounded: a few lines say everything.
  // OpenSSL calls this (ERR_print_errors_cb under Paho). The static agent's
  // OpenSSL has no unwind tables (docs/adr/0007-minimal-openssl-for-the-agent.md),
  // and no exception may cross C frames anyway: nothing escapes.
  static int tls_error_cb(const char* str, size_t len, void* ctx) noexcept {
    auto* self = static_cast<PahoTransport*>(ctx);
    try {
      std::lock_guard lock(self->tls_mu_);
      if (self->tls_error_.size() < 2048) self->tls_error_.append(str, std::min<size_t>(len, 2048));
    } catch (...) {
      // out of memory while collecting a diagnostic: keep what we have
    }
    return 1;
  }

  // Waiters stay allocated for the last kMaxWaiters requests (and all of them
  // until the client is destroyed, after which Paho calls nothing).
  Waiter& new_waiter() {
    std::lock_guard lock(waiters_mu_);
    waiters_.push_back(std::make_unique<Waiter>());
    while (waiters_.size() > kMaxWaiters && waiters_.front()->done) waiters_.pop_front();
    return *waiters_.back();
  }
  static constexpr size_t kMaxWaiters = 256;
  std::mutex waiters_mu_;
  std::deque<std::unique_ptr<Waiter>> waiters_;

  MQTTAsync client_ = nullptr;
  ConnectOptions opts_;
  std::mutex pending_mu_;
  std::condition_variable pending_cv_;
  int pending_ = 0;  // paced publishes not yet acknowledged
  std::mutex tls_mu_;
  std::string tls_error_;
  std::mutex mu_;
  MessageHandler msg_handler_;
  LostHandler lost_handler_;
};

}  // namespace

std::unique_ptr<Transport> make_paho_transport() { return std::make_unique<PahoTransport>(); }

std::string device_id_from_topic(const std::string& topic, std::string* leaf) {
  const std::string root = kTopicRoot;
  if (topic.compare(0, root.size(), root) != 0) return {};
  auto slash = topic.find('/', root.size());
  if (slash == std::string::npos || slash == root.size()) return {};
  if (leaf) *leaf = topic.substr(slash + 1);
  return topic.substr(root.size(), slash - root.size());
}

std::string parse_device_topic(const std::string& topic, std::string* gateway, std::string* leaf) {
  if (gateway) gateway->clear();
  const std::string groot = kGatewayRoot;
  if (topic.compare(0, groot.size(), groot) != 0) return device_id_from_topic(topic, leaf);
  const auto gw_end = topic.find('/', groot.size());
  if (gw_end == std::string::npos || gw_end == groot.size() || topic.compare(gw_end, 3, "/d/") != 0) return {};
  const auto dev_begin = gw_end + 3;
  const auto dev_end = topic.find('/', dev_begin);
  if (dev_end == std::string::npos || dev_end == dev_begin) return {};
  if (gateway) *gateway = topic.substr(groot.size(), gw_end - groot.size());
  if (leaf) *leaf = topic.substr(dev_end + 1);
  return topic.substr(dev_begin, dev_end - dev_begin);
}

std::string rollcall_shard_topic(int shard) {
  static constexpr char kHex[] = "0123456789abcdef";
  const auto b = static_cast<unsigned>(shard) % kRollcallShards;
  return std::string(kRollcallTopic) + "/" + kHex[b >> 4] + kHex[b & 15];
}

std::string rollcall_topic(std::string_view client_id) {
  uint32_t h = 2166136261u;  // FNV-1a: the hub and every agent must agree, whatever their build
  for (const char c : client_id) h = (h ^ static_cast<uint8_t>(c)) * 16777619u;
  return rollcall_shard_topic(static_cast<int>(h % kRollcallShards));
}

bool is_rollcall_topic(std::string_view topic) {
  const std::string_view root = kRollcallTopic;
  if (!topic.starts_with(root)) return false;
  if (topic.size() == root.size()) return true;
  return topic.size() == root.size() + 3 && topic[root.size()] == '/' &&
         std::isxdigit(static_cast<unsigned char>(topic[root.size() + 1])) &&
         std::isxdigit(static_cast<unsigned char>(topic[root.size() + 2]));
}

std::string gateway_of_reports_topic(const std::string& topic) {
  const std::string groot = kGatewayRoot;
  constexpr std::string_view leaf = "/reports";
  if (topic.size() <= groot.size() + leaf.size() || topic.compare(0, groot.size(), groot) != 0 ||
      !topic.ends_with(leaf)) {
    return {};
  }
  std::string id = topic.substr(groot.size(), topic.size() - groot.size() - leaf.size());
  return id.find('/') == std::string::npos ? id : std::string();
}

}  // namespace flotilla::transport

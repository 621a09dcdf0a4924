// Coordination on etcd 3.4 through its v3 JSON gateway (docs/adr/0014):
// POST /v3/... with JSON bodies on the client port, keys and values in
// base64, 64-bit numbers as JSON strings, fields left out when zero/false.
// Watches are one long chunked response, a {"result": ...} object per line.
//
// Every request has a connect deadline and a request deadline per endpoint;
// a request that never reached a member fails over to the next one. A write
// whose answer was lost after it was sent is not retried elsewhere (it may
// have applied): the caller gets coordination_unavailable, "outcome unknown",
// and re-reads. When no member answers the error is coordination_unavailable
// naming etcd and every endpoint tried.
#include <algorithm>
#include <atomic>
#include <fstream>
#include <limits>
#include <mutex>
#include <optional>
#include <thread>

#include <openssl/err.h>
#include <openssl/ssl.h>

#include <boost/asio/connect.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#include <nlohmann/json.hpp>

#include "flotilla/common/encoding.hpp"
#include "flotilla/common/http_client.hpp"
#include "flotilla/common/log.hpp"
#include "flotilla/hub/coord.hpp"

namespace flotilla::hub::coord {
namespace {

namespace beast = boost::beast;
namespace bhttp = boost::beast::http;
namespace asio = boost::asio;
namespace ssl = boost::asio::ssl;
using json = nlohmann::json;

constexpr size_t kMaxWatchMessageBytes = 8u << 20;

std::string b64(std::string_view s) {
  return to_base64(reinterpret_cast<const uint8_t*>(s.data()), s.size());
}

Result<std::string> unb64(const json& j) {
  if (!j.is_string()) return std::string();
  auto b = from_base64(j.get<std::string>());
  if (!b) return make_error(Errc::parse, "etcd sent bad base64");
  return std::string(b->begin(), b->end());
}

// grpc-gateway writes int64 as a string and leaves zero out.
int64_t num(const json& obj, const char* field) {
  if (!obj.is_object()) return 0;
  auto it = obj.find(field);
  if (it == obj.end()) return 0;
  if (it->is_number_integer()) return it->get<int64_t>();
  if (it->is_string()) {
    try {
      return std::stoll(it->get<std::string>());
    } catch (...) {
      return 0;
    }
  }
  return 0;
}

Result<KeyValue> parse_kv(const json& j) {
  KeyValue kv;
  auto k = unb64(j.value("key", json()));
  if (!k) return k.error();
  auto v = unb64(j.value("value", json()));
  if (!v) return v.error();
  kv.key = std::move(*k);
  kv.value = std::move(*v);
  kv.create_revision = num(j, "create_revision");
  kv.mod_revision = num(j, "mod_revision");
  kv.version = num(j, "version");
  kv.lease = num(j, "lease");
  return kv;
}

std::string prefix_end(std::string p) {
  while (!p.empty() && static_cast<unsigned char>(p.back()) == 0xff) p.pop_back();
  if (p.empty()) return std::string(1, '\0');  // etcd: "\0" as range_end = to the end
  p.back() = static_cast<char>(static_cast<unsigned char>(p.back()) + 1);
  return p;
}

Error unreachable(const std::string& detail) {
  return make_error(Errc::coordination_unavailable, "etcd unreachable: " + detail, true);
}

// One HTTP/1.1 connection to one member, plain or TLS (with an optional
// client certificate). Both stream types share Beast's interface, so each
// exchange is written once as a generic lambda given to with().
class Conn {
 public:
  explicit Conn(asio::io_context& ioc) : ioc_(ioc) {}

  template <class F>
  void with(F&& f) {
    if (tls_) f(*tls_);
    else f(*plain_);
  }
  beast::tcp_stream& tcp() { return tls_ ? beast::get_lowest_layer(*tls_) : *plain_; }

  // Connect (and handshake) under one deadline. Errors are "not sent".
  Status open(const http::Url& url, const EtcdOptions& o) {
    asio::ip::tcp::resolver resolver(ioc_);
    beast::error_code ec;
    auto results = resolver.resolve(url.host, url.port, ec);
    if (ec) return make_error(Errc::unavailable, "resolve " + url.host + ": " + ec.message(), true);
    if (url.scheme == "https") {
      ctx_.emplace(ssl::context::tls_client);
      SSL_CTX_set_min_proto_version(ctx_->native_handle(), TLS1_2_VERSION);
      if (o.ca_file.empty()) ctx_->set_default_verify_paths(ec);
      else ctx_->load_verify_file(o.ca_file, ec);
      if (ec) return make_error(Errc::invalid_argument, "etcd CA file: " + ec.message());
      if (!o.cert_file.empty()) {
        ctx_->use_certificate_chain_file(o.cert_file, ec);
        if (!ec) ctx_->use_private_key_file(o.key_file, ssl::context::pem, ec);
        if (ec) return make_error(Errc::invalid_argument, "etcd client certificate: " + ec.message());
      }
      ctx_->set_verify_mode(ssl::verify_peer);
      tls_.emplace(ioc_, *ctx_);
      SSL* h = tls_->native_handle();
      asio::ip::make_address(url.host, ec);
      const bool ip = !ec;
      const bool named = ip ? X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(h), url.host.c_str()) == 1
                            : SSL_set1_host(h, url.host.c_str()) == 1 && SSL_set_tlsext_host_name(h, url.host.c_str()) == 1;
      if (!named) return make_error(Errc::invalid_argument, "cannot check the TLS name of " + url.host);
    } else {
      plain_.emplace(ioc_);
    }
    tcp().expires_after(o.connect_timeout);
    ec = {};
    tcp().async_connect(results, [&](beast::error_code e, const asio::ip::tcp::endpoint&) { ec = e; });
    run();
    if (ec) return make_error(Errc::unavailable, "connect: " + ec.message(), true);
    if (tls_) {
      tls_->async_handshake(ssl::stream_base::client, [&](beast::error_code e) { ec = e; });
      run();
      if (ec) return make_error(Errc::unavailable, "TLS handshake: " + ec.message(), true);
    }
    return {};
  }

  void run() {
    ioc_.restart();
    ioc_.run();
  }
  void close() {
    beast::error_code ec;
    tcp().socket().shutdown(asio::ip::tcp::socket::shutdown_both, ec);
    tcp().socket().close(ec);
  }

 private:
  asio::io_context& ioc_;
  std::optional<ssl::context> ctx_;
  std::optional<beast::tcp_stream> plain_;
  std::optional<beast::ssl_stream<beast::tcp_stream>> tls_;
};

bhttp::request<bhttp::string_body> make_request(const http::Url& url, const std::string& path, std::string body) {
  bhttp::request<bhttp::string_body> r{bhttp::verb::post, path, 11};
  r.set(bhttp::field::host, url.host);
  r.set(bhttp::field::content_type, "application/json");
  r.body() = std::move(body);
  r.prepare_payload();
  return r;
}

// The gRPC status a gateway error carries, as our error codes.
Error grpc_error(const json& j, const std::string& what) {
  const int64_t code = num(j, "code");
  const std::string msg = j.value("message", j.value("error", std::string("no message")));
  switch (code) {
    case 3: return make_error(Errc::invalid_argument, what + ": " + msg);
    case 5: return make_error(Errc::not_found, what + ": " + msg);
    case 11: return make_error(Errc::not_found, what + ": " + msg);  // out of range: compacted
    case 7:
    case 16: return make_error(Errc::permission_denied, what + ": " + msg);
    default: return make_error(Errc::unavailable, what + ": " + msg, true);
  }
}

struct Shared {
  EtcdOptions opts;
  std::vector<http::Url> urls;
  std::atomic<size_t> preferred{0};  // the member that answered last
};

class EtcdWatch final : public Watch {
 public:
  EtcdWatch(std::shared_ptr<Shared> sh, std::string prefix, int64_t from)
      : sh_(std::move(sh)), prefix_(std::move(prefix)), from_(from), last_(from > 0 ? from - 1 : 0) {}
  ~EtcdWatch() override { drop(); }

  Result<std::vector<WatchEvent>> next(std::chrono::milliseconds wait) override {
    if (compacted_ > 0) {
      return make_error(Errc::not_found, "watch " + prefix_ + ": revision " + std::to_string(last_ + 1) +
                                             " compacted; the oldest revision kept is " + std::to_string(compacted_));
    }
    const auto deadline = std::chrono::steady_clock::now() + wait;
    if (!conn_) FLOTILLA_TRY_STATUS(reopen());
    int reopens = 0;
    for (;;) {
      if (reopens > 3) return unreachable("watch " + prefix_ + ": the stream keeps ending");
      // Whole lines already buffered first.
      auto evs = drain_lines();
      if (!evs) {
        if (compacted_ > 0) return evs.error();
        drop();
        if (evs.error().code == Errc::parse) return evs.error();
        ++reopens;
        FLOTILLA_TRY_STATUS(reopen());
        continue;
      }
      if (!evs->empty()) return evs;
      const auto now = std::chrono::steady_clock::now();
      if (now >= deadline) return std::vector<WatchEvent>{};
      if (!reading_) start_read();
      // The read stays pending across calls: run_for returns at the wait's
      // end without cancelling it, so no byte of the stream is lost.
      ioc_.restart();
      ioc_.run_for(deadline - now);
      if (read_done_) {
        reading_ = false;
        read_done_ = false;
        if (read_ec_) {
          // The member went away: resume from the next revision elsewhere.
          drop();
          ++reopens;
          FLOTILLA_TRY_STATUS(reopen());
        }
      }
    }
  }
  int64_t last_revision() const override { return last_; }
  int64_t compacted_at() const override { return compacted_; }
  Status start() { return reopen(); }

 private:
  void start_read() {
    reading_ = true;
    read_done_ = false;
    conn_->with([&](auto& stream) {
      bhttp::async_read_some(stream, buf_, *parser_, [this](beast::error_code ec, size_t) {
        read_ec_ = ec;
        read_done_ = true;
      });
    });
  }

  void drop() {
    if (conn_) {
      conn_->close();
      // Let the cancelled handler run before the buffers it names go.
      ioc_.restart();
      ioc_.poll();
    }
    conn_.reset();
    parser_.reset();
    buf_.clear();
    reading_ = false;
    read_done_ = false;
    created_ = false;
  }

  // Opens the stream on the first member that takes it, from last_ + 1.
  Status reopen() {
    std::string tried;
    const size_t n = sh_->urls.size();
    for (size_t i = 0; i < n; ++i) {
      const size_t idx = (sh_->preferred.load() + i) % n;
      const auto& url = sh_->urls[idx];
      auto s = open_on(url);
      if (s) {
        sh_->preferred.store(idx);
        return {};
      }
      drop();
      if (s.error().code == Errc::not_found || s.error().code == Errc::invalid_argument) return s.error();
      tried += (tried.empty() ? "" : "; ") + url.host + ":" + url.port + ": " + s.error().message;
    }
    return unreachable("watch " + prefix_ + ": " + tried);
  }

  Status open_on(const http::Url& url) {
    conn_.emplace(ioc_);
    if (auto s = conn_->open(url, sh_->opts); !s) return s;
    json create{{"key", b64(prefix_.empty() ? std::string(1, '\0') : prefix_)}, {"range_end", b64(prefix_end(prefix_))}};
    const int64_t start = last_ > 0 || from_ > 0 ? last_ + 1 : 0;
    if (start > 0) create["start_revision"] = std::to_string(start);
    auto req = make_request(url, "/v3/watch", json{{"create_request", create}}.dump());
    parser_.emplace();
    parser_->body_limit(std::numeric_limits<std::uint64_t>::max());  // bounded per line below
    beast::error_code ec;
    conn_->tcp().expires_after(sh_->opts.request_timeout);
    conn_->with([&](auto& stream) {
      bhttp::async_write(stream, req, [&](beast::error_code e, size_t) {
        if (e) {
          ec = e;
          return;
        }
        bhttp::async_read_header(stream, buf_, *parser_, [&](beast::error_code e2, size_t) { ec = e2; });
      });
    });
    conn_->run();
    if (ec) return make_error(Errc::unavailable, "watch: " + ec.message(), true);
    if (parser_->get().result() != bhttp::status::ok) {
      return make_error(Errc::unavailable, "watch: HTTP " + std::to_string(parser_->get().result_int()), true);
    }
    // Until created arrives the deadline holds; then the stream may idle.
    while (!created_) {
      auto evs = drain_lines();
      if (!evs) return evs.error();
      if (created_) {
        pending_ = std::move(*evs);
        break;
      }
      conn_->with([&](auto& stream) {
        bhttp::async_read_some(stream, buf_, *parser_, [&](beast::error_code e, size_t) { ec = e; });
      });
      conn_->run();
      if (ec) return make_error(Errc::unavailable, "watch: " + ec.message(), true);
    }
    conn_->tcp().expires_never();
    return {};
  }

  // Parses every complete line in the body so far.
  Result<std::vector<WatchEvent>> drain_lines() {
    std::vector<WatchEvent> out = std::move(pending_);
    pending_.clear();
    if (!parser_) return out;
    std::string& body = parser_->get().body();
    size_t pos = 0;
    for (;;) {
      auto nl = body.find('\n', pos);
      if (nl == std::string::npos) break;
      auto line = std::string_view(body).substr(pos, nl - pos);
      pos = nl + 1;
      if (line.find_first_not_of(" \r\t") == std::string_view::npos) continue;
      auto s = take_message(line, out);
      if (!s) {
        body.erase(0, pos);
        return s.error();
      }
    }
    body.erase(0, pos);
    if (body.size() > kMaxWatchMessageBytes) {
      return make_error(Errc::too_large, "watch message over " + std::to_string(kMaxWatchMessageBytes) + " bytes");
    }
    if (parser_->is_done()) return make_error(Errc::unavailable, "watch stream ended", true);
    return out;
  }

  Status take_message(std::string_view line, std::vector<WatchEvent>& out) {
    auto j = json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.is_object()) return make_error(Errc::parse, "etcd sent a watch line that is not JSON");
    if (j.contains("error")) return grpc_error(j["error"], "watch");
    const json& r = j.value("result", json::object());
    if (r.value("created", false)) {
      created_ = true;
      if (last_ == 0 && from_ == 0) last_ = num(r.value("header", json::object()), "revision");
    }
    if (r.value("canceled", false)) {
      const int64_t compact = num(r, "compact_revision");
      if (compact > 0) {
        compacted_ = compact;
        return make_error(Errc::not_found, "watch " + prefix_ + ": revision " + std::to_string(last_ + 1) +
                                               " compacted; the oldest revision kept is " + std::to_string(compact));
      }
      return make_error(Errc::unavailable, "watch canceled by etcd: " + r.value("cancel_reason", std::string()),
                        true);
    }
    for (const auto& e : r.value("events", json::array())) {
      WatchEvent ev;
      ev.type = e.value("type", std::string("PUT")) == "DELETE" ? WatchEvent::Type::remove : WatchEvent::Type::put;
      auto kv = parse_kv(e.value("kv", json::object()));
      if (!kv) return kv.error();
      ev.kv = std::move(*kv);
      if (ev.kv.mod_revision <= last_) continue;  // already delivered before a reconnect
      out.push_back(std::move(ev));
    }
    if (!out.empty()) last_ = std::max(last_, out.back().kv.mod_revision);
    return {};
  }

  std::shared_ptr<Shared> sh_;
  std::string prefix_;
  int64_t from_;
  int64_t last_;
  int64_t compacted_ = 0;
  asio::io_context ioc_;
  std::optional<Conn> conn_;
  std::optional<bhttp::response_parser<bhttp::string_body>> parser_;
  beast::flat_buffer buf_;
  std::vector<WatchEvent> pending_;
  bool created_ = false;
  bool reading_ = false;
  bool read_done_ = false;
  beast::error_code read_ec_;
};

class EtcdCoordinator final : public Coordinator {
 public:
  explicit EtcdCoordinator(std::shared_ptr<Shared> sh) : sh_(std::move(sh)) {}
  std::string_view backend() const override { return "etcd"; }

  Result<Lease> grant_lease(std::chrono::seconds ttl) override {
    if (ttl.count() < 1 || ttl > std::chrono::hours(24 * 365)) {
      return make_error(Errc::invalid_argument, "lease TTL must be between 1s and a year");
    }
    // A grant retried elsewhere may leave an unused lease behind: it expires.
    auto r = call("/v3/lease/grant", json{{"TTL", std::to_string(ttl.count())}}, true);
    if (!r) return r.error();
    Lease l{num(*r, "ID"), std::chrono::seconds(num(*r, "TTL"))};
    if (l.id == 0) return make_error(Errc::unavailable, "etcd granted no lease: " + r->value("error", std::string()));
    return l;
  }

  Result<std::chrono::seconds> keep_alive(LeaseId id) override {
    auto r = call("/v3/lease/keepalive", json{{"ID", std::to_string(id)}}, true);
    if (!r) return r.error();
    // A stream endpoint: one {"result": ...} per request. A lease that is
    // gone answers with no TTL (zero), not an error.
    const json& res = r->value("result", json::object());
    if (r->contains("error")) return grpc_error((*r)["error"], "keep-alive");
    const int64_t ttl = num(res, "TTL");
    if (ttl <= 0) return make_error(Errc::not_found, "lease " + std::to_string(id) + " not found (expired or revoked)");
    return std::chrono::seconds(ttl);
  }

  Result<std::chrono::seconds> lease_ttl(LeaseId id) override {
    auto r = call("/v3/lease/timetolive", json{{"ID", std::to_string(id)}}, true);
    if (!r) return r.error();
    const int64_t ttl = num(*r, "TTL");  // -1 once expired
    if (ttl < 0) return make_error(Errc::not_found, "lease " + std::to_string(id) + " not found (expired or revoked)");
    return std::chrono::seconds(ttl);
  }

  Status revoke_lease(LeaseId id) override {
    auto r = call("/v3/lease/revoke", json{{"ID", std::to_string(id)}}, true);
    if (!r && r.error().code != Errc::not_found) return r.error();
    return {};
  }

  Result<std::optional<KeyValue>> get(const std::string& key) override {
    FLOTILLA_TRY_STATUS(validate_key(key));
    auto r = call("/v3/kv/range", json{{"key", b64(key)}}, true);
    if (!r) return r.error();
    const json& kvs = r->value("kvs", json::array());
    if (kvs.empty()) return std::optional<KeyValue>{};
    auto kv = parse_kv(kvs[0]);
    if (!kv) return kv.error();
    return std::optional<KeyValue>{std::move(*kv)};
  }

  Result<RangeResult> range(const std::string& prefix, size_t limit) override {
    if (prefix.size() > kMaxKeyBytes) return make_error(Errc::too_large, "range prefix too long");
    if (limit < 1 || limit > kMaxRangeLimit) {
      return make_error(Errc::invalid_argument, "range limit must be 1.." + std::to_string(kMaxRangeLimit));
    }
    auto r = call("/v3/kv/range",
                  json{{"key", b64(prefix.empty() ? std::string(1, '\0') : prefix)},
                       {"range_end", b64(prefix_end(prefix))},
                       {"limit", std::to_string(limit)}},
                  true);
    if (!r) return r.error();
    RangeResult out;
    for (const auto& j : r->value("kvs", json::array())) {
      auto kv = parse_kv(j);
      if (!kv) return kv.error();
      out.kvs.push_back(std::move(*kv));
    }
    out.more = r->value("more", false);
    out.revision = num(r->value("header", json::object()), "revision");
    return out;
  }

  Result<TxnResult> txn(const std::vector<Compare>& compares, const std::vector<Op>& ops) override {
    FLOTILLA_TRY_STATUS(validate_txn(compares, ops));
    json cmp = json::array();
    for (const auto& c : compares) {
      json j{{"key", b64(c.key)}, {"result", "EQUAL"}};
      switch (c.target) {
        case Compare::Target::create_revision: j["target"] = "CREATE"; j["create_revision"] = std::to_string(c.number); break;
        case Compare::Target::mod_revision: j["target"] = "MOD"; j["mod_revision"] = std::to_string(c.number); break;
        case Compare::Target::version: j["target"] = "VERSION"; j["version"] = std::to_string(c.number); break;
        case Compare::Target::lease: j["target"] = "LEASE"; j["lease"] = std::to_string(c.number); break;
        case Compare::Target::value: j["target"] = "VALUE"; j["value"] = b64(c.value); break;
      }
      cmp.push_back(std::move(j));
    }
    json success = json::array();
    for (const auto& o : ops) {
      if (o.kind == Op::Kind::put) {
        json p{{"key", b64(o.key)}, {"value", b64(o.value)}};
        if (o.lease != 0) p["lease"] = std::to_string(o.lease);
        success.push_back(json{{"request_put", std::move(p)}});
      } else {
        success.push_back(json{{"request_delete_range", json{{"key", b64(o.key)}}}});
      }
    }
    // A transaction that only compares is a read: safe to send elsewhere.
    auto r = call("/v3/kv/txn", json{{"compare", cmp}, {"success", success}}, ops.empty());
    if (!r) return r.error();
    return TxnResult{r->value("succeeded", false), num(r->value("header", json::object()), "revision")};
  }

  Result<std::unique_ptr<Watch>> watch(const std::string& prefix, int64_t from) override {
    if (prefix.size() > kMaxKeyBytes) return make_error(Errc::too_large, "watch prefix too long");
    if (from < 0) return make_error(Errc::invalid_argument, "negative watch revision");
    auto w = std::make_unique<EtcdWatch>(sh_, prefix, from);
    // Opened now so that from == 0 means "after this call returns"; a
    // compacted start is reported by next(), as on the other backend.
    if (auto s = w->start(); !s && w->compacted_at() == 0) return s.error();
    return std::unique_ptr<Watch>(std::move(w));
  }

 private:
  // POSTs body to every member in turn until one answers. `idempotent`: a
  // request whose answer was lost may be sent again to another member.
  Result<json> call(const std::string& path, const json& body, bool idempotent) {
    const std::string text = body.dump();
    std::string tried;
    const size_t n = sh_->urls.size();
    // A member that was just lost may have been the leader: the others need
    // an election (about a second) before they serve again. Rounds over every
    // member, with a short backoff, until the request deadline has passed.
    const auto give_up = std::chrono::steady_clock::now() + sh_->opts.request_timeout;
    for (int round = 0;; ++round) {
      tried.clear();
      for (size_t i = 0; i < n; ++i) {
        const size_t idx = (sh_->preferred.load() + i) % n;
        const auto& url = sh_->urls[idx];
        bool sent = false;
        auto r = once(url, path, text, sent);
        if (r) {
          sh_->preferred.store(idx);
          return r;
        }
        const Error& e = r.error();
        if (e.code != Errc::unavailable && e.code != Errc::timeout) return e;  // etcd's own answer
        tried += (tried.empty() ? "" : "; ") + url.host + ":" + url.port + ": " + e.message;
        // etcd answering "unavailable" (no leader) never applied the request.
        const bool answered = e.message.rfind(path + ":", 0) == 0;
        if (sent && !answered && !idempotent) {
          return make_error(Errc::coordination_unavailable,
                            "etcd unreachable: " + path + " was sent to " + url.host + ":" + url.port +
                                " but no answer came (" + e.message +
                                "); its outcome is unknown, re-read before retrying",
                            true);
        }
      }
      const auto backoff = std::chrono::milliseconds(100 * (round + 1));
      if (std::chrono::steady_clock::now() + backoff >= give_up) break;
      std::this_thread::sleep_for(backoff);
    }
    return unreachable(path + ": " + tried);
  }

  Result<json> once(const http::Url& url, const std::string& path, const std::string& body, bool& sent) {
    try {
      asio::io_context ioc;
      Conn conn(ioc);
      if (auto s = conn.open(url, sh_->opts); !s) return s.error();
      auto req = make_request(url, path, body);
      bhttp::response_parser<bhttp::string_body> parser;
      parser.body_limit(sh_->opts.max_response_bytes);
      beast::flat_buffer buf;
      beast::error_code ec;
      conn.tcp().expires_after(sh_->opts.request_timeout);
      conn.with([&](auto& stream) {
        bhttp::async_write(stream, req, [&](beast::error_code e, size_t) {
          if (e) {
            ec = e;
            return;
          }
          sent = true;
          bhttp::async_read(stream, buf, parser, [&](beast::error_code e2, size_t) { ec = e2; });
        });
      });
      conn.run();
      conn.close();
      // In TLS 1.3 a member that refuses this hub's client certificate says
      // so with an alert that arrives after the request was written, before
      // any answer: the TLS session never carried the request to etcd, so it
      // was not applied. Said as what it is, not as an outcome unknown.
      if (ec && ec.category() == asio::error::get_ssl_category() && !parser.is_header_done() &&
          ERR_GET_REASON(static_cast<unsigned long>(ec.value())) >= SSL_AD_REASON_OFFSET) {
        sent = false;
        return make_error(Errc::unavailable,
                          "etcd refused this hub's TLS session (" + ec.message() +
                              "): etcd-cert and etcd-key must be a client certificate from the CA in etcd's "
                              "--trusted-ca-file",
                          true);
      }
      if (ec == bhttp::error::body_limit) {
        return make_error(Errc::too_large, path + ": etcd's answer is over " +
                                               std::to_string(sh_->opts.max_response_bytes) + " bytes");
      }
      if (ec == beast::error::timeout) return make_error(Errc::timeout, "no answer in time", true);
      if (ec) return make_error(Errc::unavailable, ec.message(), true);
      auto j = json::parse(parser.get().body(), nullptr, false);
      if (j.is_discarded() || !j.is_object()) {
        return make_error(Errc::unavailable, "HTTP " + std::to_string(parser.get().result_int()) + " without JSON", true);
      }
      if (parser.get().result() != bhttp::status::ok) {
        auto e = grpc_error(j, path);
        // Unavailable (14), deadline (4), no leader: another member may serve.
        return e;
      }
      return j;
    } catch (const std::exception& e) {
      return make_error(Errc::unavailable, e.what(), true);
    }
  }

  std::shared_ptr<Shared> sh_;
};

}  // namespace

Result<std::unique_ptr<Coordinator>> open_etcd_coordinator(const EtcdOptions& opts) {
  if (opts.endpoints.empty()) return make_error(Errc::invalid_argument, "etcd needs at least one endpoint");
  if (opts.endpoints.size() > 16) return make_error(Errc::invalid_argument, "more than 16 etcd endpoints");
  auto sh = std::make_shared<Shared>();
  sh->opts = opts;
  bool any_tls = false;
  for (const auto& e : opts.endpoints) {
    auto u = http::parse_url(e);
    if (!u) return u.error().with_context("etcd endpoint");
    if (u->target != "/" && !u->target.empty()) {
      return make_error(Errc::invalid_argument, "etcd endpoint '" + e + "' must have no path");
    }
    any_tls = any_tls || u->scheme == "https";
    sh->urls.push_back(*u);
  }
  if (opts.cert_file.empty() != opts.key_file.empty()) {
    return make_error(Errc::invalid_argument, "etcd-cert and etcd-key go together");
  }
  if (!any_tls && (!opts.ca_file.empty() || !opts.cert_file.empty())) {
    return make_error(Errc::invalid_argument, "etcd TLS files are set but no endpoint is https://");
  }
  for (const auto* f : {&opts.ca_file, &opts.cert_file, &opts.key_file}) {
    if (!f->empty() && !std::ifstream(*f)) return make_error(Errc::invalid_argument, "cannot read etcd TLS file '" + *f + "'");
  }
  if (opts.request_timeout.count() <= 0 || opts.connect_timeout.count() <= 0) {
    return make_error(Errc::invalid_argument, "etcd timeouts must be positive");
  }
  return std::unique_ptr<Coordinator>(std::make_unique<EtcdCoordinator>(std::move(sh)));
}

}  // namespace flotilla::hub::coord

// The fleet run: enrollment at a controlled rate, MQTT sessions (direct or
// gateway), fault injection, a campaign driven over REST and the timeline.
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <fstream>
#include <functional>
#include <map>
#include <mutex>
#include <queue>
#include <set>
#include <thread>
#include <unordered_map>

#include "device.hpp"
#include "flotilla/bundles/bundle.hpp"
#include "flotilla/bundles/keys.hpp"
#include "flotilla/common/crypto.hpp"
#include "flotilla/common/fs.hpp"
#include "flotilla/common/http_client.hpp"
#include "flotilla/common/log.hpp"
#include "flotilla/common/process.hpp"
#include "flotilla/common/transport.hpp"
#include "flotilla/common/transport_loop.hpp"
#include "flotilla/common/x509.hpp"
#include "flotilla/v1/enroll.pb.h"
#include "flotilla/v1/report.pb.h"
#include "sim_internal.hpp"

namespace flotilla::sim {

using nlohmann::json;
using Ms = std::chrono::milliseconds;

int64_t now_ms() {
  return std::chrono::duration_cast<Ms>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

bundles::KeyPair seeded_key(const std::string& purpose, uint64_t seed, uint32_t index) {
  const auto h = crypto::sha256("flotilla-sim/" + purpose + "/" + std::to_string(seed) + "/" + std::to_string(index));
  auto k = bundles::key_from_seed(Bytes(h.begin(), h.end()));
  return k ? *k : bundles::generate_key();
}

std::string device_id_for(const bundles::KeyPair& k) {
  return "d-" + crypto::sha256_hex(std::string_view(reinterpret_cast<const char*>(k.pub.key.data()), k.pub.key.size()))
                    .substr(0, 20);
}

// --- REST ----------------------------------------------------------------------

Result<http::Response> Rest::call(const std::string& method, const std::string& path, const std::string& body,
                                  const std::string& content_type) const {
  http::Request r;
  r.method = method;
  r.url = url + path;
  r.body = body;
  if (!body.empty()) r.headers["Content-Type"] = content_type;
  if (!token.empty()) r.headers["Authorization"] = "Bearer " + token;
  r.timeout = std::chrono::seconds(60);
  r.max_response_bytes = 64u << 20;
  // Reads the hub asks to repeat (503/429 with Retry-After) are repeated
  // for a while; writes are the caller's to re-read and retry.
  return http::send_retrying(r, {});
}

Result<json> Rest::call_json(const std::string& method, const std::string& path, const json& body,
                             int want_status) const {
  const std::string text = body.is_null() ? "" : body.dump();
  return json_of(method == "GET" || method == "HEAD" ? call(method, path, text) : write(method, path, text, "application/json"),
                 method + " " + path, want_status);
}

Result<json> Rest::json_of(Result<http::Response> r, const std::string& what, int want_status) {
  if (!r) return r.error().with_context(what);
  if (r->status != want_status) {
    return make_error(Errc::unavailable,
                      what + ": HTTP " + std::to_string(r->status) + ": " + r->body.substr(0, 400));
  }
  auto j = json::parse(r->body, nullptr, false);
  if (j.is_discarded()) return make_error(Errc::internal, what + ": answer is not JSON");
  return j;
}

Result<http::Response> Rest::write(const std::string& method, const std::string& path, const std::string& body,
                                   const std::string& content_type,
                                   const std::function<std::optional<http::Response>()>& taken) const {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  for (;;) {
    auto r = call(method, path, body, content_type);
    if (!r || (r->status != 503 && r->status != 429) || std::chrono::steady_clock::now() >= deadline) return r;
    const int64_t wait_s = std::clamp<int64_t>(http::retry_after_seconds(*r).value_or(1), 1, 5);
    std::fprintf(stderr, "hub answered %d to %s %s: %s; again in %llds\n", r->status, method.c_str(), path.c_str(),
                 r->body.substr(0, 200).c_str(), static_cast<long long>(wait_s));
    std::this_thread::sleep_for(std::chrono::seconds(wait_s));
    if (taken) {
      if (auto t = taken()) return std::move(*t);
    }
  }
}

bool publish_retrying(transport::Transport& t, const transport::Message& m) {
  for (int attempt = 0; attempt < 50; ++attempt) {
    if (t.publish(m)) return true;
    std::this_thread::sleep_for(Ms(20));
  }
  return false;
}

// The fault profile as the report and a worker's spec carry it (to_json and
// from_json, keyed by the member names).
NLOHMANN_DEFINE_TYPE_NON_INTRUSIVE(FaultProfile, offline, flaky, install_fail, health_fail, reboot_mid_apply,
                                   download_kbps, clock_skew_s)

// --- the running fleet -----------------------------------------------------------

namespace {

// announce: the device says it is online and reports its state again (after
// its session came back, or at the hub's roll call).
enum class EventKind : uint8_t { desired, link_back, reboot, announce };
struct Event {
  uint32_t device = 0;
  EventKind kind = EventKind::desired;
  std::string payload;
};

struct WorkQueue {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<Event> q;
};

// A gateway session's reports not sent yet (batching, see
// SimOptions::gateway_flush_ms). send_mu keeps the session's batches in order.
struct ReportBatch {
  std::mutex send_mu;
  std::mutex mu;
  v1::GatewayReports pending;
};
constexpr int kMaxReportsPerBatch = 1000;  // the hub's limit (HubService::kMaxGatewayReports)

struct Timed {
  int64_t due = 0;
  uint64_t order = 0;
  Event ev;
  bool operator>(const Timed& o) const { return due != o.due ? due > o.due : order > o.order; }
};

// Runs fn(0..count-1) on `threads` threads; stops handing out work at the
// first failure and returns it.
Status for_each_parallel(size_t count, uint32_t threads, const std::function<Status(size_t)>& fn) {
  std::atomic<size_t> next{0};
  std::atomic<bool> failed{false};
  std::mutex err_mu;
  Error first_error{Errc::internal, ""};
  auto run = [&] {
    for (;;) {
      const size_t i = next.fetch_add(1);
      if (i >= count || failed) return;
      if (auto st = fn(i); !st) {
        std::lock_guard lock(err_mu);
        if (!failed.exchange(true)) first_error = st.error();
        return;
      }
    }
  };
  std::vector<std::thread> ts;
  for (uint32_t t = 0; t < std::max<uint32_t>(1, threads); ++t) ts.emplace_back(run);
  for (auto& t : ts) t.join();
  if (failed) return first_error;
  return {};
}

// A worker process of a multi-process direct run, as its driver sees it.
struct WorkerProc {
  proc::Child child;
  std::filesystem::path dir;
  json status;  // its last status.json
};

class Fleet {
 public:
  // A fleet runs devices [first, first + count) of opts.devices: all of
  // them, or a worker's share.
  Fleet(const SimOptions& opts, Rest rest, uint32_t first = 0, uint32_t count = UINT32_MAX)
      : opts_(opts), rest_(std::move(rest)), first_(first), count_(std::min(count, opts.devices - first)) {}
  ~Fleet() { shutdown(); }

  Result<json> run();
  Status run_as_worker(const std::string& enroll_token, const std::filesystem::path& dir);

 private:
  // setup
  void init_core();
  void start_threads();
  bool multi() const { return opts_.mode == Mode::direct && opts_.processes > 1; }
  Status start_workers();
  Status wait_workers_online();
  void read_worker_statuses();
  void stop_workers();
  json worker_status(const std::string& state, const std::string& error, bool final_status);
  std::array<uint64_t, kPhases> phase_counts() const;
  Status prepare_devices();
  Status create_token();
  Status enroll_gateways();
  Status enroll_devices();
  Result<std::string> post_enrollment(const std::string& path, const std::function<std::string()>& body,
                                      const std::string& what);
  // with_csr: the identity has its own broker session (a direct device, a
  // gateway) and asks the hub's device CA for its client certificate.
  v1::EnrollRequest enroll_request(const bundles::KeyPair& key, const std::string& hostname,
                                   const std::string& token, bool with_csr = false) const;
  Result<std::string> enroll_one(const bundles::KeyPair& key, const std::string& hostname,
                                 const bundles::KeyPair* gateway_key, const std::string& gateway_id,
                                 v1::EnrollResponse& resp, const std::string& token);
  Status enroll_batch(uint32_t first, uint32_t count);
  // Connects session s as the identity `key` enrolled with `resp`: by its
  // client certificate (written beside the run) or, from a hub in
  // development mode, by its password.
  Status connect_session(uint32_t s, const bundles::KeyPair& key, const v1::EnrollResponse& resp,
                         const std::string& will_topic, std::function<void(transport::Message&&)> on_msg);
  void device_online(VDevice& d);
  // Sessions that dropped (a broker restart) connect again with jittered
  // backoff and re-announce their devices, as the real agent does.
  void supervisor();
  void on_rollcall(uint32_t s, const std::string& payload);
  void announce_session(uint32_t s);
  Result<std::string> push_bundle();
  Status wait_seen_online();
  Result<json> serve();
  // running
  void worker(uint32_t w);
  void timer();
  void post(Event&& e);
  void post_after(int64_t delay_ms, Event&& e);
  void handle(Event& e);
  void apply(VDevice& d, const std::string& payload);
  void publish(VDevice& d, const char* leaf, std::string payload, bool retained);
  bool publish_on(transport::Transport& t, const transport::Message& m);
  bool batching() const { return opts_.mode == Mode::gateway && opts_.gateway_flush_ms > 0; }
  void queue_report(const VDevice& d, v1::Report&& r);
  void flush_reports(uint32_t session, bool only_if_full);
  void flusher();
  agent::Agent::Reporter reporter(VDevice& d);
  void presence(VDevice& d, bool online);
  transport::Transport* session(uint32_t s) {
    std::lock_guard lock(sessions_mu_);
    return sessions_[s].get();
  }
  transport::Transport* session_of(const VDevice& d) {
    const uint32_t s = opts_.mode == Mode::direct ? d.index : d.session;
    return s < sessions_.size() ? sessions_[s].get() : nullptr;
  }
  std::string gateway_of(const VDevice& d) const {
    return opts_.mode == Mode::gateway ? gateway_ids_[d.session] : std::string();
  }
  json sample(int64_t t0, const std::string& campaign_id, json& last_campaign, bool poll_hub);
  void progress_line(const json& s, int64_t elapsed_ms, bool final_line);
  void shutdown();

  const SimOptions& opts_;
  Rest rest_;
  const uint32_t first_, count_;
  std::vector<WorkerProc> workers_;
  CoreEnv env_;
  bundles::KeyPair release_;
  std::string enroll_token_;
  std::string gateway_token_;
  std::string label_;
  std::mutex url_mu_;
  std::string broker_url_;  // as the hub tells enrolling devices; all the same
  std::string ca_file_;     // the broker CAs the hub named, written once (url_mu_)
  void set_broker_url(const std::string& u) {
    std::lock_guard lock(url_mu_);
    broker_url_ = u;
  }
  std::vector<VDevice> devices_;
  std::unordered_map<std::string, uint32_t> by_id_;
  // Sessions whose connection Paho reported lost (its callback thread), for
  // the supervisor to take; lost_mu_ is never held while calling Paho.
  std::mutex lost_mu_;
  std::set<uint32_t> lost_;  // declared before sessions_: it outlives their callbacks
  // The thread all sessions of the process share (MqttClient::loop), made
  // with the first; declared before sessions_, which hold it too.
  std::mutex loop_mu_;
  std::shared_ptr<transport::SessionLoop> loop_;
  std::shared_ptr<transport::SessionLoop> session_loop() {
    std::lock_guard lock(loop_mu_);
    if (!loop_) loop_ = transport::make_session_loop();
    return loop_;
  }
  std::vector<std::unique_ptr<transport::Transport>> sessions_;
  std::vector<std::string> gateway_ids_;
  std::vector<bundles::KeyPair> gateway_keys_;
  std::vector<std::unique_ptr<ReportBatch>> batches_;  // per gateway session, when batching()
  std::mutex flush_mu_;
  std::condition_variable flush_cv_;
  std::mutex sessions_mu_;
  // Per session (sessions_mu_): how it connects and what it subscribes to,
  // kept to connect again; whether it should be connected; the roll call it
  // last answered and when its announcement is due (0 = none).
  struct SessionState {
    transport::ConnectOptions co;
    std::vector<std::string> topics;
    bool wanted = false;
    uint64_t rollcall = 0;
    int64_t announce_due_ms = 0;
    int64_t next_try_ms = 0;
    uint32_t attempts = 0;
  };
  std::vector<SessionState> session_state_;
  std::atomic<uint64_t> reconnects_{0}, rollcalls_answered_{0};

  std::vector<std::unique_ptr<WorkQueue>> queues_;
  std::vector<std::thread> threads_;
  std::mutex timer_mu_;
  std::condition_variable timer_cv_;
  std::priority_queue<Timed, std::vector<Timed>, std::greater<>> timers_;
  uint64_t timer_order_ = 0;
  std::atomic<bool> stopping_{false};

  std::string campaign_id_;
  std::atomic<bool> campaign_known_{false};
  int64_t t0_ = 0;
  std::atomic<uint64_t> sent_{0}, received_{0}, publish_errors_{0}, power_cuts_{0}, link_drops_{0};
  std::mutex lat_mu_;
  std::vector<int64_t> latencies_ms_;
  // Read by a worker's status thread while the enrolling thread writes them.
  std::atomic<int64_t> enroll_started_ms_{0}, enroll_done_ms_{0};
  uint64_t artifact_fetches_ = 0;
};

std::mutex g_artifact_mu;
std::map<std::string, Shared> g_artifacts;
std::atomic<uint64_t> g_artifact_downloads{0};

// The real download, once per URL per process; every device shares the bytes.
Result<Shared> fetch_artifact(const std::string& url, uint64_t max_bytes) {
  std::lock_guard lock(g_artifact_mu);
  if (auto it = g_artifacts.find(url); it != g_artifacts.end()) return it->second;
  http::Request r;
  r.url = url;
  r.timeout = std::chrono::seconds(60);
  r.max_response_bytes = static_cast<size_t>(max_bytes + 1);
  auto resp = http::send(r);
  if (!resp) return resp.error();
  if (resp->status != 200) return make_error(Errc::unavailable, "GET " + url + ": HTTP " + std::to_string(resp->status));
  ++g_artifact_downloads;
  auto s = intern(resp->body);
  g_artifacts[url] = s;
  return s;
}

Status Fleet::prepare_devices() {
  devices_ = std::vector<VDevice>(opts_.devices);
  by_id_.reserve(opts_.devices);
  for (uint32_t i = 0; i < opts_.devices; ++i) {
    auto& d = devices_[i];
    d.index = i;
    d.id = device_id_for(seeded_key("device", opts_.seed, i));
    const auto f = assign_faults(opts_.seed, i, opts_.faults);
    d.faults = f.bits;
    d.skew_s = f.skew_s;
    d.session = opts_.mode == Mode::gateway ? i / std::max<uint32_t>(1, opts_.devices_per_gateway) : i;
    by_id_.emplace(d.id, i);
  }
  return {};
}

Status Fleet::create_token() {
  // Devices and gateways get their labels from their tokens, so the
  // campaign's selector (sim-run=<label>) never picks a gateway.
  // Tokens allow one use by default: ask for exactly the uses this run needs.
  const uint32_t per = std::max<uint32_t>(1, opts_.devices_per_gateway);
  const uint32_t gateways = opts_.mode == Mode::gateway ? (opts_.devices + per - 1) / per : 0;
  for (auto [name, key, into, uses] : {std::tuple{"devices", "sim-run", &enroll_token_, opts_.devices},
                                       std::tuple{"gateways", "sim-gateway", &gateway_token_, gateways}}) {
    json body = {{"name", "flotilla-sim " + std::string(name) + " " + label_}, {"labels", {{key, label_}}},
                 {"ttl", "24h"}, {"max_uses", std::max<uint32_t>(1, uses)}};
    auto j = rest_.call_json("POST", "/v1/enrollment-tokens", body, 201);
    if (!j) return j.error().with_context("create an enrollment token (the API token needs the operator role)");
    *into = (*j)["token"].get<std::string>();
  }
  return {};
}

// POSTs an enrollment, retrying while the hub is not ready (503) or busy (429).
// The body is signed afresh for each attempt, as the agent does: an attempt
// whose answer was lost may have been taken, and the same signed request
// again would be refused as a replay.
Result<std::string> Fleet::post_enrollment(const std::string& path, const std::function<std::string()>& body,
                                           const std::string& what) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  for (int attempt = 0;; ++attempt) {
    auto r = rest_.call("POST", path, body(), "application/x-protobuf");
    if (r && r->status == 200) return std::move(r->body);
    const bool retry = !r || r->status == 503 || r->status == 429;
    if (!retry || std::chrono::steady_clock::now() > deadline) {
      return make_error(Errc::unavailable, "enroll " + what + ": " +
                                               (r ? "HTTP " + std::to_string(r->status) + " " + r->body.substr(0, 300)
                                                  : r.error().message));
    }
    std::this_thread::sleep_for(Ms(std::min(2000, 50 << std::min(attempt, 5))));
  }
}

v1::EnrollRequest Fleet::enroll_request(const bundles::KeyPair& key, const std::string& hostname,
                                        const std::string& token, bool with_csr) const {
  v1::EnrollRequest req;
  req.set_device_public_key(std::string(key.pub.key.begin(), key.pub.key.end()));
  req.set_hostname(hostname);
  req.set_arch("amd64");
  req.set_agent_version(agent::kAgentVersion);
  // Timestamped like the agent's, so a rerun with the same seed (the same
  // device keys) enrolls them again instead of being refused as a replay.
  const auto issued = static_cast<uint64_t>(SystemClock::instance().now_unix_ms());
  req.set_issued_unix_ms(issued);
  const Bytes proof = bundles::sign_detached(key, bundles::enroll_proof_message(token, key.pub.key, issued));
  req.set_proof(std::string(proof.begin(), proof.end()));
  if (with_csr) {
    // Made once per identity and kept: the request is the same for every attempt.
    auto csr = x509::make_csr(key.secret, bundles::device_id_for_key(key.pub.key));
    if (csr) req.set_csr(std::move(*csr));
  }
  return req;
}

Result<std::string> Fleet::enroll_one(const bundles::KeyPair& key, const std::string& hostname,
                                      const bundles::KeyPair* gateway_key, const std::string& gateway_id,
                                      v1::EnrollResponse& resp, const std::string& token) {
  auto request = [&] {
    v1::EnrollRequest req = enroll_request(key, hostname, token, gateway_key == nullptr);
    req.set_enrollment_token(token);
    if (gateway_key) {
      req.set_gateway_id(gateway_id);
      const Bytes gp = bundles::sign_detached(*gateway_key, bundles::enroll_proof_message(token, key.pub.key));
      req.set_gateway_proof(std::string(gp.begin(), gp.end()));
    }
    return req.SerializeAsString();
  };
  auto body = post_enrollment("/v1/enroll", request, hostname);
  if (!body) return body.error();
  if (!resp.ParseFromString(*body)) return make_error(Errc::parse, "enroll " + hostname + ": answer does not parse");
  if (!env_.learn_director(resp.director_public_key())) {
    return make_error(Errc::refused, "enroll " + hostname + ": the hub named another director key than before");
  }
  return resp.device_id();
}

// Devices [first, first + count), all behind one gateway, in one request.
Status Fleet::enroll_batch(uint32_t first, uint32_t count) {
  const uint32_t g = devices_[first].session;
  auto request = [&] {
    v1::EnrollBatchRequest req;
    req.set_enrollment_token(enroll_token_);
    req.set_gateway_id(gateway_ids_[g]);
    std::vector<std::string> keys;
    keys.reserve(count);
    for (uint32_t i = first; i < first + count; ++i) {
      *req.add_devices() =
          enroll_request(seeded_key("device", opts_.seed, i), "sim-" + std::to_string(i), enroll_token_);
      keys.push_back(req.devices().rbegin()->device_public_key());
    }
    const Bytes gp = bundles::sign_detached(
        gateway_keys_[g], bundles::enroll_batch_proof_message(enroll_token_, gateway_ids_[g], keys));
    req.set_gateway_proof(std::string(gp.begin(), gp.end()));
    return req.SerializeAsString();
  };
  const std::string what = "sim-" + std::to_string(first) + "..sim-" + std::to_string(first + count - 1);
  auto body = post_enrollment("/v1/enroll/batch", request, what);
  if (!body) return body.error();
  v1::EnrollBatchResponse resp;
  if (!resp.ParseFromString(*body) || resp.results_size() != static_cast<int>(count)) {
    return make_error(Errc::parse, "enroll " + what + ": the answer is not one result per device");
  }
  for (uint32_t k = 0; k < count; ++k) {
    const auto& r = resp.results(static_cast<int>(k));
    const auto& d = devices_[first + k];
    if (!r.has_enrolled()) {
      return make_error(Errc::refused, "enroll sim-" + std::to_string(first + k) + ": " + r.error_code() + ": " +
                                           r.error_message());
    }
    if (r.enrolled().device_id() != d.id) {
      return make_error(Errc::internal, "hub gave device id " + r.enrolled().device_id() + ", expected " + d.id);
    }
    if (!env_.learn_director(r.enrolled().director_public_key())) {
      return make_error(Errc::refused, "enroll " + what + ": the hub named another director key than before");
    }
  }
  return {};
}

Status Fleet::connect_session(uint32_t s, const bundles::KeyPair& key, const v1::EnrollResponse& resp,
                              const std::string& will_topic, std::function<void(transport::Message&&)> on_msg) {
  auto t = opts_.mqtt_client == MqttClient::paho ? transport::make_paho_transport()
                                                 : transport::make_loop_transport(session_loop());
  t->on_message(std::move(on_msg));
  // The supervisor reconnects the sessions named here, not by asking every
  // session whether it is connected.
  t->on_connection_lost([this, s](const std::string&) {
    std::lock_guard lock(lost_mu_);
    lost_.insert(s);
  });
  transport::ConnectOptions co;
  co.url = resp.broker_url();
  co.client_id = resp.device_id();
  co.username = resp.mqtt_username().empty() ? resp.device_id() : resp.mqtt_username();
  co.password = resp.mqtt_password();
  if (!resp.client_certificate().empty()) {
    // Paho reads the certificate, its key and the CAs from files, as the
    // agent's do: one pair per identity under the run's directory.
    const auto dir = std::filesystem::path(opts_.work_dir) / "tls";
    std::error_code ec;
    std::filesystem::create_directories(dir, ec);
    const auto cert = dir / (resp.device_id() + ".pem"), keyf = dir / (resp.device_id() + ".key");
    if (auto st = fs::write_file_atomic(keyf, x509::ed25519_private_key_pem(key.secret), 0600); !st) return st;
    if (auto st = fs::write_file_atomic(cert, resp.client_certificate(), 0600); !st) return st;
    {
      std::lock_guard lock(url_mu_);
      if (ca_file_.empty()) {
        const auto ca = dir / "broker-ca.pem";
        if (auto st = fs::write_file_atomic(ca, resp.ca_certificates(), 0644); !st) return st;
        ca_file_ = ca.string();
      }
      co.ca_file = ca_file_;
    }
    co.cert_file = cert.string();
    co.key_file = keyf.string();
  }
  co.clean_session = false;
  co.keepalive_s = 60;
  co.max_inflight = opts_.mode == Mode::gateway ? gateway_window(sessions_.size()) : 16;
  // Paho C keeps one command queue for all sessions of a process and scans it
  // for every command it sends: with hundreds of thousands of reports queued
  // (a 1M-device run) the simulator spent its time in that scan, not in the
  // devices. Publishing waits while a session's in-flight window is full, so
  // the queue stays short and the broker's acknowledgements set the pace.
  co.max_pending = co.max_inflight;
  co.will = transport::Message{will_topic, v1::Presence().SerializeAsString(), 1, true};
  // A password from a hub in development mode reaches mosquitto by a reload
  // after the answer, so a refusal right after enrolling is retried for a
  // while, as the real agent does with its backoff.
  Status st;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  for (int attempt = 0;; ++attempt) {
    st = t->connect(co);
    if (st || std::chrono::steady_clock::now() > deadline) break;
    std::this_thread::sleep_for(Ms(std::min(2000, 50 << std::min(attempt, 6))));
  }
  if (!st) return st.error().with_context("session " + co.client_id);
  // Every device of a broker reads the hub's roll call; a hub older than
  // roll calls refuses it, which costs only the re-announcement.
  const std::string rollcall = transport::rollcall_topic(co.client_id);
  (void)t->subscribe(rollcall, 1);
  // A transport this one replaces is destroyed after the lock is let go:
  // destroying a loop transport waits for the loop thread, which may itself
  // be waiting for sessions_mu_ in on_rollcall.
  std::unique_ptr<transport::Transport> replaced;
  {
    std::lock_guard lock(sessions_mu_);
    replaced = std::exchange(sessions_[s], std::move(t));
    if (session_state_.size() < sessions_.size()) session_state_.resize(sessions_.size());
    session_state_[s].co = co;
    session_state_[s].topics = {rollcall};
    session_state_[s].wanted = true;
  }
  return {};
}

void Fleet::on_rollcall(uint32_t s, const std::string& payload) {
  v1::Rollcall rc;
  if (payload.size() > 64 || !rc.ParseFromString(payload)) return;
  std::lock_guard lock(sessions_mu_);
  if (s >= session_state_.size() || session_state_[s].rollcall == rc.id()) return;
  session_state_[s].rollcall = rc.id();
  const uint32_t spread = std::min(rc.spread_ms(), transport::kMaxRollcallSpreadMs);
  const int64_t delay = static_cast<int64_t>(unit(opts_.seed ^ rc.id(), s, 11) * spread);
  session_state_[s].announce_due_ms = now_ms() + delay;
  rollcalls_answered_.fetch_add(1, std::memory_order_relaxed);
}

// The session is there again: the gateway itself first (its devices follow
// it), then each device of the session through its own worker.
void Fleet::announce_session(uint32_t s) {
  auto* t = session(s);
  if (!t || !t->connected()) return;
  if (opts_.mode == Mode::gateway) {
    v1::Presence p;
    p.set_online(true);
    p.set_agent_version(agent::kAgentVersion);
    (void)publish_on(*t, {transport::device_topic(gateway_ids_[s], "presence"), p.SerializeAsString(), 1, true});
    const uint32_t per = std::max<uint32_t>(1, opts_.devices_per_gateway);
    const uint32_t from = std::max(first_, s * per), to = std::min(first_ + count_, (s + 1) * per);
    for (uint32_t i = from; i < to; ++i) post(Event{i, EventKind::announce, {}});
  } else if (s >= first_ && s < first_ + count_) {
    post(Event{s, EventKind::announce, {}});
  }
}

void Fleet::supervisor() {
  // Sessions lost and not connected again yet (this thread's own). Only
  // they are asked whether they are connected: asking every session ten
  // times a second, under Paho's lock and the sessions' lock, took 6 % of
  // the machine at 16,000 sessions, and more with every session.
  std::set<uint32_t> down;
  while (!stopping_) {
    std::this_thread::sleep_for(Ms(100));
    {
      std::lock_guard lock(lost_mu_);
      down.merge(lost_);
    }
    std::vector<uint32_t> reconnect, announce;
    {
      std::lock_guard lock(sessions_mu_);
      const int64_t now = now_ms();
      for (auto it = down.begin(); it != down.end();) {
        const uint32_t s = *it;
        if (s >= session_state_.size() || s >= sessions_.size() || !sessions_[s]) {
          ++it;  // lost before it was kept: taken once it is
        } else if (!session_state_[s].wanted || sessions_[s]->connected()) {
          it = down.erase(it);
        } else {
          if (now >= session_state_[s].next_try_ms) reconnect.push_back(s);
          ++it;
        }
      }
      for (uint32_t s = 0; s < session_state_.size() && s < sessions_.size(); ++s) {
        auto& st = session_state_[s];
        if (st.announce_due_ms != 0 && now >= st.announce_due_ms && st.wanted && sessions_[s] && !down.count(s)) {
          st.announce_due_ms = 0;
          announce.push_back(s);
        }
      }
    }
    for (uint32_t s : announce) announce_session(s);
    // Reconnects run here one at a time: a broker that just came back sees
    // the fleet return spread by each session's jittered backoff.
    for (uint32_t s : reconnect) {
      if (stopping_) return;
      transport::Transport* t = nullptr;
      transport::ConnectOptions co;
      std::vector<std::string> topics;
      {
        std::lock_guard lock(sessions_mu_);
        t = sessions_[s].get();
        co = session_state_[s].co;
        co.timeout = Ms(3000);
        topics = session_state_[s].topics;
      }
      Status st = t->connect(co);
      for (const auto& topic : topics) {
        if (st) st = t->subscribe(topic, 1);
      }
      std::lock_guard lock(sessions_mu_);
      auto& ss = session_state_[s];
      if (st) {
        ss.attempts = 0;
        ss.announce_due_ms = now_ms();  // re-announce at once
        reconnects_.fetch_add(1, std::memory_order_relaxed);
        down.erase(s);
      } else {
        // Full jitter, 200 ms doubling to 10 s.
        const int64_t cap = std::min<int64_t>(10000, int64_t{200} << std::min<uint32_t>(ss.attempts, 6));
        ++ss.attempts;
        ss.next_try_ms = now_ms() + static_cast<int64_t>(unit(opts_.seed + ss.attempts, s, 13) * cap);
      }
    }
  }
}

// Gateways connect in parallel: Paho C takes up to a poll round (1 s) to
// notice each new socket, so 200 gateways one after another cost minutes.
Status Fleet::enroll_gateways() {
  const uint32_t per = std::max<uint32_t>(1, opts_.devices_per_gateway);
  const uint32_t n = (opts_.devices + per - 1) / per;
  sessions_.resize(n);
  session_state_.resize(n);
  gateway_ids_.resize(n);
  if (batching()) {
    for (uint32_t g = 0; g < n; ++g) batches_.push_back(std::make_unique<ReportBatch>());
    threads_.emplace_back([this] { flusher(); });
  }
  for (uint32_t g = 0; g < n; ++g) gateway_keys_.push_back(seeded_key("gateway", opts_.seed, g));
  return for_each_parallel(n, std::max<uint32_t>(16, opts_.enroll_threads), [&](size_t g) -> Status {
    v1::EnrollResponse resp;
    auto id = enroll_one(gateway_keys_[g], "sim-gateway-" + std::to_string(g), nullptr, "", resp, gateway_token_);
    if (!id) return id.error();
    gateway_ids_[g] = *id;
    set_broker_url(resp.broker_url());
    const auto sg = static_cast<uint32_t>(g);
    auto on_msg = [this, sg](transport::Message&& m) {
      received_.fetch_add(1, std::memory_order_relaxed);
      if (transport::is_rollcall_topic(m.topic)) return on_rollcall(sg, m.payload);
      const std::string dev = transport::parse_device_topic(m.topic, nullptr, nullptr);
      auto it = by_id_.find(dev);
      if (it == by_id_.end()) return;
      post(Event{it->second, EventKind::desired, std::move(m.payload)});
    };
    if (auto s = connect_session(sg, gateway_keys_[g], resp, transport::device_topic(*id, "presence"), on_msg);
        !s) {
      return s;
    }
    auto* t = session(sg);
    if (auto s = t->subscribe(transport::gateway_prefix(*id) + "+/desired", 1); !s) {
      return s.error().with_context("gateway subscribe");
    }
    {
      std::lock_guard lock(sessions_mu_);
      session_state_[sg].topics.push_back(transport::gateway_prefix(*id) + "+/desired");
    }
    // The gateway itself is online; its will marks every device behind it offline.
    v1::Presence p;
    p.set_online(true);
    p.set_agent_version(agent::kAgentVersion);
    (void)t->publish({transport::device_topic(*id, "presence"), p.SerializeAsString(), 1, true});
    return {};
  });
}

void Fleet::presence(VDevice& d, bool online) {
  v1::Presence p;
  p.set_online(online);
  p.set_agent_version(agent::kAgentVersion);
  publish(d, "presence", p.SerializeAsString(), true);
}

void Fleet::publish(VDevice& d, const char* leaf, std::string payload, bool retained) {
  auto* t = session_of(d);
  if (!t) return;
  // Presence goes on its own topic: what the gateway gathered for this
  // device goes first, so the hub sees the device's messages in order.
  if (batching()) flush_reports(d.session, false);
  (void)publish_on(*t, {transport::device_topic(d.id, gateway_of(d), leaf), std::move(payload), 1, retained});
}

bool Fleet::publish_on(transport::Transport& t, const transport::Message& m) {
  const bool ok = publish_retrying(t, m);
  (ok ? sent_ : publish_errors_).fetch_add(1, std::memory_order_relaxed);
  return ok;
}

void Fleet::queue_report(const VDevice& d, v1::Report&& r) {
  auto& b = *batches_[d.session];
  bool full = false;
  {
    std::lock_guard lock(b.mu);
    b.pending.add_reports()->Swap(&r);
    full = b.pending.reports_size() >= kMaxReportsPerBatch;
  }
  if (full) flush_reports(d.session, true);
}

// Sends what session s has gathered as one GatewayReports message.
void Fleet::flush_reports(uint32_t s, bool only_if_full) {
  auto& b = *batches_[s];
  std::lock_guard send_lock(b.send_mu);
  v1::GatewayReports out;
  {
    std::lock_guard lock(b.mu);
    if (b.pending.reports_size() == 0) return;
    if (only_if_full && b.pending.reports_size() < kMaxReportsPerBatch) return;  // another flush took them
    out.Swap(&b.pending);
  }
  auto* t = session(s);
  if (!t) return;
  (void)publish_on(*t, {transport::gateway_reports_topic(gateway_ids_[s]), out.SerializeAsString(), 1, false});
}

void Fleet::flusher() {
  std::unique_lock lock(flush_mu_);
  while (!stopping_) {
    flush_cv_.wait_for(lock, Ms(opts_.gateway_flush_ms));
    if (stopping_) return;
    lock.unlock();
    for (uint32_t s = 0; s < batches_.size() && !stopping_; ++s) flush_reports(s, false);
    lock.lock();
  }
}

agent::Agent::Reporter Fleet::reporter(VDevice& d) {
  return [this, &d](v1::Report&& r) {
    const auto st = r.state();
    // Devices apply before POST /v1/campaigns has even answered, so until the
    // id is known any campaign counts (a run drives exactly one).
    const bool ours = !r.campaign_id().empty() && (!campaign_known_ || r.campaign_id() == campaign_id_);
    if (ours && st != v1::AGENT_STATE_IDLE) {
      Phase p = Phase::applying;
      bool final_state = true;
      switch (st) {
        case v1::AGENT_STATE_APPLIED: p = Phase::applied; break;
        case v1::AGENT_STATE_FAILED:
        case v1::AGENT_STATE_REFUSED: p = Phase::failed; break;
        case v1::AGENT_STATE_ROLLED_BACK: p = Phase::rolled_back; break;
        default: final_state = false;
      }
      d.phase = static_cast<uint8_t>(p);
      if (final_state && d.done_ms == 0) {
        d.done_ms = now_ms();
        std::lock_guard lock(lat_mu_);
        latencies_ms_.push_back(d.done_ms - t0_);
      }
    }
    if (batching()) {
      queue_report(d, std::move(r));
    } else {
      publish(d, "report", r.SerializeAsString(), false);
    }
  };
}

void Fleet::device_online(VDevice& d) {
  presence(d, true);
  with_agent(d, env_, reporter(d), [](agent::Agent& a) { a.report_inventory(); });
  d.phase = static_cast<uint8_t>(Phase::online);
  if (d.faults & kOffline) {
    // It was seen once and then went away (powered off, out of coverage).
    presence(d, false);
    d.phase = static_cast<uint8_t>(Phase::offline);
    if (opts_.mode == Mode::direct) {
      {
        std::lock_guard lock(sessions_mu_);
        if (d.index < session_state_.size()) session_state_[d.index].wanted = false;
      }
      if (auto* t = session_of(d)) {
        (void)t->flush(Ms(2000));
        t->disconnect();
      }
    }
  }
}

Status Fleet::enroll_devices() {
  enroll_started_ms_ = now_ms();
  const bool gw = opts_.mode == Mode::gateway;
  if (!gw) {
    sessions_.resize(opts_.devices);
    session_state_.resize(opts_.devices);
  }
  // The units of work: one device each, or in gateway mode batches that
  // never straddle two gateways.
  struct Unit {
    uint32_t first, count;
  };
  std::vector<Unit> units;
  const double rate = opts_.enroll_rate;
  uint32_t batch = gw ? std::max<uint32_t>(1, opts_.enroll_batch) : 1;
  // At a controlled rate a batch holds at most 50 ms worth of devices.
  if (rate > 0) batch = std::min(batch, std::max<uint32_t>(1, static_cast<uint32_t>(rate / 20)));
  const uint32_t end = first_ + count_;
  for (uint32_t i = first_; i < end;) {
    uint32_t n = std::min(batch, end - i);
    if (gw) {
      const uint32_t per = std::max<uint32_t>(1, opts_.devices_per_gateway);
      n = std::min(n, (i / per + 1) * per - i);
    }
    units.push_back({i, n});
    i += n;
  }
  auto enroll_single = [&](uint32_t i) -> Status {
    auto& d = devices_[i];
    const auto key = seeded_key("device", opts_.seed, i);
    v1::EnrollResponse resp;
    auto id = enroll_one(key, "sim-" + std::to_string(i), gw ? &gateway_keys_[d.session] : nullptr,
                         gw ? gateway_ids_[d.session] : "", resp, enroll_token_);
    if (!id) return id.error();
    if (*id != d.id) return make_error(Errc::internal, "hub gave device id " + *id + ", expected " + d.id);
    if (gw) return {};
    auto on_msg = [this, i](transport::Message&& m) {
      received_.fetch_add(1, std::memory_order_relaxed);
      if (transport::is_rollcall_topic(m.topic)) return on_rollcall(i, m.payload);
      post(Event{i, EventKind::desired, std::move(m.payload)});
    };
    set_broker_url(resp.broker_url());
    if (auto st = connect_session(i, key, resp, transport::device_topic(d.id, "presence"), on_msg);
        !st) {
      return st;
    }
    if (auto st = session(i)->subscribe(transport::device_topic(d.id, "desired"), 1); !st) return st;
    std::lock_guard lock(sessions_mu_);
    session_state_[i].topics.push_back(transport::device_topic(d.id, "desired"));
    return {};
  };
  const Status st = for_each_parallel(units.size(), opts_.enroll_threads, [&](size_t u) -> Status {
    const Unit unit = units[u];
    if (rate > 0) {
      // Device i may start at t0 + i/rate: a steady, controlled rate. A
      // batch goes when its last device may.
      const uint32_t last = unit.first + unit.count - 1;
      const int64_t due = enroll_started_ms_ + static_cast<int64_t>(1000.0 * (last - first_) / rate);
      const int64_t wait = due - now_ms();
      if (wait > 0) std::this_thread::sleep_for(Ms(wait));
    }
    Status done = unit.count == 1 && batch == 1 ? enroll_single(unit.first) : enroll_batch(unit.first, unit.count);
    if (!done) return done;
    for (uint32_t i = unit.first; i < unit.first + unit.count; ++i) device_online(devices_[i]);
    return {};
  });
  enroll_done_ms_ = now_ms();
  return st;
}

// The campaign judges devices online or offline when it releases them, so it
// starts only once the hub has processed the devices' presence: the last
// devices to come online (up to 50) must show online in GET /v1/devices/{id}.
Status Fleet::wait_seen_online() {
  std::vector<const VDevice*> probe;
  for (auto it = devices_.rbegin(); it != devices_.rend() && probe.size() < 50; ++it) {
    if (!(it->faults & kOffline)) probe.push_back(&*it);
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120 + opts_.devices / 1000);
  for (const auto* d : probe) {
    for (;;) {
      auto j = rest_.call_json("GET", "/v1/devices/" + d->id, nullptr, 200);
      if (j && j->value("online", false) && j->value("state", "") == "idle") break;
      if (std::chrono::steady_clock::now() > deadline) {
        return make_error(Errc::timeout, "the hub has not seen device " + d->id + " online");
      }
      std::this_thread::sleep_for(Ms(100));
    }
  }
  return {};
}

Result<std::string> Fleet::push_bundle() {
  v1::BundleManifest m;
  m.set_format_version(1);
  m.set_name("sim-base");
  m.set_channel("sim");
  // Newer than anything this seed pushed before (anti-rollback on re-runs).
  m.set_version(static_cast<uint64_t>(SystemClock::instance().now_unix()));
  m.set_created_unix(SystemClock::instance().now_unix());
  m.set_expires_unix(m.created_unix() + 7 * 24 * 3600);
  m.set_k3s_version("v1.30.4+k3s1");
  add_bundle_file(m, v1::FILE_KIND_K3S_CONFIG, "50-sim.yaml", "node-label:\n  - \"flotilla-sim=" + label_ + "\"\n");
  add_bundle_file(m, v1::FILE_KIND_MANIFEST, "sim-hello.yaml",
           "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: sim-hello\n  namespace: default\ndata:\n  run: \"" +
               label_ + "\"\n");
  if (opts_.artifact_bytes > 0) {
    std::string bytes(opts_.artifact_bytes, '\0');
    for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<char>(mix(opts_.seed + i) & 0xff);
    const std::string sha = crypto::sha256_hex(bytes);
    auto up = rest_.write("PUT", "/v1/artifacts/" + sha, bytes, "application/octet-stream");
    if (!up || (up->status != 200 && up->status != 201)) {
      return make_error(Errc::unavailable, "upload artifact: " + (up ? std::to_string(up->status) + " " + up->body
                                                                    : up.error().message));
    }
    auto* a = m.add_artifacts();
    a->set_kind(v1::ARTIFACT_KIND_AIRGAP_IMAGES);
    a->set_name("sim-images.tar.zst");
    auto h = crypto::sha256(bytes);
    a->set_sha256(std::string(h.begin(), h.end()));
    a->set_size(bytes.size());
    // The url is required (docs/bundle-format.md): relative, the hex digest,
    // resolved against the desired state's artifact_base_url. Without it every
    // device refused the bundle as malformed_manifest ("has a bad url").
    a->set_url(sha);
  }
  v1::SignedBundle env = bundles::wrap(m);
  if (auto s = bundles::sign(env, release_); !s) return s.error();
  auto r = rest_.write("POST", "/v1/bundles", bundles::serialize_envelope(env), "application/octet-stream");
  if (!r) return r.error().with_context("push bundle");
  if (r->status != 201 && r->status != 200) {
    return make_error(Errc::unavailable, "push bundle: HTTP " + std::to_string(r->status) + " " + r->body);
  }
  auto j = json::parse(r->body, nullptr, false);
  if (j.is_discarded() || !j.contains("id")) return make_error(Errc::internal, "push bundle: no id in answer");
  return j["id"].get<std::string>();
}

void Fleet::post(Event&& e) {
  auto& q = *queues_[e.device % queues_.size()];
  {
    std::lock_guard lock(q.mu);
    q.q.push_back(std::move(e));
  }
  q.cv.notify_one();
}

void Fleet::post_after(int64_t delay_ms, Event&& e) {
  {
    std::lock_guard lock(timer_mu_);
    timers_.push(Timed{now_ms() + delay_ms, timer_order_++, std::move(e)});
  }
  timer_cv_.notify_one();
}

void Fleet::worker(uint32_t w) {
  auto& q = *queues_[w];
  for (;;) {
    Event e;
    {
      std::unique_lock lock(q.mu);
      q.cv.wait(lock, [&] { return stopping_ || !q.q.empty(); });
      if (stopping_) return;
      e = std::move(q.q.front());
      q.q.pop_front();
    }
    handle(e);
  }
}

void Fleet::timer() {
  std::unique_lock lock(timer_mu_);
  while (!stopping_) {
    if (timers_.empty()) {
      timer_cv_.wait(lock);
      continue;
    }
    const int64_t wait = timers_.top().due - now_ms();
    if (wait > 0) {
      timer_cv_.wait_for(lock, Ms(wait));
      continue;
    }
    Event e = std::move(const_cast<Timed&>(timers_.top()).ev);
    timers_.pop();
    lock.unlock();
    post(std::move(e));
    lock.lock();
  }
}

void Fleet::handle(Event& e) {
  auto& d = devices_[e.device];
  if (d.faults & kOffline) return;  // powered off: the retained state waits for it
  switch (e.kind) {
    case EventKind::desired:
      if ((d.faults & kFlaky) && !d.flaked && !e.payload.empty()) {
        // The link drops as the message arrives; back after 1-4 s.
        d.flaked = true;
        ++link_drops_;
        presence(d, false);
        d.phase = static_cast<uint8_t>(Phase::away);
        post_after(1000 + static_cast<int64_t>(unit(opts_.seed, d.index, 7) * 3000),
                   Event{d.index, EventKind::link_back, std::move(e.payload)});
        return;
      }
      apply(d, e.payload);
      return;
    case EventKind::link_back:
      presence(d, true);
      with_agent(d, env_, reporter(d), [](agent::Agent& a) { a.report_inventory(); });
      d.phase = static_cast<uint8_t>(Phase::online);
      apply(d, e.payload);  // the broker delivers the retained desired state again
      return;
    case EventKind::announce:
      if (d.phase == static_cast<uint8_t>(Phase::away)) return;  // its link is down: link_back announces it
      presence(d, true);
      with_agent(d, env_, reporter(d), [](agent::Agent& a) { a.report_inventory(); });
      return;
    case EventKind::reboot:
      // Boot: start() finds the unfinished apply and rolls the node back;
      // then the agent reconnects and gets the retained desired state again.
      d.rebooted = true;
      with_agent(d, env_, reporter(d), [](agent::Agent& a) { a.report_inventory(); });
      d.phase = static_cast<uint8_t>(Phase::online);
      apply(d, e.payload);
      return;
  }
}

void Fleet::apply(VDevice& d, const std::string& payload) {
  if (payload.empty()) return;
  if (opts_.faults.download_kbps > 0 && opts_.artifact_bytes > 0 && !d.download_waited) {
    // The bandwidth cap: the artifact takes size / rate before the core sees it.
    d.download_waited = true;
    const int64_t ms = static_cast<int64_t>(opts_.artifact_bytes) * 8 / opts_.faults.download_kbps;
    d.phase = static_cast<uint8_t>(Phase::applying);
    post_after(ms, Event{d.index, EventKind::desired, payload});
    return;
  }
  const bool finished = with_agent(d, env_, reporter(d), [&](agent::Agent& a) { a.handle_desired(payload); });
  if (!finished) {
    ++power_cuts_;
    d.phase = static_cast<uint8_t>(Phase::rebooting);
    post_after(1000 + static_cast<int64_t>(unit(opts_.seed, d.index, 8) * 2000),
               Event{d.index, EventKind::reboot, payload});
  }
}

json Fleet::sample(int64_t t0, const std::string& campaign_id, json& last_campaign, bool poll_hub) {
  json s;
  s["t_ms"] = now_ms() - t0;
  std::array<uint64_t, kPhases> counts{};
  uint64_t sent = sent_.load(), received = received_.load(), sim_rss = 0;
  double sim_cpu = 0;
  if (multi()) {
    read_worker_statuses();
    for (const auto& w : workers_) {
      const auto& st = w.status;
      if (!st.is_object()) continue;
      for (int i = 0; i < kPhases; ++i) counts[i] += st["phases"][i].get<uint64_t>();
      sent += st.value("sent", uint64_t{0});
      received += st.value("received", uint64_t{0});
      sim_rss += st.value("rss_bytes", uint64_t{0});
      sim_cpu += st.value("cpu_s", 0.0);
    }
  } else {
    counts = phase_counts();
  }
  json states = json::object();
  for (int i = 0; i < kPhases; ++i) states[kPhaseNames[i]] = counts[i];
  s["devices"] = states;
  s["sent"] = sent;
  s["received"] = received;
  if (poll_hub && !campaign_id.empty()) {
    if (auto c = rest_.call_json("GET", "/v1/campaigns/" + campaign_id, nullptr, 200)) last_campaign = *c;
  }
  if (!last_campaign.is_null()) {
    s["hub_state"] = last_campaign.value("state", "");
    s["hub_counts"] = last_campaign.value("counts", json::object());
  }
  if (opts_.hub_pid > 0) {
    if (auto u = proc_usage(opts_.hub_pid)) {
      s["hub_rss_bytes"] = u->rss_bytes;
      s["hub_rss_file_bytes"] = u->rss_file_bytes;
      s["hub_cpu_s"] = u->cpu_s;
    }
  }
  if (auto self = proc_usage(::getpid())) {
    // With workers: all the simulator's processes together.
    s["sim_rss_bytes"] = self->rss_bytes + sim_rss;
    s["sim_cpu_s"] = self->cpu_s + sim_cpu;
  }
  return s;
}

std::array<uint64_t, kPhases> Fleet::phase_counts() const {
  std::array<uint64_t, kPhases> counts{};
  for (uint32_t i = first_; i < first_ + count_; ++i) {
    ++counts[std::min<int>(devices_[i].phase.load(std::memory_order_relaxed), kPhases - 1)];
  }
  return counts;
}

void Fleet::progress_line(const json& s, int64_t elapsed_ms, bool final_line) {
  if (!opts_.progress || !::isatty(2)) return;
  const auto& dv = s["devices"];
  const double total = std::max<double>(1, opts_.devices);
  const uint64_t done = dv["applied"].get<uint64_t>() + dv["failed"].get<uint64_t>() + dv["rolled_back"].get<uint64_t>();
  const uint64_t offline = dv["offline"].get<uint64_t>();
  const double frac = std::min(1.0, (done + offline) / total);
  const int width = 30;
  std::string bar(static_cast<size_t>(frac * width), '#');
  bar.resize(width, '.');
  std::fprintf(stderr, "\r[%s] %5.1f%%  applied %llu  failed %llu  rolled back %llu  offline %llu  %5.1fs%s",
               bar.c_str(), frac * 100, static_cast<unsigned long long>(dv["applied"].get<uint64_t>()),
               static_cast<unsigned long long>(dv["failed"].get<uint64_t>()),
               static_cast<unsigned long long>(dv["rolled_back"].get<uint64_t>()),
               static_cast<unsigned long long>(offline), elapsed_ms / 1000.0, final_line ? "\n" : "");
  std::fflush(stderr);
}

void Fleet::shutdown() {
  if (stopping_.exchange(true)) return;
  for (auto& q : queues_) {
    std::lock_guard lock(q->mu);
    q->cv.notify_all();
  }
  {
    std::lock_guard lock(timer_mu_);
    timer_cv_.notify_all();
  }
  {
    std::lock_guard lock(flush_mu_);
    flush_cv_.notify_all();
  }
  for (auto& t : threads_) {
    if (t.joinable()) t.join();
  }
  // Sessions end without a clean disconnect of each device (fast at scale);
  // destroying the client closes the socket and the broker fires the wills.
  sessions_.clear();
}

void Fleet::init_core() {
  label_ = opts_.label.empty() ? "s" + std::to_string(opts_.seed) + "-" + std::to_string(SystemClock::instance().now_unix())
                               : opts_.label;
  release_ = seeded_key("release", opts_.seed, 0);
  env_.base.arch = "amd64";
  env_.base.labels = {{"sim-run", label_}};
  env_.base.keyring.add(release_.pub);
  for (const auto& k : opts_.root_keys) {
    if (auto pk = bundles::parse_public_key_text(k)) env_.base.keyring.add(*pk);  // validated by the caller
  }
  env_.base.min_free_bytes = 0;
  env_.fetch = &fetch_artifact;
}

void Fleet::start_threads() {
  for (uint32_t w = 0; w < std::max<uint32_t>(1, opts_.workers); ++w) queues_.push_back(std::make_unique<WorkQueue>());
  for (uint32_t w = 0; w < queues_.size(); ++w) threads_.emplace_back([this, w] { worker(w); });
  threads_.emplace_back([this] { timer(); });
  threads_.emplace_back([this] { supervisor(); });
}

Result<json> Fleet::run() {
  init_core();
  start_threads();

  const int64_t started = now_ms();
  if (auto s = prepare_devices(); !s) return s.error();
  const int64_t prepared = now_ms();
  if (auto s = create_token(); !s) return s.error();
  if (opts_.mode == Mode::gateway) {
    if (auto s = enroll_gateways(); !s) return s.error();
  }
  if (multi()) {
    if (auto s = start_workers(); !s) return s.error();
    if (auto s = wait_workers_online(); !s) return s.error().with_context("enrollment");
  } else if (auto s = enroll_devices(); !s) {
    return s.error().with_context("enrollment");
  }
  for (auto& t : sessions_) {
    if (t && t->connected()) (void)t->flush(Ms(30000));
  }
  if (auto s = wait_seen_online(); !s) return s.error();
  if (opts_.serve_only) return serve();
  auto bundle_id = push_bundle();
  if (!bundle_id) return bundle_id.error();

  json body = {{"bundle", *bundle_id}, {"selector", "sim-run=" + label_}, {"name", "sim-" + label_}};
  if (!opts_.strategy.empty()) body["strategy"] = opts_.strategy;
  // Campaign names are not unique: a creation whose outcome the hub could
  // not learn is looked for by its name before it is sent again, among the
  // campaigns of that name that were not there before (a run again with the
  // same label on the same hub).
  const std::string campaign_name = body["name"].get<std::string>();
  auto named = [&]() -> std::optional<std::vector<json>> {
    auto list = rest_.call_json("GET", "/v1/campaigns", nullptr, 200);
    if (!list || !list->contains("items")) return std::nullopt;
    std::vector<json> out;
    for (const auto& c : (*list)["items"]) {
      if (c.value("name", "") == campaign_name) out.push_back(c);
    }
    return out;
  };
  std::set<std::string> earlier;
  if (auto before = named()) {
    for (const auto& c : *before) earlier.insert(c.value("id", ""));
  } else {
    return make_error(Errc::unavailable, "create campaign: cannot list the hub's campaigns");
  }
  t0_ = now_ms();
  auto created = Rest::json_of(rest_.write("POST", "/v1/campaigns", body.dump(), "application/json",
                                           [&]() -> std::optional<http::Response> {
                                             auto now = named();
                                             if (!now) return std::nullopt;
                                             for (const auto& c : *now) {
                                               if (!earlier.count(c.value("id", ""))) {
                                                 return http::Response{201, c.dump(), {}};
                                               }
                                             }
                                             return std::nullopt;
                                           }),
                               "POST /v1/campaigns", 201);
  if (!created) return created.error().with_context("create campaign");
  const std::string cid = (*created)["id"].get<std::string>();
  {
    // Reports may already be flowing; the reporter reads campaign_id_.
    std::lock_guard lock(lat_mu_);
    campaign_id_ = cid;
    campaign_known_ = true;
  }
  const int64_t campaign_created_ms = now_ms() - t0_;

  json timeline = json::array();
  json last_campaign;
  const bool big = opts_.devices > 50000;
  const int64_t period = big ? 2000 : 500;
  int64_t converged_ms = -1;
  std::string end_state = "timeout";
  for (int64_t tick = 0;; ++tick) {
    const bool poll_hub = !big || tick % 2 == 0;
    json s = sample(t0_, cid, last_campaign, poll_hub);
    timeline.push_back(s);
    progress_line(s, s["t_ms"].get<int64_t>(), false);
    if (s.contains("hub_state")) {
      const std::string state = s.value("hub_state", "");
      // Converged: the hub finished or stopped the campaign, or it waits only
      // for devices that are away, and no device of ours is still on its way
      // (a link down for a moment, a reboot, a throttled download).
      const auto& dv = s["devices"];
      // Idle counts too: an online device without an outcome has its desired
      // state still on the way (a paused campaign is "stopped" above).
      const uint64_t transient = dv.value("applying", uint64_t{0}) + dv.value("link_down", uint64_t{0}) +
                                 dv.value("rebooting", uint64_t{0}) + dv.value("idle", uint64_t{0});
      const bool stopped = state == "completed" || state == "paused" || state == "aborted" || state == "rolled_back";
      if (stopped || (state == "converging" && transient == 0)) {
        converged_ms = s["t_ms"].get<int64_t>();
        end_state = state;
        break;
      }
    }
    if (now_ms() - t0_ > opts_.timeout.count() * 1000) break;
    std::this_thread::sleep_for(Ms(period));
  }
  // One last look at the hub and the fleet.
  if (multi()) stop_workers();  // their final status: every device's outcome and time
  json final_sample = sample(t0_, cid, last_campaign, true);
  timeline.push_back(final_sample);
  progress_line(final_sample, final_sample["t_ms"].get<int64_t>(), true);

  std::vector<int64_t> lat;
  {
    std::lock_guard lock(lat_mu_);
    lat = latencies_ms_;
  }
  std::sort(lat.begin(), lat.end());
  auto pct = [&](double p) -> json {
    if (lat.empty()) return nullptr;
    const size_t i = std::min(lat.size() - 1, static_cast<size_t>(p * static_cast<double>(lat.size())));
    return lat[i];
  };
  // The CDF is stored at up to 1000 points, enough for the plot.
  json cdf = json::array();
  const size_t step = std::max<size_t>(1, lat.size() / 1000);
  for (size_t i = 0; i < lat.size(); i += step) cdf.push_back({lat[i], static_cast<double>(i + 1) / lat.size()});
  if (!lat.empty()) cdf.push_back({lat.back(), 1.0});

  uint64_t peak_rss = 0, peak_anon = 0;
  double max_rate = 0;
  for (size_t i = 0; i < timeline.size(); ++i) {
    peak_rss = std::max<uint64_t>(peak_rss, timeline[i].value("hub_rss_bytes", uint64_t{0}));
    peak_anon = std::max<uint64_t>(peak_anon, timeline[i].value("hub_rss_bytes", uint64_t{0}) -
                                                  timeline[i].value("hub_rss_file_bytes", uint64_t{0}));
    if (i > 0) {
      const double dt = (timeline[i]["t_ms"].get<double>() - timeline[i - 1]["t_ms"].get<double>()) / 1000.0;
      const double dm = (timeline[i]["sent"].get<double>() + timeline[i]["received"].get<double>()) -
                        (timeline[i - 1]["sent"].get<double>() + timeline[i - 1]["received"].get<double>());
      if (dt > 0) {
        timeline[i]["msgs_per_s"] = dm / dt;
        max_rate = std::max(max_rate, dm / dt);
      }
    }
  }
  // This process's counter plus, with workers, theirs.
  auto total = [&](const char* key, uint64_t own) {
    for (const auto& w : workers_) {
      if (w.status.is_object()) own += w.status.value(key, uint64_t{0});
    }
    return own;
  };
  json faults_assigned = {{"offline", 0}, {"flaky", 0}, {"install_fail", 0}, {"health_fail", 0}, {"reboot_mid_apply", 0}};
  json fault_devices = json::object();
  json fault_bits = json::array();
  for (const auto& d : devices_) {
    if (d.faults & kOffline) faults_assigned["offline"] = faults_assigned["offline"].get<int>() + 1;
    if (d.faults & kFlaky) faults_assigned["flaky"] = faults_assigned["flaky"].get<int>() + 1;
    if (d.faults & kInstallFail) faults_assigned["install_fail"] = faults_assigned["install_fail"].get<int>() + 1;
    if (d.faults & kHealthFail) faults_assigned["health_fail"] = faults_assigned["health_fail"].get<int>() + 1;
    if (d.faults & kRebootMidApply) faults_assigned["reboot_mid_apply"] = faults_assigned["reboot_mid_apply"].get<int>() + 1;
    if (d.faults && devices_.size() <= 1000) fault_devices[d.id] = d.faults;
    if (devices_.size() <= 1000) fault_bits.push_back(d.faults);
  }
  json final_devices = json::object();
  if (devices_.size() <= 1000) {
    for (const auto& d : devices_) final_devices[d.id] = kPhaseNames[std::min<int>(d.phase.load(), kPhases - 1)];
  }
  json report;
  report["tool"] = "flotilla-sim";
  report["config"] = {{"devices", opts_.devices},
                      {"mode", opts_.mode == Mode::direct ? "direct" : "gateway"},
                      {"devices_per_gateway", opts_.devices_per_gateway},
                      {"sessions", multi() ? opts_.devices : sessions_.size()},
                      {"processes", multi() ? opts_.processes : 1},
                      {"mqtt_client", mqtt_client_name(opts_.mqtt_client)},
                      {"seed", opts_.seed},
                      {"enroll_rate", opts_.enroll_rate},
                      {"enroll_batch", opts_.mode == Mode::gateway ? opts_.enroll_batch : 1},
                      {"gateway_flush_ms", batching() ? opts_.gateway_flush_ms : 0},
                      {"workers", opts_.workers},
                      {"strategy", opts_.strategy},
                      {"artifact_bytes", opts_.artifact_bytes},
                      {"faults", opts_.faults},
                      {"hub", rest_.url},
                      {"broker", broker_url_},
                      {"label", label_}};
  report["campaign"] = {{"id", cid}, {"end_state", end_state}, {"hub", last_campaign}};
  // The key every virtual device checked its desired states' headers with
  // (learned from enrollment answers; empty when this process enrolled none).
  const auto director = env_.director();
  report["director_key_id"] = director ? director->key_id : "";
  report["figures"] = {
      {"prepare_s", (prepared - started) / 1000.0},
      {"enroll_s", static_cast<double>(enroll_done_ms_ - enroll_started_ms_) / 1000.0},
      {"enroll_per_s", enroll_done_ms_ > enroll_started_ms_
                           ? opts_.devices * 1000.0 / static_cast<double>(enroll_done_ms_ - enroll_started_ms_)
                           : 0.0},
      {"campaign_create_s", campaign_created_ms / 1000.0},
      {"converged_s", converged_ms < 0 ? json(nullptr) : json(converged_ms / 1000.0)},
      {"latency_p50_ms", pct(0.50)},
      {"latency_p99_ms", pct(0.99)},
      {"latency_p999_ms", pct(0.999)},
      {"latency_max_ms", lat.empty() ? json(nullptr) : json(lat.back())},
      {"finished_devices", lat.size()},
      {"messages_sent", total("sent", sent_.load())},
      {"messages_received", total("received", received_.load())},
      {"publish_errors", total("publish_errors", publish_errors_.load())},
      {"power_cuts", total("power_cuts", power_cuts_.load())},
      {"link_drops", total("link_drops", link_drops_.load())},
      {"reconnects", total("reconnects", reconnects_.load())},
      {"rollcalls_answered", total("rollcalls_answered", rollcalls_answered_.load())},
      {"peak_msgs_per_s", max_rate},
      {"hub_peak_rss_bytes", peak_rss},
      {"hub_rss_per_device_bytes", opts_.devices ? peak_rss / static_cast<double>(opts_.devices) : 0.0},
      // Without file-backed pages (a mapped store, --db-mmap-mib): the hub's own memory.
      {"hub_peak_rss_anon_bytes", peak_anon},
      {"hub_cpu_s", final_sample.value("hub_cpu_s", 0.0)},
      {"sim_rss_bytes", final_sample.value("sim_rss_bytes", uint64_t{0})},
      {"sim_cpu_s", final_sample.value("sim_cpu_s", 0.0)},
      {"journal_rows", total("journal_rows", SimStateStore::journal_rows())},
      {"artifact_downloads", g_artifact_downloads.load()}};
  report["faults_assigned"] = faults_assigned;
  if (!fault_devices.empty()) report["fault_devices"] = fault_devices;
  if (!fault_bits.empty()) report["fault_bits"] = fault_bits;  // by device index
  if (!final_devices.empty()) report["device_phases"] = final_devices;
  report["latency_cdf"] = cdf;
  report["timeline"] = timeline;
  (void)artifact_fetches_;
  return report;
}

// Serve only: the devices answer whatever desired states the hub sends (from
// campaigns created by others) until told to stop, then the report says what
// each one applied. <out>/serving.json tells a driver the devices are online
// at the hub and which label selects them.
Result<json> Fleet::serve() {
  const int64_t started = now_ms();
  const json serving = {{"state", "serving"},
                        {"label", label_},
                        {"devices", opts_.devices},
                        {"hub", rest_.url},
                        {"release_key", bundles::public_key_text(release_.pub)}};
  if (auto s = fs::write_file_atomic(std::filesystem::path(opts_.work_dir) / "serving.json", serving.dump() + "\n", 0644);
      !s) {
    return s.error();
  }
  const auto told = [&] { return opts_.stop && opts_.stop->load(); };
  while (!told() && (opts_.serve_for.count() == 0 || now_ms() - started < opts_.serve_for.count())) {
    std::this_thread::sleep_for(Ms(100));
  }
  const int64_t served_ms = now_ms() - started;
  // Reports gathered but not yet sent go out before the sessions close.
  for (uint32_t s = 0; s < batches_.size(); ++s) flush_reports(s, false);
  for (auto& t : sessions_) {
    if (t && t->connected()) (void)t->flush(Ms(5000));
  }
  shutdown();  // the device threads are done: their storage can be read
  json phases = json::object();
  std::map<std::string, uint64_t> applied;
  for (const auto& d : devices_) {
    const std::string phase = kPhaseNames[std::min<int>(d.phase.load(), kPhases - 1)];
    phases[phase] = phases.value(phase, uint64_t{0}) + 1;
    auto st = d.store.state.empty() ? Result<agent::AppliedState>(agent::AppliedState{}) : decode_state(d.store.state);
    const std::string what = st && !st->bundle_name.empty() ? st->bundle_name + "@" + std::to_string(st->version) : "none";
    ++applied[what];
  }
  json devices = json::object();
  if (devices_.size() <= 1000) {
    for (const auto& d : devices_) {
      auto st = d.store.state.empty() ? Result<agent::AppliedState>(agent::AppliedState{}) : decode_state(d.store.state);
      devices[d.id] = {{"phase", kPhaseNames[std::min<int>(d.phase.load(), kPhases - 1)]},
                       {"bundle", st ? st->bundle_name : ""},
                       {"version", st ? st->version : 0},
                       {"campaign", st ? st->campaign_id : ""}};
    }
  }
  json report;
  report["tool"] = "flotilla-sim";
  report["config"] = {{"devices", opts_.devices},
                      {"mode", opts_.mode == Mode::direct ? "direct" : "gateway"},
                      {"devices_per_gateway", opts_.devices_per_gateway},
                      {"seed", opts_.seed},
                      {"serve_only", true},
                      {"faults", opts_.faults},
                      {"hub", rest_.url},
                      {"broker", broker_url_},
                      {"label", label_}};
  report["serve"] = {{"served_s", served_ms / 1000.0},
                     {"stopped_by", told() ? "signal" : "serve-for"},
                     {"phases", phases},
                     {"applied", applied},
                     {"enroll_s", static_cast<double>(enroll_done_ms_ - enroll_started_ms_) / 1000.0},
                     {"messages_sent", sent_.load()},
                     {"messages_received", received_.load()},
                     {"power_cuts", power_cuts_.load()},
                     {"link_drops", link_drops_.load()}};
  if (!devices.empty()) report["devices"] = devices;
  return report;
}

// --- several processes (direct mode) ------------------------------------------------

namespace {
constexpr const char* kStatusFile = "status.json";
constexpr const char* kStopFile = "stop";
constexpr const char* kSpecFile = "spec.json";

json options_json(const SimOptions& o) {
  return {{"devices", o.devices},
          {"seed", o.seed},
          {"enroll_rate", o.enroll_rate},
          {"enroll_threads", o.enroll_threads},
          {"workers", o.workers},
          {"artifact_bytes", o.artifact_bytes},
          {"mqtt_client", mqtt_client_name(o.mqtt_client)},
          {"faults", o.faults},
          {"label", o.label}};
}

SimOptions options_from(const json& j) {
  SimOptions o;
  o.mode = Mode::direct;
  o.devices = j.at("devices").get<uint32_t>();
  o.seed = j.at("seed").get<uint64_t>();
  o.enroll_rate = j.at("enroll_rate").get<double>();
  o.enroll_threads = j.at("enroll_threads").get<uint32_t>();
  o.workers = j.at("workers").get<uint32_t>();
  o.artifact_bytes = j.at("artifact_bytes").get<uint32_t>();
  o.mqtt_client = j.value("mqtt_client", "loop") == "paho" ? MqttClient::paho : MqttClient::loop;
  o.faults = j.at("faults").get<FaultProfile>();
  o.label = j.at("label").get<std::string>();
  o.progress = false;
  return o;
}
}  // namespace

Status Fleet::start_workers() {
  enroll_started_ms_ = now_ms();
  const uint32_t p = opts_.processes;
  SimOptions share = opts_;
  share.label = label_;  // every process must derive the same labels and bundle
  // The rate and the threads are the run's, split between the processes.
  share.enroll_rate = opts_.enroll_rate / p;
  share.enroll_threads = std::max<uint32_t>(1, opts_.enroll_threads / p);
  const std::string self = proc::self_exe();
  for (uint32_t k = 0; k < p; ++k) {
    const uint32_t first = static_cast<uint32_t>(uint64_t{opts_.devices} * k / p);
    const uint32_t last = static_cast<uint32_t>(uint64_t{opts_.devices} * (k + 1) / p);
    WorkerProc w;
    w.dir = std::filesystem::path(opts_.work_dir) / ("worker-" + std::to_string(k));
    std::error_code ec;
    std::filesystem::remove_all(w.dir, ec);
    if (auto s = fs::ensure_own_dir(w.dir, 0700); !s) return s;
    json spec = {{"hub_url", rest_.url}, {"enrollment_token", enroll_token_}, {"first", first},
                 {"count", last - first}, {"options", options_json(share)}};
    // 0600: it holds the enrollment token, which is not for the command line.
    if (auto s = fs::write_file_atomic(w.dir / kSpecFile, spec.dump(), 0600); !s) return s;
    proc::SpawnOptions so;
    so.argv = {self, "worker", "--spec", (w.dir / kSpecFile).string()};
    so.stdout_path = (w.dir / "worker.log").string();
    so.stderr_path = "stdout";
    so.die_with_parent = true;
    auto c = proc::spawn(so);
    if (!c) return c.error().with_context("start simulator worker " + std::to_string(k));
    w.child = std::move(*c);
    workers_.push_back(std::move(w));
  }
  return {};
}

void Fleet::read_worker_statuses() {
  for (auto& w : workers_) {
    auto text = fs::read_file(w.dir / kStatusFile, 16u << 20);
    if (!text) continue;
    auto j = json::parse(*text, nullptr, false);
    if (j.is_object()) w.status = std::move(j);
  }
}

Status Fleet::wait_workers_online() {
  const auto deadline = std::chrono::steady_clock::now() + opts_.timeout;
  int64_t last_line = 0;
  for (;;) {
    read_worker_statuses();
    size_t online = 0;
    uint64_t enrolled = 0;
    for (size_t k = 0; k < workers_.size(); ++k) {
      auto& w = workers_[k];
      const std::string state = w.status.is_object() ? w.status.value("state", "") : "";
      if (state == "failed") {
        return make_error(Errc::unavailable, "simulator worker " + std::to_string(k) + ": " +
                                                 w.status.value("error", std::string("failed")));
      }
      if (auto code = w.child.poll()) {
        auto log = fs::read_file(w.dir / "worker.log", 1 << 20).value_or("");
        if (log.size() > 600) log = log.substr(log.size() - 600);
        return make_error(Errc::unavailable, "simulator worker " + std::to_string(k) + " exited with " +
                                                 std::to_string(*code) + "; its log ends:\n" + log);
      }
      if (state == "online") ++online;
      if (w.status.is_object()) enrolled += w.status.value("enrolled", uint64_t{0});
    }
    if (online == workers_.size()) break;
    if (opts_.progress && ::isatty(2) && now_ms() - last_line > 500) {
      last_line = now_ms();
      std::fprintf(stderr, "\renrolling: %llu of %u devices in %zu processes", static_cast<unsigned long long>(enrolled),
                   opts_.devices, workers_.size());
    }
    if (std::chrono::steady_clock::now() > deadline) {
      return make_error(Errc::timeout, "the simulator workers did not enroll their devices in time");
    }
    std::this_thread::sleep_for(Ms(100));
  }
  if (opts_.progress && ::isatty(2)) std::fprintf(stderr, "\n");
  enroll_done_ms_ = 0;
  for (const auto& w : workers_) {
    enroll_done_ms_ = std::max(enroll_done_ms_.load(), w.status.value("enroll_done_ms", int64_t{0}));
  }
  return {};
}

void Fleet::stop_workers() {
  for (auto& w : workers_) (void)fs::write_file_atomic(w.dir / kStopFile, "", 0600);
  for (auto& w : workers_) {
    if (!w.child.wait_for(Ms(60000))) w.child.terminate(Ms(5000));
  }
  read_worker_statuses();
  // Every device's outcome and the moment it sent it (steady clock, shared by
  // the processes of one machine), for the timeline and the latency CDF.
  std::lock_guard lock(lat_mu_);
  for (const auto& w : workers_) {
    if (!w.status.is_object() || !w.status.contains("device_phases")) continue;
    const uint32_t first = w.status.value("first", 0u);
    const auto& phases = w.status["device_phases"];
    const auto& done = w.status["done_ms"];
    for (size_t k = 0; k < phases.size() && first + k < devices_.size(); ++k) {
      auto& d = devices_[first + k];
      d.phase = phases[k].get<uint8_t>();
      d.done_ms = done[k].get<int64_t>();
      if (d.done_ms > 0) latencies_ms_.push_back(d.done_ms - t0_);
    }
  }
}

json Fleet::worker_status(const std::string& state, const std::string& error, bool final_status) {
  const auto counts = phase_counts();
  json s = {{"state", state},
            {"first", first_},
            {"count", count_},
            {"enrolled", count_ - counts[static_cast<int>(Phase::pending)]},
            {"enroll_done_ms", enroll_done_ms_.load()},
            {"phases", counts},
            {"sent", sent_.load()},
            {"received", received_.load()},
            {"publish_errors", publish_errors_.load()},
            {"power_cuts", power_cuts_.load()},
            {"link_drops", link_drops_.load()},
            {"reconnects", reconnects_.load()},
            {"rollcalls_answered", rollcalls_answered_.load()},
            {"journal_rows", SimStateStore::journal_rows()}};
  if (!error.empty()) s["error"] = error;
  if (auto self = proc_usage(::getpid())) {
    s["rss_bytes"] = self->rss_bytes;
    s["cpu_s"] = self->cpu_s;
  }
  if (final_status) {
    json phases = json::array(), done = json::array();
    for (uint32_t i = first_; i < first_ + count_; ++i) {
      phases.push_back(devices_[i].phase.load());
      done.push_back(devices_[i].done_ms.load());
    }
    s["device_phases"] = std::move(phases);
    s["done_ms"] = std::move(done);
  }
  return s;
}

Status Fleet::run_as_worker(const std::string& enroll_token, const std::filesystem::path& dir) {
  init_core();
  start_threads();
  auto write = [&](const std::string& state, const std::string& error, bool final_status) {
    return fs::write_file_atomic(dir / kStatusFile, worker_status(state, error, final_status).dump(), 0600);
  };
  if (auto s = prepare_devices(); !s) return s;
  enroll_token_ = enroll_token;
  // The driver's campaign is the only one: any campaign id is ours.
  if (auto s = write("enrolling", "", false); !s) return s;
  std::atomic<bool> enrolling{true};
  std::thread progress([&] {
    while (enrolling) {
      (void)write("enrolling", "", false);
      std::this_thread::sleep_for(Ms(500));
    }
  });
  Status st = enroll_devices();
  enrolling = false;
  progress.join();
  if (!st) {
    (void)write("failed", st.error().message, false);
    return st;
  }
  for (auto& t : sessions_) {
    if (t && t->connected()) (void)t->flush(Ms(30000));
  }
  if (auto s = write("online", "", false); !s) return s;
  while (!std::filesystem::exists(dir / kStopFile)) {
    std::this_thread::sleep_for(Ms(500));
    (void)write("online", "", false);
  }
  return write("stopped", "", true);
}

}  // namespace

Status run_worker(const std::string& spec_path) {
  auto text = fs::read_file(spec_path, 1 << 20);
  if (!text) return text.error().with_context("worker spec");
  SimOptions opts;
  json spec;
  try {
    spec = json::parse(*text);
    opts = options_from(spec.at("options"));
    opts.work_dir = std::filesystem::path(spec_path).parent_path().string();
    const uint32_t first = spec.at("first").get<uint32_t>(), count = spec.at("count").get<uint32_t>();
    if (count == 0 || first >= opts.devices || count > opts.devices - first) {
      return make_error(Errc::invalid_argument, "worker spec: devices [first, first + count) outside the fleet");
    }
    Fleet f(opts, Rest{spec.at("hub_url").get<std::string>(), ""}, first, count);
    return f.run_as_worker(spec.at("enrollment_token").get<std::string>(), opts.work_dir);
  } catch (const std::exception& e) {
    return make_error(Errc::parse, std::string("worker spec ") + spec_path + ": " + e.what());
  }
}

Result<json> run_fleet(const SimOptions& opts, Rest rest) {
  Fleet f(opts, std::move(rest));
  return f.run();
}

}  // namespace flotilla::sim

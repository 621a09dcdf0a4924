#include "flotilla/hub/service.hpp"

#include <algorithm>
#include <set>

#include "flotilla/bundles/bundle.hpp"
#include "flotilla/common/crypto.hpp"
#include "flotilla/common/log.hpp"
#include "flotilla/hub/broker.hpp"
#include "flotilla/v1/desired.pb.h"

namespace flotilla::hub {

namespace {

std::string lower_suffix(const std::string& full, const std::string& prefix) {
  std::string s = full.rfind(prefix, 0) == 0 ? full.substr(prefix.size()) : full;
  std::transform(s.begin(), s.end(), s.begin(), ::tolower);
  return s;
}

std::string campaign_status_for(v1::AgentState s) {
  switch (s) {
    case v1::AGENT_STATE_APPLIED: return "applied";
    case v1::AGENT_STATE_FAILED:
    case v1::AGENT_STATE_REFUSED:
    case v1::AGENT_STATE_ROLLED_BACK: return "failed";
    default: return "in_progress";
  }
}

bool final_status(const std::string& s) { return s == "applied" || s == "failed" || s == "superseded"; }

}  // namespace

std::string state_name(v1::AgentState s) { return lower_suffix(v1::AgentState_Name(s), "AGENT_STATE_"); }
std::string reason_name(v1::Reason r) { return lower_suffix(v1::Reason_Name(r), "REASON_"); }

HubService::HubService(Store& store, const Clock& clock, ServiceConfig cfg)
    : store_(store), clock_(clock), cfg_(std::move(cfg)) {
  worker_ = std::thread([this] { worker(); });
}

HubService::~HubService() { stop(); }

void HubService::stop() {
  if (stopping_.exchange(true)) return;
  q_cv_.notify_all();
  q_space_cv_.notify_all();
  if (worker_.joinable()) worker_.join();
}

Status HubService::attach_transport(transport::Transport& t) {
  attached_ = false;
  transport_ = &t;
  t.on_message([this](transport::Message&& m) { on_message(std::move(m)); });
  for (const char* leaf : {"report", "presence"}) {
    if (auto s = t.subscribe(std::string(transport::kTopicRoot) + "+/" + leaf, 1); !s) return s;
  }
  republish_pending();
  attached_ = true;
  return {};
}

bool HubService::mqtt_connected() const { return attached_ && transport_ && transport_->connected(); }

Result<CreatedToken> HubService::create_token(const std::string& kind, TokenRecord rec,
                                             std::chrono::milliseconds ttl) {
  CreatedToken out;
  if (ttl.count() > 0) rec.expires_unix = clock_.now_unix() + std::max<int64_t>(1, ttl.count() / 1000);
  // The prefix says what a leaked string is (like GitHub's ghp_); the rest is 256 random bits.
  out.secret = (kind == "api" ? "flt_api_" : "flt_enr_") + crypto::random_token(32);
  rec.id = (kind == "api" ? "tok-" : "enr-") + crypto::random_token(6);
  rec.created_ms = clock_.now_unix_ms();
  std::lock_guard lock(store_mu_);
  if (auto s = store_.insert_token(kind, rec, crypto::sha256_hex(out.secret)); !s) return s.error();
  out.record = rec;
  return out;
}

Result<std::optional<TokenRecord>> HubService::authenticate(const std::string& kind, const std::string& secret) {
  std::lock_guard lock(store_mu_);
  auto t = store_.find_token(kind, crypto::sha256_hex(secret));
  if (!t) return t.error();
  if (!*t) return std::optional<TokenRecord>();
  const auto& rec = **t;
  if (rec.revoked) return std::optional<TokenRecord>();
  if (rec.expires_unix != 0 && rec.expires_unix <= clock_.now_unix()) return std::optional<TokenRecord>();
  return t;
}

Result<v1::EnrollResponse> HubService::enroll(const v1::EnrollRequest& req) {
  if (req.device_public_key().size() != 32) {
    return make_error(Errc::invalid_argument, "device_public_key must be a 32-byte Ed25519 public key");
  }
  const Bytes pub(req.device_public_key().begin(), req.device_public_key().end());
  const Bytes proof(req.proof().begin(), req.proof().end());
  if (!bundles::verify_detached(pub, bundles::enroll_proof_message(req.enrollment_token(), pub), proof)) {
    return make_error(Errc::invalid_argument, "enrollment proof does not verify: the request must be signed by "
                                              "the device key it enrolls");
  }
  auto tok = authenticate("enroll", req.enrollment_token());
  if (!tok) return tok.error();
  if (!*tok) return make_error(Errc::unauthenticated, "enrollment token is unknown, expired or revoked");
  const TokenRecord& token = **tok;
  if (token.max_uses > 0 && token.uses >= token.max_uses) {
    return make_error(Errc::permission_denied, "enrollment token has been used up");
  }
  Labels labels;
  for (const auto& [k, v] : req.labels()) {
    if (!valid_label_key(k) || !valid_label_value(v)) {
      return make_error(Errc::invalid_argument, "bad label " + k + "=" + v);
    }
    labels[k] = v;
  }
  // Labels bound to the token win over what a device says about itself.
  for (const auto& [k, v] : token.labels) labels[k] = v;

  const std::string pub_hex = to_hex(req.device_public_key());
  DeviceRecord d;
  // The id derives from the device's key: a device that re-enrolls with the
  // same identity keeps its id, its history and its campaign state.
  d.id = "d-" + crypto::sha256_hex(req.device_public_key()).substr(0, 20);
  d.project = token.project;
  d.labels = labels;
  d.public_key_hex = pub_hex;
  d.hostname = req.hostname().substr(0, 253);
  d.arch = req.arch().substr(0, 32);
  d.agent_version = req.agent_version().substr(0, 64);
  d.enrolled_ms = clock_.now_unix_ms();

  v1::EnrollResponse resp;
  resp.set_device_id(d.id);
  resp.set_broker_url(cfg_.broker_url);
  resp.set_topic_prefix(std::string(transport::kTopicRoot) + d.id);
  resp.set_artifact_base_url(cfg_.public_url + "/v1/artifacts/");
  for (const auto& [k, v] : labels) (*resp.mutable_labels())[k] = v;

  EmbeddedBroker::Credentials creds;
  {
    std::lock_guard lock(store_mu_);
    if (auto existing = store_.get_device(d.id); existing && *existing && (*existing)->public_key_hex != pub_hex) {
      return make_error(Errc::conflict, "device id collision");
    }
    sql::Transaction tx(store_.db());
    // Checked and counted in one statement, under the write lock, so
    // concurrent enrollments cannot overspend a single-use token.
    auto claimed = store_.claim_token_use(token.id);
    if (!claimed) return claimed.error();
    if (!*claimed) return make_error(Errc::permission_denied, "enrollment token has been used up");
    if (auto s = store_.upsert_enrolled_device(d); !s) return s.error();
    if (cfg_.manage_broker_credentials) {
      const std::string password = crypto::random_token(24);
      if (auto s = store_.upsert_credential(d.id, mosquitto_password_hash(password)); !s) return s.error();
      resp.set_mqtt_username(d.id);
      resp.set_mqtt_password(password);
    }
    if (auto s = tx.commit(); !s) return s.error();
    if (cfg_.manage_broker_credentials) {
      auto all = store_.credentials();
      if (!all) return all.error();
      creds = std::move(*all);
    }
  }
  if (cfg_.manage_broker_credentials && broker_) {
    if (auto s = broker_->set_device_credentials(creds); !s) return s.error().with_context("update broker credentials");
  }
  log::get("hub")->info("enrolled device={} arch={} token={}", d.id, d.arch, token.id);
  return resp;
}

Result<std::pair<BundleRecord, bool>> HubService::upload_bundle(const std::string& bytes, const std::string& project) {
  auto env = bundles::parse_envelope(bytes);
  if (!env) return env.error();
  if (env->signatures_size() == 0) {
    return make_error(Errc::invalid_argument, "bundle is not signed; sign it with 'flotilla bundle sign' first");
  }
  v1::BundleManifest m;
  if (!m.ParseFromString(env->manifest()) || m.name().empty() || m.version() == 0) {
    return make_error(Errc::invalid_argument, "bundle manifest does not parse or lacks a name and version");
  }
  BundleRecord b;
  b.digest = bundles::manifest_digest_hex(*env);
  b.id = b.digest.substr(0, 16);
  b.project = project;
  b.name = m.name();
  b.channel = m.channel();
  b.version = m.version();
  b.expires_unix = m.expires_unix();
  b.signatures = env->signatures_size();
  b.uploaded_ms = clock_.now_unix_ms();
  b.envelope = bundles::serialize_envelope(*env);
  std::lock_guard lock(store_mu_);
  if (auto existing = store_.get_bundle(b.id, true); !existing) {
    return existing.error();
  } else if (*existing) {
    // The same manifest again, perhaps with more signatures (a second signer
    // towards a threshold): keep the union. Verifying them is the agent's job.
    BundleRecord rec = **existing;
    v1::SignedBundle stored;
    if (!stored.ParseFromString(rec.envelope)) return make_error(Errc::internal, "stored bundle does not parse");
    std::set<std::string> have;
    for (const auto& s : stored.signatures()) have.insert(s.key_id());
    bool added = false;
    for (const auto& s : env->signatures()) {
      if (have.count(s.key_id()) || stored.signatures_size() >= static_cast<int>(bundles::kMaxSignatures)) continue;
      *stored.add_signatures() = s;
      have.insert(s.key_id());
      added = true;
    }
    if (added) {
      rec.envelope = bundles::serialize_envelope(stored);
      rec.signatures = stored.signatures_size();
      if (auto s = store_.update_bundle_signatures(rec.id, rec.envelope, rec.signatures); !s) return s.error();
      log::get("hub")->info("bundle id={} now carries {} signatures", rec.id, rec.signatures);
    }
    rec.envelope.clear();
    return std::make_pair(rec, false);
  }
  if (auto s = store_.insert_bundle(b); !s) return s.error();
  b.envelope.clear();
  log::get("hub")->info("stored bundle id={} name={} version={}", b.id, b.name, b.version);
  return std::make_pair(b, true);
}

Result<std::vector<BundleRecord>> HubService::list_bundles() {
  std::lock_guard lock(store_mu_);
  return store_.list_bundles();
}

Result<std::optional<BundleRecord>> HubService::get_bundle(const std::string& key) {
  std::lock_guard lock(store_mu_);
  return store_.get_bundle(key, false);
}

Result<CampaignRecord> HubService::create_campaign(const std::string& name, const std::string& bundle_key,
                                                   const std::string& selector_text) {
  auto sel = Selector::parse(selector_text);
  if (!sel) return sel.error();
  std::vector<std::pair<DeviceRecord, uint64_t>> targets;
  CampaignRecord c;
  BundleRecord bundle;
  {
    std::lock_guard lock(store_mu_);
    auto b = store_.get_bundle(bundle_key, true);
    if (!b) return b.error();
    if (!*b) return make_error(Errc::not_found, "no bundle '" + bundle_key + "' (use an id or name:version)");
    bundle = **b;
    if (bundle.expires_unix != 0 && bundle.expires_unix <= clock_.now_unix()) {
      return make_error(Errc::invalid_argument, "bundle " + bundle.id + " has expired; devices would refuse it");
    }
    auto devices = store_.list_devices();
    if (!devices) return devices.error();
    c.id = "c-" + crypto::random_token(6);
    c.name = name.empty() ? bundle.name + "-" + std::to_string(bundle.version) : name;
    c.bundle_id = bundle.id;
    c.selector = sel->text();
    c.state = "running";
    c.created_ms = c.updated_ms = clock_.now_unix_ms();
    std::vector<CampaignDeviceRecord> rows;
    for (auto& d : *devices) {
      if (!sel->matches(d.labels)) continue;
      const uint64_t gen = d.generation + 1;
      rows.push_back({c.id, d.id, "pending", gen, c.created_ms, "", ""});
      targets.emplace_back(std::move(d), gen);
    }
    if (rows.empty()) {
      return make_error(Errc::invalid_argument, "selector '" + sel->text() + "' matches no enrolled device");
    }
    if (auto s = store_.insert_campaign(c, rows); !s) return s.error();
    // Campaigns whose last unfinished devices were just superseded are done.
    if (auto all = store_.list_campaigns(); all) {
      for (const auto& other : *all) {
        if (other.id != c.id && other.state == "running") refresh_campaign_state(other.id);
      }
    }
  }
  // The desired state is committed first; publishing is idempotent (same
  // generation) and redone at start-up for rows still pending.
  for (const auto& [d, gen] : targets) {
    if (auto s = publish_desired(d, bundle, gen, c.id); !s) {
      log::get("hub")->warn("publish desired device={} failed, will retry at reconnect: {}", d.id, s.error().message);
    }
  }
  log::get("hub")->info("campaign created id={} bundle={} devices={}", c.id, bundle.id, targets.size());
  return c;
}

Status HubService::publish_desired(const DeviceRecord& d, const BundleRecord& b, uint64_t generation,
                                   const std::string& campaign_id) {
  if (!transport_) return make_error(Errc::unavailable, "no broker connection", true);
  v1::DesiredState ds;
  ds.set_device_id(d.id);
  ds.set_generation(generation);
  ds.set_campaign_id(campaign_id);
  ds.set_issued_unix_ms(clock_.now_unix_ms());
  ds.set_artifact_base_url(cfg_.public_url + "/v1/artifacts/");
  if (!ds.mutable_bundle()->ParseFromString(b.envelope)) {
    return make_error(Errc::internal, "stored bundle " + b.id + " does not parse");
  }
  return transport_->publish({transport::device_topic(d.id, "desired"), ds.SerializeAsString(), 1, true});
}

void HubService::republish_pending() {
  std::vector<std::tuple<DeviceRecord, BundleRecord, uint64_t, std::string>> work;
  {
    std::lock_guard lock(store_mu_);
    auto campaigns = store_.list_campaigns();
    if (!campaigns) return;
    for (const auto& c : *campaigns) {
      if (c.state != "running") continue;
      auto b = store_.get_bundle(c.bundle_id, true);
      auto rows = store_.campaign_devices(c.id);
      if (!b || !*b || !rows) continue;
      for (const auto& row : *rows) {
        if (row.status != "pending") continue;
        auto d = store_.get_device(row.device_id);
        if (d && *d && (*d)->generation == row.generation) work.emplace_back(**d, **b, row.generation, c.id);
      }
    }
  }
  for (const auto& [d, b, gen, cid] : work) (void)publish_desired(d, b, gen, cid);
  if (!work.empty()) log::get("hub")->info("republished desired state for {} pending devices", work.size());
}

Result<std::optional<CampaignView>> HubService::campaign_view(const std::string& id, bool with_devices) {
  std::lock_guard lock(store_mu_);
  auto c = store_.get_campaign(id);
  if (!c) return c.error();
  if (!*c) return std::optional<CampaignView>();
  CampaignView v;
  v.campaign = **c;
  if (auto b = store_.get_bundle(v.campaign.bundle_id, false); b && *b) v.bundle = **b;
  auto rows = store_.campaign_devices(id);
  if (!rows) return rows.error();
  auto devices = store_.list_devices();
  if (!devices) return devices.error();
  std::map<std::string, bool> online;
  for (const auto& d : *devices) online[d.id] = d.online;
  for (const auto& r : *rows) {
    ++v.counts.total;
    if (r.status == "applied") ++v.counts.applied;
    else if (r.status == "failed") {
      ++v.counts.failed;
      ++v.failure_reasons[r.reason.empty() ? "unknown" : r.reason];
    } else if (r.status == "superseded") ++v.counts.superseded;
    else if (r.status == "in_progress") ++v.counts.in_progress;
    else ++v.counts.pending;
    if (!final_status(r.status) && !online[r.device_id]) ++v.counts.offline;
  }
  if (with_devices) v.devices = std::move(*rows);
  return std::optional<CampaignView>(std::move(v));
}

Result<std::vector<CampaignView>> HubService::list_campaigns() {
  std::vector<CampaignRecord> records;
  {
    std::lock_guard lock(store_mu_);
    auto c = store_.list_campaigns();
    if (!c) return c.error();
    records = std::move(*c);
  }
  std::vector<CampaignView> out;
  for (const auto& c : records) {
    auto v = campaign_view(c.id, false);
    if (!v) return v.error();
    if (*v) out.push_back(std::move(**v));
  }
  return out;
}

Result<std::vector<DeviceRecord>> HubService::list_devices(const Selector& sel) {
  std::lock_guard lock(store_mu_);
  auto all = store_.list_devices();
  if (!all) return all.error();
  std::vector<DeviceRecord> out;
  for (auto& d : *all) if (sel.matches(d.labels)) out.push_back(std::move(d));
  return out;
}

Result<std::optional<DeviceRecord>> HubService::get_device(const std::string& id) {
  std::lock_guard lock(store_mu_);
  return store_.get_device(id);
}

void HubService::on_message(transport::Message&& msg) {
  std::unique_lock lock(q_mu_);
  // Back-pressure instead of loss: while the queue is full the MQTT client
  // stops reading and the broker holds the QoS 1 messages.
  q_space_cv_.wait(lock, [this] { return stopping_ || queue_.size() < cfg_.report_queue_cap; });
  if (stopping_) return;
  queue_.push_back(std::move(msg));
  q_cv_.notify_one();
}

void HubService::worker() {
  while (!stopping_) {
    {
      std::unique_lock lock(q_mu_);
      q_cv_.wait_for(lock, std::chrono::milliseconds(200), [this] { return stopping_ || !queue_.empty(); });
    }
    drain();
  }
}

void HubService::drain() {
  std::lock_guard drain_lock(drain_mu_);
  for (;;) {
    std::vector<transport::Message> batch;
    {
      std::lock_guard lock(q_mu_);
      while (!queue_.empty() && batch.size() < 512) {
        batch.push_back(std::move(queue_.front()));
        queue_.pop_front();
      }
      q_space_cv_.notify_all();
    }
    if (batch.empty()) return;
    std::lock_guard lock(store_mu_);
    sql::Transaction tx(store_.db());
    for (const auto& m : batch) process(m);
    if (auto s = tx.commit(); !s) log::get("hub")->error("commit report batch failed: {}", s.error().message);
  }
}

void HubService::process(const transport::Message& msg) {
  std::string leaf;
  const std::string device_id = transport::device_id_from_topic(msg.topic, &leaf);
  if (device_id.empty()) return;
  // The broker's ACL guarantees only this device could publish here, so the
  // topic, not the payload, says who is speaking.
  if (leaf == "report") {
    v1::Report r;
    if (!r.ParseFromString(msg.payload)) {
      log::get("hub")->warn("dropped unparsable report device={} bytes={}", device_id, msg.payload.size());
      return;
    }
    handle_report(device_id, r);
  } else if (leaf == "presence") {
    v1::Presence p;
    if (msg.payload.empty()) return;  // a cleared retained message
    if (!p.ParseFromString(msg.payload)) return;
    handle_presence(device_id, p);
  }
}

void HubService::handle_presence(const std::string& device_id, const v1::Presence& p) {
  auto d = store_.get_device(device_id);
  if (!d || !*d) return;
  DeviceRecord dev = **d;
  dev.online = p.online();
  dev.last_seen_ms = std::max(dev.last_seen_ms, clock_.now_unix_ms());
  if (!p.agent_version().empty()) dev.agent_version = p.agent_version();
  (void)store_.save_device_state(dev);
}

void HubService::handle_report(const std::string& device_id, const v1::Report& r) {
  auto d = store_.get_device(device_id);
  if (!d || !*d) {
    log::get("hub")->warn("report from unknown device={}", device_id);
    return;
  }
  DeviceRecord dev = **d;
  // QoS 1 may deliver twice and a reconnect may replay: keep only newer reports.
  if (r.seq() != 0 && r.seq() <= dev.last_seq) return;
  dev.last_seq = r.seq();
  dev.last_seen_ms = clock_.now_unix_ms();
  dev.online = true;
  dev.state = state_name(r.state());
  if (r.has_applied() && !r.applied().name().empty()) {
    dev.applied_bundle = r.applied().name();
    dev.applied_version = r.applied().version();
  }
  if (r.has_inventory()) {
    const auto& inv = r.inventory();
    if (!inv.k3s_version().empty()) dev.k3s_version = inv.k3s_version();
    if (!inv.agent_version().empty()) dev.agent_version = inv.agent_version();
    if (!inv.arch().empty()) dev.arch = inv.arch();
    dev.node_ready = inv.node_ready();
  }
  if (r.has_error() && r.error().reason() != v1::REASON_NONE) {
    dev.last_reason = reason_name(r.error().reason());
    dev.last_message = r.error().message().substr(0, 1024);
  } else if (r.state() == v1::AGENT_STATE_APPLIED) {
    dev.last_reason.clear();
    dev.last_message.clear();
  }
  if (auto s = store_.save_device_state(dev); !s) {
    log::get("hub")->error("save device={} failed: {}", device_id, s.error().message);
    return;
  }
  ++reports_processed_;
  if (r.campaign_id().empty()) return;
  auto cd = store_.campaign_device(r.campaign_id(), device_id);
  if (!cd || !*cd || (*cd)->generation != r.generation()) return;
  CampaignDeviceRecord row = **cd;
  const std::string status = campaign_status_for(r.state());
  if (row.status == status) return;
  // A final outcome for this generation is counted once and never rewritten.
  if (final_status(row.status)) return;
  row.status = status;
  row.updated_ms = clock_.now_unix_ms();
  row.reason = r.has_error() ? reason_name(r.error().reason()) : "";
  if (row.reason == "none") row.reason.clear();
  row.message = r.has_error() ? r.error().message().substr(0, 1024) : "";
  (void)store_.save_campaign_device(row);
  if (final_status(status)) refresh_campaign_state(r.campaign_id());
}

void HubService::refresh_campaign_state(const std::string& campaign_id) {
  auto rows = store_.campaign_devices(campaign_id);
  if (!rows) return;
  for (const auto& r : *rows) if (!final_status(r.status)) return;
  (void)store_.set_campaign_state(campaign_id, "completed", clock_.now_unix_ms());
  log::get("hub")->info("campaign completed id={}", campaign_id);
}

}  // namespace flotilla::hub

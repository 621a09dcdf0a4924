#include "flotilla/hub/service.hpp"
#include "flotilla/hub/control_log.hpp"
#include "flotilla/hub/aggregates.hpp"

#include <stdexcept>
#include <sqlite3.h>

#include <unordered_map>
#include <algorithm>
#include <list>
#include <set>
#include <tuple>
#include <utility>

#include "flotilla/bundles/bundle.hpp"
#include "flotilla/bundles/director.hpp"
#include "flotilla/common/crypto.hpp"
#include "flotilla/common/log.hpp"
#include "flotilla/common/x509.hpp"
#include "flotilla/hub/broker.hpp"
#include "flotilla/hub/device_ca.hpp"
#include "flotilla/hub/merge.hpp"
#include "flotilla/hub/rate_limit.hpp"
#include "flotilla/v1/desired.pb.h"

namespace flotilla::hub {

namespace {

std::string lower_suffix(const std::string& full, const std::string& prefix) {
  std::string s = full.rfind(prefix, 0) == 0 ? full.substr(prefix.size()) : full;
  std::transform(s.begin(), s.end(), s.begin(), ::tolower);
  return s;
}


}  // namespace

std::string state_name(v1::AgentState s) { return lower_suffix(v1::AgentState_Name(s), "AGENT_STATE_"); }
std::string reason_name(v1::Reason r) { return lower_suffix(v1::Reason_Name(r), "REASON_"); }

HubService::HubService(Store& store, const Clock& clock, ServiceConfig cfg)
    : store_(store), clock_(clock), cfg_(std::move(cfg)) {
  // Before any thread: each cell's file gets a lock of its own (slice 8).
  store_mu_.set_files(static_cast<int>(cfg_.cell_files.size()));
  director_configured_ = cfg_.director_key.has_value();
  if (!cfg_.director_key) cfg_.director_key = bundles::generate_key();
  if (auto ids = store_.decommissioned_device_ids(); ids) {
    decommissioned_.insert(ids->begin(), ids->end());
    any_decommissioned_ = !decommissioned_.empty();
  } else {
    log::get("hub")->error("read decommissioned devices: {}", ids.error().message);
  }
  if (cfg_.cell_broker_urls.empty()) cfg_.cell_broker_urls.push_back(cfg_.broker_url);
  for (size_t i = 0; i < cfg_.cell_broker_urls.size(); ++i) {
    cells_.push_back(std::make_unique<Cell>(static_cast<int>(i), cfg_.cell_broker_urls[i], cfg_.report_queue_cap,
                                            cfg_.report_queue_bytes_cap));
  }
  cell_devices_.assign(cells_.size(), 0);
  if (!cfg_.cell_files.empty()) {
    // One file per cell, each opened as that cell's: anything else would
    // send a cell's rows to another's file.
    bool fits = cfg_.cell_files.size() == cells_.size();
    for (size_t i = 0; fits && i < cfg_.cell_files.size(); ++i) {
      fits = cfg_.cell_files[i] && cfg_.cell_files[i]->own_cell() == static_cast<int>(i);
    }
    if (!fits) {
      throw std::invalid_argument("ServiceConfig::cell_files must hold cell i's own file (Store::open_cell) at i for "
                                  "each of the " + std::to_string(cells_.size()) + " cells");
    }
    // A hub.db whose rows are still its own hands them to the files first.
    std::vector<DeviceStore*> files(cfg_.cell_files.begin(), cfg_.cell_files.end());
    auto moved = move_rows_to_cell_files(store_, files, [](int cell, int64_t done) {
      if (done % 65536 == 0) log::get("hub")->info("cell {}: {} devices' rows moved into its file", cell, done);
    });
    if (!moved) throw std::runtime_error("move hub.db's device rows into the cells' files: " + moved.error().message);
    if (!moved->already) {
      log::get("hub")->info("hub.db's device rows moved into {} cells' files: {} devices, {} campaign rows",
                            files.size(), moved->devices, moved->campaign_rows);
    }
  } else if (auto in_files = store_.cell_files_in_use(); in_files && *in_files > 0) {
    throw std::invalid_argument("hub.db's device rows are in " + std::to_string(*in_files) +
                                " cells' own files (cells/<n>/devices.db): this hub must open them");
  }
  {
    std::lock_guard lock(store_mu_);
    follow_directory();  // what a crash left between a write and its following
    reconcile_cell_files();
  }
  if (auto counts = store_.cell_device_totals(); counts) {
    for (const auto& c : *counts) {
      if (c.cell >= 0 && c.cell < cell_count()) cell_devices_[static_cast<size_t>(c.cell)] = c.total;
    }
  } else {
    log::get("hub")->error("count devices by cell: {}", counts.error().message);
  }
  if (!shares_drains()) resume_drains();
  // Before any thread: every control write from now on goes through it.
  if (cfg_.control_coordinator) {
    control_log_status_ = enable_control_log(*cfg_.control_coordinator, cfg_.control_log);
    if (!control_log_status_) log::get("hub")->error("control log: {}", control_log_status_.error().message);
  }
  for (auto& c : cells_) {
    Cell* cell = c.get();
    cell->worker() = std::thread([this, cell] { worker(*cell); });
  }
  // A hub whose control log failed (a director key or device CA that is not
  // the other hubs') is not started: it claims no cell and leads nothing.
  if (cfg_.coordinator) {
    // Nothing is ours until claimed; claimed at once when free (or ours from
    // before a restart), so a lone hub owns every cell and leads from here on.
    owned_ = std::vector<int>{};
    leader_ = false;
    if (control_log_status_) coordinate();
  }
  if (cfg_.engine_thread && control_log_status_) {
    engine_ = std::thread([this] { engine_loop(); });
    if (cfg_.coordinator) {
      keeper_ = std::thread([this] {
        const auto every = std::clamp<std::chrono::milliseconds>(
            std::chrono::duration_cast<std::chrono::milliseconds>(cfg_.coord_ttl) / 6, std::chrono::milliseconds(200),
            std::chrono::milliseconds(2000));
        std::unique_lock lock(keeper_mu_);
        while (!stopping_) {
          keeper_cv_.wait_for(lock, every, [this] { return stopping_.load(); });
          if (stopping_) break;
          lock.unlock();
          coordinate();
          lock.lock();
        }
      });
    }
  }
}

HubService::~HubService() { stop(); }

Status HubService::enable_control_log(coord::Coordinator& c, const ControlLogOptions& opts) {
  if (control_log_) return make_error(Errc::conflict, "the control log is already enabled");
  auto opened = ControlLog::open(store_.db(), store_mu_, c, opts);
  if (!opened) return opened.error();
  control_log_ = std::move(*opened);
  control_log_->on_applied([this](const std::set<std::string>& tables) { on_control_applied(tables); });
  enroll_commits_.set_runner([this](const std::function<Status()>& fn) { return run_control_write(fn, {}); });
  // A one-hub store switched to etcd seeds the log, or is refused.
  if (auto s = control_log_->adopt_existing_store(); !s) return s;
  // Entries written while this hub was away, before anything is served;
  // with etcd away the watcher catches up once it returns.
  if (auto s = control_log_->catch_up(); !s) {
    log::get("hub")->warn("control log: not caught up at start: {}", s.error().message);
  }
  if (auto s = ensure_shared_identity(); !s && s.error().code != Errc::coordination_unavailable) return s;
  control_log_->start();
  log::get("hub")->info("control log: following {} at revision={} seq={}", c.backend(),
                        control_log_->applied_revision(), control_log_->applied_seq());
  return {};
}

Status HubService::run_control_write(const std::function<Status()>& fn, const std::vector<coord::Compare>& guard) {
  if (auto s = ensure_shared_identity(); !s) return s;
  return control_log_->write(fn, guard);
}

Status HubService::ensure_shared_identity() {
  std::lock_guard lock(identity_mu_);
  if (identity_error_) return *identity_error_;
  if (identity_checked_ || !cfg_.control_coordinator) return {};
  nlohmann::json mine = nlohmann::json::object();
  if (director_configured_) mine["director_key"] = cfg_.director_key->pub.key_id;
  if (cfg_.device_ca) mine["device_ca_sha256"] = crypto::sha256_hex(cfg_.device_ca->issuer_pem());
  if (mine.empty()) {
    identity_checked_ = true;
    return {};
  }
  constexpr const char* kKey = "/flotilla/identity";
  coord::Coordinator& c = *cfg_.control_coordinator;
  // Hubs started together may record theirs at the same moment: the one
  // that loses reads the winner's record and compares with it.
  for (int attempt = 0;; ++attempt) {
    auto cur = c.get(kKey);
    if (!cur) return cur.error().with_context("check this hub's director key and device CA against the other hubs'");
    nlohmann::json theirs = nlohmann::json::object();
    if (*cur) {
      theirs = nlohmann::json::parse((*cur)->value, nullptr, false);
      if (!theirs.is_object()) theirs = nlohmann::json::object();
    }
    std::string mismatch;
    bool missing = false;
    for (const auto& [field, what, option] :
         {std::tuple{"director_key", "director key", "--director-key"},
          std::tuple{"device_ca_sha256", "device CA (SHA-256 of its certificate)", "--device-ca-cert/--device-ca-key"}}) {
      if (!mine.contains(field)) continue;
      if (!theirs.contains(field)) {
        missing = true;
      } else if (theirs[field] != mine[field]) {
        mismatch += std::string(mismatch.empty() ? "" : "; ") + "this hub's " + what + " is " +
                    mine[field].get<std::string>() + " but the hubs sharing this control log use " +
                    theirs[field].dump() + " (start it with the same " + option + ")";
      }
    }
    if (!mismatch.empty()) {
      identity_error_ = make_error(Errc::unavailable, "control writes refused: " + mismatch);
      log::get("hub")->error("control log: {}", mismatch);
      return *identity_error_;
    }
    if (missing) {
      // The first hub (or the first to configure this): record ours.
      nlohmann::json record = mine;
      for (const auto& [k, v] : theirs.items()) record.emplace(k, v);
      auto w = *cur ? c.compare_and_swap(kKey, (*cur)->mod_revision, record.dump()) : c.create(kKey, record.dump());
      if (!w) {
        const bool raced = w.error().code == Errc::conflict || w.error().code == Errc::already_exists;
        if (raced && attempt < 3) continue;
        return w.error().with_context("record this hub's director key and device CA");
      }
    }
    identity_checked_ = true;
    return {};
  }
}

void HubService::on_control_applied(const std::set<std::string>& tables) {
  if (tables.count("devices")) {
    std::lock_guard lock(store_mu_);
    // Decommissions made on another hub: drop what still arrives from them here too.
    if (auto ids = store_.decommissioned_device_ids(); ids) {
      std::lock_guard dl(decommissioned_mu_);
      decommissioned_.insert(ids->begin(), ids->end());
      any_decommissioned_ = !decommissioned_.empty();
    }
    follow_directory();
    if (auto counts = store_.cell_device_totals(); counts) {
      std::fill(cell_devices_.begin(), cell_devices_.end(), 0);
      for (const auto& c : *counts) {
        if (c.cell >= 0 && c.cell < cell_count()) cell_devices_[static_cast<size_t>(c.cell)] = c.total;
      }
    }
  }
  if (tables.count("devices")) clear_moved_away();
  if (tables.count("bundles")) {
    std::lock_guard lock(store_mu_);
    bundle_cache_.clear();  // signatures merged on another hub
  }
  if (tables.count("device_certs")) {
    if (auto s = sync_broker_revocations(); !s) {
      log::get("hub")->warn("revocations from another hub: reload the broker: {}", s.error().message);
    }
  }
  if (tables.count("broker_credentials") && cfg_.manage_broker_credentials) {
    if (auto s = sync_broker_credentials(); !s) {
      log::get("hub")->warn("credentials from another hub: reload the broker: {}", s.error().message);
    }
  }
  if (tables.count("campaigns")) engine_cv_.notify_one();
}

void HubService::stop() {
  if (stopping_.exchange(true)) return;
  if (control_log_) control_log_->stop();
  for (auto& c : cells_) c->stop();
  engine_cv_.notify_all();
  {
    std::lock_guard lock(keeper_mu_);
    keeper_cv_.notify_all();
  }
  for (auto& c : cells_) {
    if (c->worker().joinable()) c->worker().join();
  }
  if (engine_.joinable()) engine_.join();
  if (keeper_.joinable()) keeper_.join();
  // A clean stop frees the cells and the leadership for the others at once.
  std::lock_guard lock(coord_mu_);
  if (leadership_) (void)leadership_->resign();
  if (ownership_) (void)ownership_->close();
  leader_ = false;
}

void HubService::set_cell_broker(int cell, EmbeddedBroker* broker) {
  cells_.at(static_cast<size_t>(cell))->set_broker(broker);
}

const std::string& HubService::cell_broker_url(int cell) const {
  // A device row may name a cell this hub no longer runs only if the store
  // was written with more cells (app.cpp refuses to start so); cell 0 then.
  if (cell < 0 || cell >= cell_count()) return cells_.front()->broker_url();
  return cells_[static_cast<size_t>(cell)]->broker_url();
}

Result<int> HubService::cell_for_new_device(const DeviceRecord& d) {
  if (!d.gateway.empty()) {
    auto gw = store_.directory_entry(d.gateway);
    if (!gw) return gw.error();
    if (*gw) return (*gw)->cell;
  }
  int best = -1;
  for (int i = 0; i < cell_count(); ++i) {
    if (cells_[static_cast<size_t>(i)]->draining()) continue;
    if (best < 0 || cell_devices_[static_cast<size_t>(i)] < cell_devices_[static_cast<size_t>(best)]) best = i;
  }
  // Draining refuses the last undrained cell, so there is always one.
  return best < 0 ? 0 : best;
}

Result<std::vector<HubService::CellView>> HubService::list_cells(const std::string& project) {
  std::vector<Store::CellCount> counts;
  {
    std::lock_guard lock(store_mu_);
    auto totals = store_.cell_device_totals(project);
    if (!totals) return totals.error();
    // The cells' presence: hub.db's answer, or each cell's file's (ADR 18).
    std::vector<std::vector<Store::CellCount>> online;
    for (DeviceStore* part : stores_for(store_)) {
      auto o = part->online_by_cell(project);
      if (!o) return o.error();
      online.push_back(std::move(*o));
    }
    counts = merge_cell_device_counts(std::move(*totals), online);
  }
  std::vector<CellView> out;
  for (const auto& c : cells_) {
    CellView v;
    v.id = c->id();
    v.broker_url = c->broker_url();
    v.broker_state = c->broker_state();
    v.draining = c->draining();
    for (const auto& n : counts) {
      if (n.cell == c->id()) {
        v.devices_total = n.total;
        v.devices_online = n.online;
      }
    }
    out.push_back(std::move(v));
  }
  return out;
}

Status HubService::attach_transport(int cell_id, transport::Transport& t) {
  Cell& cell = *cells_.at(static_cast<size_t>(cell_id));
  cell.set_attached(false);
  cell.set_transport(&t);
  t.on_message([this, cell_id](transport::Message&& m) { on_message(cell_id, std::move(m)); });
  // A session that began again (a broker restart, a lost connection, a hub
  // start) says nothing about who is still there: a broker killed outright
  // sent no last wills, and its retained presence is as old as its last
  // save. Forget it before listening, then ask every device to re-announce.
  reset_presence(cell, true);
  for (const char* leaf : {"report", "presence"}) {
    if (auto s = t.subscribe(std::string(transport::kTopicRoot) + "+/" + leaf, 1); !s) return s;
    // Devices behind gateways (docs/architecture.md, "Gateways").
    if (auto s = t.subscribe(std::string(transport::kGatewayRoot) + "+/d/+/" + leaf, 1); !s) return s;
  }
  if (auto s = t.subscribe(transport::gateway_reports_topic("+"), 1); !s) return s;
  republish_pending(cell_id);
  // Not retained: a device that connects later announces itself anyway.
  v1::Rollcall rc;
  rc.set_id(crypto::random_u64());
  rc.set_spread_ms(rollcall_spread_ms_);
  // Without it devices still reconnect and announce themselves; only those
  // whose sessions survived stay offline until their next connect. On every
  // shard devices read (transport.hpp), then for agents from before shards.
  const std::string call = rc.SerializeAsString();
  Status published;
  for (int shard = 0; shard < transport::kRollcallShards && published; ++shard) {
    published = t.publish({transport::rollcall_shard_topic(shard), call, 1, false});
  }
  if (published) published = t.publish({transport::kRollcallTopic, call, 1, false});
  if (!published) {
    log::get("hub")->warn("roll call not published cell={}: {}", cell_id, published.error().message);
  } else {
    ++rollcalls_;
    ++cell.rollcalls;
  }
  cell.set_attached(true);
  return {};
}

// Per cell: a broker that restarted says nothing about the other cells'
// devices, whose sessions never ended.
void HubService::lost_broker_session(int cell_id) {
  Cell& cell = *cells_.at(static_cast<size_t>(cell_id));
  cell.set_attached(false);
  // The broker may be dead (killed outright, it sent no last wills) or
  // unreachable: either way nothing the hub hears says who is still there,
  // so the cell's devices are offline from now on, not at the next session.
  reset_presence(cell, false);
}

void HubService::reset_presence(Cell& cell, bool session_began) {
  // Whatever arrived before this point is applied first, so no message of
  // the old session marks a device online after the reset.
  drain_cell(cell);
  std::lock_guard drain_lock(cell.drain_mu());
  std::lock_guard lock(store_mu_);
  DeviceStore& cell_store = device_store(cell.id());
  auto n = cell_count() == 1 ? cell_store.set_all_devices_offline() : cell_store.set_cell_devices_offline(cell.id());
  if (!n) {
    log::get("hub")->error("reset presence cell={}: {}", cell.id(), n.error().message);
    return;
  }
  cell.presence_reset_devices += static_cast<uint64_t>(*n);
  // The devices marked offline when the session was lost are the ones the
  // roll call of the next session waits for.
  int64_t expect = *n;
  if (session_began) {
    expect += cell.unheard.exchange(0);
    // A cell taken over from another hub: none of its devices were heard
    // here, and every one of them is expected to answer.
    if (cfg_.share_cells) expect = std::max(expect, cell_devices_[static_cast<size_t>(cell.id())]);
  } else {
    cell.unheard += *n;
  }
  // About a thousand answers a second for a whole fleet, never over the
  // agents' own cap; gateways answer for all their devices at once.
  const auto spread = static_cast<uint32_t>(std::clamp<int64_t>(expect, 0, transport::kMaxRollcallSpreadMs));
  if (session_began) rollcall_spread_ms_ = spread;
  // The wait ends early once as many devices re-announced as were reset;
  // resets of several cells (or a loss and the next session) that overlap
  // add up, each device once.
  const int64_t now = clock_.now_unix_ms();
  const int64_t until = expect > 0 ? now + spread + kPresenceSettleMarginMs : 0;
  if (session_began) cell.settle_until_ms = until;
  if (presence_settle_until_ms_.load() > now) {
    presence_reset_count_ += *n;
    presence_settle_until_ms_ = std::max(presence_settle_until_ms_.load(), until);
  } else {
    presence_reset_count_ = expect;
    reannounced_ = 0;
    presence_settle_until_ms_ = until;
  }
  ++presence_resets_;
  ++cell.presence_resets;
  if (session_began) {
    log::get("hub")->info("broker session began cell={}: presence of {} devices is unknown until they re-announce "
                          "(roll call spread {} ms)", cell.id(), expect, spread);
  } else {
    log::get("hub")->warn("lost the broker session cell={}: {} devices marked offline until they re-announce",
                          cell.id(), *n);
  }
}

bool HubService::mqtt_connected() const {
  // Hubs sharing cells: connected to the brokers of the cells it holds.
  return std::all_of(cells_.begin(), cells_.end(),
                     [this](const auto& c) { return !serves_cell(c->id()) || c->connected(); });
}

Result<CreatedToken> HubService::create_token(const std::string& kind, TokenRecord rec,
                                             std::chrono::milliseconds ttl) {
  CreatedToken out;
  if (ttl.count() > 0) rec.expires_unix = clock_.now_unix() + std::max<int64_t>(1, ttl.count() / 1000);
  // The prefix says what a leaked string is (like GitHub's ghp_); the rest is 256 random bits.
  out.secret = (kind == "api" ? "flt_api_" : "flt_enr_") + crypto::random_token(32);
  rec.id = (kind == "api" ? "tok-" : "enr-") + crypto::random_token(6);
  rec.created_ms = clock_.now_unix_ms();
  auto stored = control_write([&]() -> Status {
    std::lock_guard lock(store_mu_);
    return store_.insert_token(kind, rec, crypto::sha256_hex(out.secret));
  });
  if (!stored) return stored.error();
  out.record = rec;
  return out;
}

Result<std::optional<TokenRecord>> HubService::authenticate(const std::string& kind, const std::string& secret) {
  // Every API call starts here: on a read connection when the hub has one,
  // so that no call waits behind a report batch or an engine tick holding
  // the writer (seconds at 250,000 devices). It sees every committed token
  // change, and a change is committed before its answer is sent.
  const std::string hash = crypto::sha256_hex(secret);
  auto t = [&]() -> Result<std::optional<TokenRecord>> {
    if (AggregateStore* a = reads()) return a->token(kind, hash);
    std::lock_guard lock(store_mu_);
    return store_.find_token(kind, hash);
  }();
  if (!t) return t.error();
  if (!*t) return std::optional<TokenRecord>();
  const auto& rec = **t;
  if (rec.revoked) return std::optional<TokenRecord>();
  if (rec.expires_unix != 0 && rec.expires_unix <= clock_.now_unix()) return std::optional<TokenRecord>();
  return t;
}

namespace {

// A device's key, and its proof that it holds that key, bound to the token
// (and, with issued_unix_ms, to when it asked). Checked before anything
// touches the store.
Status check_enrollee_proof(const v1::EnrollRequest& req, const std::string& token_secret) {
  if (req.device_public_key().size() != 32) {
    return make_error(Errc::invalid_argument, "device_public_key must be a 32-byte Ed25519 public key");
  }
  if (req.issued_unix_ms() > static_cast<uint64_t>(INT64_MAX)) {
    return make_error(Errc::invalid_argument, "issued_unix_ms is out of range");
  }
  const Bytes pub(req.device_public_key().begin(), req.device_public_key().end());
  const Bytes proof(req.proof().begin(), req.proof().end());
  const std::string message = req.issued_unix_ms() != 0
                                  ? bundles::enroll_proof_message(token_secret, pub, req.issued_unix_ms())
                                  : bundles::enroll_proof_message(token_secret, pub);
  if (!bundles::verify_detached(pub, message, proof)) {
    return make_error(Errc::invalid_argument, "enrollment proof does not verify: the request must be signed by "
                                              "the device key it enrolls");
  }
  return {};
}

// A device may carry at most this many labels (the same bound as label edits).
constexpr size_t kMaxDeviceLabels = 64;

// The device row an enrollment creates or refreshes. Labels come from the
// token: a device may repeat a label the token sets, and choose the value of
// a key the token lists in device_label_keys; anything else is refused, so
// a leaked token cannot enroll a device into another group's campaigns.
Result<DeviceRecord> enrollee_record(const v1::EnrollRequest& req, const TokenRecord& token,
                                     const std::string& gateway, int64_t now_ms) {
  DeviceRecord d;
  for (const auto& [k, v] : req.labels()) {
    if (!valid_label_key(k) || !valid_label_value(v)) {
      return make_error(Errc::invalid_argument, "bad label " + k + "=" + v);
    }
    if (auto fixed = token.labels.find(k); fixed != token.labels.end()) {
      if (fixed->second != v) {
        return make_error(Errc::permission_denied, "label " + k + "=" + v + ": the enrollment token sets " + k + "=" +
                                                       fixed->second + "; a device cannot choose another value");
      }
    } else if (std::find(token.device_label_keys.begin(), token.device_label_keys.end(), k) ==
               token.device_label_keys.end()) {
      std::string allowed;
      for (const auto& a : token.device_label_keys) allowed += (allowed.empty() ? "" : ", ") + a;
      return make_error(Errc::permission_denied,
                        "label '" + k + "' is not one this enrollment token lets a device choose (device_label_keys: " +
                            (allowed.empty() ? std::string("none") : allowed) +
                            "); a device's labels come from its token");
    }
    d.labels[k] = v;
  }
  for (const auto& [k, v] : token.labels) d.labels[k] = v;
  if (d.labels.size() > kMaxDeviceLabels) {
    return make_error(Errc::invalid_argument, "a device may carry at most " + std::to_string(kMaxDeviceLabels) + " labels");
  }
  d.enroll_issued_ms = req.issued_unix_ms();
  // The id derives from the device's key: a device that re-enrolls with the
  // same identity keeps its id, its history and its campaign state.
  d.id = "d-" + crypto::sha256_hex(req.device_public_key()).substr(0, 20);
  d.project = token.project;
  d.public_key_hex = to_hex(req.device_public_key());
  d.hostname = req.hostname().substr(0, 253);
  d.arch = req.arch().substr(0, 32);
  d.agent_version = req.agent_version().substr(0, 64);
  d.enrolled_ms = now_ms;
  d.gateway = gateway;
  if (d.gateway == d.id) return make_error(Errc::invalid_argument, "a device cannot be its own gateway");
  return d;
}

}  // namespace

Result<TokenRecord> HubService::usable_enrollment_token(const std::string& secret) {
  auto tok = authenticate("enroll", secret);
  if (!tok) return tok.error();
  if (!*tok) return make_error(Errc::unauthenticated, "enrollment token is unknown, expired or revoked");
  if ((*tok)->max_uses > 0 && (*tok)->uses >= (*tok)->max_uses) {
    return make_error(Errc::permission_denied, "enrollment token has been used up");
  }
  return **tok;
}

Result<Bytes> HubService::gateway_identity(const std::string& gateway_id, const std::string& project) {
  std::lock_guard lock(store_mu_);
  auto gw = store_.directory_entry(gateway_id);
  if (!gw) return gw.error();
  // A gateway relays its devices' desired states (bundle files included):
  // only devices of its own project may sit behind it. Another project's
  // gateway is answered like an unknown one.
  if (!*gw || (*gw)->decommissioned || !(*gw)->gateway.empty() || (*gw)->project != project) {
    return make_error(Errc::permission_denied, "gateway " + gateway_id + " is not an enrolled device of project " +
                                               project + " with its own broker session");
  }
  auto key = from_hex((*gw)->public_key_hex);
  if (!key) return make_error(Errc::internal, "gateway " + gateway_id + " has no readable identity key");
  return *key;
}

Status HubService::check_reenrollment(const DeviceRecord& d, int* cell) {
  if (cell) *cell = -1;
  auto existing = store_.directory_entry(d.id);
  if (!existing) return existing.error();
  if (!*existing) return {};
  const DeviceDirectoryEntry& e = **existing;
  if (cell) *cell = e.cell;
  if (e.decommissioned) {
    // Decommissioning is final for an identity: a device that comes back
    // must be wiped and enroll with a new key (docs/security.md).
    return make_error(Errc::permission_denied, "device " + d.id + " was decommissioned; it must enroll with a "
                                               "new identity");
  }
  if (e.public_key_hex != d.public_key_hex) return make_error(Errc::conflict, "device id collision");
  // Every object stays in one project: a token of another project cannot
  // move an enrolled device (and its history) into it.
  if (e.project != d.project) {
    return make_error(Errc::conflict, "device " + d.id + " is enrolled in project " + e.project +
                                          "; an enrollment token of project " + d.project + " cannot move it");
  }
  // Moving a device between its own session and a gateway would leave a
  // credential or a topic tree behind: a device keeps the way it enrolled.
  if (e.gateway != d.gateway) {
    return make_error(Errc::conflict, "device " + d.id + " enrolled " +
                                          (e.gateway.empty() ? std::string("with its own session")
                                                             : "behind gateway " + e.gateway) +
                                          "; it cannot change that");
  }
  // Replay: the same (or an older) signed request again would reset the
  // device's broker password and lock the real device out. A device that
  // enrolls again signs a newer issued_unix_ms; the older proof without one
  // is taken only for a key the hub has never seen.
  if (d.enroll_issued_ms == 0) {
    return make_error(Errc::conflict, "device " + d.id + " is already enrolled; enrolling it again needs a proof "
                                      "with issued_unix_ms (an agent that signs it), so a captured request cannot "
                                      "be replayed");
  }
  if (d.enroll_issued_ms <= e.enroll_issued_ms) {
    return make_error(Errc::conflict, "this enrollment request is not newer than device " + d.id +
                                          "'s last one (issued_unix_ms must be above " +
                                          std::to_string(e.enroll_issued_ms) + "); a replayed request changes nothing");
  }
  return {};
}

v1::EnrollResponse HubService::enroll_response(const DeviceRecord& d) const {
  v1::EnrollResponse resp;
  resp.set_device_id(d.id);
  resp.set_broker_url(cell_broker_url(d.cell));
  resp.set_topic_prefix(d.gateway.empty() ? std::string(transport::kTopicRoot) + d.id
                                          : transport::gateway_prefix(d.gateway) + d.id);
  resp.set_artifact_base_url(cfg_.public_url + "/v1/artifacts/");
  for (const auto& [k, v] : d.labels) (*resp.mutable_labels())[k] = v;
  const auto& director = cfg_.director_key->pub.key;
  resp.set_director_public_key(std::string(director.begin(), director.end()));
  return resp;
}

Result<v1::EnrollResponse> HubService::enroll(const v1::EnrollRequest& req, AuditRecord* audit) {
  if (auto s = check_enrollee_proof(req, req.enrollment_token()); !s) return s.error();
  auto token = usable_enrollment_token(req.enrollment_token());
  if (!token) return token.error();
  if (!req.gateway_id().empty()) {
    // The gateway vouches for the device with its own identity key; the
    // device's proof above shows the device holds its key.
    auto gw_key = gateway_identity(req.gateway_id(), token->project);
    if (!gw_key) return gw_key.error();
    const Bytes pub(req.device_public_key().begin(), req.device_public_key().end());
    const Bytes gw_proof(req.gateway_proof().begin(), req.gateway_proof().end());
    if (!bundles::verify_detached(*gw_key, bundles::enroll_proof_message(req.enrollment_token(), pub), gw_proof)) {
      return make_error(Errc::permission_denied, "gateway proof does not verify: it must be signed by the identity "
                                                 "key of gateway " + req.gateway_id());
    }
  }
  auto rec = enrollee_record(req, *token, req.gateway_id(), clock_.now_unix_ms());
  if (!rec) return rec.error();
  DeviceRecord& d = *rec;
  v1::EnrollResponse resp = enroll_response(d);
  // A device with its own session authenticates to the broker by a
  // certificate for its identity key. Made before the store lock: signing is
  // the costly part, and a refused request has stored nothing.
  std::optional<DeviceCertRecord> cert;
  const bool own_session = d.gateway.empty();
  // Passwords only for a broker that takes them: the development mode, or
  // a hub made without a device CA (unit tests of the password path).
  const bool passwords = cfg_.broker_passwords || !cfg_.device_ca;
  if (own_session && !cfg_.broker_passwords && cfg_.device_ca) {
    if (req.csr().empty()) {
      if (cfg_.manage_broker_credentials) {
        return make_error(Errc::invalid_argument, "this hub's broker authenticates devices by certificate; the "
                                                  "enrollment request carries no csr (upgrade the agent)");
      }
    } else {
      auto issued = certificate_for(req.csr(), req.device_public_key(), d.id);
      if (!issued) return issued.error();
      resp.set_client_certificate(issued->first.client_certificate());
      resp.set_ca_certificates(issued->first.ca_certificates());
      cert = std::move(issued->second);
    }
  }
  bool dropped_password = false;
  std::optional<AuditRecord> record;
  // Counted in its cell inside the work, so that enrollments sharing one
  // commit spread over the cells too; taken back if the work is not stored.
  bool counted = false;
  // In its own savepoint of a commit shared with the enrollments that queued
  // meanwhile (GroupCommit): every check and write below is as if alone, and
  // nothing is answered before it is durable.
  auto stored = enroll_commits_.run([&]() -> Status {
    dropped_password = false;
    record.reset();
    if (counted) {  // run again (the control log): counted afresh below
      --cell_devices_[static_cast<size_t>(d.cell)];
      counted = false;
    }
    int had_cell = -1;
    if (auto s = check_reenrollment(d, &had_cell); !s) return s.error();
    // Stable: a device enrolling again keeps its cell (and broker).
    if (had_cell >= 0) {
      d.cell = had_cell;
    } else {
      auto c = cell_for_new_device(d);
      if (!c) return c.error();
      d.cell = *c;
    }
    resp.set_broker_url(cell_broker_url(d.cell));
    // Checked and counted in one statement, under the write lock, so
    // concurrent enrollments cannot overspend a single-use token.
    auto claimed = store_.claim_token_use(token->id);
    if (!claimed) return claimed.error();
    if (!*claimed) return make_error(Errc::permission_denied, "enrollment token has been used up");
    // Its outbox entry is this hub's own, whichever follow takes it.
    if (auto s = store_.local_directory_write([&] { return store_.upsert_enrolled_device(d); }); !s) return s.error();
    note_member_zones({d});
    if (cert) {
      if (auto s = store_.insert_device_cert(*cert); !s) return s.error();
      // Enrolled again with a certificate: a password from before goes.
      if (cfg_.manage_broker_credentials) {
        auto had = store_.has_credential(d.id);
        if (!had) return had.error();
        if (*had) {
          if (auto s = store_.delete_credential(d.id); !s) return s.error();
          dropped_password = true;
        }
      }
    } else if (cfg_.manage_broker_credentials && passwords && own_session) {
      // Development mode: a password, which the broker learns by a reload.
      // A device behind a gateway has no broker credential at all.
      const std::string password = crypto::random_token(24);
      if (auto s = store_.upsert_credential(d.id, mosquitto_password_hash(password)); !s) return s.error();
      resp.set_mqtt_username(d.id);
      resp.set_mqtt_password(password);
    }
    if (audit) {
      record = *audit;
      record->detail = "enrolled device " + d.id;
      if (record->time_ms == 0) record->time_ms = clock_.now_unix_ms();
      if (auto id = store_.append_audit(*record); !id) return id.error();
    }
    if (had_cell < 0 && d.cell < cell_count()) {
      ++cell_devices_[static_cast<size_t>(d.cell)];
      counted = true;
    }
    return {};
  });
  if (!stored) {
    if (counted) {
      std::lock_guard lock(store_mu_);
      --cell_devices_[static_cast<size_t>(d.cell)];
    }
    return stored.error();
  }
  follow_own_write();  // live campaigns it matches
  if (record) {
    *audit = std::move(*record);
    audit->stored = true;
  }
  if (cert) ++certificates_issued_;
  // Only a password change reaches the broker; a certificate changes nothing there.
  if (dropped_password || (own_session && passwords && cfg_.manage_broker_credentials)) {
    if (auto s = sync_broker_credentials(); !s) return s.error().with_context("update broker credentials");
  }
  if (own_session) {
    log::get("hub")->info("enrolled device={} arch={} token={}{}", d.id, d.arch, token->id,
                          cert ? " certificate=" + cert->serial : std::string());
  } else {
    log::get("hub")->debug("enrolled device={} gateway={} token={}", d.id, d.gateway, token->id);
  }
  return resp;
}

Result<std::pair<v1::EnrollResponse, DeviceCertRecord>> HubService::certificate_for(const std::string& csr,
                                                                                   const std::string& device_key,
                                                                                   const std::string& device_id) {
  const int64_t now = clock_.now_unix();
  auto issued = cfg_.device_ca->issue_for_csr(csr, Bytes(device_key.begin(), device_key.end()), device_id, now,
                                              cfg_.cert_lifetime_s);
  if (!issued) return issued.error();
  v1::EnrollResponse r;
  r.set_client_certificate(issued->pem);
  r.set_ca_certificates(cfg_.ca_certificates);
  DeviceCertRecord rec;
  rec.serial = issued->serial_hex;
  rec.device_id = device_id;
  rec.not_before = issued->not_before_unix;
  rec.not_after = issued->not_after_unix;
  rec.issued_ms = clock_.now_unix_ms();
  return std::make_pair(std::move(r), std::move(rec));
}

Result<v1::RenewResponse> HubService::renew(const v1::RenewRequest& req) {
  if (!cfg_.device_ca) return make_error(Errc::not_found, "this hub issues no device certificates");
  if (cfg_.broker_passwords) {
    return make_error(Errc::conflict, "this hub's embedded broker takes passwords (development mode, plain MQTT); "
                                      "there is no certificate to renew");
  }
  if (req.device_id().empty() || req.device_id().size() > 64) {
    return make_error(Errc::invalid_argument, "device_id must be 1 to 64 characters");
  }
  if (req.issued_unix_ms() == 0 || req.issued_unix_ms() > static_cast<uint64_t>(INT64_MAX)) {
    return make_error(Errc::invalid_argument, "issued_unix_ms must be set (ms since the epoch)");
  }
  // Bounded before the proof is checked over it; the same words as the CA's own check.
  if (req.csr().size() > x509::kMaxCsrBytes) {
    return make_error(Errc::invalid_argument, "csr is " + std::to_string(req.csr().size()) + " bytes; at most " +
                                                  std::to_string(x509::kMaxCsrBytes));
  }
  std::optional<DeviceDirectoryEntry> dev;
  {
    std::lock_guard lock(store_mu_);
    auto d = store_.directory_entry(req.device_id());
    if (!d) return d.error();
    dev = std::move(*d);
  }
  if (!dev) return make_error(Errc::not_found, "no device '" + req.device_id() + "'; it must enroll");
  auto key = from_hex(dev->public_key_hex);
  if (!key) return make_error(Errc::internal, "device " + dev->id + " has no readable identity key");
  // The proof first: nothing about the device is told to whoever cannot sign as it.
  const Bytes proof(req.proof().begin(), req.proof().end());
  if (!bundles::verify_detached(*key, bundles::renew_proof_message(dev->id, req.csr(), req.issued_unix_ms()), proof)) {
    return make_error(Errc::invalid_argument, "renewal proof does not verify: the request must be signed by the "
                                              "device's identity key");
  }
  if (dev->decommissioned) {
    return make_error(Errc::permission_denied, "device " + dev->id + " was decommissioned; it must enroll with a new "
                                               "identity");
  }
  if (!dev->gateway.empty()) {
    return make_error(Errc::invalid_argument, "device " + dev->id + " talks through gateway " + dev->gateway +
                                                  "; it has no broker certificate of its own");
  }
  auto issued = certificate_for(req.csr(), std::string(key->begin(), key->end()), dev->id);
  if (!issued) return issued.error();
  bool dropped_password = false;
  auto renewed = control_write([&]() -> Status {
    std::lock_guard lock(store_mu_);
    dropped_password = false;
    // Read again under the lock: a decommission or another renewal may have
    // come between.
    auto now = store_.directory_entry(dev->id);
    if (!now) return now.error();
    if (!*now || (*now)->decommissioned) {
      return make_error(Errc::permission_denied, "device " + dev->id + " was decommissioned");
    }
    if (req.issued_unix_ms() <= (*now)->enroll_issued_ms) {
      return make_error(Errc::conflict, "this renewal request is not newer than device " + dev->id +
                                            "'s last enrollment or renewal (issued_unix_ms must be above " +
                                            std::to_string((*now)->enroll_issued_ms) +
                                            "); a replayed request changes nothing");
    }
    sql::Transaction tx(store_.db());
    if (auto s = store_.set_enroll_issued_ms(dev->id, req.issued_unix_ms()); !s) return s.error();
    if (auto s = store_.insert_device_cert(issued->second); !s) return s.error();
    if (cfg_.manage_broker_credentials) {
      auto had = store_.has_credential(dev->id);
      if (!had) return had.error();
      if (*had) {
        if (auto s = store_.delete_credential(dev->id); !s) return s.error();
        dropped_password = true;
      }
    }
    return tx.commit();
  });
  if (!renewed) return renewed.error();
  ++certificates_issued_;
  ++renewals_;
  if (dropped_password) {
    // The device moved to certificates: its password stops working now.
    if (auto s = sync_broker_credentials(); !s) {
      log::get("hub")->warn("device={} moved to certificates, but the broker did not reload its password file: {}",
                            dev->id, s.error().message);
    }
  }
  log::get("hub")->info("renewed device={} certificate={} not_after={}{}", dev->id, issued->second.serial,
                        issued->second.not_after, dropped_password ? " (moved from a password)" : "");
  v1::RenewResponse out;
  out.set_client_certificate(issued->first.client_certificate());
  out.set_ca_certificates(issued->first.ca_certificates());
  out.set_broker_url(cell_broker_url(dev->cell));
  return out;
}

Result<v1::EnrollBatchResponse> HubService::enroll_batch(const v1::EnrollBatchRequest& req) {
  if (req.gateway_id().empty()) {
    return make_error(Errc::invalid_argument, "gateway_id is required: a batch enrolls devices behind one gateway "
                                              "(a device with its own session enrolls with POST /v1/enroll)");
  }
  if (req.devices_size() == 0) return make_error(Errc::invalid_argument, "the batch has no devices");
  if (req.devices_size() > static_cast<int>(kMaxEnrollBatch)) {
    return make_error(Errc::too_large, "at most " + std::to_string(kMaxEnrollBatch) + " devices per batch, got " +
                                           std::to_string(req.devices_size()));
  }
  auto token = usable_enrollment_token(req.enrollment_token());
  if (!token) return token.error();
  auto gw_key = gateway_identity(req.gateway_id(), token->project);
  if (!gw_key) return gw_key.error();
  std::vector<std::string> keys;
  keys.reserve(req.devices_size());
  for (const auto& item : req.devices()) keys.push_back(item.device_public_key());
  const Bytes gw_proof(req.gateway_proof().begin(), req.gateway_proof().end());
  if (!bundles::verify_detached(*gw_key, bundles::enroll_batch_proof_message(req.enrollment_token(), req.gateway_id(),
                                                                             keys),
                                gw_proof)) {
    return make_error(Errc::permission_denied, "gateway proof does not verify: the batch must be signed by the "
                                               "identity key of gateway " + req.gateway_id());
  }

  // Each device is judged on its own; only the ones that pass are written.
  v1::EnrollBatchResponse out;
  std::vector<std::optional<DeviceRecord>> recs(req.devices_size());
  std::set<std::string> seen;
  auto refuse = [&](int i, const Error& e) {
    auto* r = out.mutable_results(i);
    r->set_error_code(std::string(errc_name(e.code)));
    r->set_error_message(e.message);
  };
  const int64_t now = clock_.now_unix_ms();
  for (int i = 0; i < req.devices_size(); ++i) {
    out.add_results();
    const auto& item = req.devices(i);
    if (!item.enrollment_token().empty() || !item.gateway_id().empty() || !item.gateway_proof().empty()) {
      refuse(i, Error{Errc::invalid_argument, "enrollment_token and the gateway belong to the batch, not to its "
                                              "devices"});
      continue;
    }
    if (auto s = check_enrollee_proof(item, req.enrollment_token()); !s) {
      refuse(i, s.error());
      continue;
    }
    auto rec = enrollee_record(item, *token, req.gateway_id(), now);
    if (!rec) {
      refuse(i, rec.error());
      continue;
    }
    if (!seen.insert(rec->id).second) {
      refuse(i, Error{Errc::invalid_argument, "device " + rec->id + " appears twice in the batch"});
      continue;
    }
    recs[i] = std::move(*rec);
  }
  size_t enrolled = 0;
  std::vector<DeviceRecord> stored;
  int64_t fresh = 0;
  int gw_cell = 0;
  auto batch_stored = control_write([&]() -> Status {
    std::lock_guard lock(store_mu_);
    enrolled = 0;
    stored.clear();
    fresh = 0;
    // Behind one gateway, in the gateway's cell: its session carries them.
    {
      DeviceRecord probe;
      probe.gateway = req.gateway_id();
      auto c = cell_for_new_device(probe);
      if (!c) return c.error();
      gw_cell = *c;
    }
    sql::Transaction tx(store_.db());
    for (int i = 0; i < req.devices_size(); ++i) {
      if (!recs[i]) continue;
      DeviceRecord& d = *recs[i];
      int had_cell = -1;
      if (auto s = check_reenrollment(d, &had_cell); !s) {
        if (s.error().code == Errc::internal || s.error().code == Errc::io) return s.error();
        refuse(i, s.error());
        continue;
      }
      auto claimed = store_.claim_token_use(token->id);
      if (!claimed) return claimed.error();
      if (!*claimed) {
        refuse(i, Error{Errc::permission_denied, "enrollment token has been used up"});
        continue;
      }
      d.cell = had_cell >= 0 ? had_cell : gw_cell;
      if (had_cell < 0) ++fresh;
      if (auto s = store_.local_directory_write([&] { return store_.upsert_enrolled_device(d); }); !s) {
        return s.error();
      }
      *out.mutable_results(i)->mutable_enrolled() = enroll_response(d);
      stored.push_back(d);
      ++enrolled;
    }
    note_member_zones(stored);
    return tx.commit();
  });
  if (!batch_stored) return batch_stored.error();
  follow_own_write();  // live campaigns they match
  if (gw_cell < cell_count()) {
    std::lock_guard lock(store_mu_);
    cell_devices_[static_cast<size_t>(gw_cell)] += fresh;
  }
  log::get("hub")->info("enrolled batch gateway={} devices={} refused={} token={}", req.gateway_id(), enrolled,
                        req.devices_size() - enrolled, token->id);
  return out;
}

// Rebuilds the broker's password file from the store. Each caller's change
// is committed before it asks; a rebuild that read the store after that
// change covers it, so concurrent enrollments share one rewrite and none
// is lost to an older rewrite landing last.
Status HubService::sync_broker_credentials() {
  if (!cfg_.manage_broker_credentials || !cells_.front()->broker()) return {};
  const uint64_t ticket = ++cred_changes_;
  std::lock_guard sync(cred_sync_mu_);
  if (cred_synced_ >= ticket) return {};
  const uint64_t covers = cred_changes_.load();
  EmbeddedBroker::Credentials creds;
  {
    std::lock_guard lock(store_mu_);
    auto all = store_.credentials();
    if (!all) return all.error();
    creds = std::move(*all);
  }
  // Every cell's broker holds every password: a device moved by a drain
  // logs in at its new broker with the password it has.
  for (auto& c : cells_) {
    if (!c->broker()) continue;
    if (auto s = c->broker()->set_device_credentials(creds); !s) return s.error().with_context("cell " +
                                                                                                std::to_string(c->id()));
  }
  cred_synced_ = covers;
  return {};
}

namespace {
// How long a revocation list is valid, and when the hub makes the next one:
// an external broker that fetches it daily (GET /v1/device-ca/crl) always
// holds a valid one, and the embedded broker reloads for it every ten days.
constexpr int64_t kCrlValidity = HubService::kCrlValiditySeconds;
constexpr int64_t kCrlRefreshBefore = int64_t{20} * 86400;
}  // namespace

Status HubService::sync_broker_revocations() {
  if (!cfg_.device_ca) return {};
  const uint64_t ticket = ++crl_changes_;
  std::lock_guard sync(crl_sync_mu_);
  if (crl_synced_ >= ticket) return {};
  const uint64_t covers = crl_changes_.load();
  const int64_t now = clock_.now_unix();
  DeviceCa::Revoked revoked;
  {
    std::lock_guard lock(store_mu_);
    auto r = store_.revoked_unexpired_certs(now);
    if (!r) return r.error();
    revoked = std::move(*r);
  }
  // The broker proves it loaded this list by refusing a certificate that
  // only this list revokes: one made for the purpose, valid ten minutes.
  std::optional<IssuedCertificate> probe;
  const bool any_cert_broker = std::any_of(cells_.begin(), cells_.end(), [](const auto& c) {
    return c->broker() && c->broker()->certificate_auth();
  });
  if (any_cert_broker) {
    auto p = cfg_.device_ca->issue_client("flotilla-crl-probe", now, 600);
    if (!p) return p.error();
    probe = std::move(*p);
    revoked.emplace_back(probe->serial_hex, now);
  }
  auto crl = cfg_.device_ca->crl_pem(revoked, now, kCrlValidity);
  if (!crl) return crl.error();
  if (probe) {
    // The same list for every cell: a revoked device is refused by all brokers.
    for (auto& c : cells_) {
      if (!c->broker() || !c->broker()->certificate_auth()) continue;
      if (auto s = c->broker()->set_crl(*crl, ClientIdentity{probe->pem, probe->key_pem}); !s) {
        return s.error().with_context("cell " + std::to_string(c->id()));
      }
    }
  }
  {
    std::lock_guard lock(crl_mu_);
    crl_pem_ = std::move(*crl);
    crl_next_update_ = now + kCrlValidity;
  }
  crl_synced_ = covers;
  return {};
}

std::string HubService::device_ca_pem() const { return cfg_.device_ca ? cfg_.device_ca->trust_pem() : std::string(); }

std::string HubService::crl_pem() const {
  std::lock_guard lock(crl_mu_);
  return crl_pem_;
}

void HubService::maintain_certificates() {
  if (!cfg_.device_ca) return;
  const int64_t now = clock_.now_unix();
  {
    // A day of grace: a certificate that just expired is still named in
    // logs and by a device that renews late.
    auto n = control_write([&]() -> Result<int64_t> {
      std::lock_guard lock(store_mu_);
      return store_.prune_device_certs(now - 86400);
    });
    if (!n) {
      log::get("hub")->warn("forget expired device certificates: {}", n.error().message);
    } else if (*n > 0) {
      log::get("hub")->info("forgot {} expired device certificates", *n);
    }
  }
  int64_t next_update = 0;
  {
    std::lock_guard lock(crl_mu_);
    next_update = crl_next_update_;
  }
  if (next_update - now < kCrlRefreshBefore) {
    if (auto s = sync_broker_revocations(); !s) {
      log::get("hub")->error("refresh the revocation list: {}", s.error().message);
    }
  }
}

bool HubService::is_decommissioned(const std::string& id) const {
  if (!any_decommissioned_) return false;
  std::lock_guard lock(decommissioned_mu_);
  return decommissioned_.count(id) > 0;
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
  b.id = bundle_id(project, b.digest);
  b.project = project;
  b.name = m.name();
  b.channel = m.channel();
  b.version = m.version();
  b.expires_unix = m.expires_unix();
  b.signatures = env->signatures_size();
  b.uploaded_ms = clock_.now_unix_ms();
  b.envelope = bundles::serialize_envelope(*env);
  return control_write([&]() -> Result<std::pair<BundleRecord, bool>> {
    std::lock_guard lock(store_mu_);
    // Within the uploader's project only: another project's upload of the
    // same manifest is another bundle, and never adds signatures to this one.
    if (auto existing = store_.find_bundle_by_digest(project, b.digest, true); !existing) {
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
        // Desired states published from now on carry the new signatures
        // (the multi-signer workflow): drop the envelope kept for publishing.
        bundle_cache_.erase(rec.id);
        log::get("hub")->info("bundle id={} now carries {} signatures", rec.id, rec.signatures);
      }
      rec.envelope.clear();
      return std::make_pair(rec, false);
    }
    if (auto s = store_.insert_bundle(b); !s) return s.error();
    log::get("hub")->info("stored bundle id={} name={} version={}", b.id, b.name, b.version);
    BundleRecord out = b;
    out.envelope.clear();
    return std::make_pair(out, true);
  });
}

Result<std::vector<BundleRecord>> HubService::list_bundles(const std::string& project) {
  return read([&](Store& from) { return from.list_bundles(project); });
}

Result<std::optional<BundleRecord>> HubService::get_bundle(const std::string& key, const std::string& project) {
  return read([&](Store& from) { return from.get_bundle(key, false, project); });
}

Result<HubService::SharedDesiredPtr> HubService::desired_shared(const std::string& bundle_id,
                                                                 std::map<std::string, SharedDesiredPtr>& cache) {
  if (auto it = cache.find(bundle_id); it != cache.end()) return it->second;
  auto b = bundle_with_envelope(bundle_id);
  if (!b) return b.error();
  v1::DesiredState ds;
  if (!ds.mutable_bundle()->ParseFromString(b->envelope)) {
    return make_error(Errc::internal, "stored bundle " + b->id + " does not parse");
  }
  ds.set_artifact_base_url(cfg_.public_url + "/v1/artifacts/");
  auto trust = store_.get_trust();
  if (!trust) return trust.error().with_context("trust for desired state");
  if (*trust && !ds.mutable_trust()->ParseFromString((*trust)->first)) {
    return make_error(Errc::internal, "stored trust message does not parse");
  }
  const auto digest = crypto::sha256(ds.bundle().manifest());
  auto shared = std::make_shared<const SharedDesired>(SharedDesired{
      ds.SerializeAsString(), std::string(digest.begin(), digest.end()), ds.artifact_base_url()});
  cache.emplace(bundle_id, shared);
  return shared;
}

Status HubService::publish_desired(const PendingDesired& p) {
  Cell& cell = *cells_.at(p.cell >= 0 && p.cell < cell_count() ? static_cast<size_t>(p.cell) : 0);
  transport::Transport* t = cell.transport();
  if (!t) return make_error(Errc::unavailable, "no connection to the broker of cell " + std::to_string(cell.id()), true);
  v1::DesiredState head;
  head.set_device_id(p.device_id);
  head.set_generation(p.generation);
  head.set_campaign_id(p.campaign_id);
  head.set_issued_unix_ms(clock_.now_unix_ms());
  head.set_rollback(p.rollback);
  // The same fields, signed for this device: agents that pin the director
  // key act on nothing else. Only this small part is signed per device; it
  // binds the shared tail by the manifest's SHA-256 and the artifact base.
  v1::DesiredHeader h;
  h.set_device_id(p.device_id);
  h.set_generation(p.generation);
  h.set_campaign_id(p.campaign_id);
  h.set_issued_unix_ms(head.issued_unix_ms());
  h.set_rollback(p.rollback);
  h.set_manifest_sha256(p.shared->manifest_sha256);
  h.set_artifact_base_url(p.shared->artifact_base_url);
  for (const auto& [k, v] : p.labels) (*h.mutable_labels())[k] = v;
  h.set_labels_set(true);
  if (!p.move_to.empty()) h.set_broker_url(p.move_to);
  if (p.rotate_certificates) h.set_k3s_action(v1::K3S_ACTION_ROTATE_CERTIFICATES);
  *head.mutable_header() = bundles::sign_desired_header(h, *cfg_.director_key);
  // Protobuf merges concatenated encodings of one message: head + shared
  // parses as the whole DesiredState, with the shared bytes copied once here
  // instead of re-encoded per device.
  std::string payload = head.SerializeAsString();
  payload += p.shared->bytes;
  auto published = t->publish({transport::device_topic(p.device_id, p.gateway, "desired"),
                                        std::move(payload), 1, true});
  ++(published ? desired_published_ : desired_publish_failures_);
  if (published) ++cell.desired_published;
  return published;
}

void HubService::publish_all(const Publishes& publishes, const char* what) {
  for (const auto& p : publishes) {
    // Shutting down: the rows are committed as pending, so the next start's
    // republish_pending() sends what is left.
    if (stopping_) break;
    if (auto s = publish_desired(p); !s) {
      log::get("hub")->warn("publish {} device={} failed, will retry at reconnect: {}", what, p.device_id,
                            s.error().message);
    }
  }
}

AggregateStore* HubService::reads() {
  if (AggregateStore* a = aggregates_) return a;
  std::call_once(own_reads_once_, [this] {
    const char* file = sqlite3_db_filename(store_.db().raw(), "main");
    if (!file || !*file) return;
    AggregateStore::Config rc;
    rc.readers = 2;
    for (Store* f : cfg_.cell_files) rc.cell_files.emplace_back(sqlite3_db_filename(f->db().raw(), "main"));
    if (auto a = AggregateStore::open(file, rc)) {
      own_reads_ = std::move(*a);
    } else {
      log::get("hub")->error("open read connections: {}", a.error().message);
    }
  });
  return own_reads_.get();
}

void HubService::read_store(const std::function<void(Store&)>& f) {
  AggregateStore* a = reads();
  if (!a) {
    std::lock_guard lock(store_mu_);
    f(store_);
    return;
  }
  auto lease = a->reader();
  auto cells = a->cell_readers();
  // One snapshot of each file for the whole read: a campaign's totals, its
  // cells' counts and its waves agree with each other even while reports
  // commit. A deferred BEGIN takes no lock a writer waits for.
  // Ended however f leaves (a pooled connection left inside a transaction
  // would answer from that old snapshot for good).
  struct Snapshot {
    sql::Db& db;
    bool open;
    explicit Snapshot(sql::Db& d) : db(d), open(static_cast<bool>(d.exec("BEGIN"))) {}
    Snapshot(const Snapshot&) = delete;
    ~Snapshot() {
      if (open && !db.exec("COMMIT")) (void)db.exec("ROLLBACK");
    }
  };
  std::list<Snapshot> snapshots;
  snapshots.emplace_back(lease.db());
  std::vector<DeviceStore*> parts;
  for (auto& c : cells) {
    snapshots.emplace_back(c.db());
    parts.push_back(&c.store());
  }
  // The cells' connections go back to their pools when this returns: the
  // hub.db connection must not point at them after.
  struct Parts {
    Store& s;
    ~Parts() { s.set_read_parts({}); }
  } unset{lease.store()};
  lease.store().set_read_parts(std::move(parts));
  f(lease.store());
}

Result<std::optional<DeviceRecord>> HubService::device_record(Store& from, const std::string& id,
                                                              bool* decommissioned) {
  const auto parts = stores_for(from);
  // The rows are in `from` itself (no cells' files). One cell with a file
  // of its own is not that: its rows are in the file.
  const bool here = parts.size() == 1 && parts.front() == &from;
  if (here && !decommissioned) return from.get_device(id);
  auto e = from.directory_entry(id);
  if (!e) return e.error();
  if (!*e) return std::optional<DeviceRecord>();
  if (decommissioned) *decommissioned = (*e)->decommissioned;
  if (here) return from.get_device(id);
  if ((*e)->cell < 0 || (*e)->cell >= static_cast<int>(parts.size())) return std::optional<DeviceRecord>();
  return parts[static_cast<size_t>((*e)->cell)]->get_device(id);
}

Result<std::optional<DeviceRecord>> HubService::get_device(const std::string& id) {
  return read([&](Store& from) -> Result<std::optional<DeviceRecord>> {
    auto d = device_record(from, id);
    // A device the directory has whose copy is not in its cell's file yet
    // (a directory write not followed yet) shows the directory's row.
    if (d && !*d && stores_for(from).front() != &from) return from.get_device(id);
    return d;
  });
}

namespace {
// Who sent a message, as the broker's ACL guarantees it: the gateway whose
// subtree it came on, else the device whose topic it is.
std::string sender_of(const std::string& topic) {
  if (std::string gw = transport::gateway_of_reports_topic(topic); !gw.empty()) return gw;
  std::string gateway, leaf;
  std::string device = transport::parse_device_topic(topic, &gateway, &leaf);
  return gateway.empty() ? device : gateway;
}
}  // namespace

void HubService::on_message(int cell, transport::Message&& msg) {
  const bool is_report = msg.topic.ends_with("/report");
  const bool is_presence = msg.topic.ends_with("/presence");
  const bool is_batch = msg.topic.ends_with("/reports");
  ++(is_report ? reports_received_ : is_presence ? presence_received_ : is_batch ? gateway_batches_received_ : other_received_);
  // Bounded input: nothing larger than the largest legitimate message of its
  // kind is queued, parsed or stored (the broker already caps every packet
  // at the size of a desired state, which no device sends).
  const size_t cap = is_report ? kMaxReportBytes : is_presence ? kMaxPresenceBytes : is_batch ? kMaxGatewayReportBytes : 0;
  if (msg.payload.size() > cap) {
    ++dropped_too_large_;
    const std::string sender = sender_of(msg.topic);
    if (auto dropped = log_limit_.admit(sender)) {
      log::get("hub")->warn("dropped a message of {} bytes from {} on {}: above {} bytes{}", msg.payload.size(),
                            sender, msg.topic, cap, suppressed_note(*dropped));
    }
    return;
  }
  if (any_decommissioned_) {
    // Anything still arriving from a decommissioned device (or gateway) is
    // dropped before it is queued: its certificate is revoked and its
    // session was taken over, and a message already on its way counts for nothing.
    const std::string sender = sender_of(msg.topic);
    if (is_decommissioned(sender)) {
      ++dropped_decommissioned_;
      if (auto dropped = log_limit_.admit(sender)) {
        log::get("hub")->warn("dropped a message from decommissioned device={} on {}{}", sender, msg.topic,
                              suppressed_note(*dropped));
      }
      return;
    }
  }
  // Back-pressure instead of loss: while the cell's queue is full its MQTT
  // client stops reading and the broker holds the QoS 1 messages.
  (void)cells_.at(static_cast<size_t>(cell))->push(std::move(msg));
}

void HubService::worker(Cell& c) {
  while (!stopping_) {
    c.wait_for_work(std::chrono::milliseconds(200));
    drain_cell(c);
  }
}

void HubService::drain() {
  for (auto& c : cells_) drain_cell(*c);
}

// A report or presence message, parsed, with the gateway whose topics carried it.
struct HubService::ParsedMessage {
  std::string gateway;
  bool is_report = false;
  v1::Report report;
  v1::Presence presence;
};

// Each cell's worker commits its own batches. With a file per cell it holds
// only its cell's file for its own devices' messages, so the cells' workers
// write side by side (ADR 18, slice 8); what needs hub.db waits for the
// whole lock. With one store they take turns on it.
void HubService::drain_cell(Cell& c) {
  std::lock_guard drain_lock(c.drain_mu());
  for (;;) {
    std::vector<transport::Message> batch = c.pop(512);
    if (batch.empty()) {
      // Outside the store lock: publishing may wait for the broker, whose
      // client thread may wait for room in a queue only this worker empties.
      settle_moves();
      return;
    }
    // Parsed and grouped before the store lock: the other cells' workers
    // and the engine wait only for the rows being written.
    const DeviceGroups groups = parse_batch(batch);
    size_t done = 0;
    {
      StoreMutex::FileLock lock(store_mu_, c.id());
      done = apply_groups(c, groups, 0, lock.alone());
    }
    // The rest of the batch, in order, from the first group that needs hub.db.
    if (done < groups.size()) {
      std::lock_guard lock(store_mu_);
      (void)apply_groups(c, groups, done, false);
    }
  }
}

bool& HubService::needs_whole_lock() {
  thread_local bool needed = false;
  return needed;
}

size_t HubService::apply_groups(Cell& c, const DeviceGroups& groups, size_t from, bool file_alone) {
  const auto started = std::chrono::steady_clock::now();
  // Reports are the devices' to repeat (and a lost outcome is recovered
  // from the next idle report): no fsync per batch. Control writes stay FULL.
  DeviceStore& cell_store = device_store(c.id());
  (void)cell_store.relaxed_sync(true);
  size_t at = from;
  {
    Applied applied;
    sql::Transaction tx(cell_store.device_db());
    for (; at < groups.size(); ++at) {
      if (!apply_device_messages(groups[at].first, groups[at].second, c.id(), file_alone, applied)) break;
    }
    if (auto s = tx.commit(); !s) log::get("hub")->error("commit report batch failed: {}", s.error().message);
    reports_processed_ += applied.reports;
    presence_processed_ += applied.presences;
  }
  if (!file_alone && follow_pending_) {
    follow_pending_ = false;
    follow_directory();
  }
  if (auto s = cell_store.relaxed_sync(false); !s) {
    log::get("hub")->error("restore synchronous=FULL failed: {}", s.error().message);
  }
  report_commit_seconds_.observe(std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count());
  return at;
}

int HubService::least_loaded_cell(const std::vector<int64_t>& counts, int except) const {
  int best = -1;
  for (int i = 0; i < cell_count(); ++i) {
    if (i == except || cells_[static_cast<size_t>(i)]->draining()) continue;
    if (best < 0 || counts[static_cast<size_t>(i)] < counts[static_cast<size_t>(best)]) best = i;
  }
  return best;
}

Result<HubService::DrainProgress> HubService::drain_cell_devices(int cell) {
  if (cell < 0 || cell >= cell_count()) {
    return make_error(Errc::not_found, "no cell " + std::to_string(cell) + " (this hub runs cells 0 to " +
                                           std::to_string(cell_count() - 1) + ")");
  }
  const std::string name = "cell " + std::to_string(cell);
  const Error last = make_error(Errc::conflict, name + " is the last cell that is not draining; "
                                                       "its devices would have nowhere to go");
  Cell& c = *cells_[static_cast<size_t>(cell)];
  if (cfg_.share_cells && cfg_.coordinator && !c.draining()) {
    // Shared with every hub process (docs/adr/0019): the holder of the cell
    // asks its devices to move, the holders of the others take them in.
    auto draining = shared_drains();
    if (!draining) return draining.error().with_context("read the draining cells");
    draining->emplace(cell, 0);
    if (static_cast<int>(draining->size()) >= cell_count()) return last;
    const std::string value = nlohmann::json{{"since_ms", clock_.now_unix_ms()}, {"by", cfg_.coord_holder}}.dump();
    if (auto p = cfg_.coordinator->put(kDrainsPrefix + std::to_string(cell), value); !p) {
      return p.error().with_context("record the drain of " + name);
    }
  }
  DrainProgress out;
  out.cell = cell;
  {
    std::lock_guard lock(store_mu_);
    if (!c.draining()) {
      if (least_loaded_cell(cell_devices_, cell) < 0) return last;
      // Sharing cells, a process that does not hold it asks no move; should
      // it take the cell over mid-drain, the holder before it asked some.
      if (auto s = start_drain(c, cfg_.share_cells && !serves_cell(cell)); !s) {
        return s.error().with_context("record the drain of " + name);
      }
      log::get("hub")->info("cell {} draining: {} devices to move", cell, cell_devices_[static_cast<size_t>(cell)]);
    }
    out.remaining = cell_devices_[static_cast<size_t>(cell)];
  }
  out.draining = true;
  out.moved = static_cast<int64_t>(c.moved_out.load());
  engine_cv_.notify_one();
  return out;
}

Result<HubService::DrainProgress> HubService::undrain_cell(int cell) {
  if (cell < 0 || cell >= cell_count()) {
    return make_error(Errc::not_found, "no cell " + std::to_string(cell) + " (this hub runs cells 0 to " +
                                           std::to_string(cell_count() - 1) + ")");
  }
  Cell& c = *cells_[static_cast<size_t>(cell)];
  if (shares_drains()) {
    // Every process follows the coordinator's set; the holder of the cell
    // withdraws its moves when its next tick sees the key gone.
    if (auto r = cfg_.coordinator->remove(kDrainsPrefix + std::to_string(cell)); !r) {
      return r.error().with_context("stop the drain of cell " + std::to_string(cell));
    }
  } else {
    std::lock_guard lock(store_mu_);
    if (auto s = store_.set_cell_drain(cell, false, 0); !s) {
      return s.error().with_context("stop the drain of cell " + std::to_string(cell));
    }
  }
  if (c.draining()) stop_drain(c, "asked");
  DrainProgress out;
  out.cell = cell;
  {
    std::lock_guard lock(store_mu_);
    out.remaining = cell_devices_[static_cast<size_t>(cell)];
  }
  out.draining = false;
  out.moved = static_cast<int64_t>(c.moved_out.load());
  engine_cv_.notify_one();
  return out;
}

void HubService::stop_drain(Cell& c, std::string_view why) {
  c.set_draining(false);
  c.undrained_ms = clock_.now_unix_ms();
  {
    std::lock_guard lock(drains_stopped_mu_);
    drains_stopped_.insert(c.id());
  }
  engine_cv_.notify_one();
  log::get("hub")->info("cell {} no longer draining ({}): it takes enrollments again, and the moves asked for and "
                        "not taken are withdrawn; devices that already moved stay where they went",
                        c.id(), why);
}

Status HubService::start_drain(Cell& c, bool inherited) {
  if (!shares_drains()) {
    if (auto s = store_.set_cell_drain(c.id(), true, clock_.now_unix_ms()); !s) return s;
  }
  c.drain_inherited = inherited;
  c.set_draining(true);
  return {};
}

// A hub that keeps its drains in its store (no shared cells) drains on after
// a restart. Which devices it had asked to move is gone with the process, so
// those drains are inherited: stopping one withdraws every remaining move.
void HubService::resume_drains() {
  auto drains = store_.cell_drains();
  if (!drains) {
    log::get("hub")->error("read this hub's drains: {}", drains.error().message);
    return;
  }
  std::vector<int> resumed;
  for (const auto& [cell, since] : *drains) {
    if (cell >= 0 && cell < cell_count()) resumed.push_back(cell);
  }
  // The API never drains the last cell; a store from a hub that ran more
  // cells might. Then none resumes: devices must have somewhere to go.
  if (static_cast<int>(resumed.size()) >= cell_count()) {
    log::get("hub")->error("every cell of this hub was draining before it started: no drain resumed; "
                           "drain the cells to retire again (flotilla cell drain)");
    return;
  }
  for (int cell : resumed) {
    Cell& c = *cells_[static_cast<size_t>(cell)];
    c.drain_inherited = true;
    c.set_draining(true);
    log::get("hub")->info("cell {} draining since before this start: {} devices to move", cell,
                          cell_devices_[static_cast<size_t>(cell)]);
  }
}

bool HubService::lets_devices_leave(int cell) const {
  if (cell < 0 || cell >= cell_count()) return false;
  const Cell& c = *cells_[static_cast<size_t>(cell)];
  if (c.draining()) return true;
  const int64_t since = c.undrained_ms.load();
  return since > 0 && clock_.now_unix_ms() - since < kUndrainGraceMs;
}

std::optional<HubService::PendingDesired> HubService::desired_again(
    const DeviceRecord& d, const std::string& move_to, std::map<std::string, SharedDesiredPtr>& cache) {
  PendingDesired p;
  p.device_id = d.id;
  p.cell = d.cell;
  p.labels = d.labels;
  p.move_to = move_to;
  // The device's current desired state again (it is retained on its
  // broker, so this replaces it with the same, plus or minus the move).
  if (d.generation > 0 && !d.desired_bundle_id.empty()) {
    auto shared = desired_shared(d.desired_bundle_id, cache);
    if (!shared) {
      log::get("hub")->error("desired state of device={} again: {}", d.id, shared.error().message);
      return std::nullopt;
    }
    p.shared = *shared;
    p.generation = d.generation;
    p.campaign_id = d.campaign_id;
  } else {
    static const SharedDesiredPtr kNone = [] {
      const auto digest = crypto::sha256(std::string());
      return std::make_shared<const SharedDesired>(
          SharedDesired{std::string(), std::string(digest.begin(), digest.end()), std::string()});
    }();
    p.shared = kNone;
  }
  return p;
}

// Called by the engine: asks the devices of draining cells to move, each
// again after kMoveRetryMs while it has not arrived (it was offline, or the
// message was lost with a broker); and withdraws the moves of a drain that
// stopped.
void HubService::continue_drains() {
  if (cell_count() < 2) return;
  Publishes moves, withdrawn;
  std::map<std::string, SharedDesiredPtr> cache;
  const int64_t now = clock_.now_unix_ms();
  std::set<int> stopped;
  {
    std::lock_guard lock(drains_stopped_mu_);
    stopped.swap(drains_stopped_);
  }
  // Drained again since: its moves stand.
  std::erase_if(stopped, [&](int cell) { return cells_[static_cast<size_t>(cell)]->draining(); });
  const auto chunk = static_cast<size_t>(std::max<int64_t>(1, cfg_.move_chunk));
  {
    std::lock_guard lock(store_mu_);
    for (int cell : stopped) {
      // Moves asked before a restart or by another holder: every device
      // still in the cell is told again to stay on its broker.
      if (cells_[static_cast<size_t>(cell)]->drain_inherited.exchange(false) && serves_cell(cell)) {
        withdraw_sweeps_[cell].clear();
        log::get("hub")->info("cell {}: withdrawing the move of every device still in it (the drain began before "
                              "this process held the cell, or before it started)",
                              cell);
      }
    }
    for (auto it = withdraw_sweeps_.begin(); it != withdraw_sweeps_.end();) {
      Cell& c = *cells_[static_cast<size_t>(it->first)];
      if (c.draining() || !serves_cell(c.id())) {
        c.drain_inherited = true;  // interrupted: what it did not reach is still unknown
        it = withdraw_sweeps_.erase(it);
        continue;
      }
      if (move_cancels_.size() >= chunk) break;
      auto ids = device_store(c.id()).cell_session_devices(c.id(), static_cast<int64_t>(chunk), it->second);
      if (!ids) {
        log::get("hub")->error("withdraw the moves of cell {}: {}", c.id(), ids.error().message);
        break;
      }
      for (const auto& id : *ids) move_cancels_.emplace(id, c.id());
      if (ids->size() < chunk) {
        it = withdraw_sweeps_.erase(it);
      } else {
        it->second = ids->back();
        ++it;
      }
    }
    // The moves this process asked for in cells whose drain stopped.
    for (auto it = move_asked_ms_.begin(); !stopped.empty() && it != move_asked_ms_.end();) {
      auto d = store_.directory_entry(it->first);
      if (d && *d && stopped.count((*d)->cell)) {
        move_cancels_[it->first] = (*d)->cell;
        it = move_asked_ms_.erase(it);
      } else {
        ++it;
      }
    }
    for (auto it = move_cancels_.begin(); it != move_cancels_.end() && withdrawn.size() < chunk;) {
      const auto [id, cell] = *it;
      const Cell& from = *cells_[static_cast<size_t>(cell)];
      // Kept until the hub's session to the cell's broker is up: a
      // withdrawal that never reaches the broker would leave the move there.
      if (!from.draining() && serves_cell(cell) && !from.connected()) {
        ++it;
        continue;
      }
      it = move_cancels_.erase(it);
      if (from.draining()) continue;  // drained again: the move stands
      if (!serves_cell(cell)) continue;  // lost the cell: its new holder withdraws every move there
      auto d = device_store(cell).get_device(id);
      if (!d || !*d || (*d)->cell != cell) continue;  // it moved after all
      // Its desired state again (none: an empty one), signed, with a move to
      // the broker it is on: it replaces the retained move, and a device
      // whose session queued the move while it was offline gets this after
      // it, and stays (or comes straight back).
      if (auto p = desired_again(**d, cell_broker_url(cell), cache)) withdrawn.push_back(std::move(*p));
    }
    std::vector<int64_t> planned = cell_devices_;
    for (auto& c : cells_) {
      if (!c->draining() || !serves_cell(c->id())) {  // a cell this process lost: its holder's to drain
        drain_cursor_.erase(c->id());
        continue;
      }
      // A walk through the cell in id order from where the last tick left
      // it, round again at the end: devices that have not moved yet (offline,
      // slow) never keep the ones after them from being asked.
      std::string& cursor = drain_cursor_[c->id()];
      bool wrapped = false, stop = false;
      size_t looked = 0;
      while (!stop && moves.size() < chunk && looked < 8 * chunk) {
        auto ids = device_store(c->id()).cell_session_devices(c->id(), static_cast<int64_t>(chunk), cursor);
        if (!ids) {
          log::get("hub")->error("drain cell {}: {}", c->id(), ids.error().message);
          break;
        }
        for (const auto& id : *ids) {
          if (moves.size() >= chunk) break;
          cursor = id;
          ++looked;
          auto it = move_asked_ms_.find(id);
          if (it != move_asked_ms_.end() && now - it->second < kMoveRetryMs) continue;
          auto d = device_store(c->id()).get_device(id);
          if (!d || !*d) continue;
          const int target = least_loaded_cell(planned, c->id());
          if (target < 0) {
            stop = true;
            break;
          }
          auto p = desired_again(**d, cell_broker_url(target), cache);
          if (!p) continue;
          ++planned[static_cast<size_t>(target)];
          p->cell = c->id();
          move_asked_ms_[id] = now;
          moves.push_back(std::move(*p));
        }
        if (ids->size() < chunk && moves.size() < chunk) {  // the end of the cell
          if (wrapped || cursor.empty()) break;
          cursor.clear();
          wrapped = true;
        }
      }
    }
  }
  if (!withdrawn.empty()) {
    // One that did not go out (the session dropped meanwhile) is tried again
    // on a later tick, never dropped.
    std::vector<std::pair<std::string, int>> unsent;
    std::string why;
    for (const auto& p : withdrawn) {
      if (stopping_) break;
      if (auto s = publish_desired(p); !s) {
        unsent.emplace_back(p.device_id, p.cell);
        why = s.error().message;
      } else {
        ++cells_[static_cast<size_t>(p.cell)]->moves_withdrawn;
      }
    }
    if (!unsent.empty()) {
      std::lock_guard lock(store_mu_);
      for (const auto& [id, cell] : unsent) move_cancels_.emplace(id, cell);
      log::get("hub")->warn("could not send the withdrawal of {} moves, tried again next tick: {}", unsent.size(), why);
    }
    if (withdrawn.size() > unsent.size()) {
      log::get("hub")->info("withdrew the move of {} devices whose cell stopped draining",
                            withdrawn.size() - unsent.size());
    }
  }
  if (moves.empty()) return;
  for (const auto& p : moves) ++cells_[static_cast<size_t>(p.cell)]->moves_asked;
  publish_all(moves, "move");
  log::get("hub")->info("asked {} devices to move to another cell", moves.size());
}

void HubService::follow_directory() {
  std::optional<std::vector<LiveCampaign>> live;  // read at the first enrollment or label change
  auto followed = follow_directory_outbox(
      store_, [this](int cell) -> DeviceStore& { return device_store(cell); },
      [&](const DirectoryChange& c) -> Status {
        if (!live) {
          live = live_campaigns();
          // Which campaigns a hub sharing only the control log holds rows
          // of (follow_membership makes rows for those, and its own writes').
          if (control_log_ && !cfg_.share_cells) {
            for (auto& lc : *live) {
              auto held = holds_rows(lc.c.id);
              lc.rows_here = held && *held;
            }
          }
        }
        follow_membership(c, *live);
        return {};
      },
      cell_files());
  if (!followed) {
    // Kept in the outbox: followed at the next write that makes a change, or the next start.
    log::get("hub")->error("follow the device directory: {}", followed.error().message);
  }
}

std::vector<DeviceStore*> HubService::stores_for(Store& from) {
  if (!from.read_parts().empty()) return from.read_parts();
  if (&from != &store_ || !cell_files()) return {&from};
  std::vector<DeviceStore*> out;
  for (Store* f : cfg_.cell_files) out.push_back(f);
  return out;
}

Result<std::vector<int>> HubService::cells_with_rows(Store& from, const std::string& campaign_id) {
  std::vector<std::vector<int>> present;
  for (DeviceStore* s : stores_for(from)) {
    auto cells = s->campaign_cells(campaign_id);
    if (!cells) return cells.error();
    present.push_back(std::move(*cells));
  }
  return merge_cells(present);
}

Result<bool> HubService::holds_rows(const std::string& campaign_id) {
  bool held = false;
  for (DeviceStore* s : stores_for(store_)) {
    auto counts = s->campaign_counts(campaign_id);
    if (!counts) return counts.error();
    held = held || !counts->empty();
  }
  return held;
}

void HubService::reconcile_cell_files() {
  for (int cell = 0; cell < static_cast<int>(cfg_.cell_files.size()); ++cell) {
    auto r = reconcile_cell_file(store_, cell, device_store(cell));
    if (!r) {
      log::get("hub")->error("cell {}: reconcile its device file with the directory: {}", cell, r.error().message);
      continue;
    }
    if (r->adopted + r->forgotten + r->orphan_campaigns > 0) {
      log::get("hub")->warn("cell {}: its device file followed the directory: {} device copies made, {} dropped, the "
                             "rows of {} campaigns hub.db does not have dropped",
                             cell, r->adopted, r->forgotten, r->orphan_campaigns);
    }
  }
}

void HubService::follow_own_write() {
  std::lock_guard lock(store_mu_);
  follow_directory();
}

void HubService::note_moved(const std::string& owner, int from, int to, int64_t rows, std::string_view how) {
  cell_devices_[static_cast<size_t>(from)] -= rows;
  cell_devices_[static_cast<size_t>(to)] += rows;
  cells_[static_cast<size_t>(from)]->moved_out += static_cast<uint64_t>(rows);
  cells_[static_cast<size_t>(to)]->moved_in += static_cast<uint64_t>(rows);
  moved_in_.emplace_back(owner, from);
  move_asked_ms_.erase(owner);
  log::get("hub")->info("device={} moved from cell {} to cell {} ({} device rows){}", owner, from, to, rows, how);
}

// Hub processes sharing cells: devices this process asked to move that
// another process has since recorded in a cell that is not draining. Their
// retained desired state (with the move) is cleared on the brokers of the
// draining cells this process serves, as settle_moves does for an arrival
// this process saw itself (docs/adr/0019).
void HubService::clear_moved_away() {
  std::vector<std::string> gone;
  std::vector<int> from;
  {
    std::lock_guard lock(store_mu_);
    if (move_asked_ms_.empty()) return;
    for (auto it = move_asked_ms_.begin(); it != move_asked_ms_.end();) {
      auto d = store_.directory_entry(it->first);
      const int cell = d && *d ? (*d)->cell : -1;
      if (cell >= 0 && cell < cell_count() && !cells_[static_cast<size_t>(cell)]->draining()) {
        gone.push_back(it->first);
        it = move_asked_ms_.erase(it);
      } else {
        ++it;
      }
    }
    for (int i = 0; i < cell_count(); ++i) {
      if (cells_[static_cast<size_t>(i)]->draining() && serves_cell(i)) from.push_back(i);
    }
  }
  if (gone.empty()) return;
  for (int cell : from) {
    bool cleared = false;
    for (const auto& id : gone) cleared = clear_retained_desired(cell, id) || cleared;
    if (!cleared) continue;
    log::get("hub")->info("cleared the retained desired state of {} device(s) that moved away from cell {}",
                          gone.size(), cell);
  }
}

bool HubService::clear_retained_desired(int cell, const std::string& id) {
  if (cell < 0 || cell >= cell_count()) return false;
  transport::Transport* t = cells_[static_cast<size_t>(cell)]->transport();
  if (!t || !t->connected()) return false;
  // An empty retained message deletes the retained desired state there.
  (void)t->publish({transport::device_topic(id, "", "desired"), "", 1, true});
  return true;
}

void HubService::settle_moves() {
  if (cfg_.share_cells) record_arrivals();
  std::vector<std::pair<std::string, int>> moved;
  {
    std::lock_guard lock(store_mu_);
    if (moved_in_.empty()) return;
    moved.swap(moved_in_);
  }
  for (const auto& [id, old_cell] : moved) {
    if (old_cell < 0 || old_cell >= cell_count()) continue;
    (void)clear_retained_desired(old_cell, id);
    // A desired state published on the old broker after the move message
    // may not have reached the device: its pending one goes out again here.
    republish_pending(-1, id);
  }
}



// A device's messages in one batch are applied to its rows in memory and
// written once: a device sends five or more reports per apply within
// milliseconds, and each used to cost a read and a write of its device row
// and of its campaign row. Messages of different devices touch different
// rows, so grouping by device keeps each device's order and loses nothing;
// a presence "offline" can change other devices' rows (a gateway's), so it
// ends a group boundary: everything before it is written first.
HubService::DeviceGroups HubService::parse_batch(const std::vector<transport::Message>& batch) {
  DeviceGroups groups;
  std::vector<std::string> order;
  std::unordered_map<std::string, std::vector<ParsedMessage>> by_device;
  auto flush = [&] {
    for (auto& id : order) {
      auto& msgs = by_device[id];
      groups.emplace_back(std::move(id), std::move(msgs));
    }
    order.clear();
    by_device.clear();
  };
  auto add = [&](const std::string& device_id, ParsedMessage&& p) {
    const bool barrier = !p.is_report && !p.presence.online();
    auto [it, fresh] = by_device.try_emplace(device_id);
    if (fresh) order.push_back(device_id);
    it->second.push_back(std::move(p));
    if (barrier) flush();
  };
  for (const auto& msg : batch) {
    if (const std::string gw = transport::gateway_of_reports_topic(msg.topic); !gw.empty()) {
      // Only this gateway may publish here (broker ACL); each report names
      // its device, and apply_device_messages drops those not behind it.
      v1::GatewayReports reports;
      if (msg.payload.size() > kMaxGatewayReportBytes || !reports.ParseFromString(msg.payload) ||
          reports.reports_size() > kMaxGatewayReports) {
        // Lines about what a device or gateway sent stay within its share (a
        // burst, then a few a minute): one message naming a thousand devices
        // is not a thousand lines.
        if (auto n = log_limit_.admit(gw)) {
          log::get("hub")->warn("dropped report batch of gateway={} bytes={}: not a GatewayReports of at most {} "
                                "reports and {} bytes{}", gw, msg.payload.size(), kMaxGatewayReports,
                                kMaxGatewayReportBytes, suppressed_note(*n));
        }
        continue;
      }
      for (auto& r : *reports.mutable_reports()) {
        if (r.device_id().empty()) continue;
        ParsedMessage p;
        p.gateway = gw;
        p.is_report = true;
        std::string id = r.device_id();
        p.report = std::move(r);
        add(id, std::move(p));
      }
      continue;
    }
    std::string leaf;
    ParsedMessage p;
    // The broker's ACL guarantees only this device (or, under
    // flotilla/v1/g/<gw>/, only that gateway) could publish here, so the
    // topic, not the payload, says who is speaking. A gateway may speak only
    // for its own devices (checked against the device row).
    const std::string device_id = transport::parse_device_topic(msg.topic, &p.gateway, &leaf);
    if (device_id.empty()) continue;
    if (leaf == "report") {
      if (!p.report.ParseFromString(msg.payload)) {
        if (auto n = log_limit_.admit(p.gateway.empty() ? device_id : p.gateway)) {
          log::get("hub")->warn("dropped unparsable report device={} bytes={}{}", device_id, msg.payload.size(),
                                suppressed_note(*n));
        }
        continue;
      }
      p.is_report = true;
    } else if (leaf == "presence") {
      // Zero bytes is both Presence{online=false} in proto3 and a cleared
      // retained message: either way the device is not there.
      if (!p.presence.ParseFromString(msg.payload)) continue;
      // A retained "online" is what the broker kept, maybe from before a
      // crash, and proves nothing now; a live one (or the roll call's
      // answer) does. A retained "offline" (a last will) is still true.
      if (msg.retained && p.presence.online()) {
        ++stale_presence_ignored_;
        continue;
      }
    } else {
      continue;
    }
    add(device_id, std::move(p));
  }
  flush();
  return groups;
}

bool HubService::apply_device_messages(const std::string& device_id, const std::vector<ParsedMessage>& msgs,
                                       int cell, bool file_alone, Applied& applied) {
  // Where the device should be first: the broker it spoke on is its cell's.
  auto found = device_store(cell).get_device(device_id);
  // Not in this file, or in it but moving: the directory decides, in hub.db.
  if (file_alone && (!found || !*found || (**found).cell != cell)) return false;
  if (found && !*found && cell_files()) {
    // With a file per cell, a device arriving from a draining cell has its
    // rows in that cell's file until the directory's move is followed (after
    // this batch commits, carrying what this batch wrote there). A device of
    // a gateway that arrived earlier in this batch is in the directory's new
    // cell already, its rows still in the old file: so the files are asked.
    if (auto e = store_.directory_entry(device_id); e && *e) {
      for (int k = 0; k < cell_count() && found && !*found; ++k) {
        if (k != cell) found = device_store(k).get_device(device_id);
      }
    }
  }
  if (!found || !*found) {
    if (std::any_of(msgs.begin(), msgs.end(), [](const ParsedMessage& p) { return p.is_report; })) {
      const std::string& gw = msgs.front().gateway;
      if (auto n = log_limit_.admit(gw.empty() ? device_id : gw)) {
        log::get("hub")->warn("report from unknown device={}{}{}", device_id,
                              gw.empty() ? std::string() : " on the topics of gateway " + gw, suppressed_note(*n));
      }
    }
    return true;
  }
  DeviceRecord dev = std::move(**found);
  if (cell_count() > 1 && dev.cell != cell) {
    // The broker authenticated the device (every cell's trusts the device
    // CA), so it is there now. That moves it only out of a draining cell
    // into one that is not; anything else is a late message from a broker
    // it left, which must not bring back what it said there.
    if (!lets_devices_leave(dev.cell) || cells_[static_cast<size_t>(cell)]->draining()) {
      ++other_cell_dropped_;
      if (auto n = log_limit_.admit(device_id)) {
        log::get("hub")->warn("dropped {} message(s) of device={} from the broker of cell {}: it is in cell {}{}",
                              msgs.size(), device_id, cell, dev.cell, suppressed_note(*n));
      }
      return true;
    }
    const std::string owner = dev.gateway.empty() ? dev.id : dev.gateway;
    if (cfg_.share_cells) {
      // Recorded by record_arrivals as a control write, after this batch;
      // its messages are applied meanwhile with the row in the old cell.
      if (pending_arrivals_.try_emplace(owner, dev.cell, cell).second) {
        log::get("hub")->info("device={} arrived in cell {} from cell {}, which it was asked to leave", owner, cell,
                              dev.cell);
      }
    } else {
      auto n = store_.set_device_cell(owner, cell);
      if (!n) {
        log::get("hub")->error("move device={} to cell {}: {}", owner, cell, n.error().message);
        return true;
      }
      if (*n > 0) {
        note_moved(owner, dev.cell, cell, *n, "");
        follow_pending_ = true;
      }
      // With a file per cell the rows stay in the old cell's file for this
      // batch: dev.cell is where they are written (the follow moves them).
      if (!cell_files()) dev.cell = cell;
    }
  }
  const bool was_online = dev.online;
  CampaignRows rows;
  bool inventory = false;  // whether the batch carried one (dev.inventory holds the last)
  bool changed = false, gateway_left = false;
  uint64_t reports = 0, presences = 0;
  for (const auto& p : msgs) {
    if (dev.gateway != p.gateway) {
      if (auto n = log_limit_.admit(p.gateway.empty() ? device_id : p.gateway)) {
        log::get("hub")->warn("dropped {} of device={} sent on the topics of gateway '{}'; its gateway is '{}'{}",
                              p.is_report ? "report" : "presence", dev.id, p.gateway, dev.gateway,
                              suppressed_note(*n));
      }
      continue;
    }
    if (!p.is_report) {
      dev.online = p.presence.online();
      dev.last_seen_ms = std::max(dev.last_seen_ms, clock_.now_unix_ms());
      if (!p.presence.agent_version().empty()) dev.agent_version = p.presence.agent_version();
      changed = true;
      ++presences;
      // A gateway that went away takes its devices with it.
      gateway_left = !p.presence.online() && dev.gateway.empty();
      continue;
    }
    const v1::Report& r = p.report;
    // QoS 1 may deliver twice and a reconnect may replay: keep only newer reports.
    if (r.seq() != 0 && r.seq() <= dev.last_seq) continue;
    adopt_reported_generation(dev, r, rows);  // a cell taken over from another hub
    apply_report(dev, r);
    changed = true;
    inventory = inventory || r.has_inventory();
    ++reports;
    if (!r.campaign_id().empty()) on_campaign_report(dev, r, rows);
  }
  // Something on the way needed hub.db: nothing is written; applied again
  // under the whole lock.
  if (file_alone && std::exchange(needs_whole_lock(), false)) return false;
  DeviceStore& cell_store = device_store(dev.cell);
  if (changed) {
    if (auto s = cell_store.save_device_state(dev); !s) {
      log::get("hub")->error("save device={} failed: {}", device_id, s.error().message);
      return true;
    }
  }
  if (inventory) {
    dev.inventory.updated_ms = clock_.now_unix_ms();
    if (auto s = cell_store.save_device_inventory(device_id, dev.inventory); !s) {
      log::get("hub")->error("save inventory device={} failed: {}", device_id, s.error().message);
    }
  }
  for (auto& [campaign, row] : rows) {
    if (!row.dirty || !row.row) continue;
    (void)cell_store.save_campaign_device(*row.row);
    if (campaign_status_is_final(row.row->status)) engine_cv_.notify_one();
  }
  applied.reports += reports;
  applied.presences += presences;
  if (!was_online && dev.online && presence_settle_until_ms_ != 0 &&
      ++reannounced_ >= presence_reset_count_.load()) {
    presence_settle_until_ms_ = 0;
  }
  if (gateway_left) (void)cell_store.set_gateway_devices_offline(device_id, clock_.now_unix_ms());
  return true;
}

void HubService::apply_report(DeviceRecord& dev, const v1::Report& r) {
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
    // Kept in device_inventory only (handle_batch saves it once per batch).
    // Bounded: reported by the device, shown to operators and filtered on.
    auto bounded = [](const std::string& v) { return v.substr(0, 128); };
    auto& kept = dev.inventory;
    if (!inv.k3s_role().empty()) kept.k3s_role = inv.k3s_role() == "agent" ? "agent" : "server";
    kept.cluster_id = bounded(inv.cluster_id());
    kept.cert_expiry_unix = inv.k3s_cert_expiry_unix();
    if (!inv.os().empty()) kept.os = bounded(inv.os());
    kept.disk_free_bytes = inv.disk_free_bytes();
    kept.disk_total_bytes = inv.disk_total_bytes();
    kept.mem_free_bytes = inv.mem_free_bytes();
    kept.mem_total_bytes = inv.mem_total_bytes();
    kept.clock_suspect = inv.clock_suspect();
  }
  if (r.has_error() && r.error().reason() != v1::REASON_NONE) {
    dev.last_reason = reason_name(r.error().reason());
    dev.last_message = r.error().message().substr(0, 1024);
  } else if (r.state() == v1::AGENT_STATE_APPLIED) {
    dev.last_reason.clear();
    dev.last_message.clear();
  }
}

}  // namespace flotilla::hub

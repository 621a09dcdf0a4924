#include "flotilla/agent/agent.hpp"

#include <sys/sysinfo.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <algorithm>
#include <set>
#include <thread>

#include "flotilla/bundles/director.hpp"
#include "flotilla/bundles/overlay.hpp"
#include "flotilla/common/crypto.hpp"
#include "flotilla/common/log.hpp"

namespace flotilla::agent {

namespace {
constexpr const char* kK3sConfigDir = "/etc/rancher/k3s/config.yaml.d/";
constexpr const char* kRegistries = "/etc/rancher/k3s/registries.yaml";
constexpr const char* kManifestDir = "/var/lib/rancher/k3s/server/manifests/";
constexpr const char* kImagesDir = "/var/lib/rancher/k3s/agent/images/";

constexpr uint64_t kK3sExtractFactor = 3;
constexpr uint64_t kImagesUnpackFactor = 2;

std::string hex_of(const std::string& raw) {
  return to_hex(reinterpret_cast<const uint8_t*>(raw.data()), raw.size());
}
}  // namespace

const char* step_name(Step s) {
  switch (s) {
    case Step::verify: return "verify";
    case Step::space: return "space";
    case Step::download: return "download";
    case Step::backup: return "backup";
    case Step::snapshot: return "snapshot";
    case Step::install: return "install";
    case Step::rotate: return "rotate";
    case Step::restart: return "restart";
    case Step::health: return "health";
    case Step::commit: return "commit";
    case Step::rollback: return "rollback";
    case Step::recover: return "recover";
  }
  return "?";
}

std::optional<Step> step_from_name(const std::string& name) {
  for (Step s : {Step::verify, Step::space, Step::download, Step::backup, Step::snapshot, Step::install, Step::rotate,
                 Step::restart, Step::health,
                 Step::commit, Step::rollback, Step::recover}) {
    if (name == step_name(s)) return s;
  }
  return std::nullopt;
}

bool step_allowed(std::optional<Step> from, Step to) {
  // The transition table of the apply pipeline (docs/agent.md, "Apply pipeline").
  static const std::map<Step, std::set<Step>> next = {
      {Step::verify, {Step::space}},
      {Step::space, {Step::download}},
      {Step::download, {Step::backup}},
      {Step::backup, {Step::snapshot, Step::install}},
      {Step::snapshot, {Step::install}},
      {Step::install, {Step::rotate, Step::restart}},
      {Step::rotate, {Step::restart, Step::rollback}},
      {Step::restart, {Step::health, Step::rollback}},
      {Step::health, {Step::commit, Step::rollback}},
      {Step::commit, {}},
      {Step::rollback, {}},
      {Step::recover, {}},
  };
  if (to == Step::recover) return true;
  if (!from) return to == Step::verify;
  auto it = next.find(*from);
  return it != next.end() && it->second.count(to) > 0;
}

std::string Agent::path_for(const v1::BundleFile& f) {
  switch (f.kind()) {
    case v1::FILE_KIND_K3S_CONFIG: return kK3sConfigDir + f.name();
    case v1::FILE_KIND_REGISTRIES: return kRegistries;
    case v1::FILE_KIND_MANIFEST: return kManifestDir + f.name();
    default: return {};
  }
}

std::string Agent::artifact_path(const v1::Artifact& a) const {
  switch (a.kind()) {
    case v1::ARTIFACT_KIND_K3S_BINARY: return cfg_.k3s_bin;
    case v1::ARTIFACT_KIND_AIRGAP_IMAGES:
      return bundles::valid_file_name(a.name()) ? kImagesDir + a.name() : std::string();
    default: return {};
  }
}

Agent::Agent(CoreConfig cfg, K3sRuntime& runtime, FileTree& files, StateStore& state, const Clock& clock,
             Reporter reporter, Downloader* downloader)
    : cfg_(std::move(cfg)), runtime_(runtime), files_(files), store_(state), clock_(clock),
      reporter_(std::move(reporter)), downloader_(downloader) {
  seq_ = static_cast<uint64_t>(std::max<int64_t>(0, clock_.now_unix_ms()));
}

Status Agent::save() { return store_.save(state_); }

Status Agent::start() {
  auto s = store_.load();
  if (!s) return s.error().with_context("load agent state");
  state_ = std::move(*s);
  // Reports of the previous run stay newer than anything it sent: sequence
  // numbers continue above the block the last run reserved, whatever the
  // clock says now. An agent that never reserved one (its first start, or an
  // agent from before this was persisted, whose numbers were wall-clock ms)
  // starts above the clock once.
  if (state_.seq_reserved != 0) seq_ = state_.seq_reserved;
  if (!state_.outbox.empty()) seq_ = std::max(seq_, state_.outbox.rbegin()->first);
  // Reserved now, so that reporting (even a refusal) writes nothing later.
  state_.seq_reserved = seq_ + 4096;
  if (auto st = save(); !st) return st.error().with_context("reserve report sequence numbers");
  recover();
  return {};
}

void Agent::step(const std::string& name, const char* phase, const std::string& detail) {
  JournalEntry e{apply_id_, apply_generation_, name, phase, clock_.now_unix_ms(), detail};
  if (auto s = store_.journal(e); !s) log::get("agent")->warn("journal {}:{}: {}", name, phase, s.error().message);
  if (cfg_.step_hook) cfg_.step_hook(name, phase);
  if (!cfg_.crash_at.empty() && cfg_.crash_at == name + ":" + phase) {
    log::get("agent")->warn("test hook: crashing at {}:{}", name, phase);
    log::get("agent")->flush();
    ::_exit(137);
  }
}

void Agent::advance(Step to, bool persist) {
  if (!state_.in_flight) return;
  const auto from = step_from_name(state_.in_flight->step);
  if (!step_allowed(from, to) && from != to) {
    // A bug, not a device condition: say so loudly; the journal shows it too.
    log::get("agent")->error("apply pipeline: step {} may not follow {}", step_name(to), state_.in_flight->step);
  }
  state_.in_flight->step = step_name(to);
  if (persist) (void)save();
}

uint64_t Agent::next_seq() {
  ++seq_;
  if (seq_ >= state_.seq_reserved) {
    // One write per 4096 reports, not one per report (flash wear).
    state_.seq_reserved = seq_ + 4096;
    if (auto s = save(); !s) log::get("agent")->warn("could not persist the report sequence: {}", s.error().message);
  }
  return seq_;
}

void Agent::recover() {
  auto logger = log::get("agent");
  if (!state_.in_flight) {
    // A crash after commit may leave the previous apply's backups behind.
    (void)files_.remove_tree(backup_dir());
    return;
  }
  const InFlight f = *state_.in_flight;
  apply_id_ = f.apply_id;
  apply_generation_ = f.generation;
  logger->warn("found unfinished apply id={} generation={} bundle={} version={} at step={}; rolling back", f.apply_id,
               f.generation, f.bundle_name, f.version, f.step);
  step("recover", "begin", f.step);
  static const std::set<std::string> changed_node = {"snapshot", "install", "rotate",   "restart",
                                                     "health",   "commit",  "rollback"};
  const bool touched = changed_node.count(f.step) > 0;
  if (touched) {
    const auto dropped = restore(f.backups);
    // The new k3s may have started on (and migrated) the datastore.
    if (!f.snapshot.kind.empty()) {
      if (auto s = runtime_.restore_datastore(f.snapshot); !s) {
        logger->error("recovery: restoring the datastore from {} failed: {}", f.snapshot.path, s.error().message);
      } else {
        logger->warn("recovery: datastore restored from the {} snapshot {}", f.snapshot.kind, f.snapshot.path);
      }
    }
    // The certificates k3s had before a rotation (k3s stops first).
    if (!f.cert_backup.empty()) {
      if (auto s = runtime_.restore_certificates(f.cert_backup); !s) {
        logger->error("recovery: restoring k3s certificates from {} failed: {}", f.cert_backup, s.error().message);
      } else {
        logger->warn("recovery: k3s certificates restored from {}", f.cert_backup);
      }
    }
    if (auto s = runtime_.restart(); !s) logger->warn("restart after recovery: {}", s.error().message);
    if (!dropped.empty()) {
      const auto until = clock_.monotonic() + cfg_.health_timeout;
      while (!runtime_.health().api_ready && clock_.monotonic() < until) clock_.sleep_for(cfg_.health_poll);
      for (const auto& copy : dropped) delete_manifest_resources(copy);
    }
  }
  if (state_.interrupted_generation == f.generation) {
    ++state_.interrupted_count;
  } else {
    state_.interrupted_generation = f.generation;
    state_.interrupted_count = 1;
  }
  state_.in_flight.reset();
  if (auto s = save(); !s) {
    // Still in flight on disk: the backups stay for the next attempt.
    logger->error("recovery: could not record state; keeping the backups: {}", s.error().message);
  } else {
    (void)files_.remove_tree(backup_dir());
  }
  step("recover", "end", touched ? "rolled back" : "nothing installed");
  logger->info("recovered: node is back on bundle={} version={}", state_.bundle_name, state_.version);
}

namespace {
// Before this agent was built: a device clock (or a header time) below this
// is not the real time (no RTC, booted in 1970).
constexpr int64_t kBuiltAfterMs = 1'735'689'600'000;  // 2025-01-01
constexpr int64_t kDayMs = 86'400'000;
}  // namespace

bool Agent::clock_suspect() const {
  // Before this agent was built, or more than a day behind / a year ahead of
  // the newest time the hub signed.
  const int64_t now = clock_.now_unix_ms();
  if (now < kBuiltAfterMs) return true;
  if (state_.hub_time_ms > 0) {
    if (now + kDayMs < state_.hub_time_ms) return true;
    if (now > state_.hub_time_ms + 366 * kDayMs) return true;
  }
  return false;
}

int64_t Agent::verify_time_ms(int64_t header_issued_ms) const {
  const int64_t now = clock_.now_unix_ms();
  const bool plausible = header_issued_ms >= kBuiltAfterMs;
  // The hub's signed times are a lower bound of the real time: a device
  // clock behind them (1970) is moved up, never an expiry moved back.
  const int64_t floor = std::max(state_.hub_time_ms, plausible ? header_issued_ms : 0);
  if (now < floor) return floor;
  // Far ahead of the time in the header being verified (fresh, director-
  // signed, above the replay floor: an attacker cannot make one): that time.
  if (plausible && now > header_issued_ms + 366 * kDayMs) return header_issued_ms;
  return now;
}

v1::AppliedBundle Agent::applied_bundle() const {
  v1::AppliedBundle a;
  a.set_name(state_.bundle_name);
  a.set_channel(state_.channel);
  a.set_version(state_.version);
  if (auto raw = from_hex(state_.manifest_sha256_hex)) a.set_manifest_sha256(std::string(raw->begin(), raw->end()));
  return a;
}

v1::Inventory Agent::inventory() {
  v1::Inventory inv;
  inv.set_agent_version(kAgentVersion);
  inv.set_arch(cfg_.arch);
  struct utsname u {};
  if (::uname(&u) == 0) inv.set_os(std::string(u.sysname) + " " + u.release);
  char host[256] = {0};
  if (::gethostname(host, sizeof host - 1) == 0) inv.set_hostname(host);
  if (auto v = runtime_.version(); v) inv.set_k3s_version(*v);
  inv.set_node_ready(last_node_ready_);
  inv.set_k3s_cert_expiry_unix(runtime_.serving_cert_expiry());
  // The filesystem k3s fills (data/<hash>, images, the datastore): what an
  // operator needs to see running out.
  if (auto fb = files_.free_bytes(runtime_.data_dir()); fb) inv.set_disk_free_bytes(*fb);
  if (auto tb = files_.total_bytes(runtime_.data_dir()); tb) inv.set_disk_total_bytes(*tb);
  if (cfg_.mem_free_bytes) {
    inv.set_mem_free_bytes(cfg_.mem_free_bytes());
  } else if (struct sysinfo si {}; ::sysinfo(&si) == 0) {
    inv.set_mem_free_bytes(static_cast<uint64_t>(si.freeram) * si.mem_unit);
  }
  for (const auto& [k, v] : labels()) (*inv.mutable_labels())[k] = v;
  inv.set_k3s_role(runtime_.role());
  inv.set_cluster_id(cfg_.cluster_id);
  if (struct sysinfo si {}; ::sysinfo(&si) == 0) inv.set_mem_total_bytes(static_cast<uint64_t>(si.totalram) * si.mem_unit);
  inv.set_clock_suspect(clock_suspect());
  return inv;
}

v1::Report Agent::make_report(v1::AgentState st, const Attempt& a, v1::Reason reason, const std::string& message,
                              uint32_t progress, bool with_inventory) {
  v1::Report r;
  r.set_device_id(cfg_.device_id);
  // Strictly increasing even across restarts and clock changes: the hub
  // drops anything not newer.
  r.set_seq(next_seq());
  r.set_time_unix_ms(clock_.now_unix_ms());
  r.set_state(st);
  r.set_generation(a.generation);
  r.set_campaign_id(a.campaign_id);
  r.set_bundle_name(a.bundle_name);
  r.set_bundle_version(a.bundle_version);
  r.set_progress_percent(progress);
  if (reason != v1::REASON_NONE) {
    r.mutable_error()->set_reason(reason);
    r.mutable_error()->set_message(message);
  }
  *r.mutable_applied() = applied_bundle();
  if (with_inventory) {
    *r.mutable_inventory() = inventory();
    last_inventory_ = r.inventory();
  }
  return r;
}

void Agent::report(v1::AgentState st, const Attempt& a, v1::Reason reason, const std::string& message,
                   uint32_t progress, bool with_inventory) {
  reporter_(make_report(st, a, reason, message, progress, with_inventory));
}

void Agent::finish(v1::AgentState st, const Attempt& a, v1::Reason reason, const std::string& message) {
  state_.generation = a.generation;
  if (a.signed_header) state_.director_generation = std::max(state_.director_generation, a.generation);
  state_.campaign_id = a.campaign_id;
  state_.in_flight.reset();
  auto r = make_report(st, a, reason, message, 100, true);
  for (const auto& d : deleted_) r.add_deleted_resources(d);
  deleted_.clear();
  // Bounded: only the newest outcomes matter to the hub.
  while (state_.outbox.size() >= 16) state_.outbox.erase(state_.outbox.begin());
  state_.outbox[r.seq()] = r.SerializeAsString();
  if (auto s = save(); !s) {
    // The store still holds the apply as in flight, with its backups listed:
    // keep them, so the next start can roll the node back to what the store
    // says it runs. Deleting them now would leave a node nobody can restore.
    log::get("agent")->error("could not record the outcome; keeping the backups for recovery at the next start: {}",
                             s.error().message);
  } else {
    // Only once the outcome is stored are the apply's backups no longer needed.
    (void)files_.remove_tree(backup_dir());
  }
  reporter_(std::move(r));
}

void Agent::outbox_delivered(uint64_t up_to_seq) {
  bool changed = false;
  while (!state_.outbox.empty() && state_.outbox.begin()->first <= up_to_seq) {
    state_.outbox.erase(state_.outbox.begin());
    changed = true;
  }
  if (changed) (void)save();
}

void Agent::report_inventory() {
  last_node_ready_ = runtime_.health().node_ready;
  Attempt a{state_.generation, state_.campaign_id, state_.bundle_name, state_.version};
  report(v1::AGENT_STATE_IDLE, a, v1::REASON_NONE, "", 100, true);
}

namespace {
// Free space is noise until it moves a lot or crosses the mark below which
// an operator wants to know.
bool free_space_changed(uint64_t sent, uint64_t now, uint64_t low_mark) {
  if ((sent < low_mark) != (now < low_mark)) return true;
  const uint64_t delta = sent > now ? sent - now : now - sent;
  return delta >= (uint64_t{16} << 20) && delta * 10 > sent;
}
}  // namespace

bool inventory_changed(const v1::Inventory& sent, const v1::Inventory& now) {
  if (sent.k3s_version() != now.k3s_version() || sent.node_ready() != now.node_ready() ||
      sent.k3s_cert_expiry_unix() != now.k3s_cert_expiry_unix() || sent.os() != now.os() ||
      sent.arch() != now.arch() || sent.agent_version() != now.agent_version() ||
      sent.hostname() != now.hostname()) {
    return true;
  }
  if (sent.labels().size() != now.labels().size()) return true;
  for (const auto& [k, v] : now.labels()) {
    auto it = sent.labels().find(k);
    if (it == sent.labels().end() || it->second != v) return true;
  }
  return free_space_changed(sent.disk_free_bytes(), now.disk_free_bytes(), kLowDiskBytes) ||
         free_space_changed(sent.mem_free_bytes(), now.mem_free_bytes(), kLowMemBytes);
}

bool Agent::check_inventory() {
  if (state_.in_flight) return false;
  last_node_ready_ = runtime_.health().node_ready;
  const v1::Inventory now = inventory();
  if (last_inventory_ && !inventory_changed(*last_inventory_, now)) return false;
  log::get("agent")->info("inventory changed k3s={} node_ready={}; reporting", now.k3s_version(), now.node_ready());
  Attempt a{state_.generation, state_.campaign_id, state_.bundle_name, state_.version};
  v1::Report r = make_report(v1::AGENT_STATE_IDLE, a, v1::REASON_NONE, "", 100, false);
  *r.mutable_inventory() = now;
  last_inventory_ = now;
  reporter_(std::move(r));
  return true;
}

void Agent::report_note(v1::Reason reason, const std::string& message) {
  Attempt a{state_.generation, state_.campaign_id, state_.bundle_name, state_.version};
  report(v1::AGENT_STATE_IDLE, a, reason, message, 100, true);
}

Status Agent::stage_one(const v1::Artifact& a, const std::string& url, v1::Reason& reason) {
  const std::string want = hex_of(a.sha256());
  const std::string staged = staging_dir() + "/" + want;
  if (auto h = files_.sha256_hex(staged); h && *h && **h == want) return {};
  const std::string part = staged + ".part";
  reason = v1::REASON_DOWNLOAD_FAILED;
  if (!downloader_) return make_error(Errc::unavailable, "this agent has no downloader for artifacts");
  if (auto s = downloader_->fetch(url, part, a.size()); !s) {
    if (s.error().code == Errc::too_large) {
      reason = v1::REASON_ARTIFACT_SIZE;
      (void)files_.remove(part);
      return make_error(Errc::too_large, "artifact " + a.name() + " is larger than the " +
                                             std::to_string(a.size()) + " bytes the manifest says");
    }
    return s.error().with_context("download " + a.name());  // the partial file stays for a resume
  }
  auto size = files_.size_of(part);
  if (!size || *size != a.size()) {
    reason = v1::REASON_ARTIFACT_SIZE;
    (void)files_.remove(part);
    return make_error(Errc::refused, "artifact " + a.name() + " has " + (size ? std::to_string(*size) : "?") +
                                         " bytes, the manifest says " + std::to_string(a.size()));
  }
  auto got = files_.sha256_hex(part);
  if (!got || !*got || **got != want) {
    reason = v1::REASON_ARTIFACT_HASH;
    (void)files_.remove(part);
    return make_error(Errc::refused, "artifact " + a.name() + " has sha256 " + (got && *got ? **got : "?") +
                                         ", the manifest says " + want);
  }
  if (auto s = files_.rename(part, staged, std::nullopt); !s) {
    reason = v1::REASON_INSTALL_FAILED;
    return s;
  }
  return {};
}

v1::Reason Agent::fetch_artifacts(const v1::BundleManifest& m, const std::string& base_url, std::string& why) {
  for (const auto& a : m.artifacts()) {
    const std::string target = artifact_path(a);
    if (auto h = files_.sha256_hex(target); h && *h && **h == hex_of(a.sha256())) continue;  // installed already
    std::string url = a.url();
    if (url.find("://") == std::string::npos) {
      if (base_url.empty()) {
        why = "artifact " + a.name() + " has a relative URL and the desired state names no artifact base";
        return v1::REASON_DOWNLOAD_FAILED;
      }
      url = base_url + (url.empty() ? hex_of(a.sha256()) : url);
    }
    v1::Reason reason = v1::REASON_NONE;
    if (auto s = stage_one(a, url, reason); !s) {
      why = s.error().message;
      return reason;
    }
  }
  return v1::REASON_NONE;
}

Status Agent::backup(const v1::BundleManifest& m) {
  std::set<std::string> touched;
  for (const auto& f : m.files()) touched.insert(path_for(f));
  for (const auto& a : m.artifacts()) {
    const std::string target = artifact_path(a);
    if (auto h = files_.sha256_hex(target); h && *h && **h == hex_of(a.sha256())) continue;
    touched.insert(target);
  }
  for (const auto& pf : state_.files) touched.insert(pf.path);
  std::vector<BackupEntry> out;
  const std::string dir = backup_dir() + "/" + apply_id_;
  size_t n = 0;
  for (const auto& path : touched) {
    BackupEntry e{path, dir + "/" + std::to_string(n++), files_.exists(path)};
    if (e.existed) {
      if (auto s = files_.preserve(path, e.backup); !s) return s.error().with_context("back up " + path);
    }
    out.push_back(std::move(e));
  }
  state_.in_flight->backups = std::move(out);
  return save();
}

Status Agent::install(const v1::BundleManifest& m, std::vector<PlacedFile>& placed) {
  std::set<std::string> new_paths;
  for (const auto& f : m.files()) {
    const std::string path = path_for(f);
    new_paths.insert(path);
    // Permission bits only: a bundle never makes a setuid, setgid or sticky file.
    const unsigned mode = f.mode() ? (f.mode() & 0777) : 0644;
    if (auto s = files_.write_atomic(path, f.content(), mode); !s) return s;
    placed.push_back({path, hex_of(f.sha256())});
  }
  for (const auto& a : m.artifacts()) {
    const std::string target = artifact_path(a);
    const std::string want = hex_of(a.sha256());
    new_paths.insert(target);
    placed.push_back({target, want});
    if (auto h = files_.sha256_hex(target); h && *h && **h == want) continue;
    const unsigned mode = a.kind() == v1::ARTIFACT_KIND_K3S_BINARY ? 0755 : 0644;
    if (auto s = files_.rename(staging_dir() + "/" + want, target, mode); !s) return s;
  }
  // Manifests, drop-ins and images the previous bundle placed that this one
  // does not are removed (k3s would keep applying a stale manifest otherwise).
  // The k3s binary stays: a bundle without one keeps the installed k3s.
  for (const auto& pf : state_.files) {
    if (!new_paths.count(pf.path) && pf.path != cfg_.k3s_bin) {
      // k3s deletes nothing when a manifest leaves server/manifests: delete
      // what it created while the file (and the old k3s) are still there.
      if (pf.path.rfind(kManifestDir, 0) == 0) delete_manifest_resources(pf.path);
      if (auto s = files_.remove(pf.path); !s) return s;
    }
  }
  return {};
}

v1::BundleManifest Agent::resolved_for_device(const v1::BundleManifest& m) const {
  v1::BundleManifest out = m;
  out.clear_files();
  // Only the artifacts for this device's architecture (one bundle serves a
  // mixed fleet: a k3s binary per arch).
  out.clear_artifacts();
  for (const auto& a : m.artifacts()) {
    bool mine = a.arch_size() == 0;
    for (const auto& x : a.arch()) mine |= x == cfg_.arch;
    if (mine) *out.add_artifacts() = a;
  }
  auto resolved = bundles::resolve(m, labels());
  for (auto& f : resolved.files) *out.add_files() = std::move(f);
  return out;
}

std::vector<std::string> Agent::restore(const std::vector<BackupEntry>& backups) {
  std::vector<std::string> dropped;
  for (const auto& b : backups) {
    Status s;
    if (b.existed) {
      // Idempotent: a second recovery finds the backup already moved back.
      if (files_.exists(b.backup)) s = files_.rename(b.backup, b.path, std::nullopt);
    } else {
      // A manifest the apply added: kept aside (in the backup directory,
      // removed with it) so its resources can be deleted once k3s is back.
      if (b.path.rfind(kManifestDir, 0) == 0 && files_.exists(b.path)) {
        const std::string copy = b.backup + ".dropped.yaml";
        if (files_.preserve(b.path, copy)) dropped.push_back(copy);
      }
      s = files_.remove(b.path);
    }
    if (!s) log::get("agent")->error("rollback: restore {} failed: {}", b.path, s.error().message);
  }
  return dropped;
}

void Agent::delete_manifest_resources(const std::string& path) {
  auto r = runtime_.delete_manifest(path);
  if (!r) {
    log::get("agent")->warn("could not delete the resources of {}: {}", path, r.error().message);
    return;
  }
  for (auto& d : *r) {
    log::get("agent")->info("deleted {} (its manifest left the node)", d);
    if (deleted_.size() < 256) deleted_.push_back(std::move(d));
  }
}

Agent::GateResult Agent::health_gate(const v1::BundleManifest& m, int64_t restarted_unix, int64_t back_unix,
                                     std::optional<int64_t> heartbeat_before) {
  const auto timeout = m.health().timeout_seconds() ? std::chrono::milliseconds(m.health().timeout_seconds() * 1000LL)
                                                    : cfg_.health_timeout;
  const auto settle = m.health().settle_seconds() ? std::chrono::milliseconds(m.health().settle_seconds() * 1000LL)
                                                  : cfg_.health_settle;
  const auto start = clock_.monotonic();
  const auto deadline = start + timeout;
  const std::string want = m.k3s_version();
  // The k3s binary that was started must be the bundle's: a wrong one will
  // not turn right by waiting.
  if (!want.empty()) {
    if (auto v = runtime_.version(); v && !v->empty() && *v != want) {
      return {false, v1::REASON_K3S_VERSION, "k3s --version says " + *v + ", the bundle is for " + want};
    }
  }
  bool settling = false;
  auto ready_since = start;
  std::string last = "no answer yet";
  v1::Reason last_reason = v1::REASON_HEALTH_GATE_FAILED;
  std::vector<WorkloadRef> workloads;
  if (runtime_.role() == "server") {
    for (const auto& w : m.health().workloads()) {
      const std::string ns = !w.namespace_().empty() ? w.namespace_() : w.kind() == "HelmChart" ? "kube-system" : "default";
      workloads.push_back({w.kind(), ns, w.name()});
    }
  }
  auto secs = [](std::chrono::steady_clock::duration d) {
    return std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(d).count() / 1000.0).substr(0, 5) + "s";
  };
  for (;;) {
    const K3sHealth h = runtime_.health();
    last_node_ready_ = h.node_ready;
    const auto now = clock_.monotonic();
    bool good = h.ok();
    last_reason = v1::REASON_HEALTH_GATE_FAILED;
    if (!good) {
      last = h.detail.empty() ? "not ready" : h.detail;
    } else if (h.heartbeat_unix && (*h.heartbeat_unix < restarted_unix ||
                                    (heartbeat_before && *h.heartbeat_unix <= *heartbeat_before))) {
      // k3s shows the node Ready from before the restart until the node
      // lease runs out (~40 s): that is old news, not the new k3s.
      good = false;
      last = "node Ready only with a heartbeat from before the restart (stale)";
    } else if (!want.empty() && !h.kubelet_version.empty() && h.kubelet_version != want) {
      good = false;
      if (h.heartbeat_unix && *h.heartbeat_unix <= back_unix) {
        // Posted while the k3s from before may still have run (heartbeats
        // are in whole seconds): another version there is its kubelet's last
        // word, not the new k3s's. A new kubelet posts again.
        last = "node Ready by k3s " + h.kubelet_version + " with a heartbeat from during the restart, not yet the "
               "new k3s";
      } else {
        last = "the node runs k3s " + h.kubelet_version + ", the bundle is for " + want;
        last_reason = v1::REASON_K3S_VERSION;
      }
    }
    if (!good) {
      settling = false;
    } else if (!settling) {
      settling = true;
      ready_since = now;
    }
    if (good && now - ready_since >= settle) {
      // Settled: now the bundle's workloads, while the node stays Ready.
      bool all = true;
      for (const auto& w : workloads) {
        auto st = runtime_.workload(w);
        if (st && st->failed) {
          return {false, v1::REASON_WORKLOAD_NOT_READY, w.text() + " failed: " + st->detail};
        }
        if (!st || !st->ready) {
          all = false;
          last = w.text() + " not ready: " + (st ? st->detail : st.error().message);
          last_reason = v1::REASON_WORKLOAD_NOT_READY;
          break;
        }
      }
      if (all) return {true, v1::REASON_NONE, ""};
    } else if (good) {
      last = "node Ready for " + secs(now - ready_since) + " of the " + secs(settle) + " settling window";
    }
    if (now >= deadline) break;
    clock_.sleep_for(std::min<std::chrono::milliseconds>(
        cfg_.health_poll, std::chrono::duration_cast<std::chrono::milliseconds>(deadline - now) +
                              std::chrono::milliseconds(1)));
  }
  return {false, last_reason, "k3s not healthy within " + secs(timeout) + ": " + last};
}

DesiredDecision decide_desired(std::string_view payload, const DesiredContext& ctx) {
  DesiredDecision d;
  using Action = DesiredDecision::Action;
  // Moved out, not copied: d holds the whole parsed message (bundle, trust).
  auto refuse = [&d](v1::Reason r, std::string msg) -> DesiredDecision&& {
    d.action = Action::refuse;
    d.reason = r;
    d.message = std::move(msg);
    return std::move(d);
  };
  if (payload.empty()) {  // a cleared retained message
    d.action = Action::ignore;
    return d;
  }
  if (payload.size() > bundles::kMaxDesiredStateBytes ||
      !d.ds.ParseFromArray(payload.data(), static_cast<int>(payload.size()))) {
    d.action = Action::malformed;
    d.reason = v1::REASON_MALFORMED_DESIRED;
    d.message = "desired-state message does not parse; ignored";
    return d;
  }
  const v1::DesiredState& ds = d.ds;
  // Until a header is verified these are only what the message claims: good
  // enough to say which message a refusal is about, never acted on.
  d.generation = ds.generation();
  d.campaign_id = ds.campaign_id();
  d.rollback = ds.rollback();
  d.artifact_base_url = ds.artifact_base_url();
  // Stored as a SQLite integer: a larger one could not be saved (nor be a floor).
  if (ds.generation() > bundles::kMaxStoredInteger) {
    return refuse(v1::REASON_MALFORMED_DESIRED, "generation " + std::to_string(ds.generation()) +
                                                    " is above 9223372036854775807");
  }

  if (!ctx.director) {
    // No director key: nothing here is authenticated. What an unsigned
    // field can do is bounded instead: it is never a floor (an exact repeat
    // of the last generation is all that is skipped), and it cannot ask for
    // a rollback below the anti-rollback floor.
    if (ds.device_id() != ctx.device_id) {
      return refuse(v1::REASON_WRONG_DEVICE, "desired state is for device " + ds.device_id().substr(0, 128));
    }
    if (ds.generation() != 0 && ds.generation() == ctx.last_generation) {
      d.action = Action::ignore;
      d.message = "generation " + std::to_string(ds.generation()) + " already handled";
      return d;
    }
    if (ds.rollback()) {
      return refuse(v1::REASON_DESIRED_UNSIGNED,
                    "a campaign rollback needs a desired state signed by the hub's director key, and this agent "
                    "pins none (set director-key, or enroll again; docs/agent.md)");
    }
    d.manifest_sha256_hex = bundles::manifest_digest_hex(ds.bundle());
    return d;
  }

  if (!ds.has_header() || ds.header().signature().empty()) {
    return refuse(v1::REASON_DESIRED_UNSIGNED,
                  "desired state carries no header signed by the hub's director key, which this device pins");
  }
  auto hv = bundles::verify_desired_header(ds.header(), *ctx.director);
  if (!hv.ok()) return refuse(hv.reason, hv.message);
  const v1::DesiredHeader& h = hv.header;
  if (h.device_id() != ctx.device_id) {
    return refuse(v1::REASON_WRONG_DEVICE, "the signed header is for device " + h.device_id().substr(0, 128));
  }
  d.generation = h.generation();
  d.campaign_id = h.campaign_id();
  d.rollback = h.rollback();
  d.artifact_base_url = h.artifact_base_url();
  // A move to another cell's broker, signed by the director for this device.
  if (!h.broker_url().empty()) {
    d.broker_url = h.broker_url().substr(0, 1024);
    d.move_issued_ms = h.issued_unix_ms();
    if (h.generation() == 0) {  // a move alone: nothing to apply
      d.action = Action::ignore;
      d.message = "a move to broker " + d.broker_url;
      return d;
    }
  }
  if (h.generation() == 0 || h.generation() > bundles::kMaxStoredInteger) {
    return refuse(v1::REASON_MALFORMED_DESIRED, "signed generation " + std::to_string(h.generation()) +
                                                    " is outside 1..9223372036854775807");
  }
  // The unsigned copies must agree (old agents read them); the header decides.
  std::string differs;
  if (!ds.device_id().empty() && ds.device_id() != h.device_id()) differs = "device_id";
  else if (ds.generation() != 0 && ds.generation() != h.generation()) differs = "generation";
  else if (!ds.campaign_id().empty() && ds.campaign_id() != h.campaign_id()) differs = "campaign_id";
  else if (ds.rollback() && !h.rollback()) differs = "rollback";
  else if (!ds.artifact_base_url().empty() && ds.artifact_base_url() != h.artifact_base_url()) differs = "artifact_base_url";
  if (!differs.empty()) {
    return refuse(v1::REASON_DESIRED_MISMATCH, "the message's " + differs + " differs from its signed header");
  }
  const auto digest = crypto::sha256(ds.bundle().manifest());
  if (h.manifest_sha256() != std::string(digest.begin(), digest.end())) {
    return refuse(v1::REASON_DESIRED_MISMATCH,
                  "the bundle is not the one the signed header names (manifest sha256 " +
                      hex_of(h.manifest_sha256()).substr(0, 16) + "…, the message carries " +
                      to_hex(digest.data(), digest.size()).substr(0, 16) + "…)");
  }
  if (h.generation() == ctx.director_generation) {
    d.action = Action::ignore;  // the retained message again, after a reconnect
    d.message = "generation " + std::to_string(h.generation()) + " already handled";
    return d;
  }
  if (h.generation() < ctx.director_generation) {
    return refuse(v1::REASON_DESIRED_REPLAY, "signed generation " + std::to_string(h.generation()) +
                                                 " is below " + std::to_string(ctx.director_generation) +
                                                 ", the highest this device finished: a replay");
  }
  d.signed_header = true;
  d.manifest_sha256_hex = to_hex(digest.data(), digest.size());
  d.issued_unix_ms = h.issued_unix_ms();
  d.rotate_certificates = h.k3s_action() == v1::K3S_ACTION_ROTATE_CERTIFICATES;
  if (h.labels_set()) {
    if (h.labels_size() > 64) return refuse(v1::REASON_MALFORMED_DESIRED, "the signed header carries more than 64 labels");
    for (const auto& [k, v] : h.labels()) {
      // Kubernetes-style labels only (they are stored as key=value lines).
      if (k.empty() || k.size() > 253 || v.size() > 253 || k.find_first_of("=\n\r") != std::string::npos ||
          v.find_first_of("\n\r") != std::string::npos) {
        return refuse(v1::REASON_MALFORMED_DESIRED, "the signed header carries a malformed label");
      }
    }
    d.labels = std::map<std::string, std::string>(h.labels().begin(), h.labels().end());
  }
  return d;
}

void Agent::handle_desired(const std::string& payload) {
  auto logger = log::get("agent");
  DesiredContext ctx{cfg_.device_id, cfg_.director_key ? &*cfg_.director_key : nullptr, state_.director_generation,
                     state_.generation};
  DesiredDecision dd = decide_desired(payload, ctx);
  if (!dd.broker_url.empty() && (dd.action == DesiredDecision::Action::ignore ||
                                 dd.action == DesiredDecision::Action::handle)) {
    broker_move_ = BrokerMove{dd.broker_url, dd.move_issued_ms};
  }
  switch (dd.action) {
    case DesiredDecision::Action::ignore:
      if (!dd.message.empty()) logger->debug("desired state ignored: {}", dd.message);
      return;
    case DesiredDecision::Action::malformed:
      logger->warn("ignored malformed desired state bytes={}", payload.size());
      // Not about any campaign: the message could not say which one it was.
      report(v1::AGENT_STATE_FAILED, Attempt{}, dd.reason, dd.message);
      return;
    case DesiredDecision::Action::refuse:
      logger->warn("refused desired state generation={} reason={} {}", dd.generation, v1::Reason_Name(dd.reason),
                   dd.message);
      report(v1::AGENT_STATE_REFUSED, Attempt{dd.generation, dd.campaign_id, "", 0}, dd.reason, dd.message);
      return;
    case DesiredDecision::Action::handle:
      break;
  }
  const v1::DesiredState& ds = dd.ds;
  Attempt a{dd.generation, dd.campaign_id, "", 0, dd.signed_header};
  apply_generation_ = dd.generation;
  apply_id_ = "g" + std::to_string(dd.generation) + "-" + std::to_string(seq_ + 1);
  if (dd.generation != 0 && dd.generation == state_.interrupted_generation &&
      state_.interrupted_count >= cfg_.max_interrupted) {
    const std::string why = "the apply of generation " + std::to_string(dd.generation) + " was interrupted " +
                            std::to_string(state_.interrupted_count) + " times (crash or power loss); giving up on it";
    logger->error("{}", why);
    return finish(v1::AGENT_STATE_FAILED, a, v1::REASON_INTERNAL, why);
  }
  if (ds.has_trust() && cfg_.trust) {
    // All-or-nothing: a refused update leaves the store (and trust.pb) as it was.
    auto tv = cfg_.trust->update(ds.trust(), clock_);
    if (!tv.ok()) {
      logger->warn("refused trust update generation={} reason={} {}", dd.generation, v1::Reason_Name(tv.reason),
                   tv.message);
      report(v1::AGENT_STATE_REFUSED, a, tv.reason, tv.message);
      return;
    }
    // Persisted even when the bundle below is refused: the trust moved forward.
    if (auto s = files_.write_atomic(trust_state_path(), cfg_.trust->serialize(), 0600); !s) {
      logger->error("could not persist trust state: {}", s.error().message);
    } else {
      logger->info("trust root_version={} signing_version={}", cfg_.trust->root_version(),
                   cfg_.trust->signing_version());
    }
  }
  if (dd.signed_header) {
    // The hub's signed time: a lower bound of the real time for a device
    // whose clock is wrong (no RTC, booted in 1970).
    if (dd.issued_unix_ms >= kBuiltAfterMs) state_.hub_time_ms = std::max(state_.hub_time_ms, dd.issued_unix_ms);
    if (dd.labels && (!state_.hub_labels_set || state_.hub_labels != *dd.labels)) {
      logger->info("labels from the hub: {} label(s), replacing the {} ones", dd.labels->size(),
                   state_.hub_labels_set ? "previous hub" : "enrollment");
      state_.hub_labels = *dd.labels;
      state_.hub_labels_set = true;
      (void)save();
    }
  }
  const std::string& digest = dd.manifest_sha256_hex;
  // The same bundle resolves to other files when the labels changed (overlays).
  bool same_files = true;
  if (!state_.manifest_sha256_hex.empty() && digest == state_.manifest_sha256_hex) {
    v1::BundleManifest current;
    if (current.ParseFromString(ds.bundle().manifest())) {
      std::set<std::pair<std::string, std::string>> want, have;
      const v1::BundleManifest resolved = resolved_for_device(current);
      for (const auto& f : resolved.files()) want.insert({path_for(f), hex_of(f.sha256())});
      for (const auto& pf : state_.files) {
        if (pf.path.rfind(kK3sConfigDir, 0) == 0 || pf.path.rfind(kManifestDir, 0) == 0 || pf.path == kRegistries) {
          have.insert({pf.path, pf.sha256_hex});
        }
      }
      same_files = want == have;
    }
  }
  // A certificate rotation goes through the whole pipeline (backup, rotate,
  // restart, health gate, rollback), even for the bundle already applied.
  if (!state_.manifest_sha256_hex.empty() && digest == state_.manifest_sha256_hex && same_files &&
      !dd.rotate_certificates) {
    // Already running exactly this bundle: nothing to install.
    a.bundle_name = state_.bundle_name;
    a.bundle_version = state_.version;
    state_.generation = dd.generation;
    state_.campaign_id = dd.campaign_id;
    if (a.signed_header) state_.director_generation = std::max(state_.director_generation, dd.generation);
    (void)save();
    report(v1::AGENT_STATE_APPLIED, a, v1::REASON_NONE, "", 100, true);
    return;
  }

  step("verify", "begin");
  report(v1::AGENT_STATE_VERIFYING, a, v1::REASON_NONE, "", 5);
  bundles::VerifyPolicy policy;
  // A device clock far off (1970, or years ahead) would make every bundle
  // look not yet valid or expired: the hub's signed time stands in for it.
  const int64_t verify_ms = verify_time_ms(dd.signed_header ? dd.issued_unix_ms : 0);
  const FakeClock hub_clock(verify_ms / 1000);
  const bool use_hub_time = verify_ms != clock_.now_unix_ms();
  if (use_hub_time) logger->warn("device clock looks wrong; checking bundle validity against the hub's signed time");
  policy.clock = use_hub_time ? static_cast<const Clock*>(&hub_clock) : &clock_;
  policy.arch = cfg_.arch;
  policy.labels = labels();
  policy.check_labels = true;
  policy.highest_applied = state_.highest_version;
  policy.current_channel = state_.channel;
  // A campaign rollback (signed: decide_desired refuses it otherwise) may go
  // back below the highest applied version, and to the previous bundle's
  // channel, but only to the exact bundle this device ran before (below).
  if (dd.rollback) {
    policy.highest_applied.clear();
    policy.current_channel.clear();
  }
  // The bundle already applied, placed again for new labels: not a rollback.
  if (digest == state_.manifest_sha256_hex) policy.highest_applied.clear();
  auto verdict = cfg_.trust ? cfg_.trust->verify(ds.bundle(), policy) : bundles::verify(ds.bundle(), cfg_.keyring, policy);
  if (verdict.manifest.version()) {
    a.bundle_name = verdict.manifest.name();
    a.bundle_version = verdict.manifest.version();
  }
  if (verdict.ok() && dd.rollback) {
    auto hv = state_.highest_version.find(verdict.manifest.channel());
    const bool below_floor = hv != state_.highest_version.end() && verdict.manifest.version() <= hv->second;
    const bool other_channel = !state_.channel.empty() && verdict.manifest.channel() != state_.channel;
    if ((below_floor || other_channel) &&
        (state_.previous_manifest_sha256_hex.empty() || digest != state_.previous_manifest_sha256_hex)) {
      verdict.reason = v1::REASON_ROLLBACK_TARGET;
      verdict.message = "rollback to " + verdict.manifest.name() + " version " +
                        std::to_string(verdict.manifest.version()) + " (sha256 " + digest.substr(0, 16) +
                        "…) refused: it is not the bundle this device applied before";
    }
  }
  for (const auto& art : verdict.manifest.artifacts()) {
    if (!verdict.ok()) break;
    if (art.kind() == v1::ARTIFACT_KIND_K3S_BINARY && cfg_.arch == "armv6") {
      verdict.reason = v1::REASON_WRONG_ARCH;
      verdict.message = "this device is ARMv6; k3s's armhf build needs ARMv7, so no k3s binary can run here";
    } else if (artifact_path(art).empty() || art.sha256().size() != 32) {
      verdict.reason = v1::REASON_MALFORMED_MANIFEST;
      verdict.message = "artifact '" + art.name() + "' has an unknown kind, a bad name or no sha256";
    } else if (art.size() == 0 || art.size() > cfg_.max_artifact_bytes) {
      verdict.reason = v1::REASON_ARTIFACT_SIZE;
      verdict.message = "artifact '" + art.name() + "' declares " + std::to_string(art.size()) +
                        " bytes; allowed 1.." + std::to_string(cfg_.max_artifact_bytes);
    }
  }
  step("verify", "end", verdict.ok() ? "ok" : v1::Reason_Name(verdict.reason));
  if (!verdict.ok()) {
    logger->warn("refused bundle generation={} reason={} {}", dd.generation,
                 v1::Reason_Name(verdict.reason), verdict.message);
    // Nothing was written; the generation is not recorded so a corrected
    // desired state with a higher generation is still taken.
    report(v1::AGENT_STATE_REFUSED, a, verdict.reason, verdict.message);
    return;
  }
  // What this device places: the base files with its matching overlays applied.
  const v1::BundleManifest m = resolved_for_device(verdict.manifest);

  step("space", "begin");
  uint64_t need = 0;
  for (const auto& f : m.files()) need += f.content().size();
  for (const auto& art : m.artifacts()) {
    if (auto h = files_.sha256_hex(artifact_path(art)); h && *h && **h == hex_of(art.sha256())) continue;
    need += art.size();
    // What k3s unpacks besides: a new k3s binary extracts its payload into
    // data/<hash> (about three times the binary), containerd unpacks airgap
    // images into its content store and snapshots (about twice the tarball).
    // A version change also snapshots the datastore.
    if (art.kind() == v1::ARTIFACT_KIND_K3S_BINARY) need += art.size() * kK3sExtractFactor + runtime_.datastore_bytes();
    if (art.kind() == v1::ARTIFACT_KIND_AIRGAP_IMAGES) need += art.size() * kImagesUnpackFactor;
  }
  auto fb = files_.free_bytes("/");
  step("space", "end");
  if (fb && *fb < need + cfg_.min_free_bytes) {
    const std::string why = "not enough disk space: need " + std::to_string(need + cfg_.min_free_bytes) +
                            " bytes free (bundle " + std::to_string(need) + " + reserve " +
                            std::to_string(cfg_.min_free_bytes) + "), have " + std::to_string(*fb);
    logger->error("{}", why);
    report(v1::AGENT_STATE_FAILED, a, v1::REASON_DISK_FULL, why);
    return;
  }

  // From here on a crash leaves a record that start() acts on.
  deleted_.clear();
  state_.in_flight = InFlight{apply_id_, dd.generation, dd.campaign_id, m.name(), m.version(), "download", {}, {}, {}};
  if (auto s = save(); !s) {
    report(v1::AGENT_STATE_FAILED, a, v1::REASON_INTERNAL, "cannot journal the apply: " + s.error().message);
    return;
  }
  step("download", "begin");
  if (m.artifacts_size() > 0) {
    report(v1::AGENT_STATE_DOWNLOADING, a, v1::REASON_NONE, "", 15);
    std::string why;
    if (auto reason = fetch_artifacts(m, dd.artifact_base_url, why); reason != v1::REASON_NONE) {
      step("download", "end", why);
      logger->warn("artifacts for bundle={} version={} not staged: {}", m.name(), m.version(), why);
      const bool refused = reason == v1::REASON_ARTIFACT_HASH || reason == v1::REASON_ARTIFACT_SIZE;
      return finish(refused ? v1::AGENT_STATE_REFUSED : v1::AGENT_STATE_FAILED, a, reason, why);
    }
  }
  step("download", "end");

  report(v1::AGENT_STATE_INSTALLING, a, v1::REASON_NONE, "", 30);
  advance(Step::backup, false);
  step("backup", "begin");
  if (auto s = backup(m); !s) {
    // Nothing was installed; finish() drops the partial backups once the
    // outcome is stored.
    return finish(v1::AGENT_STATE_FAILED, a, v1::REASON_INSTALL_FAILED, s.error().message);
  }
  step("backup", "end");

  // The node's heartbeat as the running k3s left it, read before anything
  // stops it: only a newer one (and not older than the restart, on the
  // device clock both share) comes from the k3s started by this apply.
  const std::optional<int64_t> heartbeat_before = runtime_.node_heartbeat();
  // A k3s version change: snapshot the datastore first (Kubernetes does not
  // support downgrades; a rollback puts it back).
  bool k3s_changes = false;
  for (const auto& art : m.artifacts()) {
    if (art.kind() != v1::ARTIFACT_KIND_K3S_BINARY) continue;
    auto h = files_.sha256_hex(artifact_path(art));
    k3s_changes |= !(h && *h && **h == hex_of(art.sha256()));
  }
  if (k3s_changes) {
    advance(Step::snapshot, true);
    step("snapshot", "begin");
    auto snap = runtime_.snapshot_datastore(backup_dir() + "/" + apply_id_ + "/datastore", apply_id_);
    if (!snap) {
      step("snapshot", "end", snap.error().message);
      // Nothing installed yet; finish() drops the backups.
      (void)runtime_.ensure_running();  // a SQLite copy stops k3s first
      return finish(v1::AGENT_STATE_FAILED, a, v1::REASON_DATASTORE_SNAPSHOT,
                    "could not snapshot the datastore before the k3s version change: " + snap.error().message);
    }
    state_.in_flight->snapshot = *snap;
    (void)save();
    step("snapshot", "end", snap->kind.empty() ? "no datastore" : snap->kind + " " + snap->path);
  }
  advance(Step::install, true);
  step("install", "begin");
  std::vector<PlacedFile> placed;
  if (auto s = install(m, placed); !s) {
    restore(state_.in_flight->backups);
    return finish(v1::AGENT_STATE_FAILED, a, v1::REASON_INSTALL_FAILED, s.error().message);
  }
  step("install", "end");

  // k3s extracts a new binary's payload into data/<hash> at its start and
  // never removes an old one: what appeared across the restart is the new
  // k3s's. `running_before` is the directory the k3s before this apply ran
  // from (the one a rollback needs), when known.
  std::set<std::string> dirs_before;
  std::string running_before;
  auto fresh_dirs = [&] {
    std::vector<std::string> out;
    for (const auto& d : runtime_.data_dirs()) {
      if (!dirs_before.count(d)) out.push_back(d);
    }
    return out;
  };

  auto roll_back = [&](v1::Reason reason, const std::string& why) {
    logger->warn("rolling back bundle={} version={}: {}", m.name(), m.version(), why);
    report(v1::AGENT_STATE_ROLLING_BACK, a, reason, why, 80);
    advance(Step::rollback, true);
    step("rollback", "begin", why);
    const auto dropped = restore(state_.in_flight->backups);
    // Kubernetes does not support downgrades: the datastore goes back to
    // what it was before the new k3s touched it.
    if (const auto snap = state_.in_flight->snapshot; !snap.kind.empty()) {
      if (auto s = runtime_.restore_datastore(snap); !s) {
        logger->error("rollback: restoring the datastore from {} failed: {}", snap.path, s.error().message);
      } else {
        logger->warn("rollback: datastore restored from the {} snapshot {}", snap.kind, snap.path);
      }
    }
    // A failed rotation: k3s starts again with the certificates it had.
    if (const auto backup = state_.in_flight->cert_backup; !backup.empty()) {
      if (auto s = runtime_.restore_certificates(backup); !s) {
        logger->error("rollback: restoring k3s certificates from {} failed: {}", backup, s.error().message);
      } else {
        logger->warn("rollback: k3s certificates restored from {}", backup);
      }
    }
    if (auto s = runtime_.restart(); !s) logger->error("restart after rollback failed: {}", s.error().message);
    // What the failed k3s extracted goes; the old one runs from its own.
    if (const auto fresh = fresh_dirs(); !fresh.empty()) {
      if (auto s = runtime_.remove_data_dirs(fresh, running_before); !s) {
        logger->warn("rollback: could not remove the failed k3s's data dirs: {}", s.error().message);
      } else {
        logger->info("rollback: removed {} data dir(s) the failed k3s extracted", fresh.size());
      }
    }
    // Manifests the rollback took off the node: their resources go too, once
    // the old k3s answers again (k3s deletes nothing when a file goes).
    if (!dropped.empty()) {
      const auto until = clock_.monotonic() + cfg_.health_timeout;
      while (!runtime_.health().api_ready && clock_.monotonic() < until) clock_.sleep_for(cfg_.health_poll);
      for (const auto& copy : dropped) delete_manifest_resources(copy);
    }
    // The outcome for this generation is final: do not retry it on reconnect.
    // finish() removes the backups only once that is stored.
    finish(v1::AGENT_STATE_ROLLED_BACK, a, reason, why);
    step("rollback", "end");
  };

  // docs.k3s.io "Certificate Management": stop k3s, `k3s certificate
  // rotate`, start k3s (the restart below); k3s issues new leaf certificates
  // at that start. The old ones are kept for a rollback.
  const int64_t expiry_before = runtime_.serving_cert_expiry();
  for (const auto& d : runtime_.data_dirs()) dirs_before.insert(d);
  if (!state_.k3s_data_dir.empty() && dirs_before.count(state_.k3s_data_dir)) {
    running_before = state_.k3s_data_dir;
  } else if (dirs_before.size() == 1) {
    running_before = *dirs_before.begin();
  }
  if (dd.rotate_certificates) {
    advance(Step::rotate, true);
    step("rotate", "begin");
    auto backup = runtime_.rotate_certificates();
    if (!backup) {
      step("rotate", "end", backup.error().message);
      return roll_back(v1::REASON_CERT_ROTATION, "k3s certificate rotate failed: " + backup.error().message);
    }
    state_.in_flight->cert_backup = *backup;
    (void)save();
    step("rotate", "end", *backup);
  }

  report(v1::AGENT_STATE_RESTARTING, a, v1::REASON_NONE, "", 60);
  advance(Step::restart, true);
  step("restart", "begin");
  const int64_t restarted_unix = clock_.now_unix();
  if (auto s = runtime_.restart(); !s) {
    // systemd/OpenRC refusing is the service's failure, not k3s's.
    return roll_back(s.error().code == Errc::refused ? v1::REASON_SERVICE_FAILED : v1::REASON_RESTART_FAILED,
                     s.error().message);
  }
  const int64_t back_unix = clock_.now_unix();
  step("restart", "end");

  report(v1::AGENT_STATE_HEALTH_CHECK, a, v1::REASON_NONE, "", 70);
  advance(Step::health, true);
  step("health", "begin");
  const GateResult gate = health_gate(m, restarted_unix, back_unix, heartbeat_before);
  step("health", "end", gate.ok ? "healthy" : gate.why);
  if (!gate.ok) return roll_back(gate.reason, gate.why);
  if (dd.rotate_certificates) {
    // Healthy but still serving the old certificate: the rotation did not happen.
    const int64_t expiry_after = runtime_.serving_cert_expiry();
    if (expiry_after == 0 || (expiry_before != 0 && expiry_after <= expiry_before)) {
      return roll_back(v1::REASON_CERT_ROTATION,
                       "k3s came back without a renewed serving certificate (notAfter " +
                           std::to_string(expiry_after) + ", before " + std::to_string(expiry_before) + ")");
    }
    logger->info("k3s certificates rotated: serving certificate notAfter {} -> {}", expiry_before, expiry_after);
  }

  // The data dir the new k3s runs from: the one its start extracted, or the
  // old one when k3s did not change. Unknown when a new k3s found its
  // directory already there (an earlier attempt's, left by a crash).
  const auto fresh = fresh_dirs();
  std::string running;
  if (fresh.size() == 1) running = fresh.front();
  else if (fresh.empty() && !k3s_changes) running = running_before;

  advance(Step::commit, false);
  step("commit", "begin");
  state_.k3s_data_dir = running;
  if (state_.manifest_sha256_hex != digest) state_.previous_manifest_sha256_hex = state_.manifest_sha256_hex;
  state_.bundle_name = m.name();
  state_.channel = m.channel();
  state_.version = m.version();
  state_.manifest_sha256_hex = digest;
  state_.files = placed;
  state_.applied_desired = payload;
  // A campaign rollback never lowers the highest applied version.
  auto& hv = state_.highest_version[m.channel()];
  hv = std::max(hv, m.version());
  finish(v1::AGENT_STATE_APPLIED, a, v1::REASON_NONE, "");
  step("commit", "end");
  logger->info("applied bundle={} version={} generation={}", m.name(), m.version(), dd.generation);
  // Committed: superseded data/<hash> directories go (k3s keeps every one it
  // ever extracted, ~200 MB each). Kept: the running k3s's and the one a
  // rollback to the previous bundle runs. Nothing goes when either is unknown.
  if (!running.empty() && (!k3s_changes || !running_before.empty())) {
    std::vector<std::string> superseded;
    for (const auto& d : runtime_.data_dirs()) {
      if (d != running && d != running_before) superseded.push_back(d);
    }
    if (!superseded.empty()) {
      if (auto s = runtime_.remove_data_dirs(superseded, running); !s) {
        logger->warn("could not remove superseded k3s data dirs: {}", s.error().message);
      } else {
        logger->info("removed {} superseded k3s data dir(s)", superseded.size());
      }
    }
  }
}

std::vector<std::string> Agent::check_drift() {
  std::vector<std::string> drifted;
  if (state_.in_flight || state_.files.empty()) return drifted;
  for (const auto& pf : state_.files) {
    auto h = files_.sha256_hex(pf.path);
    if (!h || !*h || **h != pf.sha256_hex) drifted.push_back(pf.path);
  }
  if (drifted.empty()) return drifted;
  auto logger = log::get("agent");
  v1::DesiredState ds;
  v1::BundleManifest m;
  std::vector<std::string> failed;
  bool restart = false;
  if (!ds.ParseFromString(state_.applied_desired) || !m.ParseFromString(ds.bundle().manifest())) {
    failed = drifted;
  } else {
    // Verified when it was applied; an old-style message has no header.
    std::string base_url = ds.artifact_base_url();
    if (v1::DesiredHeader h; base_url.empty() && ds.has_header() && h.ParseFromString(ds.header().header())) {
      base_url = h.artifact_base_url();
    }
    m = resolved_for_device(m);
    const std::set<std::string> bad(drifted.begin(), drifted.end());
    for (const auto& f : m.files()) {
      const std::string path = path_for(f);
      if (!bad.count(path)) continue;
      const unsigned mode = f.mode() ? (f.mode() & 0777) : 0644;
      if (auto s = files_.write_atomic(path, f.content(), mode); !s) failed.push_back(path);
      // k3s reads config and registries at start; manifests it watches itself.
      if (f.kind() != v1::FILE_KIND_MANIFEST) restart = true;
    }
    for (const auto& art : m.artifacts()) {
      const std::string target = artifact_path(art);
      if (!bad.count(target)) continue;
      v1::Reason reason = v1::REASON_NONE;
      std::string url = art.url().find("://") == std::string::npos
                            ? base_url + (art.url().empty() ? hex_of(art.sha256()) : art.url())
                            : art.url();
      auto s = stage_one(art, url, reason);
      if (s) s = files_.rename(staging_dir() + "/" + hex_of(art.sha256()), target,
                               art.kind() == v1::ARTIFACT_KIND_K3S_BINARY ? 0755 : 0644);
      if (!s) failed.push_back(target);
      restart = true;
    }
  }
  std::string list;
  for (const auto& p : drifted) list += (list.empty() ? "" : ", ") + p;
  logger->warn("drift: installed files differ from bundle={} version={}: {}", state_.bundle_name, state_.version,
               list);
  if (restart) {
    if (auto s = runtime_.restart(); !s) logger->error("restart after drift repair: {}", s.error().message);
  }
  std::string msg = "installed files differed from the applied bundle: " + list;
  msg += failed.empty() ? "; repaired" : "; could not repair " + std::to_string(failed.size()) + " of them";
  if (restart) msg += "; k3s restarted";
  last_node_ready_ = runtime_.health().node_ready;
  Attempt a{state_.generation, state_.campaign_id, state_.bundle_name, state_.version};
  report(v1::AGENT_STATE_IDLE, a, v1::REASON_DRIFT, msg, 100, true);
  return drifted;
}

}  // namespace flotilla::agent

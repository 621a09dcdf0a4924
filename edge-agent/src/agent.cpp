#include "flotilla/agent/agent.hpp"

#include <sys/sysinfo.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <set>
#include <thread>

#include "flotilla/common/crypto.hpp"
#include "flotilla/common/log.hpp"

namespace flotilla::agent {

namespace {
constexpr const char* kK3sConfigDir = "/etc/rancher/k3s/config.yaml.d/";
constexpr const char* kRegistries = "/etc/rancher/k3s/registries.yaml";
constexpr const char* kManifestDir = "/var/lib/rancher/k3s/server/manifests/";
}  // namespace

std::string Agent::path_for(const v1::BundleFile& f) {
  switch (f.kind()) {
    case v1::FILE_KIND_K3S_CONFIG: return kK3sConfigDir + f.name();
    case v1::FILE_KIND_REGISTRIES: return kRegistries;
    case v1::FILE_KIND_MANIFEST: return kManifestDir + f.name();
    default: return {};
  }
}

Agent::Agent(CoreConfig cfg, K3sRuntime& runtime, FileTree& files, StateStore& state, const Clock& clock,
             Reporter reporter)
    : cfg_(std::move(cfg)), runtime_(runtime), files_(files), store_(state), clock_(clock),
      reporter_(std::move(reporter)) {
  seq_ = static_cast<uint64_t>(clock_.now_unix_ms());
}

Status Agent::start() {
  auto s = store_.load();
  if (!s) return s.error().with_context("load agent state");
  state_ = std::move(*s);
  return {};
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
  if (auto fb = files_.free_bytes("/"); fb) inv.set_disk_free_bytes(*fb);
  struct sysinfo si {};
  if (::sysinfo(&si) == 0) inv.set_mem_free_bytes(static_cast<uint64_t>(si.freeram) * si.mem_unit);
  for (const auto& [k, v] : cfg_.labels) (*inv.mutable_labels())[k] = v;
  return inv;
}

void Agent::report(v1::AgentState st, const Attempt& a, v1::Reason reason, const std::string& message,
                   uint32_t progress, bool with_inventory) {
  v1::Report r;
  r.set_device_id(cfg_.device_id);
  // Strictly increasing even across restarts: the hub drops anything not newer.
  seq_ = std::max<uint64_t>(seq_ + 1, static_cast<uint64_t>(clock_.now_unix_ms()));
  r.set_seq(seq_);
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
  if (with_inventory) *r.mutable_inventory() = inventory();
  reporter_(std::move(r));
}

void Agent::report_inventory() {
  last_node_ready_ = runtime_.health().node_ready;
  Attempt a{state_.generation, state_.campaign_id, state_.bundle_name, state_.version};
  report(v1::AGENT_STATE_IDLE, a, v1::REASON_NONE, "", 100, true);
}

Status Agent::install(const v1::BundleManifest& m, Backup& backup, std::vector<PlacedFile>& placed) {
  std::set<std::string> new_paths;
  for (const auto& f : m.files()) new_paths.insert(path_for(f));
  // Back up everything this apply may touch: the new files' paths and the
  // files the previous bundle placed (which may be removed).
  std::set<std::string> touched = new_paths;
  for (const auto& pf : state_.files) touched.insert(pf.path);
  for (const auto& path : touched) {
    auto cur = files_.read(path);
    if (!cur) return cur.error();
    backup[path] = *cur;
  }
  for (const auto& f : m.files()) {
    const std::string path = path_for(f);
    // Permission bits only: a bundle never makes a setuid, setgid or sticky file.
    const unsigned mode = f.mode() ? (f.mode() & 0777) : 0644;
    if (auto s = files_.write_atomic(path, f.content(), mode); !s) return s;
    placed.push_back({path, to_hex(reinterpret_cast<const uint8_t*>(f.sha256().data()), f.sha256().size())});
  }
  // Manifests and drop-ins the previous bundle placed that this one does not
  // are removed (k3s would keep applying a stale manifest otherwise).
  for (const auto& pf : state_.files) {
    if (!new_paths.count(pf.path)) {
      if (auto s = files_.remove(pf.path); !s) return s;
    }
  }
  return {};
}

void Agent::restore(const Backup& backup) {
  for (const auto& [path, data] : backup) {
    Status s = data ? files_.write_atomic(path, data->content, data->mode) : files_.remove(path);
    if (!s) log::get("agent")->error("rollback: restore {} failed: {}", path, s.error().message);
  }
}

void Agent::handle_desired(const std::string& payload) {
  auto logger = log::get("agent");
  v1::DesiredState ds;
  if (payload.empty()) return;  // retained message cleared
  if (payload.size() > bundles::kMaxEnvelopeBytes + 4096 || !ds.ParseFromString(payload)) {
    logger->warn("ignored malformed desired state bytes={}", payload.size());
    // Not about any campaign: the message could not say which one it was.
    report(v1::AGENT_STATE_FAILED, Attempt{0, "", "", 0}, v1::REASON_MALFORMED_DESIRED,
           "desired-state message does not parse; ignored");
    return;
  }
  Attempt a{ds.generation(), ds.campaign_id(), "", 0};
  if (ds.device_id() != cfg_.device_id) {
    report(v1::AGENT_STATE_REFUSED, a, v1::REASON_WRONG_DEVICE, "desired state is for device " + ds.device_id());
    return;
  }
  if (ds.generation() != 0 && ds.generation() <= state_.generation) {
    logger->debug("desired generation={} already handled (at {})", ds.generation(), state_.generation);
    return;
  }
  const std::string digest = bundles::manifest_digest_hex(ds.bundle());
  if (!state_.manifest_sha256_hex.empty() && digest == state_.manifest_sha256_hex) {
    // Already running exactly this bundle: nothing to install.
    a.bundle_name = state_.bundle_name;
    a.bundle_version = state_.version;
    state_.generation = ds.generation();
    state_.campaign_id = ds.campaign_id();
    (void)store_.save(state_);
    report(v1::AGENT_STATE_APPLIED, a, v1::REASON_NONE, "", 100, true);
    return;
  }

  report(v1::AGENT_STATE_VERIFYING, a, v1::REASON_NONE, "", 5);
  bundles::VerifyPolicy policy;
  policy.clock = &clock_;
  policy.arch = cfg_.arch;
  policy.labels = cfg_.labels;
  policy.check_labels = true;
  policy.highest_applied = state_.highest_version;
  auto verdict = bundles::verify(ds.bundle(), cfg_.keyring, policy);
  if (verdict.manifest.version()) {
    a.bundle_name = verdict.manifest.name();
    a.bundle_version = verdict.manifest.version();
  }
  if (!verdict.ok()) {
    logger->warn("refused bundle generation={} reason={} {}", ds.generation(),
                 v1::Reason_Name(verdict.reason), verdict.message);
    // Nothing was written; the generation is not recorded so a corrected
    // desired state with a higher generation is still taken.
    report(v1::AGENT_STATE_REFUSED, a, verdict.reason, verdict.message);
    return;
  }
  const auto& m = verdict.manifest;

  uint64_t need = 0;
  for (const auto& f : m.files()) need += f.content().size();
  if (auto fb = files_.free_bytes("/"); fb && *fb < need + cfg_.min_free_bytes) {
    report(v1::AGENT_STATE_FAILED, a, v1::REASON_DISK_FULL,
           "need " + std::to_string(need + cfg_.min_free_bytes) + " bytes free, have " + std::to_string(*fb));
    return;
  }

  report(v1::AGENT_STATE_INSTALLING, a, v1::REASON_NONE, "", 30);
  Backup backup;
  std::vector<PlacedFile> placed;
  if (auto s = install(m, backup, placed); !s) {
    restore(backup);
    report(v1::AGENT_STATE_FAILED, a, v1::REASON_INSTALL_FAILED, s.error().message);
    return;
  }

  auto roll_back = [&](v1::Reason reason, const std::string& why) {
    logger->warn("rolling back bundle={} version={}: {}", m.name(), m.version(), why);
    report(v1::AGENT_STATE_ROLLING_BACK, a, reason, why, 80);
    restore(backup);
    if (auto s = runtime_.restart(); !s) logger->error("restart after rollback failed: {}", s.error().message);
    // The outcome for this generation is final: do not retry it on reconnect.
    state_.generation = ds.generation();
    state_.campaign_id = ds.campaign_id();
    (void)store_.save(state_);
    report(v1::AGENT_STATE_ROLLED_BACK, a, reason, why, 100, true);
  };

  report(v1::AGENT_STATE_RESTARTING, a, v1::REASON_NONE, "", 60);
  if (auto s = runtime_.restart(); !s) return roll_back(v1::REASON_RESTART_FAILED, s.error().message);

  report(v1::AGENT_STATE_HEALTH_CHECK, a, v1::REASON_NONE, "", 70);
  const auto deadline = std::chrono::steady_clock::now() + cfg_.health_timeout;
  K3sHealth h;
  for (;;) {
    h = runtime_.health();
    if (h.ok() || std::chrono::steady_clock::now() >= deadline) break;
    std::this_thread::sleep_for(cfg_.health_poll);
  }
  last_node_ready_ = h.node_ready;
  if (!h.ok()) {
    return roll_back(v1::REASON_HEALTH_GATE_FAILED,
                     "k3s not healthy within " + std::to_string(cfg_.health_timeout.count()) + "ms: " + h.detail);
  }

  state_.bundle_name = m.name();
  state_.channel = m.channel();
  state_.version = m.version();
  state_.manifest_sha256_hex = digest;
  state_.generation = ds.generation();
  state_.campaign_id = ds.campaign_id();
  state_.files = placed;
  auto& hv = state_.highest_version[m.channel()];
  hv = std::max(hv, m.version());
  if (auto s = store_.save(state_); !s) {
    logger->error("could not record the applied bundle: {}", s.error().message);
  }
  logger->info("applied bundle={} version={} generation={}", m.name(), m.version(), ds.generation());
  report(v1::AGENT_STATE_APPLIED, a, v1::REASON_NONE, "", 100, true);
}

}  // namespace flotilla::agent

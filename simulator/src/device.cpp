#include "device.hpp"

#include "flotilla/common/crypto.hpp"
#include "flotilla/common/log.hpp"

namespace flotilla::sim {

void add_bundle_file(v1::BundleManifest& m, v1::FileKind kind, const std::string& name, const std::string& content) {
  auto* f = m.add_files();
  f->set_kind(kind);
  f->set_name(name);
  f->set_content(content);
  f->set_mode(0644);
  auto h = crypto::sha256(content);
  f->set_sha256(std::string(h.begin(), h.end()));
}

uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

double unit(uint64_t seed, uint32_t index, uint32_t salt) {
  const uint64_t h = mix(mix(seed ^ (uint64_t{salt} << 32)) ^ index);
  return static_cast<double>(h >> 11) / static_cast<double>(uint64_t{1} << 53);
}

DeviceFaults assign_faults(uint64_t seed, uint32_t index, const FaultProfile& p) {
  DeviceFaults f;
  // One independent draw per fault, so changing one share leaves the
  // assignment of the others as it was.
  if (unit(seed, index, 1) < p.offline) f.bits |= kOffline;
  if (unit(seed, index, 2) < p.flaky) f.bits |= kFlaky;
  if (unit(seed, index, 3) < p.install_fail) f.bits |= kInstallFail;
  if (unit(seed, index, 4) < p.health_fail) f.bits |= kHealthFail;
  if (unit(seed, index, 5) < p.reboot_mid_apply) f.bits |= kRebootMidApply;
  if (p.clock_skew_s > 0) {
    const double u = unit(seed, index, 6) * 2.0 - 1.0;
    f.skew_s = static_cast<int32_t>(u * static_cast<double>(p.clock_skew_s));
  }
  return f;
}

bool CoreEnv::learn_director(const std::string& raw_public_key) {
  if (raw_public_key.size() != 32) return true;  // a hub that names none
  const Bytes key(raw_public_key.begin(), raw_public_key.end());
  std::lock_guard lock(director_mu_);
  if (director_ready_.load(std::memory_order_relaxed)) return director_->key == key;
  director_ = bundles::PublicKey{bundles::key_id_for(key), key};
  director_ready_.store(true, std::memory_order_release);
  return true;
}

bool with_agent(VDevice& d, const CoreEnv& env, agent::Agent::Reporter reporter,
                const std::function<void(agent::Agent&)>& f) {
  SimFileTree files(d.store.files, (d.faults & kInstallFail) != 0);
  SimStateStore state(d.store.state);
  SimK3sRuntime runtime((d.faults & kHealthFail) == 0);
  SkewedClock clock(d.skew_s);
  SimDownloader downloader(files, env.fetch);
  agent::CoreConfig cfg = env.base;
  cfg.device_id = d.id;
  // Every virtual device checks the director's signature like a real one.
  if (auto director = env.director()) cfg.director_key = std::move(director);
  // The simulated k3s answers at once: one poll decides the health gate.
  cfg.health_timeout = std::chrono::milliseconds(0);
  if ((d.faults & kRebootMidApply) && !d.rebooted) {
    cfg.step_hook = [](const std::string& step, const std::string& phase) {
      if (step == "install" && phase == "end") throw PowerCut{};
    };
  }
  agent::Agent a(std::move(cfg), runtime, files, state, clock, std::move(reporter), &downloader);
  if (auto s = a.start(); !s) {
    log::get("sim")->error("device={} start: {}", d.id, s.error().message);
    return true;
  }
  try {
    f(a);
  } catch (const PowerCut&) {
    return false;
  }
  // The transport took the final reports (QoS 1, queued in the client):
  // nothing is left for a re-send after a restart.
  if (!a.outbox().empty()) a.outbox_delivered(a.outbox().rbegin()->first);
  return true;
}

}  // namespace flotilla::sim

#pragma once
// One virtual device and the way the fleet runs the real agent core on it.
// Internal to flotilla_sim.
#include <atomic>
#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <string>

#include "flotilla/agent/agent.hpp"
#include "flotilla/sim/fleet.hpp"
#include "flotilla/sim/memory.hpp"

namespace flotilla::sim {

// What the timeline counts. Written by the worker that owns the device,
// read by the sampler.
enum class Phase : uint8_t { pending, online, offline, applying, applied, failed, rolled_back, rebooting, away };
inline constexpr const char* kPhaseNames[] = {"enrolling", "idle",        "offline",   "applying", "applied",
                                              "failed",    "rolled_back", "rebooting", "link_down"};
inline constexpr int kPhases = 9;

struct VDevice {
  std::string id;
  DeviceStorage store;
  uint32_t index = 0;
  uint32_t session = 0;          // gateway mode: index of its gateway
  int32_t skew_s = 0;
  uint8_t faults = 0;
  bool flaked = false;           // the flaky link already dropped once
  bool rebooted = false;         // the mid-apply power cut already happened
  bool download_waited = false;  // the bandwidth delay was already served
  std::atomic<uint8_t> phase{0};
  // When the final report for the campaign went out; read by a worker's
  // status thread while the device's thread writes it.
  std::atomic<int64_t> done_ms{0};
};

// Thrown from the step hook: the device loses power right after install.
struct PowerCut {};

struct CoreEnv {
  agent::CoreConfig base;          // keyring, arch, labels; device id set per device
  SimDownloader::Fetch fetch = nullptr;

  // The hub's director key, as enrollment answers name it (one per hub, so
  // the same for every device). Learned while other devices already run:
  // written once under a lock, read lock-free once published.
  // Returns false if a different key was learned before.
  bool learn_director(const std::string& raw_public_key);
  std::optional<bundles::PublicKey> director() const {
    if (!director_ready_.load(std::memory_order_acquire)) return std::nullopt;
    return director_;
  }

 private:
  std::mutex director_mu_;
  std::optional<bundles::PublicKey> director_;
  std::atomic<bool> director_ready_{false};
};

// Runs f(agent) on the real agent core over the device's storage. Returns
// false when the device lost power in the middle (PowerCut).
bool with_agent(VDevice& d, const CoreEnv& env, agent::Agent::Reporter reporter,
                const std::function<void(agent::Agent&)>& f);

// Adds a file (content, sha256, mode 0644) to a manifest the simulator builds.
void add_bundle_file(v1::BundleManifest& m, v1::FileKind kind, const std::string& name, const std::string& content);

// splitmix64: the seed's stream for one device and purpose.
uint64_t mix(uint64_t x);
double unit(uint64_t seed, uint32_t index, uint32_t salt);

}  // namespace flotilla::sim

#include "edge-agent/testing/fuzz_desired.hpp"

#include <map>

#include "edge-agent/testing/desired.hpp"
#include "edge-agent/testing/fakes.hpp"
#include "flotilla/agent/agent.hpp"
#include "flotilla/bundles/bundle.hpp"
#include "flotilla/common/clock.hpp"
#include "flotilla/common/crypto.hpp"

namespace flotilla::agent::fuzz {

namespace {

constexpr int64_t kFuzzNow = 1'800'000'000;
constexpr const char* kDevice = "d-fuzz";
constexpr uint8_t kPinDirector = 1, kApplied = 2;

bundles::KeyPair seed_key(uint8_t n) { return *bundles::key_from_seed(Bytes(32, n)); }
const bundles::KeyPair& release() {
  static const bundles::KeyPair k = seed_key(0xC1);
  return k;
}
const bundles::KeyPair& director() {
  static const bundles::KeyPair k = seed_key(0xD1);
  return k;
}

v1::BundleManifest manifest(uint64_t version, const std::string& channel = "stable") {
  v1::BundleManifest m;
  m.set_format_version(1);
  m.set_name("fuzz");
  m.set_channel(channel);
  m.set_version(version);
  m.set_created_unix(kFuzzNow);
  m.set_expires_unix(kFuzzNow + 86400);
  m.mutable_target()->add_arch("amd64");
  auto* f = m.add_files();
  f->set_kind(v1::FILE_KIND_MANIFEST);
  f->set_name("app.yaml");
  f->set_content("kind: ConfigMap # v" + std::to_string(version) + "\n");
  f->set_mode(0644);
  const auto h = crypto::sha256(f->content());
  f->set_sha256(std::string(h.begin(), h.end()));
  return m;
}

v1::SignedBundle signed_bundle(const v1::BundleManifest& m) {
  auto env = bundles::wrap(m);
  (void)bundles::sign(env, release());
  return env;
}

v1::DesiredState message(const v1::SignedBundle& b, uint64_t generation, bool rollback = false) {
  v1::DesiredState ds;
  ds.set_device_id(kDevice);
  ds.set_generation(generation);
  ds.set_campaign_id("c-fuzz");
  ds.set_issued_unix_ms(kFuzzNow * 1000);
  ds.set_artifact_base_url("http://hub.fuzz/v1/artifacts/");
  ds.set_rollback(rollback);
  *ds.mutable_bundle() = b;
  return ds;
}

std::string signed_message(const v1::SignedBundle& b, uint64_t generation, bool rollback = false) {
  auto ds = message(b, generation, rollback);
  testing::sign_header(ds, director());
  return ds.SerializeAsString();
}

// The state of a device that applied v4 and then v5 (at generation 10).
const AppliedState& applied_state() {
  static const AppliedState s = [] {
    testing::FakeK3sRuntime runtime;
    testing::MemFileTree files;
    testing::MemStateStore store;
    FakeClock clock(kFuzzNow);
    CoreConfig cfg;
    cfg.device_id = kDevice;
    cfg.arch = "amd64";
    cfg.keyring.add(release().pub);
    cfg.director_key = director().pub;
    cfg.health_timeout = std::chrono::milliseconds(0);
    cfg.min_free_bytes = 0;
    Agent a(cfg, runtime, files, store, clock, [](v1::Report&&) {});
    (void)a.start();
    a.handle_desired(signed_message(signed_bundle(manifest(4)), 9));
    a.handle_desired(signed_message(signed_bundle(manifest(5)), 10));
    AppliedState out = store.state;
    out.outbox.clear();
    return out;
  }();
  return s;
}

const std::map<std::string, testing::MemFileTree::Entry>& applied_files() {
  static const std::map<std::string, testing::MemFileTree::Entry> f = [] {
    std::map<std::string, testing::MemFileTree::Entry> out;
    out["/var/lib/rancher/k3s/server/manifests/app.yaml"] = {"kind: ConfigMap # v5\n", 0644};
    return out;
  }();
  return f;
}

}  // namespace

v1::Reason run_one(const uint8_t* data, size_t size) {
  if (size == 0) return v1::REASON_NONE;
  const uint8_t flags = data[0];
  const std::string payload(reinterpret_cast<const char*>(data) + 1, size - 1);

  testing::FakeK3sRuntime runtime;
  testing::MemFileTree files;
  testing::MemStateStore store;
  FakeClock clock(kFuzzNow);
  if (flags & kApplied) {
    store.state = applied_state();
    files.files = applied_files();
  }
  const AppliedState before = store.state;
  const auto tree_before = files.files;

  CoreConfig cfg;
  cfg.device_id = kDevice;
  cfg.arch = "amd64";
  cfg.keyring.add(release().pub);
  if (flags & kPinDirector) cfg.director_key = director().pub;
  cfg.health_timeout = std::chrono::milliseconds(0);
  cfg.health_poll = std::chrono::milliseconds(0);
  cfg.min_free_bytes = 0;
  cfg.max_artifact_bytes = 1 << 20;
  std::vector<v1::Report> reports;
  Agent agent(cfg, runtime, files, store, clock, [&](v1::Report&& r) { reports.push_back(std::move(r)); });
  if (!agent.start()) __builtin_trap();
  const int saves_at_start = store.saves;  // start() reserves report sequence numbers

  // The pure step first: it must agree with what handle_desired does next.
  DesiredContext ctx{kDevice, cfg.director_key ? &*cfg.director_key : nullptr, before.director_generation,
                     before.generation};
  const DesiredDecision d = decide_desired(payload, ctx);
  agent.handle_desired(payload);

  const AppliedState& now = agent.applied();
  const bool handled = d.action == DesiredDecision::Action::handle;
  if (!handled) {
    // Refused, malformed or ignored before anything else: nothing moved.
    if (files.files != tree_before || store.saves != saves_at_start || runtime.restarts != 0) __builtin_trap();
    if (d.action == DesiredDecision::Action::ignore && !reports.empty()) __builtin_trap();
  }
  // A floor only ever comes from a verified header, and never goes down.
  if (now.director_generation < before.director_generation) __builtin_trap();
  if (now.director_generation != before.director_generation && !(handled && d.signed_header)) __builtin_trap();
  for (const auto& [channel, v] : before.highest_version) {
    auto it = now.highest_version.find(channel);
    if (it == now.highest_version.end() || it->second < v) __builtin_trap();
  }
  // Nothing but bundle files (and the agent's own state) is ever written.
  for (const auto& [path, e] : files.files) {
    if (path.rfind("/var/lib/rancher/k3s/", 0) != 0 && path.rfind("/etc/rancher/k3s/", 0) != 0 &&
        path.rfind("/var/lib/flotilla/", 0) != 0 && path != cfg.k3s_bin) {
      __builtin_trap();
    }
    if ((e.mode & ~0755u) != 0 && path.rfind("/var/lib/flotilla/", 0) != 0) __builtin_trap();
  }
  if (reports.empty()) return v1::REASON_NONE;
  return reports.back().has_error() ? reports.back().error().reason() : v1::REASON_NONE;
}

std::vector<std::pair<std::string, std::string>> seed_inputs() {
  const auto v6 = signed_bundle(manifest(6));
  auto seed = [](uint8_t flags, const std::string& payload) { return std::string(1, char(flags)) + payload; };
  std::vector<std::pair<std::string, std::string>> out;
  out.emplace_back("signed-next", seed(kPinDirector | kApplied, signed_message(v6, 11)));
  out.emplace_back("signed-fresh-device", seed(kPinDirector, signed_message(v6, 1)));
  out.emplace_back("signed-replay", seed(kPinDirector | kApplied, signed_message(v6, 9)));
  out.emplace_back("signed-rollback-to-previous",
                   seed(kPinDirector | kApplied, signed_message(signed_bundle(manifest(4)), 11, true)));
  out.emplace_back("unsigned-on-pinned", seed(kPinDirector | kApplied, message(v6, 11).SerializeAsString()));
  {
    auto ds = message(v6, 11);
    *ds.mutable_header() = bundles::sign_desired_header(testing::header_of(ds), seed_key(0xEE));
    out.emplace_back("signed-by-stranger", seed(kPinDirector | kApplied, ds.SerializeAsString()));
  }
  {
    auto ds = message(v6, 11);
    testing::sign_header(ds, director());
    ds.set_generation(uint64_t{1} << 62);  // a freeze attempt outside the header
    out.emplace_back("generation-outside-header", seed(kPinDirector | kApplied, ds.SerializeAsString()));
  }
  {
    auto ds = message(v6, 11);
    testing::sign_header(ds, director());
    *ds.mutable_bundle() = signed_bundle(manifest(7));  // another valid bundle under the header
    out.emplace_back("bundle-swapped", seed(kPinDirector | kApplied, ds.SerializeAsString()));
  }
  out.emplace_back("legacy-next", seed(kApplied, message(v6, 11).SerializeAsString()));
  out.emplace_back("legacy-rollback", seed(kApplied, message(signed_bundle(manifest(4)), 11, true).SerializeAsString()));
  out.emplace_back("channel-hop", seed(kPinDirector | kApplied, signed_message(signed_bundle(manifest(1, "beta")), 11)));
  out.emplace_back("garbage", seed(kPinDirector, std::string("\x4a\xff\xff\xff\x0f garbage", 11)));
  return out;
}

}  // namespace flotilla::agent::fuzz

// bench/bundle_verify: time for a device to verify one bundle with 3
// signatures (threshold 3) and 50 files through the trust store, as the agent
// does for each desired state. Target: under 1 ms. Prints median, p99 and max.
//
//   build/bin/bundle_verify [ITERATIONS]   (default 2000)
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "flotilla/bundles/bundle.hpp"
#include "flotilla/bundles/overlay.hpp"
#include "flotilla/bundles/trust.hpp"
#include "flotilla/common/clock.hpp"
#include "flotilla/common/crypto.hpp"

namespace b = flotilla::bundles;
namespace v1 = flotilla::v1;

namespace {

constexpr int64_t kNow = 1'800'000'000;

b::KeyPair seed_key(uint8_t n) { return *b::key_from_seed(flotilla::Bytes(32, n)); }

v1::SignedKeyring keyring(b::KeyringRole role, uint32_t threshold, const std::vector<b::KeyPair>& keys,
                          const std::vector<b::KeyPair>& signers) {
  v1::KeyringManifest k;
  k.set_type(std::string(b::keyring_type(role)));
  k.set_version(1);
  k.set_created_unix(kNow);
  k.set_expires_unix(kNow + 365 * 86400);
  k.set_threshold(threshold);
  for (const auto& key : keys) *k.add_keys() = b::trusted_key(key.pub);
  auto r = b::wrap_keyring(k);
  for (const auto& s : signers) (void)b::sign_keyring(r, s);
  return r;
}

// 50 files of ~1 KiB each, like a real mix of drop-ins and manifests.
v1::BundleManifest manifest() {
  v1::BundleManifest m;
  m.set_format_version(1);
  m.set_name("bench");
  m.set_channel("stable");
  m.set_version(10);
  m.set_created_unix(kNow);
  m.set_expires_unix(kNow + 30 * 86400);
  m.mutable_target()->add_arch("amd64");
  for (int i = 0; i < 50; ++i) {
    auto* f = m.add_files();
    f->set_kind(i % 5 == 0 ? v1::FILE_KIND_K3S_CONFIG : v1::FILE_KIND_MANIFEST);
    f->set_name("file-" + std::to_string(i) + ".yaml");
    std::string content = "# file " + std::to_string(i) + "\n";
    while (content.size() < 1024) content += "key-" + std::to_string(content.size()) + ": value\n";
    f->set_content(content);
    f->set_mode(0644);
    auto h = flotilla::crypto::sha256(content);
    f->set_sha256(std::string(h.begin(), h.end()));
  }
  return m;
}

double percentile(std::vector<double> v, double p) {
  std::sort(v.begin(), v.end());
  const size_t i = std::min(v.size() - 1, static_cast<size_t>(p * static_cast<double>(v.size() - 1) + 0.5));
  return v[i];
}

}  // namespace

int main(int argc, char** argv) {
  const int iterations = argc > 1 ? std::max(10, std::atoi(argv[1])) : 2000;
  const auto r1 = seed_key(1), r2 = seed_key(2), r3 = seed_key(3);
  const auto s1 = seed_key(11), s2 = seed_key(12), s3 = seed_key(13);
  auto store = b::TrustStore::pin(keyring(b::KeyringRole::root, 2, {r1, r2, r3}, {r1, r2}));
  if (!store) return std::fprintf(stderr, "pin: %s\n", store.error().message.c_str()), 1;
  v1::Trust trust;
  *trust.mutable_signing() = keyring(b::KeyringRole::signing, 3, {s1, s2, s3}, {r1, r3});
  flotilla::FakeClock clock(kNow);
  if (auto v = store->update(trust, clock); !v.ok()) return std::fprintf(stderr, "update: %s\n", v.message.c_str()), 1;

  auto bundle = b::wrap(manifest());
  for (const auto& k : {s1, s2, s3}) (void)b::sign(bundle, k);
  // What the agent gets off the wire: the envelope bytes.
  const std::string wire = b::serialize_envelope(bundle);

  b::VerifyPolicy policy;
  policy.clock = &clock;
  policy.arch = "amd64";
  policy.highest_applied = {{"stable", 9}};

  std::vector<double> verify_us, full_us;
  verify_us.reserve(iterations);
  full_us.reserve(iterations);
  for (int i = 0; i < iterations + 50; ++i) {
    // (1) verify only: signatures, threshold, manifest parse and shape, file hashes, policy.
    auto t0 = std::chrono::steady_clock::now();
    auto v = store->verify(bundle, policy);
    auto t1 = std::chrono::steady_clock::now();
    // (2) what the agent does per desired state: parse the envelope, verify, resolve overlays.
    auto env = b::parse_envelope(wire);
    auto v2 = store->verify(*env, policy);
    auto resolved = b::resolve(v2.manifest, {{"site", "berlin"}});
    auto t2 = std::chrono::steady_clock::now();
    if (!v.ok() || !v2.ok() || resolved.files.size() != 50) {
      std::fprintf(stderr, "verification failed: %s\n", v.message.c_str());
      return 1;
    }
    if (i < 50) continue;  // warm-up
    verify_us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
    full_us.push_back(std::chrono::duration<double, std::micro>(t2 - t1).count());
  }
  std::printf("bundle_verify: 3 signatures (threshold 3), 50 files, manifest %zu bytes, %d iterations\n",
              bundle.manifest().size(), iterations);
  std::printf("  verify                     median %8.1f us   p99 %8.1f us   max %8.1f us\n",
              percentile(verify_us, 0.5), percentile(verify_us, 0.99), percentile(verify_us, 1.0));
  std::printf("  parse + verify + resolve   median %8.1f us   p99 %8.1f us   max %8.1f us\n",
              percentile(full_us, 0.5), percentile(full_us, 0.99), percentile(full_us, 1.0));
  std::printf("  target: < 1000 us  -> %s\n", percentile(full_us, 0.99) < 1000.0 ? "met (p99)" : "NOT met (p99)");
  return 0;
}

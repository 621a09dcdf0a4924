#include "flotilla/bundles/fuzz.hpp"

#include <cstring>

#include "flotilla/bundles/bundle.hpp"
#include "flotilla/bundles/diff.hpp"
#include "flotilla/bundles/overlay.hpp"
#include "flotilla/bundles/trust.hpp"
#include "flotilla/common/clock.hpp"
#include "flotilla/common/crypto.hpp"

namespace flotilla::bundles::fuzz {

namespace {

constexpr int64_t kFuzzNow = 1'800'000'000;
constexpr int64_t kDay = 86400;

KeyPair seed_key(uint8_t n) {
  auto k = key_from_seed(Bytes(32, n));
  return *k;  // a 32-byte seed always derives a key
}

v1::KeyringManifest keyring(KeyringRole role, uint64_t version, uint32_t threshold, const std::vector<KeyPair>& keys,
                            int64_t expires = kFuzzNow + 365 * kDay) {
  v1::KeyringManifest k;
  k.set_type(std::string(keyring_type(role)));
  k.set_version(version);
  k.set_created_unix(kFuzzNow - kDay);
  k.set_expires_unix(expires);
  k.set_threshold(threshold);
  for (const auto& key : keys) *k.add_keys() = trusted_key(key.pub);
  return k;
}

v1::SignedKeyring signed_with(const v1::KeyringManifest& k, const std::vector<KeyPair>& keys) {
  auto r = wrap_keyring(k);
  for (const auto& key : keys) (void)sign_keyring(r, key);
  return r;
}

const std::vector<KeyPair>& root_keys() {
  static const std::vector<KeyPair> keys = {seed_key(0xA1), seed_key(0xA2), seed_key(0xA3)};
  return keys;
}

const TrustStore& pinned() {
  static const TrustStore store = [] {
    const auto& r = root_keys();
    return *TrustStore::pin(signed_with(keyring(KeyringRole::root, 1, 2, r), {r[0], r[1]}));
  }();
  return store;
}

v1::BundleManifest fuzz_manifest() {
  v1::BundleManifest m;
  m.set_format_version(1);
  m.set_name("fuzz");
  m.set_channel("stable");
  m.set_version(3);
  m.set_created_unix(kFuzzNow);
  m.set_expires_unix(kFuzzNow + 7 * kDay);
  m.mutable_target()->add_arch("amd64");
  auto add_file = [](v1::BundleFile* f, v1::FileKind kind, const std::string& name, const std::string& content) {
    f->set_kind(kind);
    f->set_name(name);
    f->set_content(content);
    f->set_mode(0644);
    auto h = crypto::sha256(content);
    f->set_sha256(std::string(h.begin(), h.end()));
  };
  add_file(m.add_files(), v1::FILE_KIND_K3S_CONFIG, "10-base.yaml", "disable: [traefik]\n");
  add_file(m.add_files(), v1::FILE_KIND_MANIFEST, "app.yaml", "apiVersion: v1\nkind: ConfigMap\n");
  auto* a = m.add_artifacts();
  a->set_name("k3s");
  a->set_kind(v1::ARTIFACT_KIND_K3S_BINARY);
  auto h = crypto::sha256(std::string("k3s-binary"));
  a->set_sha256(std::string(h.begin(), h.end()));
  a->set_url(crypto::sha256_hex("k3s-binary"));
  a->set_size(10);
  auto* o = m.add_overlays();
  o->set_selector("site in (berlin,paris),!legacy");
  add_file(o->add_files(), v1::FILE_KIND_MANIFEST, "app.yaml", "apiVersion: v1\nkind: Secret\n");
  (*o->mutable_k3s_config())["node-label+"] = "[site=eu]";
  return m;
}

std::string frame(const v1::Trust& trust, const v1::SignedBundle& bundle) {
  const std::string t = trust.SerializeAsString();
  std::string out(4, '\0');
  const uint32_t n = static_cast<uint32_t>(t.size());
  for (int i = 0; i < 4; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + t + serialize_envelope(bundle);
}

}  // namespace

v1::Reason run_one(const uint8_t* data, size_t size) {
  std::string_view trust_bytes, envelope(reinterpret_cast<const char*>(data), size);
  if (size >= 4) {
    const uint32_t n = static_cast<uint32_t>(data[0]) | static_cast<uint32_t>(data[1]) << 8 |
                       static_cast<uint32_t>(data[2]) << 16 | static_cast<uint32_t>(data[3]) << 24;
    if (n <= size - 4) {
      trust_bytes = std::string_view(reinterpret_cast<const char*>(data) + 4, n);
      envelope = std::string_view(reinterpret_cast<const char*>(data) + 4 + n, size - 4 - n);
    }
  }
  FakeClock clock(kFuzzNow);
  TrustStore store = pinned();
  if (!trust_bytes.empty()) {
    if (trust_bytes.size() > kMaxTrustBytes) return v1::REASON_KEYRING_INVALID;
    v1::Trust trust;
    if (!trust.ParseFromArray(trust_bytes.data(), static_cast<int>(trust_bytes.size()))) return v1::REASON_KEYRING_INVALID;
    auto tv = store.update(trust, clock);
    if (!tv.ok()) return tv.reason;
    // What an agent persists must restore to the same trust.
    auto again = TrustStore::restore(store.serialize());
    if (!again || again->root_version() != store.root_version() || again->signing_version() != store.signing_version()) {
      __builtin_trap();
    }
  }
  auto bundle = parse_envelope(envelope);
  if (!bundle) return v1::REASON_MALFORMED_MANIFEST;
  VerifyPolicy policy;
  policy.clock = &clock;
  policy.arch = "amd64";
  policy.highest_applied = {{"stable", 2}};
  auto v = store.verify(*bundle, policy);
  if (!v.ok()) return v.reason;
  auto resolved = resolve(v.manifest, {{"site", "berlin"}});
  auto diff = diff_manifests(v.manifest, v.manifest);
  if (!diff.empty()) __builtin_trap();  // a manifest never differs from itself
  return resolved.files.empty() && v.manifest.files_size() > 0 ? v1::REASON_INTERNAL : v1::REASON_NONE;
}

std::vector<std::pair<std::string, std::string>> seed_inputs() {
  const auto& r = root_keys();
  const std::vector<KeyPair> r2 = {r[1], r[2], seed_key(0xA4)};  // v2 drops A1, adds A4
  const auto s1 = seed_key(0xB1), s2 = seed_key(0xB2), s3 = seed_key(0xB3);

  const auto root2 = signed_with(keyring(KeyringRole::root, 2, 2, r2), {r[0], r[1], r2[2]});
  auto signing_k = keyring(KeyringRole::signing, 1, 2, {s1, s2, s3});
  const auto signing = signed_with(signing_k, {r2[0], r2[1]});
  const auto bundle = [&] {
    auto b = wrap(fuzz_manifest());
    (void)sign(b, s1);
    (void)sign(b, s2);
    (void)sign(b, s3);
    return b;
  }();

  std::vector<std::pair<std::string, std::string>> seeds;
  v1::Trust chain;
  *chain.add_roots() = root2;
  *chain.mutable_signing() = signing;
  seeds.emplace_back("valid-rotation", frame(chain, bundle));

  v1::Trust no_rotation;
  *no_rotation.mutable_signing() = signed_with(signing_k, {r[0], r[2]});
  seeds.emplace_back("valid-root-v1", frame(no_rotation, bundle));

  auto revoked_k = signing_k;
  revoked_k.set_version(2);
  revoked_k.clear_keys();
  *revoked_k.add_keys() = trusted_key(s2.pub);
  *revoked_k.add_keys() = trusted_key(s3.pub, kFuzzNow - 1);
  revoked_k.add_revoked_key_ids(s1.pub.key_id);
  v1::Trust revoked;
  *revoked.add_roots() = root2;
  *revoked.mutable_signing() = signed_with(revoked_k, {r2[0], r2[2]});
  seeds.emplace_back("revoked-and-expired-key", frame(revoked, bundle));

  v1::Trust bad_rotation;
  *bad_rotation.add_roots() = signed_with(keyring(KeyringRole::root, 2, 2, r2), {r[0], r2[2], r2[1]});
  *bad_rotation.mutable_roots(0)->mutable_signatures(0)->mutable_signature() = std::string(64, 'x');
  seeds.emplace_back("rotation-bad-signature", frame(bad_rotation, bundle));

  seeds.emplace_back("unsigned-no-trust", frame(v1::Trust(), wrap(fuzz_manifest())));
  seeds.emplace_back("envelope-only", serialize_envelope(bundle));
  seeds.emplace_back("garbage", std::string("\x0a\xff\xff\xff\x0f garbage", 10));
  return seeds;
}

}  // namespace flotilla::bundles::fuzz

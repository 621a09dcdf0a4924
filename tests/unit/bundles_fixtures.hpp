#pragma once
// Shared fixtures for the bundles_*_test.cpp files: deterministic keys,
// keyrings and manifests at a fixed time, and a temporary directory.
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "flotilla/bundles/bundle.hpp"
#include "flotilla/bundles/keys.hpp"
#include "flotilla/bundles/trust.hpp"
#include "flotilla/common/clock.hpp"
#include "flotilla/common/crypto.hpp"

namespace bundles_fixtures {

namespace stdfs = std::filesystem;
namespace b = flotilla::bundles;
namespace v1 = flotilla::v1;

constexpr int64_t kNow = 1'800'000'000;  // 2027-01-15T08:00:00Z
constexpr int64_t kDay = 86400;

class TempDir {
 public:
  TempDir() {
    std::string pattern = (stdfs::temp_directory_path() / "flotilla-tuf-ut-XXXXXX").string();
    if (::mkdtemp(pattern.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
    path_ = pattern;
  }
  ~TempDir() {
    std::error_code ec;
    stdfs::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const stdfs::path& path() const { return path_; }

 private:
  stdfs::path path_;
};

inline void write_text(const stdfs::path& p, const std::string& text) {
  stdfs::create_directories(p.parent_path());
  std::ofstream out(p, std::ios::binary);
  out << text;
  if (!out) throw std::runtime_error("cannot write " + p.string());
}

inline b::KeyPair key(uint8_t n) {
  auto k = b::key_from_seed(flotilla::Bytes(32, n));
  if (!k.ok()) throw std::runtime_error("key_from_seed failed");
  return *k;
}

inline std::string sha(const std::string& s) {
  auto h = flotilla::crypto::sha256(s);
  return std::string(h.begin(), h.end());
}

inline v1::BundleFile file(v1::FileKind kind, const std::string& name, const std::string& content) {
  v1::BundleFile f;
  f.set_kind(kind);
  f.set_name(name);
  f.set_content(content);
  f.set_mode(0644);
  f.set_sha256(sha(content));
  return f;
}

inline v1::KeyringManifest keyring(b::KeyringRole role, uint64_t version, uint32_t threshold,
                                   const std::vector<b::KeyPair>& keys, int64_t expires = kNow + 365 * kDay) {
  v1::KeyringManifest k;
  k.set_type(std::string(b::keyring_type(role)));
  k.set_version(version);
  k.set_created_unix(kNow - kDay);
  k.set_expires_unix(expires);
  k.set_threshold(threshold);
  for (const auto& key : keys) *k.add_keys() = b::trusted_key(key.pub);
  return k;
}

inline v1::SignedKeyring signed_with(const v1::KeyringManifest& k, const std::vector<b::KeyPair>& keys) {
  auto r = b::wrap_keyring(k);
  for (const auto& key : keys) {
    if (!b::sign_keyring(r, key).ok()) throw std::runtime_error("sign_keyring failed");
  }
  return r;
}

// A valid manifest at kNow, for amd64, version `version` on channel stable.
inline v1::BundleManifest manifest(uint64_t version = 5) {
  v1::BundleManifest m;
  m.set_format_version(1);
  m.set_name("edge");
  m.set_channel("stable");
  m.set_version(version);
  m.set_created_unix(kNow);
  m.set_expires_unix(kNow + 7 * kDay);
  m.mutable_target()->add_arch("amd64");
  *m.add_files() = file(v1::FILE_KIND_K3S_CONFIG, "10-base.yaml", "disable: [traefik]\n");
  return m;
}

inline v1::SignedBundle signed_bundle(const v1::BundleManifest& m, const std::vector<b::KeyPair>& keys) {
  auto bundle = b::wrap(m);
  for (const auto& k : keys) {
    if (!b::sign(bundle, k).ok()) throw std::runtime_error("sign failed");
  }
  return bundle;
}

// The standard cast: root keys R1..R3 (2 of 3), signing keys S1..S3 (2 of 3).
struct Fleet {
  b::KeyPair r1 = key(0x11), r2 = key(0x12), r3 = key(0x13);
  b::KeyPair s1 = key(0x21), s2 = key(0x22), s3 = key(0x23);
  flotilla::FakeClock clock{kNow};
  v1::SignedKeyring root_v1 = signed_with(keyring(b::KeyringRole::root, 1, 2, {r1, r2, r3}), {r1, r2});
  v1::KeyringManifest signing_v1_body = keyring(b::KeyringRole::signing, 1, 2, {s1, s2, s3}, kNow + 90 * kDay);
  v1::SignedKeyring signing_v1 = signed_with(signing_v1_body, {r1, r3});

  b::TrustStore pinned() const {
    auto t = b::TrustStore::pin(root_v1);
    if (!t.ok()) throw std::runtime_error("pin failed: " + t.error().message);
    return *t;
  }
  // Pinned to root v1 with signing keyring v1 installed.
  b::TrustStore ready() const {
    auto t = pinned();
    v1::Trust trust;
    *trust.mutable_signing() = signing_v1;
    auto v = t.update(trust, clock);
    if (!v.ok()) throw std::runtime_error("update failed: " + v.message);
    return t;
  }
  b::VerifyPolicy policy() const {
    b::VerifyPolicy p;
    p.clock = &clock;
    p.arch = "amd64";
    return p;
  }
};

}  // namespace bundles_fixtures

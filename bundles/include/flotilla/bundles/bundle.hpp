#pragma once
// Building, signing, parsing and verifying bundles. The format is specified
// in docs/bundle-format.md; this is its reference implementation.
#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "flotilla/bundles/keys.hpp"
#include "flotilla/common/clock.hpp"
#include "flotilla/common/result.hpp"
#include "flotilla/v1/bundle.pb.h"
#include "flotilla/v1/report.pb.h"

namespace flotilla::bundles {

inline constexpr size_t kMaxManifestBytes = 4u << 20;   // 4 MiB: files travel inline
inline constexpr size_t kMaxEnvelopeBytes = kMaxManifestBytes + 64 * 1024;
inline constexpr size_t kMaxSignatures = 32;
inline constexpr size_t kMaxFiles = 1024;

// Reads <dir>/bundle.yaml and the files it names into a manifest.
Result<v1::BundleManifest> load_spec(const std::filesystem::path& dir, const Clock& clock);

// Deterministic serialization (map entries sorted): the same manifest always
// gives the same bytes. (A build records its creation time, so two builds differ.)
std::string serialize_manifest(const v1::BundleManifest& m);
std::string serialize_envelope(const v1::SignedBundle& b);

// An unsigned envelope around the serialized manifest.
v1::SignedBundle wrap(const v1::BundleManifest& m);
// Adds a signature over the exact manifest bytes. Refuses a second signature by the same key.
Status sign(v1::SignedBundle& bundle, const KeyPair& key);

Result<v1::SignedBundle> parse_envelope(std::string_view bytes);
Result<v1::SignedBundle> read_bundle_file(const std::filesystem::path& path);
Status write_bundle_file(const std::filesystem::path& path, const v1::SignedBundle& b);

// SHA-256 of the manifest bytes: the bundle's identity.
std::string manifest_digest_hex(const v1::SignedBundle& b);

// Trusted keys and how many distinct ones must have signed.
struct Keyring {
  std::map<std::string, PublicKey> keys;  // by key id
  unsigned threshold = 1;
  void add(const PublicKey& k) { keys[k.key_id] = k; }
};

struct VerifyPolicy {
  const Clock* clock = &SystemClock::instance();
  std::string arch;                                  // device arch; empty = do not check
  std::map<std::string, std::string> labels;         // device labels
  bool check_labels = false;
  std::map<std::string, uint64_t> highest_applied;   // per channel (anti-rollback)
  size_t max_manifest_bytes = kMaxManifestBytes;
};

struct Verdict {
  v1::Reason reason = v1::REASON_NONE;
  std::string message;
  v1::BundleManifest manifest;  // filled when the manifest parsed
  bool ok() const { return reason == v1::REASON_NONE; }
};

// Accept, or one specific reason. Checks in this order: size, signatures
// (unsigned, unknown key, bad signature, threshold counting distinct keys),
// manifest shape, expiry, arch, labels, version above the highest applied.
Verdict verify(const v1::SignedBundle& bundle, const Keyring& ring, const VerifyPolicy& policy);

// File kind names as written in bundle.yaml and shown by tools.
std::string file_kind_name(v1::FileKind k);
Result<v1::FileKind> parse_file_kind(const std::string& name);
// A plain file name: no '/', not '.', '..' or hidden, printable, <= 128 bytes.
bool valid_file_name(const std::string& name);

Result<int64_t> parse_rfc3339(const std::string& text);
std::string format_rfc3339(int64_t unix_seconds);

}  // namespace flotilla::bundles

#pragma once
// Building, signing, parsing and verifying bundles. The format is specified
// in docs/bundle-format.md; this is its reference implementation.
#include <cstdint>
#include <filesystem>
#include <map>
#include <set>
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
inline constexpr size_t kMaxFiles = 1024;           // base files plus every overlay's files
inline constexpr size_t kMaxArtifacts = 64;
inline constexpr size_t kMaxOverlays = 64;
inline constexpr uint64_t kMaxArtifactBytes = uint64_t{8} << 30;  // 8 GiB: airgap image tarballs are big
// The k3s config drop-in that carries the k3s_config keys of matching overlays
// (see resolve() in overlay.hpp). Reserved: no bundle file may use the name.
inline constexpr const char* kOverlayDropInName = "99-flotilla-overlays.yaml";
// The k3s config drop-in the agent itself writes (where k3s keeps its data,
// the node name, an agent node's server): Flotilla never edits config.yaml.
// Reserved too.
inline constexpr const char* kNodeDropInName = "00-flotilla-node.yaml";
// Bounds of a bundle's health gate (HealthGate).
inline constexpr uint32_t kMaxHealthTimeoutSeconds = 86400;
inline constexpr uint32_t kMaxHealthSettleSeconds = 3600;
inline constexpr int kMaxWorkloadChecks = 64;
// Device architectures a bundle may name (target.arch, artifact arch).
bool valid_arch(const std::string& arch);
// The workload kinds a health gate can wait for.
bool valid_workload_kind(const std::string& kind);

// Reads <dir>/bundle.yaml, the files it names and the artifacts it lists
// (hashed while streaming, never loaded whole) into a manifest.
Result<v1::BundleManifest> load_spec(const std::filesystem::path& dir, const Clock& clock);

// Where each artifact of the last load_spec() came from, so `bundle build`
// can place the bytes next to its output for `bundle push`.
struct ArtifactSource {
  std::string sha256_hex;
  std::filesystem::path path;
};
Result<v1::BundleManifest> load_spec(const std::filesystem::path& dir, const Clock& clock,
                                     std::vector<ArtifactSource>* sources);

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
  std::map<std::string, int64_t> expires;  // by key id; signatures at or after this time do not count
  std::set<std::string> revoked;           // key ids whose signatures are refused as REASON_KEY_REVOKED
  void add(const PublicKey& k) { keys[k.key_id] = k; }
};

struct VerifyPolicy {
  const Clock* clock = &SystemClock::instance();
  std::string arch;                                  // device arch; empty = do not check
  std::map<std::string, std::string> labels;         // device labels
  bool check_labels = false;
  std::map<std::string, uint64_t> highest_applied;   // per channel (anti-rollback)
  // The channel of the bundle the device runs now; empty = none yet. A bundle
  // of another channel must name it in switch_from_channels.
  std::string current_channel;
  size_t max_manifest_bytes = kMaxManifestBytes;
};

struct Verdict {
  v1::Reason reason = v1::REASON_NONE;
  std::string message;
  v1::BundleManifest manifest;  // filled when the manifest parsed
  bool ok() const { return reason == v1::REASON_NONE; }
};

// Accept, or one specific reason. Checks in this order: size, signatures
// (unsigned; then, when fewer distinct valid keys than the threshold: bad
// signature by a trusted key, revoked key, expired key, unknown key, threshold
// not met), manifest shape (files, artifacts, overlays; a version above
// 2^63-1), file modes, expiry, arch, labels, channel switch, version above the
// highest applied. The rollback check is deliberately last:
// a caller that allows a campaign rollback to an exact earlier manifest can
// accept REASON_ROLLBACK_VERSION knowing everything else passed.
Verdict verify(const v1::SignedBundle& bundle, const Keyring& ring, const VerifyPolicy& policy);

// Empty when the manifest's files, artifacts and overlays are well formed;
// otherwise what is wrong (verify() refuses with REASON_MALFORMED_MANIFEST).
std::string check_manifest_shape(const v1::BundleManifest& m);
// Empty when a health gate is within its bounds and names only workloads the
// agent can check (kind, Kubernetes object names); otherwise what is wrong.
std::string check_health_gate(const v1::HealthGate& g);

// File modes a bundle may ask for: permission bits within 0755 (0 means
// 0644). No group- or world-writable file (k3s applies whatever lands in its
// manifests directory, as cluster admin), no setuid, setgid or sticky bit.
inline constexpr unsigned kAllowedFileModeBits = 0755;
bool safe_file_mode(uint32_t mode);
// Empty when every file (base and overlays) has a safe mode; otherwise the
// first offender (verify() refuses with REASON_UNSAFE_FILE_MODE).
std::string check_file_modes(const v1::BundleManifest& m);

// File kind names as written in bundle.yaml and shown by tools.
std::string file_kind_name(v1::FileKind k);
Result<v1::FileKind> parse_file_kind(const std::string& name);
std::string artifact_kind_name(v1::ArtifactKind k);
Result<v1::ArtifactKind> parse_artifact_kind(const std::string& name);
// A k3s config key an overlay may set: letters, digits, '-', '_', '.', and a
// trailing '+' (k3s's "append" form), at most 128 bytes.
bool valid_k3s_config_key(const std::string& key);
// A plain file name: no '/', not '.', '..' or hidden, printable, <= 128 bytes.
bool valid_file_name(const std::string& name);

Result<int64_t> parse_rfc3339(const std::string& text);
std::string format_rfc3339(int64_t unix_seconds);

}  // namespace flotilla::bundles

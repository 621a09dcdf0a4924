#pragma once
// Root and signing keyrings and the device's trust store: TUF's root role,
// cut down to what a bundle needs (docs/adr/0006-trust-model.md).
//
//   root keyring v1 (pinned in the image) ─signs─▶ root v2 ─signs─▶ root v3 …
//   current root ─signs─▶ signing keyring ─its keys sign─▶ bundles
//
// The byte layout and every rule here are specified in docs/bundle-format.md
// ("Keyrings"), so another implementation can check the same chain.
#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "flotilla/bundles/bundle.hpp"
#include "flotilla/bundles/keys.hpp"
#include "flotilla/common/clock.hpp"
#include "flotilla/common/result.hpp"
#include "flotilla/v1/bundle.pb.h"
#include "flotilla/v1/report.pb.h"

namespace flotilla::bundles {

inline constexpr std::string_view kRootKeyringType = "flotilla-root-keyring";
inline constexpr std::string_view kSigningKeyringType = "flotilla-signing-keyring";
inline constexpr size_t kMaxKeyringBytes = 64 * 1024;
inline constexpr size_t kMaxKeyringKeys = 64;
inline constexpr size_t kMaxRootChain = 64;     // root versions one Trust message may carry
inline constexpr size_t kMaxTrustBytes = (kMaxRootChain + 1) * (kMaxKeyringBytes + 4096);
// A DesiredState carrying a bundle envelope and a Trust at their caps, plus
// room for its small fields: the bound an agent should put on the payload.
inline constexpr size_t kMaxDesiredStateBytes = kMaxEnvelopeBytes + kMaxTrustBytes + 4096;

enum class KeyringRole { root, signing };
std::string_view keyring_type(KeyringRole role);

// Building keyrings (the CLI's `flotilla key …`). A new keyring is unsigned;
// sign_keyring adds one signature over the exact keyring bytes.
v1::SignedKeyring wrap_keyring(const v1::KeyringManifest& k);
std::string serialize_keyring(const v1::KeyringManifest& k);      // deterministic
Status sign_keyring(v1::SignedKeyring& ring, const KeyPair& key);  // refuses a second signature by one key
v1::TrustedKey trusted_key(const PublicKey& pub, int64_t expires_unix = 0, const std::string& name = "");

Result<v1::SignedKeyring> parse_signed_keyring(std::string_view bytes);
Result<v1::SignedKeyring> read_keyring_file(const std::filesystem::path& path);
Status write_keyring_file(const std::filesystem::path& path, const v1::SignedKeyring& k);
std::string keyring_digest_hex(const v1::SignedKeyring& k);  // SHA-256 of the keyring bytes

// The outcome of a trust operation: accept, or exactly one reason.
struct TrustVerdict {
  v1::Reason reason = v1::REASON_NONE;
  std::string message;
  bool ok() const { return reason == v1::REASON_NONE; }
};

// Checks a keyring's own shape (type, version, expiry set, threshold within
// 1..keys, key ids derived from their keys, no duplicates, caps) and parses it.
// Does not check signatures or time. Refusal: REASON_KEYRING_INVALID.
Result<v1::KeyringManifest> parse_keyring_manifest(const v1::SignedKeyring& ring, KeyringRole role);

// Counts distinct keys of `signers` (whose own per-key expiry is honoured at
// `now`) with a valid signature over ring.keyring(); true if >= threshold.
// `why` says what fell short.
bool keyring_signed_by(const v1::SignedKeyring& ring, const v1::KeyringManifest& signers, int64_t now, std::string* why);

// The keys of a signing keyring as the verifier uses them (per-key expiry,
// revocations and threshold carried over).
Keyring signing_keyring_of(const v1::KeyringManifest& signing);

// The device's trust: its current root and signing keyring. Start from the
// root pinned in the image (pin), or from what was persisted (restore); move
// forward with update(); verify bundles with verify().
//
// update() is all-or-nothing: when it refuses, the store is unchanged.
class TrustStore {
 public:
  // The root shipped with the device. It must be a well-formed root keyring
  // signed by its own threshold (protects against a damaged image); it may be
  // expired, since a chain of newer roots can follow it.
  static Result<TrustStore> pin(const v1::SignedKeyring& root);
  // What serialize() wrote. Re-checks everything except time, so a damaged
  // or edited state file is an error rather than silent trust.
  static Result<TrustStore> restore(std::string_view state_bytes);
  // A serialized v1::TrustState: persist it (write_file_atomic) after every
  // successful update() and load it with restore() at start.
  std::string serialize() const;

  // Follows trust.roots (ascending; versions at or below the current one are
  // history and skipped if consistent) and installs trust.signing. Refusals:
  //   REASON_KEYRING_INVALID   malformed keyring, gap in the chain, a root not
  //                            signed by the previous root's threshold and its
  //                            own, a signing keyring not signed by the root's
  //                            threshold, two different keyrings with one version
  //   REASON_KEYRING_ROLLBACK  the chain ends below the trusted root version,
  //                            or the signing keyring is older than the trusted one
  //   REASON_KEYRING_EXPIRED   the newest root or the signing keyring has expired
  TrustVerdict update(const v1::Trust& trust, const Clock& clock);

  // The whole agent check of a bundle under the current trust: refuses with
  // REASON_KEYRING_EXPIRED when the root or signing keyring has expired,
  // REASON_KEYRING_INVALID when no signing keyring is installed yet, and
  // otherwise exactly as bundles::verify() with this store's signing keys
  // (revoked → REASON_KEY_REVOKED, expired key → REASON_KEY_EXPIRED, …).
  // policy.clock is the time used for every expiry.
  Verdict verify(const v1::SignedBundle& bundle, const VerifyPolicy& policy) const;

  uint64_t root_version() const { return root_.version(); }
  uint64_t signing_version() const { return has_signing_ ? signing_.version() : 0; }
  bool has_signing() const { return has_signing_; }
  const v1::KeyringManifest& root() const { return root_; }
  const v1::KeyringManifest& signing() const { return signing_; }
  const v1::SignedKeyring& signed_root() const { return state_.root(); }
  const v1::SignedKeyring& signed_signing() const { return state_.signing(); }

 private:
  v1::TrustState state_;
  v1::KeyringManifest root_;
  v1::KeyringManifest signing_;
  bool has_signing_ = false;
};

}  // namespace flotilla::bundles

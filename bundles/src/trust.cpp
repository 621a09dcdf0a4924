#include "flotilla/bundles/trust.hpp"

#include <google/protobuf/io/coded_stream.h>
#include <google/protobuf/io/zero_copy_stream_impl_lite.h>

#include "flotilla/common/crypto.hpp"
#include "flotilla/common/fs.hpp"

namespace flotilla::bundles {

namespace {

TrustVerdict refuse(v1::Reason r, std::string msg) { return TrustVerdict{r, std::move(msg)}; }

Error invalid(const std::string& msg) { return make_error(Errc::invalid_argument, msg); }

std::string role_name(KeyringRole role) { return role == KeyringRole::root ? "root keyring" : "signing keyring"; }

}  // namespace

std::string_view keyring_type(KeyringRole role) {
  return role == KeyringRole::root ? kRootKeyringType : kSigningKeyringType;
}

std::string serialize_keyring(const v1::KeyringManifest& k) {
  std::string out;
  {
    google::protobuf::io::StringOutputStream sos(&out);
    google::protobuf::io::CodedOutputStream cos(&sos);
    cos.SetSerializationDeterministic(true);
    k.SerializeToCodedStream(&cos);
  }
  return out;
}

v1::SignedKeyring wrap_keyring(const v1::KeyringManifest& k) {
  v1::SignedKeyring r;
  r.set_keyring(serialize_keyring(k));
  return r;
}

Status sign_keyring(v1::SignedKeyring& ring, const KeyPair& key) {
  for (const auto& s : ring.signatures()) {
    if (s.key_id() == key.pub.key_id) {
      return make_error(Errc::already_exists, "keyring is already signed by key " + key.pub.key_id);
    }
  }
  if (ring.signatures_size() >= static_cast<int>(kMaxSignatures)) {
    return make_error(Errc::too_large, "keyring already carries the maximum of " + std::to_string(kMaxSignatures) +
                                           " signatures");
  }
  auto* s = ring.add_signatures();
  s->set_key_id(key.pub.key_id);
  auto sig = sign_detached(key, ring.keyring());
  s->set_signature(std::string(sig.begin(), sig.end()));
  return {};
}

v1::TrustedKey trusted_key(const PublicKey& pub, int64_t expires_unix, const std::string& name) {
  v1::TrustedKey k;
  k.set_key_id(pub.key_id);
  k.set_public_key(std::string(pub.key.begin(), pub.key.end()));
  k.set_expires_unix(expires_unix);
  k.set_name(name);
  return k;
}

Result<v1::SignedKeyring> parse_signed_keyring(std::string_view bytes) {
  if (bytes.size() > kMaxKeyringBytes + 4096) {
    return make_error(Errc::too_large, "keyring is " + std::to_string(bytes.size()) + " bytes, above the cap of " +
                                           std::to_string(kMaxKeyringBytes + 4096));
  }
  v1::SignedKeyring k;
  if (!k.ParseFromArray(bytes.data(), static_cast<int>(bytes.size()))) {
    return make_error(Errc::parse, "not a Flotilla keyring (protobuf SignedKeyring did not parse)");
  }
  return k;
}

Result<v1::SignedKeyring> read_keyring_file(const std::filesystem::path& path) {
  auto bytes = fs::read_file(path, kMaxKeyringBytes + 4096);
  if (!bytes) return bytes.error();
  auto k = parse_signed_keyring(*bytes);
  if (!k) return k.error().with_context(path.string());
  return k;
}

Status write_keyring_file(const std::filesystem::path& path, const v1::SignedKeyring& k) {
  std::string out;
  {
    google::protobuf::io::StringOutputStream sos(&out);
    google::protobuf::io::CodedOutputStream cos(&sos);
    cos.SetSerializationDeterministic(true);
    k.SerializeToCodedStream(&cos);
  }
  return fs::write_file_atomic(path, out, 0644);
}

std::string keyring_digest_hex(const v1::SignedKeyring& k) { return crypto::sha256_hex(k.keyring()); }

Result<v1::KeyringManifest> parse_keyring_manifest(const v1::SignedKeyring& ring, KeyringRole role) {
  const std::string what = role_name(role);
  if (ring.keyring().size() > kMaxKeyringBytes) return invalid(what + " is above the " + std::to_string(kMaxKeyringBytes) + "-byte cap");
  if (ring.signatures_size() > static_cast<int>(kMaxSignatures)) return invalid(what + " carries too many signatures");
  v1::KeyringManifest k;
  if (!k.ParseFromString(ring.keyring())) return invalid(what + " does not parse");
  if (k.type() != keyring_type(role)) {
    return invalid("expected a " + what + " (type " + std::string(keyring_type(role)) + "), got type '" +
                   k.type().substr(0, 64) + "'");
  }
  const std::string v = what + " v" + std::to_string(k.version());
  if (k.version() == 0) return invalid(what + " has no version");
  if (k.expires_unix() == 0) return invalid(v + " has no expiry; keyrings must expire");
  if (k.keys_size() == 0) return invalid(v + " lists no keys");
  if (k.keys_size() > static_cast<int>(kMaxKeyringKeys)) return invalid(v + " lists too many keys");
  if (k.threshold() == 0) return invalid(v + " has threshold 0");
  if (k.threshold() > static_cast<uint32_t>(k.keys_size())) {
    // Unsatisfiable: a device would refuse every bundle from now on.
    return invalid(v + " needs " + std::to_string(k.threshold()) + " signatures but lists only " +
                   std::to_string(k.keys_size()) + " keys");
  }
  std::set<std::string> ids;
  for (const auto& key : k.keys()) {
    if (key.public_key().size() != 32) return invalid(v + ": key " + key.key_id().substr(0, 64) + " is not 32 bytes");
    const Bytes raw(key.public_key().begin(), key.public_key().end());
    if (key_id_for(raw) != key.key_id()) {
      // Key ids are derived, never chosen: a mismatch is an edited keyring.
      return invalid(v + ": key id " + key.key_id().substr(0, 64) + " does not match its public key");
    }
    if (!ids.insert(key.key_id()).second) return invalid(v + ": key " + key.key_id() + " is listed twice");
  }
  for (const auto& id : k.revoked_key_ids()) {
    if (ids.count(id)) return invalid(v + ": key " + id + " is both trusted and revoked");
  }
  return k;
}

bool keyring_signed_by(const v1::SignedKeyring& ring, const v1::KeyringManifest& signers, int64_t now,
                       std::string* why) {
  std::map<std::string, const v1::TrustedKey*> by_id;
  for (const auto& k : signers.keys()) by_id[k.key_id()] = &k;
  std::set<std::string> valid;
  std::string bad, expired;
  for (const auto& s : ring.signatures()) {
    auto it = by_id.find(s.key_id());
    if (it == by_id.end()) continue;
    if (it->second->expires_unix() != 0 && it->second->expires_unix() <= now) {
      if (expired.empty()) expired = s.key_id();
      continue;
    }
    const Bytes pub(it->second->public_key().begin(), it->second->public_key().end());
    const Bytes sig(s.signature().begin(), s.signature().end());
    if (!verify_detached(pub, ring.keyring(), sig)) {
      if (bad.empty()) bad = s.key_id();
      continue;
    }
    valid.insert(s.key_id());  // one key counts once
  }
  if (valid.size() >= signers.threshold() && signers.threshold() > 0) return true;
  if (why) {
    *why = std::to_string(valid.size()) + " valid signature(s) by its keys, " + std::to_string(signers.threshold()) +
           " required";
    if (!bad.empty()) *why += "; signature by " + bad + " does not verify";
    if (!expired.empty()) *why += "; key " + expired + " has expired";
  }
  return false;
}

Keyring signing_keyring_of(const v1::KeyringManifest& signing) {
  Keyring ring;
  ring.threshold = signing.threshold();
  for (const auto& k : signing.keys()) {
    ring.add(PublicKey{k.key_id(), Bytes(k.public_key().begin(), k.public_key().end())});
    if (k.expires_unix() != 0) ring.expires[k.key_id()] = k.expires_unix();
  }
  for (const auto& id : signing.revoked_key_ids()) ring.revoked.insert(id);
  return ring;
}

Result<TrustStore> TrustStore::pin(const v1::SignedKeyring& root) {
  auto k = parse_keyring_manifest(root, KeyringRole::root);
  if (!k) return k.error().with_context("pinned root");
  std::string why;
  // Per-key expiry is not applied here (now = 0): the pin is taken on faith
  // from the image, and may be older than its keys.
  if (!keyring_signed_by(root, *k, 0, &why)) {
    return make_error(Errc::crypto, "pinned root v" + std::to_string(k->version()) +
                                        " is not signed by its own threshold: " + why);
  }
  TrustStore t;
  *t.state_.mutable_root() = root;
  t.root_ = std::move(*k);
  return t;
}

Result<TrustStore> TrustStore::restore(std::string_view state_bytes) {
  if (state_bytes.size() > 2 * (kMaxKeyringBytes + 4096)) return make_error(Errc::too_large, "trust state is too large");
  v1::TrustState st;
  if (!st.ParseFromArray(state_bytes.data(), static_cast<int>(state_bytes.size()))) {
    return make_error(Errc::parse, "trust state does not parse");
  }
  auto t = pin(st.root());
  if (!t) return t.error().with_context("trust state");
  if (st.has_signing()) {
    auto s = parse_keyring_manifest(st.signing(), KeyringRole::signing);
    if (!s) return s.error().with_context("trust state");
    std::string why;
    if (!keyring_signed_by(st.signing(), t->root_, 0, &why)) {
      return make_error(Errc::crypto, "trust state: signing keyring is not signed by the root: " + why);
    }
    *t->state_.mutable_signing() = st.signing();
    t->signing_ = std::move(*s);
    t->has_signing_ = true;
  }
  return t;
}

std::string TrustStore::serialize() const {
  std::string out;
  {
    google::protobuf::io::StringOutputStream sos(&out);
    google::protobuf::io::CodedOutputStream cos(&sos);
    cos.SetSerializationDeterministic(true);
    state_.SerializeToCodedStream(&cos);
  }
  return out;
}

TrustVerdict TrustStore::update(const v1::Trust& trust, const Clock& clock) {
  const int64_t now = clock.now_unix();
  if (trust.roots_size() > static_cast<int>(kMaxRootChain)) {
    return refuse(v1::REASON_KEYRING_INVALID, "root chain is longer than " + std::to_string(kMaxRootChain));
  }
  // Work on copies: the store changes only if everything checks out.
  v1::SignedKeyring root_signed = state_.root();
  v1::KeyringManifest root = root_;
  uint64_t last_offered = 0;
  for (int i = 0; i < trust.roots_size(); ++i) {
    const auto& next_signed = trust.roots(i);
    auto next = parse_keyring_manifest(next_signed, KeyringRole::root);
    if (!next) return refuse(v1::REASON_KEYRING_INVALID, "root chain entry " + std::to_string(i) + ": " + next.error().message);
    if (next->version() <= last_offered) {
      return refuse(v1::REASON_KEYRING_INVALID, "root chain is not in ascending version order");
    }
    last_offered = next->version();
    if (next->version() < root.version()) continue;  // history the device has already moved past
    if (next->version() == root.version()) {
      // Two different keyrings claiming one version means a signer forked
      // the chain: trust neither blindly.
      if (next_signed.keyring() != root_signed.keyring()) {
        return refuse(v1::REASON_KEYRING_INVALID, "offered root v" + std::to_string(next->version()) +
                                                      " differs from the trusted root of the same version");
      }
      continue;
    }
    const std::string v = "root v" + std::to_string(next->version());
    if (next->version() != root.version() + 1) {
      return refuse(v1::REASON_KEYRING_INVALID, v + " does not follow the trusted root v" +
                                                    std::to_string(root.version()) + " (gap in the chain)");
    }
    std::string why;
    // TUF root rotation: the old root vouches for the new one, and the new
    // keys prove they are held. Expiry of intermediate roots and of their keys
    // is not checked, so a device offline for a year can still catch up.
    if (!keyring_signed_by(next_signed, root, 0, &why)) {
      return refuse(v1::REASON_KEYRING_INVALID, v + " is not signed by the threshold of root v" +
                                                    std::to_string(root.version()) + ": " + why);
    }
    if (!keyring_signed_by(next_signed, *next, 0, &why)) {
      return refuse(v1::REASON_KEYRING_INVALID, v + " is not signed by its own threshold: " + why);
    }
    root_signed = next_signed;
    root = std::move(*next);
  }
  if (last_offered != 0 && last_offered < root_.version()) {
    return refuse(v1::REASON_KEYRING_ROLLBACK, "offered root chain ends at v" + std::to_string(last_offered) +
                                                   " but this device already trusts root v" +
                                                   std::to_string(root_.version()));
  }
  if (root.expires_unix() <= now) {
    return refuse(v1::REASON_KEYRING_EXPIRED, "root v" + std::to_string(root.version()) + " expired at " +
                                                  format_rfc3339(root.expires_unix()));
  }

  v1::SignedKeyring signing_signed = state_.signing();
  v1::KeyringManifest signing = signing_;
  bool have_signing = has_signing_;
  if (trust.has_signing()) {
    auto s = parse_keyring_manifest(trust.signing(), KeyringRole::signing);
    if (!s) return refuse(v1::REASON_KEYRING_INVALID, s.error().message);
    if (have_signing && s->version() < signing.version()) {
      return refuse(v1::REASON_KEYRING_ROLLBACK, "signing keyring v" + std::to_string(s->version()) +
                                                     " is older than the trusted v" + std::to_string(signing.version()));
    }
    if (have_signing && s->version() == signing.version() && trust.signing().keyring() != signing_signed.keyring()) {
      return refuse(v1::REASON_KEYRING_INVALID, "signing keyring v" + std::to_string(s->version()) +
                                                    " differs from the trusted one of the same version");
    }
    signing_signed = trust.signing();
    signing = std::move(*s);
    have_signing = true;
  }
  if (have_signing) {
    std::string why;
    // Checked against the (possibly new) root even when the signing keyring
    // did not change: a rotation that drops a compromised root key must also
    // stop trusting what that key signed.
    if (!keyring_signed_by(signing_signed, root, now, &why)) {
      return refuse(v1::REASON_KEYRING_INVALID, "signing keyring v" + std::to_string(signing.version()) +
                                                    " is not signed by the threshold of root v" +
                                                    std::to_string(root.version()) + ": " + why);
    }
    if (signing.expires_unix() <= now) {
      return refuse(v1::REASON_KEYRING_EXPIRED, "signing keyring v" + std::to_string(signing.version()) +
                                                    " expired at " + format_rfc3339(signing.expires_unix()));
    }
  }
  *state_.mutable_root() = std::move(root_signed);
  root_ = std::move(root);
  if (have_signing) {
    *state_.mutable_signing() = std::move(signing_signed);
    signing_ = std::move(signing);
    has_signing_ = true;
  }
  return {};
}

Verdict TrustStore::verify(const v1::SignedBundle& bundle, const VerifyPolicy& policy) const {
  const int64_t now = policy.clock->now_unix();
  Verdict v;
  if (root_.expires_unix() <= now) {
    v.reason = v1::REASON_KEYRING_EXPIRED;
    v.message = "trusted root v" + std::to_string(root_.version()) + " expired at " + format_rfc3339(root_.expires_unix()) +
                "; a newer root is needed";
    return v;
  }
  if (!has_signing_) {
    v.reason = v1::REASON_KEYRING_INVALID;
    v.message = "no signing keyring is trusted yet";
    return v;
  }
  if (signing_.expires_unix() <= now) {
    v.reason = v1::REASON_KEYRING_EXPIRED;
    v.message = "signing keyring v" + std::to_string(signing_.version()) + " expired at " +
                format_rfc3339(signing_.expires_unix());
    return v;
  }
  return bundles::verify(bundle, signing_keyring_of(signing_), policy);
}

}  // namespace flotilla::bundles

#pragma once
// Ed25519 signing keys (RFC 8032, via libsodium) and their files.
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "flotilla/common/encoding.hpp"
#include "flotilla/common/result.hpp"

namespace flotilla::bundles {

struct PublicKey {
  std::string key_id;  // hex(SHA-256(public key))[0:32]
  Bytes key;           // 32 bytes
};

struct KeyPair {
  PublicKey pub;
  Bytes secret;        // 64 bytes (libsodium's seed||public layout)
};

std::string key_id_for(const Bytes& public_key);
KeyPair generate_key();
// Deterministic key from a 32-byte seed (tests, reproducible fixtures).
Result<KeyPair> key_from_seed(const Bytes& seed);

// Text forms. A public key is "ed25519:<base64>", the form pinned in agent
// configs. Key files are small YAML documents (docs/bundle-format.md).
std::string public_key_text(const PublicKey& k);
Result<PublicKey> parse_public_key_text(const std::string& text);

// How hard a passphrase is stretched (libsodium crypto_pwhash, Argon2id 1.3).
// The limits are stored in the key file, so changing the defaults never
// locks out existing keys.
struct PassphraseCost {
  unsigned long long opslimit = 3;            // crypto_pwhash_OPSLIMIT_MODERATE
  size_t memlimit = 256u << 20;               // crypto_pwhash_MEMLIMIT_MODERATE (256 MiB)
};

// Private key files are created 0600 and refused if group/other can read them.
// With a passphrase the secret is sealed with crypto_secretbox under a key
// derived by Argon2id (docs/bundle-format.md, "Keys").
Status write_private_key(const std::filesystem::path& path, const KeyPair& key);
Status write_private_key(const std::filesystem::path& path, const KeyPair& key, const std::string& passphrase,
                         PassphraseCost cost = {});
Status write_public_key(const std::filesystem::path& path, const PublicKey& key);
// An encrypted key file needs the passphrase; without one the error says so
// (Errc::unauthenticated) and a wrong one fails the same way.
Result<KeyPair> read_private_key(const std::filesystem::path& path,
                                 const std::optional<std::string>& passphrase = std::nullopt);
// True when the file is a passphrase-protected private key.
bool is_encrypted_private_key(const std::filesystem::path& path);
// Accepts a public key file, a private key file (its public half) or "ed25519:<b64>".
Result<PublicKey> read_public_key(const std::string& path_or_text);

// What a device signs when it enrolls: binds its key to the token it used.
std::string enroll_proof_message(const std::string& enrollment_token, const Bytes& device_public_key);
// The same, also covering when the device made the request
// (EnrollRequest.issued_unix_ms): the hub takes a device's enrollments only
// in increasing issued_unix_ms, so a captured request cannot be replayed to
// reset an enrolled device's credentials (docs/security.md, "Enrollment tokens").
std::string enroll_proof_message(const std::string& enrollment_token, const Bytes& device_public_key,
                                 uint64_t issued_unix_ms);
// What a gateway signs when it enrolls a batch of devices behind it: binds
// the token, the gateway and every device key, in order.
std::string enroll_batch_proof_message(const std::string& enrollment_token, const std::string& gateway_id,
                                       const std::vector<std::string>& device_public_keys);

// What a device signs to renew its broker certificate (POST /v1/renew):
// binds its id, the exact certificate request and when it asked, so a
// captured renewal cannot be replayed (docs/security.md, "Device certificates").
std::string renew_proof_message(const std::string& device_id, std::string_view csr_der, uint64_t issued_unix_ms);
// A device's id: "d-" + the first 20 hex digits of SHA-256(public key).
std::string device_id_for_key(const Bytes& device_public_key);

Bytes sign_detached(const KeyPair& key, std::string_view message);
bool verify_detached(const Bytes& public_key, std::string_view message, const Bytes& signature);

}  // namespace flotilla::bundles

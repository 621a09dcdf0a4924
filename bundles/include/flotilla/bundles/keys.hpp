#pragma once
// Ed25519 signing keys (RFC 8032, via libsodium) and their files.
#include <filesystem>
#include <string>

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

// Private key files are created 0600 and refused if group/other can read them.
Status write_private_key(const std::filesystem::path& path, const KeyPair& key);
Status write_public_key(const std::filesystem::path& path, const PublicKey& key);
Result<KeyPair> read_private_key(const std::filesystem::path& path);
// Accepts a public key file, a private key file (its public half) or "ed25519:<b64>".
Result<PublicKey> read_public_key(const std::string& path_or_text);

// What a device signs when it enrolls: binds its key to the token it used.
std::string enroll_proof_message(const std::string& enrollment_token, const Bytes& device_public_key);

Bytes sign_detached(const KeyPair& key, std::string_view message);
bool verify_detached(const Bytes& public_key, std::string_view message, const Bytes& signature);

}  // namespace flotilla::bundles

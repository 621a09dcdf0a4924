#include "flotilla/bundles/keys.hpp"

#include <sodium.h>
#include <sys/stat.h>
#include <yaml-cpp/yaml.h>

#include "flotilla/common/crypto.hpp"
#include "flotilla/common/fs.hpp"

namespace flotilla::bundles {

std::string key_id_for(const Bytes& public_key) {
  auto h = crypto::sha256(public_key);
  return to_hex(h.data(), 16);
}

KeyPair generate_key() {
  crypto::init();
  KeyPair kp;
  kp.pub.key.resize(crypto_sign_PUBLICKEYBYTES);
  kp.secret.resize(crypto_sign_SECRETKEYBYTES);
  crypto_sign_keypair(kp.pub.key.data(), kp.secret.data());
  kp.pub.key_id = key_id_for(kp.pub.key);
  return kp;
}

Result<KeyPair> key_from_seed(const Bytes& seed) {
  crypto::init();
  if (seed.size() != crypto_sign_SEEDBYTES) return make_error(Errc::invalid_argument, "seed must be 32 bytes");
  KeyPair kp;
  kp.pub.key.resize(crypto_sign_PUBLICKEYBYTES);
  kp.secret.resize(crypto_sign_SECRETKEYBYTES);
  crypto_sign_seed_keypair(kp.pub.key.data(), kp.secret.data(), seed.data());
  kp.pub.key_id = key_id_for(kp.pub.key);
  return kp;
}

std::string public_key_text(const PublicKey& k) { return "ed25519:" + to_base64(k.key); }

Result<PublicKey> parse_public_key_text(const std::string& text) {
  const std::string prefix = "ed25519:";
  if (text.rfind(prefix, 0) != 0) {
    return make_error(Errc::parse, "public key must look like ed25519:<base64>, got '" + text.substr(0, 40) + "'");
  }
  auto raw = from_base64(text.substr(prefix.size()));
  if (!raw || raw->size() != crypto_sign_PUBLICKEYBYTES) {
    return make_error(Errc::parse, "public key is not 32 bytes of base64");
  }
  return PublicKey{key_id_for(*raw), *raw};
}

Status write_private_key(const std::filesystem::path& path, const KeyPair& key) {
  std::string text =
      "# Flotilla Ed25519 signing key. Keep it secret: whoever holds it can sign bundles.\n"
      "type: ed25519-private\n"
      "key-id: " + key.pub.key_id + "\n"
      "public: " + public_key_text(key.pub) + "\n"
      "secret: " + to_base64(key.secret) + "\n";
  return fs::write_file_atomic(path, text, 0600);
}

Status write_private_key(const std::filesystem::path& path, const KeyPair& key, const std::string& passphrase,
                         PassphraseCost cost) {
  if (passphrase.empty()) return make_error(Errc::invalid_argument, "the passphrase is empty");
  crypto::init();
  Bytes salt = crypto::random_bytes(crypto_pwhash_SALTBYTES);
  Bytes nonce = crypto::random_bytes(crypto_secretbox_NONCEBYTES);
  Bytes box_key(crypto_secretbox_KEYBYTES);
  if (crypto_pwhash(box_key.data(), box_key.size(), passphrase.data(), passphrase.size(), salt.data(), cost.opslimit,
                    cost.memlimit, crypto_pwhash_ALG_ARGON2ID13) != 0) {
    return make_error(Errc::crypto, "argon2id key derivation failed (out of memory?)");
  }
  Bytes sealed(crypto_secretbox_MACBYTES + key.secret.size());
  crypto_secretbox_easy(sealed.data(), key.secret.data(), key.secret.size(), nonce.data(), box_key.data());
  sodium_memzero(box_key.data(), box_key.size());
  std::string text =
      "# Flotilla Ed25519 signing key, sealed with a passphrase (argon2id + xsalsa20-poly1305).\n"
      "type: ed25519-private-encrypted\n"
      "key-id: " + key.pub.key_id + "\n"
      "public: " + public_key_text(key.pub) + "\n"
      "kdf: argon2id13\n"
      "kdf-opslimit: " + std::to_string(cost.opslimit) + "\n"
      "kdf-memlimit: " + std::to_string(cost.memlimit) + "\n"
      "salt: " + to_base64(salt) + "\n"
      "nonce: " + to_base64(nonce) + "\n"
      "sealed-secret: " + to_base64(sealed) + "\n";
  return fs::write_file_atomic(path, text, 0600);
}

Status write_public_key(const std::filesystem::path& path, const PublicKey& key) {
  std::string text =
      "# Flotilla Ed25519 public key. Pin it in agent configs (root-keys) to trust its signatures.\n"
      "type: ed25519-public\n"
      "key-id: " + key.key_id + "\n"
      "public: " + public_key_text(key) + "\n";
  return fs::write_file_atomic(path, text, 0644);
}

namespace {
Result<YAML::Node> load_key_yaml(const std::filesystem::path& path) {
  auto text = fs::read_file(path, 64 * 1024);
  if (!text) return text.error();
  try {
    YAML::Node n = YAML::Load(*text);
    if (!n.IsMap() || !n["type"] || !n["type"].IsScalar()) {
      return make_error(Errc::parse, path.string() + " is not a Flotilla key file");
    }
    for (const char* field : {"public", "secret", "key-id", "kdf", "kdf-opslimit", "kdf-memlimit", "salt", "nonce",
                              "sealed-secret"}) {
      if (n[field] && !n[field].IsScalar()) {
        return make_error(Errc::parse, path.string() + ": '" + field + "' must be a single value");
      }
    }
    return n;
  } catch (const YAML::Exception& e) {
    return make_error(Errc::parse, path.string() + ": " + e.what());
  }
}
}  // namespace

bool is_encrypted_private_key(const std::filesystem::path& path) {
  auto n = load_key_yaml(path);
  return n && (*n)["type"].as<std::string>() == "ed25519-private-encrypted";
}

namespace {
// Opens the sealed secret of an encrypted key file.
Result<Bytes> unseal_secret(const YAML::Node& n, const std::string& path, const std::optional<std::string>& passphrase) {
  if (!passphrase || passphrase->empty()) {
    return make_error(Errc::unauthenticated,
                      path + " is passphrase-protected; set FLOTILLA_KEY_PASSPHRASE or run from a terminal");
  }
  if (n["kdf"].as<std::string>("") != "argon2id13") {
    return make_error(Errc::parse, path + ": unsupported kdf '" + n["kdf"].as<std::string>("") + "'");
  }
  unsigned long long ops = 0;
  size_t mem = 0;
  try {
    ops = n["kdf-opslimit"].as<unsigned long long>();
    mem = n["kdf-memlimit"].as<size_t>();
  } catch (const YAML::Exception&) {
    return make_error(Errc::parse, path + ": kdf-opslimit and kdf-memlimit must be whole numbers");
  }
  // Bound the work a tampered file can demand of us.
  if (ops < crypto_pwhash_OPSLIMIT_MIN || ops > 16 || mem < crypto_pwhash_MEMLIMIT_MIN || mem > (size_t{2} << 30)) {
    return make_error(Errc::parse, path + ": kdf limits out of range");
  }
  auto salt = from_base64(n["salt"].as<std::string>(""));
  auto nonce = from_base64(n["nonce"].as<std::string>(""));
  auto sealed = from_base64(n["sealed-secret"].as<std::string>(""));
  if (!salt || salt->size() != crypto_pwhash_SALTBYTES || !nonce || nonce->size() != crypto_secretbox_NONCEBYTES ||
      !sealed || sealed->size() != crypto_secretbox_MACBYTES + crypto_sign_SECRETKEYBYTES) {
    return make_error(Errc::parse, path + ": salt, nonce or sealed-secret has the wrong size");
  }
  Bytes box_key(crypto_secretbox_KEYBYTES);
  if (crypto_pwhash(box_key.data(), box_key.size(), passphrase->data(), passphrase->size(), salt->data(), ops, mem,
                    crypto_pwhash_ALG_ARGON2ID13) != 0) {
    return make_error(Errc::crypto, path + ": argon2id key derivation failed (out of memory?)");
  }
  Bytes secret(crypto_sign_SECRETKEYBYTES);
  const int rc = crypto_secretbox_open_easy(secret.data(), sealed->data(), sealed->size(), nonce->data(), box_key.data());
  sodium_memzero(box_key.data(), box_key.size());
  if (rc != 0) return make_error(Errc::unauthenticated, path + ": wrong passphrase (or the file was altered)");
  return secret;
}
}  // namespace

Result<KeyPair> read_private_key(const std::filesystem::path& path, const std::optional<std::string>& passphrase) {
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0 && (st.st_mode & 077) != 0) {
    return make_error(Errc::permission_denied,
                      "private key " + path.string() + " is readable by others; run chmod 600 on it");
  }
  auto n = load_key_yaml(path);
  if (!n) return n.error();
  const std::string type = (*n)["type"].as<std::string>();
  if (type != "ed25519-private" && type != "ed25519-private-encrypted") {
    return make_error(Errc::parse, path.string() + " is not a private key (type " + type + ")");
  }
  auto pub = parse_public_key_text((*n)["public"].as<std::string>(""));
  if (!pub) return pub.error().with_context(path.string());
  Bytes secret_bytes;
  if (type == "ed25519-private-encrypted") {
    auto opened = unseal_secret(*n, path.string(), passphrase);
    if (!opened) return opened.error();
    secret_bytes = std::move(*opened);
  } else {
    auto secret = from_base64((*n)["secret"].as<std::string>(""));
    if (!secret || secret->size() != crypto_sign_SECRETKEYBYTES) {
      return make_error(Errc::parse, path.string() + ": secret is not 64 bytes of base64");
    }
    secret_bytes = std::move(*secret);
  }
  // Re-derive the pair from the seed: a corrupted seed or public half (or an
  // edited file) must not produce a key that signs garbage.
  Bytes seed(secret_bytes.begin(), secret_bytes.begin() + 32);
  auto derived = key_from_seed(seed);
  sodium_memzero(seed.data(), seed.size());
  if (!derived || derived->pub.key != pub->key || derived->secret != secret_bytes) {
    return make_error(Errc::parse, path.string() + ": the key is damaged (its halves do not match)");
  }
  return KeyPair{*pub, secret_bytes};
}

Result<PublicKey> read_public_key(const std::string& path_or_text) {
  if (path_or_text.rfind("ed25519:", 0) == 0) return parse_public_key_text(path_or_text);
  auto n = load_key_yaml(path_or_text);
  if (!n) return n.error();
  auto pub = parse_public_key_text((*n)["public"].as<std::string>(""));
  if (!pub) return pub.error().with_context(path_or_text);
  return pub;
}

std::string enroll_proof_message(const std::string& enrollment_token, const Bytes& device_public_key) {
  return "flotilla-enroll-v1\n" + crypto::sha256_hex(enrollment_token) + "\n" + to_hex(device_public_key);
}

std::string enroll_proof_message(const std::string& enrollment_token, const Bytes& device_public_key,
                                 uint64_t issued_unix_ms) {
  return "flotilla-enroll-v2\n" + crypto::sha256_hex(enrollment_token) + "\n" + to_hex(device_public_key) + "\n" +
         std::to_string(issued_unix_ms);
}

std::string enroll_batch_proof_message(const std::string& enrollment_token, const std::string& gateway_id,
                                       const std::vector<std::string>& device_public_keys) {
  std::string keys;
  keys.reserve(device_public_keys.size() * 65);
  for (const auto& k : device_public_keys) keys += to_hex(k) + "\n";
  return "flotilla-enroll-batch-v1\n" + crypto::sha256_hex(enrollment_token) + "\n" + gateway_id + "\n" +
         std::to_string(device_public_keys.size()) + "\n" + crypto::sha256_hex(keys);
}

std::string renew_proof_message(const std::string& device_id, std::string_view csr_der, uint64_t issued_unix_ms) {
  return "flotilla-renew-v1\n" + device_id + "\n" + crypto::sha256_hex(csr_der) + "\n" + std::to_string(issued_unix_ms);
}

std::string device_id_for_key(const Bytes& device_public_key) {
  const auto h = crypto::sha256(device_public_key);
  return "d-" + to_hex(h.data(), h.size()).substr(0, 20);
}

Bytes sign_detached(const KeyPair& key, std::string_view message) {
  crypto::init();
  Bytes sig(crypto_sign_BYTES);
  crypto_sign_detached(sig.data(), nullptr, reinterpret_cast<const unsigned char*>(message.data()),
                       message.size(), key.secret.data());
  return sig;
}

bool verify_detached(const Bytes& public_key, std::string_view message, const Bytes& signature) {
  crypto::init();
  if (public_key.size() != crypto_sign_PUBLICKEYBYTES || signature.size() != crypto_sign_BYTES) return false;
  return crypto_sign_verify_detached(signature.data(), reinterpret_cast<const unsigned char*>(message.data()),
                                     message.size(), public_key.data()) == 0;
}

}  // namespace flotilla::bundles

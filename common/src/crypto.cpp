#include "flotilla/common/crypto.hpp"

#include <cstring>
#include <mutex>
#include <stdexcept>

#include <sodium.h>
// SHA-256 comes from OpenSSL: its assembly (SHA-NI, AVX2, ARMv8 crypto
// extensions) hashes several times faster than libsodium's portable C, which
// matters for bundle verification (every file of a bundle) and for artifacts
// of hundreds of MB on small devices. The low-level API is deprecated in
// OpenSSL 3 but kept, and unlike EVP it needs no allocation.
#define OPENSSL_SUPPRESS_DEPRECATED
#include <openssl/sha.h>

namespace flotilla::crypto {

void init() {
  static std::once_flag once;
  std::call_once(once, [] {
    if (sodium_init() < 0) throw std::runtime_error("libsodium failed to initialise");
  });
}

Sha256 sha256(const uint8_t* data, size_t len) {
  Sha256 out{};
  ::SHA256(data, len, out.data());
  return out;
}

static_assert(sizeof(SHA256_CTX) <= 256, "Sha256Stream state buffer too small");

Sha256Stream::Sha256Stream() { ::SHA256_Init(reinterpret_cast<SHA256_CTX*>(state_)); }
void Sha256Stream::update(const uint8_t* data, size_t len) {
  ::SHA256_Update(reinterpret_cast<SHA256_CTX*>(state_), data, len);
}
Sha256 Sha256Stream::finish() {
  Sha256 out{};
  ::SHA256_Final(out.data(), reinterpret_cast<SHA256_CTX*>(state_));
  return out;
}

Bytes random_bytes(size_t n) {
  init();
  Bytes out(n);
  randombytes_buf(out.data(), n);
  return out;
}

std::string random_token(size_t n_bytes) { return to_hex(random_bytes(n_bytes)); }

uint64_t random_u64() {
  init();
  uint64_t v = 0;
  randombytes_buf(&v, sizeof v);
  return v;
}

bool equal_constant_time(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  return sodium_memcmp(a.data(), b.data(), a.size()) == 0;
}

}  // namespace flotilla::crypto

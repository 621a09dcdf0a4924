#include "flotilla/common/crypto.hpp"

#include <cstring>
#include <mutex>
#include <stdexcept>

#include <sodium.h>

namespace flotilla::crypto {

void init() {
  static std::once_flag once;
  std::call_once(once, [] {
    if (sodium_init() < 0) throw std::runtime_error("libsodium failed to initialise");
  });
}

Sha256 sha256(const uint8_t* data, size_t len) {
  Sha256 out{};
  crypto_hash_sha256(out.data(), data, len);
  return out;
}

static_assert(sizeof(crypto_hash_sha256_state) <= 256, "Sha256Stream state buffer too small");

Sha256Stream::Sha256Stream() {
  crypto_hash_sha256_init(reinterpret_cast<crypto_hash_sha256_state*>(state_));
}
void Sha256Stream::update(const uint8_t* data, size_t len) {
  crypto_hash_sha256_update(reinterpret_cast<crypto_hash_sha256_state*>(state_), data, len);
}
Sha256 Sha256Stream::finish() {
  Sha256 out{};
  crypto_hash_sha256_final(reinterpret_cast<crypto_hash_sha256_state*>(state_), out.data());
  return out;
}

Bytes random_bytes(size_t n) {
  init();
  Bytes out(n);
  randombytes_buf(out.data(), n);
  return out;
}

std::string random_token(size_t n_bytes) { return to_hex(random_bytes(n_bytes)); }

bool equal_constant_time(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  return sodium_memcmp(a.data(), b.data(), a.size()) == 0;
}

}  // namespace flotilla::crypto

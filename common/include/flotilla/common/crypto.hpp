#pragma once
// Thin libsodium helpers that every module needs (hashing, randomness,
// constant-time compare). Signing lives in bundles/.
#include <array>
#include <string>
#include <string_view>

#include "flotilla/common/encoding.hpp"
#include "flotilla/common/result.hpp"

namespace flotilla::crypto {

// Calls sodium_init() once; safe from any thread.
void init();

using Sha256 = std::array<uint8_t, 32>;
Sha256 sha256(const uint8_t* data, size_t len);
inline Sha256 sha256(std::string_view s) {
  return sha256(reinterpret_cast<const uint8_t*>(s.data()), s.size());
}
inline Sha256 sha256(const Bytes& b) { return sha256(b.data(), b.size()); }
inline std::string sha256_hex(std::string_view s) {
  auto h = sha256(s);
  return to_hex(h.data(), h.size());
}

// Incremental SHA-256 for streams (artifact downloads).
class Sha256Stream {
 public:
  Sha256Stream();
  void update(const uint8_t* data, size_t len);
  Sha256 finish();

 private:
  alignas(64) unsigned char state_[256];
};

Bytes random_bytes(size_t n);
// 64 random bits, e.g. to seed a PRNG: every process draws from the whole
// seed space (one random byte gives a fleet only 256 jitter patterns).
uint64_t random_u64();
// URL- and filename-safe random token: hex of n random bytes.
std::string random_token(size_t n_bytes = 32);

bool equal_constant_time(std::string_view a, std::string_view b);

}  // namespace flotilla::crypto

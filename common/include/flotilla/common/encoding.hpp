#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace flotilla {

using Bytes = std::vector<uint8_t>;

std::string to_hex(const uint8_t* data, size_t len);
inline std::string to_hex(const Bytes& b) { return to_hex(b.data(), b.size()); }
inline std::string to_hex(std::string_view s) {
  return to_hex(reinterpret_cast<const uint8_t*>(s.data()), s.size());
}
std::optional<Bytes> from_hex(std::string_view hex);

std::string to_base64(const uint8_t* data, size_t len);
inline std::string to_base64(const Bytes& b) { return to_base64(b.data(), b.size()); }
std::optional<Bytes> from_base64(std::string_view b64);

inline Bytes to_bytes(std::string_view s) { return Bytes(s.begin(), s.end()); }
inline std::string to_string(const Bytes& b) { return std::string(b.begin(), b.end()); }

}  // namespace flotilla

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
// Percent-encodes everything but RFC 3986's unreserved characters
// (A-Z a-z 0-9 - _ . ~): safe in a URL path segment and a query value.
std::string url_encode(std::string_view s);

inline Bytes to_bytes(std::string_view s) { return Bytes(s.begin(), s.end()); }
inline std::string to_string(const Bytes& b) { return std::string(b.begin(), b.end()); }

}  // namespace flotilla

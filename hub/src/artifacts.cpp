#include "flotilla/hub/artifacts.hpp"

#include <fstream>

#include "flotilla/common/crypto.hpp"
#include "flotilla/common/fs.hpp"

namespace flotilla::hub {

Status ArtifactStore::init() { return fs::ensure_own_dir(dir_, 0700); }

bool ArtifactStore::valid_name(const std::string& s) {
  if (s.size() != 64) return false;
  for (char c : s) {
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  }
  return true;
}

Result<std::pair<ArtifactInfo, bool>> ArtifactStore::commit(const std::string& staged, const std::string& claimed) {
  if (!valid_name(claimed)) return make_error(Errc::invalid_argument, "artifact name must be a lower-case SHA-256 hex digest");
  std::ifstream in(staged, std::ios::binary);
  if (!in) return make_error(Errc::io, "staged upload is missing");
  crypto::Sha256Stream h;
  std::vector<char> buf(1 << 16);
  uint64_t size = 0;
  while (in) {
    in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    const auto n = in.gcount();
    if (n <= 0) break;
    h.update(reinterpret_cast<const uint8_t*>(buf.data()), static_cast<size_t>(n));
    size += static_cast<uint64_t>(n);
  }
  const auto digest = h.finish();
  const std::string actual = to_hex(digest.data(), digest.size());
  if (actual != claimed) {
    return make_error(Errc::invalid_argument, "uploaded bytes hash to " + actual + ", not " + claimed);
  }
  if (auto existing = stat(claimed)) return std::make_pair(*existing, false);
  std::error_code ec;
  std::filesystem::rename(staged, path(claimed), ec);
  if (ec) return make_error(Errc::io, "store artifact: " + ec.message());
  (void)fs::fsync_dir(dir_);
  return std::make_pair(ArtifactInfo{claimed, size}, true);
}

std::optional<ArtifactInfo> ArtifactStore::stat(const std::string& sha) const {
  if (!valid_name(sha)) return std::nullopt;
  std::error_code ec;
  auto size = std::filesystem::file_size(path(sha), ec);
  if (ec) return std::nullopt;
  return ArtifactInfo{sha, size};
}

std::optional<std::pair<uint64_t, uint64_t>> parse_byte_range(const std::string& header, uint64_t size) {
  const std::string prefix = "bytes=";
  if (header.rfind(prefix, 0) != 0 || size == 0) return std::nullopt;
  const std::string spec = header.substr(prefix.size());
  if (spec.find(',') != std::string::npos) return std::nullopt;  // multiple ranges: not supported
  const auto dash = spec.find('-');
  if (dash == std::string::npos) return std::nullopt;
  const std::string a = spec.substr(0, dash), b = spec.substr(dash + 1);
  auto num = [](const std::string& s) -> std::optional<uint64_t> {
    if (s.empty() || s.size() > 19) return std::nullopt;
    for (char c : s) if (c < '0' || c > '9') return std::nullopt;
    return std::stoull(s);
  };
  uint64_t first, last;
  if (a.empty()) {  // the last n bytes
    auto n = num(b);
    if (!n || *n == 0) return std::nullopt;
    first = *n >= size ? 0 : size - *n;
    last = size - 1;
  } else {
    auto f = num(a);
    if (!f || *f >= size) return std::nullopt;
    first = *f;
    if (b.empty()) {
      last = size - 1;
    } else {
      auto l = num(b);
      if (!l || *l < first) return std::nullopt;
      last = std::min(*l, size - 1);
    }
  }
  return std::make_pair(first, last);
}

}  // namespace flotilla::hub

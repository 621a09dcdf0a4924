#include "flotilla/hub/timezone.hpp"

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

namespace flotilla::hub {

namespace {

struct Zone {
  std::vector<int64_t> transitions;  // ascending UTC seconds
  std::vector<uint8_t> types;        // transitions[i] -> index into offsets
  std::vector<int32_t> offsets;      // utoff of each local time type
};

// A zone file is at most a few KiB; anything far larger is not one.
constexpr size_t kMaxZoneFile = 256 * 1024;

uint64_t be(const std::string& b, size_t at, int n) {
  uint64_t v = 0;
  for (int i = 0; i < n; ++i) v = v << 8 | static_cast<uint8_t>(b[at + static_cast<size_t>(i)]);
  return v;
}

Result<Zone> parse_tzif(const std::string& zone, const std::string& b) {
  auto bad = [&](const std::string& why) {
    return make_error(Errc::invalid_argument, "time zone '" + zone + "': " + why);
  };
  if (b.size() < 44 || b.compare(0, 4, "TZif") != 0) return bad("not a TZif zone file");
  // Version 2+ files repeat the data with 64-bit times after the 32-bit
  // block: skip the first block and read the second.
  size_t at = 0;
  int time_size = 4;
  auto counts = [&](size_t h, uint64_t c[6]) {
    for (int i = 0; i < 6; ++i) c[i] = be(b, h + 20 + static_cast<size_t>(i) * 4, 4);
  };
  uint64_t c[6];
  counts(0, c);
  auto block_size = [&](int ts) {
    // isutcnt, isstdcnt, leapcnt, timecnt, typecnt, charcnt
    return c[3] * static_cast<uint64_t>(ts) + c[3] + c[4] * 6 + c[5] + c[2] * static_cast<uint64_t>(ts + 4) + c[1] +
           c[0];
  };
  if (b[4] >= '2') {
    const uint64_t skip = 44 + block_size(4);
    if (skip + 44 > b.size()) return bad("truncated zone file");
    at = static_cast<size_t>(skip);
    if (b.compare(at, 4, "TZif") != 0) return bad("second header missing");
    counts(at, c);
    time_size = 8;
  }
  at += 44;
  if (c[4] == 0 || c[4] > 256 || c[3] > 100000) return bad("implausible counts in zone file");
  if (at + block_size(time_size) > b.size()) return bad("truncated zone file");
  Zone z;
  for (uint64_t i = 0; i < c[3]; ++i) {
    const uint64_t raw = be(b, at + static_cast<size_t>(i) * static_cast<size_t>(time_size), time_size);
    z.transitions.push_back(time_size == 8 ? static_cast<int64_t>(raw)
                                           : static_cast<int64_t>(static_cast<int32_t>(static_cast<uint32_t>(raw))));
  }
  at += static_cast<size_t>(c[3]) * static_cast<size_t>(time_size);
  for (uint64_t i = 0; i < c[3]; ++i) {
    const uint8_t t = static_cast<uint8_t>(b[at + static_cast<size_t>(i)]);
    if (t >= c[4]) return bad("transition to an unknown local time type");
    z.types.push_back(t);
  }
  at += static_cast<size_t>(c[3]);
  for (uint64_t i = 0; i < c[4]; ++i) {
    z.offsets.push_back(static_cast<int32_t>(static_cast<uint32_t>(be(b, at + static_cast<size_t>(i) * 6, 4))));
  }
  if (!std::is_sorted(z.transitions.begin(), z.transitions.end())) return bad("transitions out of order");
  return z;
}

std::mutex g_mu;
std::map<std::string, std::shared_ptr<const Zone>> g_zones;

Result<std::shared_ptr<const Zone>> load(const std::string& zone) {
  if (!valid_zone_name(zone)) {
    return make_error(Errc::invalid_argument, "'" + zone + "' is not a time zone name like Europe/Berlin or UTC");
  }
  std::lock_guard lock(g_mu);
  if (auto it = g_zones.find(zone); it != g_zones.end()) return it->second;
  const char* dir = std::getenv("TZDIR");
  const std::string path = std::string(dir && *dir ? dir : "/usr/share/zoneinfo") + "/" + zone;
  std::ifstream in(path, std::ios::binary);
  if (!in) return make_error(Errc::not_found, "unknown time zone '" + zone + "' (no " + path + ")");
  std::string bytes;
  bytes.resize(kMaxZoneFile + 1);
  in.read(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  bytes.resize(static_cast<size_t>(in.gcount()));
  if (bytes.size() > kMaxZoneFile) return make_error(Errc::invalid_argument, "time zone '" + zone + "': file too large");
  auto z = parse_tzif(zone, bytes);
  if (!z) return z.error();
  auto shared = std::make_shared<const Zone>(std::move(*z));
  if (g_zones.size() < 1024) g_zones.emplace(zone, shared);
  return shared;
}

bool zone_char(char c) {
  return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '+' ||
         c == '-';
}

}  // namespace

bool valid_zone_name(const std::string& zone) {
  if (zone.empty() || zone.size() > 64) return false;
  size_t start = 0;
  while (true) {
    const size_t end = zone.find('/', start);
    const std::string seg = zone.substr(start, end == std::string::npos ? std::string::npos : end - start);
    if (seg.empty() || !std::all_of(seg.begin(), seg.end(), zone_char)) return false;
    if (end == std::string::npos) return true;
    start = end + 1;
  }
}

Result<int64_t> utc_offset_seconds(const std::string& zone, int64_t unix_seconds) {
  auto z = load(zone);
  if (!z) return z.error();
  const Zone& tz = **z;
  // Before the first transition (or with none), RFC 8536 says type 0 holds.
  auto it = std::upper_bound(tz.transitions.begin(), tz.transitions.end(), unix_seconds);
  if (it == tz.transitions.begin()) return static_cast<int64_t>(tz.offsets.front());
  return static_cast<int64_t>(tz.offsets[tz.types[static_cast<size_t>(it - tz.transitions.begin()) - 1]]);
}

Result<int> local_minute_of_day(const std::string& zone, int64_t unix_seconds) {
  auto off = utc_offset_seconds(zone, unix_seconds);
  if (!off) return off.error();
  int64_t local = (unix_seconds + *off) % 86400;
  if (local < 0) local += 86400;
  return static_cast<int>(local / 60);
}

}  // namespace flotilla::hub

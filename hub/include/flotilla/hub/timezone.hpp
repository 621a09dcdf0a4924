#pragma once
// Local time of IANA time zones ("Europe/Berlin"), read from the system's
// compiled zone files (TZif, RFC 8536) under $TZDIR or /usr/share/zoneinfo.
// For maintenance windows in device-local hours; libstdc++ 12 has no tzdb,
// and glibc's localtime would mean changing TZ for the whole process.
#include <cstdint>
#include <string>

#include "flotilla/common/result.hpp"

namespace flotilla::hub {

// A zone name of the tz database's shape: segments of [A-Za-z0-9_+-], no
// empty, "." or ".." segment, at most 64 characters. Says nothing of whether
// the zone exists.
bool valid_zone_name(const std::string& zone);

// Seconds east of UTC in `zone` at `unix_seconds`. Errors name the zone and
// why (unknown zone, unreadable or malformed file). Zone files are read once
// and kept. Past the last transition a file lists (2037 for Debian's files),
// the last offset holds.
Result<int64_t> utc_offset_seconds(const std::string& zone, int64_t unix_seconds);

// Minutes since local midnight in `zone` at `unix_seconds`, 0..1439.
Result<int> local_minute_of_day(const std::string& zone, int64_t unix_seconds);

}  // namespace flotilla::hub

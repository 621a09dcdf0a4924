#pragma once
// Token buckets for the hub's rate limits: enrollments (overall and per
// token) and log lines per device. Time comes from the injected Clock, so
// tests advance a FakeClock instead of sleeping.
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <string>

#include "flotilla/common/clock.hpp"

namespace flotilla::hub {

// `rate` tokens per second, at most `burst` saved up. Not thread-safe: its
// owner locks (KeyedLimiter does).
class TokenBucket {
 public:
  TokenBucket(double rate, double burst, int64_t now_ms) : rate_(rate), burst_(burst), tokens_(burst), last_ms_(now_ms) {}
  // Takes one token if there is one.
  bool take(int64_t now_ms);
  // Milliseconds until a token will be there (0 = now).
  int64_t wait_ms(int64_t now_ms);
  // Whether the bucket is full again: an idle key that can be forgotten.
  bool full(int64_t now_ms);

 private:
  void refill(int64_t now_ms);
  double rate_, burst_, tokens_;
  int64_t last_ms_;
};

// One bucket per key (a token id, a device id) plus, optionally, one for all
// keys together. rate <= 0 switches that limit off. The key table is
// bounded: when it is full, idle (full) buckets are forgotten first; if that
// is not enough the table starts afresh rather than growing.
class KeyedLimiter {
 public:
  KeyedLimiter(const Clock& clock, double rate_per_key, double burst_per_key, double rate_all = 0, double burst_all = 0,
               size_t max_keys = 10000);
  // Admits one event for key. On refusal, retry_after_ms says when to come back.
  bool admit(const std::string& key, int64_t* retry_after_ms = nullptr);
  // Only the limit on all keys together (for events before a key is known).
  bool admit_all(int64_t* retry_after_ms = nullptr);
  size_t keys() const;

 private:
  const Clock& clock_;
  double rate_, burst_;
  size_t max_keys_;
  mutable std::mutex mu_;
  std::optional<TokenBucket> all_;
  std::map<std::string, TokenBucket> buckets_;
};

// Log lines about what one device (or gateway) sent: a burst, then a few per
// minute. A single message naming a thousand devices must not become a
// thousand lines (docs/security.md, "Bounded input").
class LogLimiter {
 public:
  explicit LogLimiter(const Clock& clock, double lines_per_s = 0.1, double burst = 5, size_t max_keys = 10000);
  // nullopt: drop this line. Otherwise how many lines of this key were dropped
  // since the last one written (to say so in the line).
  std::optional<uint64_t> admit(const std::string& key);
  uint64_t suppressed_total() const;

 private:
  KeyedLimiter limiter_;
  mutable std::mutex mu_;
  std::map<std::string, uint64_t> dropped_;  // bounded like the limiter's keys
  uint64_t suppressed_total_ = 0;
  size_t max_keys_;
};

// " (N similar lines suppressed)" or "".
std::string suppressed_note(uint64_t n);

}  // namespace flotilla::hub

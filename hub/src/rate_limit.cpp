#include "flotilla/hub/rate_limit.hpp"

#include <algorithm>
#include <cmath>

namespace flotilla::hub {

void TokenBucket::refill(int64_t now_ms) {
  if (now_ms > last_ms_) {
    tokens_ = std::min(burst_, tokens_ + rate_ * static_cast<double>(now_ms - last_ms_) / 1000.0);
  }
  // A clock that went back does not hand out tokens; it only restarts the count from here.
  last_ms_ = now_ms;
}

bool TokenBucket::take(int64_t now_ms) {
  refill(now_ms);
  if (tokens_ < 1.0) return false;
  tokens_ -= 1.0;
  return true;
}

int64_t TokenBucket::wait_ms(int64_t now_ms) {
  refill(now_ms);
  if (tokens_ >= 1.0 || rate_ <= 0) return 0;
  return static_cast<int64_t>(std::ceil((1.0 - tokens_) * 1000.0 / rate_));
}

bool TokenBucket::full(int64_t now_ms) {
  refill(now_ms);
  return tokens_ >= burst_;
}

KeyedLimiter::KeyedLimiter(const Clock& clock, double rate_per_key, double burst_per_key, double rate_all,
                           double burst_all, size_t max_keys)
    : clock_(clock), rate_(rate_per_key), burst_(std::max(1.0, burst_per_key)), max_keys_(std::max<size_t>(1, max_keys)) {
  if (rate_all > 0) all_.emplace(rate_all, std::max(1.0, burst_all), clock_.now_unix_ms());
}

bool KeyedLimiter::admit_all(int64_t* retry_after_ms) {
  std::lock_guard lock(mu_);
  if (!all_) return true;
  const int64_t now = clock_.now_unix_ms();
  if (all_->take(now)) return true;
  if (retry_after_ms) *retry_after_ms = std::max<int64_t>(1, all_->wait_ms(now));
  return false;
}

bool KeyedLimiter::admit(const std::string& key, int64_t* retry_after_ms) {
  if (rate_ <= 0) return true;
  std::lock_guard lock(mu_);
  const int64_t now = clock_.now_unix_ms();
  auto it = buckets_.find(key);
  if (it == buckets_.end()) {
    if (buckets_.size() >= max_keys_) {
      for (auto b = buckets_.begin(); b != buckets_.end();) b = b->second.full(now) ? buckets_.erase(b) : std::next(b);
      if (buckets_.size() >= max_keys_) buckets_.clear();
    }
    it = buckets_.emplace(key, TokenBucket(rate_, burst_, now)).first;
  }
  if (it->second.take(now)) return true;
  if (retry_after_ms) *retry_after_ms = std::max<int64_t>(1, it->second.wait_ms(now));
  return false;
}

size_t KeyedLimiter::keys() const {
  std::lock_guard lock(mu_);
  return buckets_.size();
}

LogLimiter::LogLimiter(const Clock& clock, double lines_per_s, double burst, size_t max_keys)
    : limiter_(clock, lines_per_s, burst, 0, 0, max_keys), max_keys_(max_keys) {}

std::optional<uint64_t> LogLimiter::admit(const std::string& key) {
  const bool ok = limiter_.admit(key);
  std::lock_guard lock(mu_);
  if (!ok) {
    if (dropped_.size() >= max_keys_ && !dropped_.count(key)) dropped_.clear();
    ++dropped_[key];
    ++suppressed_total_;
    return std::nullopt;
  }
  uint64_t n = 0;
  if (auto it = dropped_.find(key); it != dropped_.end()) {
    n = it->second;
    dropped_.erase(it);
  }
  return n;
}

uint64_t LogLimiter::suppressed_total() const {
  std::lock_guard lock(mu_);
  return suppressed_total_;
}

std::string suppressed_note(uint64_t n) {
  return n == 0 ? std::string() : " (" + std::to_string(n) + " similar lines suppressed)";
}

}  // namespace flotilla::hub

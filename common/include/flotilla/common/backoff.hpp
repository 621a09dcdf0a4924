#pragma once
#include <chrono>
#include <cstdint>
#include <random>

namespace flotilla {

// Exponential backoff with full jitter (AWS architecture blog): the delay is
// uniform in [0, min(cap, base * 2^attempt)], so a fleet that lost its broker
// at the same instant does not come back in lockstep.
class Backoff {
 public:
  Backoff(std::chrono::milliseconds base, std::chrono::milliseconds cap, uint64_t seed)
      : base_(base), cap_(cap), rng_(seed) {}

  std::chrono::milliseconds next() {
    const int64_t ceiling = ceiling_ms();
    if (attempt_ < 62) ++attempt_;
    std::uniform_int_distribution<int64_t> dist(0, ceiling);
    return std::chrono::milliseconds(dist(rng_));
  }
  int64_t ceiling_ms() const {
    int64_t c = base_.count();
    for (unsigned i = 0; i < attempt_ && c < cap_.count(); ++i) c *= 2;
    return c < cap_.count() ? c : cap_.count();
  }
  void reset() { attempt_ = 0; }
  unsigned attempt() const { return attempt_; }

 private:
  std::chrono::milliseconds base_;
  std::chrono::milliseconds cap_;
  std::mt19937_64 rng_;
  unsigned attempt_ = 0;
};

}  // namespace flotilla

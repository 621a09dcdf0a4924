#pragma once
#include <chrono>
#include <cstdint>
#include <thread>

namespace flotilla {

// Injected wherever time decides behaviour, so tests advance a fake clock.
class Clock {
 public:
  virtual ~Clock() = default;
  virtual std::chrono::system_clock::time_point now() const = 0;
  // Elapsed time for deadlines: never jumps when the wall clock is set.
  virtual std::chrono::steady_clock::time_point monotonic() const { return std::chrono::steady_clock::now(); }
  // Waits (a fake clock advances instead).
  virtual void sleep_for(std::chrono::milliseconds d) const { std::this_thread::sleep_for(d); }
  int64_t now_unix() const {
    return std::chrono::duration_cast<std::chrono::seconds>(now().time_since_epoch()).count();
  }
  int64_t now_unix_ms() const {
    return std::chrono::duration_cast<std::chrono::milliseconds>(now().time_since_epoch()).count();
  }
};

class SystemClock final : public Clock {
 public:
  std::chrono::system_clock::time_point now() const override {
    return std::chrono::system_clock::now();
  }
  static const SystemClock& instance() {
    static SystemClock clock;
    return clock;
  }
};

class FakeClock final : public Clock {
 public:
  explicit FakeClock(int64_t unix_seconds = 1'800'000'000)
      : now_(std::chrono::system_clock::time_point(std::chrono::seconds(unix_seconds))) {}
  std::chrono::system_clock::time_point now() const override { return now_; }
  std::chrono::steady_clock::time_point monotonic() const override { return mono_; }
  // Sleeping on a fake clock is time passing at once.
  void sleep_for(std::chrono::milliseconds d) const override {
    now_ += d;
    mono_ += d;
  }
  void advance(std::chrono::milliseconds d) {
    now_ += d;
    mono_ += d;
  }
  // Sets the wall clock only (a clock set back or forward); monotonic time goes on.
  void set_unix(int64_t s) { now_ = std::chrono::system_clock::time_point(std::chrono::seconds(s)); }

 private:
  mutable std::chrono::system_clock::time_point now_;
  mutable std::chrono::steady_clock::time_point mono_{std::chrono::hours(1)};
};

}  // namespace flotilla

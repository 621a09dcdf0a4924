#pragma once
#include <chrono>
#include <cstdint>

namespace flotilla {

// Injected wherever time decides behaviour, so tests advance a fake clock.
class Clock {
 public:
  virtual ~Clock() = default;
  virtual std::chrono::system_clock::time_point now() const = 0;
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
  void advance(std::chrono::milliseconds d) { now_ += d; }
  void set_unix(int64_t s) { now_ = std::chrono::system_clock::time_point(std::chrono::seconds(s)); }

 private:
  std::chrono::system_clock::time_point now_;
};

}  // namespace flotilla

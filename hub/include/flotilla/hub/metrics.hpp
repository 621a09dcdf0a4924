#pragma once
// The few metric types the hub needs, rendered in the Prometheus text
// exposition format 0.0.4. Hand-written rather than a client library: a
// counter map and one histogram do not justify a dependency.
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

namespace flotilla::hub {

class HubService;

// Cumulative histogram with fixed upper bounds (seconds).
class Histogram {
 public:
  explicit Histogram(std::vector<double> bounds) : bounds_(std::move(bounds)), buckets_(bounds_.size(), 0) {}
  void observe(double v);

  struct Snapshot {
    std::vector<double> bounds;
    std::vector<uint64_t> cumulative;  // one per bound; +Inf is count
    uint64_t count = 0;
    double sum = 0;
  };
  Snapshot snapshot() const;

 private:
  mutable std::mutex mu_;
  std::vector<double> bounds_;
  std::vector<uint64_t> buckets_;  // non-cumulative
  uint64_t count_ = 0;
  double sum_ = 0;
};

// HTTP requests by method, route pattern (never the raw path: bounded label
// values) and status class.
class HttpMetrics {
 public:
  void count(const std::string& method, const std::string& route, int status);
  void count_audit_failure();
  std::map<std::tuple<std::string, std::string, std::string>, uint64_t> snapshot() const;
  uint64_t audit_failures() const;

 private:
  mutable std::mutex mu_;
  std::map<std::tuple<std::string, std::string, std::string>, uint64_t> requests_;
  uint64_t audit_failures_ = 0;
};

// Escapes a label value: backslash, double quote and newline.
std::string prom_escape(const std::string& v);
// The whole /metrics page.
std::string render_metrics(HubService& service, const HttpMetrics& http);

}  // namespace flotilla::hub

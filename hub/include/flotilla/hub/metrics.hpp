#pragma once
// The few metric types the hub needs, rendered in the Prometheus text
// exposition format 0.0.4. Hand-written rather than a client library: a
// counter map and one histogram do not justify a dependency.
#include <atomic>
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

// The HTTP server's own counters (hub/src/http_server.cpp), read by /metrics.
struct ServerStats {
  std::atomic<int64_t> connections{0};           // open now
  std::atomic<uint64_t> refused_per_peer{0};     // connections over the per-peer cap
  std::atomic<uint64_t> accept_paused{0};        // times the total cap stopped accepting
  std::atomic<uint64_t> accept_errors{0};        // failed accepts (EMFILE, ENFILE, ...), each followed by a pause
};

// HTTP requests by method, route pattern (never the raw path: bounded label
// values) and status class.
class HttpMetrics {
 public:
  void count(const std::string& method, const std::string& route, int status);
  void count_audit_failure();
  // A request refused by a rate limit (429), by limit name.
  void count_rate_limited(const std::string& limit);
  std::map<std::tuple<std::string, std::string, std::string>, uint64_t> snapshot() const;
  std::map<std::string, uint64_t> rate_limited() const;
  uint64_t audit_failures() const;
  void set_server_stats(const ServerStats* s) { server_.store(s); }
  const ServerStats* server_stats() const { return server_.load(); }

 private:
  mutable std::mutex mu_;
  std::map<std::tuple<std::string, std::string, std::string>, uint64_t> requests_;
  std::map<std::string, uint64_t> rate_limited_;
  uint64_t audit_failures_ = 0;
  std::atomic<const ServerStats*> server_{nullptr};
};

// Escapes a label value: backslash, double quote and newline.
std::string prom_escape(const std::string& v);

// This process, from /proc/self (Prometheus's standard process_* metrics).
// A value that cannot be read stays 0 (max_fds: -1 when unlimited).
struct ProcessStats {
  double cpu_seconds = 0;
  double resident_memory_bytes = 0;
  double virtual_memory_bytes = 0;
  double open_fds = 0;
  double max_fds = 0;
  double start_time_seconds = 0;
};
ProcessStats read_process_stats();
// The whole /metrics page.
std::string render_metrics(HubService& service, const HttpMetrics& http);

}  // namespace flotilla::hub

#pragma once
// Pieces of flotilla_sim shared between its source files.
#include <algorithm>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "flotilla/common/http_client.hpp"
#include "flotilla/common/result.hpp"
#include "flotilla/common/transport.hpp"
#include "flotilla/sim/fleet.hpp"

namespace flotilla::sim {

// The hub's REST API with a bearer token.
struct Rest {
  std::string url;
  std::string token;
  Result<http::Response> call(const std::string& method, const std::string& path, const std::string& body = "",
                              const std::string& content_type = "application/json") const;
  // Expects want_status and a JSON answer. A write goes through write().
  Result<nlohmann::json> call_json(const std::string& method, const std::string& path, const nlohmann::json& body,
                                   int want_status) const;
  // A control write, sent again while the hub refuses it for now (503: its
  // coordination store unreachable, an etcd leader election; 429), for up
  // to a minute, waiting Retry-After (else a second) each time. Such a 503
  // can also mean the hub could not learn whether the write was applied:
  // before each repeat, `taken` (when given) re-reads whether it was, and
  // what it returns stands for the write's answer. A write that is the same
  // when applied twice (a bundle, an artifact, a token) needs none.
  Result<http::Response> write(const std::string& method, const std::string& path, const std::string& body,
                               const std::string& content_type,
                               const std::function<std::optional<http::Response>()>& taken = {}) const;
  // want_status and a JSON body, from an answer.
  static Result<nlohmann::json> json_of(Result<http::Response> r, const std::string& what, int want_status);
};

struct ProcUsage {
  uint64_t rss_bytes = 0;
  // The part of rss_bytes backed by files (a mapped SQLite store, shared
  // libraries): the kernel's page cache, which it can drop.
  uint64_t rss_file_bytes = 0;
  double cpu_s = 0;  // user + system
};
// From /proc/<pid>/stat and /proc/<pid>/statm; nullopt when gone.
std::optional<ProcUsage> proc_usage(int pid);

// The in-flight window of each gateway session (ConnectOptions::max_inflight
// and max_pending). Paho C keeps one command queue for all the sessions of a
// process and scans it for every command it sends, so the process-wide total
// (sessions x window) is held near 20,000: 1,000 per session up to 20
// sessions, 100 per session for 200 (a 1M-device run).
inline int gateway_window(size_t sessions) {
  return static_cast<int>(std::clamp<size_t>(20'000 / std::max<size_t>(1, sessions), 16, 1000));
}

// Publishes, retrying for up to a second while the session's window is full
// (Transport::publish refuses then); false when it never got through.
bool publish_retrying(transport::Transport& t, const transport::Message& m);

Result<nlohmann::json> run_fleet(const SimOptions& opts, Rest rest);

}  // namespace flotilla::sim

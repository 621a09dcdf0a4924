#pragma once
// REST API v1 as a pure function Request -> Response, so tests call it
// without sockets; hub/src/http_server.cpp puts it on the network.
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "flotilla/hub/service.hpp"

namespace flotilla::hub {

struct HttpRequest {
  std::string method;
  std::string target;  // path and query
  std::map<std::string, std::string> headers;  // lower-case names
  std::string body;
  std::string body_file;  // a streamed upload (PUT /v1/artifacts/...), already on disk
  std::string peer;
  // Set by a listener that can hold a server-sent-events stream open (the
  // UI listener, hub/src/ui_server.cpp); GET /v1/events needs it.
  bool event_streams = false;
};

struct HttpResponse {
  int status = 200;
  std::string content_type = "application/json";
  std::string body;
  std::map<std::string, std::string> headers;
  // Streams file_length bytes of file_path from file_offset instead of body
  // (artifact downloads); no_body answers HEAD with the same headers.
  std::string file_path;
  uint64_t file_offset = 0;
  uint64_t file_length = 0;
  bool no_body = false;
  // Non-empty: the listener keeps the connection and streams this topic's
  // server-sent events ("fleet", "campaigns", "campaign:<id>", "device:<id>").
  std::string event_topic;
};

inline constexpr size_t kMaxJsonBody = 1u << 20;  // 1 MiB
inline constexpr size_t kMaxEnrollBody = 64u << 10;
inline constexpr size_t kMaxEnrollBatchBody = 1u << 20;  // 1,000 devices use about 250 KiB
inline constexpr size_t kMaxNoBody = 4u << 10;  // routes that take no body (a stray "{}" is fine)

// Rate limits of the API (every one a hub setting, docs/operations.md).
struct ApiLimits {
  // Enrollment requests per second (POST /v1/enroll and /v1/enroll/batch),
  // for all callers together and per enrollment token, each with a burst of
  // one second's worth. 0 = no limit. A refused request gets 429 with
  // Retry-After, is counted, and changes nothing.
  double enroll_per_s = 200;
  double enroll_per_token_per_s = 50;
};

// What the server may do with a request once its headers are in: answer
// `refusal` without reading the body, or read a body of at most `max_body`.
struct Admission {
  std::optional<HttpResponse> refusal;
  size_t max_body = kMaxNoBody;
};

// API token roles, in increasing power: a viewer reads; an operator also
// changes bundles, artifacts, campaigns, devices and enrollment tokens; an
// admin also manages API tokens and reads the audit log.
enum class Role { viewer = 0, operator_ = 1, admin = 2 };
std::string role_name(Role r);
std::optional<Role> parse_role(const std::string& s);

// Who is calling, from their bearer API token: one type for the hub's routes
// and the federation's (both authenticate with rest::authorize).
struct Caller {
  std::string token_id;
  std::string name;
  Role role = Role::viewer;
  std::string project;  // "*" = every project
  bool sees(const std::string& p) const { return project == "*" || project == p; }
};

// Times in API answers: RFC 3339 UTC to the second, "" for 0 (never, not
// yet). The hub's and the federation's answers use these two only.
std::string iso_ms(int64_t unix_ms);
std::string iso_s(int64_t unix_s);

class KeyedLimiter;

class Api {
 public:
  explicit Api(HubService& service, ApiLimits limits = {});
  ~Api();
  // Every mutating call (POST, PUT, PATCH, DELETE), refused or not, leaves
  // one audit row; every call counts in /metrics.
  HttpResponse handle(const HttpRequest& req);
  // Checks an upload's headers (token, role, name, space) before its body is read.
  std::optional<HttpResponse> precheck_upload(const HttpRequest& req);
  // Every other request, with its headers only (req.body is empty): finds
  // the route, authenticates and authorises it when it needs an API token,
  // and says how large a body the route takes. So an unauthenticated client
  // never makes the hub buffer a body. A refusal is audited here.
  Admission admit(const HttpRequest& req);
  // The HTTP server's connection counters, for /metrics (may stay unset).
  void set_server_stats(const ServerStats* stats);

  // Every (method, path pattern) the server answers, for docs and tests.
  std::vector<std::pair<std::string, std::string>> routes() const;

  // The JSON error body every failure uses: {"error":{"code":..,"message":..}}.
  static HttpResponse error(int status, const std::string& code, const std::string& message);

 private:
  HttpResponse dispatch(const HttpRequest& req, AuditRecord& audit, std::string& route);
  void finish(const HttpRequest& req, AuditRecord& audit, const std::string& route, int status);

  HttpResponse enroll(const HttpRequest& req, AuditRecord& audit, bool batch);
  HttpResponse renew(const HttpRequest& req, AuditRecord& audit);

  HubService& service_;
  std::unique_ptr<HttpMetrics> http_metrics_;
  std::unique_ptr<KeyedLimiter> enroll_limit_;  // per token, and for all
};

}  // namespace flotilla::hub

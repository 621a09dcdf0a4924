#pragma once
// A small synchronous HTTP/1.1 client on Boost.Beast, for the CLI and the
// agent's enrollment and artifact downloads. Every call has a deadline and a
// cap on the response body. https:// verifies the server's certificate chain
// and host name (TLS 1.2+).
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <optional>
#include <string>

#include "flotilla/common/result.hpp"

namespace flotilla::http {

struct Url {
  std::string scheme;  // http or https
  std::string host;
  std::string port;
  std::string target;  // path + query, starts with '/'
};
Result<Url> parse_url(const std::string& url);

struct Request {
  std::string method = "GET";
  std::string url;
  std::string body;
  std::map<std::string, std::string> headers;
  std::chrono::milliseconds timeout{10000};
  size_t max_response_bytes = 16u << 20;
  // https: PEM file of CAs that may sign the server's certificate; empty =
  // the system trust store. The certificate must also name the URL's host.
  std::string ca_file;
};

struct Response {
  int status = 0;
  std::string body;
  std::map<std::string, std::string> headers;  // lower-case names
};

// Network failures are retryable errors; any HTTP status is a Response.
Result<Response> send(const Request& req);

// The seconds of an answer's Retry-After: nullopt without the header; 1
// when it is not a count of seconds (RFC 9110 also allows a date, which
// this API never sends: taken as "come back soon").
std::optional<int64_t> retry_after_seconds(const Response& r);

// send(), repeated while the server says to come back: a 503 or 429 that
// carries Retry-After (seconds), to a request that is safe to repeat (GET or
// HEAD: a refused write may have been half done, and only its caller can
// re-read and decide). Each wait is Retry-After, at least 100 ms and at most
// max_wait, and the waits together stay within `budget`; `on_wait` hears of
// each one before it (what was answered, how long). Then the last answer is
// returned as it came. Anything else (another status, a network failure)
// is returned at once.
struct RetryPolicy {
  std::chrono::milliseconds budget{15000};
  std::chrono::milliseconds max_wait{5000};
  std::function<void(const Response&, std::chrono::milliseconds)> on_wait;
};
Result<Response> send_retrying(const Request& req, const RetryPolicy& policy);

// Streaming download to a file, for artifacts: the body goes to disk in
// 64 KiB pieces and never sits in memory whole. An existing file at `path`
// is resumed with a Range request (206 appends; 200 restarts from zero; 416
// means the file is already complete). A connection that drops mid-body is
// resumed up to max_attempts times.
struct DownloadOptions {
  std::chrono::milliseconds io_timeout{30000};  // per read, not the whole transfer
  // The whole transfer, resumes included; 0 = none. A server that sends one
  // byte just before each io_timeout would otherwise hold the caller forever.
  // Past it: Errc::timeout, and the partial file stays for a later resume.
  std::chrono::milliseconds deadline{0};
  uint64_t max_bytes = uint64_t{1} << 32;       // more than this in total: too_large
  int max_attempts = 5;
  std::map<std::string, std::string> headers;
  std::string ca_file;  // as in Request
};
struct DownloadResult {
  uint64_t size = 0;     // bytes in the file now
  int requests = 0;      // HTTP requests made (1 when nothing was resumed)
  uint64_t resumed_from = 0;  // offset of the first request
};
// HTTP errors: 404 is not_found, other statuses unavailable (5xx retryable).
Result<DownloadResult> download_to_file(const std::string& url, const std::filesystem::path& path,
                                        const DownloadOptions& opts = {});

}  // namespace flotilla::http

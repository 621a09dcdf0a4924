#pragma once
// A small synchronous HTTP/1.1 client on Boost.Beast, for the CLI and the
// agent's enrollment and artifact downloads. Every call has a deadline and a
// cap on the response body.
#include <chrono>
#include <map>
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
};

struct Response {
  int status = 0;
  std::string body;
  std::map<std::string, std::string> headers;  // lower-case names
};

// Network failures are retryable errors; any HTTP status is a Response.
Result<Response> send(const Request& req);

}  // namespace flotilla::http

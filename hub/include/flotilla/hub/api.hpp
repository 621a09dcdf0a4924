#pragma once
// REST API v1 as a pure function Request -> Response, so tests call it
// without sockets; hub/src/http_server.cpp puts it on the network.
#include <map>
#include <string>

#include "flotilla/hub/service.hpp"

namespace flotilla::hub {

struct HttpRequest {
  std::string method;
  std::string target;  // path and query
  std::map<std::string, std::string> headers;  // lower-case names
  std::string body;
  std::string peer;
};

struct HttpResponse {
  int status = 200;
  std::string content_type = "application/json";
  std::string body;
  std::map<std::string, std::string> headers;
};

inline constexpr size_t kMaxJsonBody = 1u << 20;  // 1 MiB

class Api {
 public:
  explicit Api(HubService& service) : service_(service) {}
  HttpResponse handle(const HttpRequest& req);

  // The JSON error body every failure uses: {"error":{"code":..,"message":..}}.
  static HttpResponse error(int status, const std::string& code, const std::string& message);

 private:
  HubService& service_;
};

}  // namespace flotilla::hub

#pragma once
// The dashboard's own listener (--ui-listen): the built frontend at /ui/
// (embedded in the binary, hashed asset names cached for a year, index.html
// never cached, a strict Content-Security-Policy), the API's reads and the
// campaign actions on the same origin, and the server-sent-events streams
// (GET /v1/events) the pages follow. docs/operations.md, "Dashboard";
// docs/adr/0011-dashboard-frontend.md.
#include <chrono>
#include <cstddef>
#include <memory>
#include <span>
#include <string>
#include <string_view>

#include "flotilla/common/result.hpp"
#include "flotilla/hub/api.hpp"

namespace flotilla::hub {

// One file of the built frontend (ui/dist), embedded by the build
// (cmake/embed_ui.cmake generates ui_assets.cpp).
struct UiAsset {
  std::string_view path;          // "index.html", "assets/index-1a2b3c4d.js"
  std::string_view content_type;
  std::string_view etag;          // "\"<sha256 prefix>\""
  const unsigned char* data = nullptr;
  size_t size = 0;
};
// Every embedded file; empty when the hub was built without npm.
std::span<const UiAsset> ui_assets();

struct UiServerConfig {
  std::string host = "127.0.0.1";
  int port = 0;  // 0 = any free port
  int threads = 1;
  // Both set: TLS 1.2+ only (the API's certificate and key).
  std::string tls_cert_file;
  std::string tls_key_file;
  int max_connections = 256;  // open connections, streams included
  int max_streams = 64;       // event streams open at once, for the whole hub
  // A stream sends at most one event per interval: what changed since the
  // last one, coalesced (only the newest state of its topic).
  std::chrono::milliseconds event_interval{1000};
  // How often a stream's token is checked again: a revoked or expired token
  // ends its streams within this time.
  std::chrono::milliseconds token_recheck{std::chrono::seconds(30)};
  std::chrono::milliseconds heartbeat{std::chrono::seconds(15)};
  std::chrono::seconds read_timeout{30};
  size_t max_body_bytes = 64 * 1024;  // the UI sends small JSON bodies only
};

// What one request to the UI listener gets, without sockets (unit tests):
// an asset, a redirect, an API answer through `api` (reads and campaign
// actions only), or a refusal. An event stream comes back with event_topic set.
HttpResponse ui_route(Api& api, const HttpRequest& req, bool tls);

class HubService;

class UiServer {
 public:
  static Result<std::unique_ptr<UiServer>> start(const UiServerConfig& cfg, Api& api, HubService& service);
  ~UiServer();
  int port() const { return port_; }
  size_t open_streams() const;
  void stop();

 private:
  UiServer() = default;
  struct Impl;
  std::unique_ptr<Impl> impl_;
  int port_ = 0;
};

}  // namespace flotilla::hub

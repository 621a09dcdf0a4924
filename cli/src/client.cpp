#include "client.hpp"

#include <charconv>
#include <cstdio>

#include "contexts.hpp"
#include "output.hpp"

#include "flotilla/common/fs.hpp"
#include "flotilla/common/http_client.hpp"

namespace flotilla::cli {

using nlohmann::json;

void add_hub_flags(Options& o) {
  o.add("context", "the CLI context to use (flotilla config get-contexts); default: the current one")
      .add("hub", "hub REST base URL (default: the context's, else http://127.0.0.1:8080)", "http://127.0.0.1:8080")
      .add("token", "API token (prefer the FLOTILLA_TOKEN variable: flags show up in ps)")
      .add("token-file", "file holding the API token (e.g. <hub data-dir>/admin.token)")
      .add("ca-file", "PEM CA certificate(s) to verify an https hub against (default: the system CA store)")
      .add("o", kOutputHelp, "table");
}

Result<Client> Client::from(const Options& o) {
    // Precedence: flags, then the environment (FLOTILLA_HUB, FLOTILLA_TOKEN,
    // FLOTILLA_TOKEN_FILE, FLOTILLA_CA_FILE), then the selected context, then
    // the built-in default. A token given by flag or environment (in either
    // form) wins over the context's token file.
    auto ctx = selected_context(o.get("context"));
    if (!ctx) return ctx.error();
    auto set = [&](const char* key) { return o.source(key) == "flag" || o.source(key) == "env"; };
    Client c;
    c.base = set("hub") || !*ctx || (*ctx)->hub.empty() ? o.get("hub") : (*ctx)->hub;
    while (!c.base.empty() && c.base.back() == '/') c.base.pop_back();
    c.token = o.get("token");
    c.ca_file = set("ca-file") || !*ctx ? o.get("ca-file") : (*ctx)->ca_file;
    std::string token_file = o.get("token-file");
    if (!set("token") && !set("token-file") && *ctx) token_file = (*ctx)->token_file;
    if (c.token.empty() && !token_file.empty()) {
      auto t = fs::read_file(token_file, 4096);
      if (!t) return t.error().with_context("token-file" + std::string(set("token-file") || !*ctx ? "" : " of context " + (*ctx)->name));
      c.token = *t;
      while (!c.token.empty() && (c.token.back() == '\n' || c.token.back() == ' ')) c.token.pop_back();
    }
    if (c.token.empty()) {
      return make_error(Errc::invalid_argument,
                        "no API token: set FLOTILLA_TOKEN, pass --token-file, or give the context one "
                        "(flotilla config set-context NAME --token-file FILE); the hub writes its first "
                        "admin token to <data-dir>/admin.token");
    }
    return c;
}

Result<json> Client::call(const std::string& method, const std::string& path, const std::string& body,
                          const std::string& content_type) const {
    http::Request r;
    r.method = method;
    r.url = base + path;
    r.body = body;
    r.headers["Authorization"] = "Bearer " + token;
    if (!body.empty()) r.headers["Content-Type"] = content_type;
    if (revision > 0) r.headers["X-Flotilla-Min-Revision"] = std::to_string(revision);
    r.timeout = timeout;
    r.ca_file = ca_file;
    // A read the hub asks to repeat (it has not applied a write this CLI
    // already saw, or it is busy) is repeated for a while, saying so.
    http::RetryPolicy retry;
    retry.on_wait = [&](const http::Response& busy, std::chrono::milliseconds wait) {
      json e = json::parse(busy.body, nullptr, false);
      const std::string why = e.is_object() && e.contains("error") && e["error"].is_object()
                                  ? e["error"].value("message", "")
                                  : "";
      std::fprintf(stderr, "hub answered %d%s%s; retrying in %.1fs\n", busy.status, why.empty() ? "" : ": ",
                   why.c_str(), static_cast<double>(wait.count()) / 1000.0);
    };
    auto resp = http::send_retrying(r, retry);
    if (!resp) return resp.error().with_context("cannot reach the hub at " + base);
    if (auto h = resp->headers.find("x-flotilla-revision"); h != resp->headers.end()) {
      int64_t seen = 0;
      const auto [end, ec] = std::from_chars(h->second.data(), h->second.data() + h->second.size(), seen);
      if (ec == std::errc() && end == h->second.data() + h->second.size() && seen > revision) revision = seen;
    }
    json j = json::parse(resp->body, nullptr, false);
    if (resp->status >= 300) {
      std::string msg = j.is_object() && j.contains("error") ? j["error"].value("message", resp->body) : resp->body;
      std::string code = j.is_object() && j.contains("error") ? j["error"].value("code", "") : "";
      return make_error(resp->status == 401 ? Errc::unauthenticated
                        : resp->status == 403 ? Errc::permission_denied
                        : resp->status == 404 ? Errc::not_found
                                              : Errc::invalid_argument,
                        "hub answered " + std::to_string(resp->status) + (code.empty() ? "" : " " + code) + ": " + msg);
    }
    if (j.is_discarded()) return make_error(Errc::parse, "hub answered with something that is not JSON");
    return j;
}


std::string pad(const std::string& s, size_t w) { return s.size() >= w ? s + " " : s + std::string(w - s.size(), ' '); }

std::string str(const json& j, const char* k) {
  if (!j.contains(k)) return "";
  if (j[k].is_string()) return j[k].get<std::string>();
  return j[k].dump();
}


}  // namespace flotilla::cli

// Bundles and artifacts.
#include "api_internal.hpp"
#include "flotilla/bundles/bundle.hpp"
#include "flotilla/common/fs.hpp"
#include "flotilla/hub/artifacts.hpp"

namespace flotilla::hub::rest {

namespace {

HttpResponse upload_bundle(HubService& s, Context& c) {
  if (c.req.body.size() > bundles::kMaxEnvelopeBytes) {
    return Api::error(413, "too_large", "bundle is larger than " + std::to_string(bundles::kMaxEnvelopeBytes) + " bytes");
  }
  // A bundle belongs to one project: the caller's, or for a caller of every
  // project the one named by ?project= (default "default").
  std::string project = c.caller.project;
  if (auto q = c.target.query.find("project"); q != c.target.query.end()) {
    if (auto ok = check_named_project(c.caller, q->second, false); !ok) return from_error(ok.error());
    project = q->second;
  }
  if (project == "*") project = "default";
  auto up = s.upload_bundle(c.req.body, project);
  if (!up) return from_error(up.error());
  c.audit_detail = "bundle " + up->first.id + " " + up->first.name + " v" + std::to_string(up->first.version);
  return json_response(up->second ? 201 : 200, bundle_json(up->first));
}

HttpResponse list_bundles(HubService& s, Context& c) {
  auto list = s.list_bundles(c.caller.project);
  if (!list) return from_error(list.error());
  json items = json::array();
  for (const auto& b : *list) items.push_back(bundle_json(b));
  return json_response(200, {{"items", items}});
}

HttpResponse get_bundle(HubService& s, Context& c) {
  auto b = s.get_bundle(c.params[0], c.caller.project);
  if (!b) return from_error(b.error());
  if (!*b) return Api::error(404, "not_found", "no bundle '" + c.params[0] + "'");
  return json_response(200, bundle_json(**b));
}

HttpResponse put_artifact(HubService& s, Context& c) {
  auto* store = s.artifacts();
  if (!store) return Api::error(503, "unavailable", "this hub stores no artifacts");
  if (c.req.body_file.empty()) {
    return Api::error(400, "invalid_argument", "send the artifact bytes as the body of PUT /v1/artifacts/<sha256>");
  }
  auto r = store->commit(c.req.body_file, c.params[0]);
  if (!r) return from_error(r.error());
  c.audit_detail = "artifact " + r->first.sha256 + " size=" + std::to_string(r->first.size);
  return json_response(r->second ? 201 : 200, {{"sha256", r->first.sha256}, {"size", r->first.size}});
}

}  // namespace

std::optional<HttpResponse> precheck_artifact_upload(HubService& s, const Target& t, const HttpRequest& req) {
  auto* store = s.artifacts();
  if (!store) return Api::error(503, "unavailable", "this hub stores no artifacts");
  if (t.parts.size() != 3 || !ArtifactStore::valid_name(t.parts[2])) {
    return Api::error(400, "invalid_argument", "artifact name must be a lower-case SHA-256 hex digest");
  }
  auto len = req.headers.find("content-length");
  if (len == req.headers.end()) return Api::error(411, "length_required", "send Content-Length with the artifact");
  uint64_t n = 0;
  try {
    n = std::stoull(len->second);
  } catch (const std::exception&) {
    return Api::error(400, "invalid_argument", "bad Content-Length");
  }
  auto free = fs::free_bytes(store->dir());
  // Keep a reserve so a large upload cannot fill the disk the store lives on.
  if (free && *free < n + (uint64_t{256} << 20)) {
    return Api::error(507, "insufficient_storage", "not enough space for an artifact of " + std::to_string(n) + " bytes");
  }
  return std::nullopt;
}

HttpResponse serve_artifact(HubService& s, const std::string& name, const HttpRequest& req) {
  auto* store = s.artifacts();
  if (!store) return Api::error(404, "not_found", "this hub stores no artifacts");
  if (!ArtifactStore::valid_name(name)) {
    return Api::error(400, "invalid_argument", "artifact name must be a lower-case SHA-256 hex digest");
  }
  auto info = store->stat(name);
  if (!info) return Api::error(404, "not_found", "no artifact " + name);
  HttpResponse r;
  r.content_type = "application/octet-stream";
  r.headers["Accept-Ranges"] = "bytes";
  r.headers["ETag"] = "\"" + name + "\"";
  r.file_path = store->path(name).string();
  r.no_body = req.method == "HEAD";
  r.file_length = info->size;
  auto range = req.headers.find("range");
  if (range != req.headers.end()) {
    auto rr = parse_byte_range(range->second, info->size);
    if (!rr) {
      HttpResponse bad = Api::error(416, "range_not_satisfiable", "range '" + range->second + "' is outside 0.." +
                                                                     std::to_string(info->size));
      bad.headers["Content-Range"] = "bytes */" + std::to_string(info->size);
      return bad;
    }
    r.status = 206;
    r.file_offset = rr->first;
    r.file_length = rr->second - rr->first + 1;
    r.headers["Content-Range"] = "bytes " + std::to_string(rr->first) + "-" + std::to_string(rr->second) + "/" +
                                 std::to_string(info->size);
  }
  return r;
}

void add_bundle_routes(std::vector<Route>& r) {
  r.push_back({"POST", "/v1/bundles", Role::operator_, {"project"}, upload_bundle});
  r.push_back({"GET", "/v1/bundles", Role::viewer, {}, list_bundles});
  r.push_back({"GET", "/v1/bundles/{id}", Role::viewer, {}, get_bundle});
  r.push_back({"PUT", "/v1/artifacts/{sha256}", Role::operator_, {}, put_artifact});
}

}  // namespace flotilla::hub::rest

// Declarative files over REST: POST /v1/apply (with dryRun, applyset and
// prune), GET /v1/objects, and the GitRepos Git sync follows.
#include "api_internal.hpp"
#include "flotilla/common/encoding.hpp"
#include "flotilla/common/fs.hpp"
#include "flotilla/hub/declarative.hpp"

namespace flotilla::hub::rest {

namespace {

bool query_flag(const Target& t, const std::string& key) {
  auto it = t.query.find(key);
  return it != t.query.end() && (it->second == "true" || it->second == "1" || it->second == "All");
}

// A path as the CLI sends it: relative to the apply's root, normalised.
Result<std::string> request_path(const json& item, const char* what, size_t i) {
  if (!item.is_object() || !item.contains("path") || !item["path"].is_string()) {
    return make_error(Errc::invalid_argument, std::string(what) + "[" + std::to_string(i) + "]: needs a path");
  }
  const std::string p = item["path"].get<std::string>();
  auto norm = fs::confined_path("", p);
  if (!norm || *norm != p || p.size() > 1024) {
    return make_error(Errc::invalid_argument, std::string(what) + "[" + std::to_string(i) + "]: '" + p +
                                                  "' must be a normalised relative path");
  }
  return p;
}

HttpResponse apply(HubService& s, Context& c) {
  if (c.req.body.size() > kMaxApplyBody) {
    return Api::error(413, "too_large", "apply request above " + std::to_string(kMaxApplyBody >> 20) + " MiB");
  }
  json body = json::parse(c.req.body, nullptr, false);
  if (body.is_discarded() || !body.is_object()) {
    return Api::error(400, "invalid_argument", "request body must be a JSON object {files, blobs}");
  }
  for (const auto& [k, v] : body.items()) {
    if (k != "files" && k != "blobs") return Api::error(400, "invalid_argument", "unknown field '" + k + "'");
  }
  if (!body.contains("files") || !body["files"].is_array()) {
    return Api::error(400, "invalid_argument", "'files' must be a list of {path, content}");
  }
  std::vector<SourceFile> files;
  for (size_t i = 0; i < body["files"].size(); ++i) {
    const json& f = body["files"][i];
    auto p = request_path(f, "files", i);
    if (!p) return from_error(p.error());
    if (!f.contains("content") || !f["content"].is_string()) {
      return Api::error(400, "invalid_argument", "files[" + std::to_string(i) + "]: needs a content string");
    }
    if (!p->ends_with(".yaml") && !p->ends_with(".yml") && !p->ends_with(".json")) {
      return Api::error(400, "invalid_argument", *p + ": only *.yaml, *.yml and *.json files are applied");
    }
    files.push_back({*p, f["content"].get<std::string>()});
  }
  std::map<std::string, std::string> blobs;
  if (body.contains("blobs")) {
    if (!body["blobs"].is_array() || body["blobs"].size() > kMaxApplyBlobs) {
      return Api::error(400, "invalid_argument", "'blobs' must be a list of at most " +
                                                     std::to_string(kMaxApplyBlobs) + " {path, base64}");
    }
    for (size_t i = 0; i < body["blobs"].size(); ++i) {
      const json& b = body["blobs"][i];
      auto p = request_path(b, "blobs", i);
      if (!p) return from_error(p.error());
      if (!b.contains("base64") || !b["base64"].is_string()) {
        return Api::error(400, "invalid_argument", "blobs[" + std::to_string(i) + "]: needs a base64 string");
      }
      auto bytes = from_base64(b["base64"].get<std::string>());
      if (!bytes) return Api::error(400, "invalid_argument", "blobs[" + std::to_string(i) + "]: not base64");
      blobs[*p] = to_string(*bytes);
    }
  }
  ApplyRequest req;
  req.dry_run = query_flag(c.target, "dryRun");
  req.prune = query_flag(c.target, "prune");
  if (auto it = c.target.query.find("applyset"); it != c.target.query.end()) req.apply_set = it->second;
  if (req.apply_set.rfind(kGitApplySetPrefix, 0) == 0) {
    return Api::error(400, "invalid_argument", "apply sets named " + std::string(kGitApplySetPrefix) +
                                                   "* belong to Git sync; choose another name");
  }
  auto docs = parse_documents(files, [&](const std::string& path) -> Result<std::string> {
    auto it = blobs.find(path);
    if (it == blobs.end()) return make_error(Errc::not_found, path + " was not sent with the request");
    return it->second;
  });
  if (!docs) return from_error(docs.error());
  req.documents = std::move(*docs);
  ApplyScope scope{c.caller.project, c.caller.role, c.caller.token_id, "your token"};
  auto out = s.apply(req, scope);
  std::string detail = std::string("apply") + (req.dry_run ? " (dry run)" : "") +
                       (req.apply_set.empty() ? "" : " applyset=" + req.apply_set) + (req.prune ? " prune" : "");
  if (!out) {
    c.audit_detail = detail;
    return from_error(out.error());
  }
  for (const auto& o : out->objects) {
    if (o.action == "unchanged") continue;
    if (detail.size() > 900) {
      detail += " ...";
      break;
    }
    detail += "; " + o.action + " " + kind_name(o.kind) + " " + o.project + "/" + o.name +
              (o.target.empty() ? "" : " (" + o.target + ")");
  }
  c.audit_detail = detail;
  return json_response(200, outcome_json(*out));
}

HttpResponse list_objects(HubService& s, Context& c) {
  auto it = c.target.query.find("applyset");
  auto list = s.list_applied(it == c.target.query.end() ? "" : it->second, it == c.target.query.end());
  if (!list) return from_error(list.error());
  json items = json::array();
  for (const auto& o : *list) {
    if (c.caller.sees(o.project)) items.push_back(applied_object_json(o));
  }
  return json_response(200, {{"items", items}});
}

// ---- GitRepos ---------------------------------------------------------------------

json gitrepo_json(const GitRepoRecord& r, bool enabled) {
  json applied = json::parse(r.applied.empty() ? "[]" : r.applied, nullptr, false);
  if (applied.is_discarded()) applied = json::array();
  std::string state = !enabled                ? "disabled"
                      : !r.error.empty()      ? "error"
                      : r.last_attempt_ms == 0 ? "pending"
                                              : "synced";
  return json{{"name", r.name},
              {"project", r.project},
              {"url", r.url},
              {"branch", r.branch},
              {"path", r.path},
              {"interval", std::to_string(r.interval_ms / 1000) + "s"},
              {"created_at", iso_ms(r.created_ms)},
              {"status",
               {{"state", state},
                {"commit", r.commit},
                {"attempted_commit", r.attempt_commit},
                {"last_attempt_at", iso_ms(r.last_attempt_ms)},
                {"last_attempt_ms", r.last_attempt_ms},
                {"last_success_at", iso_ms(r.last_success_ms)},
                {"error", r.error},
                {"applied", applied}}}};
}

Result<GitRepoRecord> visible_gitrepo(HubService& s, Context& c) {
  auto r = s.get_gitrepo(c.params[0]);
  if (!r) return r.error();
  if (!*r || !c.caller.sees((*r)->project)) return make_error(Errc::not_found, "no GitRepo '" + c.params[0] + "'");
  return **r;
}

HttpResponse create_gitrepo(HubService& s, Context& c) {
  auto j = parse_body(c.req, {"name", "project", "url", "branch", "path", "interval"});
  if (!j) return from_error(j.error());
  auto name = string_field(*j, "name", true);
  if (!name) return from_error(name.error());
  if (!valid_object_name(*name)) {
    return Api::error(400, "invalid_argument", "name '" + *name + "' must be at most 63 of a-z 0-9 and -, starting "
                                               "and ending with a letter or digit");
  }
  auto asked = string_field(*j, "project", false);
  if (!asked) return from_error(asked.error());
  const std::string project = asked->empty() ? (c.caller.project == "*" ? "default" : c.caller.project) : *asked;
  if (project == "*" || !valid_label_value(project)) {
    return Api::error(400, "invalid_argument", "bad project '" + project + "': a label value");
  }
  if (!c.caller.sees(project)) {
    return Api::error(403, "permission_denied",
                      "your token is for project " + c.caller.project + "; it cannot act for project " + project);
  }
  // The same checks as a GitRepo document's spec.
  json spec = *j;
  spec.erase("name");
  spec.erase("project");
  GitRepoSpec repo;
  if (auto st = parse_git_repo_spec(spec, repo); !st) return from_error(st.error());
  GitRepoRecord r;
  r.name = *name;
  r.project = project;
  r.url = repo.url;
  r.branch = repo.branch;
  r.path = repo.path;
  r.interval_ms = repo.interval.count();
  auto put = s.put_gitrepo(r, true);
  c.audit_detail = "gitrepo " + r.name + " url=" + r.url + " branch=" + r.branch;
  if (!put) return from_error(put.error());
  s.request_git_sync(r.name);
  return json_response(201, gitrepo_json(*put, s.git_sync_enabled()));
}

HttpResponse list_gitrepos(HubService& s, Context& c) {
  auto list = s.list_gitrepos();
  if (!list) return from_error(list.error());
  json items = json::array();
  for (const auto& r : *list) {
    if (c.caller.sees(r.project)) items.push_back(gitrepo_json(r, s.git_sync_enabled()));
  }
  return json_response(200, {{"items", items}});
}

HttpResponse get_gitrepo(HubService& s, Context& c) {
  auto r = visible_gitrepo(s, c);
  if (!r) return from_error(r.error());
  return json_response(200, gitrepo_json(*r, s.git_sync_enabled()));
}

HttpResponse delete_gitrepo(HubService& s, Context& c) {
  c.audit_detail = "delete gitrepo " + c.params[0];
  auto r = visible_gitrepo(s, c);
  if (!r) return from_error(r.error());
  if (auto d = s.delete_gitrepo(r->name); !d) return from_error(d.error());
  return json_response(200, gitrepo_json(*r, s.git_sync_enabled()));
}

HttpResponse sync_gitrepo(HubService& s, Context& c) {
  c.audit_detail = "sync gitrepo " + c.params[0];
  if (!c.req.body.empty()) {
    auto j = parse_body(c.req, {});
    if (!j) return from_error(j.error());
  }
  auto r = visible_gitrepo(s, c);
  if (!r) return from_error(r.error());
  if (!s.git_sync_enabled()) return Api::error(503, "unavailable", "Git sync is turned off on this hub (git-sync)");
  s.request_git_sync(r->name);
  HttpResponse resp = json_response(202, gitrepo_json(*r, true));
  return resp;
}

}  // namespace

void add_declarative_routes(std::vector<Route>& r) {
  r.push_back({"POST", "/v1/apply", Role::operator_, {"dryRun", "applyset", "prune"}, apply});
  r.push_back({"GET", "/v1/objects", Role::viewer, {"applyset"}, list_objects});
  r.push_back({"POST", "/v1/gitrepos", Role::admin, {}, create_gitrepo});
  r.push_back({"GET", "/v1/gitrepos", Role::viewer, {}, list_gitrepos});
  r.push_back({"GET", "/v1/gitrepos/{name}", Role::viewer, {}, get_gitrepo});
  r.push_back({"DELETE", "/v1/gitrepos/{name}", Role::admin, {}, delete_gitrepo});
  r.push_back({"POST", "/v1/gitrepos/{name}/sync", Role::operator_, {}, sync_gitrepo});
}

}  // namespace flotilla::hub::rest

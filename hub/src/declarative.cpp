// The declarative parser: YAML or JSON files to validated Documents. Pure:
// it reads nothing but what it is handed, so the REST apply, its dry run and
// Git sync judge a file the same way.
#include "flotilla/hub/declarative.hpp"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cmath>
#include <regex>
#include <set>

#include "flotilla/bundles/bundle.hpp"
#include "flotilla/common/crypto.hpp"
#include "flotilla/common/fs.hpp"
#include "flotilla/common/options.hpp"

namespace flotilla::hub {

using nlohmann::json;

std::string kind_name(Kind k) {
  switch (k) {
    case Kind::campaign: return "Campaign";
    case Kind::enrollment_token: return "EnrollmentToken";
    case Kind::api_token: return "ApiToken";
    case Kind::bundle_publication: return "BundlePublication";
    case Kind::git_repo: return "GitRepo";
  }
  return "Campaign";
}

std::optional<Kind> parse_kind(const std::string& s) {
  for (Kind k : kApplyOrder) {
    if (kind_name(k) == s) return k;
  }
  return std::nullopt;
}

Role role_for(Kind k) {
  // API tokens grant access, and a GitRepo makes the hub read any repository
  // it can reach (local paths included): both are an admin's.
  return k == Kind::api_token || k == Kind::git_repo ? Role::admin : Role::operator_;
}

std::string declared_campaign_id(const std::string& project, const std::string& name, int run) {
  return "c-" + crypto::sha256_hex(std::string(kApiVersion) + "/Campaign/" + project + "/" + name + "/" +
                                   std::to_string(run))
                    .substr(0, 12);
}

size_t ApplyOutcome::changed() const {
  return static_cast<size_t>(
      std::count_if(objects.begin(), objects.end(), [](const ObjectOutcome& o) { return o.action != "unchanged"; }));
}

bool valid_object_name(const std::string& n) {
  static const std::regex re("[a-z0-9]([-a-z0-9]*[a-z0-9])?");
  return !n.empty() && n.size() <= 63 && std::regex_match(n, re);
}

// ---- YAML to JSON ---------------------------------------------------------------

namespace {

struct Converter {
  size_t nodes = 0;

  Result<json> scalar(const YAML::Node& n) {
    const std::string s = n.Scalar();
    // Quoted, or tagged as a string: a string, whatever it looks like.
    if (n.Tag() == "!" || n.Tag() == "tag:yaml.org,2002:str") return json(s);
    // YAML 1.2 core schema for plain scalars.
    if (s.empty() || s == "~" || s == "null" || s == "Null" || s == "NULL") return json(nullptr);
    if (s == "true" || s == "True" || s == "TRUE") return json(true);
    if (s == "false" || s == "False" || s == "FALSE") return json(false);
    static const std::regex int_re("[-+]?[0-9]+");
    static const std::regex float_re("[-+]?(\\.[0-9]+|[0-9]+(\\.[0-9]*)?)([eE][-+]?[0-9]+)?");
    if (std::regex_match(s, int_re)) {
      try {
        return json(static_cast<int64_t>(std::stoll(s)));
      } catch (const std::exception&) {
        return make_error(Errc::invalid_argument, "number '" + s + "' is out of range");
      }
    }
    if (std::regex_match(s, float_re)) {
      const double d = std::strtod(s.c_str(), nullptr);
      if (!std::isfinite(d)) return make_error(Errc::invalid_argument, "number '" + s + "' is out of range");
      return json(d);
    }
    return json(s);
  }

  Result<json> convert(const YAML::Node& n, int depth) {
    if (++nodes > kMaxDocumentNodes) {
      return make_error(Errc::too_large, "more than " + std::to_string(kMaxDocumentNodes) +
                                             " values (aliases count each time they are used)");
    }
    if (depth > kMaxDocumentDepth) {
      return make_error(Errc::too_large, "nested deeper than " + std::to_string(kMaxDocumentDepth) + " levels");
    }
    switch (n.Type()) {
      case YAML::NodeType::Null:
      case YAML::NodeType::Undefined: return json(nullptr);
      case YAML::NodeType::Scalar: return scalar(n);
      case YAML::NodeType::Sequence: {
        json a = json::array();
        for (const auto& v : n) {
          auto c = convert(v, depth + 1);
          if (!c) return c;
          a.push_back(std::move(*c));
        }
        return a;
      }
      case YAML::NodeType::Map: {
        json o = json::object();
        for (const auto& kv : n) {
          if (!kv.first.IsScalar()) return make_error(Errc::invalid_argument, "a mapping key must be a plain value");
          const std::string key = kv.first.Scalar();
          if (o.contains(key)) return make_error(Errc::invalid_argument, "key '" + key + "' appears twice");
          auto c = convert(kv.second, depth + 1);
          if (!c) return c;
          o[key] = std::move(*c);
        }
        return o;
      }
    }
    return json(nullptr);
  }
};

}  // namespace

Result<std::vector<json>> yaml_documents(const std::string& text) {
  std::vector<YAML::Node> nodes;
  try {
    nodes = YAML::LoadAll(text);
  } catch (const YAML::Exception& e) {
    // e.mark is 0-based; editors count from 1.
    return make_error(Errc::invalid_argument, "line " + std::to_string(e.mark.line + 1) + ", column " +
                                                  std::to_string(e.mark.column + 1) + ": " + e.msg);
  }
  std::vector<json> out;
  for (size_t i = 0; i < nodes.size(); ++i) {
    Converter conv;
    auto j = conv.convert(nodes[i], 0);
    if (!j) return j.error().with_context("doc " + std::to_string(i + 1));
    out.push_back(std::move(*j));
  }
  return out;
}

// ---- documents --------------------------------------------------------------------

namespace {

// Errors gathered while parsing, each already prefixed with where it is.
struct Errors {
  std::vector<std::string> list;
  size_t total = 0;
  void add(const std::string& m) {
    ++total;
    if (list.size() < kMaxReportedErrors) list.push_back(m);
  }
  Error error() const {
    std::string msg = list.size() == 1 ? list.front() : std::to_string(total) + " problems in the files:";
    if (list.size() > 1) {
      for (const auto& m : list) msg += "\n  " + m;
      if (total > list.size()) msg += "\n  ... and " + std::to_string(total - list.size()) + " more";
    }
    return make_error(Errc::invalid_argument, msg);
  }
};

// A field of one document that failed; `field` is its path ("spec.ttl").
Error field_error(const std::string& field, const std::string& why) {
  return make_error(Errc::invalid_argument, field + ": " + why);
}

bool valid_name(const std::string& n) { return valid_object_name(n); }

Status only_fields(const json& j, const std::string& where, const std::set<std::string>& allowed) {
  for (const auto& [k, v] : j.items()) {
    if (!allowed.count(k)) {
      std::string list;
      for (const auto& a : allowed) list += (list.empty() ? "" : ", ") + a;
      return field_error(where.empty() ? k : where + "." + k, "unknown field (allowed: " + list + ")");
    }
  }
  return {};
}

Result<std::string> string_at(const json& j, const std::string& key, const std::string& where, bool required,
                              const std::string& def = "") {
  if (!j.contains(key) || j[key].is_null()) {
    if (required) return field_error(where + key, "is required");
    return def;
  }
  if (!j[key].is_string()) return field_error(where + key, "must be a string");
  return j[key].get<std::string>();
}

Result<Labels> labels_at(const json& j, const std::string& key, const std::string& where, bool reserve_applyset) {
  Labels out;
  if (!j.contains(key) || j[key].is_null()) return out;
  if (!j[key].is_object()) return field_error(where + key, "a mapping of label keys to values");
  if (j[key].size() > 64) return field_error(where + key, "at most 64 labels");
  for (const auto& [k, v] : j[key].items()) {
    if (!valid_label_key(k)) return field_error(where + key + "." + k, "not a valid label key");
    if (reserve_applyset && k.rfind("applyset.flotilla.dev/", 0) == 0) {
      return field_error(where + key + "." + k, "reserved: the hub sets it from --applyset");
    }
    if (!v.is_string() || !valid_label_value(v.get<std::string>())) {
      return field_error(where + key + "." + k, "a label value (at most 63 of A-Z a-z 0-9 - _ .) in quotes if it "
                                                "looks like a number");
    }
    out[k] = v.get<std::string>();
  }
  return out;
}

Result<std::chrono::milliseconds> duration_at(const json& j, const std::string& key, const std::string& where,
                                              const std::string& def, std::chrono::milliseconds min,
                                              std::chrono::milliseconds max) {
  std::string text = def;
  if (j.contains(key) && !j[key].is_null()) {
    if (!j[key].is_string()) return field_error(where + key, "a duration like \"90s\", \"12h\" or \"30d\"");
    text = j[key].get<std::string>();
  }
  if (text.empty()) return std::chrono::milliseconds(0);
  auto d = parse_duration(text);
  if (!d) return field_error(where + key, d.error().message);
  if (*d < min || *d > max) {
    return field_error(where + key, "must be between " + std::to_string(min.count() / 1000) + "s and " +
                                        std::to_string(max.count() / 1000) + "s");
  }
  return *d;
}

bool valid_branch(const std::string& b) {
  if (b.empty() || b.size() > 255 || b.front() == '-' || b.front() == '/' || b.back() == '/' || b.back() == '.') {
    return false;
  }
  if (b.find("..") != std::string::npos || b.find("//") != std::string::npos || b.find("@{") != std::string::npos ||
      b.ends_with(".lock")) {
    return false;
  }
  return std::all_of(b.begin(), b.end(), [](char c) {
    return static_cast<unsigned char>(c) > 0x20 && c != 0x7f && c != '~' && c != '^' && c != ':' && c != '?' &&
           c != '*' && c != '[' && c != '\\';
  });
}

}  // namespace

Status parse_git_repo_spec(const json& spec, GitRepoSpec& r) {
  if (auto s = only_fields(spec, "spec", {"url", "branch", "path", "interval"}); !s) return s;
  auto url = string_at(spec, "url", "spec.", true);
  if (!url) return url.error();
  r.url = *url;
  const bool local = r.url.rfind("/", 0) == 0 || r.url.rfind("file://", 0) == 0;
  const bool remote = r.url.rfind("https://", 0) == 0 || r.url.rfind("http://", 0) == 0;
  if (!local && !remote) {
    return field_error("spec.url", "an absolute path, file://, https:// or http:// URL (got '" + r.url + "')");
  }
  if (r.url.size() > 1024) return field_error("spec.url", "longer than 1024 characters");
  if (remote) {
    // Credentials in a URL would be shown to everyone who may read the GitRepo.
    const auto host_start = r.url.find("://") + 3;
    const auto host_end = r.url.find('/', host_start);
    if (r.url.substr(host_start, host_end - host_start).find('@') != std::string::npos) {
      return field_error("spec.url", "credentials in the URL are not supported (every viewer could read them)");
    }
  }
  auto branch = string_at(spec, "branch", "spec.", false, "main");
  if (!branch) return branch.error();
  if (!valid_branch(*branch)) return field_error("spec.branch", "'" + *branch + "' is not a valid branch name");
  r.branch = *branch;
  auto path = string_at(spec, "path", "spec.", false, "");
  if (!path) return path.error();
  if (!path->empty() && *path != "." && *path != "/") {
    auto p = fs::confined_path("", *path);
    if (!p || path->front() == '/') return field_error("spec.path", "a directory inside the repository, like clusters/prod");
    r.path = *p;
  }
  auto interval = duration_at(spec, "interval", "spec.", "1m", std::chrono::seconds(1), std::chrono::hours(24));
  if (!interval) return interval.error();
  r.interval = *interval;
  return {};
}

namespace {

// The document's spec, checked for its kind. dir is the directory of the
// file it came from, for the paths it names.
Status parse_spec(Document& d, const std::string& dir, const BlobReader& read_blob) {
  const json& spec = d.spec;
  switch (d.kind) {
    case Kind::campaign: {
      if (auto s = only_fields(spec, "spec", {"bundle", "selector", "strategy", "paused"}); !s) return s;
      auto bundle = string_at(spec, "bundle", "spec.", true);
      if (!bundle) return bundle.error();
      if (bundle->empty()) return field_error("spec.bundle", "a bundle id, or name:version");
      d.bundle = *bundle;
      auto selector = string_at(spec, "selector", "spec.", false, "");
      if (!selector) return selector.error();
      auto sel = Selector::parse(*selector);
      if (!sel) return field_error("spec.selector", sel.error().message);
      d.selector = sel->text();
      // The strategy object is Strategy::from_json's to judge, whole: what it
      // accepts (and every field added to it) is accepted here unchanged.
      auto st = Strategy::from_json(spec.contains("strategy") ? spec["strategy"] : json());
      if (!st) return make_error(Errc::invalid_argument, "spec." + st.error().message);
      d.strategy = *st;
      if (spec.contains("paused") && !spec["paused"].is_null()) {
        if (!spec["paused"].is_boolean()) return field_error("spec.paused", "true or false");
        d.paused = spec["paused"].get<bool>();
      }
      return {};
    }
    case Kind::enrollment_token: {
      if (auto s = only_fields(spec, "spec", {"labels", "max_uses", "ttl"}); !s) return s;
      auto labels = labels_at(spec, "labels", "spec.", false);
      if (!labels) return labels.error();
      d.token_labels = *labels;
      if (spec.contains("max_uses") && !spec["max_uses"].is_null()) {
        if (!spec["max_uses"].is_number_integer() || spec["max_uses"].get<int64_t>() < 0) {
          return field_error("spec.max_uses", "a whole number >= 0 (0 = unlimited)");
        }
        d.max_uses = spec["max_uses"].get<int64_t>();
      }
      auto ttl = duration_at(spec, "ttl", "spec.", "24h", std::chrono::seconds(1), std::chrono::hours(24 * 3650));
      if (!ttl) return ttl.error();
      d.ttl = *ttl;
      return {};
    }
    case Kind::api_token: {
      if (auto s = only_fields(spec, "spec", {"role", "ttl"}); !s) return s;
      auto role = string_at(spec, "role", "spec.", true);
      if (!role) return role.error();
      if (!parse_role(*role)) return field_error("spec.role", "viewer, operator or admin");
      d.role = *role;
      auto ttl = duration_at(spec, "ttl", "spec.", "", std::chrono::seconds(1), std::chrono::hours(24 * 3650));
      if (!ttl) return ttl.error();
      d.ttl = *ttl;
      return {};
    }
    case Kind::bundle_publication: {
      if (auto s = only_fields(spec, "spec", {"file"}); !s) return s;
      auto file = string_at(spec, "file", "spec.", true);
      if (!file) return file.error();
      auto path = fs::confined_path(dir, *file);
      if (!path) {
        return field_error("spec.file", "'" + *file + "' must be a relative path that stays inside the directory "
                                        "being applied (no absolute paths, no climbing out with ..)");
      }
      d.file = *path;
      auto bytes = read_blob(*path);
      if (!bytes) return field_error("spec.file", bytes.error().message);
      if (bytes->size() > bundles::kMaxEnvelopeBytes) {
        return field_error("spec.file", *path + " is larger than a bundle may be");
      }
      auto env = bundles::parse_envelope(*bytes);
      if (!env) return field_error("spec.file", *path + " is not a bundle: " + env.error().message);
      if (env->signatures_size() == 0) {
        return field_error("spec.file", *path + " is not signed; sign it with 'flotilla bundle sign' first");
      }
      d.bundle_bytes = std::move(*bytes);
      return {};
    }
    case Kind::git_repo: return parse_git_repo_spec(spec, d.repo);
  }
  return {};
}

Status parse_document(Document& d, const json& j, const std::string& dir, const BlobReader& read_blob,
                      const ParseOptions& opts) {
  if (!j.is_object()) return make_error(Errc::invalid_argument, "a document must be a mapping (apiVersion, kind, "
                                                                "metadata, spec)");
  if (auto s = only_fields(j, "", {"apiVersion", "kind", "metadata", "spec"}); !s) return s;
  auto api_version = string_at(j, "apiVersion", "", true);
  if (!api_version) return api_version.error();
  if (*api_version != kApiVersion) return field_error("apiVersion", "must be " + std::string(kApiVersion));
  auto kind = string_at(j, "kind", "", true);
  if (!kind) return kind.error();
  auto k = parse_kind(*kind);
  if (!k) {
    return field_error("kind", "unknown kind '" + *kind +
                                   "' (Campaign, EnrollmentToken, ApiToken, BundlePublication, GitRepo)");
  }
  d.kind = *k;
  if (d.kind == Kind::git_repo && !opts.allow_git_repo) {
    return field_error("kind", "a Git-synced repository cannot declare a GitRepo");
  }
  if (!j.contains("metadata") || !j["metadata"].is_object()) return field_error("metadata", "a mapping with a name");
  const json& meta = j["metadata"];
  if (auto s = only_fields(meta, "metadata", {"name", "project", "labels"}); !s) return s;
  auto name = string_at(meta, "name", "metadata.", true);
  if (!name) return name.error();
  if (!valid_name(*name)) {
    return field_error("metadata.name", "'" + *name + "' must be at most 63 of a-z 0-9 and -, starting and ending "
                                        "with a letter or digit");
  }
  d.name = *name;
  auto project = string_at(meta, "project", "metadata.", false, "");
  if (!project) return project.error();
  if (!project->empty() && !(*project == "*" && d.kind == Kind::api_token) &&
      !valid_label_value(*project)) {
    return field_error("metadata.project", "'" + *project + "' is not a project name" +
                                               (d.kind == Kind::api_token ? " (or \"*\" for every project)" : ""));
  }
  d.project = *project;
  auto labels = labels_at(meta, "labels", "metadata.", true);
  if (!labels) return labels.error();
  d.labels = *labels;
  if (!j.contains("spec") || !j["spec"].is_object()) return field_error("spec", "a mapping (the object's settings)");
  d.spec = j["spec"];
  return parse_spec(d, dir, read_blob);
}

std::string dir_of(const std::string& path) {
  const auto slash = path.rfind('/');
  return slash == std::string::npos ? std::string() : path.substr(0, slash);
}

bool is_json_file(const std::string& path) { return path.ends_with(".json"); }

}  // namespace

Result<std::vector<Document>> parse_documents(const std::vector<SourceFile>& files, const BlobReader& read_blob,
                                              const ParseOptions& opts) {
  if (files.empty()) return make_error(Errc::invalid_argument, "no files to apply (*.yaml, *.yml or *.json)");
  if (files.size() > kMaxApplyFiles) {
    return make_error(Errc::too_large, std::to_string(files.size()) + " files; at most " +
                                           std::to_string(kMaxApplyFiles) + " in one apply");
  }
  Errors errors;
  std::vector<Document> out;
  size_t total_docs = 0;
  for (const auto& f : files) {
    if (f.content.size() > kMaxApplyFileBytes) {
      errors.add(f.path + ": larger than " + std::to_string(kMaxApplyFileBytes / 1024) + " KiB");
      continue;
    }
    std::vector<json> docs;
    if (is_json_file(f.path)) {
      // One object, or a list of them.
      json j = json::parse(f.content, nullptr, false);
      if (j.is_discarded()) {
        errors.add(f.path + ": not valid JSON");
        continue;
      }
      if (j.is_array()) {
        for (auto& e : j) docs.push_back(std::move(e));
      } else {
        docs.push_back(std::move(j));
      }
    } else {
      auto y = yaml_documents(f.content);
      if (!y) {
        errors.add(f.path + ": " + y.error().message);
        continue;
      }
      docs = std::move(*y);
    }
    for (size_t i = 0; i < docs.size(); ++i) {
      // An empty document (a stray '---', a comment-only file) declares nothing.
      if (docs[i].is_null()) continue;
      if (++total_docs > kMaxApplyDocuments) {
        return make_error(Errc::too_large, "more than " + std::to_string(kMaxApplyDocuments) +
                                               " documents in one apply");
      }
      Document d;
      d.source = f.path + " doc " + std::to_string(i + 1);
      if (auto s = parse_document(d, docs[i], dir_of(f.path), read_blob, opts); !s) {
        errors.add(d.source + ": " + s.error().message);
        continue;
      }
      out.push_back(std::move(d));
    }
  }
  if (errors.total > 0) return errors.error();
  if (out.empty()) return make_error(Errc::invalid_argument, "the files declare no objects");
  return out;
}

}  // namespace flotilla::hub

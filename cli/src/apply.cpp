// flotilla apply / diff / objects: declarative files. The CLI only gathers
// them: the files, raw, with their paths and the bytes of the .fbundle files
// they name, go in one request (POST /v1/apply); the hub parses, validates
// and applies them all or nothing (docs/adr/0008-declarative-apply.md).
#include <unistd.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <filesystem>
#include <iostream>
#include <iterator>
#include <set>

#include "cli.hpp"
#include "client.hpp"
#include "flotilla/bundles/bundle.hpp"
#include "flotilla/common/encoding.hpp"
#include "flotilla/common/fs.hpp"
#include "output.hpp"
#include "status.hpp"

namespace flotilla::cli {

using nlohmann::json;
namespace stdfs = std::filesystem;

namespace {

constexpr size_t kMaxFileBytes = 1u << 20;   // the hub's per-file bound
constexpr size_t kMaxFiles = 500;
constexpr size_t kMaxRequestBytes = 8u << 20;  // the hub's body bound

bool doc_file(const std::string& name) {
  return name.ends_with(".yaml") || name.ends_with(".yml") || name.ends_with(".json");
}

std::string dir_of(const std::string& rel) {
  const auto slash = rel.rfind('/');
  return slash == std::string::npos ? std::string() : rel.substr(0, slash);
}

// The BundlePublication documents' spec.file values in one file. Only a
// finder: whatever does not parse here is left for the hub to report.
std::vector<std::pair<std::string, std::string>> bundle_refs(const std::string& content) {
  std::vector<std::pair<std::string, std::string>> out;  // (document name, file)
  std::vector<YAML::Node> docs;
  try {
    docs = YAML::LoadAll(content);
  } catch (const YAML::Exception&) {
    return out;
  }
  std::vector<YAML::Node> flat;
  for (const auto& d : docs) {
    if (d.IsSequence()) {
      for (const auto& e : d) flat.push_back(e);
    } else {
      flat.push_back(d);
    }
  }
  for (const auto& d : flat) {
    try {
      if (!d.IsMap() || !d["kind"] || d["kind"].Scalar() != "BundlePublication") continue;
      const YAML::Node spec = d["spec"];
      if (!spec || !spec.IsMap() || !spec["file"] || !spec["file"].IsScalar()) continue;
      const std::string name = d["metadata"] && d["metadata"]["name"] ? d["metadata"]["name"].Scalar() : "";
      out.emplace_back(name, spec["file"].Scalar());
    } catch (const YAML::Exception&) {
    }
  }
  return out;
}

// The request body for -f: a file, a directory (recursively; hidden
// directories such as .git are skipped) or - for stdin.
Result<json> gather(const std::string& f) {
  stdfs::path root;
  std::vector<std::pair<std::string, stdfs::path>> found;  // relative path, where it is
  json files = json::array();
  std::error_code ec;
  if (f == "-") {
    root = stdfs::current_path();
    std::string content((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>());
    if (content.size() > kMaxFileBytes) {
      return make_error(Errc::too_large, "stdin is larger than " + std::to_string(kMaxFileBytes / 1024) + " KiB");
    }
    files.push_back({{"path", "stdin.yaml"}, {"content", content}});
  } else if (stdfs::is_directory(f, ec)) {
    root = f;
    for (auto it = stdfs::recursive_directory_iterator(root, ec); !ec && it != stdfs::recursive_directory_iterator();
         it.increment(ec)) {
      const std::string name = it->path().filename().string();
      if (it->is_directory() && name.front() == '.') {
        it.disable_recursion_pending();
        continue;
      }
      if (!it->is_regular_file() || !doc_file(name)) continue;
      found.emplace_back(stdfs::relative(it->path(), root).generic_string(), it->path());
      if (found.size() > kMaxFiles) {
        return make_error(Errc::too_large, f + " holds more than " + std::to_string(kMaxFiles) + " files to apply");
      }
    }
    if (ec) return make_error(Errc::io, "read " + f + ": " + ec.message());
    if (found.empty()) return make_error(Errc::invalid_argument, f + " holds no *.yaml, *.yml or *.json files");
  } else if (stdfs::is_regular_file(f, ec)) {
    root = stdfs::path(f).parent_path();
    if (root.empty()) root = ".";
    found.emplace_back(stdfs::path(f).filename().string(), f);
  } else {
    return make_error(Errc::not_found, "-f " + f + ": no such file or directory");
  }
  std::sort(found.begin(), found.end());
  for (const auto& [rel, path] : found) {
    auto content = fs::read_file(path, kMaxFileBytes);
    if (!content) return content.error();
    files.push_back({{"path", rel}, {"content", *content}});
  }
  json blobs = json::array();
  std::set<std::string> sent;
  size_t total = 0;
  for (const auto& file : files) {
    const std::string rel = file["path"];
    total += file["content"].get_ref<const std::string&>().size();
    for (const auto& [name, ref] : bundle_refs(file["content"])) {
      auto p = fs::confined_path(dir_of(rel), ref);
      if (!p || !sent.insert(*p).second) continue;  // the hub explains a path that leaves the root
      auto bytes = fs::read_file(root / *p, bundles::kMaxEnvelopeBytes);
      if (!bytes) {
        return make_error(Errc::invalid_argument, rel + ": BundlePublication " + name + ": spec.file: cannot read " +
                                                      *p + ": " + bytes.error().message);
      }
      total += bytes->size() * 4 / 3;
      blobs.push_back({{"path", *p}, {"base64", to_base64(to_bytes(*bytes))}});
    }
  }
  if (total > kMaxRequestBytes) {
    return make_error(Errc::too_large, "the files and the bundles they name come to " + std::to_string(total >> 20) +
                                           " MiB; one apply carries at most " + std::to_string(kMaxRequestBytes >> 20) +
                                           " MiB (apply the bundle publications separately)");
  }
  return json{{"files", files}, {"blobs", blobs}};
}

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return s;
}

std::string waves_text(const json& o) {
  if (!o.contains("waves")) return "";
  std::string s = std::to_string(o.value("devices", int64_t{0})) + " devices:";
  bool first = true;
  for (const auto& w : o["waves"]) {
    s += (first ? " " : ", ") + str(w, "name") + " " + std::to_string(w.value("devices", int64_t{0}));
    first = false;
  }
  return s;
}

std::string query(const Options& o, bool dry_run) {
  std::string q = dry_run ? "?dryRun=true" : "?dryRun=false";
  if (!o.get("applyset").empty()) q += "&applyset=" + o.get("applyset");
  if (o.get_bool("prune")) q += "&prune=true";
  return q;
}

Status check_set_flags(const Options& o) {
  if (o.get_bool("prune") && o.get("applyset").empty()) {
    return make_error(Errc::invalid_argument, "--prune needs --applyset NAME: only objects applied with the same set "
                                              "are ever pruned");
  }
  for (char ch : o.get("applyset")) {
    if (!std::isalnum(static_cast<unsigned char>(ch)) && ch != '-' && ch != '_' && ch != '.') {
      return make_error(Errc::invalid_argument, "--applyset: at most 63 of A-Z a-z 0-9 - _ .");
    }
  }
  return {};
}

void print_outcome(const Options& o, const json& r) {
  const bool dry = r.value("dry_run", false);
  if (wide(o)) {
    Table t({"KIND", "NAME", "PROJECT", "ACTION", "GENERATION", "ID", "SOURCE", "DETAIL"});
    for (const auto& x : r["objects"]) {
      std::string detail = str(x, "detail");
      if (const auto w = waves_text(x); !w.empty()) detail += (detail.empty() ? "" : "; ") + w;
      t.add({str(x, "kind"), str(x, "name"), str(x, "project"), str(x, "action") + (dry ? " (dry run)" : ""),
             str(x, "generation"), str(x, "id").empty() ? "-" : str(x, "id"), str(x, "source"),
             detail.empty() ? "-" : detail});
    }
    t.print(std::cout);
  } else {
    for (const auto& x : r["objects"]) {
      std::string line = lower(str(x, "kind")) + "/" + str(x, "name") + " " + str(x, "action");
      if (dry) line += " (server dry run)";
      std::vector<std::string> notes;
      if (!str(x, "id").empty() && str(x, "action") != "unchanged") notes.push_back(str(x, "id"));
      if (!str(x, "detail").empty()) notes.push_back(str(x, "detail"));
      if (const auto w = waves_text(x); !w.empty()) notes.push_back(w);
      if (!notes.empty()) {
        line += ": ";
        for (size_t i = 0; i < notes.size(); ++i) line += (i ? "; " : "") + notes[i];
      }
      std::cout << line << "\n";
    }
  }
  bool header = false;
  for (const auto& x : r["objects"]) {
    if (str(x, "secret").empty()) continue;
    if (!header) {
      std::cout << "\nsecrets of the new tokens (shown once; the hub keeps only their hash):\n";
      header = true;
    }
    std::cout << "  " << lower(str(x, "kind")) << "/" << str(x, "name") << "  " << str(x, "secret") << "\n";
  }
}

int apply(int argc, char** argv) {
  Options o("flotilla apply",
            "Usage: flotilla apply -f FILE|DIR|- [--dry-run=server] [--applyset NAME [--prune]] [--wait]\n\n"
            "Creates or updates, by name, the objects the files declare: Campaign, EnrollmentToken,\n"
            "ApiToken, BundlePublication and GitRepo (apiVersion flotilla.dev/v1; YAML or JSON, one or\n"
            "many documents per file; a directory is read recursively). The hub checks every document\n"
            "first and applies all of them or none: an error names the file, the document and the field.\n"
            "--dry-run=server shows what would happen (devices per wave included) and changes nothing.\n"
            "--applyset labels every object with the set; --prune also removes the set's objects the\n"
            "files no longer declare (a campaign is aborted, a token revoked). A new token's secret is\n"
            "printed once. --wait then follows the campaigns until they finish.",
            "FLOTILLA_");
  add_hub_flags(o);
  o.add("f", "file, directory or - (stdin) to apply")
      .add("dry-run", "none, or server: the hub answers what would happen and keeps nothing", "none")
      .add("applyset", "the apply set the objects belong to (needed by --prune)")
      .add_switch("prune", "remove the set's objects that the files no longer declare")
      .add_switch("wait", "follow the applied campaigns until they finish (status block)")
      .add("timeout", "with --wait: give up after this long", "30m")
      .add("interval", "with --wait: poll interval", "1s");
  std::vector<std::string> pos;
  if (int rc = parse_args(o, argc, argv, pos, 0, 0, 1); rc >= 0) return rc;
  if (o.get("f").empty()) return fail("-f FILE|DIR|- is required", 2);
  const std::string dry = o.get("dry-run");
  if (dry != "none" && dry != "server") {
    return fail("--dry-run: '" + dry + "' is not none or server (the files are only understood by the hub: a client "
                "dry run would guess)", 2);
  }
  if (auto s = check_set_flags(o); !s) return fail(s.error().message, 2);
  auto timeout = parse_duration(o.get("timeout"));
  auto interval = parse_duration(o.get("interval"));
  if (!timeout || !interval) return fail("bad --timeout or --interval", 2);
  auto body = gather(o.get("f"));
  if (!body) return fail(body.error().message, 2);
  auto c = Client::from(o);
  if (!c) return fail(c.error().message, 2);
  c->timeout = std::chrono::minutes(10);
  auto r = c->call("POST", "/v1/apply" + query(o, dry == "server"), body->dump());
  if (!r) return fail(r.error().message);
  std::vector<std::string> campaigns;
  for (const auto& x : (*r)["objects"]) {
    if (str(x, "kind") == "Campaign" && str(x, "action") != "pruned" && !str(x, "id").empty()) {
      campaigns.push_back(str(x, "id"));
    }
  }
  const bool structured = o.get("o") == "json" || o.get("o") == "yaml";
  const bool wait = o.get_bool("wait") && dry == "none" && !campaigns.empty();
  if (!structured) print_outcome(o, *r);
  if (!wait) {
    print_structured(o, *r);
    return 0;
  }
  if (!structured) std::cout << "\n";
  auto done = wait_for_campaigns(*c, campaigns, WaitOptions{*timeout, *interval, structured});
  if (!done) {
    if (structured) print_structured(o, json{{"apply", *r}});
    return fail(done.error().message);
  }
  print_structured(o, json{{"apply", *r}, {"campaigns", *done}});
  return std::all_of(done->begin(), done->end(), campaign_clean) ? 0 : 1;
}

// ---- diff ---------------------------------------------------------------------------

std::vector<std::string> lines_of(const json& j) {
  std::vector<std::string> out;
  if (j.is_null()) return out;
  const std::string y = to_yaml(j);
  size_t start = 0;
  while (start < y.size()) {
    const size_t nl = y.find('\n', start);
    out.push_back(y.substr(start, nl - start));
    if (nl == std::string::npos) break;
    start = nl + 1;
  }
  return out;
}

// A line diff (longest common subsequence; objects are a few dozen lines).
void print_line_diff(const std::vector<std::string>& a, const std::vector<std::string>& b) {
  const size_t n = a.size(), m = b.size();
  std::vector<std::vector<int>> lcs(n + 1, std::vector<int>(m + 1, 0));
  for (size_t i = n; i-- > 0;) {
    for (size_t j = m; j-- > 0;) {
      lcs[i][j] = a[i] == b[j] ? lcs[i + 1][j + 1] + 1 : std::max(lcs[i + 1][j], lcs[i][j + 1]);
    }
  }
  size_t i = 0, j = 0;
  while (i < n || j < m) {
    if (i < n && j < m && a[i] == b[j]) {
      std::cout << " " << a[i++] << "\n";
      ++j;
    } else if (i < n && (j == m || lcs[i + 1][j] >= lcs[i][j + 1])) {
      std::cout << "-" << a[i++] << "\n";
    } else {
      std::cout << "+" << b[j++] << "\n";
    }
  }
}

int diff(int argc, char** argv) {
  Options o("flotilla diff",
            "Usage: flotilla diff -f FILE|DIR|- [--applyset NAME [--prune]]\n\n"
            "Shows what 'flotilla apply' with the same flags would change, as the hub judges it (a\n"
            "server dry run): a line diff of each object's labels and spec (and, for a bundle\n"
            "publication, the bundle it resolves to), and with --prune the objects it would remove.\n"
            "Exit 0 when nothing would change, 1 when something would, 2 or more on errors (kubectl's codes).",
            "FLOTILLA_");
  add_hub_flags(o);
  o.add("f", "file, directory or - (stdin)")
      .add("applyset", "the apply set the objects belong to")
      .add_switch("prune", "also show the set's objects that apply --prune would remove");
  std::vector<std::string> pos;
  if (int rc = parse_args(o, argc, argv, pos, 0, 0, 1); rc >= 0) return rc;
  if (o.get("f").empty()) return fail("-f FILE|DIR|- is required", 2);
  if (auto s = check_set_flags(o); !s) return fail(s.error().message, 2);
  auto body = gather(o.get("f"));
  if (!body) return fail(body.error().message, 2);
  auto c = Client::from(o);
  if (!c) return fail(c.error().message, 2);
  c->timeout = std::chrono::minutes(10);
  auto r = c->call("POST", "/v1/apply" + query(o, true), body->dump());
  if (!r) return fail(r.error().message, 2);
  const bool changed = (*r).value("changed", 0) > 0;
  if (print_structured(o, *r)) return changed ? 1 : 0;
  for (const auto& x : (*r)["objects"]) {
    const std::string action = str(x, "action");
    if (action == "unchanged") continue;
    const std::string what = str(x, "kind") + " " + str(x, "project") + "/" + str(x, "name");
    std::cout << "--- " << what << (action == "created" ? " (not on the hub)" : " (on the hub)") << "\n"
              << "+++ " << what
              << (action == "pruned" ? " (pruned: the files no longer declare it)"
                                     : " (" + str(x, "source") + ", generation " + str(x, "generation") + ")")
              << "\n";
    print_line_diff(lines_of(x["live"]), lines_of(x["desired"]));
    if (!str(x, "detail").empty()) std::cout << "# " << str(x, "detail") << "\n";
    if (const auto w = waves_text(x); !w.empty()) std::cout << "# " << w << "\n";
  }
  return changed ? 1 : 0;
}

// ---- objects ------------------------------------------------------------------------

int objects_list(int argc, char** argv) {
  Options o("flotilla objects list",
            "Usage: flotilla objects list [--applyset NAME]\n\n"
            "The objects applied from files, with their apply set and generation.",
            "FLOTILLA_");
  add_hub_flags(o);
  o.add("applyset", "only this apply set's objects");
  std::vector<std::string> pos;
  if (int rc = parse_args(o, argc, argv, pos, 0, 0); rc >= 0) return rc;
  auto c = Client::from(o);
  if (!c) return fail(c.error().message, 2);
  std::string path = "/v1/objects";
  if (!o.get("applyset").empty()) path += "?applyset=" + o.get("applyset");
  auto r = c->call("GET", path);
  if (!r) return fail(r.error().message);
  if (print_structured(o, *r)) return 0;
  std::vector<std::string> header{"KIND", "NAME", "PROJECT", "APPLYSET", "GENERATION", "OBSERVED", "ID"};
  if (wide(o)) header.insert(header.end(), {"SOURCE", "LABELS"});
  Table t(header);
  for (const auto& x : (*r)["items"]) {
    const json& meta = x["metadata"];
    const json& labels = meta.value("labels", json::object());
    std::string set = labels.value("applyset.flotilla.dev/part-of", "");
    std::vector<std::string> row{str(x, "kind"), str(meta, "name"), str(meta, "project"), set.empty() ? "-" : set,
                                 str(meta, "generation"), str(x["status"], "observed_generation"),
                                 str(x["status"], "id")};
    if (wide(o)) {
      std::string ls;
      for (const auto& [k, v] : labels.items()) ls += (ls.empty() ? "" : ",") + k + "=" + v.get<std::string>();
      row.insert(row.end(), {str(x["status"], "source"), ls.empty() ? "-" : ls});
    }
    t.add(row);
  }
  t.print(std::cout);
  return 0;
}

}  // namespace

// `flotilla apply -f x`: no subcommand, the options start right after the command.
int cmd_apply(int argc, char** argv) { return apply(argc, argv); }

int cmd_diff(int argc, char** argv) { return diff(argc, argv); }

int cmd_objects(int argc, char** argv) {
  const std::string sub = argc > 1 ? argv[1] : "";
  if (sub == "list") return objects_list(argc, argv);
  return fail("usage: flotilla objects list [--applyset NAME] (--help)", 2);
}

}  // namespace flotilla::cli

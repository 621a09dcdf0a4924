// flotilla gitrepo ...: the Git repositories the hub follows, and how their
// sync stands (commit, applied objects, errors, last attempt).
#include <iostream>
#include <thread>

#include "cli.hpp"
#include "client.hpp"
#include "output.hpp"

namespace flotilla::cli {

using nlohmann::json;

namespace {

std::string short_commit(const std::string& c) { return c.empty() ? "-" : c.substr(0, 12); }
std::string or_dash(const std::string& s) { return s.empty() ? "-" : s; }

void print_gitrepo(const json& g) {
  const json& st = g["status"];
  std::cout << "gitrepo      " << str(g, "name") << " (project " << str(g, "project") << ")\n"
            << "url          " << str(g, "url") << "\n"
            << "branch       " << str(g, "branch") << "\n"
            << "path         " << (str(g, "path").empty() ? "(top)" : str(g, "path")) << "\n"
            << "interval     " << str(g, "interval") << "\n"
            << "state        " << str(st, "state") << "\n"
            << "commit       " << or_dash(str(st, "commit")) << "\n"
            << "attempted    " << or_dash(str(st, "attempted_commit")) << " at " << or_dash(str(st, "last_attempt_at"))
            << "\n"
            << "last success " << or_dash(str(st, "last_success_at")) << "\n";
  if (!str(st, "error").empty()) std::cout << "error        " << str(st, "error") << "\n";
  const json& applied = st.value("applied", json::array());
  std::cout << "applied      " << applied.size() << " object(s)\n";
  for (const auto& a : applied) std::cout << "  " << a.get<std::string>() << "\n";
}

int gitrepo_create(int argc, char** argv) {
  Options o("flotilla gitrepo create",
            "Usage: flotilla gitrepo create NAME --url URL [--branch main] [--path DIR] [--interval 1m]\n\n"
            "Makes the hub follow a Git repository (admin): every new commit of the branch has the\n"
            "*.yaml, *.yml and *.json files under --path applied like 'flotilla apply --prune\n"
            "--applyset gitrepo-NAME'. URL: an absolute path, file://, https:// or http://.",
            "FLOTILLA_");
  add_hub_flags(o);
  o.add("url", "repository URL or local path")
      .add("branch", "branch to follow", "main")
      .add("path", "directory of the repository to apply (default: all of it)")
      .add("interval", "how often to poll", "1m")
      .add("project", "project its objects belong to (default: your token's)");
  std::vector<std::string> pos;
  if (int rc = parse_args(o, argc, argv, pos, 1, 1); rc >= 0) return rc;
  if (o.get("url").empty()) return fail("--url is required", 2);
  json body{{"name", pos[0]}, {"url", o.get("url")}, {"branch", o.get("branch")}, {"interval", o.get("interval")}};
  if (!o.get("path").empty()) body["path"] = o.get("path");
  if (!o.get("project").empty()) body["project"] = o.get("project");
  auto c = Client::from(o);
  if (!c) return fail(c.error().message, 2);
  auto r = c->call("POST", "/v1/gitrepos", body.dump());
  if (!r) return fail(r.error().message);
  if (!print_structured(o, *r)) std::cout << "gitrepo/" << str(*r, "name") << " created; the hub polls it now\n";
  return 0;
}

int gitrepo_list(int argc, char** argv) {
  Options o("flotilla gitrepo list", "Usage: flotilla gitrepo list [-o table|wide|json|yaml]", "FLOTILLA_");
  add_hub_flags(o);
  std::vector<std::string> pos;
  if (int rc = parse_args(o, argc, argv, pos, 0, 0); rc >= 0) return rc;
  auto c = Client::from(o);
  if (!c) return fail(c.error().message, 2);
  auto r = c->call("GET", "/v1/gitrepos");
  if (!r) return fail(r.error().message);
  if (print_structured(o, *r)) return 0;
  const bool w = wide(o);
  std::vector<std::string> header{"NAME", "PROJECT", "URL", "BRANCH", "STATE", "COMMIT", "OBJECTS", "LAST ATTEMPT"};
  if (w) header.insert(header.end(), {"PATH", "INTERVAL", "LAST SUCCESS", "ERROR"});
  Table t(header);
  for (const auto& g : (*r)["items"]) {
    const json& st = g["status"];
    std::vector<std::string> row{str(g, "name"),
                                 str(g, "project"),
                                 str(g, "url"),
                                 str(g, "branch"),
                                 str(st, "state"),
                                 short_commit(str(st, "commit")),
                                 std::to_string(st.value("applied", json::array()).size()),
                                 or_dash(str(st, "last_attempt_at"))};
    if (w) {
      row.insert(row.end(), {str(g, "path").empty() ? "(top)" : str(g, "path"), str(g, "interval"),
                             or_dash(str(st, "last_success_at")), or_dash(str(st, "error"))});
    }
    t.add(row);
  }
  t.print(std::cout);
  return 0;
}

int gitrepo_one(const std::string& verb, int argc, char** argv) {
  static const std::map<std::string, std::string> what = {
      {"get", "Shows a GitRepo and its sync state: commit, applied objects, last error and attempt."},
      {"delete", "Stops following the repository (admin). The objects it applied stay."},
      {"sync", "Asks the hub to poll the repository now; --wait until that attempt is recorded."}};
  Options o("flotilla gitrepo " + verb, "Usage: flotilla gitrepo " + verb + " NAME\n\n" + what.at(verb), "FLOTILLA_");
  add_hub_flags(o);
  if (verb == "sync") {
    o.add_switch("wait", "wait until the hub has attempted the sync, and show its outcome")
        .add("timeout", "with --wait: give up after this long", "2m");
  }
  std::vector<std::string> pos;
  if (int rc = parse_args(o, argc, argv, pos, 1, 1); rc >= 0) return rc;
  auto c = Client::from(o);
  if (!c) return fail(c.error().message, 2);
  const std::string path = "/v1/gitrepos/" + pos[0];
  Result<json> r = make_error(Errc::internal, "no call");
  if (verb == "get") {
    r = c->call("GET", path);
  } else if (verb == "delete") {
    r = c->call("DELETE", path);
  } else {
    auto before = c->call("GET", path);
    if (!before) return fail(before.error().message);
    const int64_t attempt = (*before)["status"].value("last_attempt_ms", int64_t{0});
    r = c->call("POST", path + "/sync");
    if (r && o.get_bool("wait")) {
      auto timeout = parse_duration(o.get("timeout"));
      if (!timeout) return fail(timeout.error().message, 2);
      const auto deadline = std::chrono::steady_clock::now() + *timeout;
      for (;;) {
        r = c->call("GET", path);
        if (!r || (*r)["status"].value("last_attempt_ms", int64_t{0}) != attempt) break;
        if (std::chrono::steady_clock::now() >= deadline) return fail("no sync attempt within " + o.get("timeout"));
        std::this_thread::sleep_for(std::chrono::milliseconds(200));
      }
    }
  }
  if (!r) return fail(r.error().message);
  if (print_structured(o, *r)) return 0;
  if (verb == "delete") {
    std::cout << "gitrepo/" << pos[0] << " deleted; the objects it applied stay\n";
    return 0;
  }
  if (verb == "sync" && !o.get_bool("wait")) {
    std::cout << "gitrepo/" << pos[0] << " sync requested\n";
    return 0;
  }
  print_gitrepo(*r);
  // A sync that was waited for tells by its exit code whether it went through.
  return verb == "sync" && str((*r)["status"], "state") == "error" ? 1 : 0;
}

}  // namespace

int cmd_gitrepo(int argc, char** argv) {
  const std::string sub = argc > 1 ? argv[1] : "";
  if (sub == "create") return gitrepo_create(argc, argv);
  if (sub == "list") return gitrepo_list(argc, argv);
  if (sub == "get" || sub == "delete" || sub == "sync") return gitrepo_one(sub, argc, argv);
  if (sub == "--help" || sub == "-h" || sub == "help") {
    std::cout << "Usage: flotilla gitrepo VERB ...\n\n"
                 "  create NAME --url URL   follow a Git repository of declarative files (admin)\n"
                 "  list                    GitRepos with state, commit, objects, last attempt\n"
                 "  get NAME                one GitRepo: applied objects, last error\n"
                 "  sync NAME [--wait]      poll it now\n"
                 "  delete NAME             stop following it (admin); what it applied stays\n";
    return 0;
  }
  return fail("usage: flotilla gitrepo create|list|get|delete|sync ... (--help for each)", 2);
}

}  // namespace flotilla::cli

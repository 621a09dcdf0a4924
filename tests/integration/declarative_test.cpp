// Declarative files against a real flotilla-hub process with the real CLI:
// apply / diff / edit / diff / apply / prune on files on disk, an invalid file
// that changes nothing, a server dry run's devices per wave, -o formats,
// apply --wait's status block with real agents, and Git sync from a real
// repository made with the git command.
#include <catch2/catch.hpp>

#include <sys/stat.h>
#include <yaml-cpp/yaml.h>

#include <fstream>
#include <regex>

#include "flotilla/common/fs.hpp"
#include "flotilla/hub/declarative.hpp"
#include "flotilla/v1/enroll.pb.h"
#include "tests/support/harness.hpp"

using namespace flotilla;
using namespace flotilla::test;

namespace {

void write(const stdfs::path& p, const std::string& content) {
  stdfs::create_directories(p.parent_path());
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out << content;
  REQUIRE(out.good());
}

bool has(const std::string& haystack, const std::string& needle) { return haystack.find(needle) != std::string::npos; }

// Devices enrolled through the REST API the way agents do (proof of their
// key included), without running agents: apply needs devices to target, not
// devices that answer.
std::vector<std::string> enroll_devices(Hub& hub, int n, const std::map<std::string, std::string>& labels) {
  const std::string token = hub.enrollment_token(labels, n);
  std::vector<std::string> ids;
  for (int i = 0; i < n; ++i) {
    auto k = bundles::generate_key();
    v1::EnrollRequest req;
    req.set_enrollment_token(token);
    req.set_device_public_key(std::string(k.pub.key.begin(), k.pub.key.end()));
    auto proof = bundles::sign_detached(k, bundles::enroll_proof_message(token, k.pub.key));
    req.set_proof(std::string(proof.begin(), proof.end()));
    req.set_csr(device_csr(k));
    req.set_hostname("dev-" + std::to_string(i));
    http::Request r;
    r.method = "POST";
    r.url = hub.url() + "/v1/enroll";
    r.body = req.SerializeAsString();
    r.headers["Content-Type"] = "application/x-protobuf";
    auto resp = http::send(r);
    REQUIRE(resp);
    REQUIRE(resp->status == 200);
    v1::EnrollResponse out;
    REQUIRE(out.ParseFromString(resp->body));
    ids.push_back(out.device_id());
  }
  return ids;
}

// What the hub holds that an apply could change (a GitRepo's sync status
// changes with every attempt, so GitRepos are not in it).
// What an apply can change: objects, campaigns, bundles and tokens. A
// campaign's live progress is left out (its counts, each cell's share as the
// cell last published it, who is away): devices and the cells' count
// publisher move those on their own after a campaign completes, and a
// refused apply is about the declared state, not about them.
json hub_state(Hub& hub) {
  json s;
  for (const char* path : {"/v1/objects", "/v1/campaigns", "/v1/bundles", "/v1/enrollment-tokens", "/v1/tokens"}) {
    auto [status, body] = hub.call("GET", path);
    REQUIRE(status == 200);
    s[path] = body["items"];
  }
  for (auto& c : s["/v1/campaigns"]) {
    for (const char* live : {"counts", "cells", "away", "failure_reasons"}) c.erase(live);
    for (auto& w : c["waves"]) w.erase("counts");
  }
  return s;
}

// What changed since `before`, as a JSON patch: a failed check prints it.
json changes(Hub& hub, const json& before) { return json::diff(before, hub_state(hub)); }

json token_named(Hub& hub, const std::string& name) {
  const json list = hub.call("GET", "/v1/enrollment-tokens").second;
  json found;
  for (const auto& t : list["items"]) {
    if (t["name"] == name) found = t;  // the newest of that name
  }
  return found;
}

std::string publication(const std::string& name, const std::string& file) {
  return "apiVersion: flotilla.dev/v1\nkind: BundlePublication\nmetadata:\n  name: " + name + "\nspec:\n  file: " + file +
         "\n";
}

std::string campaign(const std::string& name, const std::string& bundle, const std::string& selector,
                     const std::string& strategy) {
  return "apiVersion: flotilla.dev/v1\nkind: Campaign\nmetadata:\n  name: " + name + "\n  labels:\n    team: edge\n"
         "spec:\n  bundle: \"" + bundle + "\"\n  selector: " + selector + "\n  strategy: " + strategy + "\n";
}

std::string enrollment_token(const std::string& name) {
  return "apiVersion: flotilla.dev/v1\nkind: EnrollmentToken\nmetadata:\n  name: " + name +
         "\nspec:\n  labels:\n    env: prod\n  max_uses: 50\n  ttl: 720h\n";
}

// The line of `apply` output about one object.
std::string line_of(const std::string& out, const std::string& prefix) {
  std::istringstream in(out);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(prefix, 0) == 0) return line;
  }
  return "";
}

}  // namespace

TEST_CASE("apply, diff, edit, diff, apply and prune: a round trip on real files against a real hub",
          "[integration][declarative]") {
  TempDir tmp;
  Hub hub(tmp.path() / "hub");
  hub.start();
  enroll_devices(hub, 6, {{"env", "prod"}});
  auto key = bundles::generate_key();
  const auto dir = tmp.path() / "fleet";
  write(dir / "bundles/edge-1.fbundle", make_bundle("edge-base", 1, {}, {&key}).bytes);
  write(dir / "base/objects.yaml",
        publication("edge-1", "../bundles/edge-1.fbundle") + "---\n" + enrollment_token("shops"));
  write(dir / "rollout/campaigns.yaml",
        campaign("rollout", "edge-base:1", "env=prod", "{canary: 1, waves: [50, 100], max_in_flight: 2}"));
  write(dir / "extra.json", R"({"apiVersion": "flotilla.dev/v1", "kind": "EnrollmentToken",
                               "metadata": {"name": "extra"}, "spec": {"max_uses": 1}})");

  // 1. apply: everything is created; the new tokens' secrets are shown once.
  auto applied = hub.cli({"apply", "-f", dir.string(), "--applyset", "demo"});
  INFO(applied.out << applied.err);
  REQUIRE(applied.exit_code == 0);
  CHECK(has(line_of(applied.out, "bundlepublication/edge-1 "), "created"));
  CHECK(has(line_of(applied.out, "enrollmenttoken/shops "), "created"));
  CHECK(has(line_of(applied.out, "enrollmenttoken/extra "), "created"));
  const std::string cid = hub::declared_campaign_id("default", "rollout", 1);
  const std::string rollout = line_of(applied.out, "campaign/rollout ");
  CHECK(has(rollout, "campaign/rollout created: " + cid + "; 6 devices: canary 1, wave 1 "));
  CHECK(std::regex_search(applied.out, std::regex("\n  enrollmenttoken/shops  flt_enr_[0-9a-f]{64}\n")));
  CHECK(hub.campaign(cid)["strategy"]["max_in_flight"] == 2);

  // 2. diff with nothing changed: exit 0, nothing printed.
  auto same = hub.cli({"diff", "-f", dir.string(), "--applyset", "demo"});
  INFO(same.out << same.err);
  CHECK(same.exit_code == 0);
  CHECK(same.out.empty());

  // 3. edit a file: diff exits 1 and shows the change.
  write(dir / "rollout/campaigns.yaml",
        campaign("rollout", "edge-base:1", "env=prod", "{canary: 1, waves: [50, 100], max_in_flight: 3}"));
  auto changed = hub.cli({"diff", "-f", dir.string(), "--applyset", "demo"});
  INFO(changed.out << changed.err);
  CHECK(changed.exit_code == 1);
  CHECK(has(changed.out, "--- Campaign default/rollout (on the hub)\n"
                         "+++ Campaign default/rollout (rollout/campaigns.yaml doc 1, generation 2)\n"));
  CHECK(has(changed.out, "\n-    max_in_flight: 2\n+    max_in_flight: 3\n"));
  CHECK_FALSE(has(changed.out, "EnrollmentToken"));  // unchanged objects are not shown

  // 4. apply the edit: configured, generation 2, the campaign follows.
  auto again = hub.cli({"apply", "-f", dir.string(), "--applyset", "demo"});
  INFO(again.out << again.err);
  REQUIRE(again.exit_code == 0);
  CHECK(has(line_of(again.out, "campaign/rollout "), "configured"));
  CHECK(line_of(again.out, "enrollmenttoken/shops ") == "enrollmenttoken/shops unchanged");
  CHECK_FALSE(has(again.out, "flt_enr_"));  // no new secret for an existing token
  CHECK(hub.campaign(cid)["strategy"]["max_in_flight"] == 3);
  auto listed = hub.cli({"objects", "list", "--applyset", "demo"});
  REQUIRE(listed.exit_code == 0);
  CHECK(std::regex_search(listed.out, std::regex("Campaign +rollout +default +demo +2 +2 +" + cid)));
  CHECK(hub.cli({"diff", "-f", dir.string(), "--applyset", "demo"}).exit_code == 0);

  // 5. a file removed: diff --prune shows it, apply --prune revokes that token only.
  stdfs::remove(dir / "extra.json");
  auto would = hub.cli({"diff", "-f", dir.string(), "--applyset", "demo", "--prune"});
  CHECK(would.exit_code == 1);
  CHECK(has(would.out, "+++ EnrollmentToken default/extra (pruned: the files no longer declare it)"));
  CHECK(token_named(hub, "extra")["revoked"] == false);
  const std::string extra_id = token_named(hub, "extra")["id"];
  auto pruned = hub.cli({"apply", "-f", dir.string(), "--applyset", "demo", "--prune"});
  INFO(pruned.out << pruned.err);
  REQUIRE(pruned.exit_code == 0);
  CHECK(line_of(pruned.out, "enrollmenttoken/extra ") ==
        "enrollmenttoken/extra pruned: " + extra_id + "; revoked token " + extra_id);
  CHECK(token_named(hub, "extra")["revoked"] == true);
  CHECK(token_named(hub, "shops")["revoked"] == false);

  // 6. the campaign's file removed: pruning aborts it (it is still running or
  // converging: these devices never come online).
  stdfs::remove_all(dir / "rollout");
  auto pruned2 = hub.cli({"apply", "-f", dir.string(), "--applyset", "demo", "--prune"});
  INFO(pruned2.out << pruned2.err);
  REQUIRE(pruned2.exit_code == 0);
  CHECK(std::regex_search(line_of(pruned2.out, "campaign/rollout "),
                          std::regex("pruned: .*aborted campaign " + cid + " \\(it was (running|converging)\\)")));
  CHECK(hub.campaign(cid)["state"] == "aborted");
  CHECK(hub.cli({"diff", "-f", dir.string(), "--applyset", "demo", "--prune"}).exit_code == 0);

  // Every apply is in the audit log with what it did.
  bool audited = false;
  for (const auto& a : hub.audit()) {
    audited |= a["path"] == "/v1/apply" && has(a["detail"], "pruned Campaign default/rollout (" + cid + ")");
  }
  CHECK(audited);
}

TEST_CASE("an invalid file changes nothing on the hub and the error names the file, document and field",
          "[integration][declarative][bad-input]") {
  TempDir tmp;
  Hub hub(tmp.path() / "hub");
  hub.start();
  enroll_devices(hub, 3, {{"env", "prod"}});
  auto key = bundles::generate_key();
  const auto dir = tmp.path() / "fleet";
  write(dir / "edge-1.fbundle", make_bundle("edge-base", 1, {}, {&key}).bytes);
  write(dir / "objects.yaml", publication("edge-1", "edge-1.fbundle") + "---\n" + enrollment_token("shops"));
  REQUIRE(hub.cli({"apply", "-f", dir.string()}).exit_code == 0);
  const json before = hub_state(hub);

  // Document 1 is valid and new; document 2 is not: neither is applied.
  write(dir / "campaigns.yaml", campaign("good", "edge-base:1", "env=prod", "{waves: [100]}") + "---\n" +
                                    campaign("bad", "edge-base:1", "env=prod", "{waves: [80, 20]}"));
  write(dir / "objects.yaml", publication("edge-1", "edge-1.fbundle") + "---\n" + enrollment_token("renamed"));
  auto r = hub.cli({"apply", "-f", dir.string()});
  INFO(r.out << r.err);
  CHECK(r.exit_code == 1);
  CHECK(has(r.err, "campaigns.yaml doc 2: spec.strategy.waves: percentages must increase and stay within 100"));
  CHECK(r.out.empty());
  CHECK(changes(hub, before) == json::array());

  // A reference that leaves the directory is refused the same way.
  write(dir / "campaigns.yaml", publication("outside", "../../etc/passwd.fbundle"));
  r = hub.cli({"apply", "-f", dir.string()});
  CHECK(r.exit_code == 1);
  CHECK(has(r.err, "campaigns.yaml doc 1: spec.file: '../../etc/passwd.fbundle' must be a relative path that stays "
                   "inside the directory being applied"));
  CHECK(changes(hub, before) == json::array());

  // diff of an invalid file is an error (exit 2), not a difference.
  write(dir / "campaigns.yaml", campaign("bad", "edge-base:1", "env=prod", "{canary: lots}"));
  auto d = hub.cli({"diff", "-f", dir.string()});
  CHECK(d.exit_code == 2);
  CHECK(has(d.err, "campaigns.yaml doc 1: spec.strategy.canary"));
  CHECK(changes(hub, before) == json::array());
}

TEST_CASE("apply --dry-run=server reports devices per wave, exactly as the apply assigns them, and changes nothing",
          "[integration][declarative]") {
  TempDir tmp;
  Hub hub(tmp.path() / "hub");
  hub.start();
  enroll_devices(hub, 20, {{"env", "prod"}});
  enroll_devices(hub, 4, {{"env", "lab"}});
  auto key = bundles::generate_key();
  const auto dir = tmp.path() / "fleet";
  write(dir / "edge-1.fbundle", make_bundle("edge-base", 1, {}, {&key}).bytes);
  write(dir / "all.yaml", publication("edge-1", "edge-1.fbundle") + "---\n" +
                              campaign("rollout", "edge-base:1", "env=prod", "{canary: 2, waves: [30, 100]}") +
                              "---\n" + enrollment_token("shops"));
  const json before = hub_state(hub);
  auto dry = hub.cli({"apply", "-f", dir.string(), "--dry-run=server"});
  INFO(dry.out << dry.err);
  REQUIRE(dry.exit_code == 0);
  const std::string line = line_of(dry.out, "campaign/rollout ");
  std::smatch m;
  REQUIRE(std::regex_search(line, m, std::regex("created \\(server dry run\\): c-[0-9a-f]{12}; 20 devices: canary 2, "
                                                "wave 1 ([0-9]+), wave 2 ([0-9]+)$")));
  CHECK(std::stoi(m[1]) + std::stoi(m[2]) == 18);
  CHECK(has(line_of(dry.out, "enrollmenttoken/shops "), "created (server dry run)"));
  CHECK_FALSE(has(dry.out, "flt_enr_"));  // a token that was never kept has no secret
  CHECK(changes(hub, before) == json::array());

  auto real = hub.cli({"apply", "-f", dir.string()});
  REQUIRE(real.exit_code == 0);
  const std::string expected = line;
  CHECK(line_of(real.out, "campaign/rollout ") == std::regex_replace(expected, std::regex(" \\(server dry run\\)"), ""));
  const json c = hub.campaign(hub::declared_campaign_id("default", "rollout", 1));
  CHECK(c["waves"][1]["counts"]["total"] == std::stoi(m[1]));
  CHECK(c["waves"][2]["counts"]["total"] == std::stoi(m[2]));
}

TEST_CASE("output formats: -o table, wide, json and yaml print objects, and an unknown -o is refused naming the allowed ones",
          "[integration][declarative][cli]") {
  TempDir tmp;
  Hub hub(tmp.path() / "hub");
  hub.start();
  const auto devices = enroll_devices(hub, 2, {{"env", "prod"}});
  auto key = bundles::generate_key();
  const auto dir = tmp.path() / "fleet";
  write(dir / "edge-1.fbundle", make_bundle("edge-base", 1, {}, {&key}).bytes);
  write(dir / "all.yaml", publication("edge-1", "edge-1.fbundle") + "---\n" +
                              campaign("rollout", "edge-base:1", "env=prod", "{waves: [100]}"));
  REQUIRE(hub.cli({"apply", "-f", dir.string(), "--applyset", "fmt"}).exit_code == 0);
  const std::string cid = hub::declared_campaign_id("default", "rollout", 1);

  struct Case {
    std::vector<std::string> cmd;
    std::string table_header, wide_column, json_field;
  };
  const std::vector<Case> cases = {
      {{"objects", "list"}, "KIND   ", "SOURCE", "items"},
      {{"campaign", "list"}, "ID   ", "SELECTOR", "items"},
      {{"device", "list"}, "ID   ", "HOSTNAME", "items"},
      {{"bundle", "list"}, "ID   ", "DIGEST", "items"},
      {{"enrollment-token", "list"}, "ID   ", "CREATED", "items"},
      {{"token", "list"}, "ID   ", "CREATED", "items"},
      {{"gitrepo", "list"}, "NAME   ", "INTERVAL", "items"},
      {{"audit"}, "ID   ", "PEER", "items"},
  };
  for (const auto& c : cases) {
    INFO(c.cmd[0]);
    auto run = [&](const std::string& o) {
      auto args = c.cmd;
      args.insert(args.end(), {"-o", o});
      return hub.cli(args);
    };
    auto table = run("table");
    INFO(table.err);
    REQUIRE(table.exit_code == 0);
    CHECK(table.out.rfind(c.table_header, 0) == 0);
    CHECK_FALSE(has(table.out.substr(0, table.out.find('\n')), c.wide_column));
    auto wide = run("wide");
    REQUIRE(wide.exit_code == 0);
    CHECK(has(wide.out.substr(0, wide.out.find('\n')), c.wide_column));
    auto js = run("json");
    REQUIRE(js.exit_code == 0);
    const json j = json::parse(js.out);
    CHECK(j.contains(c.json_field));
    auto ym = run("yaml");
    REQUIRE(ym.exit_code == 0);
    const YAML::Node y = YAML::Load(ym.out);
    REQUIRE(y[c.json_field]);
    CHECK(y[c.json_field].size() == j[c.json_field].size());
    auto bad = run("xml");
    CHECK(bad.exit_code == 2);
    CHECK(has(bad.err, "-o: unknown output format 'xml' (allowed: table, wide, json, yaml)"));
    CHECK(bad.out.empty());
  }

  // Rows, not only headers: the table and its wide form show the objects.
  auto objects = hub.cli({"objects", "list", "-o", "wide"});
  CHECK(std::regex_search(objects.out,
                          std::regex("Campaign +rollout +default +fmt +1 +1 +" + cid + " +all\\.yaml doc 2 +"
                                     "applyset\\.flotilla\\.dev/part-of=fmt,team=edge")));
  auto campaigns = hub.cli({"campaign", "list"});
  CHECK(std::regex_search(campaigns.out, std::regex(cid + " +rollout +edge-base v1 +(running|converging) +\\[")));
  auto dev = hub.cli({"device", "list", "-o", "wide"});
  CHECK(std::regex_search(dev.out, std::regex(devices[0] + " +default +no +enrolled +- +- +env=prod +- +- +dev-[01] ")));
  // A campaign as YAML reads back to the same object as its JSON.
  auto cy = hub.cli({"campaign", "get", cid, "-o", "yaml"});
  auto cj = hub.cli({"campaign", "get", cid, "-o", "json"});
  REQUIRE(cy.exit_code == 0);
  const YAML::Node y = YAML::Load(cy.out);
  CHECK(y["id"].as<std::string>() == cid);
  CHECK(y["strategy"]["waves"][0].as<double>() == 100);
  CHECK(y["counts"]["total"].as<int>() == json::parse(cj.out)["counts"]["total"].get<int>());
  // An unknown -o stops a command that changes things before it changes anything.
  const json before = hub_state(hub);
  write(dir / "more.yaml", enrollment_token("more"));
  auto refused = hub.cli({"apply", "-f", dir.string(), "-o", "xml"});
  CHECK(refused.exit_code == 2);
  CHECK(changes(hub, before) == json::array());
  auto pause = hub.cli({"campaign", "pause", cid, "-o", "toml"});
  CHECK(pause.exit_code == 2);
  CHECK(hub.campaign(cid)["state"] != "paused");
  // --help lists every campaign verb, and each is reachable.
  auto help = Hub::cli_local({"--help"});
  for (const char* verb : {"create", "list", "get|status", "watch", "pause", "resume", "abort", "rollback", "approve"}) {
    CHECK(has(help.out, std::string("campaign ") + verb));
  }
  auto verbs = Hub::cli_local({"campaign", "--help"});
  CHECK(verbs.exit_code == 0);
  for (const char* verb : {"create", "list", "get", "status", "watch", "pause", "resume", "abort", "rollback",
                           "approve"}) {
    CHECK(has(verbs.out, std::string("\n  ") + verb + " "));
    auto one = Hub::cli_local({"campaign", verb, "--help"});
    CHECK(one.exit_code == 0);
    CHECK(has(one.out, std::string("flotilla campaign ") + verb));
  }
}

TEST_CASE("apply --wait and campaign status --wait print the status block: worst first, counts, first failures",
          "[integration][declarative][e2e-path]") {
  Fleet fleet(2);
  const auto dir = fleet.tmp.path() / "fleet";
  auto rogue = bundles::generate_key();
  // Signed by a key the agents do not trust: every device refuses it.
  write(dir / "bad.fbundle", make_bundle("edge-base", 1, {}, {&rogue}).bytes);
  write(dir / "all.yaml", publication("bad", "bad.fbundle") + "---\n" +
                              campaign("doomed", "edge-base:1", "env=it", "{waves: [100]}"));
  auto r = fleet.hub.cli({"apply", "-f", dir.string(), "--wait", "--timeout", "90s", "--interval", "200ms"});
  INFO(r.out << r.err);
  CHECK(r.exit_code == 1);  // settled, but not clean
  const std::string cid = hub::declared_campaign_id("default", "doomed", 1);
  // The last block printed is the settled one.
  const std::string last = r.out.substr(r.out.rfind("campaign doomed (" + cid + "): "));
  CHECK(has(last, "campaign doomed (" + cid + "): completed\n  2 devices, bundle edge-base v1\n"
                  "  failed           2\n  first failures:\n"));
  for (const auto& a : fleet.agents) {
    CHECK(std::regex_search(last, std::regex("\n    " + a->device_id() + " +unknown_key")));
  }

  auto status = fleet.hub.cli({"campaign", "status", cid, "--wait", "--interval", "200ms"});
  CHECK(status.exit_code == 1);
  CHECK(status.out == last);

  // A good bundle: applied, exit 0. The worse campaign comes first.
  write(dir / "good.fbundle", make_bundle("edge-base", 2, {}, {&fleet.release}).bytes);
  write(dir / "all.yaml", publication("bad", "bad.fbundle") + "---\n" +
                              campaign("doomed", "edge-base:1", "env=it", "{waves: [100]}") + "---\n" +
                              publication("good", "good.fbundle") + "---\n" +
                              campaign("fine", "edge-base:2", "env=it", "{waves: [100]}"));
  auto ok = fleet.hub.cli({"apply", "-f", dir.string(), "--wait", "--timeout", "90s", "--interval", "200ms"});
  INFO(ok.out << ok.err);
  CHECK(ok.exit_code == 1);  // "doomed" is among the waited-for campaigns and failed
  const std::string fine_id = hub::declared_campaign_id("default", "fine", 1);
  const auto fine_at = ok.out.rfind("campaign fine (" + fine_id + "): completed\n  2 devices, bundle edge-base v2\n"
                                    "  applied          2\n");
  const auto doomed_at = ok.out.rfind("campaign doomed (");
  REQUIRE(fine_at != std::string::npos);
  CHECK(doomed_at < fine_at);  // both completed; the one with failures first
  auto fine = fleet.hub.cli({"campaign", "status", fine_id, "--wait"});
  CHECK(fine.exit_code == 0);
  CHECK(fine.out == "campaign fine (" + fine_id + "): completed\n  2 devices, bundle edge-base v2\n"
                    "  applied          2\n");
}

namespace {

std::string git(const stdfs::path& repo, std::vector<std::string> args) {
  args.insert(args.begin(), {"/usr/bin/git", "-C", repo.string(), "-c", "user.name=Flotilla Test", "-c",
                             "user.email=test@flotilla.invalid", "-c", "commit.gpgsign=false"});
  auto r = proc::run(args, std::chrono::seconds(30));
  REQUIRE(r);
  INFO(r->out << r->err);
  REQUIRE(r->exit_code == 0);
  return r->out;
}

std::string commit_all(const stdfs::path& repo, const std::string& message) {
  git(repo, {"add", "-A"});
  git(repo, {"commit", "-q", "-m", message});
  std::string head = git(repo, {"rev-parse", "HEAD"});
  return head.substr(0, head.find('\n'));
}

json gitrepo(Hub& hub) { return hub.call("GET", "/v1/gitrepos/fleet").second; }

// Waits until the hub has attempted this commit; returns the GitRepo.
json synced_to(Hub& hub, const std::string& commit) {
  REQUIRE(hub.call("POST", "/v1/gitrepos/fleet/sync").first == 202);
  json g;
  const bool seen = wait_until(
      [&] {
        g = gitrepo(hub);
        return g["status"]["attempted_commit"] == commit;
      },
      std::chrono::seconds(30));
  INFO(g.dump(2) << hub.log());
  REQUIRE(seen);
  return g;
}

}  // namespace

TEST_CASE("a commit to a local Git repository reaches the hub and starts a campaign, and a bad commit changes nothing",
          "[integration][declarative][gitsync]") {
  Fleet fleet(2);
  Hub& hub = fleet.hub;
  const auto repo = fleet.tmp.path() / "repo";
  stdfs::create_directories(repo);
  git(repo, {"init", "-q", "-b", "main"});
  write(repo / "README.md", "fleet config\n");
  write(repo / "fleet/bundles/edge-1.fbundle", make_bundle("edge-base", 1, {}, {&fleet.release}).bytes);
  write(repo / "fleet/rollout.yaml", publication("edge-1", "bundles/edge-1.fbundle") + "---\n" +
                                         campaign("rollout", "edge-base:1", "env=it", "{canary: 1, waves: [100]}"));
  const std::string c1 = commit_all(repo, "first rollout");

  auto created = hub.cli({"gitrepo", "create", "fleet", "--url", "file://" + repo.string(), "--branch", "main",
                          "--path", "fleet", "--interval", "1s"});
  INFO(created.out << created.err);
  REQUIRE(created.exit_code == 0);
  json g;
  REQUIRE(wait_until([&] { return (g = gitrepo(hub))["status"]["commit"] == c1; }, std::chrono::seconds(30)));
  CHECK(g["status"]["state"] == "synced");
  CHECK(g["status"]["error"] == "");
  CHECK(g["status"]["applied"] == json::array({"BundlePublication/default/edge-1", "Campaign/default/rollout"}));
  // The campaign it started rolls out to the agents.
  const std::string cid = hub::declared_campaign_id("default", "rollout", 1);
  json c;
  REQUIRE(wait_until([&] { return (c = hub.campaign(cid))["state"] == "completed"; }, std::chrono::seconds(90)));
  CHECK(c["counts"]["applied"] == 2);
  auto shown = hub.cli({"gitrepo", "get", "fleet"});
  CHECK(has(shown.out, "state        synced\ncommit       " + c1 + "\n"));
  CHECK(has(shown.out, "applied      2 object(s)\n  BundlePublication/default/edge-1\n  Campaign/default/rollout\n"));
  auto list = hub.cli({"gitrepo", "list"});
  CHECK(std::regex_search(list.out, std::regex("fleet +default +file://\\S+ +main +synced +" + c1.substr(0, 12) + " +2 ")));
  const json before = hub_state(hub);

  // A bad commit: a token (fine) and a broken campaign. Reported, nothing changes.
  write(repo / "fleet/rollout.yaml", publication("edge-1", "bundles/edge-1.fbundle") + "---\n" +
                                         campaign("rollout", "edge-base:1", "env=it", "{canary: 1, waves: [80, 20]}"));
  write(repo / "fleet/tokens.yaml", enrollment_token("shops"));
  const std::string c2 = commit_all(repo, "broken waves");
  g = synced_to(hub, c2);
  CHECK(g["status"]["state"] == "error");
  CHECK(g["status"]["commit"] == c1);
  CHECK(has(g["status"]["error"], "fleet/rollout.yaml doc 2: spec.strategy.waves: percentages must increase"));
  CHECK(changes(hub, before) == json::array());
  auto errshown = hub.cli({"gitrepo", "get", "fleet"});
  CHECK(has(errshown.out, "state        error\n"));
  CHECK(has(errshown.out, "error        fleet/rollout.yaml doc 2: spec.strategy.waves"));

  // Nothing outside the repository is reached: not through a symlink, not by climbing out.
  write(repo / "fleet/rollout.yaml", publication("edge-1", "bundles/edge-1.fbundle") + "---\n" +
                                         campaign("rollout", "edge-base:1", "env=it", "{canary: 1, waves: [100]}"));
  stdfs::create_symlink("/etc/hostname", repo / "fleet/host.yaml");
  const std::string c3 = commit_all(repo, "a symlink");
  g = synced_to(hub, c3);
  CHECK(has(g["status"]["error"], "fleet/host.yaml is a symlink; symlinks are not followed"));
  stdfs::remove(repo / "fleet/host.yaml");
  stdfs::create_symlink("/etc", repo / "fleet/etc");
  write(repo / "fleet/steal.yaml", publication("steal", "etc/passwd"));
  const std::string c4 = commit_all(repo, "a symlinked directory");
  g = synced_to(hub, c4);
  CHECK(has(g["status"]["error"], "fleet/steal.yaml doc 1: spec.file: fleet/etc/passwd is not in the commit"));
  write(repo / "fleet/steal.yaml", publication("steal", "../../../outside.fbundle"));
  const std::string c5 = commit_all(repo, "climbing out");
  g = synced_to(hub, c5);
  CHECK(has(g["status"]["error"], "fleet/steal.yaml doc 1: spec.file: '../../../outside.fbundle' must be a relative "
                                  "path that stays inside"));
  CHECK(changes(hub, before) == json::array());
  bool audited = false;
  for (const auto& a : hub.audit()) {
    audited |= a["actor"] == "gitrepo:fleet" && a["status"] == 400 && has(a["detail"], c2.substr(0, 12) + " not applied");
  }
  CHECK(audited);

  // The next good commit applies: the token is created (its secret written
  // for the operator, 0600), the unchanged campaign is left alone.
  stdfs::remove(repo / "fleet/steal.yaml");
  stdfs::remove(repo / "fleet/etc");
  const std::string c6 = commit_all(repo, "fixed");
  g = synced_to(hub, c6);
  CHECK(g["status"]["state"] == "synced");
  CHECK(g["status"]["commit"] == c6);
  CHECK(token_named(hub, "shops")["revoked"] == false);
  const auto secret = hub.data_dir() / "gitrepos/fleet/secrets/default/EnrollmentToken-shops.token";
  struct stat st {};
  REQUIRE(::stat(secret.c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0600);
  CHECK(fs::read_file(secret, 4096).value().rfind("flt_enr_", 0) == 0);
  CHECK(hub.campaign(cid)["state"] == "completed");
  auto objects = hub.call("GET", "/v1/objects?applyset=gitrepo-fleet").second["items"];
  CHECK(objects.size() == 3);

  // Deleting the file prunes within the repository's apply set: the token is revoked.
  stdfs::remove(repo / "fleet/tokens.yaml");
  const std::string c7 = commit_all(repo, "no more token");
  g = synced_to(hub, c7);
  CHECK(g["status"]["state"] == "synced");
  CHECK(token_named(hub, "shops")["revoked"] == true);
}

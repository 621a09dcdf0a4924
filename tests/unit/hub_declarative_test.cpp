// [unit] Declarative files through POST /v1/apply on a real HubService and
// SQLite store: the parser's errors (file, document, field) with nothing
// stored, create-or-update by name with a generation, what a running
// campaign refuses, paused, server dry runs that predict waves exactly,
// pruning within an apply set, and who may apply what.
#include <catch2/catch.hpp>

#include "tests/support/hub_test_support.hpp"
#include "tests/support/temp_dir.hpp"

#include <map>
#include <string>
#include <vector>

#include "flotilla/bundles/bundle.hpp"
#include "flotilla/common/clock.hpp"
#include "flotilla/common/encoding.hpp"
#include "flotilla/common/fs.hpp"
#include "flotilla/hub/api.hpp"
#include "flotilla/hub/declarative.hpp"
#include "flotilla/hub/service.hpp"
#include "flotilla/hub/store.hpp"
#include "flotilla/v1/enroll.pb.h"

using namespace flotilla;
using namespace flotilla::hub;
using nlohmann::json;
using flotilla::test::body_of;
using flotilla::test::RecordingTransport;
using flotilla::test::TempDir;

namespace {


struct Hub {
  TempDir dir;
  FakeClock clock;
  std::unique_ptr<Store> store;
  std::unique_ptr<HubService> service;
  std::unique_ptr<Api> api;
  RecordingTransport broker;
  bundles::KeyPair key = bundles::generate_key();
  std::string admin;  // "*" admin
  std::vector<std::string> devices;

  Hub() {
    auto s = Store::open((dir.path() / "hub.db").string());
    REQUIRE(s);
    store = std::move(*s);
    ServiceConfig cfg;
    cfg.broker_url = "tcp://127.0.0.1:1";
    cfg.public_url = "http://hub.test";
    cfg.engine_thread = false;
    service = std::make_unique<HubService>(*store, clock, cfg);
    REQUIRE(service->attach_transport(broker));
    api = std::make_unique<Api>(*service);
    admin = token("admin", "*");
  }

  std::string token(const std::string& role, const std::string& project) {
    TokenRecord rec;
    rec.name = role + "@" + project;
    rec.role = role;
    rec.project = project;
    auto t = service->create_token("api", rec);
    REQUIRE(t);
    return t->secret;
  }

  void enroll(int n, const std::map<std::string, std::string>& labels = {{"env", "prod"}},
              const std::string& project = "default") {
    TokenRecord t;
    t.role = "enroll";
    t.labels = labels;
    t.project = project;
    auto tok = service->create_token("enroll", t);
    REQUIRE(tok);
    for (int i = 0; i < n; ++i) {
      auto k = bundles::generate_key();
      v1::EnrollRequest req;
      req.set_enrollment_token(tok->secret);
      req.set_device_public_key(std::string(k.pub.key.begin(), k.pub.key.end()));
      auto proof = bundles::sign_detached(k, bundles::enroll_proof_message(tok->secret, k.pub.key));
      req.set_proof(std::string(proof.begin(), proof.end()));
      auto r = service->enroll(req);
      REQUIRE(r);
      devices.push_back(r->device_id());
    }
  }

  std::string bundle_bytes(uint64_t version, bool sign = true) {
    v1::BundleManifest m;
    m.set_format_version(1);
    m.set_name("edge-base");
    m.set_channel("stable");
    m.set_version(version);
    m.set_expires_unix(clock.now_unix() + 86400);
    auto env = bundles::wrap(m);
    if (sign) REQUIRE(bundles::sign(env, key));
    return bundles::serialize_envelope(env);
  }

  // POST /v1/apply with these files (path -> content) and blobs.
  HttpResponse apply(const std::map<std::string, std::string>& files, const std::string& query = "",
                     const std::map<std::string, std::string>& blobs = {}, const std::string& as = "") {
    json body{{"files", json::array()}, {"blobs", json::array()}};
    for (const auto& [p, c] : files) body["files"].push_back({{"path", p}, {"content", c}});
    for (const auto& [p, b] : blobs) body["blobs"].push_back({{"path", p}, {"base64", to_base64(to_bytes(b))}});
    HttpRequest r;
    r.method = "POST";
    r.target = "/v1/apply" + query;
    r.headers["authorization"] = "Bearer " + (as.empty() ? admin : as);
    r.body = body.dump();
    return api->handle(r);
  }

  json get(const std::string& path) {
    HttpRequest r;
    r.method = "GET";
    r.target = path;
    r.headers["authorization"] = "Bearer " + admin;
    auto resp = api->handle(r);
    INFO(path << " -> " << resp.body);
    REQUIRE(resp.status == 200);
    return body_of(resp);
  }

  // What a failed apply must not have changed.
  json state() {
    json s;
    s["campaigns"] = get("/v1/campaigns")["items"].size();
    s["objects"] = get("/v1/objects")["items"];
    s["bundles"] = get("/v1/bundles")["items"].size();
    s["tokens"] = get("/v1/tokens")["items"].size();
    s["enrollment_tokens"] = get("/v1/enrollment-tokens")["items"];
    s["gitrepos"] = get("/v1/gitrepos")["items"].size();
    return s;
  }

  json object(const json& outcome, const std::string& kind, const std::string& name) {
    for (const auto& o : outcome["objects"]) {
      if (o["kind"] == kind && o["name"] == name) return o;
    }
    FAIL("no " << kind << " " << name << " in " << outcome.dump(2));
    return {};
  }
};

std::string campaign_doc(const std::string& name, const std::string& bundle, const std::string& extra = "") {
  return "apiVersion: flotilla.dev/v1\nkind: Campaign\nmetadata:\n  name: " + name + "\nspec:\n  bundle: \"" + bundle +
         "\"\n  selector: env=prod\n" + extra;
}

const std::string kToken =
    "apiVersion: flotilla.dev/v1\nkind: EnrollmentToken\nmetadata:\n  name: shops\nspec:\n  labels: {env: prod}\n"
    "  max_uses: 10\n  ttl: 720h\n";

std::string error_of(const HttpResponse& r) { return body_of(r)["error"]["message"].get<std::string>(); }

}  // namespace

TEST_CASE("declarative files: each bad document is named by file, document and field, and nothing is stored",
          "[unit][hub][declarative][bad-input]") {
  Hub h;
  h.enroll(3);
  const std::string good = h.bundle_bytes(1);
  // One valid apply first, so "nothing changed" is checked against a hub that holds something.
  REQUIRE(h.apply({{"base.yaml", kToken}}, "?applyset=s").status == 200);
  const json before = h.state();

  struct Case {
    std::string what, content, expect;
    std::map<std::string, std::string> blobs;
  };
  const std::string head = "apiVersion: flotilla.dev/v1\nkind: Campaign\nmetadata:\n  name: c\n";
  const std::vector<Case> cases = {
      {"unknown kind", "apiVersion: flotilla.dev/v1\nkind: Widget\nmetadata: {name: w}\nspec: {}\n",
       "bad.yaml doc 2: kind: unknown kind 'Widget'", {}},
      {"wrong apiVersion", "apiVersion: v1\nkind: Campaign\nmetadata: {name: c}\nspec: {bundle: x}\n",
       "bad.yaml doc 2: apiVersion: must be flotilla.dev/v1", {}},
      {"no name", "apiVersion: flotilla.dev/v1\nkind: Campaign\nmetadata: {}\nspec: {bundle: x}\n",
       "bad.yaml doc 2: metadata.name: is required", {}},
      {"bad name", "apiVersion: flotilla.dev/v1\nkind: Campaign\nmetadata: {name: Bad_Name}\nspec: {bundle: x}\n",
       "bad.yaml doc 2: metadata.name: 'Bad_Name'", {}},
      {"unknown spec field", head + "spec:\n  bundle: x\n  colour: red\n", "bad.yaml doc 2: spec.colour: unknown field", {}},
      {"bad waves", head + "spec:\n  bundle: x\n  strategy:\n    waves: [50, 20, 100]\n",
       "bad.yaml doc 2: spec.strategy.waves: percentages must increase", {}},
      {"strategy typo", head + "spec:\n  bundle: x\n  strategy:\n    speed: fast\n",
       "bad.yaml doc 2: spec.strategy.speed: unknown field", {}},
      {"paused not a bool", head + "spec:\n  bundle: x\n  paused: \"yes\"\n", "bad.yaml doc 2: spec.paused: true or false",
       {}},
      {"bad selector", head + "spec:\n  bundle: x\n  selector: \"env in (a\"\n", "bad.yaml doc 2: spec.selector:", {}},
      {"bad ttl", "apiVersion: flotilla.dev/v1\nkind: EnrollmentToken\nmetadata: {name: t}\nspec: {ttl: forever}\n",
       "bad.yaml doc 2: spec.ttl:", {}},
      {"bad role", "apiVersion: flotilla.dev/v1\nkind: ApiToken\nmetadata: {name: t}\nspec: {role: god}\n",
       "bad.yaml doc 2: spec.role: viewer, operator or admin", {}},
      {"a secret in a file",
       "apiVersion: flotilla.dev/v1\nkind: ApiToken\nmetadata: {name: t}\nspec: {role: viewer, token: flt_api_x}\n",
       "bad.yaml doc 2: spec.token: unknown field", {}},
      {"reserved label",
       "apiVersion: flotilla.dev/v1\nkind: ApiToken\nmetadata:\n  name: t\n  labels: {applyset.flotilla.dev/part-of: x}\n"
       "spec: {role: viewer}\n",
       "bad.yaml doc 2: metadata.labels.applyset.flotilla.dev/part-of: reserved", {}},
      {"bundle path climbs out",
       "apiVersion: flotilla.dev/v1\nkind: BundlePublication\nmetadata: {name: b}\nspec: {file: ../../etc/x.fbundle}\n",
       "bad.yaml doc 2: spec.file: '../../etc/x.fbundle' must be a relative path that stays inside", {}},
      {"absolute bundle path",
       "apiVersion: flotilla.dev/v1\nkind: BundlePublication\nmetadata: {name: b}\nspec: {file: /etc/x.fbundle}\n",
       "bad.yaml doc 2: spec.file: '/etc/x.fbundle'", {}},
      {"bundle not sent",
       "apiVersion: flotilla.dev/v1\nkind: BundlePublication\nmetadata: {name: b}\nspec: {file: b.fbundle}\n",
       "bad.yaml doc 2: spec.file: b.fbundle was not sent", {}},
      {"not a bundle",
       "apiVersion: flotilla.dev/v1\nkind: BundlePublication\nmetadata: {name: b}\nspec: {file: b.fbundle}\n",
       "bad.yaml doc 2: spec.file: b.fbundle is not a bundle", {{"b.fbundle", "garbage"}}},
      {"unsigned bundle",
       "apiVersion: flotilla.dev/v1\nkind: BundlePublication\nmetadata: {name: b}\nspec: {file: b.fbundle}\n",
       "bad.yaml doc 2: spec.file: b.fbundle is not signed", {{"b.fbundle", h.bundle_bytes(7, false)}}},
      {"credentials in a Git URL",
       "apiVersion: flotilla.dev/v1\nkind: GitRepo\nmetadata: {name: g}\nspec: {url: \"https://u:p@example.com/r.git\"}\n",
       "bad.yaml doc 2: spec.url: credentials in the URL", {}},
      {"ssh Git URL", "apiVersion: flotilla.dev/v1\nkind: GitRepo\nmetadata: {name: g}\nspec: {url: \"git@host:r\"}\n",
       "bad.yaml doc 2: spec.url:", {}},
      {"YAML syntax", "apiVersion: flotilla.dev/v1\nkind: [Campaign\n", "bad.yaml: line ", {}},
      {"duplicate key", head + "spec:\n  bundle: x\n  bundle: y\n", "bad.yaml: doc 2: key 'bundle' appears twice", {}},
      {"billion laughs",
       "a: &a [x,x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
       "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]\n",
       "bad.yaml: doc 2: more than", {}},
      // Valid on their own; the hub refuses them against what it holds.
      {"unknown bundle", campaign_doc("c", "nope:9"), "bad.yaml doc 2: spec.bundle: no bundle 'nope:9' in project default",
       {}},
      {"duplicate object", kToken, "bad.yaml doc 2: metadata.name: EnrollmentToken/default/shops is also declared by bad.yaml doc 1",
       {}},
  };
  for (const auto& c : cases) {
    SECTION(c.what) {
      // Document 1 is valid (a token the apply would otherwise create), so a
      // refusal must also undo what came before the bad document.
      const std::string first = c.what == "duplicate object" ? kToken
                                                             : "apiVersion: flotilla.dev/v1\nkind: EnrollmentToken\n"
                                                               "metadata: {name: extra}\nspec: {}\n";
      auto r = h.apply({{"bad.yaml", first + "---\n" + c.content}}, "?applyset=s", c.blobs);
      INFO(r.body);
      CHECK(r.status >= 400);
      CHECK(r.status < 500);
      CHECK_THAT(error_of(r), Catch::Contains(c.expect));
      CHECK(h.state() == before);
    }
  }

  SECTION("several problems are all reported, each with its place") {
    auto r = h.apply({{"a.yaml", head + "spec: {bundle: x, paused: 3}\n"},
                      {"dir/b.json", R"([{"apiVersion": "flotilla.dev/v1", "kind": "ApiToken", "metadata": {"name": "t"},
                                        "spec": {"role": "root"}}])"}});
    CHECK(r.status == 400);
    CHECK_THAT(error_of(r), Catch::Contains("2 problems"));
    CHECK_THAT(error_of(r), Catch::Contains("a.yaml doc 1: spec.paused"));
    CHECK_THAT(error_of(r), Catch::Contains("dir/b.json doc 1: spec.role"));
    CHECK(h.state() == before);
  }
  SECTION("a request path that leaves the root is refused") {
    auto r = h.apply({{"../x.yaml", kToken}});
    CHECK(r.status == 400);
    CHECK(h.state() == before);
  }
}

TEST_CASE("YAML scalars follow the core schema and paths stay inside their root", "[unit][hub][declarative]") {
  auto docs = yaml_documents("a: true\nb: '12'\nc: 12\nd: 1.5\ne: ~\nf: text\n---\n---\nx: 1\n");
  REQUIRE(docs);
  REQUIRE(docs->size() == 3);
  const json& d = (*docs)[0];
  CHECK(d["a"] == true);
  CHECK(d["b"] == "12");
  CHECK(d["c"] == 12);
  CHECK(d["d"] == 1.5);
  CHECK(d["e"].is_null());
  CHECK(d["f"] == "text");
  CHECK((*docs)[1].is_null());

  CHECK(fs::confined_path("a/b", "../c.fbundle") == "a/c.fbundle");
  CHECK(fs::confined_path("a", "./x/../y") == "a/y");
  CHECK(fs::confined_path("", "x") == "x");
  CHECK_FALSE(fs::confined_path("a", "../../x"));
  CHECK_FALSE(fs::confined_path("", "../x"));
  CHECK_FALSE(fs::confined_path("a", "/etc/passwd"));
  CHECK_FALSE(fs::confined_path("a", ""));
  CHECK_FALSE(fs::confined_path("a", ".."));
}

TEST_CASE("apply creates, leaves alone and updates objects by name with a generation",
          "[unit][hub][declarative]") {
  Hub h;
  h.enroll(4);
  const std::string pub =
      "apiVersion: flotilla.dev/v1\nkind: BundlePublication\nmetadata: {name: edge-1}\nspec: {file: b/edge.fbundle}\n";
  const std::map<std::string, std::string> blobs = {{"b/edge.fbundle", h.bundle_bytes(1)}};
  auto files = [&](const std::string& strategy, const std::string& labels = "") {
    return std::map<std::string, std::string>{
        {"pub.yaml", pub},
        {"x.yaml", kToken + "---\n" + campaign_doc("rollout", "edge-base:1", strategy) + labels}};
  };
  auto r = h.apply(files("  strategy: {max_in_flight: 2}\n"), "", blobs);
  REQUIRE(r.status == 200);
  json out = body_of(r);
  CHECK(out["changed"] == 3);
  const json c1 = h.object(out, "Campaign", "rollout");
  CHECK(c1["action"] == "created");
  CHECK(c1["generation"] == 1);
  CHECK(c1["observed_generation"] == 1);
  CHECK(c1["devices"] == 4);
  const std::string cid = c1["id"];
  CHECK(cid == declared_campaign_id("default", "rollout", 1));
  CHECK(h.get("/v1/campaigns/" + cid)["strategy"]["max_in_flight"] == 2);
  const json t1 = h.object(out, "EnrollmentToken", "shops");
  CHECK(t1["secret"].get<std::string>().rfind("flt_enr_", 0) == 0);
  CHECK(h.object(out, "BundlePublication", "edge-1")["desired"]["bundle"]["version"] == 1);

  // The same files again: nothing changes, no secret is made.
  r = h.apply(files("  strategy: {max_in_flight: 2}\n"), "", blobs);
  out = body_of(r);
  CHECK(out["changed"] == 0);
  for (const auto& o : out["objects"]) {
    CHECK(o["action"] == "unchanged");
    CHECK(o["generation"] == 1);
    CHECK_FALSE(o.contains("secret"));
  }

  // A spec change: configured, generation 2, the campaign's strategy follows.
  r = h.apply(files("  strategy: {max_in_flight: 3}\n"), "", blobs);
  out = body_of(r);
  const json c2 = h.object(out, "Campaign", "rollout");
  CHECK(c2["action"] == "configured");
  CHECK(c2["generation"] == 2);
  CHECK(c2["id"] == cid);
  CHECK(c2["live"]["spec"]["strategy"]["max_in_flight"] == 2);
  CHECK(c2["desired"]["spec"]["strategy"]["max_in_flight"] == 3);
  CHECK(h.get("/v1/campaigns/" + cid)["strategy"]["max_in_flight"] == 3);

  // Labels alone: configured, but the generation counts spec changes only.
  r = h.apply({{"pub.yaml", pub},
               {"x.yaml", kToken + "---\napiVersion: flotilla.dev/v1\nkind: Campaign\nmetadata:\n  name: rollout\n"
                                   "  labels: {team: edge}\nspec:\n  bundle: \"edge-base:1\"\n  selector: env=prod\n"
                                   "  strategy: {max_in_flight: 3}\n"}},
              "", blobs);
  const json c3 = h.object(body_of(r), "Campaign", "rollout");
  CHECK(c3["action"] == "configured");
  CHECK(c3["generation"] == 2);

  // A token's declared fields change in place; its expiry counts from creation.
  auto shops = [&] {
    const json list = h.get("/v1/enrollment-tokens");
    for (const auto& t : list["items"]) {
      if (t["name"] == "shops" && t["revoked"] == false) return t;
    }
    FAIL("no active token shops");
    return json();
  };
  const json tok_before = shops();
  h.clock.advance(std::chrono::hours(5));
  std::string token2 = kToken;
  token2.replace(token2.find("max_uses: 10"), 12, "max_uses: 20");
  r = h.apply({{"t.yaml", token2}});
  const json t2 = h.object(body_of(r), "EnrollmentToken", "shops");
  CHECK(t2["action"] == "configured");
  CHECK_FALSE(t2.contains("secret"));
  const json tok_after = shops();
  CHECK(tok_after["id"] == tok_before["id"]);
  CHECK(tok_after["max_uses"] == 20);
  CHECK(tok_after["expires_at"] == tok_before["expires_at"]);

  // A revoked token is not brought back: the object gets a new token and secret.
  HttpRequest del;
  del.method = "DELETE";
  del.target = "/v1/enrollment-tokens/" + tok_after["id"].get<std::string>();
  del.headers["authorization"] = "Bearer " + h.admin;
  REQUIRE(h.api->handle(del).status == 200);
  r = h.apply({{"t.yaml", token2}});
  const json t3 = h.object(body_of(r), "EnrollmentToken", "shops");
  CHECK(t3["action"] == "created");
  CHECK(t3["id"] != tok_after["id"]);
  CHECK(t3["secret"].is_string());
  CHECK_THAT(t3["detail"].get<std::string>(), Catch::Contains("was revoked"));
}

TEST_CASE("a running campaign refuses what it cannot change, with the reason, and a finished one starts a new run",
          "[unit][hub][declarative]") {
  Hub h;
  h.enroll(3);
  const std::map<std::string, std::string> blobs = {{"one.fbundle", h.bundle_bytes(1)}, {"two.fbundle", h.bundle_bytes(2)}};
  const std::string pubs =
      "apiVersion: flotilla.dev/v1\nkind: BundlePublication\nmetadata: {name: one}\nspec: {file: one.fbundle}\n---\n"
      "apiVersion: flotilla.dev/v1\nkind: BundlePublication\nmetadata: {name: two}\nspec: {file: two.fbundle}\n";
  REQUIRE(h.apply({{"p.yaml", pubs}, {"c.yaml", campaign_doc("r", "edge-base:1", "  strategy: {waves: [50, 100]}\n")}},
                  "", blobs)
              .status == 200);
  const std::string cid = declared_campaign_id("default", "r", 1);
  REQUIRE(h.get("/v1/campaigns/" + cid)["state"] == "running");
  const json before = h.state();

  struct Case {
    std::string doc, field, why;
  };
  for (const auto& c : std::vector<Case>{
           {campaign_doc("r", "edge-base:2", "  strategy: {waves: [50, 100]}\n"), "spec.bundle", "is what its devices"},
           {"apiVersion: flotilla.dev/v1\nkind: Campaign\nmetadata: {name: r}\nspec:\n  bundle: \"edge-base:1\"\n"
            "  selector: env=dev\n  strategy: {waves: [50, 100]}\n",
            "spec.selector", "chosen when it started"},
           {campaign_doc("r", "edge-base:1", "  strategy: {waves: [20, 100]}\n"), "spec.strategy.waves",
            "put into waves"},
           {campaign_doc("r", "edge-base:1",
                         "  strategy: {waves: [50, 100], maintenance_window: {start: \"01:00\", end: \"03:00\"}}\n"),
            "spec.strategy.maintenance_window", "time zones were read"}}) {
    auto r = h.apply({{"p.yaml", pubs}, {"c.yaml", c.doc}}, "", blobs);
    INFO(r.body);
    CHECK(r.status == 409);
    CHECK_THAT(error_of(r), Catch::Contains("c.yaml doc 1: " + c.field + ": campaign r (" + cid + ") is running"));
    CHECK_THAT(error_of(r), Catch::Contains(c.why));
    CHECK(h.state() == before);
  }

  // Pacing and gates may change while it runs: the stored strategy follows.
  {
    auto r = h.apply({{"p.yaml", pubs},
                      {"c.yaml", campaign_doc("r", "edge-base:1",
                                              "  strategy: {waves: [50, 100], rate: {max_per_minute: 30}, "
                                              "approval: [\"wave 2\"], membership: static}\n")}},
                     "", blobs);
    INFO(r.body);
    REQUIRE(r.status == 200);
    const json st = h.get("/v1/campaigns/" + cid)["strategy"];
    CHECK(st["rate"]["max_per_minute"] == 30);
    CHECK(st["approval"] == json::array({"wave 2"}));
    CHECK(st["membership"] == "static");
  }

  // Once it is over, a new bundle is a new run under the same name.
  REQUIRE(h.service->campaign_action(cid, "abort"));
  auto r = h.apply({{"p.yaml", pubs}, {"c.yaml", campaign_doc("r", "edge-base:2", "  strategy: {waves: [50, 100]}\n")}},
                   "", blobs);
  REQUIRE(r.status == 200);
  const json c = h.object(body_of(r), "Campaign", "r");
  CHECK(c["action"] == "configured");
  CHECK(c["id"] == declared_campaign_id("default", "r", 2));
  CHECK_THAT(c["detail"].get<std::string>(), Catch::Contains("new run (" + cid + " was aborted)"));
  CHECK(h.get("/v1/campaigns/" + c["id"].get<std::string>())["bundle"]["version"] == 2);
  CHECK(h.get("/v1/campaigns/" + cid)["state"] == "aborted");
}

TEST_CASE("paused: true pauses and false resumes, when the field changes", "[unit][hub][declarative]") {
  Hub h;
  h.enroll(2);
  const std::map<std::string, std::string> blobs = {{"b.fbundle", h.bundle_bytes(1)}};
  const std::string pub =
      "apiVersion: flotilla.dev/v1\nkind: BundlePublication\nmetadata: {name: b}\nspec: {file: b.fbundle}\n---\n";
  auto r = h.apply({{"c.yaml", pub + campaign_doc("r", "edge-base:1", "  paused: true\n")}}, "", blobs);
  REQUIRE(r.status == 200);
  const std::string cid = h.object(body_of(r), "Campaign", "r")["id"];
  CHECK(h.get("/v1/campaigns/" + cid)["state"] == "paused");
  h.service->tick();
  CHECK(h.broker.published().empty());  // a paused campaign releases nobody

  r = h.apply({{"c.yaml", pub + campaign_doc("r", "edge-base:1", "  paused: false\n")}}, "", blobs);
  CHECK(h.object(body_of(r), "Campaign", "r")["detail"] == "resumed");
  CHECK(h.get("/v1/campaigns/" + cid)["state"] == "running");

  // Paused by someone else (an operator, or the failure threshold): the same
  // file applied again does not resume it.
  REQUIRE(h.service->campaign_action(cid, "pause"));
  r = h.apply({{"c.yaml", pub + campaign_doc("r", "edge-base:1", "  paused: false\n")}}, "", blobs);
  CHECK(h.object(body_of(r), "Campaign", "r")["action"] == "unchanged");
  CHECK(h.get("/v1/campaigns/" + cid)["state"] == "paused");
}

TEST_CASE("a server dry run predicts devices per wave exactly and changes nothing", "[unit][hub][declarative]") {
  Hub h;
  h.enroll(40);
  const std::map<std::string, std::string> blobs = {{"b.fbundle", h.bundle_bytes(1)}};
  const std::map<std::string, std::string> files = {
      {"c.yaml", "apiVersion: flotilla.dev/v1\nkind: BundlePublication\nmetadata: {name: b}\nspec: {file: b.fbundle}\n"
                 "---\n" + campaign_doc("r", "edge-base:1", "  strategy: {canary: 3, waves: [25, 60, 100]}\n") + "---\n" +
                 kToken}};
  const json empty = h.state();
  // A dry run plans the campaign and writes none of its rows (with a store
  // per cell, they would be writes to other files than the control write's):
  // here a row written would abort the apply.
  REQUIRE(h.store->db().exec("CREATE TRIGGER no_rows BEFORE INSERT ON campaign_devices "
                             "BEGIN SELECT RAISE(ABORT, 'a dry run wrote a campaign row'); END"));
  auto dry = h.apply(files, "?dryRun=true", blobs);
  REQUIRE(dry.status == 200);
  REQUIRE(h.store->db().exec("DROP TRIGGER no_rows"));
  const json d = body_of(dry);
  CHECK(d["dry_run"] == true);
  const json dc = h.object(d, "Campaign", "r");
  CHECK(dc["action"] == "created");
  CHECK(dc["devices"] == 40);
  REQUIRE(dc["waves"].size() == 4);
  CHECK(dc["waves"][0]["name"] == "canary");
  CHECK(dc["waves"][0]["devices"] == 3);
  int64_t sum = 0;
  for (const auto& w : dc["waves"]) sum += w["devices"].get<int64_t>();
  CHECK(sum == 40);
  CHECK_FALSE(h.object(d, "EnrollmentToken", "shops").contains("secret"));
  CHECK(h.state() == empty);
  CHECK(h.store->list_campaigns()->empty());

  auto real = h.apply(files, "", blobs);
  REQUIRE(real.status == 200);
  const json rc = h.object(body_of(real), "Campaign", "r");
  CHECK(rc["waves"] == dc["waves"]);
  CHECK(rc["id"] == dc["id"]);
  // And the campaign's own per-wave counts agree.
  const json view = h.get("/v1/campaigns/" + rc["id"].get<std::string>());
  for (size_t i = 0; i < view["waves"].size(); ++i) {
    CHECK(view["waves"][i]["counts"]["total"] == dc["waves"][i]["devices"]);
  }
}

TEST_CASE("prune removes only objects of the same apply set: a running campaign is aborted, a token revoked",
          "[unit][hub][declarative]") {
  Hub h;
  h.enroll(2);
  const std::map<std::string, std::string> blobs = {{"b.fbundle", h.bundle_bytes(1)}};
  const std::string pub =
      "apiVersion: flotilla.dev/v1\nkind: BundlePublication\nmetadata: {name: b}\nspec: {file: b.fbundle}\n";
  const std::string other_token =
      "apiVersion: flotilla.dev/v1\nkind: EnrollmentToken\nmetadata: {name: other}\nspec: {}\n";
  const std::string loose_token =
      "apiVersion: flotilla.dev/v1\nkind: EnrollmentToken\nmetadata: {name: loose}\nspec: {}\n";
  REQUIRE(h.apply({{"a.yaml", pub + "---\n" + kToken + "---\n" + campaign_doc("r", "edge-base:1")}}, "?applyset=mine",
                  blobs)
              .status == 200);
  REQUIRE(h.apply({{"o.yaml", other_token}}, "?applyset=theirs").status == 200);
  REQUIRE(h.apply({{"l.yaml", loose_token}}).status == 200);
  const std::string cid = declared_campaign_id("default", "r", 1);
  REQUIRE(h.get("/v1/campaigns/" + cid)["state"] == "running");

  SECTION("prune needs an apply set") {
    auto r = h.apply({{"a.yaml", pub}}, "?prune=true", blobs);
    CHECK(r.status == 400);
    CHECK_THAT(error_of(r), Catch::Contains("prune needs an apply set"));
  }
  SECTION("an object owned by another apply set is refused, not taken over") {
    const json before = h.state();
    auto r = h.apply({{"o.yaml", other_token}}, "?applyset=mine");
    CHECK(r.status == 409);
    CHECK_THAT(error_of(r), Catch::Contains("o.yaml doc 1: metadata.name: EnrollmentToken default/other belongs to "
                                            "apply set 'theirs'"));
    CHECK(h.state() == before);
  }
  SECTION("a dry run shows the prunes and keeps everything") {
    const json before = h.state();
    auto r = h.apply({{"a.yaml", pub}}, "?applyset=mine&prune=true&dryRun=true", blobs);
    REQUIRE(r.status == 200);
    const json out = body_of(r);
    CHECK(h.object(out, "Campaign", "r")["action"] == "pruned");
    CHECK(h.object(out, "EnrollmentToken", "shops")["action"] == "pruned");
    CHECK(h.state() == before);
  }
  SECTION("pruning") {
    auto r = h.apply({{"a.yaml", pub}}, "?applyset=mine&prune=true", blobs);
    REQUIRE(r.status == 200);
    const json out = body_of(r);
    CHECK(out["objects"].size() == 3);
    CHECK(h.object(out, "BundlePublication", "b")["action"] == "unchanged");
    const json pc = h.object(out, "Campaign", "r");
    CHECK(pc["action"] == "pruned");
    CHECK_THAT(pc["detail"].get<std::string>(), Catch::Contains("aborted campaign " + cid + " (it was running)"));
    CHECK(h.get("/v1/campaigns/" + cid)["state"] == "aborted");
    CHECK_THAT(h.object(out, "EnrollmentToken", "shops")["detail"].get<std::string>(), Catch::Contains("revoked"));
    std::map<std::string, bool> revoked;
    const json tokens = h.get("/v1/enrollment-tokens");
    for (const auto& t : tokens["items"]) revoked[t["name"]] = t["revoked"];
    CHECK(revoked["shops"] == true);
    CHECK(revoked["other"] == false);  // another set's
    CHECK(revoked["loose"] == false);  // applied without a set
    json names = json::array();
    const json objects = h.get("/v1/objects");
    for (const auto& o : objects["items"]) names.push_back(o["metadata"]["name"]);
    CHECK(names == json::array({"b", "loose", "other"}));
  }
}

TEST_CASE("who may apply what: roles per kind, and a project token stays in its project",
          "[unit][hub][declarative][security]") {
  Hub h;
  h.enroll(1);
  const std::string viewer_all = h.token("viewer", "*"), operator_all = h.token("operator", "*");
  const std::string admin_a = h.token("admin", "a"), operator_a = h.token("operator", "a");
  const json before = h.state();
  const std::string api_token = "apiVersion: flotilla.dev/v1\nkind: ApiToken\nmetadata: {name: t}\nspec: {role: admin}\n";
  auto viewer = h.apply({{"t.yaml", kToken}}, "", {}, viewer_all);
  CHECK(viewer.status == 403);
  auto op = h.apply({{"t.yaml", api_token}}, "", {}, operator_all);
  CHECK(op.status == 403);
  CHECK_THAT(error_of(op), Catch::Contains("t.yaml doc 1: kind: an operator token cannot apply ApiToken objects (needs admin)"));
  auto other = h.apply({{"t.yaml", "apiVersion: flotilla.dev/v1\nkind: EnrollmentToken\nmetadata: {name: e, project: b}\n"
                                   "spec: {}\n"}},
                       "", {}, admin_a);
  CHECK(other.status == 403);
  CHECK_THAT(error_of(other), Catch::Contains("metadata.project: your token is for project a"));
  auto git = h.apply({{"g.yaml", "apiVersion: flotilla.dev/v1\nkind: GitRepo\nmetadata: {name: g}\nspec: {url: /srv/x}\n"}},
                     "", {}, operator_all);
  CHECK(git.status == 403);
  CHECK(h.state() == before);
  // A project token's objects land in its project.
  auto mine = h.apply({{"t.yaml", kToken}}, "", {}, operator_a);
  REQUIRE(mine.status == 200);
  CHECK(h.object(body_of(mine), "EnrollmentToken", "shops")["project"] == "a");
}

TEST_CASE("an object removed behind apply's back is made again by the next apply", "[unit][hub][declarative]") {
  Hub h;
  const std::string repo =
      "apiVersion: flotilla.dev/v1\nkind: GitRepo\nmetadata: {name: fleet}\nspec: {url: /srv/git/fleet, interval: 5m}\n";
  auto r = h.apply({{"g.yaml", repo}});
  REQUIRE(r.status == 200);
  CHECK(h.object(body_of(r), "GitRepo", "fleet")["action"] == "created");
  const json g = h.get("/v1/gitrepos/fleet");
  CHECK(g["url"] == "/srv/git/fleet");
  CHECK(g["interval"] == "300s");
  CHECK(g["status"]["state"] == "disabled");  // no Git sync runs in this test

  HttpRequest del;
  del.method = "DELETE";
  del.target = "/v1/gitrepos/fleet";
  del.headers["authorization"] = "Bearer " + h.admin;
  REQUIRE(h.api->handle(del).status == 200);
  r = h.apply({{"g.yaml", repo}});
  REQUIRE(r.status == 200);
  CHECK(h.object(body_of(r), "GitRepo", "fleet")["action"] == "created");
  CHECK(h.get("/v1/gitrepos/fleet")["url"] == "/srv/git/fleet");
  // And again: now it is there, so nothing to do.
  CHECK(h.object(body_of(h.apply({{"g.yaml", repo}})), "GitRepo", "fleet")["action"] == "unchanged");
}

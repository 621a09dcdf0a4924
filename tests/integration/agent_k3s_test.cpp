// Issue 15, the agent on real devices: a real hub, real flotilla-agent
// processes and the k3s stand-in (simulator/k3s-standin) behaving like k3s
// where the agent depends on it, under the FAKE init tools
// (tests/fakes/fake-init-tool) where systemd or OpenRC is asked for.
#include <catch2/catch.hpp>

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <set>

#include "flotilla/bundles/bundle.hpp"
#include "flotilla/common/crypto.hpp"
#include "flotilla/common/encoding.hpp"
#include "flotilla/common/fs.hpp"
#include "tests/support/harness.hpp"

using namespace flotilla;
using namespace flotilla::test;

namespace {

constexpr const char* kBaseVersion = "v1.30.4+k3s1";

struct K3sNode {
  TempDir tmp;
  Hub hub{tmp.path() / "hub"};
  bundles::KeyPair release = bundles::generate_key();
  std::unique_ptr<test::Agent> agent;
  std::map<std::string, std::string> env;

  // fake_tool: "systemctl" or "rc-service" (or "" for direct supervision).
  // bare: no k3s on the device yet. before_start runs on the device root.
  K3sNode(const std::string& fake_tool, bool bare, const std::string& extra_config = "",
          const std::function<void(const stdfs::path&)>& before_start = {},
          const std::map<std::string, std::string>& extra_env = {}) {
    env = extra_env;
    hub.start();
    AgentOptions o;
    o.root_keys = {bundles::public_key_text(release.pub)};
    o.health_timeout = "10s";
    agent = std::make_unique<test::Agent>(tmp.path() / "dev", hub.url(), hub.enrollment_token({{"env", "it"}}), o);
    agent->append_config("drift-interval: 0\nsupervise-interval: 1s\n" + extra_config);
    if (bare) stdfs::remove(agent->root() / "usr/local/bin/k3s");
    if (!fake_tool.empty()) {
      const auto fakebin = tmp.path() / "fakebin";
      stdfs::create_directories(fakebin);
      for (const std::string& tool : {fake_tool, std::string(fake_tool == "rc-service" ? "rc-update" : "")}) {
        if (!tool.empty()) stdfs::copy_file(source_dir() + "/tests/fakes/fake-init-tool", fakebin / tool);
      }
      const char* path = std::getenv("PATH");
      env["PATH"] = fakebin.string() + ":" + (path ? path : "/usr/bin:/bin");
      env["FAKE_INIT_ROOT"] = agent->root().string();
      agent->append_config(std::string("service-manager: ") + (fake_tool == "systemctl" ? "systemd" : "openrc") + "\n");
    }
    if (before_start) before_start(agent->root());
    agent->start_with_env(env);
    REQUIRE(wait_until([&] { return !agent->device_id().empty() && hub.device(agent->device_id())["online"] == true; },
                       std::chrono::seconds(30)));
  }

  // A stand-in "build" of another k3s version (and behaviour), as bytes.
  std::string k3s_build(const std::string& version, const std::vector<std::string>& flags = {}) {
    const auto out = tmp.path() / ("k3s-" + version + "-" + std::to_string(flags.size()));
    std::vector<std::string> argv = {bin_dir() + "/k3s-standin", "standin-build", "--version", version};
    for (const auto& f : flags) argv.insert(argv.end(), {"--flag", f});
    argv.insert(argv.end(), {"--out", out.string()});
    auto r = proc::run(argv, std::chrono::seconds(30));
    REQUIRE(r);
    INFO(r->err);
    REQUIRE(r->exit_code == 0);
    return fs::read_file(out, 256u << 20).value();
  }

  std::string upload(const std::string& content) {
    const std::string hex = crypto::sha256_hex(content);
    auto [status, body] = hub.call("PUT", "/v1/artifacts/" + hex, content, "application/octet-stream");
    INFO(body.dump());
    REQUIRE((status == 201 || status == 200));
    return hex;
  }

  // Signs and uploads; `k3s` (bytes) becomes a k3s-binary artifact.
  std::string push(v1::BundleManifest m, const std::string& k3s = "") {
    if (!k3s.empty()) {
      const std::string hex = upload(k3s);
      auto* a = m.add_artifacts();
      a->set_kind(v1::ARTIFACT_KIND_K3S_BINARY);
      a->set_name("k3s");
      a->set_url(hex);
      const auto raw = from_hex(hex).value();
      a->set_sha256(std::string(raw.begin(), raw.end()));
      a->set_size(k3s.size());
    }
    auto envl = bundles::wrap(m);
    REQUIRE(bundles::sign(envl, release));
    auto [status, body] = hub.call("POST", "/v1/bundles", bundles::serialize_envelope(envl), "application/octet-stream");
    INFO(body.dump());
    REQUIRE((status == 201 || status == 200));  // 200: the same bundle again
    return body["id"].get<std::string>();
  }

  void campaign(const std::string& bundle_id) {
    auto [status, body] = hub.call("POST", "/v1/campaigns", json{{"bundle", bundle_id}, {"selector", "env=it"}}.dump());
    INFO(body.dump());
    REQUIRE(status == 201);
  }

  json device() { return hub.device(agent->device_id()); }

  // Waits for the final outcome of `version`: applied, or rolled back.
  json outcome(uint64_t version, const std::string& state, std::chrono::seconds within = std::chrono::seconds(60)) {
    INFO("agent log:\n" << agent->log().substr(agent->log().size() > 8000 ? agent->log().size() - 8000 : 0));
    bool ok = wait_until(
        [&] {
          auto d = device();
          if (state == "applied") return d["applied_version"] == version && d["state"] == "applied";
          return d["state"] == state;
        },
        within);
    if (!ok) FAIL("no " << state << " outcome; device: " << device().dump());
    return device();
  }

  std::string file(const std::string& rel) const { return fs::read_file(agent->root() / rel).value_or("<missing>"); }

  proc::RunResult kubectl(const std::vector<std::string>& args) const {
    std::vector<std::string> argv = {(agent->root() / "usr/local/bin/k3s").string(), "kubectl", "--kubeconfig",
                                     (agent->root() / "etc/rancher/k3s/k3s.yaml").string()};
    argv.insert(argv.end(), args.begin(), args.end());
    auto r = proc::run(argv, std::chrono::seconds(10));
    REQUIRE(r);
    return *r;
  }
  bool k3s_ready() const {
    auto r = kubectl({"get", "--raw", "/readyz"});
    return r.exit_code == 0 && r.out == "ok";
  }
};

v1::BundleManifest bundle(uint64_t version, const BundleFiles& files = {}) {
  BundleFiles all = {{v1::FILE_KIND_K3S_CONFIG, "10-edge.yaml", "node-label: v" + std::to_string(version) + "\n"}};
  all.insert(all.end(), files.begin(), files.end());
  auto m = make_manifest("edge", version, all);
  m.set_k3s_version(kBaseVersion);
  return m;
}

const char* kWebDeployment =
    "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n  namespace: default\nspec:\n  replicas: 2\n";

}  // namespace

TEST_CASE("a first install on a bare systemd or OpenRC device writes k3s's unit and starts it through the init tool",
          "[integration][agent][k3s][service]") {
  for (const char* tool_name : {"systemctl", "rc-service"}) {
    const std::string tool = tool_name;
    DYNAMIC_SECTION(tool) {
      K3sNode n(tool, /*bare=*/true);
      const std::string unit = tool == "systemctl" ? "etc/systemd/system/k3s.service" : "etc/init.d/k3s";
      CHECK_FALSE(stdfs::exists(n.agent->root() / unit));
      const std::string k3s = n.k3s_build(kBaseVersion);
      n.campaign(n.push(bundle(1), k3s));
      n.outcome(1, "applied");
      // The unit as k3s's install.sh writes it, registered with the init system.
      const std::string text = n.file(unit);
      if (tool == "systemctl") {
        CHECK_THAT(text, Catch::Contains("Type=notify") && Catch::Contains("TimeoutStartSec=0") &&
                             Catch::Contains("ExecStart=" + (n.agent->root() / "usr/local/bin/k3s").string()));
        CHECK(stdfs::exists(n.agent->root() / "etc/systemd/system/k3s.service.env"));
        CHECK_THAT(n.file("fake-init.log"), Catch::Contains("systemctl daemon-reload") &&
                                                Catch::Contains("systemctl enable k3s") &&
                                                Catch::Contains("systemctl restart k3s"));
      } else {
        CHECK_THAT(text, Catch::StartsWith("#!/sbin/openrc-run") && Catch::Contains("supervisor=supervise-daemon"));
        CHECK_THAT(n.file("fake-init.log"), Catch::Contains("rc-update add k3s default") &&
                                                Catch::Contains("rc-service k3s restart"));
      }
      CHECK(wait_until([&] { return n.k3s_ready(); }, std::chrono::seconds(20)));
      CHECK(n.device()["k3s_version"] == kBaseVersion);
      // Flotilla's own settings are a drop-in; there is no config.yaml to edit.
      CHECK_FALSE(stdfs::exists(n.agent->root() / "etc/rancher/k3s/config.yaml"));
      CHECK_THAT(n.file("etc/rancher/k3s/config.yaml.d/00-flotilla-node.yaml"), Catch::Contains("data-dir: "));
    }
  }
}

TEST_CASE("an adopted node keeps its config.yaml byte-identical through apply and rollback",
          "[integration][agent][k3s][adopt]") {
  const std::string config =
      "# written by k3s install.sh's user\ntoken: K10abc::server:s3cret\ntls-san:\n  - edge.example\n"
      "node-label:\n  - site=berlin\n";
  K3sNode n("systemctl", false, "", [&](const stdfs::path& root) {
    stdfs::create_directories(root / "etc/rancher/k3s");
    REQUIRE(fs::write_file_atomic(root / "etc/rancher/k3s/config.yaml", config, 0600));
    // Its own unit, as install.sh left it: adopted, never rewritten.
    stdfs::create_directories(root / "etc/systemd/system");
    REQUIRE(fs::write_file_atomic(root / "etc/systemd/system/k3s.service",
                                  "[Service]\nType=notify\nExecStart=" + (root / "usr/local/bin/k3s").string() +
                                      " server --config " + (root / "etc/rancher/k3s/config.yaml").string() + "\n",
                                  0644));
  });
  const std::string unit_before = n.file("etc/systemd/system/k3s.service");
  n.campaign(n.push(bundle(1)));
  n.outcome(1, "applied");
  CHECK(n.file("etc/rancher/k3s/config.yaml") == config);
  // A k3s that never gets ready: rolled back, config.yaml untouched again.
  n.campaign(n.push(bundle(2), n.k3s_build(kBaseVersion, {"never-ready=true"})));
  auto d = n.outcome(2, "rolled_back");
  CHECK(d["applied_version"] == 1);
  CHECK(n.file("etc/rancher/k3s/config.yaml") == config);
  CHECK(n.file("etc/systemd/system/k3s.service") == unit_before);
  // The drop-in leaves alone what config.yaml sets.
  CHECK_THAT(n.file("etc/rancher/k3s/config.yaml.d/00-flotilla-node.yaml"), !Catch::Contains("token"));
}

TEST_CASE("the health gate is not fooled by a stale Ready, a wrong k3s version or a workload that never rolls out",
          "[integration][agent][k3s][health]") {
  K3sNode n("", false);
  n.campaign(n.push(bundle(1)));
  n.outcome(1, "applied");

  SECTION("Ready from before the restart for 20 s, then never up") {
    // The new k3s serves its API, but its kubelet never posts: the node shows
    // the old Ready (old heartbeat) until the 20 s grace period ends.
    n.campaign(n.push(bundle(2), n.k3s_build("v1.30.4+k3s1", {"kubelet-never-ready=true",
                                                               "node-monitor-grace-ms=20000"})));
    auto d = n.outcome(2, "rolled_back");
    CHECK(d["applied_version"] == 1);
    CHECK(d["last_reason"] == "health_gate_failed");
    CHECK_THAT(d["last_message"].get<std::string>(), Catch::Contains("before the restart"));
  }
  SECTION("a k3s of another version than the bundle's") {
    auto m = bundle(2);
    m.set_k3s_version("v1.31.0+k3s1");
    n.campaign(n.push(m, n.k3s_build("v1.30.9+k3s1")));
    auto d = n.outcome(2, "rolled_back");
    CHECK(d["last_reason"] == "k3s_version");
    CHECK_THAT(d["last_message"].get<std::string>(), Catch::Contains("v1.30.9+k3s1") && Catch::Contains("v1.31.0+k3s1"));
  }
  SECTION("a workload the bundle names never rolls out") {
    auto m = bundle(2, {{v1::FILE_KIND_MANIFEST, "web.yaml",
                         std::string(kWebDeployment) + "---\n"
                             "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: api\n  annotations:\n"
                             "    standin.flotilla.io/rollout: never\n"}});
    auto* w = m.mutable_health()->add_workloads();
    w->set_kind("Deployment");
    w->set_name("api");
    m.mutable_health()->set_timeout_seconds(10);
    n.campaign(n.push(m));
    auto d = n.outcome(2, "rolled_back");
    CHECK(d["last_reason"] == "workload_not_ready");
    CHECK_THAT(d["last_message"].get<std::string>(), Catch::Contains("Deployment default/api"));
    // The rollback took web.yaml off the node: its resources are gone too.
    CHECK(wait_until([&] { return n.kubectl({"get", "deployment", "web", "-o", "json"}).exit_code != 0; },
                     std::chrono::seconds(20)));
  }
}

TEST_CASE("a bundle upgrade that drops a manifest deletes its resources", "[integration][agent][k3s][manifests]") {
  K3sNode n("", false);
  auto m = bundle(1, {{v1::FILE_KIND_MANIFEST, "web.yaml", kWebDeployment}});
  auto* w = m.mutable_health()->add_workloads();
  w->set_kind("Deployment");
  w->set_name("web");
  n.campaign(n.push(m));
  n.outcome(1, "applied");
  CHECK(n.kubectl({"get", "deployment", "web", "-o", "json"}).exit_code == 0);
  n.campaign(n.push(bundle(2)));
  n.outcome(2, "applied");
  CHECK_FALSE(stdfs::exists(n.agent->root() / "var/lib/rancher/k3s/server/manifests/web.yaml"));
  auto gone = n.kubectl({"get", "deployment", "web", "-o", "json"});
  CHECK(gone.exit_code != 0);
  CHECK_THAT(gone.err, Catch::Contains("not found"));
}

TEST_CASE("relabelling a device on the hub changes the overlay it applies, without enrolling again",
          "[integration][agent][labels]") {
  K3sNode n("", false);
  v1::Overlay berlin;
  berlin.set_selector("site=berlin");
  (*berlin.mutable_k3s_config())["node-label"] = "site-berlin";
  auto m = bundle(1);
  *m.add_overlays() = berlin;
  n.campaign(n.push(m));
  n.outcome(1, "applied");
  CHECK_FALSE(stdfs::exists(n.agent->root() / "etc/rancher/k3s/config.yaml.d/99-flotilla-overlays.yaml"));
  const std::string enrolled_key = n.file("var/lib/flotilla/credentials.pb");
  auto [status, body] = n.hub.call("PATCH", "/v1/devices/" + n.agent->device_id(),
                                   json{{"labels", {{"env", "it"}, {"site", "berlin"}}}}.dump());
  INFO(body.dump());
  REQUIRE(status == 200);
  // The same bundle again: the signed header now carries site=berlin.
  n.campaign(n.push(m));
  CHECK(wait_until([&] {
    return n.file("etc/rancher/k3s/config.yaml.d/99-flotilla-overlays.yaml").find("site-berlin") != std::string::npos;
  }, std::chrono::seconds(40)));
  CHECK(n.file("var/lib/flotilla/credentials.pb") == enrolled_key);  // not enrolled again
  CHECK(wait_until([&] { return n.device()["labels"]["site"] == "berlin"; }, std::chrono::seconds(20)));
}

// No ';' in the name: CTest's test discovery would split it in two.
TEST_CASE("a 3-node cluster is upgraded by one campaign (servers first and one node at a time) and a failing agent "
          "node rolls back alone",
          "[integration][agent][k3s][cluster]") {
  TempDir tmp;
  Hub hub(tmp.path() / "hub");
  hub.start();
  const auto release = bundles::generate_key();
  const int port = free_loopback_port();
  std::vector<std::unique_ptr<test::Agent>> nodes;
  const std::vector<std::pair<std::string, std::string>> spec = {{"srv", "server"}, {"a1", "agent"}, {"a2", "agent"}};
  for (const auto& [name, role] : spec) {
    AgentOptions o;
    o.root_keys = {bundles::public_key_text(release.pub)};
    o.health_timeout = "12s";
    auto node = std::make_unique<test::Agent>(tmp.path() / name, hub.url(),
                                              hub.enrollment_token({{"env", "it"}, {"node", name}}), o);
    const auto root = node->root();
    node->append_config("drift-interval: 0\nsupervise-interval: 1s\ninventory-interval: 1s\ncluster-id: line-1\n"
                        "k3s-role: " + role + "\n");
    if (role == "server") {
      // The user's own config.yaml, as install.sh leaves it: the join token.
      REQUIRE(fs::write_file_atomic(root / "etc/rancher/k3s/config.yaml",
                                    "token: line1secret\nhttps-listen-port: " + std::to_string(port) + "\n", 0600));
    } else {
      REQUIRE(fs::write_file_atomic(root / "etc/rancher/k3s/token", "K10x::server:line1secret\n", 0600));
      node->append_config("k3s-server-url: http://127.0.0.1:" + std::to_string(port) +
                          "\nk3s-token-file: /etc/rancher/k3s/token\n");
    }
    node->start();
    nodes.push_back(std::move(node));
  }
  std::map<std::string, std::string> ids;  // name -> device id
  for (size_t i = 0; i < nodes.size(); ++i) {
    REQUIRE(wait_until([&] { return !nodes[i]->device_id().empty(); }, std::chrono::seconds(30)));
    ids[spec[i].first] = nodes[i]->device_id();
  }
  // Each node reports its role and cluster, and its node is Ready.
  for (const auto& [name, role] : spec) {
    INFO(name);
    CHECK(wait_until(
        [&, n = name, r = role] {
          auto d = hub.device(ids[n]);
          return d["cluster_id"] == "line-1" && d["k3s_role"] == r && d["node_ready"] == true;
        },
        std::chrono::seconds(60)));
  }

  auto build = [&](const std::string& version, const std::vector<std::string>& flags) {
    const auto out = tmp.path() / ("k3s-" + version);
    std::vector<std::string> argv = {bin_dir() + "/k3s-standin", "standin-build", "--version", version};
    for (const auto& f : flags) argv.insert(argv.end(), {"--flag", f});
    argv.insert(argv.end(), {"--out", out.string()});
    auto r = proc::run(argv, std::chrono::seconds(30));
    REQUIRE(r);
    REQUIRE(r->exit_code == 0);
    return fs::read_file(out, 256u << 20).value();
  };
  auto push = [&](uint64_t version, const std::string& k3s_version, const std::string& k3s) {
    auto m = make_manifest("cluster", version, {{v1::FILE_KIND_K3S_CONFIG, "10-edge.yaml", "x: 1\n"}});
    m.set_k3s_version(k3s_version);
    const std::string hex = crypto::sha256_hex(k3s);
    REQUIRE(hub.call("PUT", "/v1/artifacts/" + hex, k3s, "application/octet-stream").first / 100 == 2);
    auto* a = m.add_artifacts();
    a->set_kind(v1::ARTIFACT_KIND_K3S_BINARY);
    a->set_name("k3s");
    a->set_url(hex);
    const auto raw = from_hex(hex).value();
    a->set_sha256(std::string(raw.begin(), raw.end()));
    a->set_size(k3s.size());
    auto envl = bundles::wrap(m);
    REQUIRE(bundles::sign(envl, release));
    auto [status, body] = hub.call("POST", "/v1/bundles", bundles::serialize_envelope(envl), "application/octet-stream");
    REQUIRE(status == 201);
    return body["id"].get<std::string>();
  };
  auto campaign = [&](const std::string& bundle, const std::string& selector) {
    auto [status, body] = hub.call("POST", "/v1/campaigns",
                                   json{{"bundle", bundle}, {"selector", selector},
                                        {"strategy", {{"max_in_flight", 10}}}}.dump());
    INFO(body.dump());
    REQUIRE(status == 201);
  };
  auto down = [](const json& d) {
    const std::string s = d["state"];
    return s == "installing" || s == "restarting" || s == "health_check" || s == "rolling_back" ||
           s == "downloading" || s == "verifying";
  };

  SECTION("servers first, never two nodes down") {
    campaign(push(1, "v1.31.1+k3s1", build("v1.31.1+k3s1", {})), "env=it");
    std::vector<std::string> started;  // names, in the order they began
    int max_down = 0;
    const bool done = wait_until(
        [&] {
          int now_down = 0, applied = 0;
          for (const auto& [name, role] : spec) {
            auto d = hub.device(ids[name]);
            if (down(d)) {
              ++now_down;
              if (std::find(started.begin(), started.end(), name) == started.end()) started.push_back(name);
            }
            applied += d["applied_version"] == 1 && d["state"] == "applied" ? 1 : 0;
          }
          max_down = std::max(max_down, now_down);
          return applied == 3;
        },
        std::chrono::seconds(180));
    INFO("srv log:\n" << nodes[0]->log().substr(nodes[0]->log().size() > 4000 ? nodes[0]->log().size() - 4000 : 0));
    REQUIRE(done);
    CHECK(max_down <= 1);
    REQUIRE_FALSE(started.empty());
    CHECK(started.front() == "srv");
    for (const auto& [name, role] : spec) CHECK(hub.device(ids[name])["k3s_version"] == "v1.31.1+k3s1");
  }
  SECTION("an agent node whose kubelet does not come back is rolled back alone") {
    campaign(push(2, "v1.31.2+k3s1", build("v1.31.2+k3s1", {"kubelet-never-ready=true"})), "node=a2");
    REQUIRE(wait_until([&] { return hub.device(ids["a2"])["state"] == "rolled_back"; }, std::chrono::seconds(120)));
    auto a2 = hub.device(ids["a2"]);
    CHECK(a2["last_reason"] == "health_gate_failed");
    CHECK(wait_until([&] { return hub.device(ids["a2"])["node_ready"] == true; }, std::chrono::seconds(60)));
    for (const char* other : {"srv", "a1"}) CHECK(hub.device(ids[other])["applied_version"] != 2);
  }
}

// A campaign's k3s_action rotate_certificates on the stand-in, which refuses
// to rotate while k3s runs and issues a new serving certificate at the next
// start (simulator/k3s-standin/README.md): the agent stops k3s, rotates,
// starts it, gates it and reports the later expiry; a rotation whose gate
// fails starts k3s again with the old certificates.
TEST_CASE("a campaign rotates k3s's certificates, and a failed rotation restarts k3s with the old ones",
          "[integration][agent][k3s][rotate]") {
  K3sNode n("", false);
  const std::string b1 = n.push(bundle(1));
  n.campaign(b1);
  n.outcome(1, "applied");
  const std::string crt = "var/lib/rancher/k3s/server/tls/serving-kube-apiserver.crt";
  const std::string old_pem = n.file(crt);
  REQUIRE(old_pem.find("BEGIN CERTIFICATE") != std::string::npos);
  const std::string before = n.device()["k3s_cert_expires_at"].get<std::string>();
  REQUIRE_FALSE(before.empty());
  auto rotate = [&](const std::string& bundle_id) {
    auto [status, body] =
        n.hub.call("POST", "/v1/campaigns",
                   json{{"bundle", bundle_id}, {"selector", "env=it"}, {"strategy", {{"k3s_action", "rotate_certificates"}}}}
                       .dump());
    INFO(body.dump());
    REQUIRE(status == 201);
    REQUIRE(body["strategy"]["k3s_action"] == "rotate_certificates");
    return body["id"].get<std::string>();
  };

  SECTION("rotated: the same bundle, a later notAfter in the inventory, the old certificate kept aside") {
    const std::string id = rotate(b1);
    INFO("agent log:\n" << n.agent->log().substr(n.agent->log().size() > 8000 ? n.agent->log().size() - 8000 : 0));
    REQUIRE(wait_until(
        [&] {
          auto d = n.device();
          return d["campaign_id"] == id && d["state"] == "applied" && d["k3s_cert_expires_at"] != before;
        },
        std::chrono::seconds(60)));
    const auto d = n.device();
    CHECK(d["applied_version"] == 1);
    // RFC 3339 in one format: later sorts later.
    CHECK(d["k3s_cert_expires_at"].get<std::string>() > before);
    CHECK(n.file(crt) != old_pem);
    // k3s certificate rotate kept the old one in server/tls-<unix>.
    bool kept = false;
    for (const auto& e : stdfs::directory_iterator(n.agent->root() / "var/lib/rancher/k3s/server")) {
      if (e.path().filename().string().rfind("tls-", 0) == 0) {
        kept = kept || fs::read_file(e.path() / "serving-kube-apiserver.crt").value_or("") == old_pem;
      }
    }
    CHECK(kept);
    CHECK(n.k3s_ready());
  }
  SECTION("the gate fails after the rotation: rolled back, k3s runs with the old certificate") {
    auto m = bundle(2, {{v1::FILE_KIND_MANIFEST, "api.yaml",
                         "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: api\n  annotations:\n"
                         "    standin.flotilla.io/rollout: never\n"}});
    auto* w = m.mutable_health()->add_workloads();
    w->set_kind("Deployment");
    w->set_name("api");
    m.mutable_health()->set_timeout_seconds(5);
    rotate(n.push(m));
    auto d = n.outcome(2, "rolled_back");
    CHECK(d["applied_version"] == 1);
    CHECK(d["last_reason"] == "workload_not_ready");
    CHECK(n.file(crt) == old_pem);
    CHECK(d["k3s_cert_expires_at"] == before);
    CHECK(wait_until([&] { return n.k3s_ready(); }, std::chrono::seconds(20)));
    CHECK_THAT(n.agent->log(), Catch::Contains("k3s certificates restored from"));
  }
}

// k3s (and the stand-in) extracts each new binary's payload into
// data/<hash> and never removes one. After a committed upgrade only the
// running k3s's and the previous one's stay; a failed upgrade's goes with its
// rollback, and the old k3s runs (and data/current names it again).
TEST_CASE("superseded k3s data dirs go after a commit, and a failed upgrade's after its rollback",
          "[integration][agent][k3s][datadirs]") {
  K3sNode n("", false);
  n.campaign(n.push(bundle(1)));
  n.outcome(1, "applied");
  const auto data = n.agent->root() / "var/lib/rancher/k3s/data";
  auto dirs = [&] {
    std::set<std::string> out;
    for (const auto& e : stdfs::directory_iterator(data)) {
      const std::string name = e.path().filename().string();
      if (name[0] != '.' && !e.is_symlink() && e.is_directory()) out.insert(name);
    }
    return out;
  };
  auto added = [&](const std::set<std::string>& before) {
    std::set<std::string> out;
    for (const auto& d : dirs()) {
      if (!before.count(d)) out.insert(d);
    }
    return out;
  };
  const auto first = dirs();
  REQUIRE(first.size() == 1);

  // Two builds of the same version with other payloads: other directories.
  n.campaign(n.push(bundle(2), n.k3s_build(kBaseVersion, {"data-bytes=131072"})));
  n.outcome(2, "applied");
  const auto second = added(first);
  REQUIRE(second.size() == 1);
  CHECK(dirs().size() == 2);  // the previous k3s's stays for a rollback

  n.campaign(n.push(bundle(3), n.k3s_build(kBaseVersion, {"data-bytes=196608"})));
  n.outcome(3, "applied");
  const auto third = added(first);
  CHECK(third.size() == 2);
  auto now = dirs();
  CHECK(now.size() == 2);
  CHECK_FALSE(now.count(*first.begin()));
  CHECK(now.count(*second.begin()));

  const auto kept = dirs();
  n.campaign(n.push(bundle(4), n.k3s_build(kBaseVersion, {"data-bytes=262144", "never-ready=true"})));
  auto d = n.outcome(4, "rolled_back");
  CHECK(d["applied_version"] == 3);
  CHECK(dirs() == kept);
  // It had extracted one (the stand-in extracts before serving), which went.
  CHECK_THAT(n.agent->log(), Catch::Contains("removed 1 data dir(s) the failed k3s extracted"));
  // data/current names the directory the running (old) k3s uses.
  const auto current = stdfs::read_symlink(data / "current").filename().string();
  CHECK(kept.count(current));
  CHECK(wait_until([&] { return n.k3s_ready(); }, std::chrono::seconds(20)));
}

// A new k3s whose start breaks the datastore (the stand-in's
// corrupt-datastore build writes garbage over it and exits, as a failed
// migration would): the gate fails, the agent puts back the snapshot it took
// before the version change, and the old k3s runs on the old data. Then the
// agent is killed (FLOTILLA_AGENT_CRASH_AT: _exit(137) right after that
// journal row, a kill -9 at a known point) at each step of that path; started
// again it recovers, and the node ends consistent: old bundle, old k3s, old
// data, and the retained desired state rolled back once more.
TEST_CASE("a k3s upgrade that corrupts the datastore is rolled back with the datastore restored, even through a kill -9 "
          "at any step",
          "[integration][agent][k3s][datastore]") {
  const std::vector<std::string> points = {"",             "snapshot:begin", "snapshot:end", "install:begin",
                                           "install:end",  "restart:begin",  "restart:end",  "health:begin",
                                           "health:end",   "rollback:begin", "rollback:end"};
  for (const auto& at : points) {
    DYNAMIC_SECTION("kill -9 at " << (at.empty() ? "no step" : at)) {
      K3sNode n("", false);
      const BundleFiles web = {{v1::FILE_KIND_MANIFEST, "web.yaml", kWebDeployment}};
      n.campaign(n.push(bundle(1, web)));
      n.outcome(1, "applied");
      REQUIRE(wait_until([&] { return n.kubectl({"get", "deployment", "web", "-o", "json"}).exit_code == 0; },
                         std::chrono::seconds(20)));
      const std::string db = "var/lib/rancher/k3s/server/db/state.db";
      const std::string before = n.file(db);
      REQUIRE(before != "<missing>");

      if (!at.empty()) {
        n.agent->stop();
        auto env = n.env;
        env["FLOTILLA_AGENT_CRASH_AT"] = at;
        n.agent->start_with_env(env);
      }
      auto m = bundle(2, web);
      m.set_k3s_version("v1.31.0+k3s1");
      n.campaign(n.push(m, n.k3s_build("v1.31.0+k3s1", {"corrupt-datastore=true"})));
      if (!at.empty()) {
        const auto code = n.agent->wait_exit(std::chrono::seconds(60));
        INFO("agent log:\n" << n.agent->log().substr(n.agent->log().size() > 6000 ? n.agent->log().size() - 6000 : 0));
        REQUIRE(code);
        CHECK(*code == 137);
        n.agent->start_with_env(n.env);  // a plain restart: recovery, then the retained state again
      }
      auto d = n.outcome(2, "rolled_back", std::chrono::seconds(90));
      CHECK(d["applied_version"] == 1);
      CHECK(d["k3s_version"] == kBaseVersion);
      // The old k3s runs on the old data: the datastore is the snapshot's and
      // the Deployment from before the upgrade is there.
      CHECK(wait_until([&] { return n.k3s_ready(); }, std::chrono::seconds(20)));
      CHECK(n.file(db).find("corrupted by") == std::string::npos);
      CHECK(n.kubectl({"get", "deployment", "web", "-o", "json"}).exit_code == 0);
      const auto log = n.agent->log();
      CHECK_THAT(log, Catch::Contains("datastore restored from the sqlite snapshot"));
      if (!at.empty() && at != "rollback:end") CHECK_THAT(log, Catch::Contains("found unfinished apply"));
    }
  }
}

// A device without an RTC boots in 1970; another is set 10 years ahead; and
// either may boot behind its last run. With the agent's clock shifted
// (FLOTILLA_TEST_CLOCK_OFFSET_S, a test-only hook the k3s stand-in shares),
// each enrolls, reports and applies against a real hub; after a reboot onto
// the other clock its reports are still taken (sequence numbers are
// persisted, not read off the clock), and it says its clock is wrong.
TEST_CASE("a device whose clock reads 1970 or 10 years ahead keeps enrolling, reporting and applying",
          "[integration][agent][k3s][clock]") {
  const int64_t now = std::chrono::duration_cast<std::chrono::seconds>(
                          std::chrono::system_clock::now().time_since_epoch()).count();
  const std::string in_1970 = std::to_string(-(now - 3600));  // 1970-01-01 01:00
  const std::string ahead = std::to_string(int64_t{10} * 365 * 86400);
  // Section names must not change between runs (Catch re-runs the case per section).
  for (const auto& [name, first, second] : {std::tuple{"1970, then 10 years ahead", in_1970, ahead},
                                            std::tuple{"10 years ahead, then 1970", ahead, in_1970}}) {
    DYNAMIC_SECTION(name) {
      K3sNode n("", false, "", {}, {{"FLOTILLA_TEST_CLOCK_OFFSET_S", first}});
      n.campaign(n.push(bundle(1)));
      auto d = n.outcome(1, "applied");
      CHECK(d["clock_suspect"] == true);
      // A reboot onto the other clock: k3s goes down with the device.
      n.agent->stop();
      if (auto pid = fs::read_file(n.agent->root() / "run/flotilla/k3s.pid", 64)) {
        const pid_t p = static_cast<pid_t>(std::stol(*pid));
        if (p > 1) {
          ::kill(-p, SIGKILL);
          ::kill(p, SIGKILL);
        }
      }
      n.env["FLOTILLA_TEST_CLOCK_OFFSET_S"] = second;
      n.agent->start_with_env(n.env);
      n.campaign(n.push(bundle(2)));
      d = n.outcome(2, "applied", std::chrono::seconds(90));
      CHECK(d["clock_suspect"] == true);
      CHECK(d["online"] == true);
      // The hub took every report of the second run (the outcome above is
      // one), whose clock reads years before or after the first run's.
      CHECK(n.hub.device(n.agent->device_id())["state"] == "applied");
    }
  }
}

#include "tests/support/harness.hpp"

#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <stdexcept>
#include <thread>

#include "flotilla/common/clock.hpp"
#include "flotilla/common/crypto.hpp"
#include "flotilla/bundles/keys.hpp"
#include "flotilla/common/fs.hpp"
#include "flotilla/common/x509.hpp"
#include "flotilla/hub/broker.hpp"
#include "flotilla/hub/device_ca.hpp"
#include "flotilla/v1/enroll.pb.h"

namespace flotilla::test {

std::string bin_dir() {
  const char* d = std::getenv("FLOTILLA_BIN_DIR");
  if (!d) throw std::runtime_error("FLOTILLA_BIN_DIR is not set (run the tests through ctest)");
  return d;
}

std::string source_dir() {
  if (const char* d = std::getenv("FLOTILLA_SOURCE_DIR")) return d;
#ifdef FLOTILLA_TEST_SOURCE_DIR
  return FLOTILLA_TEST_SOURCE_DIR;
#else
  throw std::runtime_error("FLOTILLA_SOURCE_DIR is not set (run the tests through ctest)");
#endif
}

bool wait_until(const std::function<bool()>& pred, std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    if (pred()) return true;
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
}

int free_loopback_port() {
  auto p = hub::free_listen_port("127.0.0.1");
  if (!p) throw std::runtime_error("cannot find a free port: " + p.error().message);
  return *p;
}

bool wait_agent_online(Hub& hub, const Agent& agent, std::chrono::milliseconds timeout) {
  return wait_until([&] { return !agent.device_id().empty() && hub.device(agent.device_id())["online"] == true; },
                    timeout);
}

Hub::Hub(stdfs::path data_dir) : data_(std::move(data_dir)) {}
Hub::~Hub() { stop(); }

void Hub::start() { start({}); }

void Hub::start(const std::vector<std::string>& extra_args, const std::string& ca_file) {
  ca_file_ = ca_file;
  proc::SpawnOptions so;
  so.argv = {bin_dir() + "/flotilla-hub", "--data-dir", data_.string(), "--listen", "127.0.0.1:0",
             "--config", "", "--log-level", "debug"};
  so.argv.insert(so.argv.end(), extra_args.begin(), extra_args.end());
  stdfs::create_directories(data_);
  ::chmod(data_.c_str(), 0711);
  stdfs::remove(data_ / "hub.url");
  so.stdout_path = (data_.parent_path() / (data_.filename().string() + ".log")).string();
  so.stderr_path = "stdout";
  auto c = proc::spawn(so);
  if (!c) throw std::runtime_error("start hub: " + c.error().message);
  child_ = std::move(*c);
  bool ready = wait_until(
      [&] {
        auto u = fs::read_file(data_ / "hub.url", 256);
        if (!u) return false;
        url_ = u->substr(0, u->find('\n'));
        http::Request r;
        r.url = url_ + "/readyz";
        r.timeout = std::chrono::seconds(2);
        r.ca_file = ca_file_;
        auto resp = http::send(r);
        return resp && resp->status == 200;
      },
      std::chrono::seconds(20));
  if (!ready) throw std::runtime_error("hub did not become ready; log:\n" + log());
}

void Hub::stop() {
  if (child_.valid()) child_.terminate(std::chrono::seconds(10));
}

void Hub::kill9() { child_.kill_now(); }

std::string Hub::log() const {
  return fs::read_file(data_.parent_path() / (data_.filename().string() + ".log")).value_or("");
}

std::string Hub::admin_token() const {
  auto t = fs::read_file(data_ / "admin.token", 4096);
  if (!t) throw std::runtime_error("no admin token: " + t.error().message);
  return t->substr(0, t->find('\n'));
}

std::pair<int, json> Hub::call(const std::string& method, const std::string& path, const std::string& body,
                               const std::string& content_type, std::optional<std::string> token) {
  http::Request r;
  r.method = method;
  r.url = url_ + path;
  r.body = body;
  if (!body.empty()) r.headers["Content-Type"] = content_type;
  const std::string tok = token ? *token : admin_token();
  if (!tok.empty()) r.headers["Authorization"] = "Bearer " + tok;
  r.timeout = std::chrono::seconds(15);
  r.ca_file = ca_file_;
  auto resp = http::send(r);
  if (!resp) throw std::runtime_error(method + " " + path + ": " + resp.error().message);
  return {resp->status, json::parse(resp->body, nullptr, false)};
}

CliResult Hub::cli(const std::vector<std::string>& args) {
  std::vector<std::string> argv = {bin_dir() + "/flotilla"};
  argv.insert(argv.end(), args.begin(), args.end());
  argv.push_back("--hub");
  argv.push_back(url_);
  argv.push_back("--token-file");
  argv.push_back((data_ / "admin.token").string());
  if (!ca_file_.empty()) {
    argv.push_back("--ca-file");
    argv.push_back(ca_file_);
  }
  auto r = proc::run(argv, std::chrono::seconds(120));
  if (!r) throw std::runtime_error("flotilla cli: " + r.error().message);
  return {r->exit_code, r->out, r->err};
}

CliResult Hub::cli_local(const std::vector<std::string>& args) {
  std::vector<std::string> argv = {bin_dir() + "/flotilla"};
  argv.insert(argv.end(), args.begin(), args.end());
  auto r = proc::run(argv, std::chrono::seconds(60));
  if (!r) throw std::runtime_error("flotilla cli: " + r.error().message);
  return {r->exit_code, r->out, r->err};
}

std::string Hub::broker_url() const {
  auto port = fs::read_file(data_ / "broker/port", 64);
  if (!port) throw std::runtime_error("no broker port file");
  // With broker-tls-cert the hub copies its certificate here and the one listener is TLS.
  return (stdfs::exists(data_ / "broker/tls/broker.pem") ? "ssl://127.0.0.1:" : "tcp://127.0.0.1:") + *port;
}

std::string Hub::broker_password() const {
  auto p = fs::read_file(data_ / "broker/hub.secret", 1024);
  if (!p) throw std::runtime_error("no hub broker secret");
  return *p;
}

std::string Hub::broker_ca_file() const { return (data_ / "ca/broker-trust.pem").string(); }

transport::ConnectOptions Hub::broker_client(const std::string& cn, const stdfs::path& dir) const {
  hub::DeviceCaConfig cfg;
  cfg.dir = data_ / "ca";
  auto ca = hub::DeviceCa::open(cfg, SystemClock::instance().now_unix());
  if (!ca) throw std::runtime_error("device CA: " + ca.error().message);
  auto c = (*ca)->issue_client(cn, SystemClock::instance().now_unix(), 3600);
  if (!c) throw std::runtime_error("issue a client certificate: " + c.error().message);
  stdfs::create_directories(dir);
  const auto cert = dir / (cn + ".pem"), key = dir / (cn + ".key");
  if (!fs::write_file_atomic(key, c->key_pem, 0600) || !fs::write_file_atomic(cert, c->pem, 0600)) {
    throw std::runtime_error("write the client certificate under " + dir.string());
  }
  transport::ConnectOptions co;
  co.url = broker_url();
  co.client_id = cn;
  co.username = cn;
  co.clean_session = true;
  co.cert_file = cert.string();
  co.key_file = key.string();
  co.ca_file = broker_ca_file();
  return co;
}

transport::ConnectOptions Hub::device_session(const bundles::KeyPair& key, const v1::EnrollResponse& resp,
                                              const stdfs::path& dir) const {
  if (resp.client_certificate().empty()) throw std::runtime_error("the enrollment answer holds no certificate");
  stdfs::create_directories(dir);
  const auto cert = dir / (resp.device_id() + ".pem"), keyf = dir / (resp.device_id() + ".key");
  if (!fs::write_file_atomic(keyf, x509::ed25519_private_key_pem(key.secret), 0600) ||
      !fs::write_file_atomic(cert, resp.client_certificate(), 0600)) {
    throw std::runtime_error("write the device certificate under " + dir.string());
  }
  transport::ConnectOptions co;
  co.url = broker_url();
  co.client_id = resp.device_id();
  co.username = resp.device_id();
  co.clean_session = true;
  co.cert_file = cert.string();
  co.key_file = keyf.string();
  co.ca_file = broker_ca_file();
  return co;
}

std::string device_csr(const bundles::KeyPair& key) {
  auto csr = x509::make_csr(key.secret, bundles::device_id_for_key(key.pub.key));
  if (!csr) throw std::runtime_error("csr: " + csr.error().message);
  return *csr;
}

namespace {
// Uses as the API takes them: a number, or explicitly no limit.
json uses_fields(int max_uses) {
  return max_uses == 0 ? json{{"unlimited_uses", true}} : json{{"max_uses", max_uses}};
}
}  // namespace

std::string Hub::enrollment_token(const std::map<std::string, std::string>& labels, int max_uses,
                                  const std::vector<std::string>& device_label_keys) {
  json body = uses_fields(max_uses);
  body.update(json{{"labels", labels}, {"ttl", "1h"}, {"device_label_keys", device_label_keys}});
  auto [status, resp] = call("POST", "/v1/enrollment-tokens", body.dump());
  if (status != 201) throw std::runtime_error("enrollment token: " + resp.dump());
  return resp["token"].get<std::string>();
}

std::string Hub::project_enrollment_token(const std::string& project,
                                          const std::map<std::string, std::string>& labels, int max_uses) {
  json req = uses_fields(max_uses);
  req.update(json{{"labels", labels}, {"ttl", "1h"}, {"project", project}});
  auto [status, body] = call("POST", "/v1/enrollment-tokens", req.dump());
  if (status != 201) throw std::runtime_error("enrollment token: " + body.dump());
  return body["token"].get<std::string>();
}

std::string Hub::api_token(const std::string& role, const std::string& project) {
  auto [status, body] = call("POST", "/v1/tokens",
                             json{{"name", role + "@" + project}, {"role", role}, {"project", project}}.dump());
  if (status != 201) throw std::runtime_error("API token: " + body.dump());
  return body["token"].get<std::string>();
}

json Hub::audit() {
  json all = json::array();
  int64_t after = 0;
  for (;;) {
    auto [status, body] = call("GET", "/v1/audit?limit=1000&after=" + std::to_string(after));
    if (status != 200) throw std::runtime_error("audit: " + body.dump());
    for (auto& e : body["items"]) all.push_back(e);
    after = body["next"].get<int64_t>();
    if (after == 0) return all;
  }
}

json Hub::device(const std::string& id) { return call("GET", "/v1/devices/" + id).second; }

json Hub::devices(const std::string& selector) {
  std::string path = "/v1/devices?limit=10000";
  if (!selector.empty()) {
    std::string enc;
    for (unsigned char ch : selector) {
      char buf[4];
      std::snprintf(buf, sizeof buf, "%%%02X", ch);
      enc += std::isalnum(ch) ? std::string(1, static_cast<char>(ch)) : std::string(buf);
    }
    path += "&selector=" + enc;
  }
  return call("GET", path).second["items"];
}

json Hub::campaign(const std::string& id, bool with_devices) {
  return call("GET", "/v1/campaigns/" + id + (with_devices ? "?devices=true" : "")).second;
}

Agent::Agent(stdfs::path root, std::string hub_url, std::string enrollment_token, AgentOptions opts)
    : root_(std::move(root)), hub_url_(std::move(hub_url)), token_(std::move(enrollment_token)),
      opts_(std::move(opts)) {
  stdfs::create_directories(root_ / "usr/local/bin");
  stdfs::create_directories(root_ / "etc/flotilla");
  stdfs::copy_file(bin_dir() + "/k3s-standin", root_ / "usr/local/bin/k3s", stdfs::copy_options::overwrite_existing);
  // The stand-in's kubelet posts every second here (real k3s: 10 s), so the
  // health gate's wait for a heartbeat newer than the restart stays short.
  stdfs::create_directories(root_ / "etc/rancher/k3s/config.yaml.d");
  std::ofstream(root_ / "etc/rancher/k3s/config.yaml.d/05-standin-test.yaml") << "standin-heartbeat-ms: 1000\n";
  std::ofstream cfg(root_ / "etc/flotilla/agent.yaml");
  cfg << "hub-url: " << hub_url_ << "\n"
      << "enrollment-token: " << token_ << "\n"
      << "root-keys:\n";
  for (const auto& k : opts_.root_keys) cfg << "  - " << k << "\n";
  cfg << "labels:\n";
  for (const auto& [k, v] : opts_.labels) cfg << "  " << k << ": \"" << v << "\"\n";
  cfg << "node-name: " << root_.filename().string() << "\n"
      << "health-timeout: " << opts_.health_timeout << "\n"
      << "health-settle: " << opts_.health_settle << "\n"
      << "reconnect-max: 2s\n";
}

Agent::~Agent() {
  stop();
  kill_k3s();
}

void Agent::start() { start_with_env({}); }

void Agent::stop() {
  if (child_.valid()) child_.terminate(std::chrono::seconds(10));
}

void Agent::start_with_env(const std::map<std::string, std::string>& env) {
  proc::SpawnOptions so;
  so.argv = opts_.launcher;
  so.argv.push_back(opts_.binary.empty() ? bin_dir() + "/flotilla-agent" : opts_.binary);
  so.argv.insert(so.argv.end(), {"--config", (root_ / "etc/flotilla/agent.yaml").string(), "--root", root_.string(),
                                 "--log-level", "debug"});
  so.stdout_path = (root_.parent_path() / (root_.filename().string() + ".log")).string();
  so.stderr_path = "stdout";
  so.env_set["K3S_STANDIN_MAX_LIFETIME_S"] = "300";
  for (const auto& [k, v] : env) so.env_set[k] = v;
  auto c = proc::spawn(so);
  if (!c) throw std::runtime_error("start agent: " + c.error().message);
  child_ = std::move(*c);
}

std::optional<int> Agent::wait_exit(std::chrono::milliseconds timeout) {
  if (!child_.valid()) return std::nullopt;
  auto code = child_.wait_for(timeout);
  if (code) child_.release();
  return code;
}

void Agent::append_config(const std::string& yaml_lines) {
  std::ofstream cfg(root_ / "etc/flotilla/agent.yaml", std::ios::app);
  cfg << yaml_lines << (yaml_lines.empty() || yaml_lines.back() == '\n' ? "" : "\n");
}

void Agent::kill9() { child_.kill_now(); }

void Agent::kill_k3s() {
  // Direct supervision, or the fake init tools' pidfiles (systemd, OpenRC).
  for (const auto& rel : {"run/flotilla/k3s.pid", "run/fake-init/k3s.service.pid", "run/fake-init/k3s-agent.service.pid",
                          "var/run/k3s.pid", "var/run/k3s-agent.pid"}) {
    auto pid = fs::read_file(root_ / rel, 64);
    if (!pid) continue;
    try {
      pid_t p = static_cast<pid_t>(std::stol(*pid));
      if (p <= 1) continue;
      ::kill(-p, SIGKILL);
      ::kill(p, SIGKILL);
    } catch (const std::exception&) {
    }
  }
}

std::string Agent::device_id() const {
  auto bytes = fs::read_file(root_ / "var/lib/flotilla/credentials.pb", 64 * 1024);
  if (!bytes) return "";
  v1::EnrollResponse r;
  if (!r.ParseFromString(*bytes)) return "";
  return r.device_id();
}

std::string Agent::mqtt_password() const {
  auto bytes = fs::read_file(root_ / "var/lib/flotilla/credentials.pb", 64 * 1024);
  v1::EnrollResponse r;
  if (!bytes || !r.ParseFromString(*bytes)) return "";
  return r.mqtt_password();
}

transport::ConnectOptions Agent::broker_options(const std::string& url) const {
  const auto tls = root_ / "var/lib/flotilla/tls";
  transport::ConnectOptions co;
  co.url = url;
  co.client_id = device_id();
  co.username = co.client_id;
  co.clean_session = true;
  co.cert_file = (tls / "client.pem").string();
  co.key_file = (tls / "client.key").string();
  co.ca_file = (tls / "broker-ca.pem").string();
  return co;
}

std::string Agent::log() const {
  return fs::read_file(root_.parent_path() / (root_.filename().string() + ".log")).value_or("");
}

std::string metrics_text(Hub& hub) {
  http::Request r;
  r.url = hub.url() + "/metrics";
  r.headers["Authorization"] = "Bearer " + hub.admin_token();
  auto resp = http::send(r);
  if (!resp) throw std::runtime_error("GET /metrics: " + resp.error().message);
  if (resp->status != 200) throw std::runtime_error("GET /metrics: status " + std::to_string(resp->status));
  return resp->body;
}

double metric(const std::string& text, const std::string& sample) {
  const auto at = text.find("\n" + sample + " ");
  if (at == std::string::npos) return -1;
  return std::stod(text.substr(at + sample.size() + 2));
}

std::string snapshot_diff(const std::map<std::string, std::string>& a, const std::map<std::string, std::string>& b) {
  std::string out;
  for (const auto& [path, v] : a) {
    auto it = b.find(path);
    if (it == b.end()) out += "only before: " + path + "\n";
    else if (it->second != v) out += "changed: " + path + "\n";
  }
  for (const auto& [path, v] : b) {
    if (!a.count(path)) out += "only after: " + path + "\n";
  }
  return out;
}

std::map<std::string, std::string> snapshot(const stdfs::path& root, const std::vector<std::string>& exclude) {
  std::map<std::string, std::string> out;
  for (auto it = stdfs::recursive_directory_iterator(root); it != stdfs::recursive_directory_iterator(); ++it) {
    const std::string rel = stdfs::relative(it->path(), root).string();
    // k3s's own datastore changes while it runs (its kubelet's heartbeats,
    // the stand-in too): never the agent's doing.
    bool skip = rel.rfind("var/lib/rancher/k3s/server/db", 0) == 0;
    // The stand-in's pid file (how it knows k3s is running when asked to
    // rotate certificates) changes at every start, as a pid does.
    skip |= it->path().filename() == "standin.pid";
    for (const auto& e : exclude) skip |= rel.rfind(e, 0) == 0;
    if (skip) {
      if (it->is_directory()) it.disable_recursion_pending();
      continue;
    }
    if (!it->is_regular_file()) continue;
    struct stat st {};
    ::stat(it->path().c_str(), &st);
    auto content = fs::read_file(it->path(), 256u << 20).value_or("");
    out[rel] = crypto::sha256_hex(content) + " " + std::to_string(st.st_mode & 07777);
  }
  return out;
}

v1::BundleFile make_file(v1::FileKind kind, const std::string& name, const std::string& content) {
  v1::BundleFile f;
  f.set_kind(kind);
  f.set_name(name);
  f.set_content(content);
  f.set_mode(0644);
  auto h = crypto::sha256(content);
  f.set_sha256(std::string(h.begin(), h.end()));
  return f;
}

v1::BundleManifest make_manifest(const std::string& name, uint64_t version, const BundleFiles& files) {
  v1::BundleManifest m;
  m.set_format_version(1);
  m.set_name(name);
  m.set_channel("stable");
  m.set_version(version);
  m.set_created_unix(SystemClock::instance().now_unix());
  m.set_expires_unix(m.created_unix() + 3600);
  for (const auto& [kind, fname, content] : files) *m.add_files() = make_file(kind, fname, content);
  return m;
}

void add_airgap_artifact(v1::BundleManifest& m, const std::string& sha256_hex, uint64_t size, const std::string& url) {
  auto* a = m.add_artifacts();
  a->set_name("images.tar");
  a->set_kind(v1::ARTIFACT_KIND_AIRGAP_IMAGES);
  auto raw = from_hex(sha256_hex).value();
  a->set_sha256(std::string(raw.begin(), raw.end()));
  a->set_size(size);
  a->set_url(url);
}

BuiltBundle make_bundle(const std::string& name, uint64_t version, const BundleFiles& files,
                        const std::vector<const bundles::KeyPair*>& signers,
                        const std::vector<v1::Overlay>& overlays) {
  v1::BundleManifest m = make_manifest(name, version, files);
  m.set_k3s_version("v1.30.4+k3s1");
  for (const auto& o : overlays) *m.add_overlays() = o;
  BuiltBundle b;
  b.envelope = bundles::wrap(m);
  for (const auto* k : signers) {
    if (auto s = bundles::sign(b.envelope, *k); !s) throw std::runtime_error(s.error().message);
  }
  b.bytes = bundles::serialize_envelope(b.envelope);
  return b;
}

json run_campaign(Hub& hub, const std::string& bundle_id, const std::string& selector, std::chrono::seconds timeout) {
  auto [status, body] = hub.call("POST", "/v1/campaigns", json{{"bundle", bundle_id}, {"selector", selector}}.dump());
  if (status != 201) throw std::runtime_error("create campaign: " + body.dump());
  const std::string id = body["id"];
  json c;
  // Settled: nothing left in flight. "converging" still waits on devices that
  // are away, so it is not settled for a test that expects every outcome.
  wait_until(
      [&] {
        c = hub.campaign(id, true);
        const std::string s = c["state"];
        return s != "running" && s != "converging" && s != "rolling_back";
      },
      timeout);
  return c;
}

Fleet::Fleet(int n, std::map<std::string, std::string> labels, const std::vector<std::string>& hub_args) {
  if (hub_args.empty()) {
    hub.start();
  } else {
    hub.start(hub_args);
  }
  // Each agent names its slot (overlays select on it): the one label key a device may choose.
  const std::string token = hub.enrollment_token(labels, n, {"slot"});
  for (int i = 0; i < n; ++i) {
    AgentOptions o;
    o.root_keys = {bundles::public_key_text(release.pub)};
    o.labels = {{"slot", std::to_string(i)}};
    agents.push_back(std::make_unique<Agent>(tmp.path() / ("dev-" + std::to_string(i)), hub.url(), token, o));
    agents.back()->start();
  }
  if (!wait_online(static_cast<size_t>(n))) {
    throw std::runtime_error("agents did not come online; hub log:\n" + hub.log() + "\nagent 0 log:\n" +
                             agents[0]->log());
  }
}

bool Fleet::wait_online(size_t count, std::chrono::seconds timeout) {
  return wait_until(
      [&] {
        size_t online = 0;
        for (const auto& d : hub.devices()) online += d["online"].get<bool>() && d["k3s_version"] != "" ? 1 : 0;
        return online == count;
      },
      timeout);
}

std::string Fleet::push(const BuiltBundle& b) {
  auto [status, body] = hub.call("POST", "/v1/bundles", b.bytes, "application/octet-stream");
  if (status != 201 && status != 200) throw std::runtime_error("push bundle: " + body.dump());
  return body["id"].get<std::string>();
}

proc::RunResult run_hub_expecting_exit(const stdfs::path& data, const std::vector<std::string>& extra) {
  std::vector<std::string> argv = {bin_dir() + "/flotilla-hub", "--data-dir", data.string(), "--listen",
                                   "127.0.0.1:0", "--config", ""};
  argv.insert(argv.end(), extra.begin(), extra.end());
  auto r = proc::run(argv, std::chrono::seconds(20));
  if (!r) throw std::runtime_error("run hub: " + r.error().message);
  return *r;
}

}  // namespace flotilla::test

#include "flotilla/agent/daemon.hpp"

#include <sys/stat.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>

#include "flotilla/agent/agent.hpp"
#include "flotilla/agent/direct_runtime.hpp"
#include "flotilla/agent/disk.hpp"
#include "flotilla/bundles/keys.hpp"
#include "flotilla/common/backoff.hpp"
#include "flotilla/common/crypto.hpp"
#include "flotilla/common/fs.hpp"
#include "flotilla/common/http_client.hpp"
#include "flotilla/common/log.hpp"
#include "flotilla/common/transport.hpp"
#include "flotilla/v1/enroll.pb.h"

namespace flotilla::agent {

std::string detect_arch() {
  struct utsname u {};
  if (::uname(&u) != 0) return "unknown";
  const std::string m = u.machine;
  if (m == "x86_64") return "amd64";
  if (m == "aarch64" || m == "arm64") return "arm64";
  if (m.rfind("armv7", 0) == 0 || m.rfind("armv6", 0) == 0 || m == "arm") return "arm";
  return m;
}

void add_agent_options(Options& o) {
  o.add("config", "YAML config file with any of these keys", "/etc/flotilla/agent.yaml")
      .add("root", "directory every device path hangs off (tests use a temporary one)", "/")
      .add("hub-url", "the hub's REST base URL, for enrollment (http://hub:8080)")
      .add("enrollment-token", "fleet enrollment token (needed once, for the first start)")
      .add_list("root-keys", "trusted bundle-signing public keys (ed25519:<base64> or a key file)")
      .add("key-threshold", "how many distinct trusted keys must sign a bundle", "1")
      .add_list("labels", "device labels key=value (a map in the config file)")
      .add("arch", "device architecture (amd64, arm64, arm); default: detected")
      .add("k3s-bin", "k3s binary (device path)", "/usr/local/bin/k3s")
      .add("node-name", "k3s node name; default: the hostname")
      .add("state-dir", "where the agent keeps identity, credentials and its journal (device path)",
           "/var/lib/flotilla")
      .add("health-timeout", "how long k3s may take to become healthy after a change", "60s")
      .add("reconnect-max", "longest wait between broker reconnect attempts", "5m")
      .add("log-level", "trace, debug, info, warn or error", "info")
      .config_file_key("config");
}

Result<AgentConfig> agent_config_from(const Options& o) {
  AgentConfig c;
  c.root = o.get("root");
  if (c.root.empty() || !c.root.is_absolute()) {
    return make_error(Errc::invalid_argument, "root must be an absolute directory, got '" + o.get("root") + "'");
  }
  c.hub_url = o.get("hub-url");
  if (!c.hub_url.empty()) {
    if (auto u = http::parse_url(c.hub_url); !u) return u.error().with_context("hub-url");
  }
  c.enrollment_token = o.get("enrollment-token");
  c.root_keys = o.get_list("root-keys");
  if (c.root_keys.empty()) {
    return make_error(Errc::invalid_argument,
                      "root-keys is empty: pin at least one bundle-signing public key (ed25519:<base64>); "
                      "without it every bundle would be refused");
  }
  auto th = o.get_int("key-threshold", 1, 32);
  if (!th) return th.error();
  c.key_threshold = static_cast<unsigned>(*th);
  if (c.key_threshold > c.root_keys.size()) {
    return make_error(Errc::invalid_argument, "key-threshold " + std::to_string(c.key_threshold) +
                                                  " is more than the " + std::to_string(c.root_keys.size()) +
                                                  " root key(s) configured");
  }
  auto labels = o.get_map("labels");
  if (!labels) return labels.error();
  c.labels = *labels;
  c.arch = o.get("arch").empty() ? detect_arch() : o.get("arch");
  c.k3s_bin = o.get("k3s-bin");
  if (c.k3s_bin.empty() || c.k3s_bin.front() != '/') return make_error(Errc::invalid_argument, "k3s-bin must be an absolute device path");
  c.node_name = o.get("node-name");
  if (c.node_name.empty()) {
    char host[256] = {0};
    ::gethostname(host, sizeof host - 1);
    c.node_name = host;
  }
  c.state_dir = o.get("state-dir");
  if (c.state_dir.empty() || c.state_dir.front() != '/') {
    return make_error(Errc::invalid_argument, "state-dir must be an absolute device path");
  }
  auto ht = o.get_duration("health-timeout");
  if (!ht) return ht.error();
  c.health_timeout = *ht;
  auto rm = o.get_duration("reconnect-max");
  if (!rm) return rm.error();
  c.reconnect_max = *rm;
  return c;
}

namespace {

std::filesystem::path under_root(const AgentConfig& cfg, const std::string& device_path) {
  std::string rel = device_path;
  while (!rel.empty() && rel.front() == '/') rel.erase(rel.begin());
  return cfg.root / rel;
}

Result<bundles::Keyring> load_keyring(const AgentConfig& cfg) {
  bundles::Keyring ring;
  ring.threshold = cfg.key_threshold;
  for (const auto& k : cfg.root_keys) {
    auto pub = bundles::read_public_key(k.rfind("ed25519:", 0) == 0 ? k : under_root(cfg, k).string());
    if (!pub) return pub.error().with_context("root-keys");
    ring.add(*pub);
  }
  return ring;
}

Result<bundles::KeyPair> ensure_identity(const std::filesystem::path& state) {
  const auto path = state / "identity.key";
  if (std::filesystem::exists(path)) return bundles::read_private_key(path);
  auto kp = bundles::generate_key();
  if (auto s = bundles::write_private_key(path, kp); !s) return s.error();
  log::get("agent")->info("created device identity key_id={}", kp.pub.key_id);
  return kp;
}

// Enrolls once; retries with backoff on network trouble. A refused token is
// logged once per attempt and retried slowly: an operator can issue a new
// token without anyone visiting the device.
Result<v1::EnrollResponse> enroll(const AgentConfig& cfg, const bundles::KeyPair& id, const std::atomic<bool>& stop) {
  auto logger = log::get("agent");
  if (cfg.hub_url.empty() || cfg.enrollment_token.empty()) {
    return make_error(Errc::invalid_argument,
                      "not enrolled yet and hub-url or enrollment-token is missing; set both for the first start");
  }
  v1::EnrollRequest req;
  req.set_enrollment_token(cfg.enrollment_token);
  req.set_device_public_key(std::string(id.pub.key.begin(), id.pub.key.end()));
  char host[256] = {0};
  ::gethostname(host, sizeof host - 1);
  req.set_hostname(host);
  req.set_arch(cfg.arch);
  req.set_agent_version(kAgentVersion);
  for (const auto& [k, v] : cfg.labels) (*req.mutable_labels())[k] = v;
  auto proof = bundles::sign_detached(id, bundles::enroll_proof_message(cfg.enrollment_token, id.pub.key));
  req.set_proof(std::string(proof.begin(), proof.end()));
  Backoff backoff(std::chrono::seconds(1), cfg.reconnect_max, crypto::random_bytes(8)[0]);
  while (!stop) {
    http::Request hr;
    hr.method = "POST";
    hr.url = cfg.hub_url + "/v1/enroll";
    hr.body = req.SerializeAsString();
    hr.headers["Content-Type"] = "application/x-protobuf";
    hr.max_response_bytes = 64 * 1024;
    auto resp = http::send(hr);
    if (resp && resp->status == 200) {
      v1::EnrollResponse er;
      if (er.ParseFromString(resp->body) && !er.device_id().empty()) return er;
      logger->error("enrollment answer does not parse");
    } else if (resp) {
      logger->error("enrollment refused status={} body={}", resp->status, resp->body.substr(0, 300));
    } else {
      logger->warn("enrollment failed: {}", resp.error().message);
    }
    auto delay = backoff.next();
    const auto until = std::chrono::steady_clock::now() + delay;
    while (!stop && std::chrono::steady_clock::now() < until) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return make_error(Errc::unavailable, "stopped before enrollment finished");
}

}  // namespace

Status run_agent(const AgentConfig& cfg, const std::atomic<bool>& stop) {
  auto logger = log::get("agent");
  crypto::init();
  ::umask(077);
  const auto state_dir = under_root(cfg, cfg.state_dir);
  if (auto s = fs::ensure_dir(state_dir, 0700); !s) return s;
  auto ring = load_keyring(cfg);
  if (!ring) return ring.error();
  auto identity = ensure_identity(state_dir);
  if (!identity) return identity.error().with_context("device identity");

  // Credentials are kept 0600; a device never re-enrolls while it holds them.
  const auto cred_path = state_dir / "credentials.pb";
  v1::EnrollResponse creds;
  if (auto existing = fs::read_file(cred_path, 64 * 1024); existing) {
    if (!creds.ParseFromString(*existing) || creds.device_id().empty()) {
      return make_error(Errc::parse, cred_path.string() + " is damaged; remove it to enroll again");
    }
  } else {
    auto er = enroll(cfg, *identity, stop);
    if (!er) return stop ? Status{} : Status(er.error());
    creds = *er;
    if (auto s = fs::write_file_atomic(cred_path, creds.SerializeAsString(), 0600); !s) return s;
    logger->info("enrolled device={} broker={}", creds.device_id(), creds.broker_url());
  }

  DiskFileTree files(cfg.root);
  auto store = SqliteStateStore::open((state_dir / "agent.db").string());
  if (!store) return store.error();
  DirectRuntimeConfig rc;
  rc.root = cfg.root;
  rc.k3s_bin = under_root(cfg, cfg.k3s_bin).string();
  rc.node_name = cfg.node_name;
  DirectK3sRuntime runtime(rc);

  auto transport = transport::make_paho_transport();
  const std::string report_topic = transport::device_topic(creds.device_id(), "report");
  const std::string presence_topic = transport::device_topic(creds.device_id(), "presence");
  const std::string desired_topic = transport::device_topic(creds.device_id(), "desired");

  CoreConfig core_cfg;
  core_cfg.device_id = creds.device_id();
  core_cfg.arch = cfg.arch;
  // The hub's record wins (enrollment-token labels override the device's own).
  core_cfg.labels = cfg.labels;
  if (!creds.labels().empty()) core_cfg.labels = {creds.labels().begin(), creds.labels().end()};
  core_cfg.keyring = *ring;
  core_cfg.health_timeout = cfg.health_timeout;
  Agent agent(core_cfg, runtime, files, **store, SystemClock::instance(), [&](v1::Report&& r) {
    // Paho buffers while disconnected; QoS 1 gets it to the hub once connected.
    if (auto s = transport->publish({report_topic, r.SerializeAsString(), 1, false}); !s) {
      logger->warn("report not queued: {}", s.error().message);
    }
  });
  if (auto s = agent.start(); !s) return s;
  if (auto s = runtime.ensure_running(); !s) logger->warn("k3s not started: {}", s.error().message);

  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::string> inbox;
  std::atomic<bool> lost{false};
  transport->on_message([&](transport::Message&& m) {
    if (m.topic != desired_topic) return;
    std::lock_guard lock(mu);
    // Only the newest desired state matters; bound the queue.
    if (inbox.size() >= 8) inbox.pop_front();
    inbox.push_back(std::move(m.payload));
    cv.notify_one();
  });
  transport->on_connection_lost([&](const std::string& cause) {
    logger->warn("broker connection lost: {}", cause);
    lost = true;
    cv.notify_one();
  });

  v1::Presence offline;
  offline.set_online(false);
  offline.set_agent_version(kAgentVersion);
  transport::ConnectOptions co;
  co.url = creds.broker_url();
  co.client_id = creds.device_id();
  co.username = creds.mqtt_username();
  co.password = creds.mqtt_password();
  co.clean_session = false;
  co.keepalive_s = 30;
  co.will = transport::Message{presence_topic, offline.SerializeAsString(), 1, true};

  // Full jitter: after a broker restart the fleet spreads out instead of returning at once.
  Backoff backoff(std::chrono::milliseconds(500), cfg.reconnect_max,
                  std::hash<std::string>{}(creds.device_id()) ^ static_cast<uint64_t>(::getpid()));
  auto next_try = std::chrono::steady_clock::now();
  bool connected = false;
  int auth_failures = 0;
  while (!stop) {
    if ((!connected || lost) && std::chrono::steady_clock::now() >= next_try) {
      lost = false;
      auto s = transport->connect(co);
      if (s) s = transport->subscribe(desired_topic, 1);
      if (s) {
        connected = true;
        auth_failures = 0;
        backoff.reset();
        v1::Presence online;
        online.set_online(true);
        online.set_agent_version(kAgentVersion);
        online.set_time_unix_ms(SystemClock::instance().now_unix_ms());
        (void)transport->publish({presence_topic, online.SerializeAsString(), 1, true});
        logger->info("connected device={} broker={}", creds.device_id(), creds.broker_url());
        agent.report_inventory();
      } else {
        connected = false;
        if (s.error().code == Errc::unauthenticated && ++auth_failures == 5) {
          logger->error("the broker keeps refusing this device's credentials; it may have been "
                        "decommissioned. Remove {} to enroll again.", cred_path.string());
        }
        auto delay = backoff.next();
        logger->warn("broker connect failed: {}; retry in {}ms", s.error().message, delay.count());
        next_try = std::chrono::steady_clock::now() + delay;
      }
    }
    std::string payload;
    {
      std::unique_lock lock(mu);
      cv.wait_for(lock, std::chrono::milliseconds(200), [&] { return !inbox.empty() || lost || stop; });
      if (!inbox.empty()) {
        payload = std::move(inbox.front());
        inbox.pop_front();
      }
    }
    if (lost) connected = false;
    if (!payload.empty()) agent.handle_desired(payload);
  }
  logger->info("stopping (k3s keeps running)");
  // A clean disconnect discards the will, so say goodbye explicitly.
  if (connected) (void)transport->publish({presence_topic, offline.SerializeAsString(), 1, true});
  (void)transport->flush(std::chrono::seconds(2));
  transport->disconnect();
  return {};
}

}  // namespace flotilla::agent

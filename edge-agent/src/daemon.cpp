#include "flotilla/agent/daemon.hpp"

#include <sys/stat.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cstring>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <random>
#include <thread>

#include "flotilla/agent/agent.hpp"
#include "flotilla/agent/direct_runtime.hpp"
#include "flotilla/agent/disk.hpp"
#include "flotilla/bundles/keys.hpp"
#include "flotilla/bundles/trust.hpp"
#include "flotilla/common/backoff.hpp"
#include "flotilla/common/crypto.hpp"
#include "flotilla/common/fs.hpp"
#include "flotilla/common/http_client.hpp"
#include "flotilla/common/log.hpp"
#include "flotilla/common/transport.hpp"
#include "flotilla/common/x509.hpp"
#include "flotilla/v1/enroll.pb.h"

namespace flotilla::agent {

std::string detect_arch() {
  struct utsname u {};
  if (::uname(&u) != 0) return "unknown";
  const std::string m = u.machine;
  if (m == "x86_64") return "amd64";
  if (m == "aarch64" || m == "arm64") return "arm64";
  if (m.rfind("armv7", 0) == 0 || m.rfind("armv8l", 0) == 0 || m == "arm") return "arm";
  // k3s's armhf build needs ARMv7: an ARMv6 device (Pi Zero, Pi 1) is told so
  // when a bundle brings k3s, rather than getting a binary that cannot run.
  if (m.rfind("armv6", 0) == 0) return "armv6";
  return m;
}

void add_agent_options(Options& o) {
  o.add("config", "YAML config file with any of these keys", "/etc/flotilla/agent.yaml")
      .add("root", "directory every device path hangs off (tests use a temporary one)", "/")
      .add("hub-url", "the hub's REST base URL, for enrollment (http://hub:8080)")
      .add("enrollment-token", "fleet enrollment token (needed once, for the first start)")
      .add_list("root-keys", "trusted bundle-signing public keys (ed25519:<base64> or a key file)")
      .add("root-keyring",
           "root keyring file (.krg, device path) pinned in the image; bundles are then verified under the "
           "root/signing keyring chain (docs/bundle-format.md, \"Keyrings\") instead of root-keys")
      .add("key-threshold", "how many distinct trusted keys must sign a bundle", "1")
      .add("director-key", "the hub's director public key (ed25519:<base64> or a key file, e.g. the hub's "
                           "director.pub): every desired state must carry a header it signed; default: the key the "
                           "hub names at enrollment")
      .add_list("labels", "device labels key=value (a map in the config file)")
      .add("arch", "device architecture (amd64, arm64, arm); default: detected")
      .add("k3s-bin", "k3s binary (device path)", "/usr/local/bin/k3s")
      .add("node-name", "k3s node name; default: the hostname")
      .add("state-dir", "where the agent keeps identity, credentials and its journal (device path)",
           "/var/lib/flotilla")
      .add("health-timeout", "how long k3s may take to become healthy after a change (a bundle's health.timeout "
                             "overrides it); sized for low-power devices", "10m")
      .add("health-settle", "how long the node must stay Ready, with a heartbeat newer than the restart, before the "
                            "health gate passes (a bundle's health.settle overrides it)", "30s")
      .add("service-start-timeout", "TimeoutStartSec= of a k3s unit the agent writes on a first install (0 = none, "
                                    "as k3s's own unit)", "0")
      .add("k3s-role", "this node's k3s role: server (k3s server, unit k3s) or agent (k3s agent, unit k3s-agent)",
           "server")
      .add("k3s-server-url", "an agent node's k3s server (https://server:6443); unused when config.yaml sets server")
      .add("k3s-token-file", "an agent node's join token file (device path); unused when config.yaml sets token")
      .add("cluster-id", "the k3s cluster this node belongs to (campaigns upgrade one node of a cluster at a time, "
                         "servers first); empty = a cluster of its own")
      .add("reconnect-max", "longest wait between broker reconnect attempts", "5m")
      .add("service-manager", "how k3s runs: auto (detect), systemd, openrc or direct (the agent supervises it)",
           "auto")
      .add("tls-ca-file", "CA certificates (PEM, device path) trusted for ssl:// brokers, https:// enrollment and "
                          "https:// artifact downloads instead of the system CA store")
      .add("device-ca-file", "the hub's device CA (PEM, device path; the hub's ca/device-ca.pem), pinned: broker "
                             "certificates the hub issues this device must come from it, and the broker is checked "
                             "against it; default: the CAs the hub names at enrollment")
      .add("inventory-interval", "how often the agent checks its inventory (k3s version, node Ready, ...) and "
                                 "reports it if it changed (0 = never)", "5m")
      .add("supervise-interval", "how often the agent checks that k3s runs and starts it if not (0 = never)", "30s")
      .add("drift-interval", "how often installed files are checked against the applied bundle (0 = never)", "10m")
      .add("min-free", "disk space that must stay free after an apply (bytes, or 64MiB, 1GiB)", "64MiB")
      .add("revoked-after", "how long the broker must keep refusing this device's credentials before the agent "
           "treats them as revoked (new credentials take a moment to reach every broker)", "2m")
      .add("revoked-retry", "retry period once the broker keeps refusing this device's credentials", "10m")
      .add("download-timeout", "longest silence while downloading an artifact", "30s")
      .add("download-deadline-min", "shortest overall deadline for one artifact download; the deadline is the "
                                    "larger of this and the artifact's size at download-min-rate", "5m")
      .add("download-min-rate", "slowest average download rate an artifact may take (bytes per second, or 16KiB, "
                                "1MiB): sizes the overall deadline of each download", "16KiB")
      .add("log-level", "trace, debug, info, warn or error", "info")
      .add("log-format", "text, or json: one object per line (time in UTC, level, logger, msg)", "text")
      .config_file_key("config");
}

Backoff make_enroll_backoff(std::chrono::milliseconds cap) {
  return Backoff(std::chrono::seconds(1), cap, crypto::random_u64());
}

// The hub takes a device's signed requests only in increasing
// issued_unix_ms (replay protection), so the value never goes backwards
// across restarts, even when a device without an RTC boots behind its last
// run. Written before the request is sent: a lost answer must not let the
// next attempt reuse the value.
Result<uint64_t> next_issued_ms(const std::filesystem::path& floor_file, int64_t now_ms) {
  uint64_t floor = 0;
  if (auto text = fs::read_file(floor_file, 64)) {
    try {
      floor = std::stoull(*text);
    } catch (const std::exception&) {
      floor = 0;  // unreadable: the hub refuses a replay anyway, the clock carries on
    }
  }
  const uint64_t issued = std::max(static_cast<uint64_t>(std::max<int64_t>(0, now_ms)), floor + 1);
  if (auto st = fs::write_file_atomic(floor_file, std::to_string(issued), 0600); !st) {
    return st.error().with_context("issued-floor");
  }
  return issued;
}

std::chrono::milliseconds download_deadline(const AgentConfig& cfg, uint64_t bytes) {
  const uint64_t rate = std::max<uint64_t>(1, cfg.download_min_rate);
  // Whole seconds, rounded up; capped far beyond any real artifact (8 GiB at 1 B/s).
  const uint64_t secs = std::min<uint64_t>(bytes / rate + 1, uint64_t{1} << 34);
  return std::max(cfg.download_deadline_min, std::chrono::milliseconds(static_cast<int64_t>(secs) * 1000));
}

int64_t certificate_renew_at(int64_t not_before, int64_t not_after, double draw) {
  const double span = static_cast<double>(std::max<int64_t>(0, not_after - not_before));
  const double frac = 0.55 + 0.11 * std::clamp(draw, 0.0, 0.999999);
  return not_before + static_cast<int64_t>(span * frac);
}

Backoff make_reconnect_backoff(const std::string& device_id, std::chrono::milliseconds cap, uint64_t salt) {
  // The hash spreads similar ids (d-0001, d-0002) over the whole seed space.
  const uint64_t seed = std::hash<std::string>{}(device_id) * 0x9E3779B97F4A7C15ull ^ salt;
  return Backoff(std::chrono::milliseconds(500), cap, seed);
}

Result<uint64_t> parse_size(const std::string& text) {
  size_t i = 0;
  while (i < text.size() && std::isdigit(static_cast<unsigned char>(text[i]))) ++i;
  if (i == 0 || i > 19) return make_error(Errc::invalid_argument, "'" + text + "' is not a size (e.g. 64MiB)");
  uint64_t n = std::stoull(text.substr(0, i));
  const std::string unit = text.substr(i);
  static const std::map<std::string, uint64_t> units = {
      {"", 1},          {"B", 1},          {"KB", 1000},         {"MB", 1000000}, {"GB", 1000000000},
      {"KiB", 1u << 10}, {"MiB", 1u << 20}, {"GiB", uint64_t{1} << 30}, {"TiB", uint64_t{1} << 40}};
  auto it = units.find(unit);
  if (it == units.end()) {
    return make_error(Errc::invalid_argument, "'" + text + "' has an unknown unit '" + unit + "' (B, MB, MiB, GiB …)");
  }
  if (n > UINT64_MAX / it->second) return make_error(Errc::invalid_argument, "'" + text + "' is too large");
  return n * it->second;
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
  c.director_key = o.get("director-key");
  c.root_keyring = o.get("root-keyring");
  if (!c.root_keyring.empty() && c.root_keyring.front() != '/') {
    return make_error(Errc::invalid_argument, "root-keyring must be an absolute device path, got '" + c.root_keyring +
                                                  "' (from " + o.source("root-keyring") + ")");
  }
  if (c.root_keys.empty() && c.root_keyring.empty()) {
    return make_error(Errc::invalid_argument,
                      "root-keys and root-keyring are both empty: pin a root keyring (root-keyring) or at least one "
                      "bundle-signing public key (root-keys, ed25519:<base64>); without it every bundle would be "
                      "refused");
  }
  auto th = o.get_int("key-threshold", 1, 32);
  if (!th) return th.error();
  c.key_threshold = static_cast<unsigned>(*th);
  if (!c.root_keys.empty() && c.key_threshold > c.root_keys.size()) {
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
  auto hs = o.get_duration("health-settle");
  if (!hs) return hs.error();
  if (hs->count() < 0 || *hs > c.health_timeout) {
    return make_error(Errc::invalid_argument, "health-settle must be between 0 and health-timeout (from " +
                                                  o.source("health-settle") + ")");
  }
  c.health_settle = *hs;
  auto sst = o.get_duration("service-start-timeout");
  if (!sst) return sst.error();
  if (sst->count() < 0) return make_error(Errc::invalid_argument, "service-start-timeout must not be negative");
  c.service_start_timeout = *sst;
  c.k3s_role = o.get("k3s-role");
  if (c.k3s_role != "server" && c.k3s_role != "agent") {
    return make_error(Errc::invalid_argument, "k3s-role must be server or agent, got '" + c.k3s_role + "' (from " +
                                                  o.source("k3s-role") + ")");
  }
  c.k3s_server_url = o.get("k3s-server-url");
  if (!c.k3s_server_url.empty() && c.k3s_server_url.find("://") == std::string::npos) {
    return make_error(Errc::invalid_argument, "k3s-server-url must be a URL (https://server:6443), got '" +
                                                  c.k3s_server_url + "'");
  }
  c.k3s_token_file = o.get("k3s-token-file");
  if (!c.k3s_token_file.empty() && c.k3s_token_file.front() != '/') {
    return make_error(Errc::invalid_argument, "k3s-token-file must be an absolute device path");
  }
  c.cluster_id = o.get("cluster-id");
  if (c.cluster_id.size() > 63 ||
      !std::all_of(c.cluster_id.begin(), c.cluster_id.end(), [](char ch) {
        return std::isalnum(static_cast<unsigned char>(ch)) || ch == '-' || ch == '_' || ch == '.';
      })) {
    return make_error(Errc::invalid_argument, "cluster-id must be at most 63 letters, digits, '-', '_' or '.', got '" +
                                                  c.cluster_id.substr(0, 80) + "'");
  }
  auto rm = o.get_duration("reconnect-max");
  if (!rm) return rm.error();
  c.reconnect_max = *rm;
  c.service_manager = o.get("service-manager");
  if (c.service_manager != "auto" && c.service_manager != "systemd" && c.service_manager != "openrc" &&
      c.service_manager != "direct") {
    return make_error(Errc::invalid_argument, "service-manager must be auto, systemd, openrc or direct, got '" +
                                                  c.service_manager + "' (from " + o.source("service-manager") + ")");
  }
  c.tls_ca_file = o.get("tls-ca-file");
  if (!c.tls_ca_file.empty()) {
    if (c.tls_ca_file.front() != '/') {
      return make_error(Errc::invalid_argument, "tls-ca-file must be an absolute device path, got '" + c.tls_ca_file +
                                                    "' (from " + o.source("tls-ca-file") + ")");
    }
    // Checked now, not at the first handshake: a typo here would otherwise
    // look like an untrusted server, and only once the network is up.
    std::string rel = c.tls_ca_file;
    while (!rel.empty() && rel.front() == '/') rel.erase(rel.begin());
    const auto host_path = c.root / rel;
    auto pem = fs::read_file(host_path, 1 << 20);
    if (!pem) {
      return make_error(Errc::invalid_argument, "tls-ca-file: cannot read '" + host_path.string() + "' (from " +
                                                    o.source("tls-ca-file") + "): " + pem.error().message);
    }
    if (pem->find("-----BEGIN CERTIFICATE-----") == std::string::npos) {
      return make_error(Errc::invalid_argument, "tls-ca-file '" + host_path.string() +
                                                    "' holds no PEM certificate (-----BEGIN CERTIFICATE-----)");
    }
  }
  c.device_ca_file = o.get("device-ca-file");
  if (!c.device_ca_file.empty()) {
    if (c.device_ca_file.front() != '/') {
      return make_error(Errc::invalid_argument, "device-ca-file must be an absolute device path, got '" +
                                                    c.device_ca_file + "' (from " + o.source("device-ca-file") + ")");
    }
    std::string rel = c.device_ca_file;
    while (!rel.empty() && rel.front() == '/') rel.erase(rel.begin());
    const auto host_path = c.root / rel;
    auto pem = fs::read_file(host_path, x509::kMaxPemBytes);
    if (!pem || x509::count_certificates(*pem) == 0) {
      return make_error(Errc::invalid_argument, "device-ca-file '" + host_path.string() + "' (from " +
                                                    o.source("device-ca-file") + ") is not a readable PEM file of "
                                                    "CA certificates");
    }
  }
  auto ii = o.get_duration("inventory-interval");
  if (!ii) return ii.error();
  c.inventory_interval = *ii;
  auto di = o.get_duration("drift-interval");
  if (!di) return di.error();
  c.drift_interval = *di;
  auto si = o.get_duration("supervise-interval");
  if (!si) return si.error();
  c.supervise_interval = *si;
  auto mf = parse_size(o.get("min-free"));
  if (!mf) return mf.error().with_context("min-free (from " + o.source("min-free") + ")");
  c.min_free_bytes = *mf;
  auto rr = o.get_duration("revoked-retry");
  if (!rr) return rr.error();
  if (rr->count() <= 0) return make_error(Errc::invalid_argument, "revoked-retry must be positive");
  c.revoked_retry = *rr;
  auto ra = o.get_duration("revoked-after");
  if (!ra) return ra.error();
  if (ra->count() < 0) return make_error(Errc::invalid_argument, "revoked-after must not be negative");
  c.revoked_after = *ra;
  auto dt = o.get_duration("download-timeout");
  if (!dt) return dt.error();
  if (dt->count() <= 0) return make_error(Errc::invalid_argument, "download-timeout must be positive");
  c.download_timeout = *dt;
  auto ddm = o.get_duration("download-deadline-min");
  if (!ddm) return ddm.error();
  if (ddm->count() <= 0) return make_error(Errc::invalid_argument, "download-deadline-min must be positive");
  c.download_deadline_min = *ddm;
  auto rate = parse_size(o.get("download-min-rate"));
  if (!rate) return rate.error().with_context("download-min-rate (from " + o.source("download-min-rate") + ")");
  if (*rate == 0) return make_error(Errc::invalid_argument, "download-min-rate must be at least 1 byte per second");
  c.download_min_rate = *rate;
  // Test hook only (docs/agent.md): environment, never a flag or file key.
  if (const char* off = std::getenv("FLOTILLA_TEST_CLOCK_OFFSET_S"); off && *off) {
    bool ok = false;
    try {
      size_t used = 0;
      const long long s = std::stoll(off, &used);
      // Within ±100 years: 1970 from today, or far ahead, but no overflow.
      ok = used == std::strlen(off) && s > -3'200'000'000LL && s < 3'200'000'000LL;
    } catch (const std::exception&) {
    }
    if (!ok) {
      return make_error(Errc::invalid_argument, "FLOTILLA_TEST_CLOCK_OFFSET_S must be whole seconds within "
                                                "+-3200000000 (test hook), got '" + std::string(off) + "'");
    }
  }
  if (const char* crash = std::getenv("FLOTILLA_AGENT_CRASH_AT"); crash && *crash) {
    const std::string v = crash;
    const auto colon = v.find(':');
    const std::string st = v.substr(0, colon);
    const std::string ph = colon == std::string::npos ? "" : v.substr(colon + 1);
    const auto& steps = apply_steps();
    if ((ph != "begin" && ph != "end") || (std::find(steps.begin(), steps.end(), st) == steps.end() && st != "recover")) {
      return make_error(Errc::invalid_argument, "FLOTILLA_AGENT_CRASH_AT must be <step>:<begin|end> with a step of "
                                                "the apply pipeline, got '" + v + "'");
    }
    c.crash_at = v;
  }
  return c;
}

namespace {

// Test hook only (docs/agent.md): FLOTILLA_TEST_CLOCK_OFFSET_S shifts the
// agent's wall clock by that many seconds (negative: behind), as a device
// without an RTC that boots in 1970, or one set years ahead. The monotonic
// clock (deadlines) and the kernel's (OpenSSL's certificate checks) are not
// shifted. The k3s stand-in reads the same variable from the environment it
// inherits, so the node's heartbeats are in the same device time.
class OffsetClock final : public Clock {
 public:
  explicit OffsetClock(std::chrono::seconds offset) : offset_(offset) {}
  std::chrono::system_clock::time_point now() const override { return std::chrono::system_clock::now() + offset_; }

 private:
  std::chrono::seconds offset_;
};

std::chrono::seconds clock_offset_from_env() {
  const char* v = std::getenv("FLOTILLA_TEST_CLOCK_OFFSET_S");
  if (!v || !*v) return std::chrono::seconds(0);
  try {
    size_t used = 0;
    const long long s = std::stoll(v, &used);
    if (used == std::strlen(v)) return std::chrono::seconds(s);
  } catch (const std::exception&) {
  }
  return std::chrono::seconds(0);  // load_config refused it already
}

const Clock& device_clock() {
  static const OffsetClock clock(clock_offset_from_env());
  return clock;
}

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

// The trust store of a `root-keyring` agent: what the last run persisted
// (<state-dir>/trust.pb) when it is intact and not behind the pinned root,
// else the pinned root itself.
Result<bundles::TrustStore> load_trust_store(const AgentConfig& cfg, const std::filesystem::path& state_dir) {
  auto logger = log::get("agent");
  auto pinned_ring = bundles::read_keyring_file(under_root(cfg, cfg.root_keyring));
  if (!pinned_ring) return pinned_ring.error().with_context("root-keyring " + cfg.root_keyring);
  auto pinned = bundles::TrustStore::pin(*pinned_ring);
  if (!pinned) return pinned.error().with_context("root-keyring " + cfg.root_keyring);
  const auto state_path = state_dir / "trust.pb";
  if (std::filesystem::exists(state_path)) {
    auto bytes = fs::read_file(state_path, bundles::kMaxTrustBytes);
    if (!bytes) return bytes.error().with_context("read " + state_path.string());
    auto restored = bundles::TrustStore::restore(*bytes);
    if (!restored) {
      // Fatal: silently falling back to the pinned root could undo a revocation.
      return restored.error().with_context(state_path.string() + " is damaged; remove it to start from the pinned root");
    }
    if (restored->root_version() >= pinned->root_version()) {
      logger->info("trust restored root_version={} signing_version={}", restored->root_version(),
                   restored->signing_version());
      return std::move(*restored);
    }
    logger->warn("{} has root version {} below the pinned {}; using the pinned root", state_path.string(),
                 restored->root_version(), pinned->root_version());
  }
  logger->info("trust pinned root_version={}", pinned->root_version());
  return std::move(*pinned);
}

// The pinned director key (`director-key`), if any.
Result<std::optional<bundles::PublicKey>> pinned_director_key(const AgentConfig& cfg) {
  if (cfg.director_key.empty()) return std::optional<bundles::PublicKey>();
  auto k = bundles::read_public_key(cfg.director_key.rfind("ed25519:", 0) == 0 ? cfg.director_key
                                                                                 : under_root(cfg, cfg.director_key).string());
  if (!k) return k.error().with_context("director-key");
  return std::optional<bundles::PublicKey>(*k);
}

// The director key an enrollment answer names; nullopt when it names none (an older hub).
std::optional<bundles::PublicKey> director_key_of(const v1::EnrollResponse& er) {
  if (er.director_public_key().size() != 32) return std::nullopt;
  const Bytes raw(er.director_public_key().begin(), er.director_public_key().end());
  return bundles::PublicKey{bundles::key_id_for(raw), raw};
}

// The pinned device CA's PEM (device-ca-file), or "".
std::string pinned_device_ca(const AgentConfig& cfg) {
  if (cfg.device_ca_file.empty()) return {};
  return fs::read_file(under_root(cfg, cfg.device_ca_file), x509::kMaxPemBytes).value_or("");
}

// A broker certificate the hub handed this device must be for this device's
// own key and name, and come from the pinned device CA (or, unpinned, from
// a CA the same answer names): a hub that is not this fleet's cannot give
// the device credentials for another broker.
Status check_issued_certificate(const AgentConfig& cfg, const bundles::KeyPair& id, const std::string& device_id,
                                const std::string& cert_pem, const std::string& ca_pem) {
  auto info = x509::parse_certificate_pem(cert_pem);
  if (!info) return info.error().with_context("client certificate");
  if (info->subject_cn != device_id) {
    return make_error(Errc::refused, "the client certificate names " + info->subject_cn + ", not " + device_id);
  }
  if (info->ed25519_public_key != id.pub.key) {
    return make_error(Errc::refused, "the client certificate is not for this device's identity key");
  }
  const std::string pinned = pinned_device_ca(cfg);
  const std::string& trust = pinned.empty() ? ca_pem : pinned;
  if (trust.empty()) return {};
  if (auto s = x509::verify_certificate(cert_pem, trust); !s) {
    return s.error().with_context(pinned.empty() ? "client certificate" : "client certificate (device-ca-file)");
  }
  return {};
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
Result<v1::EnrollResponse> enroll(const AgentConfig& cfg, const bundles::KeyPair& id,
                                  const std::optional<bundles::PublicKey>& pinned_director,
                                  const std::atomic<bool>& stop) {
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
  // The device's broker certificate is for its identity key (CN = its id):
  // the hub's device CA answers this request (docs/security.md).
  const std::string device_id = bundles::device_id_for_key(id.pub.key);
  auto csr = x509::make_csr(id.secret, device_id);
  if (!csr) return csr.error().with_context("certificate request");
  req.set_csr(*csr);
  Backoff backoff = make_enroll_backoff(cfg.reconnect_max);
  while (!stop) {
    // Signed afresh at each attempt: the hub takes a device's enrollments
    // only in increasing issued_unix_ms, so a captured request cannot be
    // replayed, and an attempt whose answer was lost is not refused as one.
    auto issued_or = next_issued_ms(under_root(cfg, cfg.state_dir) / "issued-floor", device_clock().now_unix_ms());
    if (!issued_or) return issued_or.error();
    const uint64_t issued = *issued_or;
    req.set_issued_unix_ms(issued);
    auto proof = bundles::sign_detached(id, bundles::enroll_proof_message(cfg.enrollment_token, id.pub.key, issued));
    req.set_proof(std::string(proof.begin(), proof.end()));
    http::Request hr;
    hr.method = "POST";
    hr.url = cfg.hub_url + "/v1/enroll";
    hr.body = req.SerializeAsString();
    hr.headers["Content-Type"] = "application/x-protobuf";
    hr.max_response_bytes = 64 * 1024;
    if (!cfg.tls_ca_file.empty()) hr.ca_file = under_root(cfg, cfg.tls_ca_file).string();
    auto resp = http::send(hr);
    if (resp && resp->status == 200) {
      v1::EnrollResponse er;
      if (!er.ParseFromString(resp->body) || er.device_id().empty()) {
        logger->error("enrollment answer does not parse");
      } else if (auto named = director_key_of(er);
                 pinned_director && named && named->key != pinned_director->key) {
        // Not this fleet's hub (or not the key it was imaged for): keep no
        // credentials from it. Retried slowly: a corrected hub or pin fixes it.
        logger->error("state=enrollment_refused: the hub names director key {} but this device pins {} "
                      "(director-key); not enrolling with it", named->key_id, pinned_director->key_id);
      } else if (Status c = er.client_certificate().empty()
                                ? Status{}
                                : check_issued_certificate(cfg, id, er.device_id(), er.client_certificate(),
                                                           er.ca_certificates());
                 !c) {
        logger->error("state=enrollment_refused: {}; not enrolling with this hub", c.error().message);
      } else {
        return er;
      }
    } else if (resp) {
      logger->error("enrollment refused status={} body={}", resp->status, resp->body.substr(0, 300));
    } else if (!resp.error().retryable) {
      // An untrusted certificate or a host-name mismatch: retrying will not
      // fix it, but a new CA file (or hub certificate) will, so keep trying
      // slowly rather than exit and be restarted in a loop.
      logger->error("state=enrollment_failed: {}{}", resp.error().message,
                    cfg.tls_ca_file.empty() ? "; set tls-ca-file to the CA that signed the hub's certificate" : "");
    } else {
      logger->warn("enrollment failed: {}", resp.error().message);
    }
    auto delay = backoff.next();
    const auto until = std::chrono::steady_clock::now() + delay;
    while (!stop && std::chrono::steady_clock::now() < until) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return make_error(Errc::unavailable, "stopped before enrollment finished");
}

// Artifacts over HTTP with resume, straight to disk under the agent's root.
class HttpDownloader final : public Downloader {
 public:
  HttpDownloader(const DiskFileTree& files, const AgentConfig& cfg, std::string ca_file)
      : files_(files), cfg_(cfg), ca_file_(std::move(ca_file)) {}
  Status fetch(const std::string& url, const std::string& dest, uint64_t max_bytes) override {
    const auto host = files_.host_path(dest);
    if (auto s = fs::ensure_dir(host.parent_path(), 0700); !s) return s;
    http::DownloadOptions o;
    o.max_bytes = max_bytes;
    o.io_timeout = cfg_.download_timeout;
    o.deadline = download_deadline(cfg_, max_bytes);
    o.ca_file = ca_file_;
    auto r = http::download_to_file(url, host, o);
    if (!r) return r.error();
    log::get("agent")->info("downloaded {} bytes={} requests={} resumed_from={}", url, r->size, r->requests,
                            r->resumed_from);
    return {};
  }

 private:
  const DiskFileTree& files_;
  const AgentConfig& cfg_;
  std::string ca_file_;  // host path; empty = the system CA store
};


// What Paho reads from files to speak TLS with the broker.
struct BrokerTls {
  std::string cert_file, key_file;  // empty: no client certificate (a password device)
  std::string ca_file;              // empty: the system CA store
};

// Writes <state-dir>/tls/: the client certificate, the identity key in the
// PEM form TLS libraries read (the same key as identity.key, also 0600),
// and the CAs the broker's certificate is checked against: the pinned
// device CA, else those the hub named, each with tls-ca-file's.
Result<BrokerTls> write_broker_tls(const AgentConfig& cfg, const std::filesystem::path& state_dir,
                                   const bundles::KeyPair& id, const v1::EnrollResponse& creds) {
  BrokerTls out;
  const auto dir = state_dir / "tls";
  const std::string tls_ca = cfg.tls_ca_file.empty() ? std::string() : under_root(cfg, cfg.tls_ca_file).string();
  const std::string pinned = pinned_device_ca(cfg);
  const std::string& base = pinned.empty() ? creds.ca_certificates() : pinned;
  if (!base.empty() || !creds.client_certificate().empty()) {
    if (auto s = fs::ensure_own_dir(dir, 0700); !s) return s.error();
  }
  if (!base.empty()) {
    std::string bundle = base;
    if (!tls_ca.empty()) {
      auto extra = fs::read_file(tls_ca, x509::kMaxPemBytes);
      if (!extra) return extra.error().with_context("tls-ca-file");
      bundle += "\n" + *extra;
    }
    if (auto s = fs::write_file_atomic(dir / "broker-ca.pem", bundle, 0600); !s) return s.error();
    out.ca_file = (dir / "broker-ca.pem").string();
  } else {
    out.ca_file = tls_ca;
  }
  if (!creds.client_certificate().empty()) {
    if (auto s = fs::write_file_atomic(dir / "client.key", x509::ed25519_private_key_pem(id.secret), 0600); !s) {
      return s.error();
    }
    if (auto s = fs::write_file_atomic(dir / "client.pem", creds.client_certificate(), 0600); !s) return s.error();
    out.cert_file = (dir / "client.pem").string();
    out.key_file = (dir / "client.key").string();
  }
  return out;
}

// One renewal: a new certificate for the identity key, proved by signing
// the request with it (an expired certificate does not matter). *status is
// the hub's HTTP status (0: no answer).
Result<v1::RenewResponse> renew_certificate(const AgentConfig& cfg, const bundles::KeyPair& id,
                                            const std::string& device_id, int* status) {
  *status = 0;
  auto csr = x509::make_csr(id.secret, device_id);
  if (!csr) return csr.error();
  v1::RenewRequest req;
  req.set_device_id(device_id);
  req.set_csr(*csr);
  auto issued_or = next_issued_ms(under_root(cfg, cfg.state_dir) / "issued-floor", device_clock().now_unix_ms());
  if (!issued_or) return issued_or.error();
  const uint64_t issued = *issued_or;
  req.set_issued_unix_ms(issued);
  const Bytes proof = bundles::sign_detached(id, bundles::renew_proof_message(device_id, *csr, issued));
  req.set_proof(std::string(proof.begin(), proof.end()));
  http::Request hr;
  hr.method = "POST";
  hr.url = cfg.hub_url + "/v1/renew";
  hr.body = req.SerializeAsString();
  hr.headers["Content-Type"] = "application/x-protobuf";
  hr.max_response_bytes = 64 * 1024;
  hr.timeout = std::chrono::seconds(30);
  if (!cfg.tls_ca_file.empty()) hr.ca_file = under_root(cfg, cfg.tls_ca_file).string();
  auto resp = http::send(hr);
  if (!resp) return resp.error();
  *status = resp->status;
  if (resp->status != 200) {
    return make_error(resp->status == 403 ? Errc::permission_denied : Errc::unavailable,
                      "renewal refused status=" + std::to_string(resp->status) + " " + resp->body.substr(0, 300),
                      resp->status >= 500 || resp->status == 429);
  }
  v1::RenewResponse rr;
  if (!rr.ParseFromString(resp->body) || rr.client_certificate().empty()) {
    return make_error(Errc::parse, "renewal answer does not parse");
  }
  if (auto c = check_issued_certificate(cfg, id, device_id, rr.client_certificate(), rr.ca_certificates()); !c) {
    return c.error();
  }
  return rr;
}

}  // namespace

Status run_agent(const AgentConfig& cfg, const std::atomic<bool>& stop) {
  auto logger = log::get("agent");
  crypto::init();
  ::umask(077);
  const auto state_dir = under_root(cfg, cfg.state_dir);
  // The agent's own directory (its keys, credentials, journal): private even
  // if it existed.
  if (auto s = fs::ensure_own_dir(state_dir, 0700); !s) return s;
  bundles::Keyring plain_ring;
  std::optional<bundles::TrustStore> trust;
  if (!cfg.root_keyring.empty()) {
    auto t = load_trust_store(cfg, state_dir);
    if (!t) return t.error();
    trust = std::move(*t);
  } else {
    auto ring = load_keyring(cfg);
    if (!ring) return ring.error();
    plain_ring = std::move(*ring);
  }
  auto identity = ensure_identity(state_dir);
  if (!identity) return identity.error().with_context("device identity");
  auto pinned_director = pinned_director_key(cfg);
  if (!pinned_director) return pinned_director.error();

  // Credentials are kept 0600; a device never re-enrolls while it holds them.
  const auto cred_path = state_dir / "credentials.pb";
  v1::EnrollResponse creds;
  if (auto existing = fs::read_file(cred_path, 64 * 1024); existing) {
    if (!creds.ParseFromString(*existing) || creds.device_id().empty()) {
      return make_error(Errc::parse, cred_path.string() + " is damaged; remove it to enroll again");
    }
  } else {
    auto er = enroll(cfg, *identity, *pinned_director, stop);
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
  rc.role = cfg.k3s_role;
  rc.server_url = cfg.k3s_server_url;
  rc.token_file = cfg.k3s_token_file;
  rc.service_start_timeout = cfg.service_start_timeout;
  const std::string manager =
      cfg.service_manager == "auto" ? detect_service_manager(cfg.root) : cfg.service_manager;
  std::unique_ptr<ServiceManager> service;
  if (manager == "systemd" || manager == "openrc") {
    // install.sh names the unit after the role: k3s, k3s-agent.
    const std::string unit = cfg.k3s_role == "agent" ? "k3s-agent" : "k3s";
    // A Type=notify restart returns once k3s is up (with k3s's
    // TimeoutStartSec=0, never if it does not come up): the agent waits as
    // long as its health gate would, then the gate's rollback takes over.
    const auto tool_timeout = std::max(cfg.health_timeout, std::chrono::milliseconds(10000));
    auto m = manager == "systemd" ? make_systemd_manager(unit, tool_timeout) : make_openrc_manager(unit, tool_timeout);
    if (!m) return m.error();
    service = std::move(*m);
  }
  DirectK3sRuntime runtime(rc, std::move(service));
  logger->info("k3s service manager={}", runtime.service_manager());
  const std::string ca_file = cfg.tls_ca_file.empty() ? std::string() : under_root(cfg, cfg.tls_ca_file).string();
  HttpDownloader downloader(files, cfg, ca_file);

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
  core_cfg.keyring = plain_ring;
  core_cfg.trust = std::move(trust);
  // The pin wins; else the key the hub named when this device enrolled.
  const auto enrolled_director = director_key_of(creds);
  if (*pinned_director) {
    core_cfg.director_key = *pinned_director;
    if (enrolled_director && enrolled_director->key != (*pinned_director)->key) {
      logger->warn("the hub named director key {} at enrollment but director-key pins {}; desired states are "
                   "checked against the pinned key", enrolled_director->key_id, (*pinned_director)->key_id);
    }
  } else if (enrolled_director) {
    core_cfg.director_key = *enrolled_director;
  } else {
    logger->warn("no director key (enrolled with an older hub, and director-key is unset): desired states are not "
                 "authenticated, so campaign rollbacks are refused and generations are not a replay floor. Set "
                 "director-key to the hub's director.pub, or remove {} to enroll again", cred_path.string());
  }
  if (core_cfg.director_key) logger->info("director key_id={}", core_cfg.director_key->key_id);
  core_cfg.health_timeout = cfg.health_timeout;
  core_cfg.health_settle = cfg.health_settle;
  core_cfg.role = cfg.k3s_role;
  core_cfg.cluster_id = cfg.cluster_id;
  core_cfg.min_free_bytes = cfg.min_free_bytes;
  core_cfg.state_dir = cfg.state_dir;
  core_cfg.k3s_bin = cfg.k3s_bin;
  core_cfg.crash_at = cfg.crash_at;
  Agent agent(
      core_cfg, runtime, files, **store, device_clock(),
      [&](v1::Report&& r) {
        // Paho buffers while disconnected; QoS 1 gets it to the hub once
        // connected. Final outcomes are also in the agent's outbox, so they
        // survive an agent restart before the broker acknowledged them.
        if (auto s = transport->publish({report_topic, r.SerializeAsString(), 1, false}); !s) {
          logger->warn("report not queued: {}", s.error().message);
        }
      },
      &downloader);
  if (auto s = agent.start(); !s) return s;
  if (auto s = runtime.ensure_running(); !s) logger->warn("k3s not started: {}", s.error().message);

  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::string> inbox;
  // The hub's latest roll call (docs/architecture.md, "Presence after a
  // broker restart"): answered once per id, after a random delay.
  std::optional<v1::Rollcall> rollcall;
  std::atomic<bool> lost{false};
  auto install_handlers = [&] {
    transport->on_message([&](transport::Message&& m) {
      if (transport::is_rollcall_topic(m.topic)) {
        v1::Rollcall call;
        if (m.payload.size() > 64 || !call.ParseFromString(m.payload)) return;
        std::lock_guard lock(mu);
        rollcall = call;
        cv.notify_one();
        return;
      }
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
  };
  install_handlers();

  v1::Presence offline;
  offline.set_online(false);
  offline.set_agent_version(kAgentVersion);
  transport::ConnectOptions co;
  co.client_id = creds.device_id();
  co.clean_session = false;
  co.keepalive_s = 30;
  co.will = transport::Message{presence_topic, offline.SerializeAsString(), 1, true};
  // Where and as whom to connect, from the credentials: a client
  // certificate (the broker takes its CN as the device's name), or the
  // password of a device enrolled before certificates.
  auto apply_credentials = [&]() -> Status {
    auto tls = write_broker_tls(cfg, state_dir, *identity, creds);
    if (!tls) return tls.error().with_context("broker TLS files");
    co.url = creds.broker_url();
    co.username = creds.mqtt_username().empty() ? creds.device_id() : creds.mqtt_username();
    co.password = creds.client_certificate().empty() ? creds.mqtt_password() : std::string();
    co.cert_file = tls->cert_file;
    co.key_file = tls->key_file;
    co.ca_file = tls->ca_file;
    return {};
  };
  if (auto s = apply_credentials(); !s) return s;

  // Certificate renewal (docs/agent.md): before two thirds of the lifetime,
  // at once for a device that still has a password (it moves to a
  // certificate), and whenever the broker refuses the certificate (expired
  // while the device was away, or a new CA).
  std::mt19937_64 renew_rng(crypto::random_u64());
  const double renew_draw = std::uniform_real_distribution<double>(0.0, 1.0)(renew_rng);
  auto renew_time = [&]() -> int64_t {
    if (cfg.hub_url.empty()) return INT64_MAX;
    if (creds.client_certificate().empty()) return creds.mqtt_password().empty() ? INT64_MAX : 0;
    auto info = x509::parse_certificate_pem(creds.client_certificate());
    if (!info) return 0;
    return certificate_renew_at(info->not_before_unix, info->not_after_unix, renew_draw);
  };
  int64_t renew_at = renew_time();
  Backoff renew_backoff(std::chrono::seconds(5), std::chrono::hours(1), crypto::random_u64());
  auto next_renew_try = std::chrono::steady_clock::now();
  int last_renew_status = -1;
  bool reconnect_now = false;
  // A move taken: the reconnect waits until every message already received
  // is handled, so that a later one (the hub withdrawing the move, queued in
  // this device's session behind it while it was offline) has its say first.
  bool move_pending = false;
  std::string session_url;  // the broker of the session that is up
  bool renewed = false;  // a new certificate: a disconnected device tries it at once
  auto try_renew = [&] {
    int status = 0;
    auto rr = renew_certificate(cfg, *identity, creds.device_id(), &status);
    if (!rr) {
      std::chrono::milliseconds delay = renew_backoff.next();
      if (status == 403) {
        if (last_renew_status != 403) {
          logger->error("state=decommissioned: the hub refuses to renew this device's certificate ({}). k3s keeps "
                        "running its last good state. To enroll again with a new identity, remove {} and {} and set "
                        "an enrollment token.", rr.error().message, cred_path.string(), (state_dir / "identity.key").string());
        }
        delay = cfg.revoked_retry;
      } else if (status == 404 || status == 409) {
        // An older hub, or one in development mode: nothing to renew there.
        if (last_renew_status != status) logger->warn("certificate not renewed: {}", rr.error().message);
        delay = std::chrono::hours(1);
      } else {
        logger->warn("certificate renewal failed: {}; retry in {}s", rr.error().message, delay.count() / 1000);
      }
      last_renew_status = status;
      next_renew_try = std::chrono::steady_clock::now() + delay;
      return;
    }
    last_renew_status = 200;
    renew_backoff.reset();
    const bool moved = creds.client_certificate().empty() || (!rr->broker_url().empty() && rr->broker_url() != creds.broker_url());
    v1::EnrollResponse next = creds;
    next.set_client_certificate(rr->client_certificate());
    next.set_ca_certificates(rr->ca_certificates());
    if (!rr->broker_url().empty()) next.set_broker_url(rr->broker_url());
    next.clear_mqtt_password();
    if (auto s = fs::write_file_atomic(cred_path, next.SerializeAsString(), 0600); !s) {
      logger->error("renewed certificate not saved: {}", s.error().message);
      next_renew_try = std::chrono::steady_clock::now() + renew_backoff.next();
      return;
    }
    creds = std::move(next);
    if (auto s = apply_credentials(); !s) logger->error("renewed certificate not usable: {}", s.error().message);
    renew_at = renew_time();
    auto info = x509::parse_certificate_pem(creds.client_certificate());
    // A device whose clock runs far ahead sees even a fresh certificate as
    // due: it waits a third of the lifetime (at most an hour) of its own
    // running time before renewing again, instead of renewing at every pass.
    if (info) {
      const int64_t third_s = std::max<int64_t>(1, (info->not_after_unix - info->not_before_unix) / 3);
      next_renew_try = std::chrono::steady_clock::now() + std::chrono::seconds(std::min<int64_t>(third_s, 3600));
    }
    logger->info("renewed the broker certificate serial={} not_after={} next_renewal={}{}",
                 info ? info->serial_hex : "?", info ? info->not_after_unix : 0, renew_at,
                 moved ? "; reconnecting with it" : "");
    // A connected session keeps going (the broker checks certificates at
    // connect); a device that moved from a password, or to another broker
    // address, reconnects now.
    if (moved) reconnect_now = true;
    renewed = true;
  };

  // A move to another cell's broker (docs/agent.md, "Moving to another
  // broker"): from a director-signed header only (decide_desired), newer
  // than the last one taken (a replayed move cannot send the device back),
  // the same scheme (never from TLS to plain MQTT). The new broker is
  // checked exactly as the old one: the same CA file, the same client
  // certificate, so it must chain to the CA this device already trusts.
  const auto move_floor_path = state_dir / "broker-move-issued";
  int64_t move_floor = 0;
  if (auto f = fs::read_file(move_floor_path, 64); f) {
    try {
      move_floor = std::stoll(*f);
    } catch (const std::exception&) {
      move_floor = 0;
    }
  }
  auto take_broker_move = [&](const BrokerMove& mv) {
    const std::string& url = mv.url;
    auto scheme = [](const std::string& u) { return u.substr(0, u.find("://") + 3); };
    if (mv.issued_unix_ms <= move_floor) {
      logger->warn("refused a move to broker {}: signed at {} ms, not after the last move taken ({} ms): a replay",
                   url.substr(0, 256), mv.issued_unix_ms, move_floor);
      return;
    }
    if ((url.rfind("ssl://", 0) != 0 && url.rfind("tcp://", 0) != 0) || url.size() > 512 ||
        url.find_first_of(" \t\r\n") != std::string::npos || scheme(url) != scheme(creds.broker_url())) {
      logger->warn("refused a move to broker '{}': not a {}host:port address like the current one", url.substr(0, 256),
                   scheme(creds.broker_url()));
      return;
    }
    if (auto st = fs::write_file_atomic(move_floor_path, std::to_string(mv.issued_unix_ms), 0600); !st) {
      logger->error("move to broker {} not taken: {}", url, st.error().message);
      return;
    }
    move_floor = mv.issued_unix_ms;
    if (url == creds.broker_url()) return;
    v1::EnrollResponse next = creds;
    next.set_broker_url(url);
    if (auto st = fs::write_file_atomic(cred_path, next.SerializeAsString(), 0600); !st) {
      logger->error("move to broker {} not saved: {}", url, st.error().message);
      return;
    }
    logger->info("the hub moves this device from broker {} to {}; reconnecting", creds.broker_url(), url);
    creds = std::move(next);
    if (auto st = apply_credentials(); !st) logger->error("moved broker not usable: {}", st.error().message);
    move_pending = true;
  };

  // Publishes the outbox again and drops what the broker acknowledged.
  auto deliver_outbox = [&](bool republish) {
    if (agent.outbox().empty()) return;
    const uint64_t last = agent.outbox().rbegin()->first;
    if (republish) {
      for (const auto& [seq, bytes] : agent.outbox()) (void)transport->publish({report_topic, bytes, 1, false});
    }
    if (transport->flush(std::chrono::seconds(3))) agent.outbox_delivered(last);
  };
  auto next_drift = std::chrono::steady_clock::now() + cfg.drift_interval;
  auto next_supervise = std::chrono::steady_clock::now() + cfg.supervise_interval;
  auto next_outbox = std::chrono::steady_clock::now();
  auto next_inventory = std::chrono::steady_clock::now() + cfg.inventory_interval;
  bool revoked = false;
  bool tls_rejected = false;
  auto revoked_since = std::chrono::system_clock::now();

  // Full jitter: after a broker restart the fleet spreads out instead of returning at once.
  Backoff backoff = make_reconnect_backoff(creds.device_id(), cfg.reconnect_max, static_cast<uint64_t>(::getpid()));
  bool rollcall_refused = false;
  uint64_t rollcall_answered = 0;
  // When the answer to the last roll call is due (none: the far future).
  auto rollcall_due = std::chrono::steady_clock::time_point::max();
  std::mt19937_64 rollcall_rng(crypto::random_u64());
  auto next_try = std::chrono::steady_clock::now();
  bool connected = false;
  int auth_failures = 0;
  auto refused_since = std::chrono::steady_clock::now();
  while (!stop) {
    if (device_clock().now_unix() >= renew_at && std::chrono::steady_clock::now() >= next_renew_try &&
        !agent.applied().in_flight) {
      try_renew();
    }
    if (move_pending) {
      bool received;
      {
        std::lock_guard lock(mu);
        received = !inbox.empty();
      }
      if (!received) {
        move_pending = false;
        if (connected && !lost && creds.broker_url() == session_url) {
          logger->info("stays on broker {}: the move was withdrawn before it was taken", session_url);
        } else {
          reconnect_now = true;
        }
      }
    }
    if (reconnect_now) {
      reconnect_now = false;
      // Paho keeps the address it was made with: a new one needs a new client.
      transport->disconnect();
      transport = transport::make_paho_transport();
      install_handlers();
      connected = false;
      lost = false;
      next_try = std::chrono::steady_clock::now();
    }
    if (renewed) {
      renewed = false;
      if (!connected || lost) {
        next_try = std::chrono::steady_clock::now();
        auth_failures = 0;
      }
    }
    if ((!connected || lost) && std::chrono::steady_clock::now() >= next_try) {
      lost = false;
      auto s = transport->connect(co);
      if (s) s = transport->subscribe(desired_topic, 1);
      if (s) {
        // A hub older than roll calls does not let devices read it: the
        // device only misses the call to re-announce after a broker restart.
        if (auto rs = transport->subscribe(transport::rollcall_topic(co.client_id), 1); !rs && !rollcall_refused) {
          rollcall_refused = true;
          logger->warn("not subscribed to the hub's roll call: {}", rs.error().message);
        }
        connected = true;
        session_url = co.url;
        auth_failures = 0;
        tls_rejected = false;
        backoff.reset();
        // Outcomes from before a restart go first: the hub drops reports
        // older than the newest it has seen.
        deliver_outbox(true);
        v1::Presence online;
        online.set_online(true);
        online.set_agent_version(kAgentVersion);
        online.set_time_unix_ms(device_clock().now_unix_ms());
        (void)transport->publish({presence_topic, online.SerializeAsString(), 1, true});
        logger->info("connected device={} broker={}", creds.device_id(), creds.broker_url());
        agent.report_inventory();
        if (revoked) {
          revoked = false;
          const auto mins = std::chrono::duration_cast<std::chrono::minutes>(std::chrono::system_clock::now() -
                                                                             revoked_since).count();
          agent.report_note(v1::REASON_CREDENTIALS_REVOKED,
                            "the broker refused this device's credentials for " + std::to_string(mins) +
                                " min before accepting them again");
        }
      } else {
        connected = false;
        auto delay = backoff.next();
        if (s.error().code == Errc::unauthenticated && !creds.client_certificate().empty()) {
          // The broker refused the certificate: expired while the device
          // was away, issued by a CA the broker no longer trusts, or
          // revoked. Renewing (with the identity key) fixes the first two;
          // the hub says so when it is the third.
          renew_at = std::min<int64_t>(renew_at, device_clock().now_unix());
          // A refusal lifts the wait after a renewal down to a minute: a
          // certificate the broker will not take is worth replacing soon.
          next_renew_try = std::min(next_renew_try, std::chrono::steady_clock::now() + std::chrono::minutes(1));
        }
        if (s.error().code == Errc::unauthenticated) {
          // Revoked or decommissioned: a clear error state with slow retries,
          // never a crash loop and never a re-enrollment on our own. Fresh
          // credentials take a moment to reach the broker (a reload, a
          // replicated auth backend), so only refusals that last count.
          if (auth_failures++ == 0) refused_since = std::chrono::steady_clock::now();
          const bool lasting = std::chrono::steady_clock::now() - refused_since >= cfg.revoked_after;
          if (auth_failures >= 3 && lasting && !revoked) {
            revoked = true;
            revoked_since = std::chrono::system_clock::now();
            logger->error("state=credentials_revoked: the broker keeps refusing this device's credentials; it may "
                          "have been revoked or decommissioned. k3s keeps running its last good state. Retrying "
                          "every {}s; to enroll again, remove {} and set an enrollment token.",
                          cfg.revoked_retry.count() / 1000, cred_path.string());
          }
          if (revoked) {
            delay = cfg.revoked_retry;
          } else {
            delay = std::min(delay, std::chrono::milliseconds(5000));
          }
        } else {
          auth_failures = 0;
        }
        if (s.error().code == Errc::refused && !tls_rejected) {
          // The broker's TLS certificate is not trusted (or names another
          // host). Said once as an error state; retried with the usual
          // backoff, since a new broker certificate or CA file fixes it
          // without a visit. Nothing is applied meanwhile: no desired state
          // arrives over a connection that never opened.
          tls_rejected = true;
          logger->error("state=broker_tls_rejected: {}. Check tls-ca-file{}; k3s keeps running its last good state.",
                        s.error().message, cfg.tls_ca_file.empty() ? " (unset: the system CA store is used)" : "");
        }
        if (!revoked) logger->warn("broker connect failed: {}; retry in {}ms", s.error().message, delay.count());
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
    std::optional<v1::Rollcall> call;
    {
      std::lock_guard lock(mu);
      call.swap(rollcall);
    }
    if (call && call->id() != rollcall_answered) {
      // Spread over the window the hub names (capped), so a fleet that
      // hears the call at once does not answer at once.
      rollcall_answered = call->id();
      const uint32_t spread = std::min(call->spread_ms(), transport::kMaxRollcallSpreadMs);
      rollcall_due = std::chrono::steady_clock::now() +
                     std::chrono::milliseconds(std::uniform_int_distribution<uint32_t>(0, spread)(rollcall_rng));
    }
    if (connected && std::chrono::steady_clock::now() >= rollcall_due) {
      rollcall_due = std::chrono::steady_clock::time_point::max();
      v1::Presence online;
      online.set_online(true);
      online.set_agent_version(kAgentVersion);
      online.set_time_unix_ms(SystemClock::instance().now_unix_ms());
      (void)transport->publish({presence_topic, online.SerializeAsString(), 1, true});
      // Its state again: an outcome the broker acknowledged and then lost in
      // a crash reaches the hub this way.
      if (!agent.applied().in_flight) agent.report_inventory();
      logger->info("answered the hub's roll call");
    }
    if (!payload.empty()) {
      agent.handle_desired(payload);
      if (connected) deliver_outbox(false);
      if (auto mv = agent.take_broker_move()) take_broker_move(*mv);
    }
    if (cfg.drift_interval.count() > 0 && std::chrono::steady_clock::now() >= next_drift) {
      next_drift = std::chrono::steady_clock::now() + cfg.drift_interval;
      agent.check_drift();
    }
    // k3s that died (or that the init system failed to start) is started
    // again; between applies only, never in the middle of one.
    if (cfg.supervise_interval.count() > 0 && std::chrono::steady_clock::now() >= next_supervise) {
      next_supervise = std::chrono::steady_clock::now() + cfg.supervise_interval;
      if (!agent.applied().in_flight) {
        if (auto s = runtime.ensure_running(); !s) logger->warn("k3s is not running and did not start: {}", s.error().message);
      }
    }
    // Reports only what changed since the last inventory sent; a device that
    // is disconnected reports its whole inventory on the next connect anyway.
    if (cfg.inventory_interval.count() > 0 && std::chrono::steady_clock::now() >= next_inventory) {
      next_inventory = std::chrono::steady_clock::now() + cfg.inventory_interval;
      if (connected) agent.check_inventory();
    }
    if (connected && !agent.outbox().empty() && std::chrono::steady_clock::now() >= next_outbox) {
      next_outbox = std::chrono::steady_clock::now() + std::chrono::seconds(5);
      deliver_outbox(false);
    }
  }
  logger->info("stopping (k3s keeps running)");
  // A clean disconnect discards the will, so say goodbye explicitly.
  if (connected) (void)transport->publish({presence_topic, offline.SerializeAsString(), 1, true});
  (void)transport->flush(std::chrono::seconds(2));
  transport->disconnect();
  return {};
}

}  // namespace flotilla::agent

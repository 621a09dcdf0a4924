#include "flotilla/hub/app.hpp"
#include "flotilla/hub/coord.hpp"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <thread>

#include "flotilla/common/backoff.hpp"
#include "flotilla/common/crypto.hpp"
#include "flotilla/common/fs.hpp"
#include "flotilla/common/log.hpp"
#include "flotilla/common/transport.hpp"
#include "flotilla/common/transport_loop.hpp"
#include "flotilla/hub/aggregates.hpp"
#include "flotilla/hub/artifacts.hpp"
#include "flotilla/common/http_client.hpp"
#include "flotilla/hub/broker.hpp"
#include "flotilla/hub/device_ca.hpp"
#include "flotilla/hub/federation.hpp"
#include "flotilla/hub/gitsync.hpp"
#include "flotilla/hub/http_server.hpp"
#include "flotilla/hub/service.hpp"
#include "flotilla/hub/ui_server.hpp"

namespace flotilla::hub {

namespace {

// A setting that is exactly "true" or "false" (a typo must not turn a
// feature off without a word).
Result<bool> true_or_false(const Options& o, const std::string& key) {
  const std::string& v = o.get(key);
  if (v != "true" && v != "false") {
    return make_error(Errc::invalid_argument,
                      key + " must be true or false, got '" + v + "' (from " + o.source(key) + ")");
  }
  return v == "true";
}
Result<std::pair<std::string, int>> split_host_port(const std::string& key, const std::string& v) {
  auto colon = v.rfind(':');
  if (colon == std::string::npos || colon == 0) {
    return make_error(Errc::invalid_argument, key + " must look like HOST:PORT, got '" + v + "'");
  }
  try {
    int port = std::stoi(v.substr(colon + 1));
    if (port < 0 || port > 65535) throw std::out_of_range("port");
    return std::make_pair(v.substr(0, colon), port);
  } catch (const std::exception&) {
    return make_error(Errc::invalid_argument, key + ": bad port in '" + v + "'");
  }
}
// The same URL with its port raised by offset (cell i's broker-public-url).
Result<std::string> with_port_offset(const std::string& url, int offset) {
  if (offset == 0) return url;
  const auto colon = url.rfind(':');
  const auto scheme = url.find("://");
  if (colon == std::string::npos || scheme == std::string::npos || colon <= scheme + 2) {
    return make_error(Errc::invalid_argument, "broker-public-url must name a port (scheme://host:port) when cells > "
                                              "1: cell i is told that port + i, got '" + url + "'");
  }
  try {
    size_t used = 0;
    const int port = std::stoi(url.substr(colon + 1), &used);
    if (used != url.size() - colon - 1 || port < 1 || port + offset > 65535) throw std::out_of_range("port");
    return url.substr(0, colon + 1) + std::to_string(port + offset);
  } catch (const std::exception&) {
    return make_error(Errc::invalid_argument, "broker-public-url: bad port in '" + url + "' for " +
                                                  std::to_string(offset + 1) + " cells");
  }
}
// This hub process in the coordinator: "<host>:<absolute data dir>".
std::string coord_holder_name(const std::string& data_dir) {
  char host[256] = {};
  if (::gethostname(host, sizeof(host) - 1) != 0) std::snprintf(host, sizeof(host), "localhost");
  std::error_code ec;
  auto dir = std::filesystem::absolute(data_dir, ec);
  return std::string(host) + ":" + (ec ? data_dir : dir.lexically_normal().string());
}

}  // namespace

std::string default_data_dir(bool root, const char* xdg_state_home, const char* home) {
  if (root) return "/var/lib/flotilla";
  // XDG: a relative XDG_STATE_HOME is invalid and must be ignored.
  if (xdg_state_home && *xdg_state_home == '/') return (std::filesystem::path(xdg_state_home) / "flotilla").string();
  if (home && *home == '/') return (std::filesystem::path(home) / ".local/state/flotilla").string();
  return "";  // nowhere sensible: hub_config_from asks for --data-dir
}

void add_hub_options(Options& o) {
  o.add("config", "YAML config file with any of these keys", "/etc/flotilla/hub.yaml")
      .add("data-dir", "where the hub keeps its SQLite store, broker state and admin token (default: "
                       "/var/lib/flotilla as root, else $XDG_STATE_HOME/flotilla or ~/.local/state/flotilla)",
           default_data_dir(::geteuid() == 0, std::getenv("XDG_STATE_HOME"), std::getenv("HOME")))
      .add("listen", "REST API address HOST:PORT (PORT 0 = any free port)", "127.0.0.1:8080")
      .add("public-url", "REST base URL as devices reach it (default: http://<listen>, https:// with TLS)")
      .add("tls-cert", "PEM certificate chain for the REST API; with tls-key the API speaks only TLS")
      .add("tls-key", "PEM private key for tls-cert")
      .add("broker-url", "external MQTT broker (tcp://host:port); empty = start an embedded mosquitto")
      .add("broker-username", "hub's username on the external broker")
      .add("broker-password", "hub's password on the external broker (prefer the env variable)")
      .add("broker-listen", "embedded broker address HOST:PORT (PORT 0 = a free port, kept across restarts)",
           "127.0.0.1:0")
      .add("broker-public-url", "broker address given to devices at enrollment (default: the embedded "
                                 "broker's listen address, or broker-url)")
      .add("broker-tls-cert", "PEM certificate chain for the embedded broker; with broker-tls-key its only "
                              "listener speaks TLS (devices get ssl://)")
      .add("broker-tls-key", "PEM private key for broker-tls-cert")
      .add("broker-tls-ca", "PEM CA file the hub's own MQTT client trusts for the broker (embedded with TLS, or "
                            "an ssl:// broker-url); empty = the system CA store")
      .add("mosquitto", "mosquitto binary for the embedded broker", "/usr/sbin/mosquitto")
      .add("cells", "cells to run (1 to 64): each an embedded mosquitto with its own port, directory and ACL, and "
                    "the hub's own session, report worker and desired-state publisher for it; devices are spread "
                    "over them at enrollment. With a fixed broker-listen port P, cell i listens on P+i", "1")
      .add_list("cell-broker", "the broker of a cell that runs on its own (this hub starts none), as the "
                               "ssl://HOST:PORT devices and hubs connect to; repeat it once per cell, cell 0 first, "
                               "the same list on every hub process. The broker trusts the device CA for client "
                               "certificates (docs/operations.md, \"Several hub processes\"). The hubs on one "
                               "coordinator share these cells by lease: each serves at most its share and takes "
                               "over the cells of a hub that died")
      .add("cell-lease-ttl", "with cell-broker: how long a hub's hold on its cells and on the campaign leadership "
                             "outlives it; another hub takes over its cells after this long (2s to 60s)", "10s")
      .add("control-snapshot-every", "with coordination etcd: once the control log has this many entries past "
                                     "its last snapshot, a hub writes a snapshot of the control data to etcd and "
                                     "deletes the older entries (0 = never; hubs that need deleted entries load "
                                     "the snapshot)", "10000")
      .add("control-keep-entries", "with coordination etcd: entries kept in the log behind a snapshot, so a hub "
                                   "briefly behind applies entries rather than the whole snapshot", "1000")
      .add("peer-ca", "with cell-broker: PEM CAs that sign the other hub processes' REST certificates (a device "
                      "read for a cell another hub holds is forwarded to its public-url, which must be https "
                      "unless on this machine); default: the system trust store")
      .add("http-threads", "threads serving the REST API", "16")
      .add("db-cache-mib", "SQLite page cache for the hub's store, in MiB (a fixed cost, not per device); "
                           "with cell-files, for hub.db and for each cell's file", "64")
      .add("db-mmap-mib", "map up to this many MiB of the store file (0 = off); faster reads once the store "
                          "outgrows db-cache-mib, e.g. 1024 for 1M devices", "0")
      .add("cell-files", "keep each cell's device rows (reports, inventories, campaign rows) in a file of its own, "
                         "<data-dir>/cells/<n>/devices.db, instead of hub.db (true or false). Left unset, a new "
                         "data directory gets them and an existing hub.db with devices keeps its rows; set to "
                         "true, the first start moves hub.db's rows into them. Either way, once in files the hub "
                         "always opens them", "true")
      .add("git-sync", "follow the GitRepos stored on this hub (true) or keep them without fetching (false)",
           "true")
      .add("director-key", "private key file (flotilla key generate, not passphrase-protected, mode 0600) the hub "
                           "signs every device's desired-state header with; empty = <data-dir>/director.key, made "
                           "on first start (docs/security.md, \"Director-signed desired state\")")
      .add("http-max-connections", "open REST API connections at most; at the cap new ones wait (0 = no cap)", "1024")
      .add("http-max-connections-per-peer", "open REST API connections per client address; more are refused with "
                                            "503 (0 = no cap)", "256")
      .add("enroll-rate", "enrollment requests per second for all devices together; more get 429 (0 = no limit)",
           "200")
      .add("enroll-rate-per-token", "enrollment requests per second with one enrollment token (0 = no limit)", "50")
      .add("broker-max-queued-messages", "embedded broker: QoS 1 messages queued per client, the hub's own "
                                         "session included (mosquitto's max_queued_messages)", "1000000")
      .add("broker-max-queued-mib", "embedded broker: MiB of messages queued per client (max_queued_bytes)", "256")
      .add("ui-listen", "web dashboard address HOST:PORT, served at /ui/ (PORT 0 = any free port); empty = no "
                        "dashboard listener. It uses tls-cert/tls-key when they are set")
      .add("ui-max-streams", "live event streams the dashboard may hold open at once (one per open page)", "64")
      .add("ui-max-connections", "connections the dashboard listener accepts at once, streams included", "256")
      .add("ui-event-interval", "at most one live event per stream per this interval (changes are coalesced)", "1s")
      .add("views-timeline-interval", "how often a running campaign's counts are sampled for its timeline", "5s")
      .add("views-scan-limit", "device rows one filtered device-list request may examine when no index serves "
                               "its filter (it then returns a cursor to carry on)", "200000")
      .add("device-ca-cert", "PEM certificate of the CA that issues devices' broker client certificates (with "
                             "device-ca-key); empty = <data-dir>/ca/device-ca.pem, made on first start")
      .add("device-ca-key", "PEM private key of device-ca-cert (unencrypted, mode 0600)")
      .add("device-cert-lifetime", "how long a device's broker certificate is valid; agents renew it after about "
                                   "two thirds (10s to 3650d)", "90d")
      .add("dev-plain-mqtt", "DEVELOPMENT ONLY: the embedded broker speaks plain MQTT and devices authenticate with "
                             "passwords (no TLS, no certificates; every enrollment reloads the broker): true or false",
           "false")
      .add("log-level", "trace, debug, info, warn or error", "info")
      .add("log-format", "text, or json: one object per line (time in UTC, level, logger, msg)", "text")
      .config_file_key("config");
  coord::add_coordination_options(o);  // docs/adr/0014
  federation::add_federation_options(o);  // --role; docs/adr/0015
}

Result<bundles::KeyPair> load_director_key(const std::filesystem::path& data_dir, const std::string& configured) {
  const std::filesystem::path path = configured.empty() ? data_dir / "director.key" : std::filesystem::path(configured);
  Result<bundles::KeyPair> key = make_error(Errc::internal, "unset");
  if (configured.empty() && !std::filesystem::exists(path)) {
    key = bundles::generate_key();
    if (auto s = bundles::write_private_key(path, *key); !s) return s.error().with_context("director key");
    log::get("hub")->info("made a director key {} key_id={}", path.string(), key->pub.key_id);
  } else {
    key = bundles::read_private_key(path);
    if (!key) {
      return key.error().with_context("director-key " + path.string() +
                                      (bundles::is_encrypted_private_key(path)
                                           ? " (the hub cannot ask for a passphrase: use an unencrypted key, mode 0600)"
                                           : ""));
    }
  }
  if (auto s = bundles::write_public_key(data_dir / "director.pub", key->pub); !s) {
    return s.error().with_context("director public key");
  }
  return key;
}

Result<HubConfig> hub_config_from(const Options& o) {
  HubConfig c;
  c.data_dir = o.get("data-dir");
  if (c.data_dir.empty()) {
    return make_error(Errc::invalid_argument, o.source("data-dir") == "default"
                                                  ? "no default data-dir (not root, no HOME or XDG_STATE_HOME): set "
                                                    "--data-dir"
                                                  : "data-dir must not be empty");
  }
  auto listen = split_host_port("listen", o.get("listen"));
  if (!listen) return listen.error();
  c.listen_host = listen->first;
  c.listen_port = listen->second;
  c.public_url = o.get("public-url");
  c.tls_cert_file = o.get("tls-cert");
  c.tls_key_file = o.get("tls-key");
  // Half a TLS setup is a typo, never a request for plain HTTP.
  if (c.tls_cert_file.empty() != c.tls_key_file.empty()) {
    return make_error(Errc::invalid_argument, c.tls_cert_file.empty()
                                                  ? "tls-key is set but tls-cert is not; TLS needs both"
                                                  : "tls-cert is set but tls-key is not; TLS needs both");
  }
  c.broker_url = o.get("broker-url");
  if (!c.broker_url.empty() && c.broker_url.rfind("tcp://", 0) != 0 && c.broker_url.rfind("ssl://", 0) != 0) {
    return make_error(Errc::invalid_argument, "broker-url must start with tcp:// or ssl://, got '" + c.broker_url + "'");
  }
  c.broker_public_url = o.get("broker-public-url");
  if (!c.broker_public_url.empty() && c.broker_public_url.rfind("tcp://", 0) != 0 &&
      c.broker_public_url.rfind("ssl://", 0) != 0) {
    return make_error(Errc::invalid_argument, "broker-public-url must start with tcp:// or ssl://");
  }
  c.broker_tls_cert_file = o.get("broker-tls-cert");
  c.broker_tls_key_file = o.get("broker-tls-key");
  c.broker_tls_ca_file = o.get("broker-tls-ca");
  if (c.broker_tls_cert_file.empty() != c.broker_tls_key_file.empty()) {
    return make_error(Errc::invalid_argument,
                      c.broker_tls_cert_file.empty()
                          ? "broker-tls-key is set but broker-tls-cert is not; broker TLS needs both"
                          : "broker-tls-cert is set but broker-tls-key is not; broker TLS needs both");
  }
  auto plain = true_or_false(o, "dev-plain-mqtt");
  if (!plain) return plain.error();
  c.dev_plain_mqtt = *plain;
  if (c.dev_plain_mqtt && !c.broker_url.empty()) {
    return make_error(Errc::invalid_argument, "dev-plain-mqtt configures the embedded broker, but broker-url points "
                                              "at an external one");
  }
  if (c.dev_plain_mqtt && !c.broker_tls_cert_file.empty()) {
    return make_error(Errc::invalid_argument, "dev-plain-mqtt runs the embedded broker without TLS; it contradicts "
                                              "broker-tls-cert (leave dev-plain-mqtt off: the broker speaks TLS by "
                                              "default)");
  }
  // The embedded broker speaks TLS unless told otherwise for development.
  const bool broker_tls = c.broker_url.empty() && !c.dev_plain_mqtt;
  if (!c.broker_tls_cert_file.empty() && !c.broker_url.empty()) {
    return make_error(Errc::invalid_argument,
                      "broker-tls-cert/broker-tls-key configure the embedded broker, but broker-url points at an "
                      "external one (configure TLS on that broker and use an ssl:// broker-url)");
  }
  // Devices told tcp:// would speak plain MQTT to a TLS-only port.
  if (broker_tls && c.broker_public_url.rfind("tcp://", 0) == 0) {
    return make_error(Errc::invalid_argument, "broker-public-url is tcp:// but the embedded broker speaks only TLS "
                                              "(with client certificates); use ssl://");
  }
  if (c.dev_plain_mqtt && c.broker_public_url.rfind("ssl://", 0) == 0) {
    return make_error(Errc::invalid_argument, "broker-public-url is ssl:// but dev-plain-mqtt makes the embedded "
                                              "broker speak plain MQTT; use tcp://");
  }
  if (!c.broker_tls_ca_file.empty() && !broker_tls && c.broker_url.rfind("ssl://", 0) != 0) {
    return make_error(Errc::invalid_argument, "broker-tls-ca is set but the broker is not reached over TLS "
                                              "(dev-plain-mqtt is on, or broker-url is tcp://)");
  }
  for (const auto& [key, file] : {std::pair{"broker-tls-cert", c.broker_tls_cert_file},
                                  std::pair{"broker-tls-key", c.broker_tls_key_file},
                                  std::pair{"broker-tls-ca", c.broker_tls_ca_file}}) {
    if (!file.empty() && ::access(file.c_str(), R_OK) != 0) {
      return make_error(Errc::invalid_argument, std::string(key) + ": cannot read '" + file + "' (from " +
                                                    o.source(key) + ")");
    }
  }
  c.broker_username = o.get("broker-username");
  c.broker_password = o.get("broker-password");
  auto bl = split_host_port("broker-listen", o.get("broker-listen"));
  if (!bl) return bl.error();
  c.broker_listen_host = bl->first;
  c.broker_listen_port = bl->second;
  c.mosquitto_bin = o.get("mosquitto");
  auto cells = o.get_int("cells", 1, kMaxCells);
  if (!cells) return cells.error();
  c.cells = static_cast<int>(*cells);
  if (c.cells > 1 && !c.broker_url.empty()) {
    return make_error(Errc::invalid_argument, "cells > 1 needs the embedded broker (one per cell); with broker-url "
                                              "the hub runs one cell on that broker");
  }
  if (c.cells > 1 && c.broker_listen_port != 0 && c.broker_listen_port + c.cells - 1 > 65535) {
    return make_error(Errc::invalid_argument, "broker-listen port " + std::to_string(c.broker_listen_port) + " + " +
                                                  std::to_string(c.cells) + " cells runs past port 65535");
  }
  c.cell_brokers = o.get_list("cell-broker");
  if (!c.cell_brokers.empty()) {
    if (static_cast<int>(c.cell_brokers.size()) > kMaxCells) {
      return make_error(Errc::invalid_argument, "cell-broker names " + std::to_string(c.cell_brokers.size()) +
                                                    " cells; at most " + std::to_string(kMaxCells));
    }
    for (const auto& u : c.cell_brokers) {
      const bool ssl = u.rfind("ssl://", 0) == 0;
      auto parsed = http::parse_url("https://" + (ssl ? u.substr(6) : u));
      // The port is named, never a default: brokers have no standard one here.
      const bool has_port = u.find(':', 6) != std::string::npos && u.back() != ']';
      if (!ssl || !has_port || !parsed || parsed->host.empty() || parsed->port.empty() || parsed->target != "/" ||
          u.back() == '/') {
        return make_error(Errc::invalid_argument, "cell-broker must look like ssl://HOST:PORT (devices and hubs "
                                                  "authenticate with certificates from the device CA), got '" +
                                                      u + "' (from " + o.source("cell-broker") + ")");
      }
    }
    for (const char* key : {"broker-url", "broker-public-url", "broker-tls-cert"}) {
      if (!o.get(key).empty()) {
        return make_error(Errc::invalid_argument, std::string(key) + " configures the hub's own broker, but "
                                                  "cell-broker names brokers that run on their own; leave it unset");
      }
    }
    if (c.dev_plain_mqtt) {
      return make_error(Errc::invalid_argument, "dev-plain-mqtt runs an embedded broker; cell-broker brokers "
                                                "take certificates from the device CA");
    }
    if (o.source("cells") != "default" && c.cells != static_cast<int>(c.cell_brokers.size())) {
      return make_error(Errc::invalid_argument, "cells is " + std::to_string(c.cells) + " but cell-broker names " +
                                                    std::to_string(c.cell_brokers.size()) +
                                                    " cells; leave cells unset (it follows cell-broker)");
    }
    c.cells = static_cast<int>(c.cell_brokers.size());
  }
  auto ttl = o.get_duration("cell-lease-ttl");
  if (!ttl) return make_error(Errc::invalid_argument, "cell-lease-ttl: " + ttl.error().message);
  if (*ttl < std::chrono::seconds(2) || *ttl > std::chrono::seconds(60) || ttl->count() % 1000 != 0) {
    return make_error(Errc::invalid_argument, "cell-lease-ttl must be whole seconds from 2s to 60s, got '" +
                                                  o.get("cell-lease-ttl") + "' (from " + o.source("cell-lease-ttl") + ")");
  }
  c.cell_lease_ttl = std::chrono::duration_cast<std::chrono::seconds>(*ttl);
  for (const auto& [key, out] : {std::pair{"control-snapshot-every", &c.control_snapshot_every},
                                  std::pair{"control-keep-entries", &c.control_keep_entries}}) {
    auto n = o.get_int(key, 0, 100000000);
    if (!n) return n.error();
    *out = *n;
  }
  c.peer_ca_file = o.get("peer-ca");
  if (!c.peer_ca_file.empty() && c.cell_brokers.empty()) {
    return make_error(Errc::invalid_argument, "peer-ca names the CAs of other hub processes sharing cells; it "
                                              "needs cell-broker");
  }
  if (!c.peer_ca_file.empty() && ::access(c.peer_ca_file.c_str(), R_OK) != 0) {
    return make_error(Errc::invalid_argument, "peer-ca: cannot read '" + c.peer_ca_file + "' (from " +
                                                  o.source("peer-ca") + ")");
  }
  auto threads = o.get_int("http-threads", 1, 64);
  if (!threads) return threads.error();
  c.http_threads = static_cast<int>(*threads);
  auto cache = o.get_int("db-cache-mib", 1, 1 << 20);
  if (!cache) return cache.error();
  c.db_cache_mib = *cache;
  auto mmap = o.get_int("db-mmap-mib", 0, 1 << 20);
  if (!mmap) return mmap.error();
  c.db_mmap_mib = *mmap;
  auto git = true_or_false(o, "git-sync");
  if (!git) return git.error();
  c.git_sync = *git;
  auto files = true_or_false(o, "cell-files");
  if (!files) return files.error();
  c.cell_files = *files;
  c.cell_files_asked = o.source("cell-files") != "default";
  c.director_key_file = o.get("director-key");
  if (!c.director_key_file.empty() && ::access(c.director_key_file.c_str(), R_OK) != 0) {
    return make_error(Errc::invalid_argument, "director-key: cannot read '" + c.director_key_file + "' (from " +
                                                  o.source("director-key") + ")");
  }
  auto conns = o.get_int("http-max-connections", 0, 1 << 20);
  if (!conns) return conns.error();
  c.http_max_connections = static_cast<int>(*conns);
  auto per_peer = o.get_int("http-max-connections-per-peer", 0, 1 << 20);
  if (!per_peer) return per_peer.error();
  c.http_max_connections_per_peer = static_cast<int>(*per_peer);
  auto rate = o.get_int("enroll-rate", 0, 1000000);
  if (!rate) return rate.error();
  c.enroll_rate = *rate;
  auto token_rate = o.get_int("enroll-rate-per-token", 0, 1000000);
  if (!token_rate) return token_rate.error();
  c.enroll_rate_per_token = *token_rate;
  auto queued = o.get_int("broker-max-queued-messages", 1, 1000000000);
  if (!queued) return queued.error();
  c.broker_max_queued_messages = *queued;
  auto queued_mib = o.get_int("broker-max-queued-mib", 1, 1 << 20);
  if (!queued_mib) return queued_mib.error();
  c.broker_max_queued_mib = *queued_mib;
  if (!o.get("ui-listen").empty()) {
    auto ui = split_host_port("ui-listen", o.get("ui-listen"));
    if (!ui) return ui.error();
    c.ui_listen_host = ui->first;
    c.ui_listen_port = ui->second;
    // Two listeners on one port would fail at start with a less clear message.
    if (c.ui_listen_port != 0 && c.ui_listen_port == c.listen_port && c.ui_listen_host == c.listen_host) {
      return make_error(Errc::invalid_argument, "ui-listen and listen are the same address; give the dashboard its own port");
    }
  }
  auto streams = o.get_int("ui-max-streams", 1, 10000);
  if (!streams) return streams.error();
  c.ui_max_streams = static_cast<int>(*streams);
  auto ui_conns = o.get_int("ui-max-connections", 2, 20000);
  if (!ui_conns) return ui_conns.error();
  c.ui_max_connections = static_cast<int>(*ui_conns);
  if (c.ui_max_connections <= c.ui_max_streams) {
    return make_error(Errc::invalid_argument, "ui-max-connections (" + std::to_string(c.ui_max_connections) +
                                                  ") must be above ui-max-streams (" +
                                                  std::to_string(c.ui_max_streams) + "): pages need connections besides their streams");
  }
  auto interval = o.get_duration("ui-event-interval");
  if (!interval) return make_error(Errc::invalid_argument, "ui-event-interval: " + interval.error().message);
  if (*interval < std::chrono::milliseconds(100) || *interval > std::chrono::minutes(1)) {
    return make_error(Errc::invalid_argument, "ui-event-interval must be from 100ms to 1m");
  }
  c.ui_event_interval = *interval;
  auto sample = o.get_duration("views-timeline-interval");
  if (!sample) return make_error(Errc::invalid_argument, "views-timeline-interval: " + sample.error().message);
  if (*sample < std::chrono::seconds(1) || *sample > std::chrono::hours(1)) {
    return make_error(Errc::invalid_argument, "views-timeline-interval must be from 1s to 1h");
  }
  c.views_timeline_interval = *sample;
  auto scan = o.get_int("views-scan-limit", 1000, 100000000);
  if (!scan) return scan.error();
  c.views_scan_limit = *scan;
  c.device_ca_cert_file = o.get("device-ca-cert");
  c.device_ca_key_file = o.get("device-ca-key");
  if (c.device_ca_cert_file.empty() != c.device_ca_key_file.empty()) {
    return make_error(Errc::invalid_argument, c.device_ca_cert_file.empty()
                                                  ? "device-ca-key is set but device-ca-cert is not; they go together"
                                                  : "device-ca-cert is set but device-ca-key is not; they go together");
  }
  for (const auto& [key, file] : {std::pair{"device-ca-cert", c.device_ca_cert_file},
                                  std::pair{"device-ca-key", c.device_ca_key_file}}) {
    if (!file.empty() && ::access(file.c_str(), R_OK) != 0) {
      return make_error(Errc::invalid_argument, std::string(key) + ": cannot read '" + file + "' (from " +
                                                    o.source(key) + ")");
    }
  }
  auto lifetime = o.get_duration("device-cert-lifetime");
  if (!lifetime) return lifetime.error();
  // Ten seconds is for tests of renewal across expiry; ten years is longer
  // than any device CA here lives.
  if (*lifetime < std::chrono::seconds(10) || *lifetime > std::chrono::hours(24 * 3650)) {
    return make_error(Errc::invalid_argument, "device-cert-lifetime must be between 10s and 3650d, got '" +
                                                  o.get("device-cert-lifetime") + "' (from " +
                                                  o.source("device-cert-lifetime") + ")");
  }
  c.device_cert_lifetime_s = std::chrono::duration_cast<std::chrono::seconds>(*lifetime).count();
  auto coordination = coord::coordination_config_from(o);
  if (!coordination) return coordination.error();
  c.coordination = std::move(*coordination);
  c.role = o.get("role");
  if (c.role != "hub" && c.role != "federation") {
    return make_error(Errc::invalid_argument, "role must be hub or federation, got '" + c.role + "' (from " +
                                                  o.source("role") + ")");
  }
  auto fed = federation::federation_config_from(o);
  if (!fed) return fed.error();
  c.federation_region_timeout = fed->region_timeout;
  c.federation_poll_interval = fed->poll_interval;
  return c;
}

Status ensure_bootstrap_admin(HubService& service, Store& store, const std::filesystem::path& data) {
  // First start: make an admin API token and leave it, 0600, in the data dir.
  if (auto n = store.count_tokens("api"); n && *n == 0) {
    TokenRecord rec;
    rec.name = "bootstrap-admin";
    rec.role = "admin";
    rec.project = "*";  // the fleet's first admin sees every project
    auto t = service.create_token("api", rec);
    if (!t && t.error().code == Errc::coordination_unavailable) {
      // Several hubs: another one may have made it; tried again at the next start.
      log::get("hub")->warn("no API token yet and none can be made now: {}", t.error().message);
      return {};
    }
    if (!t) return t.error();
    if (auto s = fs::write_file_atomic(data / "admin.token", t->secret + "\n", 0600); !s) return s;
    log::get("hub")->info("created the first admin API token; it is in {}", (data / "admin.token").string());
  }
  return {};
}

Status run_hub(const HubConfig& cfg, const std::atomic<bool>& stop) {
  if (cfg.role == "federation") {
    return federation::run_federation(
        cfg, federation::FederationConfig{cfg.federation_region_timeout, cfg.federation_poll_interval}, stop);
  }
  auto logger = log::get("hub");
  crypto::init();
  const std::filesystem::path data(cfg.data_dir);
  // Files the hub creates are private (the store holds credential hashes).
  ::umask(077);
  // 0711: when the hub runs as root, the embedded mosquitto (which drops to
  // its own user) must traverse into broker/; nothing here is listable.
  if (auto s = fs::ensure_own_dir(data, 0711); !s) return s;

  auto store = Store::open((data / "hub.db").string(), StoreTuning{cfg.db_cache_mib, cfg.db_mmap_mib});
  if (!store) return store.error();
  auto director = load_director_key(data, cfg.director_key_file);
  if (!director) return director.error();
  // Coordination (docs/adr/0014): opened now so a bad setting fails here.
  // With etcd the control data lives in its control log (docs/adr/0016);
  // the campaign engine claims cells and elects its leader on it (ADR 17).
  // etcd being down is a degraded mode, not a start-up failure.
  auto coordinator = coord::open_coordinator(cfg.coordination, cfg.data_dir);
  if (!coordinator) return coordinator.error();
  if (auto probe = (*coordinator)->get("/flotilla/hub"); !probe) {
    logger->warn("coordination backend={} error={}", (*coordinator)->backend(), probe.error().message);
  } else {
    logger->info("coordination backend={}", (*coordinator)->backend());
  }
  // Each cell's device rows in a file of its own (ADR 18 slice 7): asked
  // for, on by default for a hub.db with no devices yet, or hub.db says its
  // rows are there already. The move is one way, so the default never
  // makes it for a hub.db that already holds devices.
  auto in_files = (*store)->cell_files_in_use();
  if (!in_files) return in_files.error();
  bool use_files = cfg.cell_files || *in_files > 0;
  if (*in_files > 0) {
    logger->info("hub.db's device rows are in {} cells' files (cells/<n>/devices.db): opening them", *in_files);
  } else if (cfg.cell_files && !cfg.cell_files_asked) {
    auto totals = (*store)->cell_device_totals();
    if (!totals) return totals.error();
    int64_t devices = 0;
    for (const auto& t : *totals) devices += t.total;
    if (devices > 0) {
      use_files = false;
      logger->info("hub.db holds the rows of {} devices: they stay there (cells' own files are the default for a "
                   "new data directory only; set cell-files: true to move them, one way, docs/operations.md)",
                   devices);
    }
  }
  std::vector<std::unique_ptr<Store>> cell_stores;
  std::vector<std::string> cell_paths;
  if (use_files) {
    if (auto s = fs::ensure_own_dir(data / "cells", 0700); !s) return s;
    for (int cell = 0; cell < cfg.cells; ++cell) {
      const auto dir = data / "cells" / std::to_string(cell);
      if (auto s = fs::ensure_own_dir(dir, 0700); !s) return s;
      cell_paths.push_back((dir / "devices.db").string());
      auto f = Store::open_cell(cell_paths.back(), cell, StoreTuning{cfg.db_cache_mib, cfg.db_mmap_mib});
      if (!f) return f.error().with_context("cell " + std::to_string(cell) + "'s device file");
      cell_stores.push_back(std::move(*f));
    }
  }
  // The dashboard's read models read on connections of their own.
  AggregateStore::Config ac;
  ac.cell_files = cell_paths;
  ac.tuning = StoreTuning{std::max<int64_t>(4, cfg.db_cache_mib / 4), cfg.db_mmap_mib};
  ac.device_scan_limit = cfg.views_scan_limit;
  auto aggregates = AggregateStore::open((data / "hub.db").string(), ac);
  if (!aggregates) return aggregates.error();

  // Brokers of cells shared with other hub processes run on their own.
  const bool shared_cells = !cfg.cell_brokers.empty();
  const bool embedded = cfg.broker_url.empty() && !shared_cells;
  // Start the REST listener first so the public URL (which may use port 0) is known.
  std::unique_ptr<HubService> service;
  // Published by this thread once the Api exists, read by the HTTP threads
  // that start serving before it does (they answer 503 until then).
  std::atomic<Api*> api_ptr{nullptr};
  std::unique_ptr<Api> api;
  HttpServerConfig hc;
  hc.host = cfg.listen_host;
  hc.port = cfg.listen_port;
  hc.threads = cfg.http_threads;
  hc.tls_cert_file = cfg.tls_cert_file;
  hc.tls_key_file = cfg.tls_key_file;
  hc.max_connections = cfg.http_max_connections;
  hc.max_connections_per_peer = cfg.http_max_connections_per_peer;
  ArtifactStore artifacts(data / "artifacts");
  if (auto s = artifacts.init(); !s) return s;
  hc.upload_dir = artifacts.dir();
  hc.precheck_upload = [&api_ptr](const HttpRequest& r) -> std::optional<HttpResponse> {
    Api* a = api_ptr.load(std::memory_order_acquire);
    if (!a) return Api::error(503, "unavailable", "hub is starting");
    return a->precheck_upload(r);
  };
  hc.admit = [&api_ptr](const HttpRequest& r) -> Admission {
    Api* a = api_ptr.load(std::memory_order_acquire);
    if (!a) return Admission{Api::error(503, "unavailable", "hub is starting"), 0};
    return a->admit(r);
  };
  auto server = HttpServer::start(hc, [&api_ptr](const HttpRequest& r) {
    Api* a = api_ptr.load(std::memory_order_acquire);
    if (!a) return Api::error(503, "unavailable", "hub is starting");
    return a->handle(r);
  });
  if (!server) return server.error();
  const std::string listen_url = (hc.tls() ? "https://" : "http://") + cfg.listen_host + ":" + std::to_string((*server)->port());
  const std::string public_url = cfg.public_url.empty() ? listen_url : cfg.public_url;

  // The device CA: every device with its own broker session gets a client
  // certificate from it; brokers need only its certificate.
  DeviceCaConfig dcc;
  dcc.dir = data / "ca";
  dcc.cert_file = cfg.device_ca_cert_file;
  dcc.key_file = cfg.device_ca_key_file;
  const int64_t now = SystemClock::instance().now_unix();
  auto ca = DeviceCa::open(dcc, now);
  if (!ca) return ca.error();
  // What the hub's own client and the devices trust for the broker's
  // certificate: the device CA (which makes the embedded broker's), plus the
  // operator's broker CA if one is named.
  std::string trust = (*ca)->trust_pem();
  if (!cfg.broker_tls_ca_file.empty()) {
    auto extra = fs::read_file(cfg.broker_tls_ca_file, 1 << 20);
    if (!extra) return extra.error().with_context("broker-tls-ca");
    trust += *extra;
  }
  const auto trust_file = data / "ca" / "broker-trust.pem";
  if (auto s = fs::write_file_atomic(trust_file, trust, 0644); !s) return s;
  // The hub's own broker session authenticates like a device: a certificate
  // (CN = its broker user name), made at every start. Paho reads files.
  constexpr int64_t kServiceCertLifetime = int64_t{825} * 86400;
  const std::string hub_cn = "flotilla-hub";
  auto hub_cert = (*ca)->issue_client(hub_cn, now, kServiceCertLifetime);
  if (!hub_cert) return hub_cert.error();
  const auto hub_cert_file = data / "ca" / "hub-client.pem", hub_key_file = data / "ca" / "hub-client.key";
  if (auto s = fs::write_file_atomic(hub_key_file, hub_cert->key_pem, 0600); !s) return s;
  if (auto s = fs::write_file_atomic(hub_cert_file, hub_cert->pem, 0600); !s) return s;
  std::string crl;
  {
    auto revoked = (*store)->revoked_unexpired_certs(now);
    if (!revoked) return revoked.error();
    auto c = (*ca)->crl_pem(*revoked, now, HubService::kCrlValiditySeconds);
    if (!c) return c.error();
    crl = std::move(*c);
  }

  // A store written with more cells than this start names: its devices
  // would be told a broker nobody runs. Draining moves them first.
  if (auto counts = (*store)->cell_device_totals(); !counts) {
    return counts.error();
  } else {
    for (const auto& n : *counts) {
      if (n.cell >= cfg.cells) {
        return make_error(Errc::invalid_argument, std::to_string(n.total) + " devices are in cell " +
                                                      std::to_string(n.cell) + ", but cells is " +
                                                      std::to_string(cfg.cells) + "; start with at least " +
                                                      std::to_string(n.cell + 1) + " cells (drain a cell before "
                                                      "removing it: flotilla cell drain)");
      }
    }
  }
  std::vector<std::unique_ptr<EmbeddedBroker>> brokers;
  std::string broker_url = cfg.broker_url, hub_user = cfg.broker_username, hub_pass = cfg.broker_password;
  // Per cell: what the hub connects to, and what devices are told.
  std::vector<std::string> cell_urls, cell_public_urls, cell_hub_passwords;
  for (int cell = 0; cell < (embedded ? cfg.cells : 0); ++cell) {
    auto creds = (*store)->credentials();
    if (!creds) return creds.error();
    BrokerConfig bc;
    // Cell 0 keeps the directory a one-cell hub always had.
    bc.dir = cell == 0 ? data / "broker" : data / ("broker-cell" + std::to_string(cell));
    bc.mosquitto_bin = cfg.mosquitto_bin;
    bc.listen_host = cfg.broker_listen_host;
    bc.port = cfg.broker_listen_port == 0 ? 0 : cfg.broker_listen_port + cell;
    bc.tls_cert_file = cfg.broker_tls_cert_file;
    bc.tls_key_file = cfg.broker_tls_key_file;
    bc.tls_ca_file = cfg.broker_tls_ca_file;
    bc.max_queued_messages = cfg.broker_max_queued_messages;
    bc.max_queued_bytes = cfg.broker_max_queued_mib << 20;
    bc.hub_username = hub_cn;
    if (cfg.dev_plain_mqtt) {
      bc.auth = BrokerAuth::password;
      if (cell == 0) logger->warn("DEVELOPMENT MODE (dev-plain-mqtt): the embedded broker speaks plain MQTT and devices log in with "
                   "passwords; nothing is encrypted and every enrollment reloads the broker. Never use this outside "
                   "a test bench.");
    } else {
      bc.auth = BrokerAuth::certificate;
      bc.client_ca_pem = (*ca)->trust_pem();
      bc.crl_pem = crl;
      if (cfg.broker_tls_cert_file.empty()) {
        // Made by the device CA at every start, as k3s makes its own: it names
        // the listen address and the address devices are given.
        std::vector<std::string> names;
        auto add_name = [&](const std::string& n) {
          if (!n.empty() && n != "0.0.0.0" && n != "::" && std::find(names.begin(), names.end(), n) == names.end()) {
            names.push_back(n);
          }
        };
        if (!cfg.broker_public_url.empty()) {
          if (auto u = http::parse_url("http" + cfg.broker_public_url.substr(cfg.broker_public_url.find("://"))); u) {
            add_name(u->host);
          }
        }
        add_name(cfg.broker_listen_host);
        add_name("127.0.0.1");
        add_name("localhost");
        auto broker_cert = (*ca)->issue_server(names, now, kServiceCertLifetime);
        if (!broker_cert) return broker_cert.error();
        bc.server_cert_pem = broker_cert->pem;
        bc.server_key_pem = broker_cert->key_pem;
      }
    }
    auto b = EmbeddedBroker::start(bc, *creds);
    if (!b) return b.error().with_context("cell " + std::to_string(cell));
    EmbeddedBroker* broker = b->get();  // owned by brokers from below
    broker_url = broker->url();
    hub_user = broker->hub_username();
    hub_pass = cfg.dev_plain_mqtt ? broker->hub_password() : std::string();
    cell_urls.push_back(broker->url());
    cell_hub_passwords.push_back(hub_pass);
    if (cfg.broker_public_url.empty()) {
      cell_public_urls.push_back(broker->url());
    } else {
      // Cell i's devices reach it at the public address's port + i.
      auto cell_public = with_port_offset(cfg.broker_public_url, cell);
      if (!cell_public) return cell_public.error();
      cell_public_urls.push_back(*cell_public);
    }
    brokers.push_back(std::move(*b));
    if (!broker->legacy_url().empty() && cell == 0) {
      logger->warn("{} devices enrolled with passwords still connect to {} ({}) until they renew and move to "
                   "certificates (docs/operations.md, \"Moving devices from passwords to certificates\")",
                   creds->size(), broker->legacy_url(),
                   broker->legacy_url().rfind("tcp://", 0) == 0 ? "plain MQTT" : "TLS");
    }
  }

  ServiceConfig sc;
  sc.broker_url = cfg.broker_public_url.empty() ? broker_url : cfg.broker_public_url;
  if (shared_cells) {
    // Hubs and devices reach a shared cell's broker at the same address.
    cell_urls = cfg.cell_brokers;
    cell_public_urls = cfg.cell_brokers;
    cell_hub_passwords.assign(cfg.cell_brokers.size(), "");
    broker_url = sc.broker_url = cfg.cell_brokers.front();
  } else if (!embedded) {
    cell_urls = {broker_url};
    cell_public_urls = {sc.broker_url};
    cell_hub_passwords = {hub_pass};
  }
  sc.cell_broker_urls = cell_public_urls;
  for (const auto& u : cell_public_urls) {
    if (u.find("://0.0.0.0:") != std::string::npos) {
      return make_error(Errc::invalid_argument, "the broker listens on 0.0.0.0; set broker-public-url to the "
                                                "address devices should connect to");
    }
  }
  sc.public_url = public_url;
  sc.manage_broker_credentials = embedded;
  sc.director_key = std::move(*director);
  sc.device_ca = ca->get();
  sc.cert_lifetime_s = cfg.device_cert_lifetime_s;
  sc.broker_passwords = embedded && cfg.dev_plain_mqtt;
  // Devices are told only the device CA (which makes the embedded broker's
  // certificate): an operator's broker CA reaches them as their pinned
  // tls-ca-file, never from an answer.
  sc.ca_certificates = (*ca)->trust_pem();
  // The embedded SQLite coordinator serves one hub: its store stays the truth.
  if (cfg.coordination.backend == coord::CoordinationConfig::Backend::etcd) {
    sc.control_coordinator = coordinator->get();
    sc.control_log.snapshot_every = cfg.control_snapshot_every;
    sc.control_log.keep_entries = cfg.control_keep_entries;
  }
  // Campaigns across cells (docs/adr/0017): this hub claims its cells and
  // campaigns for leadership on the coordinator; alone, it owns every cell
  // and leads. Its name is its host and data directory: unique to it, and
  // the same after a restart, so it takes its own keys back at once.
  sc.coordinator = (*coordinator).get();
  sc.coord_holder = coord_holder_name(cfg.data_dir);
  sc.coord_ttl = cfg.cell_lease_ttl;
  sc.peer_ca_file = cfg.peer_ca_file;
  sc.share_cells = shared_cells;
  if (shared_cells && cfg.coordination.backend != coord::CoordinationConfig::Backend::etcd) {
    logger->warn("cell-broker without coordination etcd: this hub is the only one and serves every cell");
  }
  for (auto& f : cell_stores) sc.cell_files.push_back(f.get());
  try {
    service = std::make_unique<HubService>(**store, SystemClock::instance(), sc);
  } catch (const std::exception& e) {
    // Cell files that do not fit, or hub.db's rows that could not move into them.
    return make_error(Errc::internal, std::string("start the hub service: ") + e.what());
  }
  if (auto s = service->control_log_status(); !s) return s.error().with_context("control log");
  for (size_t i = 0; i < brokers.size(); ++i) service->set_cell_broker(static_cast<int>(i), brokers[i].get());
  service->set_artifacts(&artifacts);
  service->set_aggregates(aggregates->get());
  (*aggregates)->start_sampler(SystemClock::instance(), cfg.views_timeline_interval);
  service->loaded_crl(crl, now + HubService::kCrlValiditySeconds);

  if (auto s = ensure_bootstrap_admin(*service, **store, data); !s) return s;

  transport::ConnectOptions co;
  co.url = broker_url;
  // A fixed client id with a persistent session: reports sent while the hub
  // is down wait in the broker for it.
  co.client_id = "flotilla-hub";
  co.clean_session = false;
  co.username = hub_user;
  co.password = hub_pass;
  co.max_inflight = 1000;
  // A campaign released to 100k devices publishes 100k desired states: paced
  // by the broker's acknowledgements, not queued whole in memory.
  co.max_pending = 2000;
  co.keepalive_s = 20;
  // The embedded broker's certificate comes from the device CA (or the
  // operator's, with broker-tls-ca); an external broker's from broker-tls-ca
  // or the system store.
  // Shared cells' brokers: the device CA (which may have made their
  // certificates) plus broker-tls-ca.
  co.ca_file = shared_cells || (embedded && (cfg.broker_tls_cert_file.empty() || !cfg.broker_tls_ca_file.empty()))
                   ? trust_file.string()
                   : cfg.broker_tls_ca_file;
  // Over TLS the hub presents its own certificate from the device CA: the
  // embedded broker takes nothing else, and an external broker that trusts
  // the device CA (docs/operations.md) may take it too.
  if (broker_url.rfind("ssl://", 0) == 0) {
    co.cert_file = hub_cert_file.string();
    co.key_file = hub_key_file.string();
  }
  // The embedded broker is reached at its listen address, which its
  // certificate (made for the name devices use) need not name; the chain is
  // still checked. An external broker must name the host in broker-url.
  co.verify_host = !embedded;

  // Clones live under the data dir, next to what else the hub keeps.
  std::unique_ptr<GitSync> git_sync;
  if (cfg.git_sync) {
    GitSyncConfig gc;
    gc.dir = data / "gitrepos";
    if (auto s = fs::ensure_dir(gc.dir, 0700); !s) return s;
    git_sync = std::make_unique<GitSync>(*service, SystemClock::instance(), gc);
    git_sync->start();
  }

  ApiLimits limits;
  limits.enroll_per_s = static_cast<double>(cfg.enroll_rate);
  limits.enroll_per_token_per_s = static_cast<double>(cfg.enroll_rate_per_token);
  api = std::make_unique<Api>(*service, limits);
  api->set_server_stats(&(*server)->stats());
  api_ptr.store(api.get(), std::memory_order_release);
  (void)fs::write_file_atomic(data / "hub.url", listen_url + "\n", 0644);
  logger->info("REST API listening url={} broker={}", listen_url, broker_url);

  std::unique_ptr<UiServer> ui;
  if (!cfg.ui_listen_host.empty()) {
    UiServerConfig uc;
    uc.host = cfg.ui_listen_host;
    uc.port = cfg.ui_listen_port;
    uc.tls_cert_file = cfg.tls_cert_file;
    uc.tls_key_file = cfg.tls_key_file;
    uc.max_streams = cfg.ui_max_streams;
    uc.max_connections = cfg.ui_max_connections;
    uc.event_interval = cfg.ui_event_interval;
    auto started = UiServer::start(uc, *api, *service);
    if (!started) return started.error();
    ui = std::move(*started);
    const std::string ui_url = (cfg.tls_cert_file.empty() ? "http://" : "https://") + cfg.ui_listen_host + ":" +
                               std::to_string(ui->port()) + "/ui/";
    (void)fs::write_file_atomic(data / "ui.url", ui_url + "\n", 0644);
    logger->info("dashboard listening url={} assets={}", ui_url, ui_assets().size());
  }

  // One session per cell, each reconnected on its own: a cell whose broker
  // restarts leaves the others' sessions (and presence) alone. Each on the
  // event-loop client (ADR 20) with a loop of its own: a cell whose queue is
  // full holds up only its own session's reads, as with Paho's thread.
  struct CellSession {
    std::shared_ptr<transport::SessionLoop> loop = transport::make_session_loop();
    std::unique_ptr<transport::Transport> transport = transport::make_loop_transport(loop);
    transport::ConnectOptions co;
    Backoff backoff{std::chrono::milliseconds(200), std::chrono::seconds(10), crypto::random_u64()};
    bool attached = false;
    std::chrono::steady_clock::time_point next_try = std::chrono::steady_clock::now();
  };
  std::vector<CellSession> sessions(cell_urls.size());
  for (size_t i = 0; i < sessions.size(); ++i) {
    sessions[i].co = co;
    sessions[i].co.url = cell_urls[i];
    sessions[i].co.password = cell_hub_passwords[i];
  }
  auto next_maintenance = std::chrono::steady_clock::now() + std::chrono::minutes(5);
  while (!stop) {
    if (std::chrono::steady_clock::now() >= next_maintenance) {
      next_maintenance = std::chrono::steady_clock::now() + std::chrono::minutes(5);
      service->maintain_certificates();
    }
    for (size_t i = 0; i < sessions.size(); ++i) {
      auto& cs = sessions[i];
      const int cell = static_cast<int>(i);
      if (!service->serves_cell(cell)) {
        // A shared cell this hub does not hold (any more): its session ends
        // at once, so nothing of it is served from here.
        if (cs.attached || cs.transport->connected()) {
          logger->info("not serving cell={} any more: disconnected from {}", cell, cs.co.url);
          cs.transport->disconnect();
          cs.attached = false;
          service->mark_detached(cell);
        }
        continue;
      }
      if ((cs.transport->connected() && cs.attached) || std::chrono::steady_clock::now() < cs.next_try) continue;
      if (cs.attached) {
        logger->warn("lost the broker connection cell={}; reconnecting", cell);
        service->lost_broker_session(cell);
      }
      cs.attached = false;
      service->mark_detached(cell);
      auto s = cs.transport->connect(cs.co);
      if (s) s = service->attach_transport(cell, *cs.transport);
      if (s) {
        cs.attached = true;
        cs.backoff.reset();
        logger->info("connected to broker {} cell={}", cs.co.url, cell);
      } else {
        auto delay = cs.backoff.next();
        logger->warn("broker connection failed cell={}: {}; retry in {}ms", cell, s.error().message, delay.count());
        cs.next_try = std::chrono::steady_clock::now() + delay;
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  logger->info("shutting down");
  if (ui) ui->stop();
  api_ptr.store(nullptr, std::memory_order_release);
  (*server)->stop();
  if (git_sync) git_sync->stop();
  for (auto& cs : sessions) cs.transport->disconnect();
  service->stop();
  (*aggregates)->stop();
  for (auto& b : brokers) b->stop();
  return {};
}

}  // namespace flotilla::hub

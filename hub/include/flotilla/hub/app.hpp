#pragma once
// Wires the hub together: data dir, store, broker (embedded or external),
// MQTT connection, service and HTTP server. main() only parses options.
#include <atomic>
#include <filesystem>
#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "flotilla/bundles/keys.hpp"
#include "flotilla/common/options.hpp"
#include "flotilla/common/result.hpp"
#include "flotilla/hub/coord.hpp"

namespace flotilla::hub {

struct HubConfig {
  std::string data_dir = "./flotilla-data";
  std::string listen_host = "127.0.0.1";
  int listen_port = 8080;
  std::string public_url;             // default http://<listen> (https:// with TLS)
  std::string tls_cert_file;          // both set = the REST API is TLS-only
  std::string tls_key_file;
  std::string broker_url;             // empty = embedded mosquitto
  std::string broker_username;
  std::string broker_password;
  std::string broker_public_url;      // what devices are told; default: the listen address
  // Embedded broker over TLS: both set = its only listener speaks TLS 1.2+
  // and devices are told ssl://host:port.
  std::string broker_tls_cert_file;
  std::string broker_tls_key_file;
  // CA the hub's own MQTT client trusts for the broker (embedded, or an
  // ssl:// broker-url); empty = the system CA store.
  std::string broker_tls_ca_file;
  std::string broker_listen_host = "127.0.0.1";
  int broker_listen_port = 0;
  // Cells (docs/architecture.md, "Cells"): this many embedded brokers, each
  // with its own session, report worker and desired-state publisher. 1 = one
  // broker as before. With a fixed broker-listen port P, cell i listens on
  // P+i (and broker-public-url's port likewise gets +i).
  int cells = 1;
  // Brokers that run on their own, one per cell in cell order (ssl:// URLs
  // devices and hubs connect to): the hub starts none, and shares these
  // cells with the other hub processes on the coordinator, serving the ones
  // it holds by lease (docs/operations.md, "Several hub processes").
  std::vector<std::string> cell_brokers;
  // How long the hold on cells (and the campaign leadership) outlives a
  // hub that died: its cells are taken over after about this long.
  std::chrono::seconds cell_lease_ttl{10};
  // With coordination etcd: snapshot the control log every this many
  // entries and keep this many entries behind the snapshot (docs/adr/0016).
  int64_t control_snapshot_every = 10000;
  int64_t control_keep_entries = 1000;
  std::string peer_ca_file;  // with cell_brokers: CAs of the other hubs' REST certificates
  std::string mosquitto_bin = "/usr/sbin/mosquitto";
  int http_threads = 16;
  int64_t db_cache_mib = 64;  // StoreTuning
  int64_t db_mmap_mib = 0;
  bool git_sync = true;  // follow GitRepos (docs/operations.md, "Git sync")
  // Each cell's device rows in a file of its own (<data-dir>/cells/<n>/devices.db,
  // ADR 18 slice 7). One way: once hub.db's rows were moved, the hub opens
  // the files at every start, whatever this says. On by default for a data
  // directory whose hub.db has no devices yet; an existing hub.db's rows
  // move only when it is asked for (cell_files_asked).
  bool cell_files = true;
  bool cell_files_asked = false;  // set by a flag, the environment or the config file
  // The director key file (flotilla key generate, unencrypted, 0600); empty =
  // <data-dir>/director.key, made on first start.
  std::string director_key_file;
  // Bounded input (docs/security.md): open REST connections, in total and
  // per peer address (0 = no cap); enrollment requests per second, overall
  // and per enrollment token (0 = no limit); the embedded broker's queue per client.
  int http_max_connections = 1024;
  int http_max_connections_per_peer = 256;
  int64_t enroll_rate = 200;
  int64_t enroll_rate_per_token = 50;
  int64_t broker_max_queued_messages = 1000000;
  int64_t broker_max_queued_mib = 256;
  // The dashboard (docs/operations.md, "Dashboard"): its own listener, off
  // unless set; the read models (/v1/views) are on either way.
  std::string ui_listen_host;          // empty = no UI listener
  int ui_listen_port = 0;
  int ui_max_streams = 64;
  int ui_max_connections = 256;
  std::chrono::milliseconds ui_event_interval{1000};
  std::chrono::milliseconds views_timeline_interval{5000};
  int64_t views_scan_limit = 200000;
  // The device CA (docs/security.md, "Device certificates"): the operator's
  // certificate and key (both or neither; default <data-dir>/ca/device-ca.*,
  // made on first start), and how long a device certificate is valid.
  std::string device_ca_cert_file;
  std::string device_ca_key_file;
  int64_t device_cert_lifetime_s = int64_t{90} * 86400;
  // Development only: the embedded broker speaks plain MQTT and devices get
  // passwords (the broker reloads at every enrollment). Never in production.
  bool dev_plain_mqtt = false;
  // Where hub processes coordinate (docs/adr/0014): sqlite or etcd.
  coord::CoordinationConfig coordination;
  // hub, or federation: front regional hubs through their REST API
  // (docs/adr/0015; the federation-* settings apply only to it).
  std::string role = "hub";
  std::chrono::milliseconds federation_region_timeout{5000};
  std::chrono::milliseconds federation_poll_interval{2000};
};

class HubService;
class Store;
// On a first start (no API token yet): makes the bootstrap admin token and
// leaves its secret in <data>/admin.token (0600). Hubs and federations alike.
Status ensure_bootstrap_admin(HubService& service, Store& store, const std::filesystem::path& data);

// The key the hub signs desired-state headers with: the configured file, or
// <data-dir>/director.key (created 0600 on first start). Either way its
// public half is written to <data-dir>/director.pub (0644) for operators to
// pin in device images (flotilla image inject --director-key).
Result<bundles::KeyPair> load_director_key(const std::filesystem::path& data_dir, const std::string& configured);

// The data directory when none is configured: /var/lib/flotilla for root,
// else $XDG_STATE_HOME/flotilla, else $HOME/.local/state/flotilla (never the
// current directory); "" when none applies.
std::string default_data_dir(bool root, const char* xdg_state_home, const char* home);

void add_hub_options(Options& o);
Result<HubConfig> hub_config_from(const Options& o);

// Runs until *stop becomes true. Returns an error if start-up fails.
Status run_hub(const HubConfig& cfg, const std::atomic<bool>& stop);

}  // namespace flotilla::hub

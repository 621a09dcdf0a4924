// k3s stand-in: a small program that imitates the slice of k3s the Flotilla
// edge agent drives (version, server and agent modes, kubectl, etcd-snapshot,
// certificate rotate, the data directory, auto-deployed manifests). It is NOT
// k3s. Each behaviour names the k3s source or document it imitates (README.md).
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace flotilla::standin {

inline constexpr std::string_view kDefaultVersion = "v1.30.4+k3s1";
inline constexpr std::string_view kDefaultKubeconfig = "/etc/rancher/k3s/k3s.yaml";
inline constexpr std::string_view kDefaultConfig = "/etc/rancher/k3s/config.yaml";
inline constexpr std::string_view kDefaultDataDir = "/var/lib/rancher/k3s";
// Appended to a copy of the binary by `standin-build`: the version and the
// behaviour of that "build" travel inside the binary, as k3s's version is
// compiled into it (pkg/version, set by ldflags).
inline constexpr std::string_view kTrailerMarker = "\n#K3S-STANDIN:";

using Args = std::vector<std::string>;

// Entry points, one per subcommand; each returns the process exit code.
int run_cli(int argc, char** argv);
int run_server(const char* argv0, const Args& args);
int run_agent(const char* argv0, const Args& args);
int run_kubectl(const Args& args);
int run_etcd_snapshot(const char* argv0, const Args& args);
int run_certificate(const char* argv0, const Args& args);
int run_standin_build(const char* argv0, const Args& args);

// One stderr line per event; a single write() so concurrent writers
// (agent log capture) never see interleaved fragments.
void log_line(std::string_view message);

std::string trim(std::string_view text);
std::optional<std::string> read_file(const std::string& path);
// Temp file + fsync + rename, so a reader never sees half a file.
void write_file_atomic(const std::string& path, const std::string& content, unsigned mode);
std::optional<std::string> env(const char* name);
bool iequals(std::string_view a, std::string_view b);
std::string json_escape(std::string_view text);
std::string lower(std::string_view text);

// Value of the first `"key":"..."` string in a JSON text. Only meant for the
// JSON this program produces itself, so no general parser is needed.
std::optional<std::string> json_string_field(std::string_view json, std::string_view key);
// The first `"key":<number>` or `"key":true|false` in a JSON text.
std::optional<std::string> json_scalar_field(std::string_view json, std::string_view key);

// Top-level `key: value` pairs of a YAML document, in file order. Lines it
// cannot understand (nested maps, lists, block scalars) are skipped.
std::vector<std::pair<std::string, std::string>> parse_flat_yaml(std::string_view text);

// The build this binary is: a trailer written by `standin-build`, else a
// `<binary>.version` sidecar, else $K3S_STANDIN_VERSION, else the default.
struct Build {
  std::string version;
  std::map<std::string, std::string> flags;  // behaviour of this build (README.md, "Builds")
  bool flag(const std::string& name) const;
  long number(const std::string& name, long fallback) const;
};
Build resolve_build(const char* argv0);
std::string resolve_version(const char* argv0);
// The real path of the running executable.
std::string self_exe();

// The device clock, shifted by $FLOTILLA_TEST_CLOCK_OFFSET_S (seconds) when
// set: the whole simulated device (agent and k3s) runs on one wrong clock.
int64_t now_unix();
std::string rfc3339(int64_t unix_seconds);
std::optional<int64_t> parse_rfc3339(const std::string& text);

// k3s's configuration: FILE (--config, $K3S_CONFIG_FILE, else
// /etc/rancher/k3s/config.yaml), then FILE.d/*.yaml in lexical order, then
// the command line (pkg/configfilearg). Throws std::runtime_error.
struct ConfigValues {
  std::map<std::string, std::string> values;
  std::vector<std::string> positional;  // arguments that are not flags
  std::string get(const std::string& key, const std::string& fallback = "") const;
};
// value_flags: flags that take a value; every other flag is a boolean (and
// --flag=value always works).
ConfigValues load_config(const Args& args, const std::vector<std::string>& value_flags);
// The data directory the way cmd/k3s/main.go findDataDir does: --data-dir/-d,
// then the config files, then the default.
std::string find_data_dir(const Args& args);

// cmd/k3s/main.go extract(): the binary unpacks its payload into
// <data-dir>/data/<hash>/ once per build, moves data/current to
// data/previous and points data/current at the new directory. Returns it.
std::string extract_data_dir(const std::string& data_dir, const Build& build);

// sd_notify(3) READY=1 to $NOTIFY_SOCKET, if set (Type=notify units).
void sd_notify_ready();

// A self-signed certificate (Ed25519) valid for `days`, PEM, with its key.
void write_self_signed(const std::string& cert_path, const std::string& key_path, const std::string& cn, int days);
// notAfter of a PEM certificate (unix seconds); nullopt when unreadable.
std::optional<int64_t> cert_not_after(const std::string& pem_path);
std::string sha256_hex_of_file(const std::string& path);
std::string random_hex(size_t bytes);

// ---- HTTP to a stand-in server (kubectl.cpp) --------------------------------

struct Endpoint {
  std::string host, port, token;
};
struct HttpResult {
  int status = 0;
  std::string body;
};
// "http://127.0.0.1:6443" and a bearer token. Throws std::runtime_error.
Endpoint endpoint_from_url(const std::string& url, const std::string& token);
// One request; failures to connect are std::runtime_error worded the way
// kubectl words them ("The connection to the server ... was refused").
HttpResult http_request(const Endpoint& e, const std::string& method, const std::string& path,
                        const std::string& body, long timeout_ms);

// ---- the datastore (store.cpp) -------------------------------------------

// A Kubernetes object as the stand-in keeps it.
struct Resource {
  std::string kind, api_version, ns, name;
  std::string addon;           // the manifest (Addon) that created it
  int replicas = 1;            // spec.replicas (workloads)
  bool never_ready = false;    // annotation standin.flotilla.io/rollout: never
  long generation = 1;
  std::string key() const { return kind + "/" + ns + "/" + name; }
};

struct NodeRecord {
  std::string name, role = "server";
  std::string ready = "True";  // the Ready condition as last posted: True, False
  int64_t heartbeat = 0;       // lastHeartbeatTime (unix seconds)
  int64_t created = 0;
  std::string kubelet_version;
};

struct Datastore {
  std::map<std::string, NodeRecord> nodes;
  std::map<std::string, Resource> resources;  // by key()
};

// SQLite (server/db/state.db, kine) or embedded etcd (server/db/etcd/...).
std::string datastore_path(const std::string& data_dir, bool etcd);
// Throws std::runtime_error("... corrupt ...") for a store that does not parse.
Datastore load_datastore(const std::string& path);
void save_datastore(const std::string& path, const Datastore& ds);

// The Kubernetes objects in a manifest file (multi-document YAML; a small
// subset: kind, apiVersion, metadata name/namespace/annotations, spec.replicas).
std::vector<Resource> parse_manifest(const std::string& text, const std::string& addon);

// kind <-> REST path (a table of the kinds the stand-in knows, then the
// lower-case plural rule for others).
struct KindInfo {
  std::string kind, plural, group, version;
  bool namespaced = true;
};
KindInfo kind_info(const std::string& kind_or_plural, const std::string& api_version = "");
std::string resource_path(const KindInfo& k, const std::string& ns, const std::string& name);
// The object as JSON (with a status computed the way its controller would).
std::string resource_json(const Resource& r, size_t nodes);

}  // namespace flotilla::standin

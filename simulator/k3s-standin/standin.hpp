// k3s stand-in: a tiny program that mimics the slice of k3s the Flotilla edge
// agent drives (version, server, kubectl get --raw). It is NOT k3s.
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace flotilla::standin {

inline constexpr std::string_view kDefaultVersion = "v1.30.4+k3s1";
inline constexpr std::string_view kDefaultKubeconfig = "/etc/rancher/k3s/k3s.yaml";
inline constexpr std::string_view kDefaultConfig = "/etc/rancher/k3s/config.yaml";

using Args = std::vector<std::string>;

// Entry points, one per subcommand; each returns the process exit code.
int run_cli(int argc, char** argv);
int run_server(const char* argv0, const Args& args);
int run_kubectl(const Args& args);

// One stderr line per event; a single write() so concurrent writers
// (agent log capture) never see interleaved fragments.
void log_line(std::string_view message);

std::string trim(std::string_view text);
std::optional<std::string> read_file(const std::string& path);
std::optional<std::string> env(const char* name);
bool iequals(std::string_view a, std::string_view b);
std::string json_escape(std::string_view text);

// Value of the first `"key":"..."` string in a JSON text. Only meant for the
// JSON this program produces itself, so no general parser is needed.
std::optional<std::string> json_string_field(std::string_view json, std::string_view key);

// Top-level `key: value` pairs of a YAML document, in file order. Lines it
// cannot understand (nested maps, lists, block scalars) are skipped.
std::vector<std::pair<std::string, std::string>> parse_flat_yaml(std::string_view text);

// Version reported by --version and /version: a `<binary>.version` sidecar
// wins, then $K3S_STANDIN_VERSION, then kDefaultVersion.
std::string resolve_version(const char* argv0);

}  // namespace flotilla::standin

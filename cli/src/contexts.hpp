#pragma once
// CLI contexts, like a kubeconfig: named hubs with their token file, kept in
// $FLOTILLA_CONFIG, else $XDG_CONFIG_HOME/flotilla/config.yaml, else
// ~/.config/flotilla/config.yaml (mode 0600). Flags win over the environment,
// which wins over the context.
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "flotilla/common/result.hpp"

namespace flotilla::cli {

struct Context {
  std::string name;
  std::string hub;         // REST base URL
  std::string token_file;  // the token itself never goes into the file
  std::string ca_file;
};

struct CliConfig {
  std::string current;
  std::vector<Context> contexts;
  const Context* find(const std::string& name) const;
};

// Where the file is; an error when there is no way to tell (no HOME).
Result<std::filesystem::path> cli_config_path();
// A missing file is an empty config; a file that does not parse, names an
// unknown key or is too large is an error naming the file (and the line).
Result<CliConfig> load_cli_config(const std::filesystem::path& path);
// Written whole to a temporary file (0600) and renamed over the old one.
Status save_cli_config(const std::filesystem::path& path, const CliConfig& c);

// The context the hub flags fall back to: --context / FLOTILLA_CONTEXT, else
// the file's current-context. nullopt when there is none (no file, no current
// context); an error when the file is bad or the named context is unknown.
Result<std::optional<Context>> selected_context(const std::string& name);

int cmd_config(int argc, char** argv);

}  // namespace flotilla::cli

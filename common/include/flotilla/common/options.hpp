#pragma once
// Settings from flags, environment and a YAML config file, in that order of
// precedence, with generated --help. Every key "data-dir" is the flag
// --data-dir, the variable <PREFIX>DATA_DIR and the file key data-dir.
#include <cstdint>
#include <chrono>
#include <map>
#include <string>
#include <vector>

#include "flotilla/common/result.hpp"

namespace flotilla {

class Options {
 public:
  Options(std::string program, std::string summary, std::string env_prefix);

  // A single value. Flags without a value ("--ci") are switches: default "false".
  Options& add(const std::string& key, const std::string& help, const std::string& default_value = "");
  Options& add_switch(const std::string& key, const std::string& help);
  // A repeatable value: repeated flags, comma-separated env, YAML list or map (k: v -> "k=v").
  Options& add_list(const std::string& key, const std::string& help);
  // Names the key whose value is the config file to read (e.g. "config").
  Options& config_file_key(const std::string& key);
  // The option is taken from the command line only: its environment variable
  // is ignored and a config-file key is an error. For confirmations and
  // safety switches (--yes, --force): an exported FLOTILLA_YES=true, or a
  // line left in a file, must never answer for the operator.
  Options& flag_only(const std::string& key);

  // Parses argv[start..]; returns the positional arguments. Unknown flags and
  // bad config files are errors naming the offending flag/line.
  Result<std::vector<std::string>> parse(int argc, char** argv, int start = 1);

  bool help_requested() const { return help_; }
  bool version_requested() const { return version_; }
  std::string help() const;

  bool has(const std::string& key) const { return opts_.count(key) != 0; }
  const std::string& get(const std::string& key) const;
  bool get_bool(const std::string& key) const;
  Result<int64_t> get_int(const std::string& key, int64_t min, int64_t max) const;
  // "500ms", "30s", "5m", "2h", "7d"
  Result<std::chrono::milliseconds> get_duration(const std::string& key) const;
  const std::vector<std::string>& get_list(const std::string& key) const;
  // A list of "k=v" entries as a map; bad entries are errors.
  Result<std::map<std::string, std::string>> get_map(const std::string& key) const;
  // Where a value came from: "flag", "env", "file" or "default".
  std::string source(const std::string& key) const;

 private:
  struct Opt {
    std::string help;
    std::string def;
    bool is_switch = false;
    bool is_list = false;
    bool flag_only = false;
    std::string value;
    std::vector<std::string> values;
    std::string source = "default";
  };
  Status load_file(const std::string& path);
  std::string env_name(const std::string& key) const;

  std::string program_, summary_, prefix_, config_key_;
  std::vector<std::string> order_;
  std::map<std::string, Opt> opts_;
  bool help_ = false;
  bool version_ = false;
};

Result<std::chrono::milliseconds> parse_duration(const std::string& text);

}  // namespace flotilla

#include "flotilla/common/options.hpp"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cstdlib>
#include <sstream>

namespace flotilla {

Options::Options(std::string program, std::string summary, std::string env_prefix)
    : program_(std::move(program)), summary_(std::move(summary)), prefix_(std::move(env_prefix)) {}

Options& Options::add(const std::string& key, const std::string& help, const std::string& def) {
  order_.push_back(key);
  Opt o;
  o.help = help;
  o.def = def;
  o.value = def;
  opts_[key] = o;
  return *this;
}

Options& Options::add_switch(const std::string& key, const std::string& help) {
  add(key, help, "false");
  opts_[key].is_switch = true;
  return *this;
}

Options& Options::add_list(const std::string& key, const std::string& help) {
  add(key, help, "");
  opts_[key].is_list = true;
  return *this;
}

Options& Options::config_file_key(const std::string& key) {
  config_key_ = key;
  return *this;
}

Options& Options::flag_only(const std::string& key) {
  opts_.at(key).flag_only = true;
  return *this;
}

std::string Options::env_name(const std::string& key) const {
  std::string n = prefix_;
  for (char c : key) n.push_back(c == '-' ? '_' : static_cast<char>(::toupper(c)));
  return n;
}

Status Options::load_file(const std::string& path) {
  YAML::Node root;
  try {
    root = YAML::LoadFile(path);
  } catch (const YAML::BadFile&) {
    return make_error(Errc::not_found, "config file " + path + " cannot be read");
  } catch (const YAML::Exception& e) {
    return make_error(Errc::parse, "config file " + path + ": " + e.what());
  }
  if (root.IsNull()) return {};
  if (!root.IsMap()) return make_error(Errc::parse, "config file " + path + ": top level must be a mapping");
  for (const auto& kv : root) {
    std::string key = kv.first.as<std::string>();
    std::replace(key.begin(), key.end(), '_', '-');
    auto it = opts_.find(key);
    if (it == opts_.end()) {
      return make_error(Errc::invalid_argument,
                        "config file " + path + " line " + std::to_string(kv.first.Mark().line + 1) +
                            ": unknown key '" + kv.first.as<std::string>() + "'");
    }
    Opt& o = it->second;
    if (o.flag_only) {
      return make_error(Errc::invalid_argument, "config file " + path + " line " +
                                                    std::to_string(kv.first.Mark().line + 1) + ": '" + key +
                                                    "' can only be given on the command line (--" + key + ")");
    }
    if (o.source == "flag" || o.source == "env") continue;
    const YAML::Node& v = kv.second;
    try {
      if (o.is_list) {
        o.values.clear();
        if (v.IsSequence()) {
          for (const auto& item : v) o.values.push_back(item.as<std::string>());
        } else if (v.IsMap()) {
          for (const auto& item : v) o.values.push_back(item.first.as<std::string>() + "=" + item.second.as<std::string>());
        } else if (!v.IsNull()) {
          o.values.push_back(v.as<std::string>());
        }
      } else {
        if (!v.IsScalar()) {
          return make_error(Errc::invalid_argument, "config file " + path + " line " +
                                                        std::to_string(v.Mark().line + 1) + ": '" + key +
                                                        "' must be a single value");
        }
        o.value = v.as<std::string>();
      }
    } catch (const YAML::Exception& e) {
      return make_error(Errc::parse, "config file " + path + ": key '" + key + "': " + e.what());
    }
    o.source = "file";
  }
  return {};
}

Result<std::vector<std::string>> Options::parse(int argc, char** argv, int start) {
  std::vector<std::string> positional;
  // Environment first, flags override below.
  for (auto& [key, o] : opts_) {
    if (o.flag_only) continue;  // never from the environment
    if (const char* e = std::getenv(env_name(key).c_str()); e && *e) {
      if (o.is_list) {
        o.values.clear();
        std::stringstream ss(e);
        std::string item;
        while (std::getline(ss, item, ',')) if (!item.empty()) o.values.push_back(item);
      } else {
        o.value = e;
      }
      o.source = "env";
    }
  }
  bool flags_done = false;
  std::map<std::string, bool> list_flag_seen;
  for (int i = start; i < argc; ++i) {
    std::string a = argv[i];
    if (flags_done || a.size() < 2 || a[0] != '-') {
      positional.push_back(a);
      continue;
    }
    if (a == "--") {
      flags_done = true;
      continue;
    }
    if (a == "-h" || a == "--help") {
      help_ = true;
      continue;
    }
    if (a == "--version") {
      version_ = true;
      continue;
    }
    std::string key = a.rfind("--", 0) == 0 ? a.substr(2) : a.substr(1);
    std::string value;
    bool has_value = false;
    if (auto eq = key.find('='); eq != std::string::npos) {
      value = key.substr(eq + 1);
      key = key.substr(0, eq);
      has_value = true;
    }
    auto it = opts_.find(key);
    if (it == opts_.end()) {
      return make_error(Errc::invalid_argument, "unknown flag '" + a + "' (see " + program_ + " --help)");
    }
    Opt& o = it->second;
    if (o.is_switch) {
      o.value = has_value ? value : "true";
      if (o.value != "true" && o.value != "false") {
        return make_error(Errc::invalid_argument, "--" + key + " takes true or false, not '" + o.value + "'");
      }
    } else {
      if (!has_value) {
        if (i + 1 >= argc) return make_error(Errc::invalid_argument, "flag --" + key + " needs a value");
        value = argv[++i];
      }
      if (o.is_list) {
        if (!list_flag_seen[key]) o.values.clear();
        list_flag_seen[key] = true;
        o.values.push_back(value);
      } else {
        o.value = value;
      }
    }
    o.source = "flag";
  }
  if (!config_key_.empty() && !help_ && !version_) {
    const std::string& path = get(config_key_);
    if (!path.empty()) {
      // An explicitly named file must exist; the default location may be absent.
      auto st = load_file(path);
      if (!st && !(st.error().code == Errc::not_found && source(config_key_) == "default")) return st.error();
    }
  }
  return positional;
}

std::string Options::help() const {
  std::ostringstream out;
  out << summary_ << "\n\nOptions (flag and environment variable"
      << (config_key_.empty() ? "" : "; also keys of the config file") << "):\n";
  for (const auto& key : order_) {
    const Opt& o = opts_.at(key);
    std::string flag = "--" + key + (o.is_switch ? "" : " VALUE");
    out << "  " << flag;
    if (flag.size() < 26) out << std::string(26 - flag.size(), ' ');
    else out << "\n" << std::string(28, ' ');
    out << o.help;
    if (!o.def.empty() && !o.is_switch) out << " (default: " << o.def << ")";
    if (o.is_list) out << " (repeatable)";
    if (o.flag_only) out << "\n" << std::string(28, ' ') << "command line only (no environment variable or file key)\n";
    else out << "\n" << std::string(28, ' ') << "env " << env_name(key) << "\n";
  }
  return out.str();
}

const std::string& Options::get(const std::string& key) const { return opts_.at(key).value; }

bool Options::get_bool(const std::string& key) const {
  const auto& v = get(key);
  return v == "true" || v == "1" || v == "yes";
}

Result<int64_t> Options::get_int(const std::string& key, int64_t min, int64_t max) const {
  const auto& v = get(key);
  try {
    size_t used = 0;
    long long n = std::stoll(v, &used);
    if (used != v.size()) throw std::invalid_argument("trailing");
    if (n < min || n > max) {
      return make_error(Errc::invalid_argument, key + " must be between " + std::to_string(min) + " and " +
                                                    std::to_string(max) + ", got " + v);
    }
    return static_cast<int64_t>(n);
  } catch (const std::exception&) {
    return make_error(Errc::invalid_argument, key + " must be a whole number, got '" + v + "' (from " +
                                                  source(key) + ")");
  }
}

Result<std::chrono::milliseconds> parse_duration(const std::string& text) {
  if (text.empty()) return make_error(Errc::invalid_argument, "empty duration");
  size_t i = 0, dots = 0;
  while (i < text.size() && (::isdigit(static_cast<unsigned char>(text[i])) || text[i] == '.')) {
    dots += text[i] == '.';
    ++i;
  }
  const std::string number = text.substr(0, i);
  if (number.empty() || dots > 1 || number == ".") {
    return make_error(Errc::invalid_argument, "duration '" + text + "' must start with a number, like 30s or 1.5m");
  }
  char* end = nullptr;
  const double n = std::strtod(number.c_str(), &end);
  if (end != number.c_str() + number.size()) {
    return make_error(Errc::invalid_argument, "duration '" + text + "' has a malformed number");
  }
  std::string unit = text.substr(i);
  double ms;
  if (unit == "ms") ms = n;
  else if (unit == "s" || unit.empty()) ms = n * 1000;
  else if (unit == "m") ms = n * 60'000;
  else if (unit == "h") ms = n * 3'600'000;
  else if (unit == "d") ms = n * 86'400'000;
  else return make_error(Errc::invalid_argument, "duration '" + text + "' has unknown unit '" + unit +
                                                     "' (use ms, s, m, h or d)");
  // About 292 years; anything above is a typo, and the cast would be undefined.
  if (!(ms >= 0 && ms < 9.2e18)) return make_error(Errc::invalid_argument, "duration '" + text + "' is out of range");
  return std::chrono::milliseconds(static_cast<int64_t>(ms));
}

Result<std::chrono::milliseconds> Options::get_duration(const std::string& key) const {
  auto d = parse_duration(get(key));
  if (!d) return d.error().with_context(key);
  return d;
}

const std::vector<std::string>& Options::get_list(const std::string& key) const {
  return opts_.at(key).values;
}

Result<std::map<std::string, std::string>> Options::get_map(const std::string& key) const {
  std::map<std::string, std::string> out;
  for (const auto& item : get_list(key)) {
    auto eq = item.find('=');
    if (eq == std::string::npos || eq == 0) {
      return make_error(Errc::invalid_argument, key + " entries must look like key=value, got '" + item + "'");
    }
    out[item.substr(0, eq)] = item.substr(eq + 1);
  }
  return out;
}

std::string Options::source(const std::string& key) const { return opts_.at(key).source; }

}  // namespace flotilla

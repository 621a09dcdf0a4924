#include <unistd.h>

#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "standin.hpp"

namespace flotilla::standin {

namespace fs = std::filesystem;

void log_line(std::string_view message) {
  std::string line = "k3s-standin: ";
  line.append(message);
  line.push_back('\n');
  // Best effort: there is nowhere left to report a failed stderr write.
  [[maybe_unused]] auto written = ::write(STDERR_FILENO, line.data(), line.size());
}

std::string trim(std::string_view text) {
  const auto first = text.find_first_not_of(" \t\r\n");
  if (first == std::string_view::npos) return {};
  const auto last = text.find_last_not_of(" \t\r\n");
  return std::string(text.substr(first, last - first + 1));
}

std::optional<std::string> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return std::nullopt;
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

std::optional<std::string> env(const char* name) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return std::nullopt;
  return std::string(value);
}

bool iequals(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (std::tolower(static_cast<unsigned char>(a[i])) !=
        std::tolower(static_cast<unsigned char>(b[i]))) {
      return false;
    }
  }
  return true;
}

std::string json_escape(std::string_view text) {
  std::string out;
  for (const char c : text) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", static_cast<unsigned>(c));
          out += buf;
        } else {
          out.push_back(c);
        }
    }
  }
  return out;
}

std::optional<std::string> json_string_field(std::string_view json, std::string_view key) {
  const std::string needle = "\"" + std::string(key) + "\":\"";
  const auto at = json.find(needle);
  if (at == std::string_view::npos) return std::nullopt;
  std::string value;
  for (auto i = at + needle.size(); i < json.size(); ++i) {
    const char c = json[i];
    if (c == '"') return value;
    if (c == '\\' && i + 1 < json.size()) {
      const char escaped = json[++i];
      value.push_back(escaped == 'n' ? '\n' : escaped == 't' ? '\t' : escaped);
    } else {
      value.push_back(c);
    }
  }
  return std::nullopt;
}

namespace {

// Drops a trailing `# comment`; YAML only treats '#' as a comment at the
// start or after whitespace, and never inside quotes.
std::string_view strip_comment(std::string_view line) {
  char quote = 0;
  for (std::size_t i = 0; i < line.size(); ++i) {
    const char c = line[i];
    if (quote != 0) {
      if (c == quote) quote = 0;
    } else if (c == '"' || c == '\'') {
      quote = c;
    } else if (c == '#' && (i == 0 || line[i - 1] == ' ' || line[i - 1] == '\t')) {
      return line.substr(0, i);
    }
  }
  return line;
}

std::string unquote(std::string value) {
  if (value.size() >= 2 && (value.front() == '"' || value.front() == '\'') &&
      value.back() == value.front()) {
    return value.substr(1, value.size() - 2);
  }
  return value;
}

}  // namespace

std::vector<std::pair<std::string, std::string>> parse_flat_yaml(std::string_view text) {
  std::vector<std::pair<std::string, std::string>> out;
  std::istringstream lines{std::string(text)};
  std::string raw;
  while (std::getline(lines, raw)) {
    // Indented lines belong to nested values and '-' starts a list item or a
    // document marker: neither is a top-level flat key.
    if (raw.empty() || raw[0] == ' ' || raw[0] == '\t' || raw[0] == '-') continue;
    const std::string line = trim(strip_comment(raw));
    if (line.empty()) continue;
    // No ": " means a bare scalar or a `key:` opening a nested block.
    const auto colon = line.find(": ");
    if (colon == std::string::npos) continue;
    std::string key = unquote(trim(std::string_view(line).substr(0, colon)));
    std::string value = unquote(trim(std::string_view(line).substr(colon + 2)));
    // Flow collections and block scalars are beyond a flat parser.
    if (key.empty() || value.empty() || value[0] == '[' || value[0] == '{' || value[0] == '|' ||
        value[0] == '>') {
      continue;
    }
    out.emplace_back(std::move(key), std::move(value));
  }
  return out;
}

namespace {

// Both the invoked path (which may be a symlink such as /usr/local/bin/k3s)
// and the real executable are candidates, so a sidecar next to either works.
std::vector<std::string> binary_paths(const char* argv0) {
  std::vector<std::string> paths;
  std::error_code ec;
  if (argv0 != nullptr && *argv0 != '\0') {
    const std::string name(argv0);
    if (name.find('/') != std::string::npos) {
      paths.push_back(fs::absolute(name, ec).lexically_normal().string());
    } else if (const auto path_var = env("PATH")) {
      std::istringstream dirs(*path_var);
      std::string dir;
      while (std::getline(dirs, dir, ':')) {
        const auto candidate = fs::path(dir.empty() ? "." : dir) / name;
        if (::access(candidate.c_str(), X_OK) == 0) {
          paths.push_back(candidate.string());
          break;
        }
      }
    }
  }
  const auto self = fs::read_symlink("/proc/self/exe", ec);
  if (!ec && (paths.empty() || paths.front() != self.string())) paths.push_back(self.string());
  return paths;
}

}  // namespace

std::string resolve_version(const char* argv0) {
  for (const auto& path : binary_paths(argv0)) {
    if (const auto content = read_file(path + ".version")) {
      const std::string first_line = trim(content->substr(0, content->find('\n')));
      if (!first_line.empty()) return first_line;
    }
  }
  if (const auto from_env = env("K3S_STANDIN_VERSION")) {
    const std::string version = trim(*from_env);
    if (!version.empty()) return version;
  }
  return std::string(kDefaultVersion);
}

}  // namespace flotilla::standin

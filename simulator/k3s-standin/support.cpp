#include <fcntl.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>

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

std::string lower(std::string_view text) {
  std::string out(text);
  for (auto& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

std::optional<std::string> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return std::nullopt;
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

void write_file_atomic(const std::string& path, const std::string& content, unsigned mode) {
  std::error_code ec;
  const auto parent = fs::path(path).parent_path();
  if (!parent.empty()) fs::create_directories(parent, ec);
  const std::string tmp = path + ".tmp-" + std::to_string(::getpid());
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, mode);
  if (fd < 0) throw std::runtime_error("cannot write " + tmp + ": " + std::strerror(errno));
  bool ok = ::fchmod(fd, mode) == 0;  // umask must not widen or narrow it
  for (std::size_t off = 0; ok && off < content.size();) {
    const auto n = ::write(fd, content.data() + off, content.size() - off);
    if (n < 0 && errno == EINTR) continue;
    ok = n > 0;
    off += ok ? static_cast<std::size_t>(n) : 0;
  }
  ok = ok && ::fsync(fd) == 0;
  ok = (::close(fd) == 0) && ok;
  if (!ok || ::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string reason = std::strerror(errno);
    ::unlink(tmp.c_str());
    throw std::runtime_error("cannot write " + path + ": " + reason);
  }
}

std::optional<std::string> env(const char* name) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return std::nullopt;
  return std::string(value);
}

bool iequals(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (std::tolower(static_cast<unsigned char>(a[i])) != std::tolower(static_cast<unsigned char>(b[i]))) {
      return false;
    }
  }
  return true;
}

std::string json_escape(std::string_view text) {
  std::string out;
  for (const char c : text) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
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

std::optional<std::string> json_scalar_field(std::string_view json, std::string_view key) {
  const std::string needle = "\"" + std::string(key) + "\":";
  const auto at = json.find(needle);
  if (at == std::string_view::npos) return std::nullopt;
  auto i = at + needle.size();
  std::string value;
  while (i < json.size() && (std::isalnum(static_cast<unsigned char>(json[i])) || json[i] == '-' || json[i] == '.')) {
    value.push_back(json[i++]);
  }
  if (value.empty()) return std::nullopt;
  return value;
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
  if (value.size() >= 2 && (value.front() == '"' || value.front() == '\'') && value.back() == value.front()) {
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
    if (key.empty() || value.empty() || value[0] == '[' || value[0] == '{' || value[0] == '|' || value[0] == '>') {
      continue;
    }
    out.emplace_back(std::move(key), std::move(value));
  }
  return out;
}

// ---- builds and version -----------------------------------------------------

bool Build::flag(const std::string& name) const {
  auto it = flags.find(name);
  return it != flags.end() && (it->second == "1" || it->second == "true");
}

long Build::number(const std::string& name, long fallback) const {
  auto it = flags.find(name);
  if (it == flags.end()) return fallback;
  long out = fallback;
  std::from_chars(it->second.data(), it->second.data() + it->second.size(), out);
  return out;
}

std::string self_exe() {
  std::error_code ec;
  const auto self = fs::read_symlink("/proc/self/exe", ec);
  return ec ? std::string() : self.string();
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
  const std::string self = self_exe();
  if (!self.empty() && (paths.empty() || paths.front() != self)) paths.push_back(self);
  return paths;
}

// The trailer standin-build appended: "\n#K3S-STANDIN:version=v1;flag=1\n"
// at the very end of the file.
std::optional<Build> read_trailer(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return std::nullopt;
  in.seekg(0, std::ios::end);
  const auto size = static_cast<long>(in.tellg());
  const long take = std::min<long>(size, 4096);
  in.seekg(size - take);
  std::string tail(static_cast<size_t>(take), '\0');
  in.read(tail.data(), take);
  const auto at = tail.rfind(kTrailerMarker);
  if (at == std::string::npos) return std::nullopt;
  const std::string body = trim(tail.substr(at + kTrailerMarker.size()));
  Build b;
  std::istringstream items(body);
  std::string item;
  while (std::getline(items, item, ';')) {
    const auto eq = item.find('=');
    const std::string key = trim(item.substr(0, eq));
    const std::string value = eq == std::string::npos ? "1" : trim(item.substr(eq + 1));
    if (key == "version") b.version = value;
    else if (!key.empty()) b.flags[key] = value;
  }
  if (b.version.empty()) return std::nullopt;
  return b;
}

}  // namespace

Build resolve_build(const char* argv0) {
  // What the installed binary is wins: an upgrade replaces the file, and the
  // version must change with it (not stay in a sidecar next to the old path).
  if (const std::string self = self_exe(); !self.empty()) {
    if (auto b = read_trailer(self)) return *b;
  }
  Build b;
  for (const auto& path : binary_paths(argv0)) {
    if (const auto content = read_file(path + ".version")) {
      const std::string first_line = trim(content->substr(0, content->find('\n')));
      if (!first_line.empty()) {
        b.version = first_line;
        return b;
      }
    }
  }
  if (const auto from_env = env("K3S_STANDIN_VERSION")) {
    b.version = trim(*from_env);
    if (!b.version.empty()) return b;
  }
  b.version = std::string(kDefaultVersion);
  return b;
}

std::string resolve_version(const char* argv0) { return resolve_build(argv0).version; }

// ---- time ---------------------------------------------------------------------

int64_t now_unix() {
  int64_t offset = 0;
  if (const auto o = env("FLOTILLA_TEST_CLOCK_OFFSET_S")) {
    std::from_chars(o->data(), o->data() + o->size(), offset);
  }
  return static_cast<int64_t>(std::time(nullptr)) + offset;
}

std::string rfc3339(int64_t unix_seconds) {
  const std::time_t t = static_cast<std::time_t>(unix_seconds);
  std::tm utc{};
  ::gmtime_r(&t, &utc);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &utc);
  return buf;
}

std::optional<int64_t> parse_rfc3339(const std::string& text) {
  std::tm tm{};
  if (::strptime(text.c_str(), "%Y-%m-%dT%H:%M:%SZ", &tm) == nullptr) return std::nullopt;
  return static_cast<int64_t>(::timegm(&tm));
}

// ---- configuration ----------------------------------------------------------

std::string ConfigValues::get(const std::string& key, const std::string& fallback) const {
  auto it = values.find(key);
  return it == values.end() ? fallback : it->second;
}

namespace {

// Mirrors k3s: FILE first (optional when it was not named explicitly, or when
// drop-ins exist), then FILE.d/*.yaml|*.yml in lexical order, later keys
// overriding earlier ones (pkg/configfilearg, dotDFiles).
std::map<std::string, std::string> load_config_files(const std::string& file, bool explicit_file) {
  std::map<std::string, std::string> values;
  const auto main_text = read_file(file);
  std::error_code ec;
  std::vector<std::string> dropins;
  for (const auto& entry : fs::directory_iterator(file + ".d", ec)) {
    const auto ext = entry.path().extension().string();
    if (entry.is_regular_file(ec) && (iequals(ext, ".yaml") || iequals(ext, ".yml"))) {
      dropins.push_back(entry.path().string());
    }
  }
  std::sort(dropins.begin(), dropins.end());
  if (!main_text && explicit_file && dropins.empty()) {
    throw std::runtime_error("failed to read config file " + file + ": " + std::strerror(ENOENT));
  }
  std::vector<std::string> files;
  if (main_text) files.push_back(file);
  files.insert(files.end(), dropins.begin(), dropins.end());
  for (const auto& path : files) {
    const auto text = read_file(path);
    if (!text) throw std::runtime_error("failed to read config file " + path);
    for (auto& [key, value] : parse_flat_yaml(*text)) values[key] = value;
  }
  return values;
}

}  // namespace

ConfigValues load_config(const Args& args, const std::vector<std::string>& value_flags) {
  std::string file = env("K3S_CONFIG_FILE").value_or(std::string(kDefaultConfig));
  bool explicit_file = env("K3S_CONFIG_FILE").has_value();
  // Command-line flags beat the config files, as in k3s.
  std::map<std::string, std::string> flags;
  ConfigValues out;
  for (std::size_t i = 0; i < args.size(); ++i) {
    std::string name = args[i];
    if (!name.starts_with("-")) {
      out.positional.push_back(name);
      continue;
    }
    name.erase(0, name.find_first_not_of('-'));
    std::optional<std::string> value;
    if (const auto eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name.resize(eq);
    }
    if (name == "c") name = "config";
    if (name == "o") name = "write-kubeconfig";
    if (name == "d") name = "data-dir";
    if (name == "t") name = "token";
    if (name == "s") name = "server";
    const bool takes_value = name == "config" ||
                             std::find(value_flags.begin(), value_flags.end(), name) != value_flags.end();
    if (!value) {
      if (takes_value) {
        if (i + 1 >= args.size()) throw std::runtime_error("flag needs an argument: --" + name);
        value = args[++i];
      } else {
        value = "true";
      }
    }
    if (name == "config") {
      file = *value;
      explicit_file = true;
    } else {
      flags[name] = *value;
    }
  }
  out.values = load_config_files(file, explicit_file);
  for (const auto& [key, value] : flags) out.values[key] = value;
  return out;
}

std::string find_data_dir(const Args& args) {
  try {
    const auto cfg = load_config(args, {"data-dir", "kubeconfig", "name", "etcd-snapshot-dir", "service", "n",
                                        "namespace", "output", "raw"});
    return cfg.get("data-dir");
  } catch (const std::exception&) {
    return {};
  }
}

// ---- the data directory -----------------------------------------------------

std::string sha256_hex_of_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return {};
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr);
  std::vector<char> buf(1 << 16);
  while (in) {
    in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    if (in.gcount() > 0) EVP_DigestUpdate(ctx, buf.data(), static_cast<size_t>(in.gcount()));
  }
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_DigestFinal_ex(ctx, md, &len);
  EVP_MD_CTX_free(ctx);
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  for (unsigned i = 0; i < len; ++i) {
    out.push_back(kHex[md[i] >> 4]);
    out.push_back(kHex[md[i] & 15]);
  }
  return out;
}

std::string random_hex(size_t bytes) {
  std::vector<unsigned char> raw(bytes);
  RAND_bytes(raw.data(), static_cast<int>(raw.size()));
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  for (unsigned char c : raw) {
    out.push_back(kHex[c >> 4]);
    out.push_back(kHex[c & 15]);
  }
  return out;
}

std::string extract_data_dir(const std::string& data_dir, const Build& build) {
  // k3s names the directory after its embedded payload; here the binary's own
  // hash plays that part: each build extracts once, into its own directory.
  const std::string hash = sha256_hex_of_file(self_exe()).substr(0, 16);
  const fs::path data = fs::path(data_dir) / "data";
  const fs::path dir = data / hash;
  std::error_code ec;
  if (fs::exists(dir / "bin" / "k3s", ec)) return dir.string();
  fs::create_directories(data, ec);
  // One extraction at a time (data/.lock), as k3s's flock.
  const int lock = ::open((data / ".lock").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (lock >= 0) ::flock(lock, LOCK_EX);
  if (!fs::exists(dir / "bin" / "k3s", ec)) {
    const fs::path tmp = data / (hash + "-tmp");
    fs::remove_all(tmp, ec);
    fs::create_directories(tmp / "bin", ec);
    write_file_atomic((tmp / "bin" / "k3s").string(), "k3s stand-in payload of " + build.version + "\n", 0755);
    // The payload's size (containerd, runc, CNI plugins, ...): a build flag,
    // so tests can give a build a realistic footprint on disk.
    const long bytes = std::max<long>(0, build.number("data-bytes", 64 * 1024));
    {
      std::ofstream out(tmp / "bin" / "payload", std::ios::binary);
      std::string block(64 * 1024, 'x');
      for (long left = bytes; left > 0; left -= static_cast<long>(block.size())) {
        out.write(block.data(), std::min<long>(left, static_cast<long>(block.size())));
      }
    }
    const fs::path current = data / "current";
    const fs::path previous = data / "previous";
    if (fs::is_symlink(fs::symlink_status(current, ec))) fs::rename(current, previous, ec);
    fs::create_symlink(dir, current, ec);
    fs::rename(tmp, dir, ec);
    log_line("extracted data dir " + dir.string());
  }
  if (lock >= 0) ::close(lock);
  return dir.string();
}

void sd_notify_ready() {
  const auto socket_path = env("NOTIFY_SOCKET");
  if (!socket_path) return;
  const int fd = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::string path = *socket_path;
  if (path.size() >= sizeof addr.sun_path) {
    ::close(fd);
    return;
  }
  std::memcpy(addr.sun_path, path.data(), path.size());
  if (path[0] == '@') addr.sun_path[0] = '\0';  // abstract namespace
  const char msg[] = "READY=1\n";
  ::sendto(fd, msg, sizeof msg - 1, MSG_NOSIGNAL, reinterpret_cast<sockaddr*>(&addr),
           static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + path.size()));
  ::close(fd);
}

// ---- certificates -------------------------------------------------------------

void write_self_signed(const std::string& cert_path, const std::string& key_path, const std::string& cn, int days) {
  EVP_PKEY* key = nullptr;
  EVP_PKEY_CTX* pctx = EVP_PKEY_CTX_new_id(EVP_PKEY_ED25519, nullptr);
  if (!pctx || EVP_PKEY_keygen_init(pctx) <= 0 || EVP_PKEY_keygen(pctx, &key) <= 0) {
    EVP_PKEY_CTX_free(pctx);
    throw std::runtime_error("cannot make a key for " + cert_path);
  }
  EVP_PKEY_CTX_free(pctx);
  X509* cert = X509_new();
  X509_set_version(cert, 2);
  ASN1_INTEGER_set(X509_get_serialNumber(cert), static_cast<long>(now_unix() & 0x7fffffff));
  const int64_t now = now_unix();
  ASN1_TIME_set(X509_getm_notBefore(cert), static_cast<time_t>(now - 60));
  ASN1_TIME_set(X509_getm_notAfter(cert), static_cast<time_t>(now + int64_t{days} * 86400));
  X509_NAME* name = X509_get_subject_name(cert);
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, reinterpret_cast<const unsigned char*>(cn.c_str()), -1, -1,
                             0);
  X509_set_issuer_name(cert, name);
  X509_set_pubkey(cert, key);
  X509_sign(cert, key, nullptr);
  std::string pem_cert, pem_key;
  {
    BIO* b = BIO_new(BIO_s_mem());
    PEM_write_bio_X509(b, cert);
    char* data = nullptr;
    const long n = BIO_get_mem_data(b, &data);
    pem_cert.assign(data, static_cast<size_t>(n));
    BIO_free(b);
  }
  {
    BIO* b = BIO_new(BIO_s_mem());
    PEM_write_bio_PrivateKey(b, key, nullptr, nullptr, 0, nullptr, nullptr);
    char* data = nullptr;
    const long n = BIO_get_mem_data(b, &data);
    pem_key.assign(data, static_cast<size_t>(n));
    BIO_free(b);
  }
  X509_free(cert);
  EVP_PKEY_free(key);
  write_file_atomic(key_path, pem_key, 0600);
  write_file_atomic(cert_path, pem_cert, 0644);
}

std::optional<int64_t> cert_not_after(const std::string& pem_path) {
  FILE* f = std::fopen(pem_path.c_str(), "r");
  if (!f) return std::nullopt;
  X509* cert = PEM_read_X509(f, nullptr, nullptr, nullptr);
  std::fclose(f);
  if (!cert) return std::nullopt;
  std::tm t{};
  const int ok = ASN1_TIME_to_tm(X509_get0_notAfter(cert), &t);
  X509_free(cert);
  if (ok != 1) return std::nullopt;
  return static_cast<int64_t>(::timegm(&t));
}

}  // namespace flotilla::standin

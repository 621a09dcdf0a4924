#include "flotilla/hub/broker.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <dirent.h>
#include <fcntl.h>
#include <grp.h>
#include <pwd.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <random>
#include <thread>
#include <cstring>

#include "flotilla/bundles/trust.hpp"
#include "flotilla/common/crypto.hpp"
#include "flotilla/common/encoding.hpp"
#include "flotilla/common/fs.hpp"
#include "flotilla/common/log.hpp"
#include "flotilla/common/mqtt_codec.hpp"
#include "flotilla/hub/tls_files.hpp"

namespace flotilla::hub {

std::string mosquitto_password_hash(const std::string& password, int iterations) {
  Bytes salt = crypto::random_bytes(12);
  unsigned char out[64];
  PKCS5_PBKDF2_HMAC(password.data(), static_cast<int>(password.size()), salt.data(), static_cast<int>(salt.size()),
                    iterations, EVP_sha512(), sizeof out, out);
  return "$7$" + std::to_string(iterations) + "$" + to_base64(salt) + "$" + to_base64(out, sizeof out);
}

namespace {
bool can_bind(const std::string& host, int port) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  ::inet_pton(AF_INET, host.c_str(), &addr.sin_addr);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  const bool ok = ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0;
  ::close(fd);
  return ok;
}
}  // namespace

// A port the broker keeps across restarts must not come from the kernel's
// ephemeral range: while the broker is down, a device retrying to connect to
// 127.0.0.1:P can be handed local port P and connect to itself, and the
// restarted broker then finds its port taken.
Result<int> free_listen_port(const std::string& host) {
  int lo = 32768, hi = 60999;
  if (auto r = fs::read_file("/proc/sys/net/ipv4/ip_local_port_range", 64)) {
    std::sscanf(r->c_str(), "%d %d", &lo, &hi);
  }
  std::mt19937_64 rng(crypto::random_u64());
  // Prefer the registered range below the ephemeral one; fall back above it.
  const int from = 10000, to = std::max(from + 1000, lo - 1);
  std::uniform_int_distribution<int> pick(from, to);
  for (int i = 0; i < 200; ++i) {
    const int p = pick(rng);
    if ((p < lo || p > hi) && can_bind(host, p)) return p;
  }
  return free_port(host);
}

Result<int> free_port(const std::string& host) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return make_error(Errc::io, "socket failed");
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  ::inet_pton(AF_INET, host.c_str(), &addr.sin_addr);
  addr.sin_port = 0;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    ::close(fd);
    return make_error(Errc::io, "cannot bind a free port on " + host);
  }
  socklen_t len = sizeof addr;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  ::close(fd);
  return static_cast<int>(ntohs(addr.sin_port));
}

bool wait_for_port(const std::string& host, int port, std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    ::inet_pton(AF_INET, host.c_str(), &addr.sin_addr);
    addr.sin_port = htons(static_cast<uint16_t>(port));
    bool ok = ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0;
    ::close(fd);
    if (ok) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return false;
}

size_t broker_max_packet_size() { return bundles::kMaxDesiredStateBytes + 64 * 1024; }

namespace {

// Everything the hub does in the broker's directory goes through a
// descriptor of it: names are resolved relative to it, one component at a
// time, and a symbolic link there is never followed (O_NOFOLLOW), so what the
// broker's user might have planted cannot redirect a root hub's write,
// chown or read elsewhere.
class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  UniqueFd(UniqueFd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  UniqueFd& operator=(UniqueFd&& o) noexcept {
    if (this != &o) {
      reset();
      fd_ = std::exchange(o.fd_, -1);
    }
    return *this;
  }
  ~UniqueFd() { reset(); }
  void reset() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }
  int get() const { return fd_; }
  int release() { return std::exchange(fd_, -1); }

 private:
  int fd_ = -1;
};

Error sys_error(const std::string& what, const std::string& name) {
  return make_error(errno == ENOENT ? Errc::not_found : Errc::io, what + " " + name + ": " + std::strerror(errno));
}

// A sub-directory of dir_fd, created if missing, opened without following a link.
Result<UniqueFd> open_subdir(int dir_fd, const std::string& name, mode_t mode) {
  if (::mkdirat(dir_fd, name.c_str(), mode) != 0 && errno != EEXIST) return sys_error("create directory", name);
  UniqueFd fd(::openat(dir_fd, name.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
  if (fd.get() < 0) return sys_error("open directory (links are not followed)", name);
  return fd;
}

// Write-to-temp + fsync + rename inside dir_fd. The temp file is new
// (O_EXCL, O_NOFOLLOW); its mode and group are set on the descriptor before
// it takes the name, so mosquitto never sees a file it cannot read.
Status write_at(int dir_fd, const std::string& name, std::string_view content, mode_t mode, gid_t group = gid_t(-1)) {
  const std::string tmp = "." + name + ".tmp-" + crypto::random_token(6);
  UniqueFd fd(::openat(dir_fd, tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600));
  if (fd.get() < 0) return sys_error("create", tmp);
  auto fail = [&](const std::string& what) {
    Error e = sys_error(what, tmp);
    ::unlinkat(dir_fd, tmp.c_str(), 0);
    return e;
  };
  if (group != gid_t(-1) && ::fchown(fd.get(), uid_t(-1), group) != 0) return fail("chown");
  if (::fchmod(fd.get(), mode) != 0) return fail("chmod");
  for (size_t done = 0; done < content.size();) {
    const ssize_t n = ::write(fd.get(), content.data() + done, content.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      return fail("write");
    }
    done += static_cast<size_t>(n);
  }
  if (::fsync(fd.get()) != 0) return fail("fsync");
  fd.reset();
  if (::renameat(dir_fd, tmp.c_str(), dir_fd, name.c_str()) != 0) return fail("rename to " + name + " from");
  if (::fsync(dir_fd) != 0) return sys_error("fsync directory of", name);
  return {};
}

// A regular file of the hub's own in dir_fd. A link, or a file owned by
// someone else, is refused (Errc::refused), never read through.
Result<std::string> read_at(int dir_fd, const std::string& name, size_t max_bytes) {
  UniqueFd fd(::openat(dir_fd, name.c_str(), O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC));
  if (fd.get() < 0) {
    if (errno == ELOOP) return make_error(Errc::refused, name + " is a symbolic link");
    return sys_error("open", name);
  }
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) return sys_error("stat", name);
  if (!S_ISREG(st.st_mode) || st.st_uid != ::geteuid()) {
    return make_error(Errc::refused, name + " is not a regular file of the hub's user");
  }
  std::string out;
  char buf[65536];
  for (;;) {
    const ssize_t n = ::read(fd.get(), buf, sizeof buf);
    if (n < 0) {
      if (errno == EINTR) continue;
      return sys_error("read", name);
    }
    if (n == 0) break;
    out.append(buf, static_cast<size_t>(n));
    if (out.size() > max_bytes) return make_error(Errc::too_large, name + " is larger than " + std::to_string(max_bytes));
  }
  return out;
}

// Removes name (a file, a link or a whole tree) from dir_fd without
// following any link inside it.
void remove_at(int dir_fd, const std::string& name, int depth = 0) {
  if (::unlinkat(dir_fd, name.c_str(), 0) == 0 || errno == ENOENT) return;
  if (depth > 8) return;
  UniqueFd sub(::openat(dir_fd, name.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
  if (sub.get() < 0) return;
  const int dup = ::dup(sub.get());
  if (dup < 0) return;
  DIR* d = ::fdopendir(dup);
  if (!d) {
    ::close(dup);
    return;
  }
  std::vector<std::string> names;
  while (dirent* e = ::readdir(d)) {
    const std::string n = e->d_name;
    if (n != "." && n != "..") names.push_back(n);
  }
  ::closedir(d);
  for (const auto& n : names) remove_at(sub.get(), n, depth + 1);
  ::unlinkat(dir_fd, name.c_str(), AT_REMOVEDIR);
}

// Opens what the hub reads from dir_fd, or learns that it must not: a link
// or someone else's file there is removed (logged) and treated as missing.
std::optional<std::string> read_own_file(int dir_fd, const std::filesystem::path& dir, const std::string& name,
                                         size_t max_bytes) {
  auto r = read_at(dir_fd, name, max_bytes);
  if (r) return *r;
  if (r.error().code == Errc::refused) {
    log::get("hub")->warn("{}/{}: {}; removed it and made a new one", dir.string(), name, r.error().message);
    remove_at(dir_fd, name);
  }
  return std::nullopt;
}

// Whether the broker's user can reach dir (every parent traversable).
// Checked by a child that takes that identity, since ACLs and modes of all
// parents decide it.
bool broker_user_can_reach(const std::filesystem::path& dir, uid_t uid, gid_t gid) {
  pid_t pid = ::fork();
  if (pid < 0) return false;
  if (pid == 0) {
    if (::setgroups(0, nullptr) != 0 || ::setgid(gid) != 0 || ::setuid(uid) != 0) _exit(2);
    _exit(::access(dir.c_str(), X_OK) == 0 ? 0 : 1);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  return WIFEXITED(status) && WEXITSTATUS(status) == 0;
}
}  // namespace

Status EmbeddedBroker::open_dir() {
  const std::string dir = cfg_.dir.string();
  if (::mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST) return sys_error("create directory", dir);
  UniqueFd fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
  if (fd.get() < 0) return sys_error("open directory (links are not followed)", dir);
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) return sys_error("stat", dir);
  // Older hubs handed this directory to the broker's user. Take it back
  // before anything in it is trusted; whatever that user left here is
  // replaced by rename or refused by read_at, never followed.
  if (st.st_uid != ::geteuid()) {
    log::get("hub")->warn("{} belonged to uid {}; the hub takes it back (the broker writes only {}/state)", dir,
                          st.st_uid, dir);
    if (::fchown(fd.get(), ::geteuid(), ::getegid()) != 0) return sys_error("chown", dir);
  }
  if (::fchmod(fd.get(), 0700) != 0) return sys_error("chmod", dir);
  dir_fd_ = fd.release();
  return {};
}

// state/: the one place the broker writes (persistence). Its user owns it;
// the hub never opens anything inside it, apart from moving an older
// layout's mosquitto.db in once.
Status EmbeddedBroker::prepare_state_dir() {
  auto state = open_subdir(dir_fd_, "state", 0700);
  if (!state) return state.error();
  const uid_t owner = drops_privileges_ ? broker_uid_ : ::geteuid();
  const gid_t group = drops_privileges_ ? broker_gid_ : ::getegid();
  if (::fchown(state->get(), owner, group) != 0 || ::fchmod(state->get(), 0700) != 0) {
    return sys_error("hand over", (cfg_.dir / "state").string());
  }
  struct stat old {}, now {};
  if (::fstatat(dir_fd_, "mosquitto.db", &old, AT_SYMLINK_NOFOLLOW) == 0) {
    const bool plain = S_ISREG(old.st_mode) && old.st_nlink == 1;
    if (plain && ::fstatat(state->get(), "mosquitto.db", &now, AT_SYMLINK_NOFOLLOW) != 0 &&
        ::renameat(dir_fd_, "mosquitto.db", state->get(), "mosquitto.db") == 0) {
      // Written by a broker that ran as root (no "mosquitto" user then): make
      // it the broker's. Opened without following, checked on the descriptor.
      UniqueFd db(::openat(state->get(), "mosquitto.db", O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC));
      struct stat st {};
      if (db.get() >= 0 && ::fstat(db.get(), &st) == 0 && S_ISREG(st.st_mode) && st.st_nlink == 1 &&
          st.st_uid != owner) {
        (void)::fchown(db.get(), owner, group);
      }
      log::get("hub")->info("moved the broker's persistence into {}/state", cfg_.dir.string());
    } else {
      remove_at(dir_fd_, "mosquitto.db");
    }
  }
  return {};
}

Status EmbeddedBroker::write_broker_file(int dir_fd, const std::string& name, const std::string& content) {
  if (drops_privileges_) return write_at(dir_fd, name, content, 0640, broker_gid_);
  return write_at(dir_fd, name, content, 0600);
}

Result<std::unique_ptr<EmbeddedBroker>> EmbeddedBroker::start(const BrokerConfig& cfg, const Credentials& devices) {
  std::unique_ptr<EmbeddedBroker> b(new EmbeddedBroker());
  b->cfg_ = cfg;
  // Bad TLS files are the operator's to fix: refused before anything is
  // written or started, rather than as a line in mosquitto's log.
  if (!cfg.tls_cert_file.empty()) {
    if (auto s = check_tls_key_pair("broker-tls-cert", cfg.tls_cert_file, "broker-tls-key", cfg.tls_key_file); !s) {
      return s.error();
    }
  }
  if (cfg.tls() && !cfg.tls_ca_file.empty()) {
    if (auto s = check_ca_file("broker-tls-ca", cfg.tls_ca_file); !s) return s.error();
  }
  if (cfg.auth == BrokerAuth::certificate && cfg.tls_cert_file.empty() &&
      (cfg.server_cert_pem.empty() || cfg.server_key_pem.empty())) {
    return make_error(Errc::invalid_argument, "certificate auth needs the broker's own certificate (made by the "
                                              "device CA) or broker-tls-cert");
  }
  if (auto s = b->open_dir(); !s) return s.error();
  if (::geteuid() == 0) {
    // mosquitto started as root drops to its own user, which must reach this
    // directory (a 0700 parent, say, stops it). Rather than fail, keep root and say so.
    const passwd* pw = ::getpwnam(cfg.broker_user.c_str());
    if (pw && broker_user_can_reach(cfg.dir.parent_path(), pw->pw_uid, pw->pw_gid)) {
      b->drops_privileges_ = true;
      b->broker_uid_ = pw->pw_uid;
      b->broker_gid_ = pw->pw_gid;
    } else {
      log::get("hub")->warn("user {} cannot reach {}; the embedded broker runs as root. Run the hub as "
                            "a dedicated user, or keep its data dir under a traversable path.",
                            cfg.broker_user, cfg.dir.string());
      b->run_as_root_ = true;
    }
  }
  b->stop_stale();
  // The hub's own broker password is made once and kept, 0600, in the data dir.
  if (auto existing = read_own_file(b->dir_fd_, cfg.dir, "hub.secret", 1024); existing && !existing->empty()) {
    b->hub_password_ = *existing;
  } else {
    b->hub_password_ = crypto::random_token(24);
    if (auto s = write_at(b->dir_fd_, "hub.secret", b->hub_password_, 0600); !s) return s.error();
  }
  // Keep the ports across restarts: devices store the broker address they enrolled with.
  const bool legacy = cfg.auth == BrokerAuth::certificate && !devices.empty();
  if (auto s = b->pick_ports(legacy); !s) return s.error();
  remove_at(b->dir_fd_, "passwd.new");  // an older hub's staging name
  if (auto s = b->prepare_state_dir(); !s) return s.error();
  if (auto s = b->install_tls_files(); !s) return s.error();
  if (auto s = b->write_config(); !s) return s.error();
  if (cfg.auth == BrokerAuth::password || legacy) {
    if (auto s = b->write_passwords(devices); !s) return s.error();
  } else {
    remove_at(b->dir_fd_, "passwd");  // no password is taken anywhere
  }
  // Now the broker may traverse (not list, not write) the directory: 0710
  // with its group when it drops to its own user, 0700 otherwise.
  if (b->drops_privileges_) {
    if (::fchown(b->dir_fd_, ::geteuid(), b->broker_gid_) != 0 || ::fchmod(b->dir_fd_, 0710) != 0) {
      return sys_error("open to the broker's group", cfg.dir.string());
    }
  }
  if (auto s = b->launch(); !s) return s.error();
  b->watchdog_ = std::thread([p = b.get()] { p->watchdog(); });
  return b;
}

EmbeddedBroker::~EmbeddedBroker() {
  stop();
  if (dir_fd_ >= 0) ::close(dir_fd_);
}

std::string EmbeddedBroker::url() const {
  return (cfg_.tls() ? "ssl://" : "tcp://") + cfg_.listen_host + ":" + std::to_string(cfg_.port);
}

std::string EmbeddedBroker::legacy_url() const {
  if (legacy_port_ == 0) return {};
  return (legacy_tls_ ? "ssl://" : "tcp://") + cfg_.listen_host + ":" + std::to_string(legacy_port_);
}

// `port` holds the listener devices are told about. With certificate auth
// and devices that still have passwords, `legacy-port` holds the listener
// those devices know: on the first start with certificates that is the
// port they enrolled with, and the certificate listener gets a new one.
Status EmbeddedBroker::pick_ports(bool legacy) {
  auto stored = [&](const char* name) {
    int port = 0;
    if (auto p = read_own_file(dir_fd_, cfg_.dir, name, 64); p && !p->empty()) {
      try {
        port = std::stoi(*p);
      } catch (const std::exception&) {
      }
    }
    return port > 0 && port <= 65535 ? port : 0;
  };
  const int explicit_port = cfg_.port;
  const int stored_main = stored("port");
  const int stored_legacy = stored("legacy-port");
  if (legacy) {
    legacy_port_ = stored_legacy ? stored_legacy : stored_main;
    legacy_tls_ = !cfg_.tls_cert_file.empty();
    if (legacy_port_ == 0) {
      auto fp = free_listen_port(cfg_.listen_host);
      if (!fp) return fp.error();
      legacy_port_ = *fp;
    }
    if (explicit_port != 0 && explicit_port == legacy_port_) {
      return make_error(Errc::invalid_argument,
                        "broker-listen port " + std::to_string(explicit_port) + " is where the devices enrolled with "
                        "passwords connect until they renew; give the certificate listener another port (or 0)");
    }
    cfg_.port = explicit_port ? explicit_port : (stored_legacy ? stored_main : 0);
    if (cfg_.port == legacy_port_) cfg_.port = 0;
    if (auto s = write_at(dir_fd_, "legacy-port", std::to_string(legacy_port_), 0600); !s) return s;
  } else {
    remove_at(dir_fd_, "legacy-port");
    cfg_.port = explicit_port ? explicit_port : stored_main;
  }
  if (cfg_.port == 0) {
    for (int i = 0; i < 10 && (cfg_.port == 0 || cfg_.port == legacy_port_); ++i) {
      auto fp = free_listen_port(cfg_.listen_host);
      if (!fp) return fp.error();
      cfg_.port = *fp;
    }
  }
  return write_at(dir_fd_, "port", std::to_string(cfg_.port), 0600);
}

// The operator's files (checked in start()) are copied to <dir>/tls/: when
// the hub runs as root, mosquitto reads them as its own user, who may not
// reach the originals. The directory is made afresh at every start.
Status EmbeddedBroker::install_tls_files() {
  remove_at(dir_fd_, "tls");  // also: no stale key left behind after TLS is turned off
  if (!cfg_.tls()) return {};
  auto tls = open_subdir(dir_fd_, "tls", 0700);
  if (!tls) return tls.error();
  if (drops_privileges_ && (::fchown(tls->get(), ::geteuid(), broker_gid_) != 0 || ::fchmod(tls->get(), 0710) != 0)) {
    return sys_error("open to the broker's group", (cfg_.dir / "tls").string());
  }
  if (!cfg_.tls_cert_file.empty()) {
    for (const auto& [from, name] :
         {std::pair{cfg_.tls_cert_file, "broker.pem"}, std::pair{cfg_.tls_key_file, "broker.key"}}) {
      auto bytes = fs::read_file(from, 1 << 20);
      if (!bytes) return bytes.error().with_context("read " + from);
      if (auto s = write_broker_file(tls->get(), name, *bytes); !s) return s;
    }
  } else {
    // The broker's own certificate, made by the device CA at this start.
    if (auto s = write_broker_file(tls->get(), "broker.pem", cfg_.server_cert_pem); !s) return s;
    if (auto s = write_broker_file(tls->get(), "broker.key", cfg_.server_key_pem); !s) return s;
  }
  if (cfg_.auth == BrokerAuth::certificate) {
    if (auto s = write_broker_file(tls->get(), "client-ca.pem", cfg_.client_ca_pem); !s) return s;
    if (auto s = write_broker_file(tls->get(), "crl.pem", cfg_.crl_pem); !s) return s;
  }
  return {};
}

Status EmbeddedBroker::write_config() {
  const auto d = cfg_.dir.string();
  const bool certs = cfg_.auth == BrokerAuth::certificate;
  const bool passwords = !certs || legacy_port_ != 0;
  std::string conf =
      "# Generated by flotilla-hub at every start; edits are overwritten.\n"
      "per_listener_settings false\n"
      "allow_anonymous false\n" +
      std::string(passwords ? "password_file " + d + "/passwd\n" : "") +
      "acl_file " + d + "/acl\n"
      "persistence true\n"
      // The only directory the broker's user may write.
      "persistence_location " + d + "/state/\n"
      "autosave_interval 60\n"
      // Bounded input: no packet above the largest legitimate message (a
      // desired state with its bundle inline). mosquitto checks the length a
      // client announces before it reads the payload, and disconnects it.
      "max_packet_size " + std::to_string(broker_max_packet_size()) + "\n"
      // Per client. The hub's persistent session queues every report while
      // it is down; the byte cap bounds what that (or any) queue may hold.
      "max_queued_messages " + std::to_string(cfg_.max_queued_messages) + "\n"
      "max_queued_bytes " + std::to_string(cfg_.max_queued_bytes) + "\n"
      "max_inflight_messages 100\n"
      "log_dest stderr\n"
      "log_type error\nlog_type warning\nlog_type notice\n"
      "connection_messages false\n" +
      std::string(run_as_root_ ? "user root\n" : drops_privileges_ ? "user " + cfg_.broker_user + "\n" : "") +
      "listener " + std::to_string(cfg_.port) + " " + cfg_.listen_host + "\n"
      // After the listener line on purpose: before it, a listener option
      // configures mosquitto's default listener, which then also opens
      // 0.0.0.0:1883. Client id = username: no device can take over another's
      // (or the hub's) session.
      "use_username_as_clientid true\n";
  if (cfg_.tls()) {
    // The one listener is TLS-only: there is no plain port to fall back to.
    conf += "certfile " + d + "/tls/broker.pem\n"
            "keyfile " + d + "/tls/broker.key\n"
            "tls_version tlsv1.2\n";  // the minimum; TLS 1.3 is offered too
  }
  if (certs) {
    // The client's certificate is its identity: its CN is the MQTT username
    // (and so the client id and the ACL's %u), from a certificate the device
    // CA issued and did not revoke. No password is looked at here, and
    // enrolling a device changes nothing in this file.
    conf += "cafile " + d + "/tls/client-ca.pem\n"
            "crlfile " + d + "/tls/crl.pem\n"
            "require_certificate true\n"
            "use_identity_as_username true\n";
  }
  if (certs && legacy_port_ != 0) {
    // Devices enrolled with passwords before certificates keep their port
    // and password until they renew (docs/operations.md, "Moving devices to
    // certificates"); the password file holds only them.
    conf += "listener " + std::to_string(legacy_port_) + " " + cfg_.listen_host + "\n";
    if (legacy_tls_) {
      conf += "certfile " + d + "/tls/broker.pem\n"
              "keyfile " + d + "/tls/broker.key\n"
              "tls_version tlsv1.2\n";
    }
  }
  std::string acl =
      "# Generated by flotilla-hub. The hub may use every Flotilla topic; a device\n"
      "# (MQTT username = device id) may read its own desired state and write its\n"
      "# own report and presence, nothing else.\n"
      "user " + cfg_.hub_username + "\n"
      "topic readwrite flotilla/v1/#\n"
      "\n"
      "pattern read flotilla/v1/d/%u/desired\n"
      "pattern write flotilla/v1/d/%u/report\n"
      "pattern write flotilla/v1/d/%u/presence\n"
      "# A gateway (an enrolled device with its own session) carries the devices\n"
      "# enrolled behind it: exactly the subtree under its own id. The hub drops\n"
      "# a message there for a device that is not behind that gateway.\n"
      "pattern read flotilla/v1/g/%u/d/+/desired\n"
      "pattern write flotilla/v1/g/%u/d/+/report\n"
      "pattern write flotilla/v1/g/%u/d/+/presence\n"
      "# Its devices' reports, many per message (v1::GatewayReports).\n"
      "pattern write flotilla/v1/g/%u/reports\n"
      "# The hub's roll call (v1::Rollcall: re-announce yourself): every client\n"
      "# may read it, on its shard or (agents from before shards) the whole\n"
      "# topic; only the hub may write it.\n"
      "pattern read flotilla/v1/rollcall/+\n"
      "pattern read flotilla/v1/rollcall\n";
  if (auto s = write_broker_file(dir_fd_, "mosquitto.conf", conf); !s) return s;
  return write_broker_file(dir_fd_, "acl", acl);
}

Status EmbeddedBroker::write_passwords(const Credentials& devices) {
  // The probe account's password changes with every rewrite: logging in
  // with it proves that mosquitto runs on this very file.
  probe_password_ = crypto::random_token(18);
  // With certificates the hub logs in with its own certificate; the
  // password file is only for devices that have not moved yet.
  std::string text = cfg_.auth == BrokerAuth::password
                         ? cfg_.hub_username + ":" + mosquitto_password_hash(hub_password_) + "\n"
                         : std::string();
  text += std::string(kReloadProbeUser) + ":" + mosquitto_password_hash(probe_password_) + "\n";
  for (const auto& [user, hash] : devices) text += user + ":" + hash + "\n";
  // The file is readable by the broker's group before it takes the name:
  // mosquitto may still be reloading after the previous SIGHUP, and a passwd
  // it cannot open makes it refuse every client, the hub included (seen with
  // concurrent enrollments, flotilla-sim direct mode).
  return write_broker_file(dir_fd_, "passwd", text);
}

std::string mqtt_connect_packet(const std::string& client_id, const std::string& user, const std::string& password) {
  mqtt::ConnectFields f;
  f.client_id = client_id;
  f.username = user;
  f.password = password;
  f.clean_session = true;
  f.keepalive_s = 5;
  return mqtt::encode_connect(f);
}

namespace {

enum class ConnectOutcome { accepted, refused, revoked, failed };

// One MQTT 3.1.1 CONNECT over a fresh loopback connection (a full client
// library costs tens of milliseconds per attempt): accepted on CONNACK 0,
// refused on another CONNACK, revoked when the broker's TLS alert says the
// client certificate is revoked. The certificate of our own child is not
// checked: the connection goes to its listen address, and what is sent
// opens nothing.
ConnectOutcome mqtt_connect_once(const std::string& host, int port, bool tls, const ClientIdentity* id,
                                 const std::string& packet) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return ConnectOutcome::failed;
  timeval tv{2, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  ::inet_pton(AF_INET, host.c_str(), &addr.sin_addr);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  ConnectOutcome out = ConnectOutcome::failed;
  unsigned char ack[4] = {0, 0, 0, 0};
  std::unique_ptr<SSL_CTX, decltype(&SSL_CTX_free)> ctx(nullptr, SSL_CTX_free);
  std::unique_ptr<SSL, decltype(&SSL_free)> ssl(nullptr, SSL_free);
  auto send_all = [&](const char* p, size_t n) {
    if (ssl) return SSL_write(ssl.get(), p, static_cast<int>(n)) == static_cast<int>(n);
    return ::send(fd, p, n, MSG_NOSIGNAL) == static_cast<ssize_t>(n);
  };
  auto recv_some = [&](unsigned char* p, size_t n) -> ssize_t {
    if (ssl) return SSL_read(ssl.get(), p, static_cast<int>(n));
    return ::recv(fd, p, n, 0);
  };
  // The broker's verdict on a client certificate arrives as an alert, at
  // the handshake (TLS 1.2) or at the first read after it (TLS 1.3).
  auto revoked_alert = [] {
    bool revoked = false;
    while (const unsigned long e = ERR_get_error()) {
      if (ERR_GET_REASON(e) == SSL_R_SSLV3_ALERT_CERTIFICATE_REVOKED) revoked = true;
    }
    return revoked;
  };
  bool open = ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0;
  ERR_clear_error();
  if (open && tls) {
    ctx.reset(SSL_CTX_new(TLS_client_method()));
    open = ctx && SSL_CTX_set_min_proto_version(ctx.get(), TLS1_2_VERSION) == 1;
    if (open && id) {
      std::unique_ptr<BIO, decltype(&BIO_free)> cb(BIO_new_mem_buf(id->cert_pem.data(), static_cast<int>(id->cert_pem.size())), BIO_free);
      std::unique_ptr<BIO, decltype(&BIO_free)> kb(BIO_new_mem_buf(id->key_pem.data(), static_cast<int>(id->key_pem.size())), BIO_free);
      X509* cert = PEM_read_bio_X509(cb.get(), nullptr, nullptr, nullptr);
      EVP_PKEY* key = PEM_read_bio_PrivateKey(kb.get(), nullptr, nullptr, nullptr);
      open = cert && key && SSL_CTX_use_certificate(ctx.get(), cert) == 1 && SSL_CTX_use_PrivateKey(ctx.get(), key) == 1;
      X509_free(cert);
      EVP_PKEY_free(key);
    }
    if (open) ssl.reset(SSL_new(ctx.get()));
    open = ssl && SSL_set_fd(ssl.get(), fd) == 1;
    if (open && SSL_connect(ssl.get()) != 1) {
      open = false;
      if (revoked_alert()) out = ConnectOutcome::revoked;
    }
  }
  if (open && send_all(packet.data(), packet.size())) {
    size_t got = 0;
    while (got < sizeof ack) {
      const ssize_t n = recv_some(ack + got, sizeof ack - got);
      if (n <= 0) break;
      got += static_cast<size_t>(n);
    }
    if (got == sizeof ack && ack[0] == 0x20) {
      out = ack[3] == 0 ? ConnectOutcome::accepted : ConnectOutcome::refused;
      if (out == ConnectOutcome::accepted) {
        const char disconnect[2] = {static_cast<char>(0xE0), 0};
        (void)send_all(disconnect, sizeof disconnect);
      }
    } else if (ssl && revoked_alert()) {
      out = ConnectOutcome::revoked;
    }
  }
  if (ssl) (void)SSL_shutdown(ssl.get());
  ERR_clear_error();
  ssl.reset();
  ::close(fd);
  return out;
}

}  // namespace

// The probe account on the listener that takes passwords.
bool EmbeddedBroker::probe_login() const {
  const bool tls = cfg_.auth == BrokerAuth::password ? cfg_.tls() : legacy_tls_;
  return mqtt_connect_once(cfg_.listen_host, password_port(), tls, nullptr,
                           mqtt_connect_packet(kReloadProbeUser, kReloadProbeUser, probe_password_)) ==
         ConnectOutcome::accepted;
}

Status EmbeddedBroker::reload_until(const std::function<bool()>& done, const std::string& what) {
  // mosquitto clears its reload flag only after reloading, so a SIGHUP that
  // lands during a reload is lost (a burst of enrollments did that). Send
  // it again until the probe proves the new file is in force.
  const auto start = std::chrono::steady_clock::now();
  const auto deadline = start + cfg_.reload_timeout;
  auto next_signal = start;
  for (;;) {
    const auto now = std::chrono::steady_clock::now();
    if (now >= next_signal) {
      if (!child_.signal(SIGHUP)) return make_error(Errc::unavailable, "broker is not running", true);
      ++reloads_;
      next_signal = now + std::chrono::milliseconds(500);
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    if (done()) return {};
    if (std::chrono::steady_clock::now() >= deadline) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return make_error(Errc::unavailable,
                    "mosquitto did not load the new " + what + " within " + std::to_string(cfg_.reload_timeout.count()) +
                        " ms (see " + (cfg_.dir / "mosquitto.log").string() + ")",
                    true);
}

Status EmbeddedBroker::set_device_credentials(const Credentials& devices) {
  std::lock_guard lock(mu_);
  if (cfg_.auth == BrokerAuth::certificate && legacy_port_ == 0) {
    // No listener takes passwords: nothing to write, nothing to reload.
    return {};
  }
  if (auto s = write_passwords(devices); !s) return s;
  return reload_until([this] { return probe_login(); }, "password file");
}

Status EmbeddedBroker::set_crl(const std::string& crl_pem, const ClientIdentity& probe) {
  std::lock_guard lock(mu_);
  if (cfg_.auth != BrokerAuth::certificate) return {};
  auto tls = open_subdir(dir_fd_, "tls", 0700);
  if (!tls) return tls.error();
  if (auto s = write_broker_file(tls->get(), "crl.pem", crl_pem); !s) return s;
  const std::string packet = mqtt_connect_packet("flotilla-crl-probe", "", "");
  return reload_until(
      [&] {
        return mqtt_connect_once(cfg_.listen_host, cfg_.port, true, &probe, packet) == ConnectOutcome::revoked;
      },
      "revocation list");
}

Status EmbeddedBroker::take_over_session(const ClientIdentity& who) {
  if (cfg_.auth != BrokerAuth::certificate) return {};
  // Clean session, no user name (the certificate names the client): the
  // broker replaces the client's connection and forgets its session.
  mqtt::ConnectFields f;
  f.client_id = "flotilla-takeover";
  f.keepalive_s = 5;
  const std::string packet = mqtt::encode_connect(f);
  const auto outcome = mqtt_connect_once(cfg_.listen_host, cfg_.port, true, &who, packet);
  if (outcome != ConnectOutcome::accepted) {
    return make_error(Errc::unavailable, "the broker did not take the session over", true);
  }
  return {};
}

Status EmbeddedBroker::launch() {
  stop_stale();
  // The log is the hub's file (mosquitto only writes to the descriptor it
  // inherits): opened here without following a link, and replaced if it is
  // not a plain file of the hub's own.
  UniqueFd log_fd;
  for (int attempt = 0; attempt < 2 && log_fd.get() < 0; ++attempt) {
    UniqueFd fd(::openat(dir_fd_, "mosquitto.log", O_WRONLY | O_CREAT | O_APPEND | O_NOFOLLOW | O_CLOEXEC, 0600));
    struct stat st {};
    if (fd.get() >= 0 && ::fstat(fd.get(), &st) == 0 && S_ISREG(st.st_mode) && st.st_uid == ::geteuid() &&
        st.st_nlink == 1) {
      log_fd = std::move(fd);
    } else {
      log::get("hub")->warn("{}/mosquitto.log is not a plain file of the hub's; replacing it", cfg_.dir.string());
      remove_at(dir_fd_, "mosquitto.log");
    }
  }
  if (log_fd.get() < 0) return sys_error("open", (cfg_.dir / "mosquitto.log").string());
  proc::SpawnOptions so;
  so.argv = {cfg_.mosquitto_bin, "-c", (cfg_.dir / "mosquitto.conf").string()};
  // If the hub is killed outright, its broker goes with it.
  so.die_with_parent = true;
  so.stdout_fd = log_fd.get();
  so.stderr_path = "stdout";
  auto child = proc::spawn(so);
  log_fd.reset();
  if (!child) {
    return child.error().with_context("start mosquitto (install it with apt-get install mosquitto, or pass "
                                      "--broker-url to use an external broker)");
  }
  child_ = std::move(*child);
  bool up = false;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (!up && !child_.poll() && std::chrono::steady_clock::now() < deadline) {
    up = wait_for_port(cfg_.listen_host, cfg_.port, std::chrono::milliseconds(100));
  }
  if (!up || child_.poll()) {
    std::string tail;
    if (UniqueFd fd(::openat(dir_fd_, "mosquitto.log", O_RDONLY | O_NOFOLLOW | O_CLOEXEC)); fd.get() >= 0) {
      struct stat st {};
      if (::fstat(fd.get(), &st) == 0 && S_ISREG(st.st_mode)) {
        tail.resize(static_cast<size_t>(std::min<off_t>(st.st_size, 600)));
        const ssize_t n = ::pread(fd.get(), tail.data(), tail.size(), st.st_size - static_cast<off_t>(tail.size()));
        tail.resize(n > 0 ? static_cast<size_t>(n) : 0);
      }
    }
    child_.kill_now();
    return make_error(Errc::unavailable, "mosquitto did not start listening on " + url() + "; its log ends: " + tail);
  }
  (void)write_at(dir_fd_, "mosquitto.pid", std::to_string(child_.pid()), 0600);
  running_ = true;
  log::get("hub")->info("embedded broker started url={} pid={}", url(), child_.pid());
  return {};
}

void EmbeddedBroker::stop_stale() {
  // A broker left behind by a hub that was killed before PDEATHSIG could act
  // (or by an older hub) would hold the port with stale credentials.
  auto text = read_own_file(dir_fd_, cfg_.dir, "mosquitto.pid", 64);
  if (!text) return;
  pid_t pid = 0;
  try {
    pid = static_cast<pid_t>(std::stol(*text));
  } catch (const std::exception&) {
    return;
  }
  if (pid <= 0 || !proc::alive(pid) || pid == child_.pid()) return;
  auto cmdline = fs::read_file("/proc/" + std::to_string(pid) + "/cmdline", 4096).value_or("");
  if (cmdline.find((cfg_.dir / "mosquitto.conf").string()) == std::string::npos) return;
  log::get("hub")->warn("stopping a stale embedded broker pid={} left by an earlier hub", pid);
  proc::Child stale(pid);
  stale.terminate(std::chrono::seconds(5));
}

void EmbeddedBroker::watchdog() {
  auto logger = log::get("hub");
  auto delay = std::chrono::milliseconds(250);
  while (!stopping_) {
    std::this_thread::sleep_for(delay);
    std::lock_guard lock(mu_);
    if (stopping_) break;
    if (auto code = child_.poll()) {
      running_ = false;
      logger->error("embedded broker exited code={}; restarting", *code);
      ++restarts_;
      if (auto s = launch(); !s) {
        logger->error("broker restart failed: {}", s.error().message);
        delay = std::min(delay * 2, std::chrono::milliseconds(10000));
        continue;
      }
    }
    delay = std::chrono::milliseconds(250);
  }
}

void EmbeddedBroker::stop() {
  if (stopping_.exchange(true)) return;
  if (watchdog_.joinable()) watchdog_.join();
  std::lock_guard lock(mu_);
  child_.terminate(std::chrono::milliseconds(5000));
}

}  // namespace flotilla::hub

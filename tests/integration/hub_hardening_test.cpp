// The hub against attacks from below: a root hub and the directory its
// broker's user could once write, and devices that send more than any
// legitimate message. Real flotilla-hub, real mosquitto, real agents.
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <grp.h>
#include <pwd.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fstream>
#include <functional>
#include <set>

#include "flotilla/common/fs.hpp"
#include "flotilla/common/transport.hpp"
#include "flotilla/hub/broker.hpp"
#include "tests/support/harness.hpp"

using namespace flotilla;
using namespace flotilla::test;

namespace {

// Runs f in a child process as the broker's user (as mosquitto would run
// code planted in it); returns f's result, or -1 if the child could not
// take that identity.
int as_broker_user(const std::function<int()>& f) {
  const passwd* pw = ::getpwnam("mosquitto");
  if (!pw) return -1;
  const uid_t uid = pw->pw_uid;
  const gid_t gid = pw->pw_gid;
  const pid_t pid = ::fork();
  if (pid < 0) return -1;
  if (pid == 0) {
    if (::setgroups(0, nullptr) != 0 || ::setgid(gid) != 0 || ::setuid(uid) != 0) _exit(255);
    _exit(f());
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

struct Owner {
  uid_t uid = 0;
  gid_t gid = 0;
  mode_t mode = 0;
  std::string content;
  bool operator==(const Owner&) const = default;
};

Owner owner_of(const stdfs::path& p) {
  struct stat st {};
  REQUIRE(::lstat(p.c_str(), &st) == 0);
  return {st.st_uid, st.st_gid, st.st_mode & 07777, S_ISREG(st.st_mode) ? fs::read_file(p).value_or("?") : ""};
}

uid_t process_uid(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("Uid:", 0) == 0) return static_cast<uid_t>(std::stoul(line.substr(4)));
  }
  return static_cast<uid_t>(-1);
}

void wait_online(Hub& hub, const test::Agent& a) {
  const bool ok = wait_until(
      [&] {
        try {
          return hub.device(a.device_id())["online"] == true;
        } catch (const std::exception&) {
          return false;
        }
      },
      std::chrono::seconds(60));
  if (!ok) FAIL("agent did not come online; hub log:\n" << hub.log() << "\nagent log:\n" << a.log());
}

}  // namespace

TEST_CASE("a root hub follows no link the broker's user planted and keeps the broker's directory its own",
          "[integration][security]") {
  if (::geteuid() != 0 || !::getpwnam("mosquitto")) {
    WARN("needs root and a mosquitto user: skipped");
    return;
  }
  const passwd* pw = ::getpwnam("mosquitto");
  const uid_t broker_uid = pw->pw_uid;
  const gid_t broker_gid = pw->pw_gid;
  TempDir tmp;
  // Root's own files the attack aims at: a secret, and a directory in which
  // a log must not appear.
  const stdfs::path vault = tmp.path() / "vault";
  stdfs::create_directories(vault);
  ::chmod(vault.c_str(), 0700);
  REQUIRE(fs::write_file_atomic(vault / "secret", "TOPSECRET", 0600));
  const Owner secret_before = owner_of(vault / "secret");

  // The layout an older hub left: broker/ owned by the broker's user, who
  // replaced the hub's files with links into root's vault.
  const stdfs::path data = tmp.path() / "hub";
  stdfs::create_directories(data / "broker");
  ::chmod(data.c_str(), 0711);
  REQUIRE(::chown((data / "broker").c_str(), broker_uid, broker_gid) == 0);
  const std::vector<std::pair<std::string, stdfs::path>> planted = {
      {"mosquitto.log", vault / "created.log"}, {"passwd.new", vault / "secret"}, {"passwd", vault / "secret"},
      {"mosquitto.conf", vault / "secret"},     {"acl", vault / "secret"},        {"hub.secret", vault / "secret"},
      {"mosquitto.pid", vault / "secret"},      {"mosquitto.db", vault / "secret"}, {"tls", vault}};
  std::vector<std::pair<std::string, std::string>> links;  // made before fork: the child only makes system calls
  for (const auto& [name, target] : planted) links.emplace_back(target.string(), (data / "broker" / name).string());
  REQUIRE(as_broker_user([&] {
            for (const auto& [target, link] : links) {
              if (::symlink(target.c_str(), link.c_str()) != 0) return 1;
            }
            return 0;
          }) == 0);

  Hub hub(data);
  hub.start();
  const auto release = bundles::generate_key();
  AgentOptions o;
  o.root_keys = {bundles::public_key_text(release.pub)};
  auto agent = std::make_unique<test::Agent>(tmp.path() / "dev", hub.url(), hub.enrollment_token({{"env", "it"}}, 1), o);
  agent->start();
  // Enrolling rewrote passwd and mosquitto, as its own user, reloaded it.
  wait_online(hub, *agent);

  // Nothing of root's was touched: not chowned, not written, no log created.
  CHECK(owner_of(vault / "secret") == secret_before);
  CHECK_FALSE(stdfs::exists(vault / "created.log"));
  std::set<std::string> in_vault;
  for (const auto& e : stdfs::directory_iterator(vault)) in_vault.insert(e.path().filename().string());
  CHECK(in_vault == std::set<std::string>{"secret"});

  // The directory is the hub's again, and nothing in it is a link.
  const stdfs::path broker = data / "broker";
  const Owner dir = owner_of(broker);
  CHECK(dir.uid == 0);
  CHECK(dir.gid == broker_gid);
  CHECK(dir.mode == 0710);
  for (const auto& e : stdfs::directory_iterator(broker)) {
    INFO(e.path());
    CHECK_FALSE(e.is_symlink());
  }
  for (const char* name : {"mosquitto.conf", "acl", "passwd"}) {
    INFO(name);
    const Owner f = owner_of(broker / name);
    CHECK(f.uid == 0);
    CHECK(f.gid == broker_gid);
    CHECK(f.mode == 0640);
  }
  for (const char* name : {"hub.secret", "port", "mosquitto.pid", "mosquitto.log"}) {
    INFO(name);
    const Owner f = owner_of(broker / name);
    CHECK(f.uid == 0);
    CHECK(f.mode == 0600);
  }
  CHECK(owner_of(broker / "hub.secret").content != "TOPSECRET");
  CHECK(owner_of(broker / "state").uid == broker_uid);

  // mosquitto runs as its own user, and that user may write only state/.
  const pid_t mosquitto_pid = static_cast<pid_t>(std::stol(fs::read_file(broker / "mosquitto.pid").value()));
  CHECK(process_uid(mosquitto_pid) == broker_uid);
  const std::string in_broker = (broker / "planted").string(), in_state = (broker / "state" / "own").string();
  const std::string secret = (vault / "secret").string(), state_link = (broker / "state" / "mosquitto.db.new").string();
  CHECK(as_broker_user([&] {
          const bool denied = ::open(in_broker.c_str(), O_WRONLY | O_CREAT | O_EXCL, 0600) < 0 && errno == EACCES;
          const int fd = ::open(in_state.c_str(), O_WRONLY | O_CREAT | O_EXCL, 0600);
          const bool own = fd >= 0;
          if (fd >= 0) ::close(fd);
          // A link in its own directory is all it can still plant.
          const bool linked = ::symlink(secret.c_str(), state_link.c_str()) == 0;
          return denied && own && linked ? 0 : 1;
        }) == 0);

  // A restart reads the hub's own files again and touches nothing through
  // the new link; the device comes back on the same broker port.
  const std::string port = fs::read_file(broker / "port").value();
  hub.stop();
  hub.start();
  CHECK(fs::read_file(broker / "port").value() == port);
  wait_online(hub, *agent);
  CHECK(owner_of(vault / "secret") == secret_before);
  CHECK_FALSE(stdfs::exists(vault / "created.log"));
}

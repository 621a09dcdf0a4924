// flotilla-sim's k3d backend, tested without Docker: a missing docker/k3d is
// reported plainly, and with FAKE docker and k3d scripts on PATH (they only
// log their arguments) the backend runs the commands it should, installs the
// k3s shim per cluster, starts one real agent per cluster and cleans up.
#include <catch2/catch.hpp>

#include <signal.h>

#include <fstream>

#include "flotilla/bundles/keys.hpp"
#include "flotilla/common/fs.hpp"
#include "flotilla/common/process.hpp"
#include "tests/support/harness.hpp"

using namespace flotilla;
using namespace flotilla::test;

namespace {

void write_fake(const stdfs::path& dir, const std::string& name, const stdfs::path& log) {
  std::ofstream f(dir / name);
  f << "#!/bin/sh\n"
       "# FAKE " << name << " for flotilla tests: logs its arguments and pretends to succeed.\n"
       "echo \"" << name << " $*\" >> " << log.string() << "\n"
       "case \"$1\" in info) echo 27.0.0 ;; esac\n"
       "exit 0\n";
  f.close();
  stdfs::permissions(dir / name, stdfs::perms::owner_all);
}

std::vector<std::string> k3d_args(const stdfs::path& out) {
  return {bin_dir() + "/flotilla-sim", "k3d", "--clusters", "2", "--hub", "http://127.0.0.1:9",
          "--enrollment-token", "flt_enr_test", "--root-key",
          bundles::public_key_text(bundles::generate_key().pub), "--out", out.string()};
}

}  // namespace

TEST_CASE("flotilla-sim k3d says plainly that Docker and k3d are missing", "[integration][sim]") {
  TempDir tmp;
  stdfs::create_directories(tmp.path() / "empty-bin");
  proc::SpawnOptions so;
  so.argv = k3d_args(tmp.path() / "out");
  so.env_set = {{"PATH", (tmp.path() / "empty-bin").string()}};
  so.stdout_path = (tmp.path() / "out.log").string();
  so.stderr_path = "stdout";
  auto c = proc::spawn(so);
  REQUIRE(c);
  auto code = c->wait_for(std::chrono::seconds(30));
  REQUIRE(code);
  CHECK(*code == 3);
  const std::string out = fs::read_file(tmp.path() / "out.log").value_or("");
  INFO(out);
  CHECK(out.find("docker is not installed") != std::string::npos);
  CHECK(out.find("k3d is not installed") != std::string::npos);
  CHECK(out.find("https://k3d.io") != std::string::npos);
  CHECK_FALSE(stdfs::exists(tmp.path() / "out"));
}

TEST_CASE("flotilla-sim k3d drives k3d and one agent per cluster (fake k3d and docker)", "[integration][sim]") {
  TempDir tmp;
  const auto bin = tmp.path() / "fake-bin";
  const auto log = tmp.path() / "fake-calls.log";
  stdfs::create_directories(bin);
  write_fake(bin, "docker", log);
  write_fake(bin, "k3d", log);
  const auto out = tmp.path() / "out";
  proc::SpawnOptions so;
  so.argv = k3d_args(out);
  so.env_set = {{"PATH", bin.string() + ":/usr/bin:/bin"}};
  so.stdout_path = (tmp.path() / "sim.log").string();
  so.stderr_path = "stdout";
  auto c = proc::spawn(so);
  REQUIRE(c);
  // A failed REQUIRE below must not leave the backend and its agents running.
  struct Reap {
    proc::Child& child;
    ~Reap() {
      if (!child.poll()) child.terminate(std::chrono::seconds(10));
    }
  } reap{*c};
  const bool up = wait_until(
      [&] { return fs::read_file(tmp.path() / "sim.log").value_or("").find("2 clusters up") != std::string::npos; },
      std::chrono::seconds(30));
  INFO(fs::read_file(tmp.path() / "sim.log").value_or(""));
  REQUIRE(up);
  const std::string calls = fs::read_file(log).value_or("");
  INFO(calls);
  CHECK(calls.find("docker info") != std::string::npos);
  CHECK(calls.find("k3d cluster create flotilla-sim-0 --servers 1 --agents 0 --no-lb --wait") != std::string::npos);
  CHECK(calls.find("k3d cluster create flotilla-sim-1 ") != std::string::npos);
  // Each cluster has its agent root with the shim in place of k3s.
  for (int i = 0; i < 2; ++i) {
    const auto shim = out / ("flotilla-sim-" + std::to_string(i)) / "usr/local/bin/k3s";
    REQUIRE(stdfs::exists(shim));
    CHECK(fs::read_file(shim).value_or("").find("k3d-flotilla-sim-" + std::to_string(i) + "-server-0") !=
          std::string::npos);
  }
  // The shim forwards k3s's surface into the server container.
  auto v = proc::run({"/bin/sh", "-c", "PATH=" + bin.string() + ":/usr/bin:/bin " +
                                           (out / "flotilla-sim-0/usr/local/bin/k3s").string() + " --version"},
                     std::chrono::seconds(10));
  REQUIRE(v);
  CHECK(v->exit_code == 0);
  CHECK(fs::read_file(log).value_or("").find("docker exec k3d-flotilla-sim-0-server-0 k3s --version") !=
        std::string::npos);
  // A real agent runs per cluster (it retries enrolling with the unreachable hub).
  CHECK(wait_until([&] { return stdfs::exists(out / "flotilla-sim-1.agent.log"); }, std::chrono::seconds(10)));

  c->signal(SIGTERM);
  auto code = c->wait_for(std::chrono::seconds(30));
  REQUIRE(code);
  CHECK(*code == 0);
  const std::string after = fs::read_file(log).value_or("");
  CHECK(after.find("k3d cluster delete flotilla-sim-0") != std::string::npos);
  CHECK(after.find("k3d cluster delete flotilla-sim-1") != std::string::npos);
}

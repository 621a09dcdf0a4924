#pragma once
// Runs flotilla-sim (self-contained: it starts its own flotilla-hub with the
// embedded mosquitto) and reads back its report.
#include <signal.h>

#include <map>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "flotilla/common/fs.hpp"
#include "flotilla/common/process.hpp"
#include "tests/support/harness.hpp"

namespace flotilla::test {

struct SimRun {
  int exit_code = -1;
  std::string out, err;
  json report;
  std::string html;
};

inline SimRun run_sim(const stdfs::path& out, const std::vector<std::string>& args) {
  std::vector<std::string> argv = {bin_dir() + "/flotilla-sim", "run", "--out", out.string(), "--no-progress",
                                   "--timeout", "90s"};
  argv.insert(argv.end(), args.begin(), args.end());
  auto r = proc::run(argv, std::chrono::seconds(180));
  SimRun s;
  if (!r) throw std::runtime_error("flotilla-sim: " + r.error().message);
  s.exit_code = r->exit_code;
  s.out = r->out;
  s.err = r->err;
  if (auto j = fs::read_file(out / "report.json", 64u << 20)) s.report = json::parse(*j, nullptr, false);
  s.html = fs::read_file(out / "report.html", 64u << 20).value_or("");
  return s;
}

// flotilla-sim run --serve-only against a hub: its devices enroll and serve
// campaigns created elsewhere until stop() (SIGTERM) ends it.
struct ServingSim {
  stdfs::path out;
  proc::Child child;
  ServingSim(const stdfs::path& dir, const std::string& hub_url, const std::string& token,
             const std::vector<std::string>& args, const std::map<std::string, std::string>& env = {})
      : out(dir) {
    stdfs::create_directories(out);
    REQUIRE(fs::write_file_atomic(out / "token", token + "\n", 0600));
    proc::SpawnOptions so;
    so.argv = {bin_dir() + "/flotilla-sim", "run", "--serve-only", "--hub", hub_url, "--token-file",
               (out / "token").string(), "--out", out.string(), "--no-progress"};
    so.argv.insert(so.argv.end(), args.begin(), args.end());
    so.env_set = env;
    so.stdout_path = (out / "sim.log").string();
    so.stderr_path = "stdout";
    so.die_with_parent = true;
    auto c = proc::spawn(so);
    REQUIRE(c);
    child = std::move(*c);
  }
  ~ServingSim() {
    if (child.valid()) child.terminate(std::chrono::seconds(10));
  }
  std::string log() const { return fs::read_file(out / "sim.log", 1 << 20).value_or(""); }
  // serving.json once every device is online at the hub (null if the
  // simulator exited first or the deadline passed).
  json wait_serving(std::chrono::seconds timeout) {
    json j;
    wait_until(
        [&] {
          if (auto t = fs::read_file(out / "serving.json", 1 << 16)) j = json::parse(*t, nullptr, false);
          return j.is_object() || child.poll().has_value();
        },
        timeout);
    return j.is_object() ? j : json();
  }
  // SIGTERM; the exit code and report.json.
  std::pair<int, json> stop() {
    child.signal(SIGTERM);
    auto code = child.wait_for(std::chrono::seconds(60));
    json report;
    if (auto t = fs::read_file(out / "report.json", 64u << 20)) report = json::parse(*t, nullptr, false);
    return {code.value_or(-1), report};
  }
};

}  // namespace flotilla::test

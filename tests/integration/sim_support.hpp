#pragma once
// Runs flotilla-sim (self-contained: it starts its own flotilla-hub with the
// embedded mosquitto) and reads back its report.
#include <string>
#include <vector>

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

}  // namespace flotilla::test

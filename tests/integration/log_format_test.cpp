// [integration] --log-format json on the hub (flag) and the agent (config
// key): every line of their logs is one JSON object with a UTC RFC 3339
// time, a level, a logger and a message, and no secret appears in them.
#include <catch2/catch.hpp>

#include <regex>
#include <sstream>

#include "flotilla/bundles/keys.hpp"
#include "flotilla/common/fs.hpp"
#include "tests/support/harness.hpp"

using namespace flotilla;
using namespace flotilla::test;

namespace {

// Parses every line; returns how many there were.
size_t check_json_lines(const std::string& log, const std::string& who) {
  static const std::regex rfc3339_utc(R"(^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$)");
  std::istringstream in(log);
  size_t n = 0;
  for (std::string line; std::getline(in, line);) {
    INFO(who << " line " << n + 1 << ": " << line);
    ++n;
    const json j = json::parse(line, nullptr, false);
    REQUIRE(j.is_object());
    REQUIRE(j.contains("time"));
    CHECK(std::regex_match(j["time"].get<std::string>(), rfc3339_utc));
    CHECK(j["level"].is_string());
    CHECK(j["logger"].is_string());
    CHECK(j["msg"].is_string());
    CHECK(j.size() == 4);
  }
  return n;
}

}  // namespace

TEST_CASE("log-format json: the hub's and the agent's logs are one JSON object per line, without secrets",
          "[integration][logging]") {
  TempDir tmp;
  Hub hub(tmp.path() / "hub");
  hub.start({"--log-format", "json"});
  const std::string enroll_token = hub.enrollment_token({{"env", "log"}});
  const auto release = bundles::generate_key();
  AgentOptions opts;
  opts.root_keys = {bundles::public_key_text(release.pub)};
  Agent agent(tmp.path() / "agent", hub.url(), enroll_token, opts);
  agent.append_config("log-format: json\n");
  agent.start();
  REQUIRE(wait_until([&] { return !agent.device_id().empty(); }, std::chrono::seconds(60)));
  const std::string device = agent.device_id();
  REQUIRE(wait_until([&] { return hub.device(device).value("online", false); }, std::chrono::seconds(60)));
  const std::string admin = hub.admin_token();
  // On mutual TLS the device's broker credential is its private key: the
  // base64 body of the key file it received at enrollment.
  std::string device_key;
  {
    auto pem = fs::read_file(agent.broker_options(hub.broker_url()).key_file);
    REQUIRE(pem);
    std::istringstream lines(*pem);
    for (std::string line; std::getline(lines, line);) {
      if (line.rfind("-----", 0) != 0 && line.size() > device_key.size()) device_key = line;
    }
  }
  agent.stop();
  hub.stop();

  const std::string hub_log = hub.log();
  const std::string agent_log = agent.log();
  CHECK(check_json_lines(hub_log, "hub") > 3);
  CHECK(check_json_lines(agent_log, "agent") > 3);
  // The device's enrollment shows in the hub's log, as a field of a message.
  CHECK(hub_log.find(device) != std::string::npos);
  for (const auto& [name, secret] : {std::pair{"admin token", admin}, std::pair{"enrollment token", enroll_token},
                                     std::pair{"device private key", device_key}}) {
    INFO(name);
    REQUIRE(secret.size() >= 16);
    CHECK(hub_log.find(secret) == std::string::npos);
    CHECK(agent_log.find(secret) == std::string::npos);
  }
}

TEST_CASE("log-format refuses anything but text or json, before starting", "[integration][logging][bad-input]") {
  TempDir tmp;
  for (const auto& args : {std::vector<std::string>{bin_dir() + "/flotilla-hub", "--config", "", "--data-dir",
                                                     (tmp.path() / "hub").string(), "--log-format", "xml"},
                           std::vector<std::string>{"/usr/bin/env", "FLOTILLA_AGENT_LOG_FORMAT=yaml", bin_dir() + "/flotilla-agent",
                                                     "--config", "", "--state-dir", (tmp.path() / "agent").string()}}) {
    auto r = proc::run(args, std::chrono::seconds(30));
    REQUIRE(r);
    INFO(r->err);
    CHECK(r->exit_code == 2);
    CHECK(r->err.find("log-format must be text or json") != std::string::npos);
  }
  // Nothing was created: the setting is checked before the data dir is touched.
  CHECK_FALSE(stdfs::exists(tmp.path() / "hub"));
  CHECK_FALSE(stdfs::exists(tmp.path() / "agent"));
}

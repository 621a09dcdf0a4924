// The cross-built aarch64 agent, run under qemu-user, against the real hub:
// it enrolls, reports arm64 and applies a bundle with the k3s stand-in.
// Hidden from test discovery ([.qemu]); tests/CMakeLists.txt registers it as
// its own CTest test that is SKIPPED (exit 77) only when the aarch64 agent or
// qemu-aarch64-static is missing. scripts/test.sh builds the agent first.
#include <catch2/catch.hpp>

#include <unistd.h>

#include <cstdlib>
#include <fstream>

#include "flotilla/bundles/keys.hpp"
#include "flotilla/common/process.hpp"
#include "tests/support/harness.hpp"

using namespace flotilla;
using namespace flotilla::test;

namespace {

std::string find_qemu() {
  for (const char* dir : {"/usr/bin/", "/usr/local/bin/"}) {
    const std::string p = std::string(dir) + "qemu-aarch64-static";
    if (::access(p.c_str(), X_OK) == 0) return p;
  }
  return "";
}

}  // namespace

TEST_CASE("an aarch64 agent under qemu-user enrolls with the real hub and applies a bundle",
          "[.qemu]") {
  const char* agent_env = std::getenv("FLOTILLA_AARCH64_AGENT");
  const std::string agent = agent_env ? agent_env : "";
  const std::string qemu = find_qemu();
  if (agent.empty() || ::access(agent.c_str(), X_OK) != 0 || qemu.empty()) {
    std::cerr << "SKIP: needs the aarch64 agent (scripts/build-agent-cross.sh aarch64; FLOTILLA_AARCH64_AGENT='"
              << agent << "') and qemu-aarch64-static ('" << qemu << "')\n";
    std::exit(77);
  }
  // The binary really is aarch64, so this is not the host agent by mistake.
  std::ifstream elf(agent, std::ios::binary);
  char head[20] = {0};
  elf.read(head, sizeof head);
  REQUIRE(uint8_t(head[18]) == 183);
  // The same budget as the host's static agent (agent_pipeline_test.cpp, docs/agent.md).
  CHECK(stdfs::file_size(agent) <= (9u << 20));

  TempDir tmp;
  Hub hub(tmp.path() / "hub");
  hub.start();
  const auto release = bundles::generate_key();
  AgentOptions o;
  o.root_keys = {bundles::public_key_text(release.pub)};
  o.labels = {{"board", "rpi4"}};
  o.health_timeout = "30s";  // emulation is slow
  o.binary = agent;
  o.launcher = {qemu};
  Agent dev(tmp.path() / "dev-arm64", hub.url(), hub.enrollment_token({{"env", "qemu"}}, 1, {"board"}), o);
  dev.start();
  INFO(dev.log());
  REQUIRE(wait_until([&] { return !dev.device_id().empty(); }, std::chrono::seconds(120)));
  const std::string id = dev.device_id();
  REQUIRE(wait_until([&] {
    auto d = hub.device(id);
    return d.value("online", false) && d.value("k3s_version", "") != "";
  }, std::chrono::seconds(120)));
  auto d = hub.device(id);
  CHECK(d["arch"] == "arm64");  // uname under qemu-aarch64: the agent believes it is on arm64

  auto b = make_bundle("arm-base", 1, {{v1::FILE_KIND_K3S_CONFIG, "50-arm.yaml", "node-label:\n  - arch=arm64\n"}},
                       {&release});
  auto [status, body] = hub.call("POST", "/v1/bundles", b.bytes, "application/octet-stream");
  REQUIRE((status == 201 || status == 200));
  const std::string id_b = body["id"];
  json c = run_campaign(hub, id_b, "env=qemu", std::chrono::seconds(180));
  INFO(hub.log());
  CHECK(c["state"] == "completed");
  CHECK(c["counts"]["applied"] == 1);
  d = hub.device(id);
  CHECK(d["applied_bundle"] == "arm-base");
  CHECK(d["applied_version"] == 1);
  std::ifstream drop(dev.root() / "etc/rancher/k3s/config.yaml.d/50-arm.yaml");
  CHECK(std::string(std::istreambuf_iterator<char>(drop), {}) == "node-label:\n  - arch=arm64\n");
}

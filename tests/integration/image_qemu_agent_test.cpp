// A cross-built agent (aarch64 or armhf), run under qemu-user, against the
// real hub: it enrolls, reports its arch and applies a bundle with the k3s
// stand-in. Hidden from test discovery ([.qemu]); tests/CMakeLists.txt
// registers it once per arch as its own CTest test (FLOTILLA_CROSS_ARCH,
// FLOTILLA_CROSS_AGENT) that is SKIPPED (exit 77) only when that agent or
// qemu-<arch>-static is missing. scripts/test.sh builds both agents first.
#include <catch2/catch.hpp>

#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <optional>

#include "flotilla/bundles/keys.hpp"
#include "flotilla/common/process.hpp"
#include "tests/support/harness.hpp"

using namespace flotilla;
using namespace flotilla::test;

namespace {

struct CrossArch {
  std::string name;      // as scripts/build-agent-cross.sh names it
  std::string qemu;      // qemu-user binary name
  uint16_t elf_machine;  // e_machine of the agent's ELF header
  uint8_t elf_class;     // 1 = 32-bit, 2 = 64-bit
  std::string reported;  // the arch the agent reports (uname under qemu)
};

std::optional<CrossArch> cross_arch(const std::string& name) {
  if (name == "aarch64") return CrossArch{name, "qemu-aarch64-static", 183, 2, "arm64"};
  if (name == "armhf") return CrossArch{name, "qemu-arm-static", 40, 1, "arm"};
  return std::nullopt;
}

std::string find_program(const std::string& name) {
  for (const char* dir : {"/usr/bin/", "/usr/local/bin/"}) {
    const std::string p = std::string(dir) + name;
    if (::access(p.c_str(), X_OK) == 0) return p;
  }
  return "";
}

std::string env_or_empty(const char* name) {
  const char* v = std::getenv(name);
  return v ? v : "";
}

}  // namespace

TEST_CASE("a cross-built agent under qemu-user enrolls with the real hub and applies a bundle", "[.qemu]") {
  const std::string arch_name = env_or_empty("FLOTILLA_CROSS_ARCH");
  const auto arch = cross_arch(arch_name);
  INFO("FLOTILLA_CROSS_ARCH must be aarch64 or armhf, got '" << arch_name << "'");
  REQUIRE(arch.has_value());
  const std::string agent = env_or_empty("FLOTILLA_CROSS_AGENT");
  const std::string qemu = find_program(arch->qemu);
  if (agent.empty() || ::access(agent.c_str(), X_OK) != 0 || qemu.empty()) {
    std::cerr << "SKIP: needs the " << arch->name << " agent (scripts/build-agent-cross.sh " << arch->name
              << "; FLOTILLA_CROSS_AGENT='" << agent << "') and " << arch->qemu << " ('" << qemu << "')\n";
    std::exit(77);
  }
  // The binary really is for that arch, so this is not the host agent by mistake.
  std::ifstream elf(agent, std::ios::binary);
  unsigned char head[20] = {0};
  elf.read(reinterpret_cast<char*>(head), sizeof head);
  REQUIRE(head[4] == arch->elf_class);
  REQUIRE(uint16_t(head[18] | (head[19] << 8)) == arch->elf_machine);
  // The same budget as the host's static agent (agent_pipeline_test.cpp,
  // docs/images.md): 8 MiB stripped, on the same minimal OpenSSL.
  CHECK(stdfs::file_size(agent) <= (8u << 20));

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
  Agent dev(tmp.path() / ("dev-" + arch->name), hub.url(), hub.enrollment_token({{"env", "qemu"}}, 1, {"board"}), o);
  dev.start();
  INFO(dev.log());
  REQUIRE(wait_until([&] { return !dev.device_id().empty(); }, std::chrono::seconds(120)));
  const std::string id = dev.device_id();
  REQUIRE(wait_until([&] {
    auto d = hub.device(id);
    return d.value("online", false) && d.value("k3s_version", "") != "";
  }, std::chrono::seconds(120)));
  auto d = hub.device(id);
  CHECK(d["arch"] == arch->reported);  // uname under qemu-user: the agent believes it is on that arch

  auto b = make_bundle("arm-base", 1, {{v1::FILE_KIND_K3S_CONFIG, "50-arm.yaml", "node-label:\n  - arch=" + arch->reported + "\n"}},
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
  CHECK(std::string(std::istreambuf_iterator<char>(drop), {}) == "node-label:\n  - arch=" + arch->reported + "\n");
}

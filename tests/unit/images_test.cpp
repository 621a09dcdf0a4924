// images/ building blocks without any image: ELF architecture, symlinks
// resolved inside an image, MBR tables (GPT is covered with real sfdisk
// images in tests/integration/image_inject_test.cpp).
#include <catch2/catch.hpp>

#include <map>

#include "images/src/image_fs.hpp"

using namespace flotilla;
using namespace flotilla::images;

namespace {

std::string elf(bool is64, unsigned machine, uint32_t flags = 0) {
  std::string h(64, '\0');
  h.replace(0, 4, "\x7f" "ELF");
  h[4] = is64 ? 2 : 1;
  h[5] = 1;
  h[18] = char(machine & 0xFF);
  h[19] = char(machine >> 8);
  if (!is64) {
    for (int i = 0; i < 4; ++i) h[size_t(36 + i)] = char((flags >> (8 * i)) & 0xFF);
  }
  return h;
}

void put32(std::string& b, size_t at, uint32_t v) {
  for (int i = 0; i < 4; ++i) b[at + size_t(i)] = char((v >> (8 * i)) & 0xFF);
}

void mbr_entry(std::string& b, size_t base, int slot, uint8_t type, uint32_t start, uint32_t sectors) {
  const size_t at = base + 446 + 16 * size_t(slot);
  b[at + 4] = char(type);
  put32(b, at + 8, start);
  put32(b, at + 12, sectors);
  b[base + 510] = char(0x55);
  b[base + 511] = char(0xAA);
}

auto reader(const std::string& disk) {
  return [&disk](uint64_t off, size_t n) -> Result<std::string> {
    if (off + n > disk.size()) return make_error(Errc::parse, "past end");
    return disk.substr(off, n);
  };
}

}  // namespace

TEST_CASE("elf_arch names x86_64, aarch64 and armhf and refuses the rest", "[unit][image]") {
  CHECK(*elf_arch(elf(true, 62)) == Arch::amd64);
  CHECK(*elf_arch(elf(true, 183)) == Arch::arm64);
  CHECK(*elf_arch(elf(false, 40, 0x05000400)) == Arch::armhf);
  auto armel = elf_arch(elf(false, 40, 0x05000200));
  REQUIRE_FALSE(armel);
  CHECK(armel.error().message.find("soft-float") != std::string::npos);
  auto riscv = elf_arch(elf(true, 243));
  REQUIRE_FALSE(riscv);
  CHECK(riscv.error().code == Errc::refused);
  CHECK(riscv.error().message.find("machine 243") != std::string::npos);
  CHECK_FALSE(elf_arch("#!/bin/sh\necho hi\n"));
  CHECK_FALSE(elf_arch(elf(true, 62).substr(0, 20)));  // truncated header
}

TEST_CASE("symlinks resolve inside the image, never on the host", "[unit][image]") {
  std::map<std::string, NodeInfo> nodes = {
      {"/bin", {NodeInfo::Kind::symlink, "usr/bin"}},
      {"/lib", {NodeInfo::Kind::symlink, "/usr/lib"}},
      {"/usr", {NodeInfo::Kind::dir, ""}},
      {"/usr/bin", {NodeInfo::Kind::dir, ""}},
      {"/usr/lib", {NodeInfo::Kind::dir, ""}},
      {"/usr/bin/sh", {NodeInfo::Kind::symlink, "busybox"}},
      {"/usr/bin/busybox", {NodeInfo::Kind::file, ""}},
      {"/escape", {NodeInfo::Kind::symlink, "../../../../etc"}},
      {"/loop-a", {NodeInfo::Kind::symlink, "/loop-b"}},
      {"/loop-b", {NodeInfo::Kind::symlink, "loop-a"}},
  };
  LstatFn lstat = [&](const std::string& p) -> Result<NodeInfo> {
    auto it = nodes.find(p);
    return it == nodes.end() ? NodeInfo{} : it->second;
  };
  CHECK(*resolve_in_image("/bin/sh", lstat) == "/usr/bin/busybox");
  CHECK(*resolve_in_image("/lib/systemd/systemd", lstat) == "/usr/lib/systemd/systemd");
  CHECK(*resolve_in_image("/escape/passwd", lstat) == "/etc/passwd");  // .. stops at the image's root
  CHECK(*resolve_in_image("/usr/./bin//sh", lstat) == "/usr/bin/busybox");
  CHECK(*resolve_in_image("/", lstat) == "/");
  auto loop = resolve_in_image("/loop-a/x", lstat);
  REQUIRE_FALSE(loop);
  CHECK(loop.error().message.find("too many symlinks") != std::string::npos);
}

TEST_CASE("MBR tables: primary and logical partitions, and damaged tables refused", "[unit][image]") {
  std::string disk(64u << 20, '\0');
  mbr_entry(disk, 0, 0, 0x0c, 2048, 2048);    // 1: FAT
  mbr_entry(disk, 0, 1, 0x83, 4096, 16384);   // 2: Linux
  mbr_entry(disk, 0, 2, 0x05, 20480, 40960);  // extended
  mbr_entry(disk, 20480u * 512, 0, 0x83, 2048, 8192);  // 5: logical, relative to its EBR
  auto t = read_partition_table(reader(disk), disk.size());
  REQUIRE(t);
  CHECK(t->scheme == "mbr");
  REQUIRE(t->partitions.size() == 3);
  CHECK(t->partitions[0].number == 1);
  CHECK(t->partitions[0].type == "0c");
  CHECK(t->partitions[1].number == 2);
  CHECK(t->partitions[1].offset == 4096u * 512);
  CHECK(t->partitions[1].size == 16384u * 512);
  CHECK(t->partitions[2].number == 5);
  CHECK(t->partitions[2].offset == (20480u + 2048u) * 512);

  std::string outside = disk;
  mbr_entry(outside, 0, 3, 0x83, 200000, 2048);
  auto bad = read_partition_table(reader(outside), outside.size());
  REQUIRE_FALSE(bad);
  CHECK(bad.error().message.find("outside the image") != std::string::npos);

  std::string none(4096, '\0');
  CHECK_FALSE(read_partition_table(reader(none), none.size()));

  std::string protective(1u << 20, '\0');
  mbr_entry(protective, 0, 0, 0xEE, 1, 2047);
  auto nogpt = read_partition_table(reader(protective), protective.size());
  REQUIRE_FALSE(nogpt);
  CHECK(nogpt.error().message.find("GPT") != std::string::npos);
}

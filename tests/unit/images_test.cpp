// images/ building blocks without any image: ELF architecture, symlinks
// resolved inside an image, MBR tables (GPT is covered with real sfdisk
// images in tests/integration/image_inject_test.cpp).
#include <catch2/catch.hpp>

#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <map>

#include "images/src/image_fs.hpp"
#include "tests/support/temp_dir.hpp"

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

namespace {

// A one-file ustar archive, made by hand so the test needs no tar binary.
std::string ustar_one_file(const std::string& name, const std::string& content) {
  std::string h(512, '\0');
  h.replace(0, name.size(), name);
  auto octal = [&h](size_t at, size_t width, uint64_t v) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%0*llo", int(width - 1), static_cast<unsigned long long>(v));
    h.replace(at, width - 1, buf);
  };
  octal(100, 8, 0644);
  octal(108, 8, 0);
  octal(116, 8, 0);
  octal(124, 12, content.size());
  octal(136, 12, 1700000000);
  h[156] = '0';
  h.replace(257, 6, std::string("ustar\0", 6));
  h.replace(263, 2, "00");
  h.replace(148, 8, "        ");
  unsigned sum = 0;
  for (unsigned char c : h) sum += c;
  char chk[8];
  std::snprintf(chk, sizeof chk, "%06o", sum);
  h.replace(148, 7, std::string(chk, 6) + '\0');
  std::string body = content;
  body.resize((content.size() + 511) / 512 * 512, '\0');
  return h + body + std::string(1024, '\0');
}

}  // namespace

TEST_CASE("the temporary tar output is never written through a symlink", "[unit][image]") {
  flotilla::test::TempDir tmp;
  const auto input = tmp.path() / "rootfs.tar";
  std::ofstream(input, std::ios::binary) << ustar_one_file("etc/hostname", "device\n");
  auto idx = index_tar(input);
  REQUIRE(idx);
  Payload p;
  p.mtime = 1700000000;
  Entry e;
  e.path = "/etc/flotilla/agent.yaml";
  e.data = "hub-url: x\n";
  e.size = e.data.size();
  p.entries.push_back(e);

  // Someone who can write where the output goes plants a link to a file of ours.
  const auto victim = tmp.path() / "victim";
  std::ofstream(victim) << "precious\n";
  const auto out = tmp.path() / "out.tar.tmp";
  REQUIRE(::symlink(victim.c_str(), out.c_str()) == 0);
  auto r = write_tar(input, *idx, p, out);
  REQUIRE_FALSE(r);
  CHECK(r.error().message.find(out.string()) != std::string::npos);
  std::ifstream v(victim);
  std::string text((std::istreambuf_iterator<char>(v)), std::istreambuf_iterator<char>());
  CHECK(text == "precious\n");

  // A plain new file: written.
  const auto fresh = tmp.path() / "fresh.tar";
  REQUIRE(write_tar(input, *idx, p, fresh));
  auto again = index_tar(fresh);
  REQUIRE(again);
  CHECK(again->nodes.count("/etc/flotilla/agent.yaml") == 1);
  CHECK(again->nodes.count("/etc/hostname") == 1);
}

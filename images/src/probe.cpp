// Reading an image's own binaries: which architecture it runs, following its
// symlinks (merged /usr, busybox) inside the image, never on the host.
#include <vector>

#include "image_fs.hpp"

namespace flotilla::images {

std::string arch_name(Arch a) {
  switch (a) {
    case Arch::amd64: return "amd64";
    case Arch::arm64: return "arm64";
    case Arch::armhf: return "armhf";
  }
  return "unknown";
}

Result<Arch> elf_arch(std::string_view h) {
  if (h.size() < 52 || h.substr(0, 4) != "\x7f" "ELF") return make_error(Errc::invalid_argument, "not an ELF file");
  const bool is64 = h[4] == 2, little = h[5] == 1;
  if (!little) return make_error(Errc::refused, "a big-endian ELF binary (unsupported)");
  const unsigned machine = uint8_t(h[18]) | unsigned(uint8_t(h[19])) << 8;
  if (machine == 62 && is64) return Arch::amd64;
  if (machine == 183 && is64) return Arch::arm64;
  if (machine == 40 && !is64) {
    const size_t at = 36;  // e_flags in a 32-bit header
    const uint32_t flags = uint8_t(h[at]) | uint32_t(uint8_t(h[at + 1])) << 8 | uint32_t(uint8_t(h[at + 2])) << 16 |
                           uint32_t(uint8_t(h[at + 3])) << 24;
    if (flags & 0x400) return Arch::armhf;  // EF_ARM_ABI_FLOAT_HARD
    return make_error(Errc::refused, "a soft-float 32-bit Arm ELF binary (armel; only armhf is supported)");
  }
  return make_error(Errc::refused, "an ELF binary for machine " + std::to_string(machine) + (is64 ? " (64-bit)" : " (32-bit)") +
                                       " (supported: x86_64, aarch64, armhf)");
}

const std::vector<std::string>& arch_probe_paths() {
  static const std::vector<std::string> paths = {
      "/sbin/init", "/lib/systemd/systemd", "/usr/lib/systemd/systemd", "/bin/sh", "/bin/busybox",
      "/usr/bin/env", "/bin/ls", "/usr/bin/ls"};
  return paths;
}

namespace {
std::vector<std::string> split(const std::string& path) {
  std::vector<std::string> out;
  size_t i = 0;
  while (i < path.size()) {
    size_t j = path.find('/', i);
    if (j == std::string::npos) j = path.size();
    const std::string c = path.substr(i, j - i);
    if (!c.empty() && c != ".") out.push_back(c);
    i = j + 1;
  }
  return out;
}
}  // namespace

Result<std::string> resolve_in_image(const std::string& path, const LstatFn& lstat) {
  std::vector<std::string> components = split(path);
  std::reverse(components.begin(), components.end());  // a stack: back() is the next component
  std::vector<std::string> done;
  int hops = 0;
  while (!components.empty()) {
    const std::string c = components.back();
    components.pop_back();
    if (c == "..") {
      if (!done.empty()) done.pop_back();  // /.. is / in the image too
      continue;
    }
    done.push_back(c);
    std::string cur;
    for (const auto& d : done) cur += "/" + d;
    auto n = lstat(cur);
    if (!n) return n.error();
    if (n->kind != NodeInfo::Kind::symlink) continue;
    if (++hops > 40) return make_error(Errc::refused, "too many symlinks resolving " + path + " in the image");
    done.pop_back();
    if (!n->link_target.empty() && n->link_target.front() == '/') done.clear();
    auto parts = split(n->link_target);
    for (auto it = parts.rbegin(); it != parts.rend(); ++it) components.push_back(*it);
  }
  std::string out;
  for (const auto& d : done) out += "/" + d;
  return out.empty() ? std::string("/") : out;
}

}  // namespace flotilla::images

#pragma once
// `flotilla image inject`: puts the static agent, its configuration and trust
// roots (and optionally k3s and its airgap images) into an existing device OS
// image — a rootfs directory, a rootfs tarball or a raw disk image with an
// ext4 root — without Docker, loop mounts or root (docs/images.md).
#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "flotilla/common/result.hpp"

namespace flotilla::images {

namespace stdfs = std::filesystem;

// Architectures in Debian's names; the agent calls armhf "arm".
enum class Arch { amd64, arm64, armhf };
std::string arch_name(Arch a);

// The architecture an ELF header (at least 64 bytes of the file's start)
// was built for, or an error naming what it is instead.
Result<Arch> elf_arch(std::string_view head);

// What goes into /etc/flotilla/agent.yaml (keys as docs/agent.md names them).
struct AgentSettings {
  std::string hub_url;
  std::string enrollment_token;
  std::vector<std::string> root_keys;  // ed25519:<base64>
  stdfs::path root_keyring;            // host file, copied to /etc/flotilla/root.krg
  unsigned key_threshold = 0;          // 0 = leave the agent's default
  stdfs::path tls_ca_file;             // host file, copied to /etc/flotilla/ca.pem
  // The hub's device CA certificate (public; the hub's ca/device-ca.pem or
  // GET /v1/device-ca), copied to /etc/flotilla/device-ca.pem and pinned as
  // agent.yaml device-ca-file. Only certificates go in: each device makes
  // its own key and gets its own client certificate at enrollment.
  stdfs::path device_ca_file;
  std::map<std::string, std::string> labels;
  std::string director_key;            // ed25519:<base64>: the hub's director key, pinned (agent.yaml director-key)
};

struct InjectOptions {
  stdfs::path input;
  stdfs::path output;       // empty = replace the input (directories are always changed in place)
  std::string partition;    // disk images: partition number (1-based), GPT name or ext4 label; empty = the only ext4 one
  std::vector<stdfs::path> agents;  // static agents; the one built for the image's arch is used
  AgentSettings settings;
  stdfs::path k3s_bundle;                 // optional signed bundle whose k3s binary / airgap images to preload
  std::vector<stdfs::path> artifact_dirs; // where its artifacts are (also <bundle>.artifacts/)
  // With settings.root_keyring, the k3s bundle is verified as the device
  // will: under the signing keyring (signed by the pinned root, or by the
  // last of root_chain, newer roots in ascending order).
  stdfs::path signing_keyring;
  std::vector<stdfs::path> root_chain;
  std::optional<int64_t> source_date;     // timestamps of everything written; default: derived from the input
};

struct InjectedFile {
  std::string path;  // absolute path in the image
  std::string type;  // file, dir, symlink
  uint32_t mode = 0;
  uint64_t size = 0;
  std::string sha256;  // files: of the content; symlinks: of the target text
  std::string target;  // symlinks
};

struct InjectReport {
  std::string format;     // directory, tar, tar.gz, tar.zst, disk-mbr, disk-gpt
  Arch arch = Arch::amd64;
  std::string arch_evidence;  // the image file whose ELF header told the arch
  std::string partition;      // disk images: "2 (rootfs, offset 1048576)"
  int64_t source_date = 0;
  std::vector<InjectedFile> files;  // sorted by path
  stdfs::path output;
  stdfs::path manifest;  // <output>.manifest.json
  std::string output_sha256;  // empty for directories
};

// Does the whole injection. On any refusal nothing at the output (and the
// input) has changed: errors are Errc::invalid_argument (bad options, unknown
// format), Errc::refused (arch mismatch, no ext4 root, no space, no trust root,
// an ext4 filesystem e2fsck finds inconsistent, a k3s bundle the device would
// refuse) or Errc::io.
Result<InjectReport> inject(const InjectOptions& opts);

// The manifest as JSON text (also written next to the output and into the
// image at /etc/flotilla/image-manifest.json, there without output digests).
std::string manifest_json(const InjectReport& r, bool with_output);

}  // namespace flotilla::images

// The injector: detect the input's format, read its architecture from its own
// binaries, build the payload, check space, write a new output beside the
// target and rename it over the target only when complete (docs/images.md).
#include "flotilla/images/inject.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <set>

#include <nlohmann/json.hpp>
#include <yaml-cpp/yaml.h>

#include "flotilla/bundles/bundle.hpp"
#include "flotilla/bundles/keys.hpp"
#include "flotilla/bundles/trust.hpp"
#include "flotilla/common/crypto.hpp"
#include "flotilla/common/encoding.hpp"
#include "flotilla/common/fs.hpp"
#include "flotilla/common/clock.hpp"
#include "flotilla/common/http_client.hpp"
#include "flotilla/images/service_files.hpp"
#include "image_fs.hpp"

namespace flotilla::images {

uint64_t Payload::content_bytes() const {
  uint64_t n = 0;
  for (const auto& e : entries) n += e.size;
  return n;
}

Status stream_content(const Entry& e, const std::function<Status(const char*, size_t)>& put) {
  if (e.source.empty()) return e.data.empty() ? Status() : put(e.data.data(), e.data.size());
  std::ifstream in(e.source, std::ios::binary);
  if (!in) return make_error(Errc::io, "cannot read " + e.source.string());
  std::string buf(1u << 20, '\0');
  uint64_t total = 0;
  while (in) {
    in.read(buf.data(), std::streamsize(buf.size()));
    const auto got = size_t(in.gcount());
    if (got == 0) break;
    total += got;
    if (auto s = put(buf.data(), got); !s) return s;
  }
  if (total != e.size) return make_error(Errc::io, e.source.string() + " changed size while being copied");
  return {};
}

namespace {

// /usr/bin, where the flotilla-agent package puts it too: the unit and OpenRC
// script (packaging/, embedded at build time) are then the very same bytes in
// an injected image and a package install, and installing the package later
// takes the injected agent over in place.
constexpr const char* kAgentPath = "/usr/bin/flotilla-agent";
constexpr const char* kConfigPath = "/etc/flotilla/agent.yaml";
constexpr const char* kKeyringPath = "/etc/flotilla/root.krg";
constexpr const char* kCaPath = "/etc/flotilla/ca.pem";
constexpr const char* kDeviceCaPath = "/etc/flotilla/device-ca.pem";
constexpr const char* kManifestPath = "/etc/flotilla/image-manifest.json";
constexpr const char* kUnitPath = "/etc/systemd/system/flotilla-agent.service";
constexpr const char* kInitPath = "/etc/init.d/flotilla-agent";

Error sys_error(const std::string& what) { return make_error(Errc::io, what + ": " + std::strerror(errno)); }

Result<std::string> file_sha256(const stdfs::path& p, uint64_t* size) {
  std::ifstream in(p, std::ios::binary);
  if (!in) return make_error(Errc::not_found, "cannot read " + p.string());
  crypto::Sha256Stream h;
  std::string buf(1u << 20, '\0');
  uint64_t n = 0;
  while (in) {
    in.read(buf.data(), std::streamsize(buf.size()));
    const auto got = size_t(in.gcount());
    h.update(reinterpret_cast<const uint8_t*>(buf.data()), got);
    n += got;
  }
  if (size) *size = n;
  auto d = h.finish();
  return to_hex(d.data(), d.size());
}

Entry file_entry(std::string path, uint32_t mode, std::string data) {
  Entry e;
  e.type = Entry::Type::file;
  e.path = std::move(path);
  e.mode = mode;
  e.size = data.size();
  e.sha256 = crypto::sha256_hex(data);
  e.data = std::move(data);
  return e;
}

Result<Entry> source_entry(std::string path, uint32_t mode, const stdfs::path& source) {
  Entry e;
  e.type = Entry::Type::file;
  e.path = std::move(path);
  e.mode = mode;
  e.source = source;
  auto h = file_sha256(source, &e.size);
  if (!h) return h.error();
  e.sha256 = *h;
  return e;
}

Entry symlink_entry(std::string path, std::string target) {
  Entry e;
  e.type = Entry::Type::symlink;
  e.path = std::move(path);
  e.mode = 0777;
  e.target = std::move(target);
  e.size = 0;
  e.sha256 = crypto::sha256_hex(e.target);
  return e;
}

Result<std::string> read_head_file(const stdfs::path& p, size_t n) {
  std::ifstream in(p, std::ios::binary);
  if (!in) return make_error(Errc::not_found, "cannot read " + p.string());
  std::string buf(n, '\0');
  in.read(buf.data(), std::streamsize(n));
  buf.resize(size_t(in.gcount()));
  return buf;
}

// --- the image as read before anything is written -------------------------
struct View {
  std::string format;
  LstatFn lstat;
  std::function<Result<std::string>(const std::string&)> head;
  int64_t derived_date = 0;
  // disk images
  uint64_t offset = 0;
  std::string partition;
  std::optional<Ext4Image> ext4;
  TarIndex tar;
};

std::string describe(const Partition& p, const std::string& label) {
  std::string s = std::to_string(p.number);
  std::string names;
  if (!p.name.empty()) names = "name '" + p.name + "'";
  if (!label.empty()) names += std::string(names.empty() ? "" : ", ") + "label '" + label + "'";
  if (!names.empty()) s += " (" + names + ")";
  return s + " at offset " + std::to_string(p.offset);
}

Status open_disk(const stdfs::path& input, const std::string& want, View& v, bool bare_ext) {
  std::error_code ec;
  const uint64_t size = stdfs::file_size(input, ec);
  if (bare_ext) {
    v.format = "ext4";
    v.offset = 0;
    v.partition = "whole image (no partition table)";
  } else {
    std::ifstream in(input, std::ios::binary);
    auto read_at = [&](uint64_t off, size_t n) -> Result<std::string> {
      if (off + n > size) return make_error(Errc::parse, "partition table points past the end of the image");
      std::string b(n, '\0');
      in.seekg(std::streamoff(off));
      in.read(b.data(), std::streamsize(n));
      if (!in) return make_error(Errc::io, "read " + input.string());
      return b;
    };
    auto table = read_partition_table(read_at, size);
    if (!table) return table.error().with_context(input.string());
    v.format = "disk-" + table->scheme;
    // Candidates: the partitions holding an ext2/3/4 superblock.
    std::vector<std::pair<Partition, std::string>> ext;
    std::string all;
    for (const auto& p : table->partitions) {
      std::string label;
      if (looks_like_ext(input, p.offset)) {
        auto img = Ext4Image::open(input, p.offset, false);
        if (img) label = img->probe().label;
        ext.emplace_back(p, label);
      }
      all += (all.empty() ? "" : ", ") + std::to_string(p.number) + (p.name.empty() ? "" : " '" + p.name + "'");
    }
    const Partition* chosen = nullptr;
    std::string chosen_label;
    if (want.empty()) {
      if (ext.size() != 1) {
        std::string list;
        for (const auto& [p, l] : ext) list += (list.empty() ? "" : "; ") + describe(p, l);
        return make_error(ext.empty() ? Errc::refused : Errc::invalid_argument,
                          ext.empty() ? "no ext4 root filesystem in " + input.string() + " (partitions: " +
                                            (all.empty() ? "none" : all) + ")"
                                      : "several ext4 partitions (" + list + "): choose one with --partition");
      }
      chosen = &ext.front().first;
      chosen_label = ext.front().second;
    } else {
      for (const auto& p : table->partitions) {
        if (std::to_string(p.number) == want || (!p.name.empty() && p.name == want)) chosen = &p;
      }
      for (const auto& [p, l] : ext) {
        if (!chosen && !l.empty() && l == want) chosen = &p;
      }
      if (!chosen) {
        return make_error(Errc::invalid_argument,
                          "no partition '" + want + "' (by number, GPT name or ext4 label) in " + input.string() +
                              "; partitions: " + (all.empty() ? "none" : all));
      }
      bool is_ext = false;
      for (const auto& [p, l] : ext) {
        if (p.number == chosen->number) {
          is_ext = true;
          chosen_label = l;
        }
      }
      if (!is_ext) {
        return make_error(Errc::refused, "partition " + want + " of " + input.string() + " holds no ext4 filesystem");
      }
    }
    v.offset = chosen->offset;
    v.partition = describe(*chosen, chosen_label);
  }
  // The image is untrusted: before libext2fs walks (and later writes) its
  // metadata, e2fsck checks all of it, read-only.
  if (auto s = check_ext4(input, v.offset); !s) return s.error().with_context(input.string() + " (" + v.partition + ")");
  auto img = Ext4Image::open(input, v.offset, false);
  if (!img) return img.error().with_context(input.string());
  v.ext4.emplace(std::move(*img));
  v.derived_date = v.ext4->probe().write_time;
  v.lstat = [&v](const std::string& p) { return v.ext4->lstat(p); };
  v.head = [&v](const std::string& p) { return v.ext4->read_head(p, 64); };
  return {};
}

Result<View*> open_view(const stdfs::path& input, const std::string& partition, View& v) {
  std::error_code ec;
  const auto st = stdfs::status(input, ec);
  if (ec || !stdfs::exists(st)) return make_error(Errc::invalid_argument, "input " + input.string() + " does not exist");
  if (stdfs::is_directory(st)) {
    v.format = "directory";
    const stdfs::path root = input;
    v.lstat = [root](const std::string& p) -> Result<NodeInfo> {
      std::error_code e;
      const stdfs::path host = root / p.substr(1);
      const auto s = stdfs::symlink_status(host, e);
      NodeInfo n;
      if (e || !stdfs::exists(s)) return n;
      if (stdfs::is_symlink(s)) {
        n.kind = NodeInfo::Kind::symlink;
        n.link_target = stdfs::read_symlink(host, e).string();
      } else if (stdfs::is_directory(s)) {
        n.kind = NodeInfo::Kind::dir;
      } else if (stdfs::is_regular_file(s)) {
        n.kind = NodeInfo::Kind::file;
      } else {
        n.kind = NodeInfo::Kind::other;
      }
      return n;
    };
    v.head = [root](const std::string& p) { return read_head_file(root / p.substr(1), 64); };
    // The newest mtime in the tree: a date that changes only with the content.
    int64_t newest = 0;
    size_t seen = 0;
    for (auto it = stdfs::recursive_directory_iterator(root, stdfs::directory_options::skip_permission_denied, ec);
         !ec && it != stdfs::recursive_directory_iterator() && ++seen < 5'000'000; it.increment(ec)) {
      struct stat sb {};
      if (::lstat(it->path().c_str(), &sb) == 0) newest = std::max<int64_t>(newest, sb.st_mtime);
    }
    v.derived_date = newest;
    return &v;
  }
  if (!stdfs::is_regular_file(st)) return make_error(Errc::invalid_argument, input.string() + " is neither a file nor a directory");
  auto head = read_head_file(input, 2048);
  if (!head) return head.error();
  const std::string& h = *head;
  const bool gz = h.size() >= 2 && uint8_t(h[0]) == 0x1f && uint8_t(h[1]) == 0x8b;
  const bool zst = h.size() >= 4 && h.compare(0, 4, "\x28\xb5\x2f\xfd") == 0;
  const bool ustar = h.size() >= 262 && h.compare(257, 5, "ustar") == 0;
  if (gz || zst || ustar) {
    auto idx = index_tar(input);
    if (!idx) return idx.error();
    v.tar = std::move(*idx);
    v.format = v.tar.compression.empty() ? "tar" : "tar." + v.tar.compression;
    v.derived_date = v.tar.newest_mtime;
    v.lstat = [&v](const std::string& p) -> Result<NodeInfo> {
      auto it = v.tar.nodes.find(p);
      return it == v.tar.nodes.end() ? NodeInfo{} : it->second;
    };
    v.head = [&v](const std::string& p) -> Result<std::string> {
      auto it = v.tar.heads.find(p);
      if (it == v.tar.heads.end()) return make_error(Errc::not_found, p + " has no content in the tarball");
      return it->second;
    };
    return &v;
  }
  const bool xz = h.compare(0, 6, std::string("\xfd" "7zXZ\0", 6)) == 0, bz2 = h.compare(0, 3, "BZh") == 0;
  if (xz || bz2) {
    return make_error(Errc::invalid_argument, input.string() + " is compressed with " + (xz ? "xz" : "bzip2") +
                                                  ": only uncompressed, gzip and zstd tarballs are supported "
                                                  "(recompress, e.g. xz -dc | zstd)");
  }
  if (h.size() >= 512 && uint8_t(h[510]) == 0x55 && uint8_t(h[511]) == 0xAA) {
    if (auto s = open_disk(input, partition, v, false); !s) return s.error();
    return &v;
  }
  if (looks_like_ext(input, 0)) {
    if (auto s = open_disk(input, partition, v, true); !s) return s.error();
    return &v;
  }
  return make_error(Errc::invalid_argument,
                    "unknown image format: " + input.string() +
                        " is not a directory, a tar/tar.gz/tar.zst rootfs, a raw disk image with an MBR or GPT "
                        "partition table, or an ext4 filesystem image");
}

Result<std::pair<Arch, std::string>> detect_arch(View& v) {
  std::string seen;
  for (const auto& probe : arch_probe_paths()) {
    auto real = resolve_in_image(probe, v.lstat);
    if (!real) continue;
    auto n = v.lstat(*real);
    if (!n || n->kind != NodeInfo::Kind::file) continue;
    auto head = v.head(*real);
    if (!head) continue;
    auto arch = elf_arch(*head);
    const std::string evidence = probe + (*real != probe ? " -> " + *real : "");
    if (arch) return std::make_pair(*arch, evidence);
    if (arch.error().code == Errc::refused) {
      return make_error(Errc::refused, "the image's " + evidence + " is " + arch.error().message);
    }
    seen += (seen.empty() ? "" : ", ") + evidence;
  }
  std::string probes;
  for (const auto& p : arch_probe_paths()) probes += (probes.empty() ? "" : ", ") + p;
  return make_error(Errc::refused, "cannot tell the image's architecture: none of " + probes +
                                       " is an ELF binary in it" + (seen.empty() ? "" : " (not ELF: " + seen + ")"));
}

Result<stdfs::path> pick_agent(const std::vector<stdfs::path>& agents, Arch arch, const std::string& evidence) {
  std::string offered;
  for (const auto& a : agents) {
    auto head = read_head_file(a, 64);
    if (!head) return make_error(Errc::invalid_argument, "agent binary " + a.string() + " cannot be read");
    auto aa = elf_arch(*head);
    if (aa && *aa == arch) return a;
    offered += (offered.empty() ? "" : ", ") + a.string() + " (" + (aa ? arch_name(*aa) : aa.error().message) + ")";
  }
  const std::string cross = arch == Arch::arm64 ? "aarch64" : arch == Arch::armhf ? "armhf" : "";
  return make_error(Errc::refused,
                    "architecture mismatch: the image is " + arch_name(arch) + " (from " + evidence +
                        ") but no agent given is: " + (offered.empty() ? "none given" : offered) +
                        (cross.empty() ? "" : "; build one with scripts/build-agent-cross.sh " + cross +
                                                  " and pass it with --agent"));
}

Status check_settings(const AgentSettings& s) {
  if (s.root_keys.empty() && s.root_keyring.empty()) {
    return make_error(Errc::refused, "missing trust root: pass --root-key ed25519:<base64> (or a public key file) or "
                                     "--root-keyring FILE; the agent refuses every bundle without one");
  }
  for (const auto& k : s.root_keys) {
    if (auto p = bundles::parse_public_key_text(k); !p) return p.error().with_context("root key '" + k + "'");
  }
  if (!s.director_key.empty()) {
    if (auto p = bundles::parse_public_key_text(s.director_key); !p) {
      return p.error().with_context("director key '" + s.director_key + "'");
    }
  }
  if (!s.root_keyring.empty()) {
    auto ring = bundles::read_keyring_file(s.root_keyring);
    if (!ring) return ring.error().with_context("root keyring " + s.root_keyring.string());
    if (auto m = bundles::parse_keyring_manifest(*ring, bundles::KeyringRole::root); !m) {
      return m.error().with_context("root keyring " + s.root_keyring.string());
    }
  }
  if (s.hub_url.empty()) return make_error(Errc::invalid_argument, "--hub-url is required");
  if (auto u = http::parse_url(s.hub_url); !u) return u.error().with_context("hub-url");
  if (s.enrollment_token.empty()) return make_error(Errc::invalid_argument, "--enrollment-token is required");
  if (!s.tls_ca_file.empty() && !stdfs::is_regular_file(s.tls_ca_file)) {
    return make_error(Errc::invalid_argument, "tls CA file " + s.tls_ca_file.string() + " does not exist");
  }
  if (!s.device_ca_file.empty()) {
    // Certificates only: a private key in a shared image would let every
    // copy of it issue device certificates.
    auto pem = fs::read_file(s.device_ca_file, 1 << 20);
    if (!pem) return make_error(Errc::invalid_argument, "device CA file " + s.device_ca_file.string() + " cannot be read");
    if (pem->find("-----BEGIN CERTIFICATE-----") == std::string::npos) {
      return make_error(Errc::invalid_argument, "device CA file " + s.device_ca_file.string() +
                                                    " holds no PEM certificate (the hub's ca/device-ca.pem)");
    }
    if (pem->find("PRIVATE KEY-----") != std::string::npos) {
      return make_error(Errc::invalid_argument, "device CA file " + s.device_ca_file.string() +
                                                    " holds a private key; give the certificate alone (an image is "
                                                    "shared by many devices)");
    }
  }
  return {};
}

std::string agent_yaml(const AgentSettings& s) {
  YAML::Emitter y;
  y << YAML::BeginMap;
  y << YAML::Key << "hub-url" << YAML::Value << YAML::DoubleQuoted << s.hub_url;
  y << YAML::Key << "enrollment-token" << YAML::Value << YAML::DoubleQuoted << s.enrollment_token;
  if (!s.root_keys.empty()) {
    y << YAML::Key << "root-keys" << YAML::Value << YAML::BeginSeq;
    for (const auto& k : s.root_keys) y << YAML::DoubleQuoted << k;
    y << YAML::EndSeq;
  }
  if (!s.root_keyring.empty()) y << YAML::Key << "root-keyring" << YAML::Value << kKeyringPath;
  if (s.key_threshold) y << YAML::Key << "key-threshold" << YAML::Value << s.key_threshold;
  if (!s.tls_ca_file.empty()) y << YAML::Key << "tls-ca-file" << YAML::Value << kCaPath;
  if (!s.device_ca_file.empty()) y << YAML::Key << "device-ca-file" << YAML::Value << kDeviceCaPath;
  if (!s.director_key.empty()) y << YAML::Key << "director-key" << YAML::Value << YAML::DoubleQuoted << s.director_key;
  if (!s.labels.empty()) {
    y << YAML::Key << "labels" << YAML::Value << YAML::BeginMap;
    for (const auto& [k, v] : s.labels) y << YAML::Key << k << YAML::Value << YAML::DoubleQuoted << v;
    y << YAML::EndMap;
  }
  y << YAML::EndMap;
  return "# Written by `flotilla image inject`; every key is described in docs/agent.md.\n" + std::string(y.c_str()) + "\n";
}

// The bundle checked exactly as the device with these trust roots will check
// it: signatures (threshold, revoked and expired keys), expiry and arch,
// under the root keyring's chain when the image pins one (the device then
// uses it instead of root keys), else under the pinned root keys. There is no
// path that skips this: an unverified bundle never goes into an image.
Result<v1::BundleManifest> verify_for_device(const InjectOptions& o, const v1::SignedBundle& b, Arch arch) {
  bundles::VerifyPolicy pol;
  pol.arch = arch == Arch::armhf ? "arm" : arch_name(arch);
  const std::string what = "k3s bundle " + o.k3s_bundle.string();
  bundles::Verdict verdict;
  if (!o.settings.root_keyring.empty()) {
    if (o.signing_keyring.empty()) {
      return make_error(Errc::invalid_argument,
                        what + ": with --root-keyring the bundle is checked under a signing keyring, as the device "
                               "will: pass --signing-keyring FILE (and --root-chain FILE for each newer root)");
    }
    auto root = bundles::read_keyring_file(o.settings.root_keyring);
    if (!root) return root.error().with_context("root keyring");
    auto store = bundles::TrustStore::pin(*root);
    if (!store) return store.error().with_context("root keyring " + o.settings.root_keyring.string());
    v1::Trust trust;
    for (const auto& p : o.root_chain) {
      auto r = bundles::read_keyring_file(p);
      if (!r) return r.error().with_context("--root-chain");
      *trust.add_roots() = *r;
    }
    auto signing = bundles::read_keyring_file(o.signing_keyring);
    if (!signing) return signing.error().with_context("--signing-keyring");
    *trust.mutable_signing() = *signing;
    if (auto tv = store->update(trust, SystemClock::instance()); !tv.ok()) {
      return make_error(Errc::refused, what + ": the signing keyring would be refused by the device (" +
                                           v1::Reason_Name(tv.reason) + "): " + tv.message);
    }
    verdict = store->verify(b, pol);
  } else {
    bundles::Keyring ring;
    ring.threshold = o.settings.key_threshold ? o.settings.key_threshold : 1;
    for (const auto& k : o.settings.root_keys) ring.add(*bundles::parse_public_key_text(k));
    verdict = bundles::verify(b, ring, pol);
  }
  if (!verdict.ok()) {
    return make_error(Errc::refused, what + " would be refused by the device (" + v1::Reason_Name(verdict.reason) +
                                         "): " + verdict.message);
  }
  return verdict.manifest;
}

// The k3s binary and airgap images of a signed bundle, checked against its
// verified manifest.
Status add_bundle_artifacts(const InjectOptions& o, Arch arch, std::vector<Entry>& out) {
  auto b = bundles::read_bundle_file(o.k3s_bundle);
  if (!b) return b.error().with_context("k3s bundle");
  auto verified = verify_for_device(o, *b, arch);
  if (!verified) return verified.error();
  const v1::BundleManifest& m = *verified;
  std::vector<stdfs::path> search = o.artifact_dirs;
  search.push_back(o.k3s_bundle.string() + ".artifacts");
  int found = 0;
  for (const auto& a : m.artifacts()) {
    std::string dest;
    uint32_t mode = 0644;
    if (a.kind() == v1::ARTIFACT_KIND_K3S_BINARY) {
      dest = "/usr/local/bin/k3s";
      mode = 0755;
    } else if (a.kind() == v1::ARTIFACT_KIND_AIRGAP_IMAGES && bundles::valid_file_name(a.name())) {
      dest = "/var/lib/rancher/k3s/agent/images/" + a.name();
    } else {
      continue;
    }
    const std::string hex = to_hex(reinterpret_cast<const uint8_t*>(a.sha256().data()), a.sha256().size());
    std::optional<stdfs::path> src;
    for (const auto& d : search) {
      for (const auto& name : {hex, a.name()}) {
        std::error_code ec;
        if (!src && stdfs::is_regular_file(d / name, ec)) src = d / name;
      }
    }
    if (!src) {
      return make_error(Errc::invalid_argument, "artifact " + a.name() + " (sha256 " + hex.substr(0, 16) +
                                                    ") of the k3s bundle not found; pass --artifacts-dir");
    }
    auto e = source_entry(dest, mode, *src);
    if (!e) return e.error();
    if (e->sha256 != hex || e->size != a.size()) {
      return make_error(Errc::refused, src->string() + " does not match the bundle's artifact " + a.name() +
                                           " (size or sha256 differs)");
    }
    out.push_back(std::move(*e));
    ++found;
  }
  if (found == 0) return make_error(Errc::invalid_argument, "the k3s bundle has no k3s binary or airgap image artifacts");
  return {};
}

// Resolves an entry's parent inside the image and adds the directories above it.
Status place(View& v, Entry e, std::map<std::string, Entry>& out) {
  const auto slash = e.path.rfind('/');
  auto parent = resolve_in_image(e.path.substr(0, slash), v.lstat);
  if (!parent) return parent.error();
  e.path = (*parent == "/" ? "" : *parent) + e.path.substr(slash);
  for (std::string d = *parent; d != "/"; d = d.substr(0, std::max<size_t>(d.rfind('/'), 1))) {
    auto n = v.lstat(d);
    if (!n) return n.error();
    if (n->kind == NodeInfo::Kind::dir) break;
    if (n->kind != NodeInfo::Kind::missing) return make_error(Errc::refused, d + " exists in the image and is not a directory");
    Entry dir;
    dir.type = Entry::Type::dir;
    dir.path = d;
    dir.mode = 0755;
    out.emplace(d, dir);
  }
  out[e.path] = std::move(e);
  return {};
}

Status sparse_copy(const stdfs::path& from, const stdfs::path& to) {
  const int in = ::open(from.c_str(), O_RDONLY | O_CLOEXEC);
  if (in < 0) return sys_error("open " + from.string());
  const int out = ::open(to.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (out < 0) {
    ::close(in);
    return sys_error("create " + to.string());
  }
  Status st;
  struct stat sb {};
  ::fstat(in, &sb);
  off_t pos = 0;
  while (st && pos < sb.st_size) {
    off_t data = ::lseek(in, pos, SEEK_DATA);
    if (data < 0) break;  // only a hole is left
    off_t hole = ::lseek(in, data, SEEK_HOLE);
    if (hole < 0) hole = sb.st_size;
    off_t src = data, dst = data;
    while (st && src < hole) {
      const ssize_t n = ::copy_file_range(in, &src, out, &dst, size_t(hole - src), 0);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) st = sys_error("copy " + from.string());
    }
    pos = hole;
  }
  if (st && ::ftruncate(out, sb.st_size) != 0) st = sys_error("size " + to.string());
  ::close(in);
  if (::close(out) != 0 && st) st = sys_error("close " + to.string());
  return st;
}

Status fsync_path(const stdfs::path& p) {
  const int fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return sys_error("open " + p.string());
  const int rc = ::fsync(fd);
  ::close(fd);
  return rc == 0 ? Status() : Status(sys_error("fsync " + p.string()));
}

std::string human(uint64_t b) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f MiB", double(b) / (1 << 20));
  return std::to_string(b) + " bytes (" + buf + ")";
}

}  // namespace

std::string manifest_json(const InjectReport& r, bool with_output) {
  nlohmann::ordered_json j;
  j["tool"] = "flotilla image inject";
  j["format"] = r.format;
  j["arch"] = arch_name(r.arch);
  j["arch_evidence"] = r.arch_evidence;
  if (!r.partition.empty()) j["partition"] = r.partition;
  j["source_date_epoch"] = r.source_date;
  auto files = nlohmann::ordered_json::array();
  for (const auto& f : r.files) {
    nlohmann::ordered_json e;
    e["path"] = f.path;
    e["type"] = f.type;
    char mode[8];
    std::snprintf(mode, sizeof mode, "%04o", f.mode);
    e["mode"] = mode;
    if (f.type == "file") e["size"] = f.size;
    if (f.type == "symlink") e["target"] = f.target;
    if (f.type != "dir") e["sha256"] = f.sha256;
    files.push_back(e);
  }
  j["files"] = files;
  if (with_output) {
    j["output"] = r.output.string();
    if (!r.output_sha256.empty()) j["output_sha256"] = r.output_sha256;
  }
  return j.dump(2) + "\n";
}

Result<InjectReport> inject(const InjectOptions& o) {
  if (auto s = check_settings(o.settings); !s) return s.error();
  if (o.agents.empty()) return make_error(Errc::invalid_argument, "no agent binary given (--agent)");
  View v;
  auto view = open_view(o.input, o.partition, v);
  if (!view) return view.error();
  InjectReport rep;
  rep.format = v.format;
  rep.partition = v.partition;
  auto arch = detect_arch(v);
  if (!arch) return arch.error();
  rep.arch = arch->first;
  rep.arch_evidence = arch->second;
  auto agent = pick_agent(o.agents, rep.arch, rep.arch_evidence);
  if (!agent) return agent.error();
  rep.source_date = o.source_date.value_or(v.derived_date);

  // The payload, each path resolved inside the image.
  std::vector<Entry> entries;
  auto ae = source_entry(kAgentPath, 0755, *agent);
  if (!ae) return ae.error();
  entries.push_back(std::move(*ae));
  entries.push_back(file_entry(kConfigPath, 0600, agent_yaml(o.settings)));
  if (!o.settings.root_keyring.empty()) {
    auto e = source_entry(kKeyringPath, 0644, o.settings.root_keyring);
    if (!e) return e.error();
    entries.push_back(std::move(*e));
  }
  if (!o.settings.tls_ca_file.empty()) {
    auto e = source_entry(kCaPath, 0644, o.settings.tls_ca_file);
    if (!e) return e.error();
    entries.push_back(std::move(*e));
  }
  if (!o.settings.device_ca_file.empty()) {
    auto e = source_entry(kDeviceCaPath, 0644, o.settings.device_ca_file);
    if (!e) return e.error();
    entries.push_back(std::move(*e));
  }
  entries.push_back(file_entry(kUnitPath, 0644, std::string(service_files::kAgentSystemdUnit)));
  entries.push_back(symlink_entry("/etc/systemd/system/multi-user.target.wants/flotilla-agent.service", kUnitPath));
  entries.push_back(file_entry(kInitPath, 0755, std::string(service_files::kAgentOpenrcScript)));
  entries.push_back(symlink_entry("/etc/runlevels/default/flotilla-agent", kInitPath));
  if (!o.k3s_bundle.empty()) {
    if (auto s = add_bundle_artifacts(o, rep.arch, entries); !s) return s.error();
  }
  std::map<std::string, Entry> placed;
  for (auto& e : entries) {
    if (auto s = place(v, std::move(e), placed); !s) return s.error();
  }
  for (const auto& [path, e] : placed) {
    InjectedFile f{path, e.type == Entry::Type::dir ? "dir" : e.type == Entry::Type::file ? "file" : "symlink",
                   e.mode, e.size, e.sha256, e.target};
    rep.files.push_back(f);
  }
  // The manifest inside the image lists everything else injected.
  if (auto s = place(v, file_entry(kManifestPath, 0644, manifest_json(rep, false)), placed); !s) return s.error();
  Payload payload;
  payload.mtime = rep.source_date;
  for (auto& [path, e] : placed) payload.entries.push_back(std::move(e));
  rep.files.clear();
  for (const auto& e : payload.entries) {
    rep.files.push_back({e.path, e.type == Entry::Type::dir ? "dir" : e.type == Entry::Type::file ? "file" : "symlink",
                         e.mode, e.size, e.sha256, e.target});
  }

  // Space, before anything is written.
  const bool is_dir = v.format == "directory";
  rep.output = is_dir || o.output.empty() ? o.input : o.output;
  const stdfs::path out_dir = stdfs::absolute(rep.output).parent_path();
  if (v.ext4) {
    const auto [bytes, inodes] = v.ext4->needs(payload);
    const auto p = v.ext4->probe();
    if (bytes > p.free_bytes || inodes > p.free_inodes) {
      return make_error(Errc::refused, "not enough space in the image's ext4 filesystem (" + v.partition + "): need " +
                                           human(bytes) + " and " + std::to_string(inodes) + " inodes, " +
                                           human(p.free_bytes) + " and " + std::to_string(p.free_inodes) +
                                           " inodes free (root's reserve excluded); grow the filesystem first "
                                           "(e.g. truncate + resize2fs)");
    }
  }
  {
    uint64_t need = payload.content_bytes() + (1u << 20);
    if (!is_dir) {
      struct stat sb {};
      if (::stat(o.input.c_str(), &sb) == 0) need += v.ext4 ? uint64_t(sb.st_blocks) * 512 : uint64_t(sb.st_size);
    }
    auto free = fs::free_bytes(is_dir ? o.input : out_dir);
    if (free && *free < need) {
      return make_error(Errc::refused, "not enough space for the output in " + (is_dir ? o.input : out_dir).string() +
                                           ": need " + human(need) + ", " + human(*free) + " free");
    }
  }

  // Write.
  if (is_dir) {
    if (auto s = write_dir(o.input, payload); !s) return s.error();
  } else {
    const stdfs::path tmp = rep.output.string() + ".tmp";
    std::error_code ec;
    stdfs::remove(tmp, ec);
    auto fail = [&](const Error& e) -> Result<InjectReport> {
      std::error_code ignore;
      stdfs::remove(tmp, ignore);
      return e;
    };
    if (v.ext4) {
      v.ext4.reset();  // the input stays as it was; only the copy is opened for writing
      if (auto s = sparse_copy(o.input, tmp); !s) return fail(s.error());
      auto img = Ext4Image::open(tmp, v.offset, true);
      if (!img) return fail(img.error());
      if (auto s = img->write(payload); !s) return fail(s.error());
      if (auto s = img->close(); !s) return fail(s.error());
    } else {
      if (auto s = write_tar(o.input, v.tar, payload, tmp); !s) return fail(s.error());
    }
    if (auto s = fsync_path(tmp); !s) return fail(s.error());
    auto digest = file_sha256(tmp, nullptr);
    if (!digest) return fail(digest.error());
    rep.output_sha256 = *digest;
    if (::rename(tmp.c_str(), rep.output.c_str()) != 0) return fail(sys_error("rename " + tmp.string()));
    if (auto s = fs::fsync_dir(out_dir); !s) return s.error();
  }
  rep.manifest = rep.output.string() + ".manifest.json";
  if (auto s = fs::write_file_atomic(rep.manifest, manifest_json(rep, true)); !s) return s.error();
  return rep;
}

}  // namespace flotilla::images

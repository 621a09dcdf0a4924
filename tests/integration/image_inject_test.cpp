// `flotilla image inject` against real images: disk images made with sfdisk
// and mkfs.ext4 -d (MBR and GPT), tarballs made with tar, rootfs directories.
// Every result is read back with the real e2fsprogs tools (e2fsck -fn,
// debugfs) or tar, never with the injector's own code.
#include <catch2/catch.hpp>

#include <sys/stat.h>

#include <ctime>
#include <fstream>
#include <functional>

#include "flotilla/bundles/keys.hpp"
#include "flotilla/bundles/trust.hpp"
#include "flotilla/common/crypto.hpp"
#include "flotilla/common/encoding.hpp"
#include "flotilla/common/fs.hpp"
#include "flotilla/common/process.hpp"
#include "tests/support/harness.hpp"

using namespace flotilla;
using namespace flotilla::test;

namespace {

std::string tool(const std::string& name) {
  for (const char* dir : {"/usr/sbin/", "/sbin/", "/usr/bin/", "/bin/"}) {
    if (::access((std::string(dir) + name).c_str(), X_OK) == 0) return dir + name;
  }
  return name;
}

// proc::run does not search PATH.
proc::RunResult run(std::vector<std::string> argv) {
  if (argv[0].front() != '/') argv[0] = tool(argv[0]);
  auto r = proc::run(argv, std::chrono::seconds(120), 64u << 20);  // debugfs cat of the agent: ~9 MB
  if (!r) throw std::runtime_error(argv[0] + ": " + r.error().message);
  return *r;
}

void must(std::vector<std::string> argv) {
  auto r = run(argv);
  INFO(argv[0] << " " << (argv.size() > 1 ? argv[1] : "") << ": " << r.out << r.err);
  REQUIRE(r.exit_code == 0);
}

std::string file_hash(const stdfs::path& p) {
  auto bytes = fs::read_file(p, 1u << 30);
  REQUIRE(bytes);
  return crypto::sha256_hex(*bytes);
}

std::string slurp(const stdfs::path& p) { return fs::read_file(p, 1u << 30).value_or("<missing>"); }

// An aarch64 ELF header: enough for an image's /bin/sh to say "arm64".
std::string aarch64_elf_header() {
  std::string h(64, '\0');
  h.replace(0, 4, "\x7f" "ELF");
  h[4] = 2;  // 64-bit
  h[5] = 1;  // little-endian
  h[6] = 1;
  h[16] = 2;  // ET_EXEC
  h[18] = char(183);  // EM_AARCH64
  return h;
}

// A small merged-/usr rootfs whose shell is `sh_elf`: /bin -> usr/bin
// (relative), /lib -> /usr/lib (absolute: must resolve inside the image).
void make_rootfs(const stdfs::path& root, const std::string& sh_elf) {
  stdfs::create_directories(root / "usr/bin");
  stdfs::create_directories(root / "usr/lib");
  stdfs::create_directories(root / "etc/systemd/system");
  stdfs::create_directories(root / "usr/local/bin");
  std::ofstream(root / "usr/bin/busybox", std::ios::binary) << sh_elf;
  ::chmod((root / "usr/bin/busybox").c_str(), 0755);
  stdfs::create_symlink("busybox", root / "usr/bin/sh");
  stdfs::create_symlink("usr/bin", root / "bin");
  stdfs::create_symlink("/usr/lib", root / "lib");
  std::ofstream(root / "etc/hostname") << "device\n";
  // Replaced by the injection: an old agent config.
  stdfs::create_directories(root / "etc/flotilla");
  std::ofstream(root / "etc/flotilla/agent.yaml") << "hub-url: http://old.example\n";
}

std::string host_elf() { return slurp("/bin/true"); }

struct Disk {
  stdfs::path image;
  uint64_t offset = 0, size = 0;
};

// sfdisk + mkfs.ext4 -d: a first small partition without a filesystem and the
// ext4 root as partition 2 ("rootfs" as GPT name and as ext4 label).
Disk make_disk(const stdfs::path& dir, const std::string& scheme, const stdfs::path& rootfs, int root_mib) {
  Disk d;
  d.image = dir / ("disk-" + scheme + ".img");
  const uint64_t total_mib = uint64_t(root_mib) + 4;
  { std::ofstream(d.image, std::ios::binary); }
  stdfs::resize_file(d.image, total_mib << 20);
  const std::string layout = scheme == "gpt"
                                 ? "label: gpt\nstart=2048, size=2048, type=linux, name=boot\nstart=4096, size=" +
                                       std::to_string(root_mib * 2048) + ", type=linux, name=rootfs\n"
                                 : "label: dos\nstart=2048, size=2048, type=c\nstart=4096, size=" +
                                       std::to_string(root_mib * 2048) + ", type=83\n";
  std::ofstream(dir / "layout") << layout;
  must({"sh", "-c", tool("sfdisk") + " --no-reread --no-tell-kernel -q '" + d.image.string() + "' < '" +
                        (dir / "layout").string() + "'"});
  d.offset = 4096ull * 512;
  d.size = uint64_t(root_mib) << 20;
  must({tool("mkfs.ext4"), "-q", "-F", "-L", "rootfs", "-d", rootfs.string(), "-E",
        "offset=" + std::to_string(d.offset), d.image.string(), std::to_string(root_mib) + "M"});
  return d;
}

// The root partition as a file of its own, for e2fsck and debugfs.
stdfs::path extract(const Disk& d, const stdfs::path& to) {
  std::ifstream in(d.image, std::ios::binary);
  in.seekg(std::streamoff(d.offset));
  std::ofstream out(to, std::ios::binary);
  std::string buf(1u << 20, '\0');
  for (uint64_t left = d.size; left > 0;) {
    in.read(buf.data(), std::streamsize(std::min<uint64_t>(left, buf.size())));
    out.write(buf.data(), in.gcount());
    left -= uint64_t(in.gcount());
    if (in.gcount() == 0) break;
  }
  return to;
}

std::string debugfs(const stdfs::path& fsimg, const std::string& request) {
  auto r = run({tool("debugfs"), "-R", request, fsimg.string()});
  REQUIRE(r.exit_code == 0);
  return r.out;
}

struct Trust {
  bundles::KeyPair key = bundles::generate_key();
  std::string pub() const { return bundles::public_key_text(key.pub); }
};

std::vector<std::string> inject_args(const stdfs::path& input, const Trust& t, std::vector<std::string> extra = {}) {
  std::vector<std::string> a = {"image",         "inject",           input.string(),       "--hub-url",
                                "http://hub.example:8080", "--enrollment-token", "tok-123", "--root-key",
                                t.pub(),         "--label",          "site=berlin",        "--label",
                                "role=pos",      "--agent",          bin_dir() + "/flotilla-agent"};
  a.insert(a.end(), extra.begin(), extra.end());
  return a;
}

std::string expected_config(const Trust& t) {
  return "# Written by `flotilla image inject`; every key is described in docs/agent.md.\n"
         "hub-url: \"http://hub.example:8080\"\n"
         "enrollment-token: \"tok-123\"\n"
         "root-keys:\n  - \"" + t.pub() + "\"\n"
         "labels:\n  role: \"pos\"\n  site: \"berlin\"\n";
}

// e2fsck -fn finds nothing, and every injected file reads back with debugfs
// with the mode, owner, time and content the manifest claims.
void check_ext4(const stdfs::path& fsimg, const json& manifest, const Trust& t, int64_t date) {
  auto fsck = run({tool("e2fsck"), "-fn", fsimg.string()});
  INFO(fsck.out << fsck.err);
  REQUIRE(fsck.exit_code == 0);
  REQUIRE(manifest["files"].size() >= 8);
  for (const auto& f : manifest["files"]) {
    const std::string path = f["path"];
    INFO(path);
    const std::string stat = debugfs(fsimg, "stat " + path);
    const std::string type = f["type"];
    if (type == "file") {
      CHECK(stat.find("Type: regular") != std::string::npos);
      CHECK(stat.find("Mode:  " + f["mode"].get<std::string>()) != std::string::npos);
      const std::string body = debugfs(fsimg, "cat " + path);
      CHECK(body.size() == f["size"].get<uint64_t>());
      CHECK(crypto::sha256_hex(body) == f["sha256"]);
    } else if (type == "symlink") {
      CHECK(stat.find("Type: symlink") != std::string::npos);
      CHECK(stat.find("Fast link dest: \"" + f["target"].get<std::string>() + "\"") != std::string::npos);
    } else {
      CHECK(stat.find("Type: directory") != std::string::npos);
    }
    CHECK(stat.find("User:     0   Group:     0") != std::string::npos);
    char mtime[32];
    std::snprintf(mtime, sizeof mtime, "mtime: 0x%08x", unsigned(date));
    CHECK(stat.find(mtime) != std::string::npos);
    CHECK(stat.find("crtime: 0x" + std::string(mtime).substr(9)) != std::string::npos);
  }
  CHECK(debugfs(fsimg, "cat /etc/flotilla/agent.yaml") == expected_config(t));
  CHECK(debugfs(fsimg, "cat /usr/bin/flotilla-agent") == slurp(bin_dir() + "/flotilla-agent"));
  CHECK(debugfs(fsimg, "cat /etc/hostname") == "device\n");  // the image's own files stay
}

json manifest_of(const stdfs::path& output) { return json::parse(slurp(output.string() + ".manifest.json")); }

}  // namespace

TEST_CASE("image inject: MBR and GPT disk images get the agent, e2fsck -fn is clean and debugfs reads every file back",
          "[integration][image]") {
  TempDir tmp;
  Trust t;
  make_rootfs(tmp.path() / "rootfs", host_elf());
  for (const std::string scheme : {"mbr", "gpt"}) {
    DYNAMIC_SECTION(scheme) {
      auto disk = make_disk(tmp.path(), scheme, tmp.path() / "rootfs", 48);
      const auto before = file_hash(disk.image);
      const stdfs::path out = tmp.path() / ("out-" + scheme + ".img");
      std::vector<std::string> extra = {"--output", out.string(), "--source-date-epoch", "1700000000"};
      // Chosen by GPT partition name and by number (the other tests let it pick the only ext4 one).
      extra.insert(extra.end(), {"--partition", scheme == "gpt" ? "rootfs" : "2"});
      auto r = Hub::cli_local(inject_args(disk.image, t, extra));
      INFO(r.out << r.err);
      REQUIRE(r.exit_code == 0);
      CHECK(r.out.find("amd64 agent") != std::string::npos);
      CHECK(r.out.find("/bin/sh -> /usr/bin/busybox") != std::string::npos);
      CHECK(file_hash(disk.image) == before);  // a new output; the input is not touched
      CHECK_FALSE(stdfs::exists(out.string() + ".tmp"));
      const json m = manifest_of(out);
      CHECK(m["format"] == "disk-" + scheme);
      CHECK(m["arch"] == "amd64");
      CHECK(m["output_sha256"] == file_hash(out));
      Disk injected = disk;
      injected.image = out;
      const auto part = extract(injected, tmp.path() / ("root-" + scheme + ".ext4"));
      check_ext4(part, m, t, 1700000000);
      // The in-image manifest lists the same files (without itself).
      const json inside = json::parse(debugfs(part, "cat /etc/flotilla/image-manifest.json"));
      CHECK(inside["files"].size() + 1 == m["files"].size());
      // Enabled for both init systems.
      CHECK(debugfs(part, "stat /etc/systemd/system/multi-user.target.wants/flotilla-agent.service")
                .find("/etc/systemd/system/flotilla-agent.service") != std::string::npos);
      CHECK(debugfs(part, "cat /etc/init.d/flotilla-agent").rfind("#!/sbin/openrc-run\n", 0) == 0);
    }
  }
}

TEST_CASE("image inject: the same inputs give the same bytes (disk image and tar.gz)", "[integration][image]") {
  TempDir tmp;
  Trust t;
  make_rootfs(tmp.path() / "rootfs", host_elf());
  auto disk = make_disk(tmp.path(), "gpt", tmp.path() / "rootfs", 48);
  must({"tar", "-czf", (tmp.path() / "rootfs.tar.gz").string(), "-C", (tmp.path() / "rootfs").string(), "."});
  for (const stdfs::path& in : {disk.image, tmp.path() / "rootfs.tar.gz"}) {
    std::vector<std::string> outs;
    for (int i = 0; i < 2; ++i) {
      // The second run starts in a later second, so any wall-clock time that
      // leaked into the output (inode times, superblock write time, gzip
      // header) would show as a difference.
      const time_t started = std::time(nullptr);
      if (i == 1) REQUIRE(wait_until([&] { return std::time(nullptr) > started; }, std::chrono::seconds(3)));
      const stdfs::path out = tmp.path() / ("repro-" + std::to_string(i) + "-" + in.filename().string());
      auto r = Hub::cli_local(inject_args(in, t, {"--output", out.string()}));
      INFO(r.out << r.err);
      REQUIRE(r.exit_code == 0);
      outs.push_back(file_hash(out));
      CHECK(manifest_of(out)["output_sha256"] == outs.back());
    }
    CHECK(outs[0] == outs[1]);
  }
}

TEST_CASE("image inject: tar.zst and tar rootfs tarballs keep their compression and get root-owned entries",
          "[integration][image]") {
  TempDir tmp;
  Trust t;
  make_rootfs(tmp.path() / "rootfs", host_elf());
  for (const std::string kind : {"tar.zst", "tar"}) {
    DYNAMIC_SECTION(kind) {
      const stdfs::path in = tmp.path() / ("rootfs." + kind);
      must({"tar", kind == "tar.zst" ? "--zstd" : "--no-auto-compress", "-cf", in.string(), "-C",
            (tmp.path() / "rootfs").string(), "."});
      const auto before = file_hash(in);
      const stdfs::path out = tmp.path() / ("out." + kind);
      auto r = Hub::cli_local(inject_args(in, t, {"--output", out.string(), "--source-date-epoch", "1700000000"}));
      INFO(r.out << r.err);
      REQUIRE(r.exit_code == 0);
      CHECK(file_hash(in) == before);
      const json m = manifest_of(out);
      CHECK(m["format"] == kind);
      // zstd magic, or a plain ustar header.
      const std::string head = slurp(out).substr(0, 512);
      if (kind == "tar.zst") CHECK(head.compare(0, 4, "\x28\xb5\x2f\xfd") == 0);
      else CHECK(head.compare(257, 5, "ustar") == 0);
      auto listing = run({"sh", "-c", "TZ=UTC tar --numeric-owner --full-time -tvf '" + out.string() + "'"});
      REQUIRE(listing.exit_code == 0);
      auto line_of = [&](const std::string& path) {
        const auto end = listing.out.find(" " + path + "\n");
        REQUIRE(end != std::string::npos);
        return listing.out.substr(listing.out.rfind('\n', end) + 1, end - listing.out.rfind('\n', end) - 1);
      };
      const std::string cfg = line_of("./etc/flotilla/agent.yaml");
      CHECK(cfg.rfind("-rw------- 0/0 ", 0) == 0);
      CHECK(cfg.find("2023-11-14 22:13:20") != std::string::npos);
      const std::string agent_line = line_of("./usr/bin/flotilla-agent");
      CHECK(agent_line.rfind("-rwxr-xr-x 0/0 ", 0) == 0);
      // The old agent.yaml is replaced, not duplicated.
      size_t count = 0;
      for (size_t at = 0; (at = listing.out.find("etc/flotilla/agent.yaml", at)) != std::string::npos; ++at) ++count;
      CHECK(count == 1);
      const auto x = tmp.path() / ("x-" + kind);
      stdfs::create_directories(x);
      must({"tar", "-xf", out.string(), "-C", x.string()});
      for (const auto& f : m["files"]) {
        if (f["type"] != "file") continue;
        INFO(f["path"]);
        const auto p = x / f["path"].get<std::string>().substr(1);
        CHECK(file_hash(p) == f["sha256"]);
        struct stat sb {};
        REQUIRE(::stat(p.c_str(), &sb) == 0);
        char mode[8];
        std::snprintf(mode, sizeof mode, "%04o", sb.st_mode & 07777);
        CHECK(std::string(mode) == f["mode"]);
      }
      CHECK(slurp(x / "etc/flotilla/agent.yaml") == expected_config(t));
      CHECK(stdfs::read_symlink(x / "etc/runlevels/default/flotilla-agent") == "/etc/init.d/flotilla-agent");
    }
  }
}

TEST_CASE("image inject: a rootfs directory is changed in place, its absolute symlinks resolved inside it",
          "[integration][image]") {
  TempDir tmp;
  Trust t;
  const auto root = tmp.path() / "rootfs";
  make_rootfs(root, host_elf());
  // /usr/bin -> /opt/bin, absolute: written through it into the rootfs, never the host.
  stdfs::create_directories(root / "opt");
  stdfs::rename(root / "usr/bin", root / "opt/bin");
  stdfs::create_symlink("/opt/bin", root / "usr/bin");
  auto r = Hub::cli_local(inject_args(root, t));
  INFO(r.out << r.err);
  REQUIRE(r.exit_code == 0);
  CHECK(slurp(root / "opt/bin/flotilla-agent") == slurp(bin_dir() + "/flotilla-agent"));
  // The service files are the very bytes the flotilla-agent package installs (packaging/).
  REQUIRE(stdfs::exists(stdfs::path(source_dir()) / "packaging/systemd/flotilla-agent.service"));
  CHECK(slurp(root / "etc/systemd/system/flotilla-agent.service") ==
        slurp(stdfs::path(source_dir()) / "packaging/systemd/flotilla-agent.service"));
  CHECK(slurp(root / "etc/init.d/flotilla-agent") == slurp(stdfs::path(source_dir()) / "packaging/openrc/flotilla-agent"));
  CHECK(slurp(root / "etc/flotilla/agent.yaml") == expected_config(t));
  CHECK((stdfs::status(root / "etc/flotilla/agent.yaml").permissions() & stdfs::perms::all) ==
        (stdfs::perms::owner_read | stdfs::perms::owner_write));
  const json m = manifest_of(root);
  CHECK(m["format"] == "directory");
  bool listed = false;
  for (const auto& f : m["files"]) listed |= f["path"] == "/opt/bin/flotilla-agent";
  CHECK(listed);
}

TEST_CASE("image inject: refuses an image whose architecture no given agent has, the input is untouched",
          "[integration][image][bad-input]") {
  TempDir tmp;
  Trust t;
  make_rootfs(tmp.path() / "rootfs", aarch64_elf_header());
  auto disk = make_disk(tmp.path(), "mbr", tmp.path() / "rootfs", 48);
  const auto before = file_hash(disk.image);
  auto r = Hub::cli_local(inject_args(disk.image, t));  // only the host (amd64) agent
  CHECK(r.exit_code == 1);
  CHECK(r.err.find("architecture mismatch: the image is arm64 (from /bin/sh -> /usr/bin/busybox)") != std::string::npos);
  CHECK(r.err.find("scripts/build-agent-cross.sh aarch64") != std::string::npos);
  CHECK(file_hash(disk.image) == before);
  CHECK_FALSE(stdfs::exists(disk.image.string() + ".tmp"));
  CHECK_FALSE(stdfs::exists(disk.image.string() + ".manifest.json"));
}

TEST_CASE("image inject: refuses when the ext4 root lacks space, input untouched, no output",
          "[integration][image][bad-input]") {
  TempDir tmp;
  Trust t;
  make_rootfs(tmp.path() / "rootfs", host_elf());
  // 8 MiB cannot hold the static agent (~8.4 MB) plus the rest.
  auto disk = make_disk(tmp.path(), "gpt", tmp.path() / "rootfs", 8);
  const auto before = file_hash(disk.image);
  const stdfs::path out = tmp.path() / "never.img";
  auto r = Hub::cli_local(inject_args(disk.image, t, {"--output", out.string()}));
  CHECK(r.exit_code == 1);
  CHECK(r.err.find("not enough space in the image's ext4 filesystem") != std::string::npos);
  CHECK(file_hash(disk.image) == before);
  CHECK_FALSE(stdfs::exists(out));
  CHECK_FALSE(stdfs::exists(out.string() + ".tmp"));
  // Replacing in place is refused the same way.
  auto again = Hub::cli_local(inject_args(disk.image, t));
  CHECK(again.exit_code == 1);
  CHECK(file_hash(disk.image) == before);
}

TEST_CASE("image inject: clear refusals for unknown formats, no ext4 root and a missing trust root",
          "[integration][image][bad-input]") {
  TempDir tmp;
  Trust t;
  SECTION("unknown format") {
    const auto in = tmp.path() / "random.bin";
    std::ofstream(in) << std::string(4096, 'x');
    auto r = Hub::cli_local(inject_args(in, t));
    CHECK(r.exit_code == 2);
    CHECK(r.err.find("unknown image format") != std::string::npos);
    CHECK(slurp(in) == std::string(4096, 'x'));
  }
  SECTION("an xz tarball names its compression") {
    make_rootfs(tmp.path() / "rootfs", host_elf());
    const auto in = tmp.path() / "rootfs.tar.xz";
    must({"tar", "-cJf", in.string(), "-C", (tmp.path() / "rootfs").string(), "."});
    const auto before = file_hash(in);
    auto r = Hub::cli_local(inject_args(in, t));
    CHECK(r.exit_code == 2);
    CHECK(r.err.find("compressed with xz: only uncompressed, gzip and zstd") != std::string::npos);
    CHECK(file_hash(in) == before);
  }
  SECTION("no ext4 root") {
    const auto in = tmp.path() / "empty.img";
    { std::ofstream(in, std::ios::binary); }
    stdfs::resize_file(in, 8u << 20);
    std::ofstream(tmp.path() / "layout") << "label: dos\nstart=2048, type=83\n";
    must({"sh", "-c", tool("sfdisk") + " -q '" + in.string() + "' < '" + (tmp.path() / "layout").string() + "'"});
    const auto before = file_hash(in);
    auto r = Hub::cli_local(inject_args(in, t));
    CHECK(r.exit_code == 1);
    CHECK(r.err.find("no ext4 root filesystem") != std::string::npos);
    CHECK(file_hash(in) == before);
  }
  SECTION("missing trust root") {
    make_rootfs(tmp.path() / "rootfs", host_elf());
    const auto before = snapshot(tmp.path() / "rootfs", {});
    auto r = Hub::cli_local({"image", "inject", (tmp.path() / "rootfs").string(), "--hub-url", "http://h:1",
                             "--enrollment-token", "x", "--agent", bin_dir() + "/flotilla-agent"});
    CHECK(r.exit_code == 1);
    CHECK(r.err.find("missing trust root") != std::string::npos);
    CHECK(snapshot(tmp.path() / "rootfs", {}) == before);
  }
}

TEST_CASE("image inject --help explains inputs, payload and refusals", "[integration][image]") {
  auto r = Hub::cli_local({"image", "inject", "--help"});
  CHECK(r.exit_code == 0);
  for (const char* s : {"--partition", "--root-keyring", "--k3s-bundle", "SOURCE_DATE_EPOCH", "tar.zst", "GPT",
                        "/etc/flotilla/agent.yaml", "build-agent-cross.sh"}) {
    CHECK(r.out.find(s) != std::string::npos);
  }
}

TEST_CASE("image inject --k3s-bundle preloads the bundle's k3s binary and airgap images, checked against it",
          "[integration][image]") {
  TempDir tmp;
  Trust t;
  make_rootfs(tmp.path() / "rootfs", host_elf());
  must({"tar", "-czf", (tmp.path() / "rootfs.tar.gz").string(), "-C", (tmp.path() / "rootfs").string(), "."});
  // A bundle with artifacts, built and signed with the CLI.
  const auto spec = tmp.path() / "spec";
  stdfs::create_directories(spec);
  stdfs::copy_file(bin_dir() + "/k3s-standin", spec / "k3s");
  std::ofstream(spec / "k3s-airgap-images-amd64.tar.zst", std::ios::binary) << std::string(70000, 'i');
  std::ofstream(spec / "bundle.yaml") << "name: k3s-base\nversion: 1\nexpires-in: 30d\ntarget:\n  arch: amd64\n"
                                         "artifacts:\n  - kind: k3s-binary\n    source: k3s\n"
                                         "  - kind: airgap-images\n    source: k3s-airgap-images-amd64.tar.zst\n";
  REQUIRE(bundles::write_private_key(tmp.path() / "release.key", t.key));
  const std::string bundle = (tmp.path() / "k3s.fbundle").string();
  REQUIRE(Hub::cli_local({"bundle", "build", spec.string(), "--out", bundle}).exit_code == 0);
  REQUIRE(Hub::cli_local({"bundle", "sign", bundle, "--key", (tmp.path() / "release.key").string()}).exit_code == 0);

  const auto out = tmp.path() / "out.tar.gz";
  auto r = Hub::cli_local(inject_args(tmp.path() / "rootfs.tar.gz", t, {"--output", out.string(), "--k3s-bundle", bundle}));
  INFO(r.out << r.err);
  REQUIRE(r.exit_code == 0);
  const auto x = tmp.path() / "x";
  stdfs::create_directories(x);
  must({"tar", "-xzf", out.string(), "-C", x.string()});
  CHECK(slurp(x / "usr/local/bin/k3s") == slurp(bin_dir() + "/k3s-standin"));
  CHECK(slurp(x / "var/lib/rancher/k3s/agent/images/k3s-airgap-images-amd64.tar.zst") == std::string(70000, 'i'));

  SECTION("an artifact that differs from the signed manifest is refused, nothing written") {
    const auto art = stdfs::path(bundle + ".artifacts");
    for (const auto& f : stdfs::directory_iterator(art)) {
      if (stdfs::file_size(f.path()) == 70000) std::ofstream(f.path(), std::ios::binary) << std::string(70000, 'X');
    }
    const auto out2 = tmp.path() / "out2.tar.gz";
    auto bad = Hub::cli_local(inject_args(tmp.path() / "rootfs.tar.gz", t,
                                          {"--output", out2.string(), "--k3s-bundle", bundle}));
    CHECK(bad.exit_code == 1);
    CHECK(bad.err.find("does not match the bundle's artifact") != std::string::npos);
    CHECK_FALSE(stdfs::exists(out2));
  }
  SECTION("a bundle signed by a key the image does not pin is refused") {
    Trust other;
    auto bad = Hub::cli_local(inject_args(tmp.path() / "rootfs.tar.gz", other,
                                          {"--output", (tmp.path() / "o3.tar.gz").string(), "--k3s-bundle", bundle}));
    CHECK(bad.exit_code == 1);
    CHECK(bad.err.find("would be refused by the device") != std::string::npos);
  }
}

TEST_CASE("image inject: an ext4 root e2fsck finds inconsistent is refused before anything is written",
          "[integration][image][bad-input]") {
  // A hostile image: a block of /etc/hostname marked free in the bitmap, so a
  // writer trusting the bitmap would hand it to a new file and corrupt both.
  TempDir tmp;
  Trust t;
  make_rootfs(tmp.path() / "rootfs", host_elf());
  auto disk = make_disk(tmp.path(), "gpt", tmp.path() / "rootfs", 48);
  const std::string part = disk.image.string() + "?offset=" + std::to_string(disk.offset);
  auto blocks = run({tool("debugfs"), "-R", "blocks /etc/hostname", part});
  REQUIRE(blocks.exit_code == 0);
  const std::string block = blocks.out.substr(0, blocks.out.find_first_of(" \n"));
  REQUIRE_FALSE(block.empty());
  must({tool("debugfs"), "-w", "-R", "freeb " + block, part});
  const auto before = file_hash(disk.image);
  const stdfs::path out = tmp.path() / "never.img";

  auto r = Hub::cli_local(inject_args(disk.image, t, {"--output", out.string()}));
  INFO(r.err);
  CHECK(r.exit_code == 1);
  CHECK(r.err.find("the ext4 filesystem is not consistent (e2fsck -fn exit 4") != std::string::npos);
  CHECK(r.err.find("Block bitmap differences") != std::string::npos);
  CHECK(file_hash(disk.image) == before);
  CHECK_FALSE(stdfs::exists(out));
  CHECK_FALSE(stdfs::exists(out.string() + ".tmp"));
  CHECK_FALSE(stdfs::exists(out.string() + ".manifest.json"));
  // In place: refused the same way, the image as it was.
  auto again = Hub::cli_local(inject_args(disk.image, t));
  CHECK(again.exit_code == 1);
  CHECK(file_hash(disk.image) == before);
  CHECK_FALSE(stdfs::exists(disk.image.string() + ".tmp"));
}

TEST_CASE("image inject --k3s-bundle with --root-keyring verifies the bundle as the device will",
          "[integration][image][bad-input]") {
  TempDir tmp;
  make_rootfs(tmp.path() / "rootfs", host_elf());
  const auto rootfs = tmp.path() / "rootfs.tar.gz";
  must({"tar", "-czf", rootfs.string(), "-C", (tmp.path() / "rootfs").string(), "."});
  // Root keys R1, R2 (2 of 2) vouch for signing key S; the image pins the root.
  const auto r1 = bundles::generate_key(), r2 = bundles::generate_key(), s1 = bundles::generate_key();
  const int64_t now = std::time(nullptr);
  auto ring = [&](bundles::KeyringRole role, const std::vector<const bundles::KeyPair*>& keys, uint32_t threshold) {
    v1::KeyringManifest k;
    k.set_type(std::string(bundles::keyring_type(role)));
    k.set_version(1);
    k.set_created_unix(now);
    k.set_expires_unix(now + 86400);
    k.set_threshold(threshold);
    for (const auto* key : keys) *k.add_keys() = bundles::trusted_key(key->pub);
    auto signed_ring = bundles::wrap_keyring(k);
    REQUIRE(bundles::sign_keyring(signed_ring, r1));
    REQUIRE(bundles::sign_keyring(signed_ring, r2));
    return signed_ring;
  };
  const auto root_file = tmp.path() / "root.v1.krg", signing_file = tmp.path() / "signing.v1.krg";
  REQUIRE(bundles::write_keyring_file(root_file, ring(bundles::KeyringRole::root, {&r1, &r2}, 2)));
  REQUIRE(bundles::write_keyring_file(signing_file, ring(bundles::KeyringRole::signing, {&s1}, 1)));

  // A k3s bundle: the stand-in as its binary, placed where inject looks.
  const std::string k3s = slurp(bin_dir() + "/k3s-standin");
  auto make = [&](const std::string& file, const std::vector<const bundles::KeyPair*>& signers,
                  const std::function<void(v1::BundleManifest&)>& edit) {
    v1::BundleManifest m = make_manifest("k3s-base", 1);
    auto* a = m.add_artifacts();
    a->set_name("k3s");
    a->set_kind(v1::ARTIFACT_KIND_K3S_BINARY);
    const auto h = crypto::sha256(k3s);
    a->set_sha256(std::string(h.begin(), h.end()));
    a->set_size(k3s.size());
    a->set_url(crypto::sha256_hex(k3s));
    m.mutable_target()->add_arch("amd64");
    if (edit) edit(m);
    auto env = bundles::wrap(m);
    for (const auto* k : signers) REQUIRE(bundles::sign(env, *k));
    const auto path = tmp.path() / file;
    REQUIRE(bundles::write_bundle_file(path, env));
    stdfs::create_directories(path.string() + ".artifacts");
    std::ofstream(path.string() + ".artifacts/" + crypto::sha256_hex(k3s), std::ios::binary) << k3s;
    return path.string();
  };
  auto inject = [&](const std::string& bundle, const stdfs::path& out, std::vector<std::string> extra) {
    std::vector<std::string> a = {"image", "inject", rootfs.string(), "--output", out.string(), "--hub-url",
                                  "http://hub.example:8080", "--enrollment-token", "tok", "--root-keyring",
                                  root_file.string(), "--agent", bin_dir() + "/flotilla-agent", "--k3s-bundle", bundle};
    a.insert(a.end(), extra.begin(), extra.end());
    return Hub::cli_local(a);
  };
  const std::vector<std::string> with_signing = {"--signing-keyring", signing_file.string()};
  const auto before = file_hash(rootfs);

  struct Refusal {
    std::string name, bundle, expect;
  };
  const std::vector<Refusal> refusals = {
      {"unsigned", make("unsigned.fbundle", {}, nullptr), "REASON_UNSIGNED"},
      {"signed by a root key, not a signing key", make("root-signed.fbundle", {&r1}, nullptr), "REASON_UNKNOWN_KEY"},
      {"expired", make("expired.fbundle", {&s1}, [&](v1::BundleManifest& m) { m.set_expires_unix(now - 60); }),
       "REASON_BUNDLE_EXPIRED"},
      {"for another arch",
       make("arm.fbundle", {&s1}, [](v1::BundleManifest& m) { m.mutable_target()->set_arch(0, "arm64"); }),
       "REASON_WRONG_ARCH"},
  };
  for (const auto& bad : refusals) {
    INFO(bad.name);
    const auto out = tmp.path() / ("out-" + bad.expect + ".tar.gz");
    auto r = inject(bad.bundle, out, with_signing);
    INFO(r.err);
    CHECK(r.exit_code == 1);
    CHECK(r.err.find("would be refused by the device (" + bad.expect + ")") != std::string::npos);
    CHECK_FALSE(stdfs::exists(out));
    CHECK_FALSE(stdfs::exists(out.string() + ".tmp"));
    CHECK(file_hash(rootfs) == before);
  }
  // Without the signing keyring there is nothing to check it under: refused.
  const auto good = make("good.fbundle", {&s1}, nullptr);
  auto missing = inject(good, tmp.path() / "o-missing.tar.gz", {});
  CHECK(missing.exit_code == 2);
  CHECK(missing.err.find("pass --signing-keyring") != std::string::npos);
  CHECK_FALSE(stdfs::exists(tmp.path() / "o-missing.tar.gz"));

  // Signed by the signing keyring's key: preloaded.
  const auto out = tmp.path() / "ok.tar.gz";
  auto ok = inject(good, out, with_signing);
  INFO(ok.err);
  REQUIRE(ok.exit_code == 0);
  const auto x = tmp.path() / "x";
  stdfs::create_directories(x);
  must({"tar", "-xzf", out.string(), "-C", x.string()});
  CHECK(slurp(x / "usr/local/bin/k3s") == k3s);
}

TEST_CASE("image inject --director-key pins the hub's director key in agent.yaml", "[integration][image]") {
  TempDir tmp;
  Trust t;
  make_rootfs(tmp.path() / "rootfs", host_elf());
  const auto director = bundles::generate_key();
  REQUIRE(bundles::write_public_key(tmp.path() / "director.pub", director.pub));
  auto r = Hub::cli_local(inject_args(tmp.path() / "rootfs", t, {"--director-key", (tmp.path() / "director.pub").string()}));
  INFO(r.err);
  REQUIRE(r.exit_code == 0);
  CHECK(slurp(tmp.path() / "rootfs/etc/flotilla/agent.yaml").find("director-key: \"" +
                                                                  bundles::public_key_text(director.pub) + "\"") !=
        std::string::npos);
  auto bad = Hub::cli_local(inject_args(tmp.path() / "rootfs", t, {"--director-key", "ed25519:nope"}));
  CHECK(bad.exit_code == 2);
}

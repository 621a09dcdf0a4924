// image inject: the agent, its config and trust roots into a device image.
// The work is in images/ (flotilla::images); this file is flags and output.
#include <unistd.h>

#include <cstdlib>
#include <iostream>

#include "cli.hpp"
#include "output.hpp"
#include "flotilla/bundles/keys.hpp"
#include "flotilla/common/options.hpp"
#include "flotilla/images/inject.hpp"

namespace flotilla::cli {
namespace {

constexpr const char* kInjectHelp =
    "Usage: flotilla image inject INPUT [--output FILE] --hub-url URL --enrollment-token TOKEN\n"
    "                             (--root-key KEY ... | --root-keyring FILE) [--label k=v ...]\n"
    "                             [--agent FILE ...] [--partition N|NAME] [--director-key KEY] [--device-ca FILE]\n"
    "                             [--k3s-bundle FILE [--signing-keyring FILE] [--root-chain FILE ...]]\n\n"
    "Puts the Flotilla agent into an existing device OS image so the device enrolls on\n"
    "first boot. No Docker, no mount, no root: ext4 is written with libext2fs, tarballs\n"
    "with libarchive.\n\n"
    "INPUT is one of:\n"
    "  a rootfs directory      changed in place, file by file (temp + fsync + rename)\n"
    "  a rootfs tarball        .tar, .tar.gz or .tar.zst (the compression is kept)\n"
    "  a raw disk image        MBR or GPT, root filesystem ext4; the partition is the only\n"
    "                          ext4 one, or --partition by number, GPT name or ext4 label\n"
    "  an ext4 filesystem image (no partition table)\n"
    "Files and disk images are written to OUTPUT.tmp and renamed over OUTPUT (default:\n"
    "INPUT) only when complete; a refusal leaves INPUT and OUTPUT as they were.\n\n"
    "What goes in (all root-owned, with one fixed timestamp):\n"
    "  /usr/bin/flotilla-agent             the static agent built for the image's arch,\n"
    "                                      read from the image's own ELF binaries\n"
    "  /etc/flotilla/agent.yaml (0600)     hub-url, enrollment-token, root-keys or\n"
    "                                      root-keyring, labels, tls-ca-file, device-ca-file\n"
    "  /etc/flotilla/root.krg, ca.pem      with --root-keyring / --tls-ca-file\n"
    "  /etc/flotilla/device-ca.pem         with --device-ca: the hub's device CA certificate\n"
    "                                      (no key; each device gets its own certificate)\n"
    "  /etc/systemd/system/flotilla-agent.service  + enabled in multi-user.target.wants\n"
    "  /etc/init.d/flotilla-agent          OpenRC, enabled in /etc/runlevels/default\n"
    "                                      (both the very files the flotilla-agent package installs)\n"
    "  /usr/local/bin/k3s, /var/lib/rancher/k3s/agent/images/*   with --k3s-bundle, after the\n"
    "                                      bundle is verified as the device will: signature\n"
    "                                      threshold, revoked/expired keys, expiry, arch; with\n"
    "                                      --root-keyring under --signing-keyring (and\n"
    "                                      --root-chain), else under the --root-key keys\n"
    "  /etc/flotilla/image-manifest.json   every file above with its sha256\n"
    "and OUTPUT.manifest.json beside the output (plus the output's own sha256).\n\n"
    "Reproducible: the same inputs give the same bytes. Timestamps are\n"
    "--source-date-epoch, else $SOURCE_DATE_EPOCH, else taken from the input (ext4\n"
    "last write time, newest tar entry, newest file of a directory).\n\n"
    "Refused with a reason (exit 1): unknown format, no ext4 root, an ext4 filesystem\n"
    "that e2fsck -fn finds inconsistent (checked read-only before anything is written),\n"
    "not enough free space (inside the filesystem or for the output), architecture\n"
    "mismatch (build the agent with scripts/build-agent-cross.sh aarch64|armhf),\n"
    "missing trust root, a k3s bundle the device would refuse.\n\n"
    "Example:\n"
    "  flotilla image inject pi.img --output pi-fleet.img --agent build-aarch64/bin/flotilla-agent \\\n"
    "    --hub-url https://hub.example:8443 --enrollment-token \"$TOKEN\" \\\n"
    "    --root-keyring root.v1.krg --label site=berlin --label role=pos\n\n"
    "More: docs/images.md.";

int image_inject(int argc, char** argv) {
  Options o("flotilla image inject", kInjectHelp, "FLOTILLA_IMAGE_");
  o.add("output", "where the injected image goes (default: replace INPUT; directories: in place)")
      .add("partition", "disk images: partition number, GPT partition name or ext4 label")
      .add_list("agent", "static flotilla-agent binaries; the one for the image's arch is used (default: the "
                         "flotilla-agent next to this program)")
      .add("hub-url", "the hub's REST URL devices enroll with (agent.yaml hub-url)")
      .add("enrollment-token", "fleet enrollment token (agent.yaml enrollment-token; the file is mode 0600)")
      .add_list("root-key", "pinned bundle-signing root public key: ed25519:<base64> or a .pub file")
      .add("root-keyring", "root keyring file (flotilla key init-root) pinned as /etc/flotilla/root.krg")
      .add("key-threshold", "distinct root keys a bundle needs (agent.yaml key-threshold)", "")
      .add_list("label", "device label k=v (agent.yaml labels)")
      .add("tls-ca-file", "CA certificate (PEM) for ssl:// brokers, installed as /etc/flotilla/ca.pem")
      .add("device-ca", "the hub's device CA certificate (PEM: the hub's <data-dir>/ca/device-ca.pem or GET "
                        "/v1/device-ca), installed as /etc/flotilla/device-ca.pem and pinned (agent.yaml "
                        "device-ca-file); no key goes in, each device gets its own certificate at enrollment")
      .add("director-key", "the hub's director public key (ed25519:<base64> or the hub's director.pub), pinned "
                           "as agent.yaml director-key: devices then act only on desired states it signed")
      .add("k3s-bundle", "signed bundle whose k3s binary and airgap images are preloaded (verified as the device "
                         "will, then its artifacts checked against it)")
      .add("signing-keyring", "with --root-keyring and --k3s-bundle: the signing keyring (.krg) the bundle is "
                              "verified under")
      .add_list("root-chain", "with --signing-keyring: newer root keyrings, ascending, from the pinned one to the "
                              "one that signed the signing keyring")
      .add_list("artifacts-dir", "where the k3s bundle's artifacts are (also BUNDLE.artifacts/)")
      .add("source-date-epoch", "timestamp (seconds) of everything written; default $SOURCE_DATE_EPOCH or the input's")
      .add("o", kOutputHelp, "table");
  std::vector<std::string> pos;
  if (int rc = parse_args(o, argc, argv, pos, 1, 1); rc >= 0) return rc;

  images::InjectOptions in;
  in.input = pos[0];
  in.output = o.get("output");
  in.partition = o.get("partition");
  for (const auto& a : o.get_list("agent")) in.agents.emplace_back(a);
  if (in.agents.empty()) {
    char self[4096] = {0};
    const ssize_t n = ::readlink("/proc/self/exe", self, sizeof self - 1);
    if (n > 0) in.agents.push_back(std::filesystem::path(std::string(self, size_t(n))).parent_path() / "flotilla-agent");
  }
  auto& s = in.settings;
  s.hub_url = o.get("hub-url");
  s.enrollment_token = o.get("enrollment-token");
  for (const auto& k : o.get_list("root-key")) {
    auto pub = bundles::read_public_key(k);
    if (!pub) return fail("--root-key " + k + ": " + pub.error().message, 2);
    s.root_keys.push_back(bundles::public_key_text(*pub));
  }
  s.root_keyring = o.get("root-keyring");
  if (!o.get("key-threshold").empty()) {
    auto t = o.get_int("key-threshold", 1, 32);
    if (!t) return fail(t.error().message, 2);
    s.key_threshold = unsigned(*t);
  }
  auto labels = o.get_map("label");
  if (!labels) return fail(labels.error().message, 2);
  s.labels = *labels;
  s.tls_ca_file = o.get("tls-ca-file");
  s.device_ca_file = o.get("device-ca");
  if (!o.get("director-key").empty()) {
    auto pub = bundles::read_public_key(o.get("director-key"));
    if (!pub) return fail("--director-key " + o.get("director-key") + ": " + pub.error().message, 2);
    s.director_key = bundles::public_key_text(*pub);
  }
  in.k3s_bundle = o.get("k3s-bundle");
  in.signing_keyring = o.get("signing-keyring");
  for (const auto& r : o.get_list("root-chain")) in.root_chain.emplace_back(r);
  if (in.k3s_bundle.empty() && (!in.signing_keyring.empty() || !in.root_chain.empty())) {
    return fail("--signing-keyring and --root-chain are only for checking a --k3s-bundle", 2);
  }
  for (const auto& d : o.get_list("artifacts-dir")) in.artifact_dirs.emplace_back(d);
  std::string date = o.get("source-date-epoch");
  if (date.empty() && std::getenv("SOURCE_DATE_EPOCH")) date = std::getenv("SOURCE_DATE_EPOCH");
  if (!date.empty()) {
    try {
      size_t used = 0;
      in.source_date = std::stoll(date, &used);
      if (used != date.size() || *in.source_date < 0 || *in.source_date > 0xFFFFFFFFll) throw std::out_of_range(date);
    } catch (const std::exception&) {
      return fail("source date '" + date + "' is not a number of seconds since 1970 (0 to 4294967295)", 2);
    }
  }

  auto rep = images::inject(in);
  if (!rep) return fail("image inject: " + rep.error().message, rep.error().code == Errc::invalid_argument ? 2 : 1);
  if (o.get("o") == "json") {
    std::cout << images::manifest_json(*rep, true);
    return 0;
  }
  if (print_structured(o, nlohmann::json::parse(images::manifest_json(*rep, true), nullptr, false))) return 0;
  std::cout << "injected the " << images::arch_name(rep->arch) << " agent into " << rep->output.string() << " ("
            << rep->format << (rep->partition.empty() ? "" : ", partition " + rep->partition) << ")\n"
            << "  arch from " << rep->arch_evidence << ", timestamps " << rep->source_date << "\n";
  for (const auto& f : rep->files) {
    if (f.type == "dir") continue;
    std::cout << "  " << f.path << (f.type == "symlink" ? " -> " + f.target : "  sha256 " + f.sha256.substr(0, 16))
              << "\n";
  }
  if (!rep->output_sha256.empty()) std::cout << "output sha256 " << rep->output_sha256 << "\n";
  std::cout << "manifest " << rep->manifest.string() << "\n";
  return 0;
}

}  // namespace

int cmd_image(int argc, char** argv) {
  const std::string sub = argc > 1 ? argv[1] : "";
  if (sub == "inject") return image_inject(argc, argv);
  std::cerr << "Usage: flotilla image inject INPUT [options]   (flotilla image inject --help)\n";
  return sub == "--help" || sub == "-h" ? 0 : 2;
}

}  // namespace flotilla::cli

// Local commands: bundles on the operator's machine (keys are in keys.cpp).
#include <cstdint>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>

#include "cli.hpp"
#include "output.hpp"
#include "flotilla/bundles/bundle.hpp"
#include "flotilla/bundles/diff.hpp"
#include "flotilla/bundles/overlay.hpp"
#include "flotilla/common/crypto.hpp"
#include "flotilla/common/options.hpp"
#include "key_support.hpp"

namespace flotilla::cli {

using nlohmann::json;

int parse_args(Options& o, int argc, char** argv, std::vector<std::string>& pos, size_t min_pos, size_t max_pos,
               int start) {
  auto r = o.parse(argc, argv, start);
  if (!r) return fail(r.error().message, 2);
  if (o.help_requested()) {
    std::cout << o.help();
    return 0;
  }
  pos = *r;
  // Every command's -o is checked here, before it does anything: an unknown
  // format is refused, never silently printed as a table.
  if (auto s = check_output(o); !s) return fail(s.error().message, 2);
  if (pos.size() < min_pos || pos.size() > max_pos) {
    std::cerr << o.help();
    return 2;
  }
  return -1;
}

int fail(const std::string& message, int code) {
  std::cerr << "flotilla: " << message << "\n";
  return code;
}

namespace {

std::string hex_of(const std::string& raw) { return to_hex(reinterpret_cast<const uint8_t*>(raw.data()), raw.size()); }

json files_json(const google::protobuf::RepeatedPtrField<v1::BundleFile>& fs) {
  json files = json::array();
  for (const auto& f : fs) {
    files.push_back({{"kind", bundles::file_kind_name(f.kind())},
                     {"name", f.name()},
                     {"size", f.content().size()},
                     {"mode", f.mode()},
                     {"sha256", hex_of(f.sha256())}});
  }
  return files;
}

json manifest_json(const v1::SignedBundle& b, const v1::BundleManifest& m) {
  json sigs = json::array();
  for (const auto& s : b.signatures()) sigs.push_back(s.key_id());
  json arch = json::array();
  for (const auto& a : m.target().arch()) arch.push_back(a);
  json artifacts = json::array();
  for (const auto& a : m.artifacts()) {
    artifacts.push_back({{"name", a.name()},
                         {"kind", bundles::artifact_kind_name(a.kind())},
                         {"url", a.url()},
                         {"sha256", hex_of(a.sha256())},
                         {"size", a.size()}});
  }
  json overlays = json::array();
  for (const auto& o : m.overlays()) {
    overlays.push_back({{"selector", o.selector()},
                        {"files", files_json(o.files())},
                        {"k3s_config", std::map<std::string, std::string>(o.k3s_config().begin(), o.k3s_config().end())}});
  }
  return {{"id", bundles::manifest_digest_hex(b).substr(0, 16)},
          {"digest", bundles::manifest_digest_hex(b)},
          {"name", m.name()},
          {"channel", m.channel()},
          {"version", m.version()},
          {"description", m.description()},
          {"k3s_version", m.k3s_version()},
          {"created_at", bundles::format_rfc3339(m.created_unix())},
          {"expires_at", m.expires_unix() ? bundles::format_rfc3339(m.expires_unix()) : ""},
          {"target", {{"arch", arch}, {"labels", json(std::map<std::string, std::string>(
                                                  m.target().labels().begin(), m.target().labels().end()))}}},
          {"files", files_json(m.files())},
          {"artifacts", artifacts},
          {"overlays", overlays},
          {"manifest_bytes", b.manifest().size()},
          {"signed_by", sigs}};
}

// Places the artifact bytes next to the built bundle (hard link, or a copy
// across filesystems) under their sha256, where `bundle push` finds them.
Status stage_artifacts(const std::filesystem::path& dir, const std::vector<bundles::ArtifactSource>& sources) {
  if (sources.empty()) return {};
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return make_error(Errc::io, "cannot create " + dir.string() + ": " + ec.message());
  for (const auto& s : sources) {
    const auto target = dir / s.sha256_hex;
    if (std::filesystem::exists(target)) continue;  // content-addressed: same name, same bytes
    std::filesystem::create_hard_link(s.path, target, ec);
    if (ec) {
      ec.clear();
      std::filesystem::copy_file(s.path, target, ec);
      if (ec) return make_error(Errc::io, "cannot copy " + s.path.string() + " to " + target.string() + ": " + ec.message());
    }
  }
  return {};
}

int bundle_build(int argc, char** argv) {
  Options o("flotilla bundle build",
            "Usage: flotilla bundle build DIR [--out FILE] [--artifacts-dir DIR]\n\n"
            "Reads DIR/bundle.yaml, the files it names and its artifacts and writes an unsigned\n"
            "bundle (docs/bundle-format.md). Artifact hashes and sizes are computed here; their\n"
            "bytes are linked (or copied) as <sha256> into --artifacts-dir (default FILE.artifacts/)\n"
            "for 'flotilla bundle push'. Sign the bundle next with 'flotilla bundle sign'.",
            "FLOTILLA_");
  o.add("out", "output file (default: <name>-<version>.fbundle)")
      .add("artifacts-dir", "where to place artifact bytes (default: <out>.artifacts)");
  std::vector<std::string> pos;
  if (int rc = parse_args(o, argc, argv, pos, 1, 1); rc >= 0) return rc;
  std::vector<bundles::ArtifactSource> sources;
  auto m = bundles::load_spec(pos[0], SystemClock::instance(), &sources);
  if (!m) return fail(m.error().message);
  auto b = bundles::wrap(*m);
  std::string out = o.get("out").empty() ? m->name() + "-" + std::to_string(m->version()) + ".fbundle" : o.get("out");
  const std::string art_dir = o.get("artifacts-dir").empty() ? out + ".artifacts" : o.get("artifacts-dir");
  if (auto s = stage_artifacts(art_dir, sources); !s) return fail(s.error().message);
  if (auto s = bundles::write_bundle_file(out, b); !s) return fail(s.error().message);
  std::cout << "built " << out << ": " << m->name() << " v" << m->version() << " (" << m->files_size() << " files, "
            << m->artifacts_size() << " artifacts, " << m->overlays_size() << " overlays, digest "
            << bundles::manifest_digest_hex(b).substr(0, 16) << "), unsigned\n";
  if (!sources.empty()) std::cout << "artifacts in " << art_dir << "/\n";
  return 0;
}

int bundle_sign(int argc, char** argv) {
  Options o("flotilla bundle sign",
            "Usage: flotilla bundle sign FILE --key KEYFILE [--out FILE]\n\n"
            "Adds an Ed25519 signature over the bundle's exact manifest bytes. Several keys\n"
            "may sign one bundle; devices require the signing keyring's threshold. Sealed\n"
            "keys ask for their passphrase (or read FLOTILLA_KEY_PASSPHRASE).",
            "FLOTILLA_");
  o.add("key", "private key file from 'flotilla key generate'").add("out", "output file (default: sign in place)");
  std::vector<std::string> pos;
  if (int rc = parse_args(o, argc, argv, pos, 1, 1); rc >= 0) return rc;
  if (o.get("key").empty()) return fail("--key KEYFILE is required", 2);
  auto b = bundles::read_bundle_file(pos[0]);
  if (!b) return fail(b.error().message);
  auto key = load_private_key(o.get("key"));
  if (!key) return fail(key.error().message);
  if (auto s = bundles::sign(*b, *key); !s) return fail(s.error().message);
  const std::string out = o.get("out").empty() ? pos[0] : o.get("out");
  if (auto s = bundles::write_bundle_file(out, *b); !s) return fail(s.error().message);
  std::cout << "signed " << out << " with key " << key->pub.key_id << " (" << b->signatures_size()
            << " signature(s))\n";
  return 0;
}

int bundle_verify(int argc, char** argv) {
  Options o("flotilla bundle verify",
            "Usage: flotilla bundle verify FILE --root PINNED.krg [--chain root.vN.krg ...] --signing S.krg\n"
            "       flotilla bundle verify FILE --key PUB [--key PUB ...] [--threshold N]\n\n"
            "Verifies the bundle as a device would: with --root, through the trust chain\n"
            "(root rotations, signing keyring, revoked and expired keys); with --key, against\n"
            "plain public keys. Checks signatures, threshold and expiry, plus arch, labels and\n"
            "the highest applied version when given. Exit 0 when accepted, 1 with the refusal\n"
            "reason otherwise.",
            "FLOTILLA_");
  o.add_list("key", "trusted public key: a .pub file or ed25519:<base64>")
      .add("threshold", "distinct valid signatures required (with --key)", "1")
      .add("root", "root keyring the device pins")
      .add_list("chain", "newer root keyrings, ascending")
      .add("signing", "signing keyring")
      .add("arch", "check the bundle targets this arch (amd64, arm64, arm)")
      .add_list("label", "device label k=v (checks target labels and shows matching overlays)")
      .add("highest", "highest version applied on the bundle's channel (anti-rollback)");
  std::vector<std::string> pos;
  if (int rc = parse_args(o, argc, argv, pos, 1, 1); rc >= 0) return rc;
  if (o.get_list("key").empty() == o.get("root").empty()) return fail("give either --root (and --signing) or --key", 2);
  auto b = bundles::read_bundle_file(pos[0]);
  if (!b) return fail(b.error().message);
  bundles::VerifyPolicy policy;
  policy.arch = o.get("arch");
  auto labels = o.get_map("label");
  if (!labels) return fail(labels.error().message, 2);
  policy.labels = *labels;
  policy.check_labels = !labels->empty();
  bundles::Verdict v;
  if (!o.get("root").empty()) {
    auto t = load_trust(o.get("root"), o.get_list("chain"), o.get("signing"), SystemClock::instance());
    if (!t) return fail(t.error().message);
    if (!t->verdict.ok()) {
      std::cout << "REFUSED " << v1::Reason_Name(t->verdict.reason) << ": " << t->verdict.message << "\n";
      return 1;
    }
    v1::BundleManifest peek;
    if (!o.get("highest").empty() && peek.ParseFromString(b->manifest())) {
      auto h = o.get_int("highest", 0, INT64_MAX);
      if (!h) return fail(h.error().message, 2);
      policy.highest_applied[peek.channel()] = static_cast<uint64_t>(*h);
    }
    v = t->store->verify(*b, policy);
  } else {
    bundles::Keyring ring;
    auto th = o.get_int("threshold", 1, 32);
    if (!th) return fail(th.error().message, 2);
    ring.threshold = static_cast<unsigned>(*th);
    for (const auto& k : o.get_list("key")) {
      auto pub = bundles::read_public_key(k);
      if (!pub) return fail(pub.error().message);
      ring.add(*pub);
    }
    v = bundles::verify(*b, ring, policy);
  }
  if (!v.ok()) {
    std::cout << "REFUSED " << v1::Reason_Name(v.reason) << ": " << v.message << "\n";
    return 1;
  }
  std::cout << "OK " << v.manifest.name() << " v" << v.manifest.version() << " channel " << v.manifest.channel()
            << ", " << b->signatures_size() << " signature(s), expires "
            << bundles::format_rfc3339(v.manifest.expires_unix()) << "\n";
  if (!labels->empty() && v.manifest.overlays_size() > 0) {
    auto r = bundles::resolve(v.manifest, *labels);
    std::cout << "overlays matching these labels:";
    for (int i : r.matched_overlays) std::cout << " [" << i << "] " << v.manifest.overlays(i).selector();
    std::cout << (r.matched_overlays.empty() ? " none" : "") << "\n";
  }
  return 0;
}

Result<std::pair<v1::SignedBundle, v1::BundleManifest>> read_manifest(const std::string& path) {
  auto b = bundles::read_bundle_file(path);
  if (!b) return b.error();
  v1::BundleManifest m;
  if (!m.ParseFromString(b->manifest())) return make_error(Errc::parse, path + ": manifest does not parse");
  return std::pair{*b, m};
}

int bundle_inspect(int argc, char** argv) {
  Options o("flotilla bundle inspect",
            "Usage: flotilla bundle inspect FILE [-o json] [--label k=v ...]\n\n"
            "Shows what a bundle contains: files, artifacts, overlays and who signed it (key\n"
            "ids; 'bundle verify' checks the signatures). With --label, also the files a device\n"
            "with those labels would place after resolving overlays.",
            "FLOTILLA_");
  o.add("o", kOutputHelp, "table").add_list("label", "device label k=v: show the resolved files");
  std::vector<std::string> pos;
  if (int rc = parse_args(o, argc, argv, pos, 1, 1); rc >= 0) return rc;
  auto bm = read_manifest(pos[0]);
  if (!bm) return fail(bm.error().message);
  const auto& [b, m] = *bm;
  auto labels = o.get_map("label");
  if (!labels) return fail(labels.error().message, 2);
  json j = manifest_json(b, m);
  std::optional<bundles::ResolvedBundle> resolved;
  if (!labels->empty()) {
    resolved = bundles::resolve(m, *labels);
    json rf = json::array();
    for (const auto& f : resolved->files) {
      const std::string key = bundles::file_kind_name(f.kind()) + "/" + f.name();
      rf.push_back({{"kind", bundles::file_kind_name(f.kind())},
                    {"name", f.name()},
                    {"size", f.content().size()},
                    {"from", resolved->origin.count(key) ? resolved->origin.at(key) : ""}});
    }
    j["resolved"] = {{"labels", *labels}, {"matched_overlays", resolved->matched_overlays}, {"files", rf}};
  }
  if (print_structured(o, j)) return 0;
  std::cout << "bundle     " << m.name() << " v" << m.version() << " (channel " << m.channel() << ")\n"
            << "id         " << j["id"].get<std::string>() << "\n"
            << "k3s        " << (m.k3s_version().empty() ? "-" : m.k3s_version()) << "\n"
            << "created    " << j["created_at"].get<std::string>() << "\n"
            << "expires    " << j["expires_at"].get<std::string>() << "\n"
            << "size       " << b.manifest().size() << " bytes\n"
            << "signed by  " << (b.signatures_size() ? "" : "(unsigned)");
  for (const auto& s : b.signatures()) std::cout << s.key_id() << " ";
  std::cout << "\nfiles:\n";
  for (const auto& f : m.files()) {
    std::cout << "  " << bundles::file_kind_name(f.kind()) << "\t" << f.name() << "\t" << f.content().size()
              << " bytes\n";
  }
  if (m.artifacts_size()) std::cout << "artifacts:\n";
  for (const auto& a : m.artifacts()) {
    std::cout << "  " << bundles::artifact_kind_name(a.kind()) << "\t" << a.name() << "\t" << a.size()
              << " bytes\tsha256 " << hex_of(a.sha256()).substr(0, 16) << "…\turl " << a.url() << "\n";
  }
  for (int i = 0; i < m.overlays_size(); ++i) {
    const auto& ov = m.overlays(i);
    std::cout << "overlay [" << i << "] selector '" << ov.selector() << "'\n";
    for (const auto& f : ov.files()) {
      std::cout << "  " << bundles::file_kind_name(f.kind()) << "\t" << f.name() << "\t" << f.content().size()
                << " bytes\n";
    }
    std::map<std::string, std::string> kc(ov.k3s_config().begin(), ov.k3s_config().end());
    for (const auto& [k, v] : kc) std::cout << "  k3s-config\t" << k << ": " << v << "\n";
  }
  if (resolved) {
    std::cout << "resolved for labels (overlays";
    for (int i : resolved->matched_overlays) std::cout << " [" << i << "]";
    std::cout << (resolved->matched_overlays.empty() ? " none" : "") << "):\n";
    for (const auto& f : j["resolved"]["files"]) {
      std::cout << "  " << f["kind"].get<std::string>() << "\t" << f["name"].get<std::string>() << "\tfrom "
                << f["from"].get<std::string>() << "\n";
    }
  }
  return 0;
}

int bundle_diff(int argc, char** argv) {
  Options o("flotilla bundle diff",
            "Usage: flotilla bundle diff A.fbundle B.fbundle [-o json]\n\n"
            "What changes from A to B: version, k3s version, expiry, target, files (by content\n"
            "hash and mode), artifacts and overlays. Exit 0 when the manifests are equal, 1 when\n"
            "they differ, 2 on errors (like diff(1)).",
            "FLOTILLA_");
  o.add("o", kOutputHelp, "table");
  std::vector<std::string> pos;
  if (int rc = parse_args(o, argc, argv, pos, 2, 2); rc >= 0) return rc;
  auto a = read_manifest(pos[0]);
  if (!a) return fail(a.error().message, 2);
  auto b = read_manifest(pos[1]);
  if (!b) return fail(b.error().message, 2);
  const auto diff = bundles::diff_manifests(a->second, b->second);
  json j = json::array();
  for (const auto& e : diff) j.push_back({{"change", e.change}, {"item", e.item}, {"from", e.from}, {"to", e.to}});
  if (print_structured(o, j)) {
  } else if (diff.empty()) {
    std::cout << "no differences (" << a->second.name() << " v" << a->second.version() << ")\n";
  } else {
    std::cout << "--- " << pos[0] << " (" << a->second.name() << " v" << a->second.version() << ")\n"
              << "+++ " << pos[1] << " (" << b->second.name() << " v" << b->second.version() << ")\n";
    for (const auto& e : diff) {
      const char mark = e.change == "added" ? '+' : e.change == "removed" ? '-' : '~';
      std::cout << mark << " " << e.item;
      if (e.change == "changed") std::cout << ": " << e.from << " -> " << e.to;
      else std::cout << ": " << (e.change == "added" ? e.to : e.from);
      std::cout << "\n";
    }
  }
  return diff.empty() ? 0 : 1;
}

}  // namespace

int remote_bundle(const std::string& sub, int argc, char** argv);  // bundle_remote.cpp

int cmd_bundle(int argc, char** argv) {
  const std::string sub = argc > 1 ? argv[1] : "";
  if (sub == "build") return bundle_build(argc, argv);
  if (sub == "sign") return bundle_sign(argc, argv);
  if (sub == "verify") return bundle_verify(argc, argv);
  if (sub == "inspect") return bundle_inspect(argc, argv);
  if (sub == "diff") return bundle_diff(argc, argv);
  if (sub == "push" || sub == "list") return remote_bundle(sub, argc, argv);
  return fail("usage: flotilla bundle build|sign|verify|inspect|diff|push|list ... (--help for each)", 2);
}

}  // namespace flotilla::cli

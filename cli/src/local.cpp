// Local commands: keys and bundles on the operator's machine.
#include <iostream>
#include <nlohmann/json.hpp>

#include "cli.hpp"
#include "flotilla/bundles/bundle.hpp"
#include "flotilla/common/crypto.hpp"
#include "flotilla/common/options.hpp"

namespace flotilla::cli {

using nlohmann::json;

int parse_args(Options& o, int argc, char** argv, std::vector<std::string>& pos, size_t min_pos, size_t max_pos) {
  auto r = o.parse(argc, argv, 2);
  if (!r) return fail(r.error().message, 2);
  if (o.help_requested()) {
    std::cout << o.help();
    return 0;
  }
  pos = *r;
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

// Parses options for one subcommand; prints help or the usage error.
// Returns -1 to continue, or the exit code.

int key_generate(int argc, char** argv) {
  Options o("flotilla key generate",
            "Usage: flotilla key generate --out PREFIX\n\n"
            "Writes PREFIX.key (private, mode 0600) and PREFIX.pub. Pin the public key in\n"
            "agent configs (root-keys); keep the private key offline.",
            "FLOTILLA_");
  o.add("out", "path prefix for the two key files").add("force", "overwrite existing files (true/false)", "false");
  std::vector<std::string> pos;
  if (int rc = parse_args(o, argc, argv, pos, 0, 0); rc >= 0) return rc;
  if (o.get("out").empty()) return fail("--out PREFIX is required", 2);
  const std::string priv = o.get("out") + ".key", pub = o.get("out") + ".pub";
  if (!o.get_bool("force") && (std::filesystem::exists(priv) || std::filesystem::exists(pub))) {
    return fail(priv + " or " + pub + " already exists; refusing to overwrite a key (use --force true)");
  }
  auto kp = bundles::generate_key();
  if (auto s = bundles::write_private_key(priv, kp); !s) return fail(s.error().message);
  if (auto s = bundles::write_public_key(pub, kp.pub); !s) return fail(s.error().message);
  std::cout << "key id:     " << kp.pub.key_id << "\n"
            << "public key: " << bundles::public_key_text(kp.pub) << "\n"
            << "wrote " << priv << " (0600) and " << pub << "\n";
  return 0;
}

json manifest_json(const v1::SignedBundle& b, const v1::BundleManifest& m) {
  json files = json::array();
  for (const auto& f : m.files()) {
    files.push_back({{"kind", bundles::file_kind_name(f.kind())},
                     {"name", f.name()},
                     {"size", f.content().size()},
                     {"mode", f.mode()},
                     {"sha256", to_hex(reinterpret_cast<const uint8_t*>(f.sha256().data()), f.sha256().size())}});
  }
  json sigs = json::array();
  for (const auto& s : b.signatures()) sigs.push_back(s.key_id());
  json arch = json::array();
  for (const auto& a : m.target().arch()) arch.push_back(a);
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
          {"files", files},
          {"signed_by", sigs}};
}

int bundle_build(int argc, char** argv) {
  Options o("flotilla bundle build",
            "Usage: flotilla bundle build DIR [--out FILE]\n\n"
            "Reads DIR/bundle.yaml and the files it names and writes an unsigned bundle\n"
            "(docs/bundle-format.md). Sign it next with 'flotilla bundle sign'.",
            "FLOTILLA_");
  o.add("out", "output file (default: <name>-<version>.fbundle)");
  std::vector<std::string> pos;
  if (int rc = parse_args(o, argc, argv, pos, 1, 1); rc >= 0) return rc;
  auto m = bundles::load_spec(pos[0], SystemClock::instance());
  if (!m) return fail(m.error().message);
  auto b = bundles::wrap(*m);
  std::string out = o.get("out").empty() ? m->name() + "-" + std::to_string(m->version()) + ".fbundle" : o.get("out");
  if (auto s = bundles::write_bundle_file(out, b); !s) return fail(s.error().message);
  std::cout << "built " << out << ": " << m->name() << " v" << m->version() << " (" << m->files_size()
            << " files, digest " << bundles::manifest_digest_hex(b).substr(0, 16) << "), unsigned\n";
  return 0;
}

int bundle_sign(int argc, char** argv) {
  Options o("flotilla bundle sign",
            "Usage: flotilla bundle sign FILE --key KEYFILE [--out FILE]\n\n"
            "Adds an Ed25519 signature over the bundle's exact manifest bytes. Several keys\n"
            "may sign one bundle; agents require their configured threshold.",
            "FLOTILLA_");
  o.add("key", "private key file from 'flotilla key generate'").add("out", "output file (default: sign in place)");
  std::vector<std::string> pos;
  if (int rc = parse_args(o, argc, argv, pos, 1, 1); rc >= 0) return rc;
  if (o.get("key").empty()) return fail("--key KEYFILE is required", 2);
  auto key = bundles::read_private_key(o.get("key"));
  if (!key) return fail(key.error().message);
  auto b = bundles::read_bundle_file(pos[0]);
  if (!b) return fail(b.error().message);
  if (auto s = bundles::sign(*b, *key); !s) return fail(s.error().message);
  const std::string out = o.get("out").empty() ? pos[0] : o.get("out");
  if (auto s = bundles::write_bundle_file(out, *b); !s) return fail(s.error().message);
  std::cout << "signed " << out << " with key " << key->pub.key_id << " (" << b->signatures_size()
            << " signature(s))\n";
  return 0;
}

int bundle_verify(int argc, char** argv) {
  Options o("flotilla bundle verify",
            "Usage: flotilla bundle verify FILE --key PUB [--key PUB ...] [--threshold N]\n\n"
            "Verifies the bundle as an agent would (signatures, threshold, expiry, and arch\n"
            "if given). Exit 0 when accepted, 1 with the refusal reason otherwise.",
            "FLOTILLA_");
  o.add_list("key", "trusted public key: a .pub file or ed25519:<base64>")
      .add("threshold", "distinct valid signatures required", "1")
      .add("arch", "check the bundle targets this arch (amd64, arm64, arm)");
  std::vector<std::string> pos;
  if (int rc = parse_args(o, argc, argv, pos, 1, 1); rc >= 0) return rc;
  if (o.get_list("key").empty()) return fail("at least one --key is required", 2);
  bundles::Keyring ring;
  auto th = o.get_int("threshold", 1, 32);
  if (!th) return fail(th.error().message, 2);
  ring.threshold = static_cast<unsigned>(*th);
  for (const auto& k : o.get_list("key")) {
    auto pub = bundles::read_public_key(k);
    if (!pub) return fail(pub.error().message);
    ring.add(*pub);
  }
  auto b = bundles::read_bundle_file(pos[0]);
  if (!b) return fail(b.error().message);
  bundles::VerifyPolicy policy;
  policy.arch = o.get("arch");
  auto v = bundles::verify(*b, ring, policy);
  if (!v.ok()) {
    std::cout << "REFUSED " << v1::Reason_Name(v.reason) << ": " << v.message << "\n";
    return 1;
  }
  std::cout << "OK " << v.manifest.name() << " v" << v.manifest.version() << " channel " << v.manifest.channel()
            << ", " << b->signatures_size() << " signature(s), expires "
            << bundles::format_rfc3339(v.manifest.expires_unix()) << "\n";
  return 0;
}

int bundle_inspect(int argc, char** argv) {
  Options o("flotilla bundle inspect", "Usage: flotilla bundle inspect FILE [-o json]", "FLOTILLA_");
  o.add("o", "output format: table or json", "table");
  std::vector<std::string> pos;
  if (int rc = parse_args(o, argc, argv, pos, 1, 1); rc >= 0) return rc;
  auto b = bundles::read_bundle_file(pos[0]);
  if (!b) return fail(b.error().message);
  v1::BundleManifest m;
  if (!m.ParseFromString(b->manifest())) return fail("manifest does not parse");
  json j = manifest_json(*b, m);
  if (o.get("o") == "json") {
    std::cout << j.dump(2) << "\n";
    return 0;
  }
  std::cout << "bundle     " << m.name() << " v" << m.version() << " (channel " << m.channel() << ")\n"
            << "id         " << j["id"].get<std::string>() << "\n"
            << "k3s        " << (m.k3s_version().empty() ? "-" : m.k3s_version()) << "\n"
            << "created    " << j["created_at"].get<std::string>() << "\n"
            << "expires    " << j["expires_at"].get<std::string>() << "\n"
            << "signed by  " << (b->signatures_size() ? "" : "(unsigned)");
  for (const auto& s : b->signatures()) std::cout << s.key_id() << " ";
  std::cout << "\nfiles:\n";
  for (const auto& f : m.files()) {
    std::cout << "  " << bundles::file_kind_name(f.kind()) << "\t" << f.name() << "\t" << f.content().size()
              << " bytes\n";
  }
  return 0;
}

}  // namespace

int cmd_key(int argc, char** argv) {
  const std::string sub = argc > 1 ? argv[1] : "";
  if (sub == "generate") return key_generate(argc, argv);
  return fail("usage: flotilla key generate --out PREFIX", 2);
}

int remote_bundle(const std::string& sub, int argc, char** argv);  // remote.cpp

int cmd_bundle(int argc, char** argv) {
  const std::string sub = argc > 1 ? argv[1] : "";
  if (sub == "build") return bundle_build(argc, argv);
  if (sub == "sign") return bundle_sign(argc, argv);
  if (sub == "verify") return bundle_verify(argc, argv);
  if (sub == "inspect") return bundle_inspect(argc, argv);
  if (sub == "push" || sub == "list") return remote_bundle(sub, argc, argv);
  return fail("usage: flotilla bundle build|sign|verify|inspect|push|list ... (--help for each)", 2);
}

}  // namespace flotilla::cli

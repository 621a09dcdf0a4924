// flotilla key …: signing keys, root keyrings and signing keyrings on the
// operator's machine. The workflow is in docs/bundle-format.md ("Keys and
// keyrings, step by step").
#include <termios.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <iostream>
#include <nlohmann/json.hpp>

#include "cli.hpp"
#include "output.hpp"
#include "flotilla/bundles/trust.hpp"
#include "flotilla/common/clock.hpp"
#include "flotilla/common/encoding.hpp"
#include "flotilla/common/fs.hpp"
#include "flotilla/common/options.hpp"
#include "key_support.hpp"

namespace flotilla::cli {

using nlohmann::json;

std::optional<std::string> key_passphrase(const std::string& prompt, bool confirm) {
  if (const char* env = std::getenv("FLOTILLA_KEY_PASSPHRASE"); env && *env) return std::string(env);
  if (!::isatty(STDIN_FILENO)) return std::nullopt;
  auto ask = [](const std::string& text) {
    std::cerr << text << std::flush;
    termios old {};
    const bool tty = ::tcgetattr(STDIN_FILENO, &old) == 0;
    if (tty) {
      termios quiet = old;
      quiet.c_lflag &= ~static_cast<tcflag_t>(ECHO);
      ::tcsetattr(STDIN_FILENO, TCSANOW, &quiet);
    }
    std::string line;
    std::getline(std::cin, line);
    if (tty) ::tcsetattr(STDIN_FILENO, TCSANOW, &old);
    std::cerr << "\n";
    return line;
  };
  std::string first = ask(prompt);
  if (confirm && ask("Repeat the passphrase: ") != first) {
    std::cerr << "flotilla: the passphrases differ\n";
    return std::nullopt;
  }
  if (first.empty()) return std::nullopt;
  return first;
}

Result<bundles::KeyPair> load_private_key(const std::string& path) {
  if (!bundles::is_encrypted_private_key(path)) return bundles::read_private_key(path);
  return bundles::read_private_key(path, key_passphrase("Passphrase for " + path + ": ", false));
}

Result<LoadedTrust> load_trust(const std::string& pinned_root, const std::vector<std::string>& chain,
                               const std::string& signing, const Clock& clock) {
  auto root = bundles::read_keyring_file(pinned_root);
  if (!root) return root.error();
  auto store = bundles::TrustStore::pin(*root);
  if (!store) return store.error().with_context(pinned_root);
  LoadedTrust out;
  for (const auto& path : chain) {
    auto r = bundles::read_keyring_file(path);
    if (!r) return r.error();
    *out.trust.add_roots() = *r;
  }
  if (!signing.empty()) {
    auto s = bundles::read_keyring_file(signing);
    if (!s) return s.error();
    *out.trust.mutable_signing() = *s;
  }
  out.verdict = store->update(out.trust, clock);
  out.store = std::move(*store);
  return out;
}

namespace {

int key_generate(int argc, char** argv) {
  Options o("flotilla key generate",
            "Usage: flotilla key generate --out PREFIX [--encrypt]\n\n"
            "Writes PREFIX.key (private, mode 0600) and PREFIX.pub. Use the public key in a\n"
            "root keyring (key init-root) or a signing keyring (key init-signing); keep root\n"
            "private keys offline. With --encrypt the private key is sealed with a passphrase\n"
            "(Argon2id + XSalsa20-Poly1305) taken from FLOTILLA_KEY_PASSPHRASE or asked for.",
            "FLOTILLA_");
  o.add("out", "path prefix for the two key files")
      .add("force", "overwrite existing files (true/false)", "false")
      .flag_only("force")
      .add_switch("encrypt", "protect the private key with a passphrase");
  std::vector<std::string> pos;
  if (int rc = parse_args(o, argc, argv, pos, 0, 0); rc >= 0) return rc;
  if (o.get("out").empty()) return fail("--out PREFIX is required", 2);
  const std::string priv = o.get("out") + ".key", pub = o.get("out") + ".pub";
  if (!o.get_bool("force") && (std::filesystem::exists(priv) || std::filesystem::exists(pub))) {
    return fail(priv + " or " + pub + " already exists; refusing to overwrite a key (use --force true)");
  }
  auto kp = bundles::generate_key();
  if (o.get_bool("encrypt")) {
    auto pass = key_passphrase("New passphrase for " + priv + ": ", true);
    if (!pass) return fail("--encrypt needs a passphrase: set FLOTILLA_KEY_PASSPHRASE or run from a terminal", 2);
    if (auto s = bundles::write_private_key(priv, kp, *pass); !s) return fail(s.error().message);
  } else if (auto s = bundles::write_private_key(priv, kp); !s) {
    return fail(s.error().message);
  }
  if (auto s = bundles::write_public_key(pub, kp.pub); !s) return fail(s.error().message);
  std::cout << "key id:     " << kp.pub.key_id << "\n"
            << "public key: " << bundles::public_key_text(kp.pub) << "\n"
            << "wrote " << priv << " (0600" << (o.get_bool("encrypt") ? ", passphrase-protected" : "") << ") and "
            << pub << "\n";
  return 0;
}

// Seconds from a duration flag ("365d").
Result<int64_t> seconds_of(const Options& o, const std::string& key) {
  auto d = o.get_duration(key);
  if (!d) return d.error().with_context("--" + key);
  if (d->count() <= 0) return make_error(Errc::invalid_argument, "--" + key + " must be above 0");
  return static_cast<int64_t>(d->count() / 1000);
}

Result<std::vector<bundles::PublicKey>> public_keys(const std::vector<std::string>& specs) {
  std::vector<bundles::PublicKey> out;
  for (const auto& k : specs) {
    auto pub = bundles::read_public_key(k);
    if (!pub) return pub.error();
    out.push_back(*pub);
  }
  return out;
}

// Checks the new keyring by its own rules before writing it, so a bad
// threshold is caught on the operator's machine rather than by every device.
int write_new_keyring(const v1::KeyringManifest& k, bundles::KeyringRole role, const std::string& out, bool force) {
  if (out.empty()) return fail("--out FILE is required", 2);
  if (!force && std::filesystem::exists(out)) return fail(out + " already exists (use --force true)");
  auto signed_ring = bundles::wrap_keyring(k);
  if (auto p = bundles::parse_keyring_manifest(signed_ring, role); !p) return fail(p.error().message);
  if (auto s = bundles::write_keyring_file(out, signed_ring); !s) return fail(s.error().message);
  std::cout << "wrote " << out << ": " << (role == bundles::KeyringRole::root ? "root" : "signing") << " keyring v"
            << k.version() << ", " << k.keys_size() << " key(s), threshold " << k.threshold() << ", expires "
            << bundles::format_rfc3339(k.expires_unix()) << ", unsigned\n";
  return 0;
}

Result<std::pair<v1::SignedKeyring, v1::KeyringManifest>> read_keyring_any(const std::string& path) {
  auto r = bundles::read_keyring_file(path);
  if (!r) return r.error();
  v1::KeyringManifest k;
  if (!k.ParseFromString(r->keyring())) return make_error(Errc::parse, path + ": keyring bytes do not parse");
  return std::pair{*r, k};
}

int key_init(int argc, char** argv, bundles::KeyringRole role) {
  const bool root = role == bundles::KeyringRole::root;
  const std::string name = root ? "init-root" : "init-signing";
  Options o("flotilla key " + name,
            root ? "Usage: flotilla key init-root --key A.pub --key B.pub --key C.pub --threshold 2\n"
                   "                              [--expires-in 365d] --out root.v1.krg\n\n"
                   "Writes root keyring v1 (unsigned). Sign it with the threshold of its own keys\n"
                   "(flotilla key sign root.v1.krg --key A.key, then B.key) and pin it in device\n"
                   "images (agent config 'root-keyring')."
                 : "Usage: flotilla key init-signing --key S1.pub [--key S2.pub ...] --threshold 1\n"
                   "                                 [--expires-in 90d] [--key-expires-in D] --out signing.v1.krg\n\n"
                   "Writes signing keyring v1 (unsigned): the keys that sign bundles. Sign it with\n"
                   "the root keyring's threshold of root keys (flotilla key sign).",
            "FLOTILLA_");
  o.add_list("key", "public key: a .pub file, a .key file or ed25519:<base64>")
      .add("threshold", "distinct signatures required", "1")
      .add("expires-in", "how long the keyring is valid", root ? "365d" : "90d")
      .add("description", "free text")
      .add("out", "output file")
      .add("force", "overwrite the output (true/false)", "false")
      .flag_only("force");
  if (!root) o.add("key-expires-in", "also expire each listed key after this long (default: with the keyring)");
  std::vector<std::string> pos;
  if (int rc = parse_args(o, argc, argv, pos, 0, 0); rc >= 0) return rc;
  auto keys = public_keys(o.get_list("key"));
  if (!keys) return fail(keys.error().message, 2);
  if (keys->empty()) return fail("at least one --key is required", 2);
  auto th = o.get_int("threshold", 1, static_cast<int64_t>(bundles::kMaxKeyringKeys));
  if (!th) return fail(th.error().message, 2);
  auto exp = seconds_of(o, "expires-in");
  if (!exp) return fail(exp.error().message, 2);
  int64_t key_exp = 0;
  const int64_t now = SystemClock::instance().now_unix();
  if (!root && !o.get("key-expires-in").empty()) {
    auto ke = seconds_of(o, "key-expires-in");
    if (!ke) return fail(ke.error().message, 2);
    key_exp = now + *ke;
  }
  v1::KeyringManifest k;
  k.set_type(std::string(bundles::keyring_type(role)));
  k.set_version(1);
  k.set_created_unix(now);
  k.set_expires_unix(now + *exp);
  k.set_threshold(static_cast<uint32_t>(*th));
  k.set_description(o.get("description"));
  for (const auto& p : *keys) *k.add_keys() = bundles::trusted_key(p, key_exp);
  return write_new_keyring(k, role, o.get("out"), o.get_bool("force"));
}

// A key given as a key id (32 hex digits) or anything read_public_key takes.
Result<std::string> key_id_of(const std::string& spec) {
  if (spec.size() == 32 && spec.find_first_not_of("0123456789abcdef") == std::string::npos) return spec;
  auto pub = bundles::read_public_key(spec);
  if (!pub) return pub.error();
  return pub->key_id;
}

// key add / key revoke / key rotate: the next version of a keyring.
int key_next(int argc, char** argv, const std::string& sub) {
  const bool rotate = sub == "rotate";
  Options o("flotilla key " + sub,
            sub == "add"
                ? "Usage: flotilla key add SIGNING.krg --key NEW.pub [--key-expires-in D] [--expires-in 90d]\n"
                  "                        --out signing.vN+1.krg\n\n"
                  "Writes the next signing keyring version with the key(s) added (unsigned: sign\n"
                  "it with the root threshold). Devices take it with the next desired state."
            : sub == "revoke"
                ? "Usage: flotilla key revoke SIGNING.krg --key KEY-ID|KEY.pub [--threshold N] [--expires-in 90d]\n"
                  "                           --out signing.vN+1.krg\n\n"
                  "Writes the next signing keyring version without the key and with its id on\n"
                  "the revoked list: devices then refuse its signatures (REASON_KEY_REVOKED) and\n"
                  "refuse older signing keyrings that still trust it (REASON_KEYRING_ROLLBACK).\n"
                  "Sign the result with the root threshold."
                : "Usage: flotilla key rotate ROOT.krg [--add NEW.pub ...] [--remove KEY-ID|KEY.pub ...]\n"
                  "                         [--threshold N] [--expires-in 365d] --out root.vN+1.krg\n\n"
                  "Writes root keyring version N+1. It must be signed by the threshold of root vN's\n"
                  "keys AND the threshold of its own keys (flotilla key sign, once per key);\n"
                  "devices follow v1 -> v2 -> ... and refuse a root missing either. Removing a\n"
                  "root key revokes it; re-sign the signing keyring with the new root's keys.",
            "FLOTILLA_");
  if (rotate) {
    o.add_list("add", "root public key to add").add_list("remove", "root key to remove (key id or key file)");
  } else {
    o.add_list("key", sub == "add" ? "public key to add" : "key to revoke (key id or key file)");
    if (sub == "add") o.add("key-expires-in", "expire the added key(s) after this long");
  }
  o.add("threshold", "new threshold (default: unchanged)")
      .add("expires-in", "validity of the new version", rotate ? "365d" : "90d")
      .add("out", "output file")
      .add("force", "overwrite the output (true/false)", "false")
      .flag_only("force");
  std::vector<std::string> pos;
  if (int rc = parse_args(o, argc, argv, pos, 1, 1); rc >= 0) return rc;
  auto cur = read_keyring_any(pos[0]);
  if (!cur) return fail(cur.error().message);
  const auto role = rotate ? bundles::KeyringRole::root : bundles::KeyringRole::signing;
  auto parsed = bundles::parse_keyring_manifest(cur->first, role);
  if (!parsed) return fail(pos[0] + ": " + parsed.error().message, 2);
  v1::KeyringManifest k = *parsed;
  const int64_t now = SystemClock::instance().now_unix();
  k.set_version(k.version() + 1);
  k.set_created_unix(now);
  auto exp = seconds_of(o, "expires-in");
  if (!exp) return fail(exp.error().message, 2);
  k.set_expires_unix(now + *exp);

  std::vector<std::string> add = rotate ? o.get_list("add") : (sub == "add" ? o.get_list("key") : std::vector<std::string>{});
  std::vector<std::string> remove = rotate ? o.get_list("remove") : (sub == "revoke" ? o.get_list("key") : std::vector<std::string>{});
  if (add.empty() && remove.empty() && o.get("threshold").empty() && !rotate) {
    return fail("nothing to change: give --key", 2);
  }
  int64_t key_exp = 0;
  if (sub == "add" && !o.get("key-expires-in").empty()) {
    auto ke = seconds_of(o, "key-expires-in");
    if (!ke) return fail(ke.error().message, 2);
    key_exp = now + *ke;
  }
  auto added = public_keys(add);
  if (!added) return fail(added.error().message, 2);
  for (const auto& p : *added) {
    for (const auto& existing : k.keys()) {
      if (existing.key_id() == p.key_id) return fail("key " + p.key_id + " is already in " + pos[0], 2);
    }
    for (const auto& r : k.revoked_key_ids()) {
      if (r == p.key_id) return fail("key " + p.key_id + " was revoked; a revoked key never comes back", 2);
    }
    *k.add_keys() = bundles::trusted_key(p, key_exp);
  }
  for (const auto& spec : remove) {
    auto id = key_id_of(spec);
    if (!id) return fail(id.error().message, 2);
    auto* keys = k.mutable_keys();
    auto it = std::find_if(keys->begin(), keys->end(), [&](const v1::TrustedKey& t) { return t.key_id() == *id; });
    if (it == keys->end()) return fail("key " + *id + " is not in " + pos[0], 2);
    keys->erase(it);
    k.add_revoked_key_ids(*id);
  }
  if (!o.get("threshold").empty()) {
    auto th = o.get_int("threshold", 1, static_cast<int64_t>(bundles::kMaxKeyringKeys));
    if (!th) return fail(th.error().message, 2);
    k.set_threshold(static_cast<uint32_t>(*th));
  }
  const int rc = write_new_keyring(k, role, o.get("out"), o.get_bool("force"));
  if (rc == 0 && rotate) {
    std::cout << "next: sign " << o.get("out") << " with " << parsed->threshold() << " key(s) of root v"
              << parsed->version() << " and " << k.threshold() << " of its own keys\n";
  } else if (rc == 0) {
    std::cout << "next: sign " << o.get("out") << " with the root keyring's threshold of root keys\n";
  }
  return rc;
}

int key_sign(int argc, char** argv) {
  Options o("flotilla key sign",
            "Usage: flotilla key sign KEYRING.krg --key PRIVATE.key [--out FILE]\n\n"
            "Adds one Ed25519 signature over the keyring's exact bytes (in place unless --out).\n"
            "Run once per signer; a key signs at most once. Sealed keys ask for their passphrase\n"
            "(or read FLOTILLA_KEY_PASSPHRASE).",
            "FLOTILLA_");
  o.add("key", "private key file").add("out", "output file (default: sign in place)");
  std::vector<std::string> pos;
  if (int rc = parse_args(o, argc, argv, pos, 1, 1); rc >= 0) return rc;
  if (o.get("key").empty()) return fail("--key PRIVATE.key is required", 2);
  auto ring = bundles::read_keyring_file(pos[0]);
  if (!ring) return fail(ring.error().message);
  auto key = load_private_key(o.get("key"));
  if (!key) return fail(key.error().message);
  if (auto s = bundles::sign_keyring(*ring, *key); !s) return fail(s.error().message);
  const std::string out = o.get("out").empty() ? pos[0] : o.get("out");
  if (auto s = bundles::write_keyring_file(out, *ring); !s) return fail(s.error().message);
  std::cout << "signed " << out << " with key " << key->pub.key_id << " (" << ring->signatures_size()
            << " signature(s))\n";
  return 0;
}

int key_inspect(int argc, char** argv) {
  Options o("flotilla key inspect", "Usage: flotilla key inspect KEYRING.krg [-o json]", "FLOTILLA_");
  o.add("o", kOutputHelp, "table");
  std::vector<std::string> pos;
  if (int rc = parse_args(o, argc, argv, pos, 1, 1); rc >= 0) return rc;
  auto r = read_keyring_any(pos[0]);
  if (!r) return fail(r.error().message);
  const auto& [ring, k] = *r;
  json keys = json::array();
  for (const auto& key : k.keys()) {
    keys.push_back({{"key_id", key.key_id()},
                    {"public_key", "ed25519:" + to_base64(reinterpret_cast<const uint8_t*>(key.public_key().data()),
                                                          key.public_key().size())},
                    {"expires_at", key.expires_unix() ? bundles::format_rfc3339(key.expires_unix()) : ""}});
  }
  json sigs = json::array();
  for (const auto& s : ring.signatures()) sigs.push_back(s.key_id());
  json j = {{"type", k.type()},
            {"version", k.version()},
            {"threshold", k.threshold()},
            {"created_at", bundles::format_rfc3339(k.created_unix())},
            {"expires_at", bundles::format_rfc3339(k.expires_unix())},
            {"digest", bundles::keyring_digest_hex(ring)},
            {"keys", keys},
            {"revoked_key_ids", std::vector<std::string>(k.revoked_key_ids().begin(), k.revoked_key_ids().end())},
            {"signed_by", sigs}};
  if (print_structured(o, j)) return 0;
  std::cout << "keyring    " << k.type() << " v" << k.version() << "\n"
            << "threshold  " << k.threshold() << " of " << k.keys_size() << "\n"
            << "created    " << j["created_at"].get<std::string>() << "\n"
            << "expires    " << j["expires_at"].get<std::string>() << "\n"
            << "digest     " << j["digest"].get<std::string>() << "\n"
            << "keys:\n";
  for (const auto& key : keys) {
    std::cout << "  " << key["key_id"].get<std::string>() << "  " << key["public_key"].get<std::string>()
              << (key["expires_at"].get<std::string>().empty() ? "" : "  expires " + key["expires_at"].get<std::string>())
              << "\n";
  }
  for (const auto& id : k.revoked_key_ids()) std::cout << "revoked    " << id << "\n";
  std::cout << "signed by  " << (ring.signatures_size() ? "" : "(unsigned)");
  for (const auto& s : ring.signatures()) std::cout << s.key_id() << " ";
  std::cout << "\n";
  return 0;
}

int key_verify_chain(int argc, char** argv) {
  Options o("flotilla key verify-chain",
            "Usage: flotilla key verify-chain --root PINNED.krg [--chain root.v2.krg ...] [--signing S.krg]\n"
            "                                 [--out trust.pb]\n\n"
            "Checks the chain as a device pinned to PINNED.krg would: each --chain root (in\n"
            "ascending order) must be signed by the previous root's threshold and its own, the\n"
            "signing keyring by the newest root's threshold, and none may have expired.\n"
            "Exit 0 when accepted, 1 with the refusal reason otherwise. With --out, writes the\n"
            "serialized flotilla.v1.Trust the hub attaches to desired states (DesiredState.trust).",
            "FLOTILLA_");
  o.add("root", "the root keyring devices pin (e.g. root.v1.krg)")
      .add_list("chain", "newer root keyrings, ascending")
      .add("signing", "the current signing keyring")
      .add("out", "write the Trust message here when the chain is accepted");
  std::vector<std::string> pos;
  if (int rc = parse_args(o, argc, argv, pos, 0, 0); rc >= 0) return rc;
  if (o.get("root").empty()) return fail("--root PINNED.krg is required", 2);
  auto t = load_trust(o.get("root"), o.get_list("chain"), o.get("signing"), SystemClock::instance());
  if (!t) return fail(t.error().message);
  if (!t->verdict.ok()) {
    std::cout << "REFUSED " << v1::Reason_Name(t->verdict.reason) << ": " << t->verdict.message << "\n";
    return 1;
  }
  std::cout << "OK root v" << t->store->root_version() << " (expires "
            << bundles::format_rfc3339(t->store->root().expires_unix()) << ")";
  if (t->store->has_signing()) {
    std::cout << ", signing keyring v" << t->store->signing_version() << " (" << t->store->signing().keys_size()
              << " key(s), threshold " << t->store->signing().threshold() << ", expires "
              << bundles::format_rfc3339(t->store->signing().expires_unix()) << ")";
  }
  std::cout << "\n";
  if (!o.get("out").empty()) {
    if (auto s = fs::write_file_atomic(o.get("out"), t->trust.SerializeAsString(), 0644); !s) return fail(s.error().message);
    std::cout << "wrote " << o.get("out") << "\n";
  }
  return 0;
}

const char* kKeyUsage =
    "usage: flotilla key <subcommand> ... (--help for each)\n"
    "  generate      make an Ed25519 key pair (--encrypt for a passphrase)\n"
    "  init-root     root keyring v1 from root public keys and a threshold\n"
    "  init-signing  signing keyring v1 from bundle-signing public keys\n"
    "  add           next signing keyring version with a key added\n"
    "  revoke        next signing keyring version with a key revoked\n"
    "  rotate        next root keyring version (sign with old AND new root keys)\n"
    "  sign          add a signature to a keyring\n"
    "  inspect       show a keyring\n"
    "  verify-chain  check a root chain and signing keyring as a device would";

}  // namespace

int cmd_key(int argc, char** argv) {
  const std::string sub = argc > 1 ? argv[1] : "";
  if (sub == "generate") return key_generate(argc, argv);
  if (sub == "init-root") return key_init(argc, argv, bundles::KeyringRole::root);
  if (sub == "init-signing") return key_init(argc, argv, bundles::KeyringRole::signing);
  if (sub == "add" || sub == "revoke" || sub == "rotate") return key_next(argc, argv, sub);
  if (sub == "sign" || sub == "sign-keyring") return key_sign(argc, argv);
  if (sub == "inspect") return key_inspect(argc, argv);
  if (sub == "verify-chain") return key_verify_chain(argc, argv);
  if (sub == "--help" || sub == "-h" || sub == "help") {
    std::cout << kKeyUsage << "\n";
    return 0;
  }
  return fail(kKeyUsage, 2);
}

}  // namespace flotilla::cli

// [unit] tests for bundles/: signing keys and their files, bundle specs,
// reproducible serialization, envelopes and every verify() refusal reason.
#include <sys/stat.h>
#include <unistd.h>

#include <catch2/catch.hpp>

#include "tests/support/temp_dir.hpp"
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "flotilla/bundles/bundle.hpp"
#include "flotilla/bundles/keys.hpp"
#include "flotilla/common/clock.hpp"
#include "flotilla/common/crypto.hpp"
#include "flotilla/common/encoding.hpp"

namespace {

namespace stdfs = std::filesystem;
namespace b = flotilla::bundles;
namespace v1 = flotilla::v1;
using namespace std::chrono_literals;
using flotilla::Errc;

constexpr int64_t kNow = 1'800'000'000;  // FakeClock's default: 2027-01-15T08:00:00Z

using flotilla::test::TempDir;

void write_text(const stdfs::path& p, const std::string& text) {
  stdfs::create_directories(p.parent_path());
  std::ofstream out(p, std::ios::binary);
  out << text;
  if (!out) throw std::runtime_error("cannot write " + p.string());
}

std::string read_text(const stdfs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

unsigned file_mode(const stdfs::path& p) {
  struct stat st {};
  if (::stat(p.c_str(), &st) != 0) return 0xffffffffu;
  return st.st_mode & 07777;
}

// Deterministic keys so failures reproduce.
b::KeyPair key(uint8_t n) {
  flotilla::Bytes seed(32, n);
  auto k = b::key_from_seed(seed);
  if (!k.ok()) throw std::runtime_error("key_from_seed failed");
  return *k;
}

std::string sha256_bytes(const std::string& s) {
  auto h = flotilla::crypto::sha256(s);
  return std::string(h.begin(), h.end());
}

// A valid manifest, built directly (no spec files), expiring a day after kNow.
v1::BundleManifest make_manifest(uint64_t version = 5) {
  v1::BundleManifest m;
  m.set_format_version(1);
  m.set_name("edge-config");
  m.set_channel("stable");
  m.set_version(version);
  m.set_created_unix(kNow);
  m.set_expires_unix(kNow + 86400);
  m.mutable_target()->add_arch("amd64");
  m.mutable_target()->add_arch("arm64");
  (*m.mutable_target()->mutable_labels())["site"] = "berlin";
  (*m.mutable_target()->mutable_labels())["tier"] = "edge";
  auto* f = m.add_files();
  f->set_kind(v1::FILE_KIND_K3S_CONFIG);
  f->set_name("10-flotilla.yaml");
  f->set_content("node-label:\n  - site=berlin\n");
  f->set_mode(0644);
  f->set_sha256(sha256_bytes(f->content()));
  return m;
}

v1::SignedBundle signed_by(const v1::BundleManifest& m, const std::vector<b::KeyPair>& keys) {
  auto bundle = b::wrap(m);
  for (const auto& k : keys) {
    if (!b::sign(bundle, k).ok()) throw std::runtime_error("sign failed");
  }
  return bundle;
}

b::Keyring ring_of(const std::vector<b::KeyPair>& keys, unsigned threshold = 1) {
  b::Keyring r;
  for (const auto& k : keys) r.add(k.pub);
  r.threshold = threshold;
  return r;
}

// A policy matching make_manifest() at kNow on an amd64 device in berlin.
struct Policy {
  flotilla::FakeClock clock{kNow};
  b::VerifyPolicy policy;
  Policy() {
    policy.clock = &clock;
    policy.arch = "amd64";
    policy.labels = {{"site", "berlin"}, {"tier", "edge"}, {"extra", "ok"}};
  }
};

// Writes a bundle spec directory: bundle.yaml plus its files.
struct SpecDir {
  TempDir tmp;
  stdfs::path dir = tmp.path() / "spec";
  SpecDir() {
    write_text(dir / "config.yaml", "write-kubeconfig-mode: \"0644\"\n");
    write_text(dir / "regs.yaml", "mirrors:\n  docker.io:\n    endpoint: [\"https://mirror.local\"]\n");
    write_text(dir / "manifests" / "app.yaml", "apiVersion: v1\nkind: ConfigMap\n");
  }
  void spec(const std::string& yaml) { write_text(dir / "bundle.yaml", yaml); }
};

const char* kGoodSpec =
    "name: edge-config\n"
    "channel: beta\n"
    "version: 7\n"
    "description: berlin edge nodes\n"
    "k3s-version: v1.29.3+k3s1\n"
    "expires-in: 2d\n"
    "target:\n"
    "  arch: [amd64, arm64]\n"
    "  labels:\n"
    "    site: berlin\n"
    "    tier: edge\n"
    "    zone: z1\n"
    "files:\n"
    "  - kind: k3s-config\n"
    "    source: config.yaml\n"
    "    name: 10-flotilla.yaml\n"
    "  - kind: registries\n"
    "    source: regs.yaml\n"
    "    name: my-registries.yaml\n"
    "  - kind: manifest\n"
    "    source: manifests/app.yaml\n"
    "    mode: \"0600\"\n";

void flip_byte(std::string& s, size_t i) { s[i] = static_cast<char>(s[i] ^ 0x01); }

}  // namespace

// ---------------------------------------------------------------- keys

TEST_CASE("private key file is written 0600 and reads back equal", "[unit][bundles]") {
  TempDir tmp;
  const auto path = tmp.path() / "signing.key";
  const auto k = b::generate_key();
  REQUIRE(k.pub.key.size() == 32);
  REQUIRE(k.secret.size() == 64);
  REQUIRE(b::write_private_key(path, k).ok());
  CHECK(file_mode(path) == 0600);

  auto back = b::read_private_key(path);
  REQUIRE(back.ok());
  CHECK(back->pub.key_id == k.pub.key_id);
  CHECK(back->pub.key == k.pub.key);
  CHECK(back->secret == k.secret);
  CHECK(k.pub.key_id == b::key_id_for(k.pub.key));
  CHECK(k.pub.key_id.size() == 32);

  // The read key signs verifiably for the original public key.
  const auto sig = b::sign_detached(*back, "message");
  CHECK(b::verify_detached(k.pub.key, "message", sig));
  CHECK_FALSE(b::verify_detached(k.pub.key, "messagE", sig));
}

TEST_CASE("private key file readable by group or others is refused", "[unit][bundles]") {
  TempDir tmp;
  const auto path = tmp.path() / "signing.key";
  REQUIRE(b::write_private_key(path, key(1)).ok());
  const auto before = read_text(path);
  REQUIRE(::chmod(path.c_str(), 0644) == 0);

  auto r = b::read_private_key(path);
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().code == Errc::permission_denied);
  CHECK_THAT(r.error().message, Catch::Contains("chmod 600"));
  // Refusing does not touch the file.
  CHECK(file_mode(path) == 0644);
  CHECK(read_text(path) == before);

  REQUIRE(::chmod(path.c_str(), 0640) == 0);
  auto group = b::read_private_key(path);
  REQUIRE_FALSE(group.ok());
  CHECK(group.error().code == Errc::permission_denied);
}

TEST_CASE("private key file with a corrupted secret is refused", "[unit][bundles]") {
  TempDir tmp;
  const auto k = key(2);
  const auto other = key(3);
  const auto path = tmp.path() / "signing.key";
  const std::string header = "type: ed25519-private\nkey-id: " + k.pub.key_id + "\npublic: " + b::public_key_text(k.pub) +
                             "\n";

  SECTION("secret of another key") {
    write_text(path, header + "secret: " + flotilla::to_base64(other.secret) + "\n");
    REQUIRE(::chmod(path.c_str(), 0600) == 0);
    auto r = b::read_private_key(path);
    REQUIRE_FALSE(r.ok());
    CHECK(r.error().code == Errc::parse);
    CHECK_THAT(r.error().message, Catch::Contains("do not match"));
  }
  SECTION("truncated secret") {
    flotilla::Bytes short_secret(k.secret.begin(), k.secret.begin() + 40);
    write_text(path, header + "secret: " + flotilla::to_base64(short_secret) + "\n");
    REQUIRE(::chmod(path.c_str(), 0600) == 0);
    auto r = b::read_private_key(path);
    REQUIRE_FALSE(r.ok());
    CHECK(r.error().code == Errc::parse);
    CHECK_THAT(r.error().message, Catch::Contains("64 bytes"));
  }
  SECTION("secret that is not base64") {
    write_text(path, header + "secret: not*base64!\n");
    REQUIRE(::chmod(path.c_str(), 0600) == 0);
    auto r = b::read_private_key(path);
    REQUIRE_FALSE(r.ok());
    CHECK(r.error().code == Errc::parse);
  }
  SECTION("public key file given as a private key") {
    REQUIRE(b::write_public_key(path, k.pub).ok());
    REQUIRE(::chmod(path.c_str(), 0600) == 0);
    auto r = b::read_private_key(path);
    REQUIRE_FALSE(r.ok());
    CHECK(r.error().code == Errc::parse);
    CHECK_THAT(r.error().message, Catch::Contains("not a private key"));
  }
}

TEST_CASE("private key file whose seed half is corrupted is refused", "[unit][bundles]") {
  // Bug: read_private_key only compares the public key with the *second* half
  // of the 64-byte secret (seed || public). A flipped bit in the seed half is
  // accepted, and every signature made with that key then fails to verify.
  TempDir tmp;
  const auto k = key(4);
  const auto path = tmp.path() / "signing.key";
  auto corrupted = k.secret;
  corrupted[5] ^= 0x40;
  write_text(path, "type: ed25519-private\nkey-id: " + k.pub.key_id + "\npublic: " + b::public_key_text(k.pub) +
                       "\nsecret: " + flotilla::to_base64(corrupted) + "\n");
  REQUIRE(::chmod(path.c_str(), 0600) == 0);

  auto r = b::read_private_key(path);
  if (r.ok()) {
    // Show what accepting it means: the key cannot produce valid signatures.
    const auto sig = b::sign_detached(*r, "payload");
    CHECK_FALSE(b::verify_detached(k.pub.key, "payload", sig));
  }
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().code == Errc::parse);
}

TEST_CASE("key file whose type is not a scalar is a parse error, not an exception",
          "[unit][bundles]") {
  // Bug: read_private_key calls (*n)["type"].as<std::string>() without a
  // fallback, so "type: [a]" throws YAML::TypedBadConversion out of a
  // Result-returning function.
  TempDir tmp;
  const auto path = tmp.path() / "weird.key";
  write_text(path, "type: [ed25519-private]\n");
  REQUIRE(::chmod(path.c_str(), 0600) == 0);
  bool returned_parse_error = false;
  try {
    auto r = b::read_private_key(path);
    returned_parse_error = !r.ok() && r.error().code == Errc::parse;
  } catch (const std::exception& e) {
    FAIL_CHECK("read_private_key threw: " << e.what());
  }
  CHECK(returned_parse_error);
}

TEST_CASE("missing private key file is not_found", "[unit][bundles]") {
  TempDir tmp;
  auto r = b::read_private_key(tmp.path() / "absent.key");
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().code == Errc::not_found);
}

TEST_CASE("ed25519: public key text round trips and rejects bad input", "[unit][bundles]") {
  const auto k = key(5);
  const auto text = b::public_key_text(k.pub);
  CHECK_THAT(text, Catch::StartsWith("ed25519:"));
  CHECK(text == "ed25519:" + flotilla::to_base64(k.pub.key));
  auto back = b::parse_public_key_text(text);
  REQUIRE(back.ok());
  CHECK(back->key == k.pub.key);
  CHECK(back->key_id == k.pub.key_id);

  auto no_prefix = b::parse_public_key_text(flotilla::to_base64(k.pub.key));
  REQUIRE_FALSE(no_prefix.ok());
  CHECK(no_prefix.error().code == Errc::parse);
  auto wrong_size = b::parse_public_key_text("ed25519:" + flotilla::to_base64(flotilla::Bytes(31, 1)));
  REQUIRE_FALSE(wrong_size.ok());
  CHECK(wrong_size.error().code == Errc::parse);
  CHECK_FALSE(b::parse_public_key_text("ed25519:%%%").ok());
  CHECK_FALSE(b::parse_public_key_text("rsa:" + flotilla::to_base64(k.pub.key)).ok());
}

TEST_CASE("read_public_key accepts a public file, a private file and ed25519: text", "[unit][bundles]") {
  TempDir tmp;
  const auto k = key(6);
  const auto pub_path = tmp.path() / "k.pub";
  const auto priv_path = tmp.path() / "k.key";
  REQUIRE(b::write_public_key(pub_path, k.pub).ok());
  REQUIRE(b::write_private_key(priv_path, k).ok());
  CHECK(file_mode(pub_path) == 0644);

  for (const std::string& src : {pub_path.string(), priv_path.string(), b::public_key_text(k.pub)}) {
    INFO(src);
    auto r = b::read_public_key(src);
    REQUIRE(r.ok());
    CHECK(r->key == k.pub.key);
    CHECK(r->key_id == k.pub.key_id);
  }
  // The public key file carries no secret.
  CHECK_THAT(read_text(pub_path), !Catch::Contains("secret"));
}

TEST_CASE("key_from_seed is deterministic and checks the seed size", "[unit][bundles]") {
  CHECK(key(9).pub.key == key(9).pub.key);
  CHECK(key(9).pub.key != key(10).pub.key);
  auto bad = b::key_from_seed(flotilla::Bytes(31, 0));
  REQUIRE_FALSE(bad.ok());
  CHECK(bad.error().code == Errc::invalid_argument);
}

// ---------------------------------------------------------------- load_spec

TEST_CASE("load_spec reads a good spec into the manifest", "[unit][bundles]") {
  SpecDir s;
  s.spec(kGoodSpec);
  flotilla::FakeClock clock(kNow);
  auto m = b::load_spec(s.dir, clock);
  INFO((m.ok() ? std::string() : m.error().message));
  REQUIRE(m.ok());
  CHECK(m->format_version() == 1);
  CHECK(m->name() == "edge-config");
  CHECK(m->channel() == "beta");
  CHECK(m->version() == 7);
  CHECK(m->description() == "berlin edge nodes");
  CHECK(m->k3s_version() == "v1.29.3+k3s1");
  CHECK(m->created_unix() == kNow);
  CHECK(m->expires_unix() == kNow + 2 * 86400);
  REQUIRE(m->target().arch_size() == 2);
  CHECK(m->target().arch(0) == "amd64");
  CHECK(m->target().arch(1) == "arm64");
  CHECK(m->target().labels().size() == 3);
  CHECK(m->target().labels().at("zone") == "z1");

  REQUIRE(m->files_size() == 3);
  const auto& cfg = m->files(0);
  CHECK(cfg.kind() == v1::FILE_KIND_K3S_CONFIG);
  CHECK(cfg.name() == "10-flotilla.yaml");
  CHECK(cfg.content() == read_text(s.dir / "config.yaml"));
  CHECK(cfg.sha256() == sha256_bytes(cfg.content()));
  CHECK(cfg.mode() == 0644);

  const auto& regs = m->files(1);
  CHECK(regs.kind() == v1::FILE_KIND_REGISTRIES);
  CHECK(regs.name() == "registries.yaml");  // forced, whatever the spec says
  CHECK(regs.content() == read_text(s.dir / "regs.yaml"));
  CHECK(regs.sha256() == sha256_bytes(regs.content()));

  const auto& app = m->files(2);
  CHECK(app.kind() == v1::FILE_KIND_MANIFEST);
  CHECK(app.name() == "app.yaml");  // defaults to the source's file name
  CHECK(app.mode() == 0600);
  CHECK(flotilla::to_hex(app.sha256()) == flotilla::crypto::sha256_hex("apiVersion: v1\nkind: ConfigMap\n"));
}

TEST_CASE("load_spec defaults: channel stable, expires in 30 days", "[unit][bundles]") {
  SpecDir s;
  s.spec("name: minimal\nversion: 1\n");
  flotilla::FakeClock clock(kNow);
  auto m = b::load_spec(s.dir, clock);
  REQUIRE(m.ok());
  CHECK(m->channel() == "stable");
  CHECK(m->expires_unix() == kNow + 30 * 86400);
  CHECK(m->files_size() == 0);
}

TEST_CASE("load_spec refuses an unknown top-level key, naming it and its line", "[unit][bundles]") {
  SpecDir s;
  s.spec("name: x\nversion: 1\nchanel: beta\n");
  flotilla::FakeClock clock(kNow);
  auto m = b::load_spec(s.dir, clock);
  REQUIRE_FALSE(m.ok());
  CHECK(m.error().code == Errc::invalid_argument);
  CHECK_THAT(m.error().message, Catch::Contains("unknown key 'chanel'"));
  CHECK_THAT(m.error().message, Catch::Contains("line 3"));
  CHECK_THAT(m.error().message, Catch::Contains("bundle.yaml"));
}

TEST_CASE("load_spec requires a positive version", "[unit][bundles]") {
  SpecDir s;
  flotilla::FakeClock clock(kNow);
  s.spec("name: x\n");
  auto missing = b::load_spec(s.dir, clock);
  REQUIRE_FALSE(missing.ok());
  CHECK_THAT(missing.error().message, Catch::Contains("'version' is required"));

  s.spec("name: x\nversion: 0\n");
  auto zero = b::load_spec(s.dir, clock);
  REQUIRE_FALSE(zero.ok());
  CHECK_THAT(zero.error().message, Catch::Contains("'version'"));

  s.spec("name: x\nversion: seven\n");
  auto words = b::load_spec(s.dir, clock);
  REQUIRE_FALSE(words.ok());
  CHECK(words.error().code == Errc::invalid_argument);
}

TEST_CASE("load_spec refuses a source path escaping the bundle directory", "[unit][bundles]") {
  SpecDir s;
  // The escaping file exists, so only the containment check can refuse it.
  write_text(s.tmp.path() / "x", "secret outside\n");
  s.spec("name: x\nversion: 1\nfiles:\n  - kind: manifest\n    source: ../x\n");
  flotilla::FakeClock clock(kNow);
  auto m = b::load_spec(s.dir, clock);
  REQUIRE_FALSE(m.ok());
  CHECK_THAT(m.error().message, Catch::Contains("'../x' is outside the bundle directory"));

  // A symlink inside the directory pointing out is refused the same way.
  stdfs::create_symlink(s.tmp.path() / "x", s.dir / "link.yaml");
  s.spec("name: x\nversion: 1\nfiles:\n  - kind: manifest\n    source: link.yaml\n");
  auto link = b::load_spec(s.dir, clock);
  REQUIRE_FALSE(link.ok());
  CHECK_THAT(link.error().message, Catch::Contains("outside the bundle directory"));

  // An absolute source is refused too.
  s.spec("name: x\nversion: 1\nfiles:\n  - kind: manifest\n    source: " + (s.tmp.path() / "x").string() + "\n");
  auto abs = b::load_spec(s.dir, clock);
  REQUIRE_FALSE(abs.ok());
  CHECK_THAT(abs.error().message, Catch::Contains("outside the bundle directory"));
}

TEST_CASE("load_spec refuses a file listed twice", "[unit][bundles]") {
  SpecDir s;
  flotilla::FakeClock clock(kNow);
  s.spec(
      "name: x\nversion: 1\nfiles:\n"
      "  - kind: manifest\n    source: manifests/app.yaml\n"
      "  - kind: manifest\n    source: config.yaml\n    name: app.yaml\n");
  auto m = b::load_spec(s.dir, clock);
  REQUIRE_FALSE(m.ok());
  CHECK_THAT(m.error().message, Catch::Contains("manifest 'app.yaml' is listed twice"));

  // Two registries files collide because both are named registries.yaml.
  s.spec(
      "name: x\nversion: 1\nfiles:\n"
      "  - kind: registries\n    source: regs.yaml\n"
      "  - kind: registries\n    source: config.yaml\n");
  auto regs = b::load_spec(s.dir, clock);
  REQUIRE_FALSE(regs.ok());
  CHECK_THAT(regs.error().message, Catch::Contains("listed twice"));

  // The same name under different kinds is fine.
  s.spec(
      "name: x\nversion: 1\nfiles:\n"
      "  - kind: manifest\n    source: config.yaml\n"
      "  - kind: k3s-config\n    source: config.yaml\n");
  auto kinds = b::load_spec(s.dir, clock);
  REQUIRE(kinds.ok());
  CHECK(kinds->files_size() == 2);
}

TEST_CASE("load_spec refuses an unknown file kind", "[unit][bundles]") {
  SpecDir s;
  s.spec("name: x\nversion: 1\nfiles:\n  - kind: systemd-unit\n    source: config.yaml\n");
  flotilla::FakeClock clock(kNow);
  auto m = b::load_spec(s.dir, clock);
  REQUIRE_FALSE(m.ok());
  CHECK_THAT(m.error().message, Catch::Contains("unknown file kind 'systemd-unit'"));

  auto k = b::parse_file_kind("registries");
  REQUIRE(k.ok());
  CHECK(*k == v1::FILE_KIND_REGISTRIES);
  CHECK(b::file_kind_name(v1::FILE_KIND_K3S_CONFIG) == "k3s-config");
}

TEST_CASE("load_spec refuses a bundle that would already be expired", "[unit][bundles]") {
  SpecDir s;
  flotilla::FakeClock clock(kNow);
  s.spec("name: x\nversion: 1\nexpires: 2020-01-01T00:00:00Z\n");
  auto past = b::load_spec(s.dir, clock);
  REQUIRE_FALSE(past.ok());
  CHECK_THAT(past.error().message, Catch::Contains("already be expired"));

  s.spec("name: x\nversion: 1\nexpires: 2030-01-01T00:00:00+02:00\n");
  auto offset = b::load_spec(s.dir, clock);
  REQUIRE_FALSE(offset.ok());
  CHECK_THAT(offset.error().message, Catch::Contains("'expires'"));

  s.spec("name: x\nversion: 1\nexpires: 2030-01-01T00:00:00Z\n");
  auto future = b::load_spec(s.dir, clock);
  REQUIRE(future.ok());
  CHECK(future->expires_unix() == 1'893'456'000);
}

TEST_CASE("load_spec refuses names that are not plain and missing sources", "[unit][bundles]") {
  SpecDir s;
  flotilla::FakeClock clock(kNow);
  s.spec("name: ../evil\nversion: 1\n");
  CHECK_FALSE(b::load_spec(s.dir, clock).ok());

  s.spec("name: x\nversion: 1\nfiles:\n  - kind: manifest\n    source: config.yaml\n    name: .hidden\n");
  auto hidden = b::load_spec(s.dir, clock);
  REQUIRE_FALSE(hidden.ok());
  CHECK_THAT(hidden.error().message, Catch::Contains("not a plain file name"));

  s.spec("name: x\nversion: 1\nfiles:\n  - kind: manifest\n    source: nope.yaml\n");
  auto missing = b::load_spec(s.dir, clock);
  REQUIRE_FALSE(missing.ok());
  CHECK(missing.error().code == Errc::not_found);

  CHECK(b::valid_file_name("app.yaml"));
  CHECK_FALSE(b::valid_file_name("a/b"));
  CHECK_FALSE(b::valid_file_name(".."));
  CHECK_FALSE(b::valid_file_name("has space"));
  CHECK_FALSE(b::valid_file_name(std::string(129, 'a')));
}

// ---------------------------------------------------------------- reproducible build

TEST_CASE("serialize_manifest is byte-identical for the same manifest and spec", "[unit][bundles]") {
  SpecDir s;
  s.spec(kGoodSpec);
  flotilla::FakeClock clock(kNow);
  auto m1 = b::load_spec(s.dir, clock);
  auto m2 = b::load_spec(s.dir, clock);
  REQUIRE(m1.ok());
  REQUIRE(m2.ok());
  const auto bytes1 = b::serialize_manifest(*m1);
  CHECK(bytes1 == b::serialize_manifest(*m1));
  CHECK(bytes1 == b::serialize_manifest(*m2));
  CHECK_FALSE(bytes1.empty());

  // Same labels inserted in another order serialize the same (map entries sorted).
  auto reordered = *m1;
  reordered.mutable_target()->mutable_labels()->clear();
  (*reordered.mutable_target()->mutable_labels())["zone"] = "z1";
  (*reordered.mutable_target()->mutable_labels())["tier"] = "edge";
  (*reordered.mutable_target()->mutable_labels())["site"] = "berlin";
  CHECK(b::serialize_manifest(reordered) == bytes1);

  // And the bytes parse back to the same manifest.
  v1::BundleManifest parsed;
  REQUIRE(parsed.ParseFromString(bytes1));
  CHECK(b::serialize_manifest(parsed) == bytes1);

  // A signed bundle of the same manifest with the same key is byte-identical too.
  const auto k = key(11);
  CHECK(b::serialize_envelope(signed_by(*m1, {k})) == b::serialize_envelope(signed_by(*m2, {k})));
}

// ---------------------------------------------------------------- sign / envelope

TEST_CASE("sign refuses a second signature by the same key", "[unit][bundles]") {
  const auto k = key(12);
  auto bundle = b::wrap(make_manifest());
  REQUIRE(b::sign(bundle, k).ok());
  const auto before = b::serialize_envelope(bundle);
  auto again = b::sign(bundle, k);
  REQUIRE_FALSE(again.ok());
  CHECK(again.error().code == Errc::already_exists);
  CHECK_THAT(again.error().message, Catch::Contains(k.pub.key_id));
  CHECK(bundle.signatures_size() == 1);
  CHECK(b::serialize_envelope(bundle) == before);

  REQUIRE(b::sign(bundle, key(13)).ok());
  CHECK(bundle.signatures_size() == 2);
  CHECK(bundle.signatures(0).key_id() == k.pub.key_id);
  CHECK(bundle.signatures(0).signature().size() == 64);
}

TEST_CASE("parse_envelope refuses garbage and oversize input, round trips a bundle", "[unit][bundles]") {
  auto garbage = b::parse_envelope("this is not a protobuf envelope");
  REQUIRE_FALSE(garbage.ok());
  CHECK(garbage.error().code == Errc::parse);

  const std::string huge(b::kMaxEnvelopeBytes + 1, '\0');
  auto big = b::parse_envelope(huge);
  REQUIRE_FALSE(big.ok());
  CHECK(big.error().code == Errc::too_large);

  const auto bundle = signed_by(make_manifest(), {key(14)});
  const auto bytes = b::serialize_envelope(bundle);
  auto back = b::parse_envelope(bytes);
  REQUIRE(back.ok());
  CHECK(back->manifest() == bundle.manifest());
  CHECK(b::serialize_envelope(*back) == bytes);
  CHECK(b::manifest_digest_hex(*back) == flotilla::crypto::sha256_hex(bundle.manifest()));
}

TEST_CASE("bundle files write and read back, a corrupt file is refused", "[unit][bundles]") {
  TempDir tmp;
  const auto path = tmp.path() / "edge.bundle";
  const auto bundle = signed_by(make_manifest(), {key(15)});
  REQUIRE(b::write_bundle_file(path, bundle).ok());
  auto back = b::read_bundle_file(path);
  REQUIRE(back.ok());
  CHECK(b::serialize_envelope(*back) == b::serialize_envelope(bundle));

  write_text(tmp.path() / "bad.bundle", "garbage garbage");
  auto bad = b::read_bundle_file(tmp.path() / "bad.bundle");
  REQUIRE_FALSE(bad.ok());
  CHECK(bad.error().code == Errc::parse);
  CHECK_THAT(bad.error().message, Catch::Contains("bad.bundle"));
}

// ---------------------------------------------------------------- verify

TEST_CASE("verify accepts a bundle signed by 2 of 3 trusted keys with threshold 2", "[unit][bundles]") {
  const auto a = key(21), bk = key(22), c = key(23);
  const auto m = make_manifest();
  const auto bundle = signed_by(m, {a, c});
  Policy p;
  p.policy.check_labels = true;
  p.policy.highest_applied = {{"stable", 4}};
  const auto v = b::verify(bundle, ring_of({a, bk, c}, 2), p.policy);
  INFO(v.message);
  CHECK(v.ok());
  CHECK(v.reason == v1::REASON_NONE);
  CHECK(v.manifest.name() == "edge-config");
  CHECK(v.manifest.version() == 5);
  CHECK(b::serialize_manifest(v.manifest) == b::serialize_manifest(m));
}

TEST_CASE("verify refuses an unsigned bundle: REASON_UNSIGNED", "[unit][bundles]") {
  Policy p;
  const auto v = b::verify(b::wrap(make_manifest()), ring_of({key(24)}), p.policy);
  CHECK(v.reason == v1::REASON_UNSIGNED);
  CHECK_FALSE(v.ok());
}

TEST_CASE("verify refuses a bundle signed only by untrusted keys: REASON_UNKNOWN_KEY", "[unit][bundles]") {
  const auto trusted = key(25), stranger = key(26);
  Policy p;
  const auto v = b::verify(signed_by(make_manifest(), {stranger}), ring_of({trusted}), p.policy);
  INFO(v.message);
  CHECK(v.reason == v1::REASON_UNKNOWN_KEY);
  CHECK_THAT(v.message, Catch::Contains(stranger.pub.key_id));

  // An unknown extra signature next to a trusted one does not matter.
  const auto both = signed_by(make_manifest(), {stranger, trusted});
  CHECK(b::verify(both, ring_of({trusted}), p.policy).ok());
}

TEST_CASE("verify refuses a flipped signature byte: REASON_BAD_SIGNATURE", "[unit][bundles]") {
  const auto k = key(27);
  auto bundle = signed_by(make_manifest(), {k});
  Policy p;
  REQUIRE(b::verify(bundle, ring_of({k}), p.policy).ok());
  flip_byte(*bundle.mutable_signatures(0)->mutable_signature(), 10);
  const auto v = b::verify(bundle, ring_of({k}), p.policy);
  INFO(v.message);
  CHECK(v.reason == v1::REASON_BAD_SIGNATURE);
  CHECK_THAT(v.message, Catch::Contains(k.pub.key_id));

  // A truncated signature is bad too.
  bundle.mutable_signatures(0)->mutable_signature()->resize(63);
  CHECK(b::verify(bundle, ring_of({k}), p.policy).reason == v1::REASON_BAD_SIGNATURE);
}

TEST_CASE("verify refuses a tampered manifest: REASON_BAD_SIGNATURE", "[unit][bundles]") {
  const auto k = key(28);
  auto bundle = signed_by(make_manifest(), {k});
  Policy p;
  REQUIRE(b::verify(bundle, ring_of({k}), p.policy).ok());
  auto& manifest = *bundle.mutable_manifest();
  flip_byte(manifest, manifest.size() / 2);
  const auto v = b::verify(bundle, ring_of({k}), p.policy);
  INFO(v.message);
  CHECK(v.reason == v1::REASON_BAD_SIGNATURE);
}

TEST_CASE("verify refuses too few distinct signers: REASON_THRESHOLD_NOT_MET", "[unit][bundles]") {
  const auto a = key(29), bk = key(30);
  Policy p;
  const auto ring = ring_of({a, bk}, 2);

  SECTION("one valid signature for threshold 2") {
    const auto v = b::verify(signed_by(make_manifest(), {a}), ring, p.policy);
    INFO(v.message);
    CHECK(v.reason == v1::REASON_THRESHOLD_NOT_MET);
    CHECK_THAT(v.message, Catch::Contains("1 valid signature(s), 2 required"));
  }
  SECTION("the same key's signature twice counts once") {
    auto bundle = signed_by(make_manifest(), {a});
    bundle.add_signatures()->CopyFrom(bundle.signatures(0));
    REQUIRE(bundle.signatures_size() == 2);
    const auto v = b::verify(bundle, ring, p.policy);
    INFO(v.message);
    CHECK(v.reason == v1::REASON_THRESHOLD_NOT_MET);
  }
  SECTION("two distinct signers meet it") {
    CHECK(b::verify(signed_by(make_manifest(), {a, bk}), ring, p.policy).ok());
  }
}

TEST_CASE("verify refuses an expired bundle: REASON_BUNDLE_EXPIRED", "[unit][bundles]") {
  const auto k = key(31);
  const auto bundle = signed_by(make_manifest(), {k});  // expires kNow + 1 day
  Policy p;
  p.clock.advance(std::chrono::hours(24) - std::chrono::seconds(1));
  REQUIRE(b::verify(bundle, ring_of({k}), p.policy).ok());
  p.clock.advance(std::chrono::seconds(1));
  const auto v = b::verify(bundle, ring_of({k}), p.policy);
  INFO(v.message);
  CHECK(v.reason == v1::REASON_BUNDLE_EXPIRED);
  CHECK_THAT(v.message, Catch::Contains(b::format_rfc3339(kNow + 86400)));
}

TEST_CASE("verify refuses a bundle for another arch: REASON_WRONG_ARCH", "[unit][bundles]") {
  const auto k = key(32);
  const auto bundle = signed_by(make_manifest(), {k});  // amd64, arm64
  Policy p;
  p.policy.arch = "riscv64";
  const auto v = b::verify(bundle, ring_of({k}), p.policy);
  INFO(v.message);
  CHECK(v.reason == v1::REASON_WRONG_ARCH);
  p.policy.arch = "arm64";
  CHECK(b::verify(bundle, ring_of({k}), p.policy).ok());
}

TEST_CASE("verify refuses a bundle whose target labels do not match: REASON_LABEL_MISMATCH", "[unit][bundles]") {
  const auto k = key(33);
  const auto bundle = signed_by(make_manifest(), {k});  // site=berlin, tier=edge
  Policy p;
  p.policy.check_labels = true;
  p.policy.labels = {{"site", "paris"}, {"tier", "edge"}};
  const auto v = b::verify(bundle, ring_of({k}), p.policy);
  INFO(v.message);
  CHECK(v.reason == v1::REASON_LABEL_MISMATCH);
  CHECK_THAT(v.message, Catch::Contains("site=berlin"));

  p.policy.labels = {{"site", "berlin"}};  // tier absent
  CHECK(b::verify(bundle, ring_of({k}), p.policy).reason == v1::REASON_LABEL_MISMATCH);

  // The same labels are ignored when the policy does not check them.
  p.policy.check_labels = false;
  CHECK(b::verify(bundle, ring_of({k}), p.policy).ok());
}

TEST_CASE("verify refuses a version not above the highest applied: REASON_ROLLBACK_VERSION", "[unit][bundles]") {
  const auto k = key(34);
  const auto bundle = signed_by(make_manifest(5), {k});
  Policy p;
  p.policy.highest_applied = {{"stable", 5}};
  const auto equal = b::verify(bundle, ring_of({k}), p.policy);
  INFO(equal.message);
  CHECK(equal.reason == v1::REASON_ROLLBACK_VERSION);

  p.policy.highest_applied = {{"stable", 9}};
  CHECK(b::verify(bundle, ring_of({k}), p.policy).reason == v1::REASON_ROLLBACK_VERSION);

  p.policy.highest_applied = {{"stable", 4}};
  CHECK(b::verify(bundle, ring_of({k}), p.policy).ok());
  // Another channel's history does not apply.
  p.policy.highest_applied = {{"beta", 100}};
  CHECK(b::verify(bundle, ring_of({k}), p.policy).ok());
}

TEST_CASE("verify refuses a manifest above the policy's size cap: REASON_MANIFEST_TOO_LARGE", "[unit][bundles]") {
  const auto k = key(35);
  const auto bundle = signed_by(make_manifest(), {k});
  Policy p;
  p.policy.max_manifest_bytes = bundle.manifest().size() - 1;
  const auto v = b::verify(bundle, ring_of({k}), p.policy);
  INFO(v.message);
  CHECK(v.reason == v1::REASON_MANIFEST_TOO_LARGE);
  p.policy.max_manifest_bytes = bundle.manifest().size();
  CHECK(b::verify(bundle, ring_of({k}), p.policy).ok());
}

TEST_CASE("verify refuses a validly signed garbage manifest: REASON_MALFORMED_MANIFEST", "[unit][bundles]") {
  const auto k = key(36);
  Policy p;

  SECTION("bytes that are not a protobuf") {
    v1::SignedBundle bundle;
    bundle.set_manifest(std::string("\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", 11));
    REQUIRE(b::sign(bundle, k).ok());
    const auto v = b::verify(bundle, ring_of({k}), p.policy);
    INFO(v.message);
    CHECK(v.reason == v1::REASON_MALFORMED_MANIFEST);
  }
  SECTION("a file whose content does not match its sha256") {
    auto m = make_manifest();
    m.mutable_files(0)->set_content("changed after hashing");
    const auto v = b::verify(signed_by(m, {k}), ring_of({k}), p.policy);
    INFO(v.message);
    CHECK(v.reason == v1::REASON_MALFORMED_MANIFEST);
  }
  SECTION("an unsupported format version") {
    auto m = make_manifest();
    m.set_format_version(2);
    CHECK(b::verify(signed_by(m, {k}), ring_of({k}), p.policy).reason == v1::REASON_MALFORMED_MANIFEST);
  }
  SECTION("a file name with a path") {
    auto m = make_manifest();
    m.mutable_files(0)->set_name("../../etc/passwd");
    CHECK(b::verify(signed_by(m, {k}), ring_of({k}), p.policy).reason == v1::REASON_MALFORMED_MANIFEST);
  }
}

// ---------------------------------------------------------------- RFC 3339

TEST_CASE("parse_rfc3339 and format_rfc3339 round trip UTC times", "[unit][bundles]") {
  auto epoch = b::parse_rfc3339("1970-01-01T00:00:00Z");
  REQUIRE(epoch.ok());
  CHECK(*epoch == 0);
  auto y2k = b::parse_rfc3339("2000-01-01T00:00:00Z");
  REQUIRE(y2k.ok());
  CHECK(*y2k == 946'684'800);
  auto offset_zero = b::parse_rfc3339("2000-01-01T00:00:00+00:00");
  REQUIRE(offset_zero.ok());
  CHECK(*offset_zero == 946'684'800);

  CHECK(b::format_rfc3339(kNow) == "2027-01-15T08:00:00Z");
  for (int64_t t : {int64_t{0}, int64_t{951'782'400} /* 2000-02-29 */, kNow, kNow + 86399}) {
    const auto text = b::format_rfc3339(t);
    auto back = b::parse_rfc3339(text);
    INFO(text);
    REQUIRE(back.ok());
    CHECK(*back == t);
  }
}

TEST_CASE("parse_rfc3339 rejects non-UTC and malformed times", "[unit][bundles]") {
  for (const std::string bad : {"2027-01-31T00:00:00+02:00", "2027-01-31T00:00:00", "2027-01-31T00:00:00-05:00",
                                "2027-01-31", "yesterday", "", "2027-01-31T00:00:00Zjunk"}) {
    auto r = b::parse_rfc3339(bad);
    INFO("'" << bad << "'");
    REQUIRE_FALSE(r.ok());
    CHECK(r.error().code == Errc::parse);
    CHECK_THAT(r.error().message, Catch::Contains("UTC"));
  }
}

// ---------------------------------------------------------------- range checks

TEST_CASE("load_spec refuses unsafe file modes and a version a device cannot store", "[unit][bundles]") {
  SpecDir s;
  flotilla::FakeClock clock(kNow);
  for (const char* mode : {"0666", "0664", "0646", "0775", "4755", "2755", "1755", "01000"}) {
    INFO(mode);
    s.spec(std::string("name: x\nversion: 1\nfiles:\n  - kind: manifest\n    source: manifests/app.yaml\n    mode: \"") +
           mode + "\"\n");
    auto m = b::load_spec(s.dir, clock);
    REQUIRE_FALSE(m.ok());
    CHECK_THAT(m.error().message, Catch::Contains("within 0755"));
  }
  for (const char* mode : {"0755", "0644", "0640", "0600", "0400"}) {
    INFO(mode);
    s.spec(std::string("name: x\nversion: 1\nfiles:\n  - kind: manifest\n    source: manifests/app.yaml\n    mode: \"") +
           mode + "\"\n");
    CHECK(b::load_spec(s.dir, clock).ok());
  }
  s.spec("name: x\nversion: 9223372036854775808\n");  // 2^63
  auto big = b::load_spec(s.dir, clock);
  REQUIRE_FALSE(big.ok());
  CHECK(big.error().code == Errc::invalid_argument);
  s.spec("name: x\nversion: 9223372036854775807\n");
  auto max = b::load_spec(s.dir, clock);
  REQUIRE(max.ok());
  CHECK(max->version() == 9223372036854775807ull);
}

TEST_CASE("load_spec reads switch-from-channels and refuses bad entries", "[unit][bundles]") {
  SpecDir s;
  flotilla::FakeClock clock(kNow);
  s.spec("name: x\nversion: 1\nchannel: beta\nswitch-from-channels: [stable, lts]\n");
  auto m = b::load_spec(s.dir, clock);
  REQUIRE(m.ok());
  CHECK(std::vector<std::string>(m->switch_from_channels().begin(), m->switch_from_channels().end()) ==
        std::vector<std::string>{"stable", "lts"});
  for (const char* bad : {"[beta]", "[stable, stable]", "[\"a/b\"]", "stable"}) {
    INFO(bad);
    s.spec(std::string("name: x\nversion: 1\nchannel: beta\nswitch-from-channels: ") + bad + "\n");
    auto r = b::load_spec(s.dir, clock);
    REQUIRE_FALSE(r.ok());
    CHECK_THAT(r.error().message, Catch::Contains("switch-from-channels"));
  }
}

TEST_CASE("verify refuses a version above 2^63-1: REASON_MALFORMED_MANIFEST", "[unit][bundles]") {
  // SQLite keeps the device's floor as int64: 2^63 would read back negative.
  const auto k = key(36);
  Policy p;
  const auto v = b::verify(signed_by(make_manifest(uint64_t{1} << 63), {k}), ring_of({k}), p.policy);
  INFO(v.message);
  CHECK(v.reason == v1::REASON_MALFORMED_MANIFEST);
  CHECK_THAT(v.message, Catch::Contains("2^63-1"));
  CHECK(b::verify(signed_by(make_manifest(INT64_MAX), {k}), ring_of({k}), p.policy).ok());
}

TEST_CASE("verify refuses group/world-writable, setuid, setgid and sticky files: REASON_UNSAFE_FILE_MODE",
          "[unit][bundles]") {
  const auto k = key(37);
  Policy p;
  for (uint32_t mode : {0666u, 0664u, 0646u, 0622u, 0777u, 04755u, 02755u, 01755u, 010644u}) {
    INFO(std::oct << mode);
    auto m = make_manifest();
    m.mutable_files(0)->set_mode(mode);
    const auto v = b::verify(signed_by(m, {k}), ring_of({k}), p.policy);
    CHECK(v.reason == v1::REASON_UNSAFE_FILE_MODE);
    CHECK_THAT(v.message, Catch::Contains("10-flotilla.yaml"));
    // The same in an overlay.
    auto o = make_manifest();
    auto* ov = o.add_overlays();
    ov->set_selector("");
    *ov->add_files() = m.files(0);
    CHECK(b::verify(signed_by(o, {k}), ring_of({k}), p.policy).reason == v1::REASON_UNSAFE_FILE_MODE);
  }
  for (uint32_t mode : {0u, 0644u, 0600u, 0640u, 0755u, 0400u}) {
    INFO(std::oct << mode);
    auto m = make_manifest();
    m.mutable_files(0)->set_mode(mode);
    CHECK(b::verify(signed_by(m, {k}), ring_of({k}), p.policy).ok());
  }
}

TEST_CASE("verify refuses a bundle of another channel unless it names the device's: REASON_CHANNEL_SWITCH",
          "[unit][bundles]") {
  const auto k = key(38);
  Policy p;
  p.policy.current_channel = "beta";
  p.policy.highest_applied = {{"beta", 9}};
  auto m = make_manifest(1);  // channel stable: no floor there, version 1 would pass per channel
  auto v = b::verify(signed_by(m, {k}), ring_of({k}), p.policy);
  INFO(v.message);
  CHECK(v.reason == v1::REASON_CHANNEL_SWITCH);
  CHECK_THAT(v.message, Catch::Contains("beta"));
  m.add_switch_from_channels("lts");
  CHECK(b::verify(signed_by(m, {k}), ring_of({k}), p.policy).reason == v1::REASON_CHANNEL_SWITCH);
  m.add_switch_from_channels("beta");
  CHECK(b::verify(signed_by(m, {k}), ring_of({k}), p.policy).ok());
  // The floor of the target channel still holds.
  p.policy.highest_applied["stable"] = 3;
  CHECK(b::verify(signed_by(m, {k}), ring_of({k}), p.policy).reason == v1::REASON_ROLLBACK_VERSION);
  // A device with nothing applied yet may start on any channel.
  Policy fresh;
  CHECK(b::verify(signed_by(make_manifest(1), {k}), ring_of({k}), fresh.policy).ok());
}

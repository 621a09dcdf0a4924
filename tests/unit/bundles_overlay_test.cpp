// [unit] tests for bundle specs with artifacts and overlays, overlay
// resolution against device labels, manifest diffs and passphrase-protected
// key files.
#include <sys/stat.h>

#include <catch2/catch.hpp>

#include "bundles_fixtures.hpp"
#include "flotilla/bundles/diff.hpp"
#include "flotilla/bundles/overlay.hpp"
#include "flotilla/common/encoding.hpp"

namespace {

using namespace bundles_fixtures;

// One bundle for shops in three variants: berlin gets a different app manifest
// and a node label, GPU nodes get a device-plugin manifest and kubelet args.
const char* kOverlaySpec =
    "name: shop\n"
    "version: 3\n"
    "k3s-version: v1.30.4+k3s1\n"
    "registries: regs.yaml\n"
    "files:\n"
    "  - kind: k3s-config\n"
    "    source: base.yaml\n"
    "    name: 50-base.yaml\n"
    "  - kind: manifest\n"
    "    source: app.yaml\n"
    "artifacts:\n"
    "  - kind: k3s-binary\n"
    "    source: bin/k3s\n"
    "  - kind: airgap-images\n"
    "    source: bin/images.tar\n"
    "    url: https://mirror.example/images.tar\n"
    "overlays:\n"
    "  - selector: site=berlin\n"
    "    files:\n"
    "      - kind: manifest\n"
    "        source: berlin/app.yaml\n"
    "        name: app.yaml\n"
    "    k3s-config:\n"
    "      node-label: [site=berlin, tier=shop]\n"
    "      kubelet-arg: [max-pods=40]\n"
    "  - selector: gpu,!legacy\n"
    "    files:\n"
    "      - kind: manifest\n"
    "        source: gpu/plugin.yaml\n"
    "    k3s-config:\n"
    "      kubelet-arg: [max-pods=20]\n"
    "      default-runtime: nvidia\n";

struct OverlayDir {
  TempDir tmp;
  stdfs::path dir = tmp.path() / "shop";
  OverlayDir() {
    write_text(dir / "bundle.yaml", kOverlaySpec);
    write_text(dir / "regs.yaml", "mirrors: {}\n");
    write_text(dir / "base.yaml", "disable: [traefik]\n");
    write_text(dir / "app.yaml", "kind: ConfigMap # default\n");
    write_text(dir / "berlin/app.yaml", "kind: ConfigMap # berlin\n");
    write_text(dir / "gpu/plugin.yaml", "kind: DaemonSet # gpu\n");
    write_text(dir / "bin/k3s", std::string(100000, 'k'));
    write_text(dir / "bin/images.tar", "tarball");
  }
};

const v1::BundleFile* find(const b::ResolvedBundle& r, v1::FileKind kind, const std::string& name) {
  for (const auto& f : r.files) {
    if (f.kind() == kind && f.name() == name) return &f;
  }
  return nullptr;
}

}  // namespace

TEST_CASE("load_spec computes artifact hash and size and a relative url", "[unit][bundles][overlay]") {
  OverlayDir d;
  flotilla::FakeClock clock(kNow);
  std::vector<b::ArtifactSource> sources;
  auto m = b::load_spec(d.dir, clock, &sources);
  INFO((m.ok() ? "" : m.error().message));
  REQUIRE(m.ok());
  REQUIRE(m->artifacts_size() == 2);
  const auto& k3s = m->artifacts(0);
  CHECK(k3s.name() == "k3s");
  CHECK(k3s.kind() == v1::ARTIFACT_KIND_K3S_BINARY);
  CHECK(k3s.size() == 100000);
  CHECK(k3s.sha256() == sha(std::string(100000, 'k')));
  CHECK(k3s.url() == flotilla::to_hex(k3s.sha256()));  // relative: resolved against the hub
  CHECK(m->artifacts(1).kind() == v1::ARTIFACT_KIND_AIRGAP_IMAGES);
  CHECK(m->artifacts(1).url() == "https://mirror.example/images.tar");
  REQUIRE(sources.size() == 2);
  CHECK(sources[0].sha256_hex == k3s.url());
  CHECK(sources[0].path == d.dir / "bin/k3s");
  // registries shorthand became a registries file.
  bool has_registries = false;
  for (const auto& f : m->files()) has_registries |= f.kind() == v1::FILE_KIND_REGISTRIES && f.name() == "registries.yaml";
  CHECK(has_registries);
  REQUIRE(m->overlays_size() == 2);
  CHECK(m->overlays(0).selector() == "site=berlin");
  CHECK(m->overlays(0).k3s_config().at("node-label") == "[site=berlin, tier=shop]");
  CHECK(m->overlays(1).k3s_config().at("default-runtime") == "nvidia");
  CHECK(b::check_manifest_shape(*m).empty());
}

TEST_CASE("load_spec refuses bad artifacts and overlays, naming the problem", "[unit][bundles][overlay]") {
  flotilla::FakeClock clock(kNow);
  auto refused = [&](const std::string& yaml, const std::string& needle) {
    OverlayDir d;
    write_text(d.dir / "bundle.yaml", yaml);
    auto m = b::load_spec(d.dir, clock);
    REQUIRE_FALSE(m.ok());
    INFO(m.error().message);
    CHECK(m.error().message.find(needle) != std::string::npos);
  };
  refused("name: x\nversion: 1\nartifacts:\n  - kind: kernel\n    source: bin/k3s\n", "unknown artifact kind 'kernel'");
  refused("name: x\nversion: 1\nartifacts:\n  - kind: k3s-binary\n    source: ../../etc/passwd\n",
          "outside the bundle directory");
  refused("name: x\nversion: 1\nartifacts:\n  - kind: k3s-binary\n    source: bin/k3s\n"
          "  - kind: k3s-binary\n    source: bin/images.tar\n",
          "more than one k3s-binary artifact for arch amd64");
  refused("name: x\nversion: 1\nartifacts:\n  - kind: airgap-images\n    source: bin/missing\n", "cannot open artifact");
  refused("name: x\nversion: 1\noverlays:\n  - files: []\n", "'selector' is required");
  refused("name: x\nversion: 1\noverlays:\n  - selector: \"site in (a\"\n", "unbalanced");
  refused("name: x\nversion: 1\noverlays:\n  - selector: a\n    k3s-config:\n      \"bad key\": 1\n", "bad key");
  refused("name: x\nversion: 1\noverlays:\n  - selector: a\n    colour: red\n", "unknown key 'colour'");
  refused("name: x\nversion: 1\nfiles:\n  - kind: k3s-config\n    source: base.yaml\n    name: 99-flotilla-overlays.yaml\n",
          "reserved");
}

TEST_CASE("overlays: one bundle resolves to the right files and config per device labels", "[unit][bundles][overlay]") {
  OverlayDir d;
  flotilla::FakeClock clock(kNow);
  auto m = b::load_spec(d.dir, clock);
  REQUIRE(m.ok());

  SECTION("a plain device gets the base files only, no overlay drop-in") {
    auto r = b::resolve(*m, {{"site", "paris"}});
    CHECK(r.matched_overlays.empty());
    CHECK(r.k3s_config.empty());
    REQUIRE(r.files.size() == 3);
    CHECK(find(r, v1::FILE_KIND_MANIFEST, "app.yaml")->content() == "kind: ConfigMap # default\n");
    CHECK(find(r, v1::FILE_KIND_K3S_CONFIG, b::kOverlayDropInName) == nullptr);
  }
  SECTION("berlin replaces app.yaml and sets node labels") {
    auto r = b::resolve(*m, {{"site", "berlin"}});
    CHECK(r.matched_overlays == std::vector<int>{0});
    REQUIRE(r.files.size() == 4);
    CHECK(find(r, v1::FILE_KIND_MANIFEST, "app.yaml")->content() == "kind: ConfigMap # berlin\n");
    CHECK(r.origin.at("manifest/app.yaml") == "overlay[0]");
    const auto* drop = find(r, v1::FILE_KIND_K3S_CONFIG, b::kOverlayDropInName);
    REQUIRE(drop != nullptr);
    CHECK(drop->content() ==
          "# Generated by Flotilla from the bundle's matching overlays. Do not edit.\n"
          "kubelet-arg: [max-pods=40]\n"
          "node-label: [site=berlin, tier=shop]\n");
    CHECK(drop->sha256() == sha(drop->content()));
  }
  SECTION("a berlin GPU node gets both overlays; the later one wins on kubelet-arg") {
    auto r = b::resolve(*m, {{"site", "berlin"}, {"gpu", "a100"}});
    CHECK(r.matched_overlays == std::vector<int>{0, 1});
    REQUIRE(r.files.size() == 5);
    CHECK(find(r, v1::FILE_KIND_MANIFEST, "plugin.yaml") != nullptr);
    CHECK(r.k3s_config.at("kubelet-arg") == "[max-pods=20]");
    CHECK(r.k3s_config.at("node-label") == "[site=berlin, tier=shop]");
    CHECK(find(r, v1::FILE_KIND_K3S_CONFIG, b::kOverlayDropInName)->content() ==
          "# Generated by Flotilla from the bundle's matching overlays. Do not edit.\n"
          "default-runtime: nvidia\n"
          "kubelet-arg: [max-pods=20]\n"
          "node-label: [site=berlin, tier=shop]\n");
  }
  SECTION("a legacy GPU node does not match the gpu overlay (selector negation)") {
    auto r = b::resolve(*m, {{"gpu", "k80"}, {"legacy", "true"}});
    CHECK(r.matched_overlays.empty());
  }
  SECTION("resolution is deterministic and sorted by (kind, name)") {
    const b::Labels labels{{"site", "berlin"}, {"gpu", "x"}};
    auto r1 = b::resolve(*m, labels);
    auto r2 = b::resolve(*m, labels);
    REQUIRE(r1.files.size() == r2.files.size());
    for (size_t i = 0; i < r1.files.size(); ++i) {
      CHECK(r1.files[i].SerializeAsString() == r2.files[i].SerializeAsString());
      if (i > 0) {
        CHECK(std::make_pair(static_cast<int>(r1.files[i - 1].kind()), r1.files[i - 1].name()) <
              std::make_pair(static_cast<int>(r1.files[i].kind()), r1.files[i].name()));
      }
    }
  }
}

TEST_CASE("diff_manifests reports version, files, artifacts and overlays", "[unit][bundles][overlay]") {
  OverlayDir d;
  flotilla::FakeClock clock(kNow);
  auto a = b::load_spec(d.dir, clock);
  REQUIRE(a.ok());
  CHECK(b::diff_manifests(*a, *a).empty());

  auto bm = *a;
  bm.set_version(4);
  bm.set_k3s_version("v1.31.0+k3s1");
  bm.mutable_files(0)->set_content("changed");
  bm.mutable_files(0)->set_sha256(sha("changed"));
  *bm.add_files() = file(v1::FILE_KIND_MANIFEST, "new.yaml", "x");
  bm.mutable_artifacts()->RemoveLast();
  (*bm.mutable_overlays(1)->mutable_k3s_config())["default-runtime"] = "crun";
  bm.mutable_overlays(0)->set_selector("site=munich");

  auto diff = b::diff_manifests(*a, bm);
  auto has = [&](const std::string& change, const std::string& item) {
    for (const auto& e : diff) {
      if (e.change == change && e.item == item) return true;
    }
    return false;
  };
  CHECK(has("changed", "version"));
  CHECK(has("changed", "k3s_version"));
  CHECK(has("changed", "file " + b::file_kind_name(a->files(0).kind()) + "/" + a->files(0).name()));
  CHECK(has("added", "file manifest/new.yaml"));
  CHECK(has("removed", "artifact images.tar"));
  CHECK(has("changed", "overlay[1] k3s-config default-runtime"));
  CHECK(has("changed", "overlay[0] selector"));
  CHECK(diff.size() == 7);
}

TEST_CASE("passphrase-protected key: 0600, reads back with the passphrase, refuses without or wrong",
          "[unit][bundles][keys]") {
  TempDir tmp;
  const auto path = tmp.path() / "root-a.key";
  const auto k = key(7);
  // Cheap KDF limits keep the test fast; the file records them.
  const b::PassphraseCost cheap{1, 8u << 20};
  REQUIRE(b::write_private_key(path, k, "correct horse", cheap).ok());
  struct stat st {};
  REQUIRE(::stat(path.c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0600);
  CHECK(b::is_encrypted_private_key(path));
  // The seed must not be in the file in any form we know.
  std::ifstream in(path);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  CHECK(text.find(flotilla::to_base64(k.secret)) == std::string::npos);
  CHECK(text.find("\nsecret: ") == std::string::npos);

  auto none = b::read_private_key(path);
  REQUIRE_FALSE(none.ok());
  CHECK(none.error().code == flotilla::Errc::unauthenticated);
  CHECK(none.error().message.find("FLOTILLA_KEY_PASSPHRASE") != std::string::npos);
  auto wrong = b::read_private_key(path, std::string("wrong"));
  REQUIRE_FALSE(wrong.ok());
  CHECK(wrong.error().message.find("wrong passphrase") != std::string::npos);

  auto right = b::read_private_key(path, std::string("correct horse"));
  REQUIRE(right.ok());
  CHECK(right->secret == k.secret);
  CHECK(right->pub.key_id == k.pub.key_id);
  // The public half is readable without the passphrase.
  auto pub = b::read_public_key(path.string());
  REQUIRE(pub.ok());
  CHECK(pub->key_id == k.pub.key_id);
  // Unprotected keys still read without a passphrase (and ignore one).
  REQUIRE(b::write_private_key(tmp.path() / "plain.key", k).ok());
  CHECK_FALSE(b::is_encrypted_private_key(tmp.path() / "plain.key"));
  CHECK(b::read_private_key(tmp.path() / "plain.key").ok());
}

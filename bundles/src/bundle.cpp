#include "flotilla/bundles/bundle.hpp"

#include <google/protobuf/io/coded_stream.h>
#include <google/protobuf/io/zero_copy_stream_impl_lite.h>
#include <yaml-cpp/yaml.h>

#include <cctype>
#include <cstdint>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <set>

#include "flotilla/common/crypto.hpp"
#include "flotilla/common/fs.hpp"
#include "flotilla/common/options.hpp"
#include "flotilla/bundles/selector.hpp"

namespace flotilla::bundles {

namespace {

template <class Msg>
std::string serialize_deterministic(const Msg& m) {
  std::string out;
  {
    google::protobuf::io::StringOutputStream sos(&out);
    google::protobuf::io::CodedOutputStream cos(&sos);
    cos.SetSerializationDeterministic(true);
    m.SerializeToCodedStream(&cos);
  }
  return out;
}

Error spec_error(const std::filesystem::path& dir, const std::string& msg) {
  return make_error(Errc::invalid_argument, (dir / "bundle.yaml").string() + ": " + msg);
}

}  // namespace

std::string file_kind_name(v1::FileKind k) {
  switch (k) {
    case v1::FILE_KIND_K3S_CONFIG: return "k3s-config";
    case v1::FILE_KIND_REGISTRIES: return "registries";
    case v1::FILE_KIND_MANIFEST: return "manifest";
    default: return "unspecified";
  }
}

Result<v1::FileKind> parse_file_kind(const std::string& name) {
  if (name == "k3s-config") return v1::FILE_KIND_K3S_CONFIG;
  if (name == "registries") return v1::FILE_KIND_REGISTRIES;
  if (name == "manifest") return v1::FILE_KIND_MANIFEST;
  return make_error(Errc::invalid_argument,
                    "unknown file kind '" + name + "' (use k3s-config, registries or manifest)");
}

bool valid_file_name(const std::string& name) {
  if (name.empty() || name.size() > 128 || name[0] == '.') return false;
  for (unsigned char c : name) {
    if (c == '/' || c == '\\' || c < 0x21 || c > 0x7e) return false;
  }
  return true;
}

Result<int64_t> parse_rfc3339(const std::string& text) {
  std::tm tm{};
  const char* end = strptime(text.c_str(), "%Y-%m-%dT%H:%M:%S", &tm);
  if (!end || (std::string(end) != "Z" && std::string(end) != "+00:00")) {
    return make_error(Errc::parse, "time '" + text + "' must be RFC 3339 UTC, like 2027-01-31T00:00:00Z");
  }
  return static_cast<int64_t>(timegm(&tm));
}

std::string format_rfc3339(int64_t unix_seconds) {
  std::time_t t = static_cast<std::time_t>(unix_seconds);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

std::string artifact_kind_name(v1::ArtifactKind k) {
  switch (k) {
    case v1::ARTIFACT_KIND_K3S_BINARY: return "k3s-binary";
    case v1::ARTIFACT_KIND_AIRGAP_IMAGES: return "airgap-images";
    default: return "unspecified";
  }
}

Result<v1::ArtifactKind> parse_artifact_kind(const std::string& name) {
  if (name == "k3s-binary") return v1::ARTIFACT_KIND_K3S_BINARY;
  if (name == "airgap-images") return v1::ARTIFACT_KIND_AIRGAP_IMAGES;
  return make_error(Errc::invalid_argument, "unknown artifact kind '" + name + "' (use k3s-binary or airgap-images)");
}

bool valid_k3s_config_key(const std::string& key) {
  if (key.empty() || key.size() > 128 || !std::isalnum(static_cast<unsigned char>(key[0]))) return false;
  for (size_t i = 0; i < key.size(); ++i) {
    const unsigned char c = key[i];
    if (std::isalnum(c) || c == '-' || c == '_' || c == '.') continue;
    if (c == '+' && i + 1 == key.size()) continue;
    return false;
  }
  return true;
}

namespace {

// A path named in bundle.yaml, which must stay inside the bundle directory
// after symlinks are resolved: a spec must not pull in /etc/shadow.
Result<std::filesystem::path> spec_source(const std::filesystem::path& dir, const std::string& what,
                                          const std::string& source) {
  if (source.empty()) return spec_error(dir, what + ": every entry needs a 'source' path");
  std::filesystem::path src = dir / source;
  auto canon_dir = std::filesystem::weakly_canonical(dir);
  auto canon_src = std::filesystem::weakly_canonical(src);
  if (canon_src.string().rfind(canon_dir.string() + "/", 0) != 0) {
    return spec_error(dir, what + ": source '" + source + "' is outside the bundle directory");
  }
  return src;
}

// One `files:` entry (base or overlay) into a BundleFile.
Result<v1::BundleFile> spec_file(const std::filesystem::path& dir, const std::string& what, const YAML::Node& f) {
  if (!f.IsMap()) return spec_error(dir, what + ": each entry must be a mapping with kind and source");
  auto kind = parse_file_kind(f["kind"].as<std::string>(""));
  if (!kind) return spec_error(dir, what + ": " + kind.error().message);
  auto src = spec_source(dir, what, f["source"].as<std::string>(""));
  if (!src) return src.error();
  std::string name = f["name"].as<std::string>(src->filename().string());
  if (*kind == v1::FILE_KIND_REGISTRIES) name = "registries.yaml";
  if (!valid_file_name(name)) return spec_error(dir, what + ": '" + name + "' is not a plain file name");
  if (name == kOverlayDropInName || name == kNodeDropInName) {
    return spec_error(dir, what + ": '" + name + "' is reserved for a drop-in Flotilla writes itself");
  }
  auto content = fs::read_file(*src, kMaxManifestBytes);
  if (!content) return content.error().with_context("bundle file");
  v1::BundleFile bf;
  bf.set_kind(*kind);
  bf.set_name(name);
  bf.set_content(*content);
  const auto mode = std::stoul(f["mode"].as<std::string>("0644"), nullptr, 8);
  if (mode > 0777 || !safe_file_mode(static_cast<uint32_t>(mode))) {
    return spec_error(dir, what + ": mode of '" + name + "' must be permission bits within 0755: devices refuse "
                           "group- or world-writable files and setuid, setgid or sticky bits");
  }
  bf.set_mode(static_cast<uint32_t>(mode));
  auto h = crypto::sha256(*content);
  bf.set_sha256(std::string(h.begin(), h.end()));
  return bf;
}

// Hashes an artifact file in chunks: a k3s binary or an image tarball must
// not be read into memory whole.
Result<std::pair<std::string, uint64_t>> hash_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return make_error(Errc::not_found, "cannot open artifact " + path.string());
  crypto::Sha256Stream h;
  std::vector<char> buf(1 << 16);
  uint64_t total = 0;
  while (in) {
    in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    const auto n = static_cast<size_t>(in.gcount());
    if (n == 0) break;
    total += n;
    if (total > kMaxArtifactBytes) {
      return make_error(Errc::too_large, "artifact " + path.string() + " is above the " +
                                             std::to_string(kMaxArtifactBytes) + "-byte cap");
    }
    h.update(reinterpret_cast<const uint8_t*>(buf.data()), n);
  }
  if (in.bad()) return make_error(Errc::io, "reading artifact " + path.string() + " failed");
  auto d = h.finish();
  return std::pair<std::string, uint64_t>{std::string(d.begin(), d.end()), total};
}

// A k3s-config value from bundle.yaml as one line of YAML: scalars as written,
// lists and maps in flow style ("[a, b]"), so the rendered drop-in keeps the
// types the author meant and one key can never spill into the next line.
Result<std::string> k3s_value_text(const YAML::Node& v) {
  if (v.IsScalar()) return v.as<std::string>();
  YAML::Emitter e;
  e.SetSeqFormat(YAML::Flow);
  e.SetMapFormat(YAML::Flow);
  e << v;
  if (!e.good()) return make_error(Errc::invalid_argument, e.GetLastError());
  return std::string(e.c_str());
}

bool single_line(const std::string& s) { return s.find_first_of("\r\n") == std::string::npos; }

}  // namespace

Result<v1::BundleManifest> load_spec(const std::filesystem::path& dir, const Clock& clock) {
  return load_spec(dir, clock, nullptr);
}

Result<v1::BundleManifest> load_spec(const std::filesystem::path& dir, const Clock& clock,
                                     std::vector<ArtifactSource>* sources) {
  const auto spec_path = dir / "bundle.yaml";
  auto text = fs::read_file(spec_path, 1 << 20);
  if (!text) return text.error().with_context("read bundle spec");
  YAML::Node y;
  try {
    y = YAML::Load(*text);
  } catch (const YAML::Exception& e) {
    return spec_error(dir, e.what());
  }
  if (!y.IsMap()) return spec_error(dir, "top level must be a mapping");
  static const std::set<std::string> known = {"name",       "channel",     "version", "description", "expires",
                                              "expires-in", "k3s-version", "target",  "files",       "registries",
                                              "artifacts",  "overlays",    "switch-from-channels", "health"};
  for (const auto& kv : y) {
    auto key = kv.first.as<std::string>();
    if (!known.count(key)) return spec_error(dir, "line " + std::to_string(kv.first.Mark().line + 1) +
                                                      ": unknown key '" + key + "'");
  }
  v1::BundleManifest m;
  m.set_format_version(1);
  if (sources) sources->clear();
  try {
    m.set_name(y["name"].as<std::string>(""));
    if (m.name().empty() || !valid_file_name(m.name())) {
      return spec_error(dir, "'name' is required and must be a plain name (letters, digits, - _ .)");
    }
    m.set_channel(y["channel"].as<std::string>("stable"));
    if (!valid_file_name(m.channel())) return spec_error(dir, "'channel' must be a plain name");
    if (auto from = y["switch-from-channels"]) {
      if (!from.IsSequence()) return spec_error(dir, "'switch-from-channels' must be a list of channel names");
      std::set<std::string> seen_channels;
      for (const auto& c : from) {
        const auto ch = c.as<std::string>();
        if (!valid_file_name(ch) || ch == m.channel() || !seen_channels.insert(ch).second) {
          return spec_error(dir, "'switch-from-channels': '" + ch + "' must be a plain channel name, other than "
                                 "'channel' and listed once");
        }
        m.add_switch_from_channels(ch);
      }
    }
    if (!y["version"]) return spec_error(dir, "'version' is required (a whole number above 0)");
    // int64: devices keep their anti-rollback floor as a SQLite integer.
    int64_t version = y["version"].as<int64_t>();
    if (version <= 0) return spec_error(dir, "'version' must be above 0 (and at most 9223372036854775807)");
    m.set_version(static_cast<uint64_t>(version));
    m.set_description(y["description"].as<std::string>(""));
    m.set_k3s_version(y["k3s-version"].as<std::string>(""));
    m.set_created_unix(clock.now_unix());
    if (y["expires"]) {
      auto t = parse_rfc3339(y["expires"].as<std::string>());
      if (!t) return spec_error(dir, "'expires': " + t.error().message);
      m.set_expires_unix(*t);
    } else {
      auto d = parse_duration(y["expires-in"].as<std::string>("30d"));
      if (!d) return spec_error(dir, "'expires-in': " + d.error().message);
      m.set_expires_unix(m.created_unix() + d->count() / 1000);
    }
    if (m.expires_unix() <= m.created_unix()) return spec_error(dir, "the bundle would already be expired");
    if (auto t = y["target"]) {
      if (auto arch = t["arch"]) {
        if (arch.IsScalar()) m.mutable_target()->add_arch(arch.as<std::string>());
        else for (const auto& a : arch) m.mutable_target()->add_arch(a.as<std::string>());
      }
      if (auto labels = t["labels"]) {
        for (const auto& kv : labels) {
          (*m.mutable_target()->mutable_labels())[kv.first.as<std::string>()] = kv.second.as<std::string>();
        }
      }
    }
    std::set<std::pair<int, std::string>> seen;
    auto add_base = [&](const YAML::Node& f) -> Status {
      auto bf = spec_file(dir, "files", f);
      if (!bf) return bf.error();
      if (!seen.insert({bf->kind(), bf->name()}).second) {
        return spec_error(dir, "files: " + file_kind_name(bf->kind()) + " '" + bf->name() + "' is listed twice");
      }
      *m.add_files() = std::move(*bf);
      return {};
    };
    for (const auto& f : y["files"]) FLOTILLA_TRY_STATUS(add_base(f));
    if (auto r = y["registries"]) {
      // Shorthand for a files entry of kind registries.
      YAML::Node f;
      f["kind"] = "registries";
      f["source"] = r.as<std::string>();
      FLOTILLA_TRY_STATUS(add_base(f));
    }

    std::set<std::string> artifact_names;
    for (const auto& a : y["artifacts"]) {
      if (!a.IsMap()) return spec_error(dir, "artifacts: each entry must be a mapping with kind and source");
      auto kind = parse_artifact_kind(a["kind"].as<std::string>(""));
      if (!kind) return spec_error(dir, "artifacts: " + kind.error().message);
      std::vector<std::string> arches;
      if (auto arch = a["arch"]) {
        if (arch.IsScalar()) arches.push_back(arch.as<std::string>());
        else for (const auto& x : arch) arches.push_back(x.as<std::string>());
        for (const auto& x : arches) {
          if (!valid_arch(x)) return spec_error(dir, "artifacts: unknown arch '" + x + "' (amd64, arm64, arm)");
        }
      }
      auto src = spec_source(dir, "artifacts", a["source"].as<std::string>(""));
      if (!src) return src.error();
      const std::string name = a["name"].as<std::string>(src->filename().string());
      if (!valid_file_name(name)) return spec_error(dir, "artifacts: '" + name + "' is not a plain file name");
      if (!artifact_names.insert(name).second) return spec_error(dir, "artifacts: '" + name + "' is listed twice");
      auto hashed = hash_file(*src);
      if (!hashed) return spec_error(dir, "artifacts: " + hashed.error().message);
      if (hashed->second == 0) return spec_error(dir, "artifacts: '" + name + "' is empty");
      const std::string hex = to_hex(hashed->first);
      auto* art = m.add_artifacts();
      art->set_name(name);
      art->set_kind(*kind);
      // Relative by default: devices resolve it against the hub that serves
      // them (DesiredState.artifact_base_url), so one bundle works for any hub.
      art->set_url(a["url"].as<std::string>(hex));
      if (art->url().empty() || !single_line(art->url())) return spec_error(dir, "artifacts: bad url for '" + name + "'");
      art->set_sha256(hashed->first);
      art->set_size(hashed->second);
      for (const auto& x : arches) art->add_arch(x);
      if (sources) sources->push_back({hex, *src});
    }
    if (m.artifacts_size() > static_cast<int>(kMaxArtifacts)) return spec_error(dir, "too many artifacts");
    if (auto shape = check_manifest_shape(m); shape.find("k3s-binary") != std::string::npos) {
      return spec_error(dir, "artifacts: " + shape + " (give each k3s-binary an arch)");
    }
    if (auto h = y["health"]) {
      if (!h.IsMap()) return spec_error(dir, "health: must be a mapping with timeout, settle and/or workloads");
      for (const auto& kv : h) {
        const auto key = kv.first.as<std::string>();
        if (key != "timeout" && key != "settle" && key != "workloads") {
          return spec_error(dir, "health: unknown key '" + key + "' (timeout, settle, workloads)");
        }
      }
      auto seconds = [&](const char* key, uint32_t max, uint32_t* out) -> Status {
        if (!h[key]) return {};
        auto d = parse_duration(h[key].as<std::string>());
        if (!d || d->count() < 1000 || d->count() / 1000 > max) {
          return spec_error(dir, std::string("health.") + key + ": a duration from 1s to " + std::to_string(max) +
                                     "s (e.g. 10m)");
        }
        *out = static_cast<uint32_t>(d->count() / 1000);
        return {};
      };
      uint32_t timeout = 0, settle = 0;
      FLOTILLA_TRY_STATUS(seconds("timeout", kMaxHealthTimeoutSeconds, &timeout));
      FLOTILLA_TRY_STATUS(seconds("settle", kMaxHealthSettleSeconds, &settle));
      auto* gate = m.mutable_health();
      gate->set_timeout_seconds(timeout);
      gate->set_settle_seconds(settle);
      for (const auto& w : h["workloads"]) {
        if (!w.IsMap()) return spec_error(dir, "health.workloads: each entry is a mapping with kind, name, namespace");
        auto* c = gate->add_workloads();
        c->set_kind(w["kind"].as<std::string>(""));
        c->set_name(w["name"].as<std::string>(""));
        c->set_namespace_(w["namespace"].as<std::string>(""));
      }
      if (auto e = check_health_gate(*gate); !e.empty()) return spec_error(dir, e);
    }

    int index = 0;
    for (const auto& o : y["overlays"]) {
      const std::string what = "overlays[" + std::to_string(index++) + "]";
      if (!o.IsMap()) return spec_error(dir, what + ": must be a mapping with selector, files and/or k3s-config");
      for (const auto& kv : o) {
        const auto key = kv.first.as<std::string>();
        if (key != "selector" && key != "files" && key != "k3s-config" && key != "name") {
          return spec_error(dir, what + ": unknown key '" + key + "'");
        }
      }
      if (!o["selector"]) return spec_error(dir, what + ": 'selector' is required (\"\" matches every device)");
      const std::string selector = o["selector"].as<std::string>();
      if (auto sel = Selector::parse(selector); !sel) return spec_error(dir, what + ": " + sel.error().message);
      auto* ov = m.add_overlays();
      ov->set_selector(selector);
      std::set<std::pair<int, std::string>> ov_seen;
      for (const auto& f : o["files"]) {
        auto bf = spec_file(dir, what + ".files", f);
        if (!bf) return bf.error();
        if (!ov_seen.insert({bf->kind(), bf->name()}).second) {
          return spec_error(dir, what + ".files: '" + bf->name() + "' is listed twice");
        }
        *ov->add_files() = std::move(*bf);
      }
      if (auto kc = o["k3s-config"]) {
        if (!kc.IsMap()) return spec_error(dir, what + ".k3s-config: must be a mapping of k3s config keys");
        for (const auto& kv : kc) {
          const auto key = kv.first.as<std::string>();
          if (!valid_k3s_config_key(key)) return spec_error(dir, what + ".k3s-config: bad key '" + key + "'");
          auto val = k3s_value_text(kv.second);
          if (!val || !single_line(*val)) return spec_error(dir, what + ".k3s-config: bad value for '" + key + "'");
          (*ov->mutable_k3s_config())[key] = *val;
        }
      }
    }
    if (m.overlays_size() > static_cast<int>(kMaxOverlays)) return spec_error(dir, "too many overlays");
  } catch (const YAML::Exception& e) {
    return spec_error(dir, e.what());
  } catch (const std::exception& e) {
    return spec_error(dir, e.what());
  }
  size_t total_files = static_cast<size_t>(m.files_size());
  for (const auto& o : m.overlays()) total_files += static_cast<size_t>(o.files_size());
  if (total_files > kMaxFiles) return spec_error(dir, "too many files");
  if (m.ByteSizeLong() > kMaxManifestBytes) {
    return spec_error(dir, "manifest is " + std::to_string(m.ByteSizeLong()) + " bytes, above the " +
                               std::to_string(kMaxManifestBytes) + "-byte cap; ship large content as artifacts");
  }
  return m;
}

std::string serialize_manifest(const v1::BundleManifest& m) { return serialize_deterministic(m); }
std::string serialize_envelope(const v1::SignedBundle& b) { return serialize_deterministic(b); }

v1::SignedBundle wrap(const v1::BundleManifest& m) {
  v1::SignedBundle b;
  b.set_manifest(serialize_manifest(m));
  return b;
}

Status sign(v1::SignedBundle& bundle, const KeyPair& key) {
  for (const auto& s : bundle.signatures()) {
    if (s.key_id() == key.pub.key_id) {
      return make_error(Errc::already_exists, "bundle is already signed by key " + key.pub.key_id);
    }
  }
  if (bundle.signatures_size() >= static_cast<int>(kMaxSignatures)) {
    return make_error(Errc::too_large, "bundle already carries the maximum of " +
                                           std::to_string(kMaxSignatures) + " signatures");
  }
  auto* s = bundle.add_signatures();
  s->set_key_id(key.pub.key_id);
  auto sig = sign_detached(key, bundle.manifest());
  s->set_signature(std::string(sig.begin(), sig.end()));
  return {};
}

Result<v1::SignedBundle> parse_envelope(std::string_view bytes) {
  if (bytes.size() > kMaxEnvelopeBytes) {
    return make_error(Errc::too_large, "bundle envelope is " + std::to_string(bytes.size()) +
                                           " bytes, above the cap of " + std::to_string(kMaxEnvelopeBytes));
  }
  v1::SignedBundle b;
  if (!b.ParseFromArray(bytes.data(), static_cast<int>(bytes.size()))) {
    return make_error(Errc::parse, "not a Flotilla bundle (protobuf SignedBundle did not parse)");
  }
  return b;
}

Result<v1::SignedBundle> read_bundle_file(const std::filesystem::path& path) {
  auto bytes = fs::read_file(path, kMaxEnvelopeBytes);
  if (!bytes) return bytes.error();
  auto b = parse_envelope(*bytes);
  if (!b) return b.error().with_context(path.string());
  return b;
}

Status write_bundle_file(const std::filesystem::path& path, const v1::SignedBundle& b) {
  return fs::write_file_atomic(path, serialize_envelope(b), 0644);
}

std::string manifest_digest_hex(const v1::SignedBundle& b) { return crypto::sha256_hex(b.manifest()); }

namespace {

std::string check_file(const v1::BundleFile& f, const std::string& where) {
  if (!valid_file_name(f.name()) || f.kind() == v1::FILE_KIND_UNSPECIFIED || !v1::FileKind_IsValid(f.kind())) {
    return where + "file entry '" + f.name() + "' has a bad name or kind";
  }
  if (f.name() == kOverlayDropInName || f.name() == kNodeDropInName) {
    return where + "file name '" + f.name() + "' is reserved for a drop-in Flotilla writes itself";
  }
  auto h = crypto::sha256(f.content());
  if (f.sha256() != std::string(h.begin(), h.end())) return where + "file '" + f.name() + "' does not match its sha256";
  return "";
}

}  // namespace

bool valid_arch(const std::string& arch) { return arch == "amd64" || arch == "arm64" || arch == "arm"; }

bool valid_workload_kind(const std::string& kind) {
  return kind == "Deployment" || kind == "DaemonSet" || kind == "StatefulSet" || kind == "Job" || kind == "HelmChart";
}

std::string check_health_gate(const v1::HealthGate& g) {
  if (g.timeout_seconds() > kMaxHealthTimeoutSeconds) {
    return "health timeout " + std::to_string(g.timeout_seconds()) + "s is above " +
           std::to_string(kMaxHealthTimeoutSeconds) + "s";
  }
  if (g.settle_seconds() > kMaxHealthSettleSeconds) {
    return "health settle " + std::to_string(g.settle_seconds()) + "s is above " +
           std::to_string(kMaxHealthSettleSeconds) + "s";
  }
  if (g.workloads_size() > kMaxWorkloadChecks) return "more than " + std::to_string(kMaxWorkloadChecks) + " workload checks";
  std::set<std::string> seen;
  for (const auto& w : g.workloads()) {
    if (!valid_workload_kind(w.kind())) {
      return "health workload kind '" + w.kind().substr(0, 64) +
             "' is not one of Deployment, DaemonSet, StatefulSet, Job, HelmChart";
    }
    // Kubernetes object names (RFC 1123): they end up as kubectl arguments.
    for (const std::string* n : {&w.name(), &w.namespace_()}) {
      if (n->size() > 253 || (n == &w.name() && n->empty())) return "health workload has a bad name or namespace";
      for (char c : *n) {
        if (!(std::islower(static_cast<unsigned char>(c)) || std::isdigit(static_cast<unsigned char>(c)) ||
              c == '-' || c == '.')) {
          return "health workload name or namespace '" + n->substr(0, 64) + "' is not a Kubernetes object name";
        }
      }
      if (!n->empty() && (n->front() == '-' || n->front() == '.')) return "health workload has a bad name";
    }
    if (!seen.insert(w.kind() + "/" + w.namespace_() + "/" + w.name()).second) {
      return "health workload " + w.kind() + " " + w.name() + " is listed twice";
    }
  }
  return "";
}

// Empty when the manifest's files, artifacts and overlays are well formed;
// otherwise what is wrong. Everything here is signed, so a failure means a
// broken signer, not an attacker, but an agent must still not act on it.
std::string check_manifest_shape(const v1::BundleManifest& m) {
  size_t total_files = static_cast<size_t>(m.files_size());
  for (const auto& f : m.files()) {
    if (auto e = check_file(f, ""); !e.empty()) return e;
  }
  if (m.artifacts_size() > static_cast<int>(kMaxArtifacts)) return "too many artifacts";
  std::set<std::string> names;
  for (const auto& a : m.artifacts()) {
    if (!valid_file_name(a.name()) || !names.insert(a.name()).second) return "artifact '" + a.name() + "' has a bad or duplicate name";
    if (a.kind() == v1::ARTIFACT_KIND_UNSPECIFIED || !v1::ArtifactKind_IsValid(a.kind())) return "artifact '" + a.name() + "' has no kind";
    if (a.sha256().size() != 32) return "artifact '" + a.name() + "' sha256 is not 32 bytes";
    if (a.size() == 0 || a.size() > kMaxArtifactBytes) return "artifact '" + a.name() + "' size is 0 or above the cap";
    if (a.url().empty() || a.url().size() > 2048 || a.url().find_first_of("\r\n") != std::string::npos) {
      return "artifact '" + a.name() + "' has a bad url";
    }
    if (a.arch_size() > 8) return "artifact '" + a.name() + "' names too many architectures";
    for (const auto& x : a.arch()) {
      if (!valid_arch(x)) return "artifact '" + a.name() + "' names unknown arch '" + x.substr(0, 32) + "'";
    }
  }
  // One k3s binary per architecture: a device must know which one to run.
  for (const auto& arch : {"amd64", "arm64", "arm"}) {
    int binaries = 0;
    for (const auto& a : m.artifacts()) {
      if (a.kind() != v1::ARTIFACT_KIND_K3S_BINARY) continue;
      bool applies = a.arch_size() == 0;
      for (const auto& x : a.arch()) applies |= x == arch;
      binaries += applies ? 1 : 0;
    }
    if (binaries > 1) return std::string("more than one k3s-binary artifact for arch ") + arch;
  }
  if (m.has_health()) {
    if (auto e = check_health_gate(m.health()); !e.empty()) return e;
  }
  if (m.overlays_size() > static_cast<int>(kMaxOverlays)) return "too many overlays";
  if (m.switch_from_channels_size() > 64) return "too many switch_from_channels";
  for (const auto& c : m.switch_from_channels()) {
    if (!valid_file_name(c)) return "switch_from_channels entry '" + c.substr(0, 128) + "' is not a plain name";
  }
  for (int i = 0; i < m.overlays_size(); ++i) {
    const auto& o = m.overlays(i);
    const std::string where = "overlay " + std::to_string(i) + ": ";
    if (auto sel = Selector::parse(o.selector()); !sel) return where + sel.error().message;
    total_files += static_cast<size_t>(o.files_size());
    for (const auto& f : o.files()) {
      if (auto e = check_file(f, where); !e.empty()) return e;
    }
    for (const auto& [k, val] : o.k3s_config()) {
      if (!valid_k3s_config_key(k)) return where + "bad k3s config key '" + k + "'";
      if (val.find_first_of("\r\n") != std::string::npos || val.size() > 4096) {
        return where + "k3s config value of '" + k + "' must be one line";
      }
    }
  }
  if (total_files > kMaxFiles) return "more than " + std::to_string(kMaxFiles) + " files";
  return "";
}

bool safe_file_mode(uint32_t mode) { return (mode & ~kAllowedFileModeBits) == 0; }

std::string check_file_modes(const v1::BundleManifest& m) {
  auto bad = [](const v1::BundleFile& f, const std::string& where) {
    char mode[16];
    std::snprintf(mode, sizeof mode, "%04o", f.mode());
    return where + "file '" + f.name() + "' asks for mode " + mode + "; allowed are permission bits within 0755 "
           "(no group- or world-writable file, no setuid, setgid or sticky bit)";
  };
  for (const auto& f : m.files()) {
    if (!safe_file_mode(f.mode())) return bad(f, "");
  }
  for (int i = 0; i < m.overlays_size(); ++i) {
    for (const auto& f : m.overlays(i).files()) {
      if (!safe_file_mode(f.mode())) return bad(f, "overlay " + std::to_string(i) + ": ");
    }
  }
  return "";
}

Verdict verify(const v1::SignedBundle& bundle, const Keyring& ring, const VerifyPolicy& policy) {
  Verdict v;
  auto refuse = [&v](v1::Reason r, std::string msg) -> Verdict {
    v.reason = r;
    v.message = std::move(msg);
    return v;
  };
  if (bundle.manifest().size() > policy.max_manifest_bytes) {
    return refuse(v1::REASON_MANIFEST_TOO_LARGE,
                  "manifest is " + std::to_string(bundle.manifest().size()) + " bytes, above the cap of " +
                      std::to_string(policy.max_manifest_bytes));
  }
  if (bundle.signatures_size() == 0) return refuse(v1::REASON_UNSIGNED, "bundle carries no signature");
  if (bundle.signatures_size() > static_cast<int>(kMaxSignatures)) {
    return refuse(v1::REASON_MANIFEST_TOO_LARGE, "too many signatures");
  }
  const int64_t now = policy.clock->now_unix();
  std::set<std::string> valid_keys;
  std::string first_unknown, first_bad, first_revoked, first_expired;
  for (const auto& s : bundle.signatures()) {
    if (ring.revoked.count(s.key_id())) {
      if (first_revoked.empty()) first_revoked = s.key_id();
      continue;
    }
    auto it = ring.keys.find(s.key_id());
    if (it == ring.keys.end()) {
      if (first_unknown.empty()) first_unknown = s.key_id();
      continue;
    }
    if (auto ex = ring.expires.find(s.key_id()); ex != ring.expires.end() && ex->second != 0 && ex->second <= now) {
      if (first_expired.empty()) first_expired = s.key_id();
      continue;
    }
    Bytes sig(s.signature().begin(), s.signature().end());
    if (!verify_detached(it->second.key, bundle.manifest(), sig)) {
      if (first_bad.empty()) first_bad = s.key_id();
      continue;
    }
    valid_keys.insert(s.key_id());  // a key counts once however often it signed
  }
  const unsigned threshold = std::max(1u, ring.threshold);
  if (valid_keys.size() < threshold) {
    if (!first_bad.empty()) return refuse(v1::REASON_BAD_SIGNATURE, "signature by key " + first_bad + " does not verify");
    if (!first_revoked.empty()) {
      return refuse(v1::REASON_KEY_REVOKED, "signed by revoked key " + first_revoked + "; " +
                                                std::to_string(valid_keys.size()) + " valid signature(s), " +
                                                std::to_string(threshold) + " required");
    }
    if (!first_expired.empty()) {
      return refuse(v1::REASON_KEY_EXPIRED, "signed by key " + first_expired + ", which expired at " +
                                                format_rfc3339(ring.expires.at(first_expired)) + "; " +
                                                std::to_string(valid_keys.size()) + " valid signature(s), " +
                                                std::to_string(threshold) + " required");
    }
    if (valid_keys.empty() && !first_unknown.empty()) {
      return refuse(v1::REASON_UNKNOWN_KEY, "signed only by keys this device does not trust (first: " +
                                                first_unknown + ")");
    }
    return refuse(v1::REASON_THRESHOLD_NOT_MET, std::to_string(valid_keys.size()) + " valid signature(s), " +
                                                    std::to_string(threshold) + " required");
  }
  if (!v.manifest.ParseFromString(bundle.manifest())) {
    return refuse(v1::REASON_MALFORMED_MANIFEST, "signed manifest does not parse");
  }
  const auto& m = v.manifest;
  if (m.format_version() != 1) {
    return refuse(v1::REASON_MALFORMED_MANIFEST, "unsupported format version " + std::to_string(m.format_version()));
  }
  if (m.name().empty() || m.version() == 0) return refuse(v1::REASON_MALFORMED_MANIFEST, "manifest lacks name or version");
  if (m.version() > static_cast<uint64_t>(INT64_MAX)) {
    // The device keeps its anti-rollback floor as a SQLite integer: a larger
    // version would come back negative after a restart and floor nothing.
    return refuse(v1::REASON_MALFORMED_MANIFEST, "version " + std::to_string(m.version()) +
                                                     " is above 9223372036854775807 (2^63-1), the largest a device "
                                                     "can keep as its anti-rollback floor");
  }
  if (auto shape = check_manifest_shape(m); !shape.empty()) return refuse(v1::REASON_MALFORMED_MANIFEST, shape);
  if (auto modes = check_file_modes(m); !modes.empty()) return refuse(v1::REASON_UNSAFE_FILE_MODE, modes);
  if (m.expires_unix() == 0) {
    // Without an expiry a captured bundle could be replayed forever (freeze attack).
    return refuse(v1::REASON_BUNDLE_EXPIRED, "bundle has no expiry time; bundles must expire");
  }
  if (m.expires_unix() <= now) {
    return refuse(v1::REASON_BUNDLE_EXPIRED, "bundle expired at " + format_rfc3339(m.expires_unix()));
  }
  if (!policy.arch.empty() && m.target().arch_size() > 0) {
    bool match = false;
    for (const auto& a : m.target().arch()) match |= a == policy.arch;
    if (!match) return refuse(v1::REASON_WRONG_ARCH, "bundle is not for arch " + policy.arch);
  }
  if (policy.check_labels) {
    for (const auto& [k, val] : m.target().labels()) {
      auto it = policy.labels.find(k);
      if (it == policy.labels.end() || it->second != val) {
        return refuse(v1::REASON_LABEL_MISMATCH, "bundle targets " + k + "=" + val);
      }
    }
  }
  if (!policy.current_channel.empty() && m.channel() != policy.current_channel) {
    // Each channel has its own floor; hopping to another channel (where a
    // lower version may still be valid) is a rollback unless the signed
    // manifest says this is a switch from the device's channel.
    bool allowed = false;
    for (const auto& c : m.switch_from_channels()) allowed |= c == policy.current_channel;
    if (!allowed) {
      return refuse(v1::REASON_CHANNEL_SWITCH, "bundle is on channel " + m.channel() + " but this device runs channel " +
                                                   policy.current_channel + ", which the bundle does not list in "
                                                   "switch_from_channels");
    }
  }
  if (auto it = policy.highest_applied.find(m.channel()); it != policy.highest_applied.end()) {
    if (m.version() <= it->second) {
      return refuse(v1::REASON_ROLLBACK_VERSION, "version " + std::to_string(m.version()) +
                                                     " is not above " + std::to_string(it->second) +
                                                     ", the highest applied on channel " + m.channel());
    }
  }
  return v;
}

}  // namespace flotilla::bundles

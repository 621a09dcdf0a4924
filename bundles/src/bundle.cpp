#include "flotilla/bundles/bundle.hpp"

#include <google/protobuf/io/coded_stream.h>
#include <google/protobuf/io/zero_copy_stream_impl_lite.h>
#include <yaml-cpp/yaml.h>

#include <ctime>
#include <set>

#include "flotilla/common/crypto.hpp"
#include "flotilla/common/fs.hpp"
#include "flotilla/common/options.hpp"

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

Result<v1::BundleManifest> load_spec(const std::filesystem::path& dir, const Clock& clock) {
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
  static const std::set<std::string> known = {"name", "channel", "version", "description", "expires",
                                              "expires-in", "k3s-version", "target", "files"};
  for (const auto& kv : y) {
    auto key = kv.first.as<std::string>();
    if (!known.count(key)) return spec_error(dir, "line " + std::to_string(kv.first.Mark().line + 1) +
                                                      ": unknown key '" + key + "'");
  }
  v1::BundleManifest m;
  m.set_format_version(1);
  try {
    m.set_name(y["name"].as<std::string>(""));
    if (m.name().empty() || !valid_file_name(m.name())) {
      return spec_error(dir, "'name' is required and must be a plain name (letters, digits, - _ .)");
    }
    m.set_channel(y["channel"].as<std::string>("stable"));
    if (!valid_file_name(m.channel())) return spec_error(dir, "'channel' must be a plain name");
    if (!y["version"]) return spec_error(dir, "'version' is required (a whole number above 0)");
    int64_t version = y["version"].as<int64_t>();
    if (version <= 0) return spec_error(dir, "'version' must be above 0");
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
    for (const auto& f : y["files"]) {
      auto kind = parse_file_kind(f["kind"].as<std::string>(""));
      if (!kind) return spec_error(dir, "files: " + kind.error().message);
      const std::string source = f["source"].as<std::string>("");
      if (source.empty()) return spec_error(dir, "files: every file needs a 'source' path");
      std::filesystem::path src = dir / source;
      // Sources must stay inside the bundle directory.
      auto canon_dir = std::filesystem::weakly_canonical(dir);
      auto canon_src = std::filesystem::weakly_canonical(src);
      if (canon_src.string().rfind(canon_dir.string() + "/", 0) != 0) {
        return spec_error(dir, "files: source '" + source + "' is outside the bundle directory");
      }
      std::string name = f["name"].as<std::string>(src.filename().string());
      if (*kind == v1::FILE_KIND_REGISTRIES) name = "registries.yaml";
      if (!valid_file_name(name)) return spec_error(dir, "files: '" + name + "' is not a plain file name");
      if (!seen.insert({*kind, name}).second) {
        return spec_error(dir, "files: " + file_kind_name(*kind) + " '" + name + "' is listed twice");
      }
      auto content = fs::read_file(src, kMaxManifestBytes);
      if (!content) return content.error().with_context("bundle file");
      auto* bf = m.add_files();
      bf->set_kind(*kind);
      bf->set_name(name);
      bf->set_content(*content);
      const auto mode = std::stoul(f["mode"].as<std::string>("0644"), nullptr, 8);
      if (mode > 0777) return spec_error(dir, "files: mode of '" + name + "' must be permission bits (at most 0777)");
      bf->set_mode(static_cast<uint32_t>(mode));
      auto h = crypto::sha256(*content);
      bf->set_sha256(std::string(h.begin(), h.end()));
    }
  } catch (const YAML::Exception& e) {
    return spec_error(dir, e.what());
  } catch (const std::exception& e) {
    return spec_error(dir, e.what());
  }
  if (m.files_size() > static_cast<int>(kMaxFiles)) return spec_error(dir, "too many files");
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
  std::set<std::string> valid_keys;
  std::string first_unknown, first_bad;
  for (const auto& s : bundle.signatures()) {
    auto it = ring.keys.find(s.key_id());
    if (it == ring.keys.end()) {
      if (first_unknown.empty()) first_unknown = s.key_id();
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
  for (const auto& f : m.files()) {
    if (!valid_file_name(f.name()) || f.kind() == v1::FILE_KIND_UNSPECIFIED) {
      return refuse(v1::REASON_MALFORMED_MANIFEST, "file entry '" + f.name() + "' has a bad name or kind");
    }
    auto h = crypto::sha256(f.content());
    if (f.sha256() != std::string(h.begin(), h.end())) {
      return refuse(v1::REASON_MALFORMED_MANIFEST, "file '" + f.name() + "' does not match its sha256");
    }
  }
  const int64_t now = policy.clock->now_unix();
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

#include "flotilla/bundles/diff.hpp"

#include <map>

#include "flotilla/bundles/bundle.hpp"
#include "flotilla/common/encoding.hpp"

namespace flotilla::bundles {

namespace {

void field(std::vector<DiffEntry>& out, const std::string& item, const std::string& a, const std::string& b) {
  if (a != b) out.push_back({"changed", item, a, b});
}

std::string file_summary(const v1::BundleFile& f) {
  char mode[8];
  std::snprintf(mode, sizeof mode, "%04o", f.mode() & 07777);
  return "sha256:" + to_hex(f.sha256()).substr(0, 16) + " " + std::to_string(f.content().size()) + "B mode " + mode;
}

template <class Map, class Describe>
void diff_maps(std::vector<DiffEntry>& out, const std::string& prefix, const Map& a, const Map& b, Describe describe) {
  for (const auto& [k, va] : a) {
    auto it = b.find(k);
    if (it == b.end()) out.push_back({"removed", prefix + k, describe(va), ""});
    else if (describe(va) != describe(it->second)) out.push_back({"changed", prefix + k, describe(va), describe(it->second)});
  }
  for (const auto& [k, vb] : b) {
    if (!a.count(k)) out.push_back({"added", prefix + k, "", describe(vb)});
  }
}

template <class Files>
std::map<std::string, v1::BundleFile> files_by_key(const Files& files) {
  std::map<std::string, v1::BundleFile> m;
  for (const auto& f : files) m[file_kind_name(f.kind()) + "/" + f.name()] = f;
  return m;
}

std::string target_text(const v1::Target& t) {
  std::string s = "arch=[";
  for (int i = 0; i < t.arch_size(); ++i) s += (i ? "," : "") + t.arch(i);
  s += "] labels={";
  std::map<std::string, std::string> labels(t.labels().begin(), t.labels().end());
  bool first = true;
  for (const auto& [k, v] : labels) {
    s += (first ? "" : ",") + k + "=" + v;
    first = false;
  }
  return s + "}";
}

}  // namespace

std::vector<DiffEntry> diff_manifests(const v1::BundleManifest& a, const v1::BundleManifest& b) {
  std::vector<DiffEntry> out;
  field(out, "name", a.name(), b.name());
  field(out, "channel", a.channel(), b.channel());
  auto joined = [](const auto& list) {
    std::string s;
    for (const auto& c : list) s += (s.empty() ? "" : ",") + c;
    return s;
  };
  field(out, "switch_from_channels", joined(a.switch_from_channels()), joined(b.switch_from_channels()));
  field(out, "version", std::to_string(a.version()), std::to_string(b.version()));
  field(out, "k3s_version", a.k3s_version(), b.k3s_version());
  field(out, "expires_at", format_rfc3339(a.expires_unix()), format_rfc3339(b.expires_unix()));
  field(out, "target", target_text(a.target()), target_text(b.target()));
  field(out, "description", a.description(), b.description());

  diff_maps(out, "file ", files_by_key(a.files()), files_by_key(b.files()), file_summary);

  std::map<std::string, v1::Artifact> aa, ab;
  for (const auto& x : a.artifacts()) aa[x.name()] = x;
  for (const auto& x : b.artifacts()) ab[x.name()] = x;
  diff_maps(out, "artifact ", aa, ab, [](const v1::Artifact& x) {
    return artifact_kind_name(x.kind()) + " sha256:" + to_hex(x.sha256()).substr(0, 16) + " " +
           std::to_string(x.size()) + "B url " + x.url();
  });

  const int n = std::max(a.overlays_size(), b.overlays_size());
  for (int i = 0; i < n; ++i) {
    const std::string p = "overlay[" + std::to_string(i) + "]";
    if (i >= a.overlays_size()) {
      out.push_back({"added", p, "", "selector '" + b.overlays(i).selector() + "'"});
      continue;
    }
    if (i >= b.overlays_size()) {
      out.push_back({"removed", p, "selector '" + a.overlays(i).selector() + "'", ""});
      continue;
    }
    const auto& oa = a.overlays(i);
    const auto& ob = b.overlays(i);
    field(out, p + " selector", oa.selector(), ob.selector());
    diff_maps(out, p + " file ", files_by_key(oa.files()), files_by_key(ob.files()), file_summary);
    std::map<std::string, std::string> ka(oa.k3s_config().begin(), oa.k3s_config().end());
    std::map<std::string, std::string> kb(ob.k3s_config().begin(), ob.k3s_config().end());
    diff_maps(out, p + " k3s-config ", ka, kb, [](const std::string& v) { return v; });
  }
  return out;
}

}  // namespace flotilla::bundles

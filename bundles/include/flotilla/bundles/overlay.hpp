#pragma once
// Overlays: one signed bundle, many device variants. The agent resolves the
// manifest against its own labels into the files it places.
#include <map>
#include <string>
#include <vector>

#include "flotilla/bundles/selector.hpp"
#include "flotilla/common/result.hpp"
#include "flotilla/v1/bundle.pb.h"

namespace flotilla::bundles {

struct ResolvedBundle {
  // What to place, sorted by (kind, name): the base files, replaced or
  // extended by the files of every matching overlay, plus the generated
  // overlay drop-in when any matching overlay sets k3s config keys.
  std::vector<v1::BundleFile> files;
  // The effective k3s config keys of the matching overlays (later wins).
  std::map<std::string, std::string> k3s_config;
  // Indexes (into manifest.overlays) of the overlays that matched, ascending.
  std::vector<int> matched_overlays;
  // For each file name in `files` ("<kind>/<name>"): "base" or "overlay[i]".
  std::map<std::string, std::string> origin;
};

// Deterministic, pure: the same manifest and labels always give the same
// files. Precedence (docs/bundle-format.md, "Overlays"):
//   1. start from manifest.files;
//   2. for each overlay in manifest order whose selector matches `labels`,
//      its files replace a file with the same (kind, name) or are added;
//      its k3s_config keys are set, a later overlay overwriting an earlier one;
//   3. if any keys were set, they are rendered, sorted by key, one
//      "key: value" line each, into the k3s-config file kOverlayDropInName
//      (k3s reads config.yaml.d/ in lexical order, so 99- is applied last).
// An overlay whose selector does not parse matches nothing; verify() refuses
// such manifests before they get here (REASON_MALFORMED_MANIFEST).
ResolvedBundle resolve(const v1::BundleManifest& manifest, const Labels& labels);

// The generated drop-in's content for a set of keys (exposed for tools/tests).
std::string render_overlay_config(const std::map<std::string, std::string>& keys);

}  // namespace flotilla::bundles

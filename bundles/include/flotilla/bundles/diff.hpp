#pragma once
// What changed between two bundle manifests (`flotilla bundle diff A B`).
#include <string>
#include <vector>

#include "flotilla/v1/bundle.pb.h"

namespace flotilla::bundles {

struct DiffEntry {
  std::string change;  // "added", "removed" or "changed"
  std::string item;    // "version", "file k3s-config/10-x.yaml", "artifact k3s", "overlay[1] k3s-config node-label" …
  std::string from;    // old value (empty when added)
  std::string to;      // new value (empty when removed)
};

// Deterministic: bundle fields first, then files, artifacts and overlays,
// each sorted by name. Files compare by content hash and mode; overlays by
// position (their order decides precedence, so a move is a change).
std::vector<DiffEntry> diff_manifests(const v1::BundleManifest& a, const v1::BundleManifest& b);

}  // namespace flotilla::bundles

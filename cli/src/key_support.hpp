#pragma once
// Shared by the key and bundle commands: reading private keys (asking for a
// passphrase when the file is sealed) and loading a trust chain from files.
#include <optional>
#include <string>
#include <vector>

#include "flotilla/bundles/keys.hpp"
#include "flotilla/bundles/trust.hpp"
#include "flotilla/common/result.hpp"

namespace flotilla::cli {

// The passphrase for a sealed key: $FLOTILLA_KEY_PASSPHRASE, else a prompt on
// the terminal (echo off) when stdin is one, else none.
std::optional<std::string> key_passphrase(const std::string& prompt, bool confirm);

// read_private_key, asking for the passphrase only when the file needs one.
Result<bundles::KeyPair> load_private_key(const std::string& path);

// A trust store pinned to `pinned_root`, moved along `chain` (root files in
// ascending order) and, when given, `signing`. The verdict says why not.
struct LoadedTrust {
  std::optional<bundles::TrustStore> store;
  bundles::TrustVerdict verdict;
  v1::Trust trust;  // what was applied on top of the pin
};
Result<LoadedTrust> load_trust(const std::string& pinned_root, const std::vector<std::string>& chain,
                               const std::string& signing, const Clock& clock);

}  // namespace flotilla::cli

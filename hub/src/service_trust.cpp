// HubService: the operator's trust message (root chain + signing keyring),
// stored once for the whole hub and attached to every desired state.
#include "flotilla/bundles/trust.hpp"
#include "flotilla/common/log.hpp"
#include "flotilla/hub/service.hpp"

namespace flotilla::hub {

Result<v1::Trust> HubService::put_trust(const std::string& trust_bytes) {
  if (trust_bytes.size() > bundles::kMaxTrustBytes) {
    return make_error(Errc::too_large, "trust message is larger than " + std::to_string(bundles::kMaxTrustBytes) +
                                           " bytes");
  }
  v1::Trust t;
  if (trust_bytes.empty() || !t.ParseFromString(trust_bytes)) {
    return make_error(Errc::invalid_argument,
                      "body is not a serialized flotilla.v1.Trust (flotilla key verify-chain ... --out trust.pb)");
  }
  if (t.roots_size() == 0 && !t.has_signing()) {
    return make_error(Errc::invalid_argument, "trust message carries neither roots nor a signing keyring");
  }
  if (static_cast<size_t>(t.roots_size()) > bundles::kMaxRootChain) {
    return make_error(Errc::invalid_argument, "trust message carries more than " +
                                                  std::to_string(bundles::kMaxRootChain) + " roots");
  }
  // Shape only: signatures, the chain and time are the devices' to judge.
  for (int i = 0; i < t.roots_size(); ++i) {
    auto m = bundles::parse_keyring_manifest(t.roots(i), bundles::KeyringRole::root);
    if (!m) return m.error().with_context("roots[" + std::to_string(i) + "]");
  }
  if (t.has_signing()) {
    auto m = bundles::parse_keyring_manifest(t.signing(), bundles::KeyringRole::signing);
    if (!m) return m.error().with_context("signing");
  }
  if (auto s = control_write([&]() -> Status {
        std::lock_guard lock(store_mu_);
        return store_.put_trust(trust_bytes, clock_.now_unix_ms());
      });
      !s) {
    return s.error();
  }
  log::get("hub")->info("stored trust roots={} signing={}", t.roots_size(), t.has_signing());
  return t;
}

Result<std::optional<v1::Trust>> HubService::get_trust() {
  std::optional<std::pair<std::string, int64_t>> row;
  {
    std::lock_guard lock(store_mu_);
    auto r = store_.get_trust();
    if (!r) return r.error();
    row = std::move(*r);
  }
  if (!row) return std::optional<v1::Trust>{};
  v1::Trust t;
  if (!t.ParseFromString(row->first)) return make_error(Errc::internal, "stored trust message does not parse");
  return std::optional<v1::Trust>{std::move(t)};
}

}  // namespace flotilla::hub

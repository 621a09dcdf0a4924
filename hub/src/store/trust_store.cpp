// The store's trust side: the operator's current trust message (a serialized
// v1::Trust), one row for the whole hub.
#include "flotilla/hub/store.hpp"

namespace flotilla::hub {

Status Store::put_trust(const std::string& trust_bytes, int64_t now_ms) {
  auto st = db_->prepare(
      "INSERT INTO trust (id, trust, updated_ms) VALUES (1, ?, ?) "
      "ON CONFLICT(id) DO UPDATE SET trust = excluded.trust, updated_ms = excluded.updated_ms");
  if (!st) return st.error();
  st->bind_blob(1, trust_bytes).bind(2, now_ms);
  return st->run();
}

Result<std::optional<std::pair<std::string, int64_t>>> Store::get_trust() {
  auto st = db_->prepare("SELECT trust, updated_ms FROM trust WHERE id = 1");
  if (!st) return st.error();
  auto r = st->step();
  if (!r) return r.error();
  if (!*r) return std::optional<std::pair<std::string, int64_t>>{};
  return std::optional<std::pair<std::string, int64_t>>{std::make_pair(st->col_blob(0), st->col_int(1))};
}

}  // namespace flotilla::hub

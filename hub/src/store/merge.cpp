// Merges of reads that span cells (flotilla/hub/merge.hpp, ADR 18 slice 4).
#include "flotilla/hub/merge.hpp"

#include <algorithm>
#include <map>
#include <optional>
#include <tuple>

#include "rows.hpp"

namespace flotilla::hub {

namespace {

// The first n of v (none for n <= 0).
template <class T>
void keep_first(std::vector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) > std::max<int64_t>(0, n)) v.resize(static_cast<size_t>(std::max<int64_t>(0, n)));
}

// Every part's items, ordered by `less`, the first `limit` of them.
template <class T, class Less>
std::vector<T> first_in_order(std::vector<std::vector<T>> parts, Less less, int64_t limit) {
  std::vector<T> out;
  for (auto& part : parts) {
    for (auto& item : part) out.push_back(std::move(item));
  }
  std::sort(out.begin(), out.end(), less);
  keep_first(out, limit);
  return out;
}

// Every part's values, ascending, each once.
template <class T>
std::vector<T> sorted_unique(const std::vector<std::vector<T>>& parts) {
  std::vector<T> out;
  for (const auto& part : parts) out.insert(out.end(), part.begin(), part.end());
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

}  // namespace

std::vector<FleetCount> sum_fleet_counts(const std::vector<std::vector<FleetCount>>& parts) {
  std::map<std::tuple<std::string, std::string, std::string>, int64_t> sums;
  for (const auto& part : parts) {
    for (const auto& r : part) sums[{r.project, r.dim, r.value}] += r.n;
  }
  std::vector<FleetCount> out;
  for (const auto& [k, n] : sums) {
    if (n != 0) out.push_back(FleetCount{std::get<0>(k), std::get<1>(k), std::get<2>(k), n});
  }
  return out;
}

std::vector<FailureGroup> top_failure_reasons(const std::vector<std::vector<FailureGroup>>& parts,
                                              int64_t max_reasons) {
  std::map<std::string, int64_t> counts;
  for (const auto& part : parts) {
    for (const auto& g : part) counts[g.reason] += g.count;
  }
  std::vector<FailureGroup> out;
  for (const auto& [reason, n] : counts) {
    FailureGroup g;
    g.reason = reason;
    g.count = n;
    out.push_back(std::move(g));
  }
  // Most first, ties by reason (what one store's ORDER BY 2 DESC, 1 gives).
  std::stable_sort(out.begin(), out.end(), [](const FailureGroup& a, const FailureGroup& b) { return a.count > b.count; });
  keep_first(out, max_reasons);
  return out;
}

std::vector<FailureGroup::Device> first_failed_devices(const std::vector<std::vector<FailureGroup::Device>>& parts,
                                                       int64_t per_reason) {
  return first_in_order(
      parts,
      [](const FailureGroup::Device& a, const FailureGroup::Device& b) {
        return std::tie(a.updated_ms, a.id) < std::tie(b.updated_ms, b.id);
      },
      per_reason);
}

std::map<std::string, int64_t> sum_reason_counts(const std::vector<std::map<std::string, int64_t>>& parts) {
  std::map<std::string, int64_t> out;
  for (const auto& part : parts) {
    for (const auto& [reason, n] : part) out[reason] += n;
  }
  std::erase_if(out, [](const auto& kv) { return kv.second == 0; });
  return out;
}

std::vector<CampaignDeviceRecord> first_failed_rows(std::vector<std::vector<CampaignDeviceRecord>> parts,
                                                    int64_t limit) {
  return first_in_order(
      std::move(parts),
      [](const CampaignDeviceRecord& a, const CampaignDeviceRecord& b) {
        return std::tie(a.updated_ms, a.device_id) < std::tie(b.updated_ms, b.device_id);
      },
      limit);
}

std::vector<std::string> merge_device_ids(const std::vector<std::vector<std::string>>& parts, int64_t limit) {
  auto out = sorted_unique(parts);
  keep_first(out, limit);
  return out;
}

std::vector<int> merge_cells(const std::vector<std::vector<int>>& parts) { return sorted_unique(parts); }

std::vector<CampaignCountRow> sum_campaign_counts(const std::vector<std::vector<CampaignCountRow>>& parts) {
  std::map<std::tuple<int, std::string, bool>, int64_t> sums;
  for (const auto& part : parts) {
    for (const auto& r : part) sums[{r.wave, r.status, r.online}] += r.count;
  }
  std::vector<CampaignCountRow> out;
  for (const auto& [k, n] : sums) {
    if (n != 0) out.push_back(CampaignCountRow{std::get<0>(k), std::get<1>(k), std::get<2>(k), n});
  }
  return out;
}

std::vector<CampaignDeviceRecord> merge_campaign_rows(std::vector<std::vector<CampaignDeviceRecord>> parts) {
  std::vector<CampaignDeviceRecord> out;
  for (auto& part : parts) {
    for (auto& r : part) out.push_back(std::move(r));
  }
  // Stable: of two rows of a device updated at the same time, the earlier part's stays first.
  std::stable_sort(out.begin(), out.end(), [](const CampaignDeviceRecord& a, const CampaignDeviceRecord& b) {
    return std::tie(a.device_id, b.updated_ms) < std::tie(b.device_id, a.updated_ms);
  });
  out.erase(std::unique(out.begin(), out.end(),
                        [](const CampaignDeviceRecord& a, const CampaignDeviceRecord& b) {
                          return a.device_id == b.device_id;
                        }),
            out.end());
  return out;
}

std::vector<CellDeviceCount> merge_cell_device_counts(std::vector<CellDeviceCount> totals,
                                                      const std::vector<std::vector<CellDeviceCount>>& online_parts) {
  std::map<int, int64_t> online;
  for (const auto& part : online_parts) {
    for (const auto& c : part) online[c.cell] += c.online;
  }
  std::sort(totals.begin(), totals.end(),
            [](const CellDeviceCount& a, const CellDeviceCount& b) { return a.cell < b.cell; });
  for (auto& t : totals) {
    auto it = online.find(t.cell);
    t.online = it == online.end() ? 0 : it->second;
  }
  return totals;
}

std::vector<CampaignDeviceRecord> merge_releasable(std::vector<std::vector<CampaignDeviceRecord>> parts,
                                                   int64_t limit) {
  return first_in_order(
      std::move(parts),
      [](const CampaignDeviceRecord& a, const CampaignDeviceRecord& b) {
        return std::tie(a.wave, a.rank, a.device_id) < std::tie(b.wave, b.rank, b.device_id);
      },
      limit);
}

namespace {

// An item's place in the walk, as its cursor holds it: [sort, key..., id]
// (AggregateStore::devices builds the same from the walk's columns).
nlohmann::json walk_key(const DeviceRecord& d, DeviceSort sort) {
  auto k = nlohmann::json::array({sort_name(sort)});
  switch (sort) {
    case DeviceSort::id: break;
    case DeviceSort::hostname: k.push_back(d.hostname); break;
    case DeviceSort::enrolled: k.push_back(d.enrolled_ms); break;
    case DeviceSort::cert_expiry: k.push_back(d.inventory.cert_expiry_unix); break;
  }
  k.push_back(d.id);
  return k;
}

}  // namespace

DevicePage merge_device_pages(std::vector<DevicePage> parts, int64_t limit) {
  if (parts.size() == 1) return std::move(parts.front());
  DevicePage out;
  if (parts.empty()) {
    out.complete = true;
    return out;
  }
  out.sort = parts.front().sort;
  out.descending = parts.front().descending;
  out.index = parts.front().index;
  // Strings compare as unsigned bytes (std::char_traits<char>), as SQLite's
  // BINARY collation does; numbers as numbers.
  auto before = [&](const nlohmann::json& a, const nlohmann::json& b) { return out.descending ? b < a : a < b; };

  // The frontier: the least cursor of a part that stopped before its end.
  std::optional<nlohmann::json> frontier;
  const DevicePage* at_frontier = nullptr;
  for (const auto& p : parts) {
    out.scanned += p.scanned;
    if (p.complete || p.next.empty()) continue;
    auto k = decode_cursor(p.next);
    if (!k) continue;  // not one of ours: a part's own cursor always decodes
    if (!frontier || before(*k, *frontier)) {
      frontier = std::move(*k);
      at_frontier = &p;
    }
  }

  std::vector<std::pair<nlohmann::json, DeviceRecord>> items;
  for (auto& p : parts) {
    for (auto& d : p.items) {
      auto k = walk_key(d, out.sort);
      if (frontier && before(*frontier, k)) continue;  // past what some cell examined
      items.emplace_back(std::move(k), std::move(d));
    }
  }
  std::sort(items.begin(), items.end(), [&](const auto& a, const auto& b) { return before(a.first, b.first); });
  const size_t keep = static_cast<size_t>(std::max<int64_t>(1, limit));
  if (items.size() > keep) {
    items.resize(keep);
    out.next = encode_cursor(items.back().first);
    out.next_id = items.back().second.id;
  } else if (at_frontier) {
    out.next = at_frontier->next;
    out.next_id = at_frontier->next_id;
  } else {
    out.complete = true;
  }
  out.items.reserve(items.size());
  for (auto& [k, d] : items) out.items.push_back(std::move(d));
  return out;
}

}  // namespace flotilla::hub

#pragma once
// Merges of reads that span cells (ADR 18, slice 4): when each cell's
// devices live in a file of their own, a read that spans cells asks every
// cell's store the same question and merges the answers here. Pure
// functions, so the rules (what is summed, what order wins, where a page may
// stop) are tested without a store; today's callers pass the answer of the
// one store, or of one query per time zone.
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "flotilla/hub/aggregates.hpp"
#include "flotilla/hub/store.hpp"

namespace flotilla::hub {

// Counts by (project, dimension, value) summed over parts; rows summing to
// zero are left out; ordered by (project, dimension, value).
std::vector<FleetCount> sum_fleet_counts(const std::vector<std::vector<FleetCount>>& parts);

// Failure reasons with their counts (FailureGroup::first is ignored) summed
// over parts; the `max_reasons` largest, most first, ties by reason. Each
// part must hold every reason of its devices (or as many as the caller
// bounds it to): a reason left out of one part is undercounted.
std::vector<FailureGroup> top_failure_reasons(const std::vector<std::vector<FailureGroup>>& parts,
                                              int64_t max_reasons);

// One reason's first devices over parts, each part already in (updated_ms,
// id) order: the first `per_reason` of them in that order.
std::vector<FailureGroup::Device> first_failed_devices(const std::vector<std::vector<FailureGroup::Device>>& parts,
                                                       int64_t per_reason);

// A campaign's failures counted by reason (the campaign record's map)
// summed over parts; a reason summing to zero is left out.
std::map<std::string, int64_t> sum_reason_counts(const std::vector<std::map<std::string, int64_t>>& parts);

// A campaign's failed rows, each part in (updated_ms, device id) order: the
// first `limit` over all of them in that order.
std::vector<CampaignDeviceRecord> first_failed_rows(std::vector<std::vector<CampaignDeviceRecord>> parts,
                                                    int64_t limit);

// Device ids, each part ascending: the first `limit` over all of them,
// ascending, each id once (a device whose rows are in two stores, a drain's
// crash window, is one device).
std::vector<std::string> merge_device_ids(const std::vector<std::vector<std::string>>& parts, int64_t limit);

// Cells (a campaign's member cells) over parts: each once, ascending.
std::vector<int> merge_cells(const std::vector<std::vector<int>>& parts);

// A campaign's counts by (wave, status, online) summed over parts; rows
// summing to zero are left out; in (wave, status, online) order, as
// Store::campaign_counts gives them.
std::vector<CampaignCountRow> sum_campaign_counts(const std::vector<std::vector<CampaignCountRow>>& parts);

// A campaign's rows over parts (each part in device id order, as
// DeviceStore::campaign_devices gives them), in device id order. A device
// with a row in two parts (a drain's crash window) is listed once: the row
// updated last, the earlier part's on a tie.
std::vector<CampaignDeviceRecord> merge_campaign_rows(std::vector<std::vector<CampaignDeviceRecord>> parts);

// Devices by cell: the directory's totals (Store::cell_device_totals) with
// each cell's online devices summed over the cells' stores
// (DeviceStore::online_by_cell). The directory decides which cells have
// devices: an online count of a cell it has none in is left out.
std::vector<CellDeviceCount> merge_cell_device_counts(std::vector<CellDeviceCount> totals,
                                                      const std::vector<std::vector<CellDeviceCount>>& online_parts);

// Campaign rows waiting for release, each part in (wave, rank) order and
// holding its own first `limit`: the first `limit` over all of them in
// (wave, rank, device id) order.
std::vector<CampaignDeviceRecord> merge_releasable(std::vector<std::vector<CampaignDeviceRecord>> parts,
                                                   int64_t limit);

// Pages of the same device walk (the same DeviceQuery: order, cursor,
// limit, scan bound) over different cells' stores, as one page of the
// whole walk. A part that did not reach the end of its walk examined its
// rows only up to its cursor, so the merged page holds the items up to the
// least such cursor (the rows past it are not known in that cell yet) and
// continues from there; then the first `limit` of those in walk order, with
// the cursor after the last one taken when more remained. `scanned` is the
// rows every part examined; `complete` only when every part was and nothing
// was left out. A list of one page is returned as it is.
DevicePage merge_device_pages(std::vector<DevicePage> parts, int64_t limit);

}  // namespace flotilla::hub

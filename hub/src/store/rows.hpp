#pragma once
// The column lists and row mappings of the store's tables, one copy each,
// for store files that read the same rows (aggregate_store.cpp).
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "flotilla/common/sqlite.hpp"
#include "flotilla/hub/store.hpp"

namespace flotilla::hub {

// A device's labels as the devices table stores them (JSON, keys in order).
std::string labels_json(const Labels& l);
// Columns of "d" (devices) and "i" (device_inventory), read from
// device_from_clause() or any FROM that names those two aliases.
std::string device_columns();
std::string device_from_clause();
DeviceRecord device_row(const sql::Stmt& s);  // columns device_columns() from 0
std::string bundle_columns();
BundleRecord bundle_row(const sql::Stmt& s);
std::string campaign_columns();
CampaignRecord campaign_row(const sql::Stmt& s);
std::string campaign_device_columns();
CampaignDeviceRecord campaign_device_row(const sql::Stmt& s, int offset);
std::string audit_columns();
AuditRecord audit_row(const sql::Stmt& s);
// A device walk's cursor (AggregateStore::devices, merge_device_pages):
// opaque to clients, the hex of [sort, key..., id].
std::string encode_cursor(const nlohmann::json& key);
Result<nlohmann::json> decode_cursor(const std::string& c);
// A campaign's counts by (wave, status, online) over every cell of one
// store (Store::campaign_counts), on any connection to it.
Result<std::vector<CampaignCountRow>> campaign_counts_on(sql::Db& db, const std::string& campaign_id);
// The label index's (device_labels) statements for one devices row of a
// trigger ("NEW" or "OLD"), run only when `also` holds (empty: always):
// hub.db's directory triggers and a cell's file keep it alike.
std::string label_index_add(const std::string& row, const std::string& also = "");
std::string label_index_remove(const std::string& row, const std::string& also = "");
// Whether `table` has `column` (false for a table that does not exist):
// what the migrations of stores made before a column ask.
Result<bool> has_column(sql::Db& db, const std::string& table, const std::string& column);
// The token whose secret hashes to secret_hash, on any connection to the store.
Result<std::optional<TokenRecord>> find_token_on(sql::Db& db, const std::string& kind, const std::string& secret_hash);

}  // namespace flotilla::hub

#pragma once
// The hub's records and their SQLite store. Device rows are a cache of
// device reports plus campaign bookkeeping (DESIGN.md, data ownership).
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "flotilla/common/result.hpp"
#include "flotilla/common/sqlite.hpp"
#include "flotilla/bundles/selector.hpp"

namespace flotilla::hub {

using bundles::Labels;
using bundles::Selector;
using bundles::valid_label_key;
using bundles::valid_label_value;

struct DeviceRecord {
  std::string id;
  std::string project = "default";
  Labels labels;
  std::string public_key_hex;
  std::string hostname;
  std::string arch;
  std::string agent_version;
  int64_t enrolled_ms = 0;
  int64_t last_seen_ms = 0;
  bool online = false;
  std::string state = "enrolled";   // last reported agent state
  std::string applied_bundle;       // name of the bundle it runs
  uint64_t applied_version = 0;
  std::string k3s_version;
  bool node_ready = false;
  std::string last_reason;          // reason code name of the last failure
  std::string last_message;
  uint64_t last_seq = 0;
  uint64_t generation = 0;          // of the desired state last published
  std::string desired_bundle_id;
  std::string campaign_id;
};

struct BundleRecord {
  std::string id;        // first 16 hex digits of the manifest's SHA-256
  std::string project = "default";
  std::string digest;    // full hex SHA-256 of the manifest
  std::string name;
  std::string channel;
  uint64_t version = 0;
  int64_t expires_unix = 0;
  int signatures = 0;
  int64_t uploaded_ms = 0;
  std::string envelope;  // the signed bundle (manifest bytes exactly as signed; signatures merged)
};

struct CampaignRecord {
  std::string id;
  std::string name;
  std::string bundle_id;
  std::string selector;
  std::string state;     // running, completed
  int64_t created_ms = 0;
  int64_t updated_ms = 0;
};

struct CampaignDeviceRecord {
  std::string campaign_id;
  std::string device_id;
  std::string status;    // pending, in_progress, applied, failed
  uint64_t generation = 0;
  int64_t updated_ms = 0;
  std::string reason;
  std::string message;
};

struct TokenRecord {
  std::string id;
  std::string name;
  std::string role;      // admin, operator, viewer (API tokens); enroll (enrollment tokens)
  std::string project = "default";
  Labels labels;         // enrollment tokens: labels given to devices
  int64_t expires_unix = 0;  // 0 = never
  int64_t max_uses = 0;      // 0 = unlimited
  int64_t uses = 0;
  int64_t created_ms = 0;
  bool revoked = false;
};

class Store {
 public:
  static Result<std::unique_ptr<Store>> open(const std::string& path);

  // Tokens are stored only as SHA-256 hashes of their secret.
  Status insert_token(const std::string& kind, const TokenRecord& t, const std::string& secret_hash);
  Result<std::optional<TokenRecord>> find_token(const std::string& kind, const std::string& secret_hash);
  // Counts one use if the token has uses left; false when it is used up.
  Result<bool> claim_token_use(const std::string& id);
  Result<int64_t> count_tokens(const std::string& kind);

  Status upsert_credential(const std::string& username, const std::string& mosquitto_hash);
  Result<std::vector<std::pair<std::string, std::string>>> credentials();

  Status upsert_enrolled_device(const DeviceRecord& d);
  Result<std::optional<DeviceRecord>> get_device(const std::string& id);
  Result<std::vector<DeviceRecord>> list_devices();
  Status save_device_state(const DeviceRecord& d);  // report/presence fields

  Status insert_bundle(const BundleRecord& b);
  Status update_bundle_signatures(const std::string& id, const std::string& envelope, int signatures);
  Result<std::optional<BundleRecord>> get_bundle(const std::string& id_or_name_version, bool with_envelope);
  Result<std::vector<BundleRecord>> list_bundles();

  // Creates the campaign and its device rows, and marks each device's new
  // desired state, in one transaction.
  Status insert_campaign(const CampaignRecord& c, const std::vector<CampaignDeviceRecord>& devices);
  Result<std::optional<CampaignRecord>> get_campaign(const std::string& id);
  Result<std::vector<CampaignRecord>> list_campaigns();
  Status set_campaign_state(const std::string& id, const std::string& state, int64_t now_ms);
  Result<std::vector<CampaignDeviceRecord>> campaign_devices(const std::string& campaign_id);
  Result<std::optional<CampaignDeviceRecord>> campaign_device(const std::string& campaign_id,
                                                              const std::string& device_id);
  Status save_campaign_device(const CampaignDeviceRecord& cd);

  sql::Db& db() { return *db_; }

 private:
  explicit Store(std::unique_ptr<sql::Db> db) : db_(std::move(db)) {}
  Status migrate();
  std::unique_ptr<sql::Db> db_;
};

}  // namespace flotilla::hub

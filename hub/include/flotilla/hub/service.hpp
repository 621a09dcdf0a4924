#pragma once
// The hub's core: enrollment, bundles, campaigns, and the MQTT side that
// publishes desired state and folds device reports into the store.
#include <atomic>
#include <condition_variable>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "flotilla/common/clock.hpp"
#include "flotilla/common/result.hpp"
#include "flotilla/common/transport.hpp"
#include "flotilla/hub/store.hpp"
#include "flotilla/v1/enroll.pb.h"
#include "flotilla/v1/report.pb.h"

namespace flotilla::hub {

class EmbeddedBroker;
class ArtifactStore;

struct ServiceConfig {
  std::string broker_url;            // what devices are told to connect to
  std::string public_url;            // the hub's REST base URL as devices see it
  bool manage_broker_credentials = true;  // false with an external broker
  size_t report_queue_cap = 100000;
};

struct CampaignCounts {
  int64_t total = 0, pending = 0, in_progress = 0, applied = 0, failed = 0, superseded = 0, offline = 0;
};

struct CampaignView {
  CampaignRecord campaign;
  BundleRecord bundle;
  CampaignCounts counts;
  std::vector<CampaignDeviceRecord> devices;
  std::map<std::string, int64_t> failure_reasons;
};

struct CreatedToken {
  TokenRecord record;
  std::string secret;  // shown once
};

class HubService {
 public:
  HubService(Store& store, const Clock& clock, ServiceConfig cfg);
  ~HubService();

  // The MQTT side. The transport must already be connected with the hub's credential.
  Status attach_transport(transport::Transport& t);
  void set_broker(EmbeddedBroker* broker) { broker_ = broker; }
  void set_artifacts(ArtifactStore* a) { artifacts_ = a; }
  ArtifactStore* artifacts() const { return artifacts_; }
  void stop();

  // Tokens. kind is "api" or "enroll". A positive ttl sets the expiry from
  // the service's clock.
  Result<CreatedToken> create_token(const std::string& kind, TokenRecord rec,
                                    std::chrono::milliseconds ttl = std::chrono::milliseconds(0));
  Result<std::optional<TokenRecord>> authenticate(const std::string& kind, const std::string& secret);

  Result<v1::EnrollResponse> enroll(const v1::EnrollRequest& req);

  // Stores a signed bundle after checking it parses and is signed. Returns the
  // existing record for a byte-identical manifest.
  Result<std::pair<BundleRecord, bool>> upload_bundle(const std::string& envelope_bytes,
                                                      const std::string& project = "default");
  Result<std::vector<BundleRecord>> list_bundles();
  Result<std::optional<BundleRecord>> get_bundle(const std::string& key);

  Result<CampaignRecord> create_campaign(const std::string& name, const std::string& bundle_key,
                                         const std::string& selector);
  Result<std::optional<CampaignView>> campaign_view(const std::string& id, bool with_devices);
  Result<std::vector<CampaignView>> list_campaigns();

  Result<std::vector<DeviceRecord>> list_devices(const Selector& sel);
  Result<std::optional<DeviceRecord>> get_device(const std::string& id);

  // Entry point for messages from the broker (any thread); queued for the worker.
  void on_message(transport::Message&& msg);
  // Processes everything queued so far (the worker does this continuously;
  // unit tests call it directly).
  void drain();

  // True once subscribed to device reports: before that, enrolling devices
  // would report into the void.
  bool mqtt_connected() const;
  void mark_detached() { attached_ = false; }
  uint64_t reports_processed() const { return reports_processed_; }

 private:
  void worker();
  void process(const transport::Message& msg);
  void handle_report(const std::string& device_id, const v1::Report& r);
  void handle_presence(const std::string& device_id, const v1::Presence& p);
  Status publish_desired(const DeviceRecord& d, const BundleRecord& b, uint64_t generation,
                         const std::string& campaign_id);
  void republish_pending();
  void refresh_campaign_state(const std::string& campaign_id);

  Store& store_;
  const Clock& clock_;
  ServiceConfig cfg_;
  EmbeddedBroker* broker_ = nullptr;
  ArtifactStore* artifacts_ = nullptr;
  transport::Transport* transport_ = nullptr;

  std::mutex store_mu_;
  std::mutex q_mu_;
  std::mutex drain_mu_;  // one drainer at a time, so drain() returns only when all is processed
  std::condition_variable q_cv_, q_space_cv_;
  std::deque<transport::Message> queue_;
  std::atomic<bool> stopping_{false};
  std::atomic<bool> attached_{false};
  std::thread worker_;
  std::atomic<uint64_t> reports_processed_{0};
};

// "AGENT_STATE_APPLIED" -> "applied"; "REASON_BAD_SIGNATURE" -> "bad_signature".
std::string state_name(v1::AgentState s);
std::string reason_name(v1::Reason r);

}  // namespace flotilla::hub

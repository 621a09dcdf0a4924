#pragma once
// The MQTT seam. Hub and agent talk to brokers only through this interface;
// the Paho backend lives in common/transport/paho/, and the simulator may add
// a gateway backend that multiplexes many devices over one session.
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "flotilla/common/result.hpp"

namespace flotilla::transport {

struct Message {
  std::string topic;
  std::string payload;
  int qos = 1;
  bool retained = false;
};

struct ConnectOptions {
  std::string url;            // tcp://127.0.0.1:1883 or ssl://host:8883
  std::string client_id;
  std::string username;
  std::string password;
  bool clean_session = false;  // devices keep their session so the broker queues while they sleep
  int keepalive_s = 30;
  std::optional<Message> will;
  // ssl:// URLs: TLS 1.2+, the broker's chain verified against ca_file alone
  // (pinned: the system store is not consulted) or, when empty, the system
  // CA store; and the certificate must name the URL's host unless
  // verify_host is false (a hub reaching its own embedded broker by its
  // listen address, which the certificate need not name).
  std::string ca_file;
  bool verify_host = true;
  // ssl:// URLs: the client certificate (PEM, CN = the client's identity)
  // and its private key, presented to a broker that authenticates clients
  // by certificate. Both files are read at each connect, so a renewed
  // certificate is used from the next connect on.
  std::string cert_file;
  std::string key_file;
  int max_inflight = 64;
  // publish() waits while this many QoS>0 messages are unacknowledged, so a
  // burst (a campaign released to a million devices) is paced by the broker
  // instead of piling up in the client's memory. 0: never waits. It never
  // waits on the transport's own callback thread, and not longer than timeout.
  int max_pending = 0;
  std::chrono::milliseconds timeout{10000};
};

class Transport {
 public:
  using MessageHandler = std::function<void(Message&&)>;
  // Called from the transport's thread when the connection drops.
  using LostHandler = std::function<void(const std::string& cause)>;

  virtual ~Transport() = default;
  // Blocks until connected, refused or timed out. A refused connection
  // (bad credentials, not authorised) is not retryable; a network error is.
  virtual Status connect(const ConnectOptions& opts) = 0;
  // Blocks until the broker acknowledges the subscription; an ACL refusal
  // (SUBACK 0x80) is reported as permission_denied.
  virtual Status subscribe(const std::string& filter, int qos) = 0;
  // Queues the message; delivery is tracked by the client library. May wait
  // for room (ConnectOptions::max_pending).
  virtual Status publish(const Message& msg) = 0;
  // Blocks until every queued QoS>0 publish has been acknowledged or timeout.
  virtual Status flush(std::chrono::milliseconds timeout) = 0;
  virtual void disconnect() = 0;
  virtual bool connected() const = 0;
  virtual void on_message(MessageHandler h) = 0;
  virtual void on_connection_lost(LostHandler h) = 0;
};

std::unique_ptr<Transport> make_paho_transport();

// Topic layout (docs/architecture.md).
inline constexpr const char* kTopicRoot = "flotilla/v1/d/";
// The hub's call to re-report (v1::Rollcall), read by every device of a
// broker. A device reads it on its shard, flotilla/v1/rollcall/<2 hex
// digits> chosen by its client id (rollcall_topic): mosquitto finds a new
// subscriber's place by walking every subscriber of the topic, so one topic
// for all the devices of a broker made each subscribe cost a step per device
// there, which is quadratic over an enrollment wave or a reconnect storm
// (docs/adr/0020). The hub publishes each call on every shard, and on
// kRollcallTopic for agents from before the shards.
inline constexpr const char* kRollcallTopic = "flotilla/v1/rollcall";
inline constexpr int kRollcallShards = 256;
// flotilla/v1/rollcall/<shard>, the shard from FNV-1a of client_id.
std::string rollcall_topic(std::string_view client_id);
std::string rollcall_shard_topic(int shard);
// kRollcallTopic or one of its shards.
bool is_rollcall_topic(std::string_view topic);
// A device answers a roll call within this long at most, whatever it asks.
inline constexpr uint32_t kMaxRollcallSpreadMs = 60000;
inline std::string device_topic(const std::string& device_id, const char* leaf) {
  return std::string(kTopicRoot) + device_id + "/" + leaf;
}
// Extracts <id> from flotilla/v1/d/<id>/<leaf>; empty when the topic does not match.
std::string device_id_from_topic(const std::string& topic, std::string* leaf = nullptr);

// Devices behind a gateway: flotilla/v1/g/<gateway-id>/d/<device-id>/<leaf>.
// The broker lets the gateway's identity use exactly this subtree.
inline constexpr const char* kGatewayRoot = "flotilla/v1/g/";
inline std::string gateway_prefix(const std::string& gateway_id) {
  return std::string(kGatewayRoot) + gateway_id + "/d/";
}
// The topic of a device: under its gateway when it has one, else its own.
inline std::string device_topic(const std::string& device_id, const std::string& gateway_id, const char* leaf) {
  return gateway_id.empty() ? device_topic(device_id, leaf) : gateway_prefix(gateway_id) + device_id + "/" + leaf;
}
// Like device_id_from_topic, for both layouts; *gateway is empty for a
// device's own topics.
std::string parse_device_topic(const std::string& topic, std::string* gateway, std::string* leaf);

// A gateway's batched reports (v1::GatewayReports): flotilla/v1/g/<gateway-id>/reports.
inline std::string gateway_reports_topic(const std::string& gateway_id) {
  return std::string(kGatewayRoot) + gateway_id + "/reports";
}
// The gateway id of a gateway_reports_topic; empty for any other topic.
std::string gateway_of_reports_topic(const std::string& topic);

}  // namespace flotilla::transport

#pragma once
// MQTT 3.1.1 packets as bytes (OASIS MQTT 3.1.1, section 2 and 3): what the
// simulator's many-session client (transport/loop/) sends and reads, and
// the hub's broker probes. Only the packets a client uses: CONNECT,
// PUBLISH (QoS 0 and 1), PUBACK, SUBSCRIBE, PINGREQ, DISCONNECT out;
// CONNACK, PUBLISH, PUBACK, SUBACK, PINGRESP in.
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "flotilla/common/result.hpp"
#include "flotilla/common/transport.hpp"

namespace flotilla::mqtt {

// Control packet types (the high nibble of the first byte).
enum class PacketType : uint8_t {
  connect = 1,
  connack = 2,
  publish = 3,
  puback = 4,
  pubrec = 5,
  pubrel = 6,
  pubcomp = 7,
  subscribe = 8,
  suback = 9,
  unsubscribe = 10,
  unsuback = 11,
  pingreq = 12,
  pingresp = 13,
  disconnect = 14,
};

struct ConnectFields {
  std::string client_id;
  std::string username;  // "" = none
  std::string password;  // "" = none
  bool clean_session = true;
  uint16_t keepalive_s = 30;
  std::optional<transport::Message> will;
};

std::string encode_connect(const ConnectFields& f);
// QoS 0 takes no packet id (pass 0).
std::string encode_publish(std::string_view topic, std::string_view payload, int qos, bool retained,
                           uint16_t packet_id, bool dup = false);
std::string encode_puback(uint16_t packet_id);
std::string encode_subscribe(uint16_t packet_id, std::string_view filter, int qos);
std::string encode_pingreq();
std::string encode_disconnect();

// One packet as read: its type, the low nibble of its first byte, and what
// follows the remaining length.
struct Packet {
  PacketType type = PacketType::connect;
  uint8_t flags = 0;
  std::string body;
};

// Splits a byte stream into packets, whatever the reads' boundaries. A
// packet longer than max_packet, or a remaining length of more than four
// bytes, is an error: the connection carrying it must be closed.
class PacketReader {
 public:
  explicit PacketReader(size_t max_packet) : max_packet_(max_packet) {}
  void feed(const char* data, size_t n) { buf_.append(data, n); }
  // The next whole packet, nullopt when more bytes are needed.
  Result<std::optional<Packet>> next();
  void reset() {
    buf_.clear();
    pos_ = 0;
  }
  size_t buffered() const { return buf_.size() - pos_; }

 private:
  static constexpr size_t kKeptCapacity = 64 * 1024;
  size_t max_packet_;
  std::string buf_;
  size_t pos_ = 0;
};

// A PUBLISH packet's fields.
struct Publish {
  std::string topic;
  std::string payload;
  int qos = 0;
  bool retained = false;
  bool dup = false;
  uint16_t packet_id = 0;  // 0 for QoS 0
};
Result<Publish> decode_publish(const Packet& p);

// The packet id of a PUBACK or SUBACK, and a SUBACK's first return code
// (0x80 = refused); a CONNACK's session-present flag and return code.
Result<uint16_t> decode_packet_id(const Packet& p);
Result<uint8_t> decode_suback_code(const Packet& p);
struct Connack {
  bool session_present = false;
  uint8_t code = 0;  // 0 accepted; 1..5 refused (4 bad credentials, 5 not authorised)
};
Result<Connack> decode_connack(const Packet& p);
// What a CONNACK return code means, for an error message.
std::string connack_reason(uint8_t code);

}  // namespace flotilla::mqtt

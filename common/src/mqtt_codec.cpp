// MQTT 3.1.1 packet encoding and decoding (see mqtt_codec.hpp).
#include "flotilla/common/mqtt_codec.hpp"

namespace flotilla::mqtt {

namespace {

void put_u16(std::string& out, uint16_t v) {
  out.push_back(static_cast<char>(v >> 8));
  out.push_back(static_cast<char>(v & 0xff));
}

void put_field(std::string& out, std::string_view v) {
  put_u16(out, static_cast<uint16_t>(v.size()));
  out.append(v);
}

// The fixed header (type, flags, remaining length as a varint) and the body.
std::string packet(PacketType type, uint8_t flags, const std::string& body) {
  std::string out(1, static_cast<char>((static_cast<uint8_t>(type) << 4) | (flags & 0x0f)));
  for (size_t n = body.size();;) {
    const auto byte = static_cast<char>(n % 128);
    n /= 128;
    out.push_back(static_cast<char>(byte | (n ? 0x80 : 0)));
    if (!n) break;
  }
  out += body;
  return out;
}

uint16_t get_u16(const std::string& b, size_t at) {
  return static_cast<uint16_t>((static_cast<uint8_t>(b[at]) << 8) | static_cast<uint8_t>(b[at + 1]));
}

Error malformed(const std::string& what) { return make_error(Errc::parse, "malformed MQTT packet: " + what); }

}  // namespace

std::string encode_connect(const ConnectFields& f) {
  std::string body;
  put_field(body, "MQTT");
  body.push_back(4);  // protocol level: 3.1.1
  uint8_t flags = 0;
  if (!f.username.empty()) flags |= 0x80;
  if (!f.password.empty()) flags |= 0x40;
  if (f.will) {
    flags |= 0x04;
    flags |= static_cast<uint8_t>((f.will->qos & 3) << 3);
    if (f.will->retained) flags |= 0x20;
  }
  if (f.clean_session) flags |= 0x02;
  body.push_back(static_cast<char>(flags));
  put_u16(body, f.keepalive_s);
  put_field(body, f.client_id);
  if (f.will) {
    put_field(body, f.will->topic);
    put_field(body, f.will->payload);
  }
  if (!f.username.empty()) put_field(body, f.username);
  if (!f.password.empty()) put_field(body, f.password);
  return packet(PacketType::connect, 0, body);
}

std::string encode_publish(std::string_view topic, std::string_view payload, int qos, bool retained,
                           uint16_t packet_id, bool dup) {
  std::string body;
  body.reserve(topic.size() + payload.size() + 4);
  put_field(body, topic);
  if (qos > 0) put_u16(body, packet_id);
  body.append(payload);
  const uint8_t flags = static_cast<uint8_t>((dup ? 0x08 : 0) | ((qos & 3) << 1) | (retained ? 1 : 0));
  return packet(PacketType::publish, flags, body);
}

std::string encode_puback(uint16_t packet_id) {
  std::string body;
  put_u16(body, packet_id);
  return packet(PacketType::puback, 0, body);
}

std::string encode_subscribe(uint16_t packet_id, std::string_view filter, int qos) {
  std::string body;
  put_u16(body, packet_id);
  put_field(body, filter);
  body.push_back(static_cast<char>(qos & 3));
  return packet(PacketType::subscribe, 0x02, body);  // flags 0010 are required
}

std::string encode_pingreq() { return packet(PacketType::pingreq, 0, {}); }
std::string encode_disconnect() { return packet(PacketType::disconnect, 0, {}); }

Result<std::optional<Packet>> PacketReader::next() {
  const size_t avail = buf_.size() - pos_;
  if (avail < 2) return std::optional<Packet>{};
  size_t length = 0, used = 1;
  for (size_t multiplier = 1;; multiplier *= 128) {
    if (used > 4) return malformed("remaining length longer than four bytes");
    if (used >= avail) return std::optional<Packet>{};
    const auto byte = static_cast<uint8_t>(buf_[pos_ + used]);
    length += (byte & 0x7f) * multiplier;
    ++used;
    if (!(byte & 0x80)) break;
  }
  if (length > max_packet_) {
    return make_error(Errc::too_large, "MQTT packet of " + std::to_string(length) +
                                           " bytes is over the limit of " + std::to_string(max_packet_));
  }
  if (avail < used + length) return std::optional<Packet>{};
  Packet p;
  const auto first = static_cast<uint8_t>(buf_[pos_]);
  p.type = static_cast<PacketType>(first >> 4);
  p.flags = first & 0x0f;
  p.body.assign(buf_, pos_ + used, length);
  pos_ += used + length;
  // Drop what was read once it is most of the buffer: no copy per packet.
  if (pos_ == buf_.size()) {
    // A large packet's buffer is not kept for the connection's life:
    // thousands of idle sessions would each hold their largest packet.
    if (buf_.capacity() > kKeptCapacity) {
      std::string().swap(buf_);
    } else {
      buf_.clear();
    }
    pos_ = 0;
  } else if (pos_ > 65536 && pos_ * 2 > buf_.size()) {
    buf_.erase(0, pos_);
    pos_ = 0;
  }
  return std::optional<Packet>{std::move(p)};
}

Result<Publish> decode_publish(const Packet& p) {
  if (p.type != PacketType::publish) return malformed("not a PUBLISH");
  Publish out;
  out.qos = (p.flags >> 1) & 3;
  out.retained = p.flags & 1;
  out.dup = p.flags & 0x08;
  if (out.qos == 3) return malformed("PUBLISH with QoS 3");
  if (p.body.size() < 2) return malformed("PUBLISH without a topic");
  const size_t topic_len = get_u16(p.body, 0);
  size_t at = 2 + topic_len;
  if (p.body.size() < at + (out.qos > 0 ? 2 : 0)) return malformed("PUBLISH shorter than its topic");
  out.topic.assign(p.body, 2, topic_len);
  if (out.qos > 0) {
    out.packet_id = get_u16(p.body, at);
    if (out.packet_id == 0) return malformed("PUBLISH with packet id 0");
    at += 2;
  }
  out.payload.assign(p.body, at, std::string::npos);
  return out;
}

Result<uint16_t> decode_packet_id(const Packet& p) {
  if (p.body.size() < 2) return malformed("no packet id");
  return get_u16(p.body, 0);
}

Result<uint8_t> decode_suback_code(const Packet& p) {
  if (p.type != PacketType::suback || p.body.size() < 3) return malformed("SUBACK without a return code");
  return static_cast<uint8_t>(p.body[2]);
}

Result<Connack> decode_connack(const Packet& p) {
  if (p.type != PacketType::connack || p.body.size() != 2) return malformed("CONNACK not two bytes long");
  return Connack{(p.body[0] & 1) != 0, static_cast<uint8_t>(p.body[1])};
}

std::string connack_reason(uint8_t code) {
  switch (code) {
    case 0: return "accepted";
    case 1: return "unacceptable protocol version";
    case 2: return "client identifier rejected";
    case 3: return "server unavailable";
    case 4: return "bad user name or password";
    case 5: return "not authorised";
    default: return "return code " + std::to_string(code);
  }
}

}  // namespace flotilla::mqtt

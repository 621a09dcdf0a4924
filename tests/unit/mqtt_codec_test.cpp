// [unit] MQTT 3.1.1 packets as bytes (common/src/mqtt_codec.cpp): the exact
// bytes the specification gives, packets split anywhere across reads, and
// the bounds a broker's stream is held to.
#include <catch2/catch.hpp>

#include <string>
#include <vector>

#include "flotilla/common/mqtt_codec.hpp"

using namespace flotilla;
using namespace flotilla::mqtt;

namespace {

std::string bytes(std::initializer_list<int> b) {
  std::string s;
  for (int c : b) s.push_back(static_cast<char>(c));
  return s;
}

// Every packet the reader finds in `stream`, fed `chunk` bytes at a time.
std::vector<Packet> read_all(const std::string& stream, size_t chunk, size_t max_packet = 1 << 20) {
  PacketReader r(max_packet);
  std::vector<Packet> out;
  for (size_t at = 0; at < stream.size(); at += chunk) {
    r.feed(stream.data() + at, std::min(chunk, stream.size() - at));
    for (;;) {
      auto p = r.next();
      REQUIRE(p);
      if (!*p) break;
      out.push_back(std::move(**p));
    }
  }
  CHECK(r.buffered() == 0);
  return out;
}

}  // namespace

TEST_CASE("CONNECT carries exactly the fields set, in the order of MQTT 3.1.1 section 3.1", "[unit][mqtt]") {
  ConnectFields f;
  f.client_id = "d1";
  f.keepalive_s = 60;
  f.clean_session = false;
  // Neither user name nor password nor will: flags 0, no fields for them.
  CHECK(encode_connect(f) == bytes({0x10, 14, 0, 4, 'M', 'Q', 'T', 'T', 4, 0x00, 0, 60, 0, 2, 'd', '1'}));

  f.username = "u";
  f.password = "pw";
  f.clean_session = true;
  f.will = transport::Message{"t", "x", 1, true};
  // Flags: user name 0x80, password 0x40, will retain 0x20, will QoS 1
  // 0x08, will 0x04, clean session 0x02.
  const std::string c = encode_connect(f);
  CHECK(static_cast<uint8_t>(c[9]) == 0xEE);
  CHECK(c.substr(12) == bytes({0, 2, 'd', '1', 0, 1, 't', 0, 1, 'x', 0, 1, 'u', 0, 2, 'p', 'w'}));
  CHECK(size_t{static_cast<uint8_t>(c[1])} == c.size() - 2);
}

TEST_CASE("PUBLISH, PUBACK, SUBSCRIBE, PINGREQ and DISCONNECT are the specification's bytes", "[unit][mqtt]") {
  CHECK(encode_publish("a/b", "hi", 1, true, 0x1234) ==
        bytes({0x33, 9, 0, 3, 'a', '/', 'b', 0x12, 0x34, 'h', 'i'}));
  CHECK(encode_publish("a", "", 0, false, 0) == bytes({0x30, 3, 0, 1, 'a'}));
  CHECK(static_cast<uint8_t>(encode_publish("a", "", 1, false, 7, true)[0]) == 0x3A);  // DUP
  CHECK(encode_puback(258) == bytes({0x40, 2, 1, 2}));
  CHECK(encode_subscribe(5, "x/#", 1) == bytes({0x82, 8, 0, 5, 0, 3, 'x', '/', '#', 1}));
  CHECK(encode_pingreq() == bytes({0xC0, 0}));
  CHECK(encode_disconnect() == bytes({0xE0, 0}));
}

TEST_CASE("packets come out whole however the stream is cut, across the remaining length's sizes",
          "[unit][mqtt]") {
  // Payloads whose packets need 1, 2 and 3 bytes of remaining length, at
  // the edges (127 / 128, 16383 / 16384).
  std::string stream;
  std::vector<std::string> payloads;
  for (size_t n : {0, 120, 121, 122, 16376, 16377, 100000}) {
    payloads.push_back(std::string(n, static_cast<char>('a' + n % 26)));
  }
  uint16_t id = 1;
  for (const auto& p : payloads) stream += encode_publish("t/x", p, 1, false, id++);
  stream += encode_pingreq();
  for (size_t chunk : {size_t{1}, size_t{3}, size_t{1000}, stream.size()}) {
    INFO("chunk " << chunk);
    auto packets = read_all(stream, chunk);
    REQUIRE(packets.size() == payloads.size() + 1);
    for (size_t i = 0; i < payloads.size(); ++i) {
      auto m = decode_publish(packets[i]);
      REQUIRE(m);
      CHECK(m->topic == "t/x");
      CHECK(m->payload == payloads[i]);
      CHECK(m->qos == 1);
      CHECK(size_t{m->packet_id} == i + 1);
    }
    CHECK(packets.back().type == PacketType::pingreq);
  }
}

TEST_CASE("a broker's packets that break the rules are errors, not guesses", "[unit][mqtt]") {
  SECTION("a remaining length of five bytes") {
    PacketReader r(1 << 20);
    const std::string bad = bytes({0x30, 0xff, 0xff, 0xff, 0xff, 0x01, 0});
    r.feed(bad.data(), bad.size());
    auto p = r.next();
    REQUIRE_FALSE(p);
    CHECK(p.error().code == Errc::parse);
  }
  SECTION("a packet over the limit is refused before its bytes arrive") {
    PacketReader r(1000);
    const std::string head = encode_publish("t", std::string(2000, 'x'), 0, false, 0).substr(0, 4);
    r.feed(head.data(), head.size());
    auto p = r.next();
    REQUIRE_FALSE(p);
    CHECK(p.error().code == Errc::too_large);
    CHECK(p.error().message.find("over the limit of 1000") != std::string::npos);
  }
  SECTION("PUBLISH fields that do not fit their packet") {
    Packet p;
    p.type = PacketType::publish;
    p.flags = 0x02;  // QoS 1
    p.body = bytes({0, 5, 'a', 'b'});
    CHECK_FALSE(decode_publish(p));
    p.body = bytes({0, 1, 'a', 0, 0});  // packet id 0
    CHECK_FALSE(decode_publish(p));
    p.flags = 0x06;  // QoS 3
    p.body = bytes({0, 1, 'a', 0, 1});
    CHECK_FALSE(decode_publish(p));
  }
  SECTION("CONNACK and SUBACK") {
    Packet ack{PacketType::connack, 0, bytes({1, 5})};
    auto c = decode_connack(ack);
    REQUIRE(c);
    CHECK(c->session_present);
    CHECK(c->code == 5);
    CHECK(connack_reason(c->code) == "not authorised");
    ack.body = bytes({0});
    CHECK_FALSE(decode_connack(ack));
    Packet sub{PacketType::suback, 0, bytes({0, 9, 0x80})};
    CHECK(decode_packet_id(sub).value() == 9);
    CHECK(decode_suback_code(sub).value() == 0x80);
    sub.body = bytes({0, 9});
    CHECK_FALSE(decode_suback_code(sub));
  }
}

#pragma once
// Many MQTT sessions on one thread (common/transport/loop/): for a process
// that holds thousands of broker sessions at once, flotilla-sim's direct
// mode. Each session's socket is non-blocking and one epoll loop serves
// them all, so an idle session costs nothing per round and a packet costs
// the same whatever the number of sessions. Paho C, by contrast, polls every
// socket of the process and searches its sessions for the owner of each
// packet (docs/scale.md, "Direct sessions per simulator process").
//
// The client speaks MQTT 3.1.1 over TCP or TLS (OpenSSL): QoS 0 and 1 both
// ways, persistent sessions (unacknowledged publishes are sent again, with
// DUP, after a reconnect), wills, keepalive pings, client certificates or
// user name and password. QoS 2 is refused. Transports made here behave as
// the Transport interface says, with one rule more: their callbacks run on
// the loop's thread, which must never wait there (no connect, subscribe,
// flush or disconnect from a callback, and no destroying a transport).
#include <memory>

#include "flotilla/common/transport.hpp"

namespace flotilla::transport {

class SessionLoop;

// Starts the loop's thread; it stops when the last transport made on it and
// the returned pointer are gone.
std::shared_ptr<SessionLoop> make_session_loop();

std::unique_ptr<Transport> make_loop_transport(std::shared_ptr<SessionLoop> loop);

}  // namespace flotilla::transport

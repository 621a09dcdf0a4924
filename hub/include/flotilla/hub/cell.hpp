#pragma once
// A cell: one broker and the part of the hub that talks to it (docs/
// architecture.md, "Cells"). Each cell has its own MQTT session, its own
// inbound queue drained by its own report worker, and is where the
// desired states of its devices are published. What spans cells (the store,
// the campaign engine, enrollment) stays in HubService.
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "flotilla/common/transport.hpp"

namespace flotilla::hub {

class EmbeddedBroker;

// How many cells one hub process runs at most (--cells).
inline constexpr int kMaxCells = 64;

class Cell {
 public:
  Cell(int id, std::string broker_url, size_t queue_cap, size_t queue_bytes_cap)
      : id_(id), broker_url_(std::move(broker_url)), queue_cap_(queue_cap), queue_bytes_cap_(queue_bytes_cap) {}
  Cell(const Cell&) = delete;
  Cell& operator=(const Cell&) = delete;

  int id() const { return id_; }
  // What devices of this cell are told to connect to.
  const std::string& broker_url() const { return broker_url_; }
  // The embedded broker this cell supervises (null with an external one).
  void set_broker(EmbeddedBroker* b) { broker_ = b; }
  EmbeddedBroker* broker() const { return broker_; }
  // "up", "restarting" (the embedded broker is down and being restarted, or
  // the hub's session to it is not up yet) or "external".
  std::string broker_state() const;

  // The hub's session to this cell's broker (set when it (re)connects).
  void set_transport(transport::Transport* t) { transport_ = t; }
  transport::Transport* transport() const { return transport_.load(); }
  void set_attached(bool a) { attached_ = a; }
  bool connected() const;

  // Draining: no new enrollments here; its devices are moved elsewhere.
  bool draining() const { return draining_.load(); }
  void set_draining(bool d) { draining_ = d; }
  // When (unix ms) its last drain stopped; 0: never.
  std::atomic<int64_t> undrained_ms{0};
  // This process may not know every move asked in the current drain: it
  // drains since before a restart, or another hub process held the cell
  // when the drain began. Stopping such a drain withdraws the move of every
  // device still in the cell, not only of those this process asked.
  std::atomic<bool> drain_inherited{false};

  // The inbound queue. push() blocks while the queue is full (the MQTT
  // client then stops reading and the broker holds the QoS 1 messages);
  // false once stopping.
  bool push(transport::Message&& m);
  // Up to max messages, oldest first.
  std::vector<transport::Message> pop(size_t max);
  // Waits until there is something queued, stopping, or timeout.
  void wait_for_work(std::chrono::milliseconds timeout);
  size_t depth() const;
  void stop();
  bool stopping() const { return stopping_.load(); }
  // One drainer of this cell's queue at a time (HubService::drain_cell).
  std::mutex& drain_mu() { return drain_mu_; }
  std::thread& worker() { return worker_; }

  std::atomic<uint64_t> presence_resets{0}, rollcalls{0}, desired_published{0};
  std::atomic<uint64_t> moved_in{0}, moved_out{0};
  // Requests sent on this cell's broker: to move (a drain; retries count)
  // and to stay (the withdrawal of a move after the drain stopped).
  std::atomic<uint64_t> moves_asked{0}, moves_withdrawn{0};
  // Devices marked offline because the broker session ended or began again.
  std::atomic<uint64_t> presence_reset_devices{0};
  // Marked offline when the session was lost: the next session's roll call
  // waits for them.
  std::atomic<int64_t> unheard{0};
  // Until when (unix ms) the answers to this cell's latest roll call are
  // still expected; hubs sharing cells release no one here before it.
  std::atomic<int64_t> settle_until_ms{0};

 private:
  const int id_;
  const std::string broker_url_;
  const size_t queue_cap_, queue_bytes_cap_;
  EmbeddedBroker* broker_ = nullptr;
  std::atomic<transport::Transport*> transport_{nullptr};
  std::atomic<bool> attached_{false};
  std::atomic<bool> draining_{false};
  std::atomic<bool> stopping_{false};
  mutable std::mutex q_mu_;
  std::condition_variable q_cv_, q_space_cv_;
  std::deque<transport::Message> queue_;
  size_t queued_bytes_ = 0;
  std::mutex drain_mu_;
  std::thread worker_;
};

}  // namespace flotilla::hub

#include "flotilla/hub/cell.hpp"

#include "flotilla/hub/broker.hpp"

namespace flotilla::hub {

std::string Cell::broker_state() const {
  if (!broker_) return "external";
  return broker_->running() && connected() ? "up" : "restarting";
}

bool Cell::connected() const {
  transport::Transport* t = transport_.load();
  return attached_ && t && t->connected();
}

bool Cell::push(transport::Message&& m) {
  std::unique_lock lock(q_mu_);
  q_space_cv_.wait(lock, [this] {
    return stopping_ || queue_.empty() || (queue_.size() < queue_cap_ && queued_bytes_ < queue_bytes_cap_);
  });
  if (stopping_) return false;
  queued_bytes_ += m.payload.size();
  queue_.push_back(std::move(m));
  q_cv_.notify_one();
  return true;
}

std::vector<transport::Message> Cell::pop(size_t max) {
  std::vector<transport::Message> batch;
  std::lock_guard lock(q_mu_);
  while (!queue_.empty() && batch.size() < max) {
    queued_bytes_ -= queue_.front().payload.size();
    batch.push_back(std::move(queue_.front()));
    queue_.pop_front();
  }
  q_space_cv_.notify_all();
  return batch;
}

void Cell::wait_for_work(std::chrono::milliseconds timeout) {
  std::unique_lock lock(q_mu_);
  q_cv_.wait_for(lock, timeout, [this] { return stopping_ || !queue_.empty(); });
}

size_t Cell::depth() const {
  std::lock_guard lock(q_mu_);
  return queue_.size();
}

void Cell::stop() {
  {
    std::lock_guard lock(q_mu_);
    stopping_ = true;
  }
  q_cv_.notify_all();
  q_space_cv_.notify_all();
}

}  // namespace flotilla::hub

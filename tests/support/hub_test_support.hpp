#pragma once
// Shared by the hub's unit tests: a transport that records what the hub
// publishes and subscribes to (thread-safe: the engine publishes from its own
// thread), and readers for the API's JSON answers.
#include <catch2/catch.hpp>

#include <atomic>
#include <chrono>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "flotilla/common/transport.hpp"
#include "flotilla/hub/api.hpp"

namespace flotilla::test {

// Stands in for a connected broker session: the hub refuses enrollment until
// it has subscribed to device reports.
class RecordingTransport final : public transport::Transport {
 public:
  Status connect(const transport::ConnectOptions&) override {
    connected_ = true;
    return {};
  }
  Status subscribe(const std::string& filter, int) override {
    std::lock_guard lock(mu_);
    subscriptions_.push_back(filter);
    return {};
  }
  Status publish(const transport::Message& m) override {
    std::lock_guard lock(mu_);
    // Roll calls apart: tests of desired states read published(). A roll
    // call goes out on every shard, then on the unsharded topic, which
    // rollcalls() counts (one per call); rollcall_topics() has them all.
    if (transport::is_rollcall_topic(m.topic)) {
      rollcall_topics_.insert(m.topic);
      if (m.topic == transport::kRollcallTopic) rollcalls_.push_back(m);
      return {};
    }
    published_.push_back(m);
    return {};
  }
  Status flush(std::chrono::milliseconds) override { return {}; }
  void disconnect() override { connected_ = false; }
  bool connected() const override { return connected_; }
  void on_message(MessageHandler) override {}
  void on_connection_lost(LostHandler) override {}

  std::vector<std::string> subscriptions() const {
    std::lock_guard lock(mu_);
    return subscriptions_;
  }
  std::vector<transport::Message> published() const {
    std::lock_guard lock(mu_);
    return published_;
  }
  std::vector<transport::Message> rollcalls() const {
    std::lock_guard lock(mu_);
    return rollcalls_;
  }
  std::set<std::string> rollcall_topics() const {
    std::lock_guard lock(mu_);
    return rollcall_topics_;
  }
  void clear() {
    std::lock_guard lock(mu_);
    published_.clear();
  }

 private:
  mutable std::mutex mu_;
  std::vector<std::string> subscriptions_;
  std::vector<transport::Message> published_, rollcalls_;
  std::set<std::string> rollcall_topics_;
  std::atomic<bool> connected_{true};
};

inline nlohmann::json body_of(const hub::HttpResponse& r) {
  nlohmann::json j = nlohmann::json::parse(r.body, nullptr, false);
  INFO(r.body);
  REQUIRE_FALSE(j.is_discarded());
  return j;
}

// The stable error code of a JSON error answer.
inline std::string error_code(const hub::HttpResponse& r) {
  const nlohmann::json j = body_of(r);
  REQUIRE(j.contains("error"));
  return j["error"]["code"].get<std::string>();
}

// The ids (or another string field) of a list answer's items.
inline std::set<std::string> ids_of(const nlohmann::json& items, const char* key = "id") {
  std::set<std::string> out;
  for (const auto& i : items) out.insert(i[key].get<std::string>());
  return out;
}

}  // namespace flotilla::test

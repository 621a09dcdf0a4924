#pragma once
// What the hub's API tests (hub_api, hub_access, hub_attacks, hub_control_log)
// all build: a request as the HTTP layer hands it to the Api, API tokens,
// signed bundles and signed enrollment requests. Each test keeps its own hub
// fixture (they differ in engine thread, limits and coordinator); these are
// the parts that were the same in all of them.
#include <catch2/catch.hpp>

#include <atomic>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "flotilla/bundles/bundle.hpp"
#include "flotilla/bundles/keys.hpp"
#include "flotilla/common/crypto.hpp"
#include "flotilla/hub/api.hpp"
#include "flotilla/hub/service.hpp"
#include "flotilla/v1/bundle.pb.h"
#include "flotilla/v1/enroll.pb.h"

namespace flotilla::test {

inline std::string bytes_string(const Bytes& b) { return std::string(b.begin(), b.end()); }

// A request from a loopback peer; no Authorization header when token is empty.
inline hub::HttpRequest api_request(const std::string& method, const std::string& target, const std::string& body,
                                    const std::string& token) {
  hub::HttpRequest req;
  req.method = method;
  req.target = target;
  req.body = body;
  req.peer = "127.0.0.1";
  if (!token.empty()) req.headers["authorization"] = "Bearer " + token;
  return req;
}

// A token made in the hub's store directly, as the bootstrap admin token is.
inline hub::CreatedToken make_token(hub::HubService& s, const std::string& kind, const std::string& name,
                                    const std::string& role, const std::string& project = "*") {
  hub::TokenRecord rec;
  rec.name = name;
  rec.role = role;
  rec.project = project;
  auto t = s.create_token(kind, rec);
  REQUIRE(t);
  return *t;
}

// A bundle of one manifest file (app.yaml holding content), valid for 30
// days from now_unix, signed by each of signers.
inline v1::SignedBundle signed_bundle(int64_t now_unix, const std::string& name, uint64_t version,
                                      const std::string& content, const std::vector<const bundles::KeyPair*>& signers) {
  v1::BundleManifest m;
  m.set_format_version(1);
  m.set_name(name);
  m.set_channel("stable");
  m.set_version(version);
  m.set_created_unix(now_unix);
  m.set_expires_unix(now_unix + 30 * 86400);
  auto* f = m.add_files();
  f->set_kind(v1::FILE_KIND_MANIFEST);
  f->set_name("app.yaml");
  f->set_content(content);
  f->set_mode(0644);
  auto h = crypto::sha256(f->content());
  f->set_sha256(std::string(h.begin(), h.end()));
  auto env = bundles::wrap(m);
  for (const auto* k : signers) REQUIRE(bundles::sign(env, *k));
  return env;
}

// Each call later than the last, as an agent stamps its enrollment proofs, so
// enrolling the same key again is taken (and a replay would not be).
inline uint64_t next_issued_ms() {
  static std::atomic<uint64_t> at{1'800'000'000'000};
  return ++at;
}

// An enrollment request signed by key with the timestamped proof of
// possession agents send (issued_ms: next_issued_ms() unless given).
inline v1::EnrollRequest enroll_request(const std::string& token, const bundles::KeyPair& key,
                                        const hub::Labels& labels = {},
                                        std::optional<uint64_t> issued_ms = std::nullopt) {
  v1::EnrollRequest req;
  req.set_enrollment_token(token);
  req.set_device_public_key(bytes_string(key.pub.key));
  req.set_hostname("edge-host");
  req.set_arch("arm64");
  req.set_agent_version("0.1.0");
  for (const auto& [k, v] : labels) (*req.mutable_labels())[k] = v;
  const uint64_t at = issued_ms ? *issued_ms : next_issued_ms();
  req.set_issued_unix_ms(at);
  req.set_proof(bytes_string(bundles::sign_detached(key, bundles::enroll_proof_message(token, key.pub.key, at))));
  return req;
}

}  // namespace flotilla::test

#pragma once
// Artifacts (the k3s binary, airgap image tarballs) travel outside the
// manifest and are fetched by hash. The manifest fixes their size and SHA-256;
// ArtifactChecker holds a download to both while the bytes arrive.
#include <cstdint>
#include <string>
#include <string_view>

#include "flotilla/common/crypto.hpp"
#include "flotilla/v1/bundle.pb.h"
#include "flotilla/v1/report.pb.h"

namespace flotilla::bundles {

// The URL to fetch an artifact from: its url when absolute (has "://"),
// otherwise `base` + "/" + url. The default url is the lower-case hex SHA-256,
// which the hub serves at GET <base>/<sha256hex>, so base is normally
// "https://hub.example/v1/artifacts" (DesiredState.artifact_base_url).
std::string artifact_url(const v1::Artifact& a, const std::string& base);

// Streaming check of one artifact download. Feed every byte in order
// (on resume, feed the bytes already on disk first). feed() refuses with
// REASON_ARTIFACT_SIZE as soon as more than `size` bytes arrived, so an
// endless response is cut off at size + one chunk; finish() refuses with
// REASON_ARTIFACT_SIZE when fewer bytes came and REASON_ARTIFACT_HASH when
// the SHA-256 differs (mix-and-match). Once refused it stays refused.
class ArtifactChecker {
 public:
  explicit ArtifactChecker(const v1::Artifact& artifact);
  v1::Reason feed(std::string_view chunk);
  v1::Reason finish();
  uint64_t received() const { return received_; }
  uint64_t expected_size() const { return size_; }
  const std::string& message() const { return message_; }

 private:
  std::string name_;
  std::string sha256_;
  uint64_t size_ = 0;
  uint64_t received_ = 0;
  crypto::Sha256Stream hash_;
  v1::Reason failed_ = v1::REASON_NONE;
  bool finished_ = false;
  std::string message_;
};

}  // namespace flotilla::bundles

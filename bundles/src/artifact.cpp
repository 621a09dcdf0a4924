#include "flotilla/bundles/artifact.hpp"

#include "flotilla/common/encoding.hpp"

namespace flotilla::bundles {

std::string artifact_url(const v1::Artifact& a, const std::string& base) {
  if (a.url().find("://") != std::string::npos) return a.url();
  std::string b = base;
  while (!b.empty() && b.back() == '/') b.pop_back();
  std::string rel = a.url();
  while (!rel.empty() && rel.front() == '/') rel.erase(rel.begin());
  return b + "/" + rel;
}

ArtifactChecker::ArtifactChecker(const v1::Artifact& artifact)
    : name_(artifact.name()), sha256_(artifact.sha256()), size_(artifact.size()) {}

v1::Reason ArtifactChecker::feed(std::string_view chunk) {
  if (failed_ != v1::REASON_NONE) return failed_;
  if (finished_) {
    failed_ = v1::REASON_ARTIFACT_SIZE;
    message_ = "artifact " + name_ + ": bytes after the end";
    return failed_;
  }
  // Refuse before hashing: the server may be sending endless data, and no
  // byte past `size` can belong to the artifact the manifest signed.
  if (chunk.size() > size_ - received_) {
    failed_ = v1::REASON_ARTIFACT_SIZE;
    message_ = "artifact " + name_ + ": more than the signed " + std::to_string(size_) + " bytes";
    received_ += chunk.size();
    return failed_;
  }
  hash_.update(reinterpret_cast<const uint8_t*>(chunk.data()), chunk.size());
  received_ += chunk.size();
  return v1::REASON_NONE;
}

v1::Reason ArtifactChecker::finish() {
  if (failed_ != v1::REASON_NONE || finished_) return failed_;
  finished_ = true;
  if (received_ != size_) {
    failed_ = v1::REASON_ARTIFACT_SIZE;
    message_ = "artifact " + name_ + ": got " + std::to_string(received_) + " bytes, the manifest says " +
               std::to_string(size_);
    return failed_;
  }
  auto d = hash_.finish();
  if (std::string(d.begin(), d.end()) != sha256_) {
    failed_ = v1::REASON_ARTIFACT_HASH;
    message_ = "artifact " + name_ + ": sha256 " + to_hex(d.data(), d.size()) + " differs from the signed " +
               to_hex(sha256_);
    return failed_;
  }
  return v1::REASON_NONE;
}

}  // namespace flotilla::bundles

#include "flotilla/sim/memory.hpp"

#include <algorithm>
#include <map>
#include <mutex>

#include "flotilla/common/crypto.hpp"
#include "flotilla/v1/desired.pb.h"

namespace flotilla::sim {

namespace {

struct Pool {
  std::mutex mu;
  std::map<std::string, std::weak_ptr<const std::string>, std::less<>> by_key;  // key: raw SHA-256
};
Pool& pool() {
  static Pool p;
  return p;
}

// Varint-and-length encoding; small and dependency-free.
void put_u64(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out.push_back(static_cast<char>((v & 0x7f) | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<char>(v));
}
void put_str(std::string& out, std::string_view s) {
  put_u64(out, s.size());
  out.append(s);
}

struct Reader {
  std::string_view in;
  bool bad = false;
  uint64_t u64() {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (in.empty()) break;
      const auto b = static_cast<uint8_t>(in.front());
      in.remove_prefix(1);
      v |= uint64_t{b & 0x7fu} << shift;
      if (!(b & 0x80)) return v;
    }
    bad = true;
    return 0;
  }
  std::string str() {
    const uint64_t n = u64();
    if (n > in.size()) {
      bad = true;
      return {};
    }
    std::string s(in.substr(0, n));
    in.remove_prefix(n);
    return s;
  }
};

}  // namespace

Shared intern(std::string_view bytes) {
  const auto h = crypto::sha256(bytes);
  std::string key(h.begin(), h.end());
  auto& p = pool();
  std::lock_guard lock(p.mu);
  auto it = p.by_key.find(key);
  if (it != p.by_key.end()) {
    if (auto live = it->second.lock()) return live;
  }
  auto s = std::make_shared<const std::string>(bytes);
  p.by_key[key] = s;
  return s;
}

size_t interned_count() {
  auto& p = pool();
  std::lock_guard lock(p.mu);
  size_t n = 0;
  for (const auto& [k, w] : p.by_key) n += w.expired() ? 0 : 1;
  return n;
}

// The applied desired state is kept whole only for drift repair; a
// simulated device stores its small per-device remainder and the SHA-256 of
// the shared bundle and trust bytes, which stay alive in `keep`.
namespace {
std::mutex keep_mu;
std::map<std::string, Shared> keep;  // pool key -> bytes, for split desired states (few: one per bundle)

std::string compact_desired(const std::string& payload) {
  v1::DesiredState ds;
  std::string out;
  if (payload.empty() || !ds.ParseFromString(payload)) {
    put_u64(out, 0);
    put_str(out, payload);
    return out;
  }
  auto hold = [](const std::string& bytes) {
    Shared s = intern(bytes);
    const auto h = crypto::sha256(bytes);
    std::string key(h.begin(), h.end());
    std::lock_guard lock(keep_mu);
    keep.emplace(key, s);
    return key;
  };
  const std::string bundle_key = hold(ds.bundle().SerializeAsString());
  const std::string trust_key = ds.has_trust() ? hold(ds.trust().SerializeAsString()) : std::string();
  ds.clear_bundle();
  ds.clear_trust();
  put_u64(out, 1);
  put_str(out, ds.SerializeAsString());
  put_str(out, bundle_key);
  put_str(out, trust_key);
  return out;
}

std::string expand_desired(Reader& r) {
  const uint64_t kind = r.u64();
  std::string rest = r.str();
  if (kind == 0) return rest;
  const std::string bundle_key = r.str();
  const std::string trust_key = r.str();
  v1::DesiredState ds;
  if (!ds.ParseFromString(rest)) {
    r.bad = true;
    return {};
  }
  std::lock_guard lock(keep_mu);
  if (auto it = keep.find(bundle_key); it != keep.end()) (void)ds.mutable_bundle()->ParseFromString(*it->second);
  if (!trust_key.empty()) {
    if (auto it = keep.find(trust_key); it != keep.end()) (void)ds.mutable_trust()->ParseFromString(*it->second);
  }
  return ds.SerializeAsString();
}
}  // namespace

std::string encode_state(const agent::AppliedState& s) {
  std::string out;
  out.reserve(256);
  put_str(out, s.bundle_name);
  put_str(out, s.channel);
  put_u64(out, s.version);
  put_str(out, s.manifest_sha256_hex);
  put_u64(out, s.generation);
  put_u64(out, s.director_generation);
  put_str(out, s.campaign_id);
  put_u64(out, s.files.size());
  for (const auto& f : s.files) {
    put_str(out, f.path);
    put_str(out, f.sha256_hex);
  }
  put_u64(out, s.highest_version.size());
  for (const auto& [ch, v] : s.highest_version) {
    put_str(out, ch);
    put_u64(out, v);
  }
  put_str(out, s.previous_manifest_sha256_hex);
  out += compact_desired(s.applied_desired);
  put_u64(out, s.in_flight ? 1 : 0);
  if (s.in_flight) {
    const auto& f = *s.in_flight;
    put_str(out, f.apply_id);
    put_u64(out, f.generation);
    put_str(out, f.campaign_id);
    put_str(out, f.bundle_name);
    put_u64(out, f.version);
    put_str(out, f.step);
    put_u64(out, f.backups.size());
    for (const auto& b : f.backups) {
      put_str(out, b.path);
      put_str(out, b.backup);
      put_u64(out, b.existed ? 1 : 0);
    }
  }
  put_u64(out, s.interrupted_generation);
  put_u64(out, s.interrupted_count);
  put_u64(out, s.outbox.size());
  for (const auto& [seq, r] : s.outbox) {
    put_u64(out, seq);
    put_str(out, r);
  }
  out.shrink_to_fit();
  return out;
}

Result<agent::AppliedState> decode_state(const std::string& blob) {
  agent::AppliedState s;
  if (blob.empty()) return s;
  Reader r{blob};
  s.bundle_name = r.str();
  s.channel = r.str();
  s.version = r.u64();
  s.manifest_sha256_hex = r.str();
  s.generation = r.u64();
  s.director_generation = r.u64();
  s.campaign_id = r.str();
  for (uint64_t n = r.u64(); n > 0 && !r.bad; --n) {
    agent::PlacedFile f;
    f.path = r.str();
    f.sha256_hex = r.str();
    s.files.push_back(std::move(f));
  }
  for (uint64_t n = r.u64(); n > 0 && !r.bad; --n) {
    std::string ch = r.str();
    s.highest_version[ch] = r.u64();
  }
  s.previous_manifest_sha256_hex = r.str();
  s.applied_desired = expand_desired(r);
  if (r.u64() == 1) {
    agent::InFlight f;
    f.apply_id = r.str();
    f.generation = r.u64();
    f.campaign_id = r.str();
    f.bundle_name = r.str();
    f.version = r.u64();
    f.step = r.str();
    for (uint64_t n = r.u64(); n > 0 && !r.bad; --n) {
      agent::BackupEntry b;
      b.path = r.str();
      b.backup = r.str();
      b.existed = r.u64() == 1;
      f.backups.push_back(std::move(b));
    }
    s.in_flight = std::move(f);
  }
  s.interrupted_generation = r.u64();
  s.interrupted_count = static_cast<uint32_t>(r.u64());
  for (uint64_t n = r.u64(); n > 0 && !r.bad; --n) {
    const uint64_t seq = r.u64();
    s.outbox[seq] = r.str();
  }
  if (r.bad) return make_error(Errc::internal, "simulated device state does not decode");
  return s;
}

// --- files -----------------------------------------------------------------

FileEntry* SimFileTree::find(const std::string& path) {
  for (auto& e : files_) {
    if (*e.path == path) return &e;
  }
  return nullptr;
}

// Only the node's files fail; the agent's own state directory keeps working,
// like a device whose /etc is read-only or full.
bool SimFileTree::refuse(const std::string& path) const {
  return fail_writes_ && path.rfind("/var/lib/flotilla/", 0) != 0;
}

Result<std::optional<agent::FileData>> SimFileTree::read(const std::string& path) {
  auto* e = find(path);
  if (!e) return std::optional<agent::FileData>();
  return std::optional<agent::FileData>(agent::FileData{*e->content, e->mode});
}

void SimFileTree::put(const std::string& path, Shared content, unsigned mode) {
  if (auto* e = find(path)) {
    e->content = std::move(content);
    e->mode = static_cast<uint16_t>(mode);
    return;
  }
  files_.push_back(FileEntry{intern(path), std::move(content), static_cast<uint16_t>(mode)});
  files_.shrink_to_fit();
}

Status SimFileTree::write_atomic(const std::string& path, const std::string& content, unsigned mode) {
  if (refuse(path)) return make_error(Errc::io, "simulated install failure: cannot write " + path);
  put(path, intern(content), mode);
  return {};
}

Status SimFileTree::remove(const std::string& path) {
  files_.erase(std::remove_if(files_.begin(), files_.end(), [&](const FileEntry& e) { return *e.path == path; }),
               files_.end());
  return {};
}

Result<std::optional<std::string>> SimFileTree::sha256_hex(const std::string& path) {
  auto* e = find(path);
  if (!e) return std::optional<std::string>();
  return std::optional<std::string>(crypto::sha256_hex(*e->content));
}

Result<uint64_t> SimFileTree::size_of(const std::string& path) {
  auto* e = find(path);
  if (!e) return make_error(Errc::not_found, "no " + path);
  return static_cast<uint64_t>(e->content->size());
}

Status SimFileTree::preserve(const std::string& path, const std::string& backup) {
  auto* e = find(path);
  if (!e) return make_error(Errc::not_found, "no " + path);
  Shared content = e->content;  // a hard link: the same bytes
  put(backup, std::move(content), e->mode);
  return {};
}

Status SimFileTree::rename(const std::string& from, const std::string& to, std::optional<unsigned> mode) {
  if (refuse(to)) return make_error(Errc::io, "simulated install failure: cannot rename to " + to);
  auto* e = find(from);
  if (!e) return make_error(Errc::not_found, "no " + from);
  FileEntry moved = *e;
  (void)remove(from);
  put(to, moved.content, mode ? *mode : moved.mode);
  return {};
}

Status SimFileTree::remove_tree(const std::string& dir) {
  const std::string prefix = dir + "/";
  files_.erase(std::remove_if(files_.begin(), files_.end(),
                              [&](const FileEntry& e) { return e.path->rfind(prefix, 0) == 0; }),
               files_.end());
  return {};
}

// --- state, runtime, downloads ------------------------------------------------

std::atomic<uint64_t> SimStateStore::journal_rows_{0};

Result<agent::AppliedState> SimStateStore::load() { return decode_state(blob_); }

Status SimStateStore::save(const agent::AppliedState& s) {
  blob_ = encode_state(s);
  return {};
}

Status SimStateStore::journal(const agent::JournalEntry&) {
  journal_rows_.fetch_add(1, std::memory_order_relaxed);
  return {};
}

agent::K3sHealth SimK3sRuntime::health() {
  agent::K3sHealth h;
  h.api_ready = healthy_;
  h.node_ready = healthy_;
  if (!healthy_) h.detail = "simulated health failure: node NotReady";
  return h;
}

Status SimDownloader::fetch(const std::string& url, const std::string& dest, uint64_t max_bytes) {
  if (!fetch_) return make_error(Errc::unavailable, "no artifact source");
  auto bytes = fetch_(url, max_bytes);
  if (!bytes) return bytes.error();
  if ((*bytes)->size() > max_bytes) return make_error(Errc::too_large, "artifact larger than " + std::to_string(max_bytes));
  files_.put(dest, *bytes, 0600);
  return {};
}

}  // namespace flotilla::sim

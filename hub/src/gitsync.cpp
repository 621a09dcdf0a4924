// Git sync with libgit2: a bare clone per GitRepo, fetched on its interval;
// each new commit's documents go through parse_documents and
// HubService::apply, like `flotilla apply --prune --applyset gitrepo-<name>`.
#include "flotilla/hub/gitsync.hpp"

#include <git2.h>

#include <memory>

#include "flotilla/bundles/bundle.hpp"
#include "flotilla/common/fs.hpp"
#include "flotilla/common/log.hpp"

namespace flotilla::hub {

using nlohmann::json;

namespace {

template <class T, void (*Free)(T*)>
struct GitFree {
  void operator()(T* p) const {
    if (p) Free(p);
  }
};
using Repo = std::unique_ptr<git_repository, GitFree<git_repository, git_repository_free>>;
using Remote = std::unique_ptr<git_remote, GitFree<git_remote, git_remote_free>>;
using Commit = std::unique_ptr<git_commit, GitFree<git_commit, git_commit_free>>;
using Tree = std::unique_ptr<git_tree, GitFree<git_tree, git_tree_free>>;
using Entry = std::unique_ptr<git_tree_entry, GitFree<git_tree_entry, git_tree_entry_free>>;
using Blob = std::unique_ptr<git_blob, GitFree<git_blob, git_blob_free>>;

Error lib_error(const std::string& what) {
  const ::git_error* e = git_error_last();
  return make_error(Errc::unavailable, what + ": " + (e && e->message ? e->message : "unknown libgit2 error"), true);
}

// libgit2 is initialised once for the process and never shut down: the
// hub's threads may still be using it when statics are destroyed.
void ensure_libgit2() {
  static const int once = git_libgit2_init();
  (void)once;
}

Result<Repo> open_clone(const std::filesystem::path& dir) {
  ensure_libgit2();
  git_repository* raw = nullptr;
  if (git_repository_open_bare(&raw, dir.c_str()) == 0) return Repo(raw);
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return make_error(Errc::io, "create " + dir.string() + ": " + ec.message());
  if (git_repository_init(&raw, dir.c_str(), 1) != 0) return lib_error("init " + dir.string());
  return Repo(raw);
}

struct FetchLimits {
  uint64_t max_bytes;
  std::chrono::steady_clock::time_point deadline;
  std::string why;
};

int on_progress(const git_indexer_progress* stats, void* payload) {
  auto* l = static_cast<FetchLimits*>(payload);
  if (stats->received_bytes > l->max_bytes) {
    l->why = "the repository sent more than " + std::to_string(l->max_bytes >> 20) + " MiB";
    return -1;
  }
  if (std::chrono::steady_clock::now() > l->deadline) {
    l->why = "the fetch took too long";
    return -1;
  }
  return 0;
}

std::string local_url(const std::string& url) {
  // libgit2 reads "file:///x" and "/x" alike; keep what the operator wrote.
  return url;
}

bool doc_file(const std::string& name) {
  return name.ends_with(".yaml") || name.ends_with(".yml") || name.ends_with(".json");
}

bool safe_entry_name(const std::string& n) {
  return !n.empty() && n != "." && n != ".." && n.find('/') == std::string::npos &&
         n.find('\0') == std::string::npos && n != ".git";
}

struct Walker {
  git_repository* repo;
  const GitSyncConfig& cfg;
  std::vector<SourceFile>& out;
  size_t total = 0;

  Status walk(git_tree* tree, const std::string& prefix, int depth) {
    if (depth > cfg.max_depth) {
      return make_error(Errc::too_large, prefix + ": directories nested deeper than " + std::to_string(cfg.max_depth));
    }
    const size_t n = git_tree_entrycount(tree);
    for (size_t i = 0; i < n; ++i) {
      const git_tree_entry* e = git_tree_entry_byindex(tree, i);
      const std::string name = git_tree_entry_name(e);
      const std::string path = prefix.empty() ? name : prefix + "/" + name;
      if (!safe_entry_name(name)) return make_error(Errc::invalid_argument, "unsafe name in the tree: '" + path + "'");
      const git_filemode_t mode = git_tree_entry_filemode(e);
      if (mode == GIT_FILEMODE_TREE) {
        git_tree* sub = nullptr;
        if (git_tree_lookup(&sub, repo, git_tree_entry_id(e)) != 0) return lib_error("read " + path);
        Tree hold(sub);
        if (auto s = walk(sub, path, depth + 1); !s) return s;
        continue;
      }
      if (!doc_file(name)) continue;
      if (mode == GIT_FILEMODE_LINK) {
        return make_error(Errc::invalid_argument, path + " is a symlink; symlinks are not followed");
      }
      if (mode != GIT_FILEMODE_BLOB && mode != GIT_FILEMODE_BLOB_EXECUTABLE) continue;  // a submodule
      if (out.size() >= kMaxApplyFiles) {
        return make_error(Errc::too_large, "more than " + std::to_string(kMaxApplyFiles) + " files to apply");
      }
      git_blob* raw = nullptr;
      if (git_blob_lookup(&raw, repo, git_tree_entry_id(e)) != 0) return lib_error("read " + path);
      Blob blob(raw);
      const auto size = static_cast<size_t>(git_blob_rawsize(raw));
      if (size > kMaxApplyFileBytes) {
        return make_error(Errc::too_large, path + " is larger than " + std::to_string(kMaxApplyFileBytes / 1024) +
                                               " KiB");
      }
      total += size;
      if (total > cfg.max_total_bytes) {
        return make_error(Errc::too_large, "the files to apply exceed " + std::to_string(cfg.max_total_bytes >> 20) +
                                               " MiB");
      }
      out.push_back({path, std::string(static_cast<const char*>(git_blob_rawcontent(raw)), size)});
    }
    return {};
  }
};

Result<Tree> commit_tree(git_repository* repo, const std::string& commit_hex) {
  git_oid oid;
  if (git_oid_fromstr(&oid, commit_hex.c_str()) != 0) return make_error(Errc::invalid_argument, "bad commit id");
  git_commit* c = nullptr;
  if (git_commit_lookup(&c, repo, &oid) != 0) return lib_error("commit " + commit_hex);
  Commit hold(c);
  git_tree* t = nullptr;
  if (git_commit_tree(&t, c) != 0) return lib_error("tree of " + commit_hex);
  return Tree(t);
}

}  // namespace

Result<std::string> git_fetch(const std::filesystem::path& clone_dir, const GitRepoRecord& r,
                              const GitSyncConfig& cfg) {
  auto repo = open_clone(clone_dir);
  if (!repo) return repo.error();
  git_remote* raw = nullptr;
  if (git_remote_lookup(&raw, repo->get(), "origin") != 0) {
    if (git_remote_create(&raw, repo->get(), "origin", local_url(r.url).c_str()) != 0) {
      return lib_error("remote " + r.url);
    }
  } else if (std::string(git_remote_url(raw)) != r.url) {
    git_remote_free(raw);
    raw = nullptr;
    if (git_remote_set_url(repo->get(), "origin", r.url.c_str()) != 0 ||
        git_remote_lookup(&raw, repo->get(), "origin") != 0) {
      return lib_error("remote " + r.url);
    }
  }
  Remote remote(raw);
  const std::string tracking = "refs/remotes/origin/" + r.branch;
  const std::string spec = "+refs/heads/" + r.branch + ":" + tracking;
  char* specs[] = {const_cast<char*>(spec.c_str())};
  git_strarray refspecs{specs, 1};
  git_fetch_options opts = GIT_FETCH_OPTIONS_INIT;
  FetchLimits limits{cfg.max_fetch_bytes, std::chrono::steady_clock::now() + cfg.fetch_timeout, ""};
  opts.callbacks.transfer_progress = on_progress;
  opts.callbacks.payload = &limits;
  opts.download_tags = GIT_REMOTE_DOWNLOAD_TAGS_NONE;
  // A branch deleted upstream must not leave its last commit looking current.
  opts.prune = GIT_FETCH_PRUNE;
  if (git_remote_fetch(remote.get(), &refspecs, &opts, "flotilla git sync") != 0) {
    if (!limits.why.empty()) return make_error(Errc::too_large, "fetch " + r.url + ": " + limits.why);
    return lib_error("fetch " + r.url);
  }
  git_oid head;
  if (git_reference_name_to_id(&head, repo->get(), tracking.c_str()) != 0) {
    return make_error(Errc::not_found, "branch '" + r.branch + "' not found in " + r.url);
  }
  char hex[GIT_OID_HEXSZ + 1] = {};
  git_oid_tostr(hex, sizeof hex, &head);
  return std::string(hex);
}

Result<std::vector<SourceFile>> git_documents(const std::filesystem::path& clone_dir, const std::string& commit,
                                              const std::string& path, const GitSyncConfig& cfg) {
  auto repo = open_clone(clone_dir);
  if (!repo) return repo.error();
  auto tree = commit_tree(repo->get(), commit);
  if (!tree) return tree.error();
  git_tree* dir = tree->get();
  Tree sub;
  if (!path.empty()) {
    git_tree_entry* raw_entry = nullptr;
    if (git_tree_entry_bypath(&raw_entry, tree->get(), path.c_str()) != 0) {
      return make_error(Errc::not_found, "path '" + path + "' is not in commit " + commit.substr(0, 12));
    }
    Entry e(raw_entry);
    if (git_tree_entry_filemode(raw_entry) != GIT_FILEMODE_TREE) {
      return make_error(Errc::invalid_argument, "path '" + path + "' is not a directory in commit " +
                                                    commit.substr(0, 12) + " (symlinks are not followed)");
    }
    git_tree* t = nullptr;
    if (git_tree_lookup(&t, repo->get(), git_tree_entry_id(raw_entry)) != 0) return lib_error("read " + path);
    sub.reset(t);
    dir = t;
  }
  std::vector<SourceFile> files;
  Walker w{repo->get(), cfg, files};
  if (auto s = w.walk(dir, path, 0); !s) return s.error();
  return files;
}

Result<std::string> git_read_file(const std::filesystem::path& clone_dir, const std::string& commit,
                                  const std::string& path, size_t max_bytes) {
  auto repo = open_clone(clone_dir);
  if (!repo) return repo.error();
  auto tree = commit_tree(repo->get(), commit);
  if (!tree) return tree.error();
  // Every step is a tree entry of this commit: a symlink along the way is a
  // blob, not a directory, so lookup stops there; nothing is followed.
  git_tree_entry* raw = nullptr;
  if (git_tree_entry_bypath(&raw, tree->get(), path.c_str()) != 0) {
    return make_error(Errc::not_found, path + " is not in the commit (symlinked directories are not followed)");
  }
  Entry e(raw);
  const git_filemode_t mode = git_tree_entry_filemode(raw);
  if (mode == GIT_FILEMODE_LINK) return make_error(Errc::invalid_argument, path + " is a symlink; symlinks are not followed");
  if (mode != GIT_FILEMODE_BLOB && mode != GIT_FILEMODE_BLOB_EXECUTABLE) {
    return make_error(Errc::invalid_argument, path + " is not a regular file");
  }
  git_blob* b = nullptr;
  if (git_blob_lookup(&b, repo->get(), git_tree_entry_id(raw)) != 0) return lib_error("read " + path);
  Blob blob(b);
  const auto size = static_cast<size_t>(git_blob_rawsize(b));
  if (size > max_bytes) return make_error(Errc::too_large, path + " is larger than " + std::to_string(max_bytes) + " bytes");
  return std::string(static_cast<const char*>(git_blob_rawcontent(b)), size);
}

// ---- the syncer ---------------------------------------------------------------------

GitSync::GitSync(HubService& hub, const Clock& clock, GitSyncConfig cfg)
    : hub_(hub), clock_(clock), cfg_(std::move(cfg)) {
  ensure_libgit2();
}

GitSync::~GitSync() { stop(); }

void GitSync::start() {
  hub_.set_git_sync_trigger([this](const std::string& name) { trigger(name); });
  thread_ = std::thread([this] { loop(); });
}

void GitSync::stop() {
  {
    std::lock_guard lock(mu_);
    if (stopping_) return;
    stopping_ = true;
  }
  if (thread_.joinable()) hub_.set_git_sync_trigger(nullptr);
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void GitSync::trigger(const std::string& name) {
  {
    std::lock_guard lock(mu_);
    asked_.insert(name);
  }
  cv_.notify_all();
}

void GitSync::loop() {
  for (;;) {
    {
      std::unique_lock lock(mu_);
      cv_.wait_for(lock, cfg_.tick, [this] { return stopping_ || !asked_.empty(); });
      if (stopping_) return;
    }
    poll_once();
  }
}

void GitSync::poll_once() {
  auto repos = hub_.list_gitrepos();
  if (!repos) {
    log::get("hub")->warn("git sync: list repositories: {}", repos.error().message);
    return;
  }
  std::set<std::string> asked;
  {
    std::lock_guard lock(mu_);
    asked.swap(asked_);
  }
  const int64_t now = clock_.now_unix_ms();
  std::set<std::string> names;
  for (const auto& r : *repos) {
    names.insert(r.name);
    if (asked.count(r.name) || r.last_attempt_ms == 0 || now - r.last_attempt_ms >= r.interval_ms) sync(r);
    std::lock_guard lock(mu_);
    if (stopping_) return;
  }
  // Clones of repositories that are gone; their secrets/ stay for the operator.
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(cfg_.dir, ec)) {
    const auto name = entry.path().filename().string();
    if (!names.count(name) && std::filesystem::exists(entry.path() / "repo.git")) {
      std::filesystem::remove_all(entry.path() / "repo.git", ec);
    }
  }
}

void GitSync::sync(const GitRepoRecord& repo) {
  auto logger = log::get("hub");
  GitRepoRecord r = repo;
  const std::string prev_error = r.error, prev_attempt = r.attempt_commit;
  r.last_attempt_ms = clock_.now_unix_ms();
  const auto clone = cfg_.dir / r.name / "repo.git";
  auto audit = [&](int status, const std::string& detail) {
    AuditRecord a;
    a.actor = "gitrepo:" + r.name;
    a.actor_name = r.name;
    a.role = "gitrepo";
    a.project = r.project;
    a.method = "SYNC";
    a.path = "/v1/gitrepos/" + r.name;
    a.detail = detail.substr(0, 1024);
    a.status = status;
    if (auto s = hub_.append_audit(a); !s) logger->error("git sync: audit: {}", s.error().message);
  };
  auto failed = [&](const std::string& why) {
    r.error = why;
    if (auto s = hub_.save_gitrepo_status(r); !s) logger->error("git sync: save status {}: {}", r.name, s.error().message);
    // Reported once per commit and reason, not on every poll.
    if (why != prev_error || r.attempt_commit != prev_attempt) {
      logger->warn("git sync repo={} commit={} failed: {}", r.name, r.attempt_commit.substr(0, 12), why);
      audit(400, "commit " + r.attempt_commit.substr(0, 12) + " not applied: " + why);
    }
  };

  auto head = git_fetch(clone, r, cfg_);
  if (!head) return failed(head.error().message);
  const std::string commit = *head;
  r.attempt_commit = commit;
  if (commit == r.commit && r.error.empty()) {
    (void)hub_.save_gitrepo_status(r);
    return;  // nothing new
  }
  auto files = git_documents(clone, commit, r.path, cfg_);
  if (!files) return failed(files.error().message);
  auto docs = parse_documents(*files, [&](const std::string& path) {
    return git_read_file(clone, commit, path, bundles::kMaxEnvelopeBytes);
  }, ParseOptions{false});
  if (!docs) return failed(docs.error().message);
  ApplyRequest req;
  req.documents = std::move(*docs);
  req.apply_set = std::string(kGitApplySetPrefix) + r.name;
  req.prune = true;
  ApplyScope scope{r.project, Role::admin, "gitrepo:" + r.name, "GitRepo " + r.name};
  auto out = hub_.apply(req, scope);
  if (!out) return failed(out.error().message);

  json applied = json::array();
  std::string detail = "commit " + commit.substr(0, 12) + " applied";
  for (const auto& o : out->objects) {
    if (o.action != "pruned") applied.push_back(kind_name(o.kind) + "/" + o.project + "/" + o.name);
    if (o.action != "unchanged") {
      detail += "; " + o.action + " " + kind_name(o.kind) + " " + o.project + "/" + o.name +
                (o.target.empty() ? "" : " (" + o.target + ")");
    }
    // Nobody is there to be shown a new token's secret: it goes where the
    // hub's own admin token goes, readable only by the hub's user.
    if (!o.secret.empty()) {
      const auto dir = cfg_.dir / r.name / "secrets" / o.project;
      const auto file = dir / (kind_name(o.kind) + "-" + o.name + ".token");
      if (auto s = fs::ensure_dir(dir, 0700); !s) {
        logger->error("git sync: {}", s.error().message);
      } else if (auto w = fs::write_file_atomic(file, o.secret + "\n", 0600); !w) {
        logger->error("git sync: write secret of {} {}: {}", kind_name(o.kind), o.name, w.error().message);
      } else {
        logger->info("git sync repo={} new {} {}/{}: its secret is in {}", r.name, kind_name(o.kind), o.project,
                     o.name, file.string());
      }
    }
  }
  r.commit = commit;
  r.error.clear();
  r.last_success_ms = r.last_attempt_ms;
  r.applied = applied.dump();
  if (auto s = hub_.save_gitrepo_status(r); !s) logger->error("git sync: save status {}: {}", r.name, s.error().message);
  logger->info("git sync repo={} commit={} objects={} changes={}", r.name, commit.substr(0, 12), out->objects.size(),
               out->changed());
  if (out->changed() > 0 || !prev_error.empty()) audit(200, detail);
}

}  // namespace flotilla::hub

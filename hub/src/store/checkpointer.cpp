#include "flotilla/hub/checkpointer.hpp"

#include <sqlite3.h>

#include "flotilla/common/log.hpp"

namespace flotilla::hub {

Result<std::unique_ptr<Checkpointer>> Checkpointer::start(sql::Db& writer, const std::string& path, Options opts) {
  if (opts.start_pages < 1 || opts.hard_cap_pages < opts.start_pages) {
    return make_error(Errc::invalid_argument, "checkpointer: need 1 <= start_pages <= hard_cap_pages");
  }
  auto own = sql::Db::open(path);
  if (!own) return own.error().with_context("checkpointer");
  // A checkpoint syncs the WAL before it copies and the database after.
  if (auto s = (*own)->exec("PRAGMA synchronous = FULL"); !s) return s.error().with_context("checkpointer");
  // This connection never commits, so it never checkpoints on its own.
  sqlite3_wal_autocheckpoint((*own)->raw(), 0);
  std::unique_ptr<Checkpointer> c(new Checkpointer(writer, std::move(*own), opts));
  // Replaces the writer's autocheckpoint (itself a WAL hook).
  sqlite3_wal_hook(writer.raw(), &Checkpointer::on_commit, c.get());
  c->thread_ = std::thread([p = c.get()] { p->run(); });
  return c;
}

Checkpointer::Checkpointer(sql::Db& writer, std::unique_ptr<sql::Db> own, Options opts)
    : writer_(writer), own_(std::move(own)), opts_(opts) {}

Checkpointer::~Checkpointer() {
  // The writer checkpoints by itself again, as SQLite does by default.
  sqlite3_wal_autocheckpoint(writer_.raw(), static_cast<int>(opts_.start_pages));
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

// Runs in the committing thread, right after its commit (the writer's
// connection mutex held): only a note, unless the log is past the cap.
int Checkpointer::on_commit(void* self, sqlite3* db, const char* schema, int pages) {
  auto* c = static_cast<Checkpointer*>(self);
  c->wal_pages_ = pages;
  if (pages >= c->opts_.hard_cap_pages) {
    // The thread's checkpoints never caught up with this writer (each
    // copies what was there when it began, the writer appends meanwhile,
    // and the log starts over only after one that copied everything). The
    // writer's own, with nobody appending, copies everything, as SQLite's
    // autocheckpoint does; the next transaction starts the log over.
    std::lock_guard running(c->running_);
    sqlite3_wal_checkpoint_v2(db, schema, SQLITE_CHECKPOINT_PASSIVE, nullptr, nullptr);
    ++c->inline_;
    return SQLITE_OK;
  }
  if (c->tail_wanted_.exchange(false)) {
    std::lock_guard running(c->running_);
    sqlite3_wal_checkpoint_v2(db, schema, SQLITE_CHECKPOINT_PASSIVE, nullptr, nullptr);
    ++c->tails_;
    return SQLITE_OK;
  }
  if (pages >= c->opts_.start_pages) {
    {
      std::lock_guard lock(c->mu_);
      c->wanted_ = true;
    }
    c->cv_.notify_one();
  }
  return SQLITE_OK;
}

void Checkpointer::run() {
  std::unique_lock lock(mu_);
  for (;;) {
    cv_.wait(lock, [this] { return wanted_ || stopping_; });
    if (stopping_) return;
    wanted_ = false;
    lock.unlock();
    int frames = 0, done = 0;
    // PASSIVE: copies every frame no reader still needs, waits for nobody;
    // the writer goes on appending meanwhile. The next write transaction
    // after a complete checkpoint starts the log from its beginning.
    int rc = SQLITE_OK;
    {
      std::lock_guard running(running_);
      rc = sqlite3_wal_checkpoint_v2(own_->raw(), "main", SQLITE_CHECKPOINT_PASSIVE, &frames, &done);
    }
    if (rc != SQLITE_OK && rc != SQLITE_BUSY) {
      log::get("hub")->warn("store checkpoint failed: {}", sqlite3_errmsg(own_->raw()));
    } else if (rc == SQLITE_OK && done > 0) {
      // frames and done count only what was there when it began; what the
      // writer appended since is left to the writer's next commit.
      tail_wanted_ = true;
    }
    ++background_;
    lock.lock();
  }
}

}  // namespace flotilla::hub

#pragma once
// WAL checkpoints off the store lock. SQLite checkpoints a WAL database in
// the connection that commits once the log passes 1,000 pages: that commit
// then copies the pages into the database file and syncs it, while the
// hub's store lock is held and every cell's report worker and the campaign
// engine wait (a third of the report path's time in the 100k profile was
// commits). Here the committing connection only notes how long the log is;
// a thread with its own connection to the same file runs PASSIVE
// checkpoints, which copy what no reader needs any more without blocking
// the writer. SQLite starts the log over only after a checkpoint that
// copied every frame, which a checkpoint racing a busy writer never does:
// so the writer's next commit after each of the thread's copies the few
// frames appended meanwhile (the bulk of the copying and syncing stays on
// the thread). Durability is unchanged: a commit is durable by the WAL (and
// its own synchronous setting), not by the checkpoint. A log that still
// grows past hard_cap_pages (the thread cannot keep up) is checkpointed by
// the committing connection as before, so the WAL stays bounded.
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "flotilla/common/result.hpp"
#include "flotilla/common/sqlite.hpp"

namespace flotilla::hub {

class Checkpointer {
 public:
  struct Options {
    int64_t start_pages = 1000;      // SQLite's own autocheckpoint threshold
    int64_t hard_cap_pages = 16000;  // about 64 MiB of 4 KiB pages
  };
  // Takes over checkpointing of writer's database at path (writer keeps
  // committing as before). Stop before writer closes (the destructor does).
  static Result<std::unique_ptr<Checkpointer>> start(sql::Db& writer, const std::string& path, Options opts);
  static Result<std::unique_ptr<Checkpointer>> start(sql::Db& writer, const std::string& path) {
    return start(writer, path, Options{});
  }
  ~Checkpointer();
  Checkpointer(const Checkpointer&) = delete;
  Checkpointer& operator=(const Checkpointer&) = delete;

  uint64_t background_checkpoints() const { return background_.load(); }
  uint64_t inline_checkpoints() const { return inline_.load(); }
  uint64_t tail_checkpoints() const { return tails_.load(); }
  // Pages in the WAL after the last commit (as the writer saw it).
  int64_t wal_pages() const { return wal_pages_.load(); }

 private:
  Checkpointer(sql::Db& writer, std::unique_ptr<sql::Db> own, Options opts);
  static int on_commit(void* self, sqlite3* db, const char* schema, int pages);
  void run();

  sql::Db& writer_;
  std::unique_ptr<sql::Db> own_;
  const Options opts_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool wanted_ = false, stopping_ = false;
  // Held by whoever runs a checkpoint: SQLite lets one run at a time and
  // refuses a second at once, so the writer at the cap waits for the
  // thread's to end and then runs its own, which nothing overtakes.
  std::mutex running_;
  // The thread's last checkpoint left frames the writer appended while it
  // ran: the writer's next commit copies that tail (a few frames, nobody
  // appending), which lets the next transaction start the log over.
  std::atomic<bool> tail_wanted_{false};
  std::atomic<int64_t> wal_pages_{0};
  std::atomic<uint64_t> background_{0}, inline_{0}, tails_{0};
  std::thread thread_;
};

}  // namespace flotilla::hub

#pragma once
// Group commit: concurrent writers share one SQLite commit. The store runs
// with synchronous=FULL, so every commit waits for an fsync (a millisecond or
// more) while it holds the store lock; one commit per enrollment made that
// fsync the ceiling of the enrollment rate. Here each caller's work still runs
// alone, in its own savepoint (its failure undoes only its own writes), but
// the work that queued up while one commit was syncing goes into the next
// transaction together, and one fsync makes it all durable. No caller returns
// before its work is committed (or refused); a failed commit fails every
// caller of that batch.
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>

#include "flotilla/common/result.hpp"
#include "flotilla/common/sqlite.hpp"
#include "flotilla/hub/store_mutex.hpp"

namespace flotilla::hub {

class GroupCommit {
 public:
  // store_mu guards db; it is taken here, around each batch.
  GroupCommit(StoreMutex& store_mu, sql::Db& db) : store_mu_(store_mu), db_(db) {}

  // Runs work (with the store lock held, inside a transaction and its own
  // savepoint) and returns once its writes are committed: work's own error,
  // or the commit's.
  Status run(const std::function<Status()>& work);
  // Runs each batch through runner (the control log's write, which may run
  // the batch again after another hub wrote first); set before any run().
  using Runner = std::function<Status(const std::function<Status()>&)>;
  void set_runner(Runner runner) { runner_ = std::move(runner); }

  uint64_t commits() const;  // transactions committed (or tried)
  uint64_t runs() const;     // work done
  size_t queued() const;     // work waiting for the next batch

 private:
  struct Pending {
    const std::function<Status()>* work;
    Status status;
    bool done = false;
  };
  void run_batch(std::deque<Pending*>& batch);
  // Each work in its own savepoint; true when any is to be kept.
  bool run_works(std::deque<Pending*>& batch);

  StoreMutex& store_mu_;
  sql::Db& db_;
  Runner runner_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Pending*> queue_;
  bool leading_ = false;  // one caller at a time runs a batch
  uint64_t commits_ = 0, runs_ = 0;
};

}  // namespace flotilla::hub

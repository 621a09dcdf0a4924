#include "flotilla/hub/group_commit.hpp"

#include <exception>
#include <string>

namespace flotilla::hub {

Status GroupCommit::run(const std::function<Status()>& work) {
  Pending me{&work, {}, false};
  std::unique_lock lock(mu_);
  queue_.push_back(&me);
  // Whoever finds no batch running leads the next one, taking everything
  // queued by then (its own work included, unless a leader took it already).
  while (!me.done) {
    if (leading_) {
      cv_.wait(lock);
      continue;
    }
    leading_ = true;
    std::deque<Pending*> batch;
    batch.swap(queue_);
    lock.unlock();
    run_batch(batch);
    lock.lock();
    leading_ = false;
    for (Pending* p : batch) p->done = true;
    cv_.notify_all();
  }
  return me.status;
}

bool GroupCommit::run_works(std::deque<Pending*>& batch) {
  bool any = false;
  for (Pending* p : batch) {
    // A savepoint each: work that fails leaves nothing of itself behind.
    sql::Transaction own(db_);
    if (!own.ok()) {
      p->status = make_error(Errc::unavailable, "store: cannot begin a savepoint", true);
      continue;
    }
    try {
      p->status = (*p->work)();
    } catch (const std::exception& e) {
      p->status = make_error(Errc::internal, std::string("store work: ") + e.what());
    }
    if (p->status) p->status = own.commit();
    any = any || p->status.ok();
  }
  return any;
}

void GroupCommit::run_batch(std::deque<Pending*>& batch) {
  bool any = false;
  Status committed;
  if (runner_) {
    // One control write for the group; the runner may run it again.
    committed = runner_([&]() -> Status {
      std::lock_guard store(store_mu_);
      any = run_works(batch);
      // Nothing to keep: the transaction rolls back.
      return any ? Status{} : make_error(Errc::refused, "no work of the group to keep");
    });
  } else {
    std::lock_guard store(store_mu_);
    sql::Transaction tx(db_);
    if (!tx.ok()) {
      for (Pending* p : batch) p->status = make_error(Errc::unavailable, "store: cannot begin a transaction", true);
      return;
    }
    any = run_works(batch);
    committed = any ? tx.commit() : Status{};
  }
  std::lock_guard lock(mu_);
  runs_ += batch.size();
  if (!any) return;  // nothing to keep: the transaction rolls back
  ++commits_;
  if (!committed) {
    for (Pending* p : batch) {
      if (p->status) p->status = committed.error();
    }
  }
}

uint64_t GroupCommit::commits() const {
  std::lock_guard lock(mu_);
  return commits_;
}
uint64_t GroupCommit::runs() const {
  std::lock_guard lock(mu_);
  return runs_;
}
size_t GroupCommit::queued() const {
  std::lock_guard lock(mu_);
  return queue_.size();
}

}  // namespace flotilla::hub

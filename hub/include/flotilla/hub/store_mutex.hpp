#pragma once
// The hub's store lock (ADR 18, slice 8). Locking it, as every writer of
// hub.db does, holds hub.db and every cell's own device file. One cell's
// file can also be held alone (file(cell)): what that cell's report worker
// holds while it applies its own devices' messages, so the cells' workers
// commit into their files side by side instead of taking turns.
//
// Order: hub.db's lock, then the files' in cell order. A thread holding one
// file alone takes nothing else of this lock until it lets the file go
// (lock() refuses it: that order would deadlock against a writer holding
// hub.db's and waiting for the file).
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <vector>

namespace flotilla::hub {

class StoreMutex {
 public:
  // n files, before any thread uses the lock; 0 = the device rows are in
  // hub.db, and file(cell) is hub.db's lock.
  void set_files(int n) {
    files_.clear();
    for (int i = 0; i < n; ++i) files_.push_back(std::make_unique<std::recursive_mutex>());
  }
  bool has_files() const { return !files_.empty(); }

  // Lockable, recursively (std::lock_guard lock(store_mu)).
  void lock() {
    if (file_alone_depth() > 0 && whole_depth() == 0) {
      // A bug, found at once rather than as a deadlock some day: see the order above.
      std::fputs("flotilla-hub: the store lock was taken by a thread holding one cell's file alone\n", stderr);
      std::abort();
    }
    base_.lock();
    for (auto& f : files_) f->lock();
    ++whole_depth();
  }
  void unlock() {
    --whole_depth();
    for (auto it = files_.rbegin(); it != files_.rend(); ++it) (*it)->unlock();
    base_.unlock();
  }
  bool try_lock() {
    if (file_alone_depth() > 0 && whole_depth() == 0) return false;
    if (!base_.try_lock()) return false;
    for (size_t i = 0; i < files_.size(); ++i) {
      if (!files_[i]->try_lock()) {
        while (i-- > 0) files_[i]->unlock();
        base_.unlock();
        return false;
      }
    }
    ++whole_depth();
    return true;
  }

  // One cell's file alone, for as long as it lives. Without files, or on a
  // thread that holds the whole lock already, it is the whole lock.
  class FileLock {
   public:
    FileLock(StoreMutex& m, int cell) : m_(m) {
      if (m_.files_.empty() || whole_depth() > 0) {
        m_.lock();
        return;
      }
      file_ = m_.files_.at(static_cast<size_t>(cell)).get();
      file_->lock();
      ++file_alone_depth();
    }
    ~FileLock() {
      if (!file_) {
        m_.unlock();
        return;
      }
      --file_alone_depth();
      file_->unlock();
    }
    FileLock(const FileLock&) = delete;
    FileLock& operator=(const FileLock&) = delete;
    // Whether this holds one file alone (false: the whole lock).
    bool alone() const { return file_ != nullptr; }

   private:
    StoreMutex& m_;
    std::recursive_mutex* file_ = nullptr;
  };

  // Whether the calling thread holds one file alone now.
  static bool holding_file_alone() { return file_alone_depth() > 0; }

 private:
  static int& file_alone_depth() {
    thread_local int depth = 0;
    return depth;
  }
  // How deep the calling thread holds a whole lock (of any StoreMutex).
  static int& whole_depth() {
    thread_local int depth = 0;
    return depth;
  }
  std::recursive_mutex base_;
  std::vector<std::unique_ptr<std::recursive_mutex>> files_;
};

}  // namespace flotilla::hub

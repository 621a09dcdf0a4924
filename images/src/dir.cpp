// Rootfs directories are changed in place, one file at a time by temp + fsync
// + rename, so a crash leaves each injected file old or new, never torn.
// Ownership stays the caller's (no root needed); modes and times are set.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "flotilla/common/fs.hpp"
#include "image_fs.hpp"

namespace flotilla::images {
namespace {

Error sys_error(const std::string& what) { return make_error(Errc::io, what + ": " + std::strerror(errno)); }

Status set_time(const stdfs::path& p, int64_t t) {
  const timespec ts[2] = {{time_t(t), 0}, {time_t(t), 0}};
  if (::utimensat(AT_FDCWD, p.c_str(), ts, AT_SYMLINK_NOFOLLOW) != 0) return sys_error("set times of " + p.string());
  return {};
}

Status copy_into(const Entry& e, const stdfs::path& tmp) {
  // Always a new file: never through a symlink (or into a file) someone
  // placed at the temporary name inside the image.
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (fd < 0) return sys_error("create " + tmp.string());
  auto put = [&](const char* d, size_t n) -> Status {
    while (n > 0) {
      const ssize_t w = ::write(fd, d, n);
      if (w < 0 && errno == EINTR) continue;
      if (w < 0) return sys_error("write " + tmp.string());
      d += w;
      n -= size_t(w);
    }
    return {};
  };
  Status st = stream_content(e, put);
  if (st && ::fchmod(fd, e.mode & 07777) != 0) st = sys_error("chmod " + tmp.string());
  if (st && ::fsync(fd) != 0) st = sys_error("fsync " + tmp.string());
  ::close(fd);
  return st;
}

}  // namespace

Status write_dir(const stdfs::path& root, const Payload& p) {
  for (const auto& e : p.entries) {
    const stdfs::path dest = root / e.path.substr(1);
    const stdfs::path tmp = dest.parent_path() / ("." + dest.filename().string() + ".flotilla-tmp");
    std::error_code ec;
    if (e.type == Entry::Type::dir) {
      if (stdfs::is_directory(stdfs::symlink_status(dest, ec))) continue;  // keep the image's directory
      if (::mkdir(dest.c_str(), e.mode & 07777) != 0) return sys_error("mkdir " + dest.string());
      if (auto s = set_time(dest, p.mtime); !s) return s;
      continue;
    }
    stdfs::remove(tmp, ec);
    if (e.type == Entry::Type::symlink) {
      if (::symlink(e.target.c_str(), tmp.c_str()) != 0) return sys_error("symlink " + tmp.string());
    } else if (auto s = copy_into(e, tmp); !s) {
      stdfs::remove(tmp, ec);
      return s;
    }
    if (auto s = set_time(tmp, p.mtime); !s) return s;
    if (stdfs::is_directory(stdfs::symlink_status(dest, ec))) {
      stdfs::remove(tmp, ec);
      return make_error(Errc::refused, e.path + " is a directory in the image");
    }
    if (::rename(tmp.c_str(), dest.c_str()) != 0) return sys_error("rename into " + dest.string());
    if (auto s = fs::fsync_dir(dest.parent_path()); !s) return s;
  }
  return {};
}

}  // namespace flotilla::images

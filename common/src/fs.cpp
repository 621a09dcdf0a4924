#include "flotilla/common/fs.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <vector>

#include "flotilla/common/crypto.hpp"

namespace flotilla::fs {

namespace {
Error errno_error(const std::string& what, const stdfs::path& p) {
  return make_error(Errc::io, what + " " + p.string() + ": " + std::strerror(errno));
}
}  // namespace

std::optional<std::string> confined_path(const std::string& dir, const std::string& ref) {
  if (ref.empty() || ref.front() == '/' || ref.find('\0') != std::string::npos) return std::nullopt;
  std::vector<std::string> parts;
  auto walk = [&](const std::string& p) {
    size_t start = 0;
    while (start <= p.size()) {
      const size_t slash = std::min(p.find('/', start), p.size());
      const std::string seg = p.substr(start, slash - start);
      if (seg == "..") {
        if (parts.empty()) return false;
        parts.pop_back();
      } else if (!seg.empty() && seg != ".") {
        parts.push_back(seg);
      }
      start = slash + 1;
    }
    return true;
  };
  if (!dir.empty() && dir.front() == '/') return std::nullopt;
  if (!walk(dir) || !walk(ref) || parts.empty()) return std::nullopt;
  std::string out;
  for (const auto& p : parts) out += (out.empty() ? "" : "/") + p;
  return out;
}

Result<std::string> read_file(const stdfs::path& path, size_t max_bytes) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return make_error(errno == ENOENT ? Errc::not_found : Errc::io,
                             "cannot open " + path.string() + ": " + std::strerror(errno));
  std::string out;
  char buf[65536];
  while (in) {
    in.read(buf, sizeof buf);
    out.append(buf, static_cast<size_t>(in.gcount()));
    if (out.size() > max_bytes) {
      return make_error(Errc::too_large, path.string() + " is larger than " +
                                             std::to_string(max_bytes) + " bytes");
    }
  }
  return out;
}

Status fsync_dir(const stdfs::path& dir) {
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return errno_error("open dir", dir);
  int rc = ::fsync(fd);
  ::close(fd);
  if (rc != 0) return errno_error("fsync dir", dir);
  return {};
}

Status write_file_atomic(const stdfs::path& path, std::string_view content, unsigned mode) {
  const stdfs::path dir = path.has_parent_path() ? path.parent_path() : stdfs::path(".");
  // Appended piece by piece: g++ 12 at -O3 reports a false -Wrestrict for
  // "." + std::string&& (GCC bug 105329).
  std::string name = ".";
  name += path.filename().string();
  name += ".tmp-";
  name += crypto::random_token(6);
  const stdfs::path tmp = dir / name;
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode);
  if (fd < 0) return errno_error("create", tmp);
  // open() applies the umask; set the mode we were asked for explicitly.
  if (::fchmod(fd, mode) != 0) {
    auto e = errno_error("chmod", tmp);
    ::close(fd);
    ::unlink(tmp.c_str());
    return e;
  }
  const char* p = content.data();
  size_t left = content.size();
  while (left > 0) {
    ssize_t n = ::write(fd, p, left);
    if (n < 0) {
      if (errno == EINTR) continue;
      auto e = errno_error(errno == ENOSPC ? "no space writing" : "write", tmp);
      if (errno == ENOSPC) e.code = Errc::io;
      ::close(fd);
      ::unlink(tmp.c_str());
      return e;
    }
    p += n;
    left -= static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0) {
    auto e = errno_error("fsync", tmp);
    ::close(fd);
    ::unlink(tmp.c_str());
    return e;
  }
  ::close(fd);
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    auto e = errno_error("rename to", path);
    ::unlink(tmp.c_str());
    return e;
  }
  return fsync_dir(dir);
}

Status ensure_dir(const stdfs::path& dir, unsigned mode) {
  // The missing part of the path, outermost first. Directories that exist are
  // left exactly as they are: /var/log or /etc/rancher belong to the system,
  // not to whoever needs a file below them.
  std::vector<stdfs::path> missing;
  for (stdfs::path p = dir; !p.empty(); p = p.parent_path()) {
    struct stat st {};
    if (::stat(p.c_str(), &st) == 0) {
      if (!S_ISDIR(st.st_mode)) return make_error(Errc::io, "create directory " + dir.string() + ": " + p.string() +
                                                             " exists and is not a directory");
      break;
    }
    if (errno != ENOENT && errno != ENOTDIR) return errno_error("stat", p);
    missing.push_back(p);
    if (p == p.parent_path()) break;
  }
  for (auto it = missing.rbegin(); it != missing.rend(); ++it) {
    if (::mkdir(it->c_str(), mode) != 0) {
      if (errno == EEXIST) continue;  // made meanwhile by someone else: theirs, left alone
      return errno_error("create directory", *it);
    }
    // mkdir applies the umask; a directory we made gets exactly `mode`.
    if (::chmod(it->c_str(), mode) != 0) return errno_error("chmod", *it);
  }
  return {};
}

Status ensure_own_dir(const stdfs::path& dir, unsigned mode) {
  if (auto s = ensure_dir(dir, mode); !s) return s;
  if (::chmod(dir.c_str(), mode) != 0) return errno_error("chmod", dir);
  return {};
}

Result<uint64_t> free_bytes(const stdfs::path& path) {
  struct statvfs st {};
  if (::statvfs(path.c_str(), &st) != 0) return errno_error("statvfs", path);
  return static_cast<uint64_t>(st.f_bavail) * st.f_frsize;
}

Result<uint64_t> total_bytes(const stdfs::path& path) {
  struct statvfs st {};
  if (::statvfs(path.c_str(), &st) != 0) return errno_error("statvfs", path);
  return static_cast<uint64_t>(st.f_blocks) * st.f_frsize;
}

}  // namespace flotilla::fs

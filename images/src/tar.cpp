// Rootfs tarballs through libarchive: the input is read twice (index, then
// copy) and never changed; the output has the input's entries in their order
// followed by the payload, with the input's compression and headers that hold
// nothing but the payload's fixed time and root ownership.
#include <archive.h>
#include <archive_entry.h>
#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <memory>
#include <set>

#include "image_fs.hpp"

namespace flotilla::images {
namespace {

struct ReadCloser {
  void operator()(archive* a) const { archive_read_free(a); }
};
struct WriteCloser {
  void operator()(archive* a) const { archive_write_free(a); }
};
using Reader = std::unique_ptr<archive, ReadCloser>;
using Writer = std::unique_ptr<archive, WriteCloser>;

Error arc_error(archive* a, const std::string& what) {
  const char* m = archive_error_string(a);
  return make_error(Errc::io, what + ": " + (m ? m : "libarchive error"));
}

Result<Reader> open_reader(const stdfs::path& path, std::string* compression) {
  Reader r(archive_read_new());
  archive_read_support_filter_all(r.get());
  archive_read_support_format_tar(r.get());
  archive_read_support_format_gnutar(r.get());
  if (archive_read_open_filename(r.get(), path.c_str(), 1 << 16) != ARCHIVE_OK) {
    return make_error(Errc::invalid_argument, path.string() + " is not a tar archive (tar, tar.gz, tar.zst): " +
                                                  (archive_error_string(r.get()) ? archive_error_string(r.get()) : ""));
  }
  // The filter is known once the first header is read; callers check it then.
  (void)compression;
  return r;
}

std::string normalise(const char* raw) {
  std::string p = raw ? raw : "";
  while (p.rfind("./", 0) == 0) p.erase(0, 2);
  while (!p.empty() && p.front() == '/') p.erase(0, 1);
  while (!p.empty() && p.back() == '/') p.pop_back();
  return "/" + p;
}

Result<std::string> compression_of(archive* a) {
  switch (archive_filter_code(a, 0)) {
    case ARCHIVE_FILTER_NONE: return std::string();
    case ARCHIVE_FILTER_GZIP: return std::string("gz");
    case ARCHIVE_FILTER_ZSTD: return std::string("zst");
    default:
      return make_error(Errc::invalid_argument, std::string("tarball compressed with ") + archive_filter_name(a, 0) +
                                                    ": only uncompressed, gzip and zstd tarballs are supported");
  }
}

}  // namespace

Result<TarIndex> index_tar(const stdfs::path& tarball) {
  auto r = open_reader(tarball, nullptr);
  if (!r) return r.error();
  TarIndex idx;
  archive_entry* e = nullptr;
  bool first = true;
  int rc;
  while ((rc = archive_read_next_header(r->get(), &e)) == ARCHIVE_OK || rc == ARCHIVE_WARN) {
    if (first) {
      auto c = compression_of(r->get());
      if (!c) return c.error();
      idx.compression = *c;
      first = false;
    }
    const std::string path = normalise(archive_entry_pathname(e));
    NodeInfo n;
    switch (archive_entry_filetype(e)) {
      case AE_IFDIR: n.kind = NodeInfo::Kind::dir; break;
      case AE_IFLNK:
        n.kind = NodeInfo::Kind::symlink;
        n.link_target = archive_entry_symlink(e) ? archive_entry_symlink(e) : "";
        break;
      case AE_IFREG: n.kind = NodeInfo::Kind::file; break;
      default: n.kind = NodeInfo::Kind::other;
    }
    if (archive_entry_hardlink(e)) {
      n.kind = NodeInfo::Kind::file;
      const std::string to = normalise(archive_entry_hardlink(e));
      if (auto h = idx.heads.find(to); h != idx.heads.end()) idx.heads[path] = h->second;
    }
    idx.newest_mtime = std::max<int64_t>(idx.newest_mtime, archive_entry_mtime(e));
    if (n.kind == NodeInfo::Kind::file && archive_entry_size(e) > 0 && !archive_entry_hardlink(e)) {
      std::string head(64, '\0');
      const la_ssize_t got = archive_read_data(r->get(), head.data(), head.size());
      if (got < 0) return arc_error(r->get(), "read " + path + " in " + tarball.string());
      head.resize(size_t(got));
      idx.heads[path] = head;
    }
    idx.nodes[path] = n;
    if (idx.nodes.size() > 10'000'000) return make_error(Errc::too_large, "more than 10 million entries in " + tarball.string());
  }
  if (rc != ARCHIVE_EOF) return arc_error(r->get(), "read " + tarball.string());
  if (first) return make_error(Errc::invalid_argument, tarball.string() + " is an empty archive");
  return idx;
}

Status write_tar(const stdfs::path& input, const TarIndex& index, const Payload& p, const stdfs::path& out) {
  auto r = open_reader(input, nullptr);
  if (!r) return r.error();
  Writer w(archive_write_new());
  archive_write_set_format_pax_restricted(w.get());
  if (index.compression == "gz") {
    archive_write_add_filter_gzip(w.get());
    // No timestamp in the gzip header: the same input must give the same bytes.
    if (archive_write_set_filter_option(w.get(), "gzip", "timestamp", nullptr) != ARCHIVE_OK) {
      return arc_error(w.get(), "gzip without timestamp");
    }
  } else if (index.compression == "zst") {
    archive_write_add_filter_zstd(w.get());
  }
  // A new file, never a link: O_EXCL refuses anything already at `out`
  // (a symlink planted there would otherwise redirect the write), O_NOFOLLOW
  // says so explicitly.
  const int fd = ::open(out.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
  if (fd < 0) {
    return make_error(Errc::io, "create " + out.string() + ": " + std::strerror(errno) +
                                    (errno == EEXIST ? " (something appeared there; it is not written through)" : ""));
  }
  struct FdCloser {
    int fd;
    ~FdCloser() { ::close(fd); }
  } closer{fd};
  if (archive_write_open_fd(w.get(), fd) != ARCHIVE_OK) return arc_error(w.get(), "create " + out.string());

  std::set<std::string> replaced;
  for (const auto& e : p.entries) {
    if (e.type != Entry::Type::dir) replaced.insert(e.path);
  }
  // Keep the input's naming style ("./etc/x" or "etc/x") for the new entries.
  bool dot_slash = false;
  archive_entry* e = nullptr;
  int rc;
  bool first = true;
  std::string buf(1u << 16, '\0');
  while ((rc = archive_read_next_header(r->get(), &e)) == ARCHIVE_OK || rc == ARCHIVE_WARN) {
    const char* raw = archive_entry_pathname(e);
    if (first) {
      dot_slash = raw && std::string(raw).rfind("./", 0) == 0;
      first = false;
    }
    if (replaced.count(normalise(raw))) continue;
    if (archive_write_header(w.get(), e) != ARCHIVE_OK) return arc_error(w.get(), std::string("write entry ") + raw);
    for (;;) {
      const la_ssize_t got = archive_read_data(r->get(), buf.data(), buf.size());
      if (got < 0) return arc_error(r->get(), std::string("read ") + raw);
      if (got == 0) break;
      if (archive_write_data(w.get(), buf.data(), size_t(got)) != got) return arc_error(w.get(), std::string("write ") + raw);
    }
  }
  if (rc != ARCHIVE_EOF) return arc_error(r->get(), "read " + input.string());

  for (const auto& pe : p.entries) {
    if (pe.type == Entry::Type::dir && index.nodes.count(pe.path)) continue;  // keep the image's directory
    std::unique_ptr<archive_entry, void (*)(archive_entry*)> ne(archive_entry_new(), archive_entry_free);
    archive_entry_set_pathname(ne.get(), ((dot_slash ? "." : "") + pe.path.substr(dot_slash ? 0 : 1)).c_str());
    archive_entry_set_uid(ne.get(), 0);
    archive_entry_set_gid(ne.get(), 0);
    archive_entry_set_uname(ne.get(), "root");
    archive_entry_set_gname(ne.get(), "root");
    archive_entry_set_mtime(ne.get(), p.mtime, 0);
    archive_entry_set_perm(ne.get(), pe.mode & 07777);
    if (pe.type == Entry::Type::dir) {
      archive_entry_set_filetype(ne.get(), AE_IFDIR);
    } else if (pe.type == Entry::Type::symlink) {
      archive_entry_set_filetype(ne.get(), AE_IFLNK);
      archive_entry_set_perm(ne.get(), 0777);
      archive_entry_set_symlink(ne.get(), pe.target.c_str());
    } else {
      archive_entry_set_filetype(ne.get(), AE_IFREG);
      archive_entry_set_size(ne.get(), la_int64_t(pe.size));
    }
    if (archive_write_header(w.get(), ne.get()) != ARCHIVE_OK) return arc_error(w.get(), "write entry " + pe.path);
    if (pe.type != Entry::Type::file) continue;
    auto st = stream_content(pe, [&](const char* d, size_t n) -> Status {
      if (archive_write_data(w.get(), d, n) != la_ssize_t(n)) return arc_error(w.get(), "write " + pe.path);
      return {};
    });
    if (!st) return st;
  }
  if (archive_write_close(w.get()) != ARCHIVE_OK) return arc_error(w.get(), "finish " + out.string());
  return {};
}

}  // namespace flotilla::images

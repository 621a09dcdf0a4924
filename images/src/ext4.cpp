// ext4 through libext2fs on the image file itself (unix_io with an offset):
// no loop device, no mount, no root. Every inode written gets the payload's
// fixed time and uid/gid 0, and fs->now pins the times libext2fs stamps on its
// own (superblock write time, new inodes), so the same input gives the same bytes.
#include <ext2fs/ext2fs.h>
#include <fcntl.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <optional>
#include <set>
#include <sstream>

#include "flotilla/common/process.hpp"
#include "image_fs.hpp"

namespace flotilla::images {
namespace {

ext2_filsys F(void* p) { return static_cast<ext2_filsys>(p); }

Error ext_error(errcode_t rc, const std::string& what) {
  return make_error(Errc::io, what + ": " + error_message(rc));
}

// The first n bytes of an inode's content.
Result<std::string> read_inode(ext2_filsys fs, ext2_ino_t ino, size_t n, const std::string& path) {
  ext2_file_t f = nullptr;
  if (errcode_t rc = ext2fs_file_open(fs, ino, 0, &f)) return ext_error(rc, "open " + path);
  std::string buf(n, '\0');
  unsigned got = 0;
  const errcode_t rc = ext2fs_file_read(f, buf.data(), unsigned(n), &got);
  ext2fs_file_close(f);
  if (rc) return ext_error(rc, "read " + path);
  buf.resize(got);
  return buf;
}

std::pair<std::string, std::string> split_parent(const std::string& path) {
  const auto slash = path.rfind('/');
  return {slash == 0 ? "/" : path.substr(0, slash), path.substr(slash + 1)};
}

}  // namespace

bool looks_like_ext(const stdfs::path& image, uint64_t offset) {
  std::ifstream in(image, std::ios::binary);
  in.seekg(std::streamoff(offset + 1024 + 56));
  unsigned char m[2] = {0, 0};
  in.read(reinterpret_cast<char*>(m), 2);
  return in && m[0] == 0x53 && m[1] == 0xEF;
}

Status check_ext4(const stdfs::path& image, uint64_t offset) {
  std::string e2fsck;
  for (const char* dir : {"/usr/sbin/", "/sbin/", "/usr/bin/", "/bin/"}) {
    if (::access((std::string(dir) + "e2fsck").c_str(), X_OK) == 0) {
      e2fsck = std::string(dir) + "e2fsck";
      break;
    }
  }
  if (e2fsck.empty()) {
    return make_error(Errc::refused, "e2fsck not found: an ext4 image is checked with e2fsck -fn before anything is "
                                     "written to it (install e2fsprogs)");
  }
  // "-n": open read-only and answer no; the ?offset= suffix is libext2fs's
  // own way to reach a partition inside a disk image.
  auto r = proc::run({e2fsck, "-f", "-n", image.string() + "?offset=" + std::to_string(offset)},
                     std::chrono::minutes(30), 64 * 1024);
  if (!r) return r.error().with_context("e2fsck");
  if (r->timed_out) return make_error(Errc::refused, "e2fsck -fn did not finish within 30 minutes");
  if (r->exit_code == 0) return {};
  // The findings, minus the pass banners, so the refusal says what is wrong.
  std::string findings;
  std::istringstream lines(r->out + r->err);
  for (std::string line; std::getline(lines, line) && findings.size() < 600;) {
    if (line.empty() || line.rfind("Pass ", 0) == 0 || line.rfind("e2fsck ", 0) == 0) continue;
    findings += (findings.empty() ? "" : "; ") + line;
  }
  return make_error(Errc::refused, "the ext4 filesystem is not consistent (e2fsck -fn exit " +
                                       std::to_string(r->exit_code) + ": " + findings +
                                       "); an untrusted image is not written to: repair it with e2fsck -fy first");
}

Result<Ext4Image> Ext4Image::open(const stdfs::path& image, uint64_t offset, bool writable) {
  initialize_ext2_error_table();
  const std::string io_opts = "offset=" + std::to_string(offset);
  ext2_filsys fs = nullptr;
  const int flags = EXT2_FLAG_64BITS | (writable ? EXT2_FLAG_RW : 0);
  errcode_t rc = ext2fs_open2(image.c_str(), io_opts.c_str(), flags, 0, 0, unix_io_manager, &fs);
  if (rc) return ext_error(rc, "open ext4 filesystem at offset " + std::to_string(offset));
  Ext4Image img;
  img.fs_ = fs;
  if (ext2fs_has_feature_journal_needs_recovery(fs->super)) {
    return make_error(Errc::refused, "the ext4 filesystem's journal needs recovery (not cleanly unmounted): run "
                                     "e2fsck -fy on it first");
  }
  if (fs->super->s_state & EXT2_ERROR_FS) {
    return make_error(Errc::refused, "the ext4 filesystem is marked as having errors: run e2fsck -fy on it first");
  }
  if ((rc = ext2fs_read_bitmaps(fs))) return ext_error(rc, "read bitmaps");
  return img;
}

Ext4Image::Ext4Image(Ext4Image&& o) noexcept : fs_(o.fs_) { o.fs_ = nullptr; }

Ext4Image::~Ext4Image() {
  if (fs_) {
    // An error path: drop the changes instead of flushing half of them.
    F(fs_)->flags &= ~(EXT2_FLAG_DIRTY | EXT2_FLAG_BB_DIRTY | EXT2_FLAG_IB_DIRTY);
    ext2fs_free(F(fs_));
  }
}

Ext4Probe Ext4Image::probe() const {
  ext2_filsys fs = F(fs_);
  Ext4Probe p;
  const auto* vn = reinterpret_cast<const char*>(fs->super->s_volume_name);
  p.label.assign(vn, strnlen(vn, sizeof fs->super->s_volume_name));
  const blk64_t free = ext2fs_free_blocks_count(fs->super), reserved = ext2fs_r_blocks_count(fs->super);
  p.free_bytes = (free > reserved ? free - reserved : 0) * fs->blocksize;
  p.free_inodes = fs->super->s_free_inodes_count;
  p.block_size = fs->blocksize;
  p.write_time = fs->super->s_wtime;
  return p;
}

Result<NodeInfo> Ext4Image::lstat(const std::string& path) {
  ext2_filsys fs = F(fs_);
  ext2_ino_t ino = 0;
  errcode_t rc = ext2fs_namei(fs, EXT2_ROOT_INO, EXT2_ROOT_INO, path.c_str(), &ino);
  if (rc == EXT2_ET_FILE_NOT_FOUND || rc == EXT2_ET_NO_DIRECTORY) return NodeInfo{};
  if (rc) return ext_error(rc, "look up " + path);
  ext2_inode inode{};
  if ((rc = ext2fs_read_inode(fs, ino, &inode))) return ext_error(rc, "read inode of " + path);
  NodeInfo n;
  if (LINUX_S_ISDIR(inode.i_mode)) {
    n.kind = NodeInfo::Kind::dir;
  } else if (LINUX_S_ISREG(inode.i_mode)) {
    n.kind = NodeInfo::Kind::file;
  } else if (LINUX_S_ISLNK(inode.i_mode)) {
    n.kind = NodeInfo::Kind::symlink;
    const uint64_t size = EXT2_I_SIZE(&inode);
    if (size > 4096) return make_error(Errc::refused, "symlink " + path + " is implausibly long");
    if (ext2fs_is_fast_symlink(&inode)) {
      n.link_target.assign(reinterpret_cast<const char*>(inode.i_block), size);
    } else {
      auto target = read_inode(fs, ino, size, path);
      if (!target) return target.error();
      n.link_target = *target;
    }
  } else {
    n.kind = NodeInfo::Kind::other;
  }
  return n;
}

Result<std::string> Ext4Image::read_head(const std::string& path, size_t n) {
  ext2_filsys fs = F(fs_);
  ext2_ino_t ino = 0;
  errcode_t rc = ext2fs_namei(fs, EXT2_ROOT_INO, EXT2_ROOT_INO, path.c_str(), &ino);
  if (rc) return ext_error(rc, "look up " + path);
  return read_inode(fs, ino, n, path);
}

std::pair<uint64_t, uint64_t> Ext4Image::needs(const Payload& p) const {
  const uint64_t bs = F(fs_)->blocksize;
  uint64_t blocks = 0;
  std::set<std::string> parents;
  for (const auto& e : p.entries) {
    parents.insert(split_parent(e.path).first);
    if (e.type == Entry::Type::file) {
      const uint64_t data = (e.size + bs - 1) / bs;
      blocks += data + data / 256 + 2;  // extent index blocks, even on fragmented free space
    } else if (e.type == Entry::Type::dir) {
      blocks += 1;
    } else if (e.target.size() >= 60) {
      blocks += 1;  // not a fast symlink
    }
  }
  blocks += parents.size();  // a directory may need one more block for the new names
  return {blocks * bs, p.entries.size()};
}

namespace {

class Writer {
 public:
  Writer(ext2_filsys fs, int64_t t) : fs_(fs), t_(t) {}

  Status stamp(ext2_ino_t ino, std::optional<uint32_t> perm) {
    ext2_inode_large in{};
    errcode_t rc = ext2fs_read_inode_full(fs_, ino, reinterpret_cast<ext2_inode*>(&in), sizeof in);
    if (rc) return ext_error(rc, "read inode");
    if (perm) in.i_mode = (in.i_mode & LINUX_S_IFMT) | (*perm & 07777);
    in.i_uid = in.i_gid = 0;
    in.osd2.linux2.l_i_uid_high = in.osd2.linux2.l_i_gid_high = 0;
    in.i_atime = in.i_ctime = in.i_mtime = uint32_t(t_);
    if (EXT2_INODE_SIZE(fs_->super) > EXT2_GOOD_OLD_INODE_SIZE && in.i_extra_isize >= 24) {
      in.i_atime_extra = in.i_ctime_extra = in.i_mtime_extra = in.i_crtime_extra = 0;
      in.i_crtime = uint32_t(t_);
    }
    rc = ext2fs_write_inode_full(fs_, ino, reinterpret_cast<ext2_inode*>(&in), sizeof in);
    return rc ? Status(ext_error(rc, "write inode")) : Status();
  }

  // The directory at path, made (0755) where missing; existing ones keep
  // their owner and mode. Symlinked components are followed inside the image.
  Result<ext2_ino_t> dir(const std::string& path) {
    if (path == "/") return ext2_ino_t(EXT2_ROOT_INO);
    auto [parent_path, name] = split_parent(path);
    auto parent = dir(parent_path);
    if (!parent) return parent;
    ext2_ino_t ino = 0;
    errcode_t rc = ext2fs_lookup(fs_, *parent, name.c_str(), int(name.size()), nullptr, &ino);
    if (rc == 0) {
      ext2_ino_t target = 0;
      rc = ext2fs_follow_link(fs_, EXT2_ROOT_INO, *parent, ino, &target);
      if (rc) return ext_error(rc, "follow " + path);
      ext2_inode in{};
      if ((rc = ext2fs_read_inode(fs_, target, &in))) return ext_error(rc, "read " + path);
      if (!LINUX_S_ISDIR(in.i_mode)) return make_error(Errc::refused, path + " exists in the image and is not a directory");
      return target;
    }
    if (rc != EXT2_ET_FILE_NOT_FOUND) return ext_error(rc, "look up " + path);
    rc = ext2fs_mkdir(fs_, *parent, 0, name.c_str());
    if (rc == EXT2_ET_DIR_NO_SPACE) {
      if ((rc = ext2fs_expand_dir(fs_, *parent))) return ext_error(rc, "grow directory " + parent_path);
      rc = ext2fs_mkdir(fs_, *parent, 0, name.c_str());
    }
    if (rc) return ext_error(rc, "mkdir " + path);
    if ((rc = ext2fs_lookup(fs_, *parent, name.c_str(), int(name.size()), nullptr, &ino))) return ext_error(rc, "look up " + path);
    if (auto s = stamp(ino, 0755); !s) return s.error();
    return ino;
  }

  // Removes a non-directory at parent/name so it can be written afresh.
  Status remove(ext2_ino_t parent, const std::string& name, const std::string& path) {
    ext2_ino_t ino = 0;
    errcode_t rc = ext2fs_lookup(fs_, parent, name.c_str(), int(name.size()), nullptr, &ino);
    if (rc == EXT2_ET_FILE_NOT_FOUND) return {};
    if (rc) return ext_error(rc, "look up " + path);
    ext2_inode in{};
    if ((rc = ext2fs_read_inode(fs_, ino, &in))) return ext_error(rc, "read " + path);
    if (LINUX_S_ISDIR(in.i_mode)) return make_error(Errc::refused, path + " is a directory in the image");
    if ((rc = ext2fs_unlink(fs_, parent, name.c_str(), ino, 0))) return ext_error(rc, "unlink " + path);
    if (in.i_links_count > 1) {
      in.i_links_count--;
      rc = ext2fs_write_inode(fs_, ino, &in);
      return rc ? Status(ext_error(rc, "write " + path)) : Status();
    }
    if (ext2fs_inode_has_valid_blocks2(fs_, &in)) {
      if ((rc = ext2fs_punch(fs_, ino, &in, nullptr, 0, ~0ULL))) return ext_error(rc, "free blocks of " + path);
    }
    in.i_links_count = 0;
    in.i_dtime = uint32_t(t_);
    if ((rc = ext2fs_write_inode(fs_, ino, &in))) return ext_error(rc, "write " + path);
    ext2fs_inode_alloc_stats2(fs_, ino, -1, 0);
    return {};
  }

  Status link(ext2_ino_t parent, const std::string& name, ext2_ino_t ino, int type, const std::string& path) {
    errcode_t rc = ext2fs_link(fs_, parent, name.c_str(), ino, type);
    if (rc == EXT2_ET_DIR_NO_SPACE) {
      if ((rc = ext2fs_expand_dir(fs_, parent))) return ext_error(rc, "grow directory for " + path);
      rc = ext2fs_link(fs_, parent, name.c_str(), ino, type);
    }
    return rc ? Status(ext_error(rc, "link " + path)) : Status();
  }

  Status file(ext2_ino_t parent, const std::string& name, const Entry& e) {
    ext2_ino_t ino = 0;
    errcode_t rc = ext2fs_new_inode(fs_, parent, LINUX_S_IFREG | e.mode, nullptr, &ino);
    if (rc) return ext_error(rc, "allocate inode for " + e.path);
    if (auto s = link(parent, name, ino, EXT2_FT_REG_FILE, e.path); !s) return s;
    ext2fs_inode_alloc_stats2(fs_, ino, +1, 0);
    ext2_inode in{};
    in.i_mode = LINUX_S_IFREG | (e.mode & 07777);
    in.i_links_count = 1;
    in.i_atime = in.i_ctime = in.i_mtime = uint32_t(t_);
    if ((rc = ext2fs_inode_size_set(fs_, &in, e.size))) return ext_error(rc, "size " + e.path);
    if (ext2fs_has_feature_extents(fs_->super)) {
      ext2_extent_handle_t h = nullptr;
      if ((rc = ext2fs_extent_open2(fs_, ino, &in, &h))) return ext_error(rc, "extents of " + e.path);
      ext2fs_extent_free(h);
    }
    if ((rc = ext2fs_write_new_inode(fs_, ino, &in))) return ext_error(rc, "write inode of " + e.path);
    ext2_file_t f = nullptr;
    if ((rc = ext2fs_file_open(fs_, ino, EXT2_FILE_WRITE, &f))) return ext_error(rc, "open " + e.path);
    auto put = [&](const char* data, size_t n) -> Status {
      while (n > 0) {
        unsigned wrote = 0;
        if (errcode_t w = ext2fs_file_write(f, data, unsigned(std::min<size_t>(n, 1u << 20)), &wrote)) {
          return ext_error(w, "write " + e.path);
        }
        data += wrote;
        n -= wrote;
      }
      return {};
    };
    const Status st = stream_content(e, put);
    rc = ext2fs_file_close(f);
    if (!st) return st;
    if (rc) return ext_error(rc, "close " + e.path);
    return stamp(ino, e.mode);
  }

  Status symlink(ext2_ino_t parent, const std::string& name, const Entry& e) {
    errcode_t rc = ext2fs_symlink(fs_, parent, 0, name.c_str(), e.target.c_str());
    if (rc == EXT2_ET_DIR_NO_SPACE) {
      if ((rc = ext2fs_expand_dir(fs_, parent))) return ext_error(rc, "grow directory for " + e.path);
      rc = ext2fs_symlink(fs_, parent, 0, name.c_str(), e.target.c_str());
    }
    if (rc) return ext_error(rc, "symlink " + e.path);
    ext2_ino_t ino = 0;
    if ((rc = ext2fs_lookup(fs_, parent, name.c_str(), int(name.size()), nullptr, &ino))) return ext_error(rc, "look up " + e.path);
    return stamp(ino, std::nullopt);
  }

 private:
  ext2_filsys fs_;
  int64_t t_;
};

}  // namespace

Status Ext4Image::write(const Payload& p) {
  ext2_filsys fs = F(fs_);
  fs->now = time_t(p.mtime);
  fs->umask = 022;
  Writer w(fs, p.mtime);
  for (const auto& e : p.entries) {
    if (e.type == Entry::Type::dir) {
      if (auto d = w.dir(e.path); !d) return d.error();
      continue;
    }
    auto [parent_path, name] = split_parent(e.path);
    auto parent = w.dir(parent_path);
    if (!parent) return parent.error();
    if (auto s = w.remove(*parent, name, e.path); !s) return s;
    if (auto s = e.type == Entry::Type::file ? w.file(*parent, name, e) : w.symlink(*parent, name, e); !s) return s;
  }
  return {};
}

Status Ext4Image::close() {
  ext2_filsys fs = F(fs_);
  fs_ = nullptr;
  errcode_t rc = ext2fs_close_free(&fs);
  return rc ? Status(ext_error(rc, "write the filesystem back")) : Status();
}

}  // namespace flotilla::images

#pragma once
// Internal seams of images/: the entries to inject (Payload), the partition
// table reader and the three image backends (directory, tar, ext4).
#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "flotilla/common/result.hpp"
#include "flotilla/images/inject.hpp"

namespace flotilla::images {

struct Entry {
  enum class Type { dir, file, symlink };
  Type type = Type::file;
  std::string path;    // absolute image path, normalised ("/etc/flotilla/agent.yaml")
  uint32_t mode = 0644;
  std::string data;    // file content when source is empty
  stdfs::path source;  // host file streamed into the image (large files)
  std::string target;  // symlink target
  uint64_t size = 0;
  std::string sha256;
};

// Feeds a file entry's content (inline data or its source file, 1 MiB at a
// time) to put; refuses a source whose size changed since it was hashed.
Status stream_content(const Entry& e, const std::function<Status(const char*, size_t)>& put);

// Every entry, sorted by path, parents before children; mtime/uid/gid are the
// same for all (source date, 0, 0).
struct Payload {
  std::vector<Entry> entries;
  int64_t mtime = 0;
  uint64_t content_bytes() const;
};

// A node as an image backend sees it, without following a final symlink.
struct NodeInfo {
  enum class Kind { missing, file, dir, symlink, other };
  Kind kind = Kind::missing;
  std::string link_target;
};
using LstatFn = std::function<Result<NodeInfo>(const std::string& path)>;

// Resolves symlinks inside the image (absolute targets start at the image's
// root, never the host's). Returns the final path or an error after 40 hops.
Result<std::string> resolve_in_image(const std::string& path, const LstatFn& lstat);

// Paths whose ELF header tells an image's architecture, in order of trust.
const std::vector<std::string>& arch_probe_paths();

// --- partition tables -----------------------------------------------------
struct Partition {
  unsigned number = 0;      // 1-based as in /dev/sda1
  uint64_t offset = 0;      // bytes
  uint64_t size = 0;        // bytes
  std::string name;         // GPT partition name (empty on MBR)
  std::string type;         // MBR type byte in hex, or GPT type GUID
};
struct PartitionTable {
  std::string scheme;  // "mbr" or "gpt"
  std::vector<Partition> partitions;
};
// Reads the table of a raw disk image held in `read_at` (offset, length ->
// bytes). Refuses images with neither MBR nor GPT.
Result<PartitionTable> read_partition_table(const std::function<Result<std::string>(uint64_t, size_t)>& read_at,
                                            uint64_t image_size);

// --- backends -------------------------------------------------------------
struct Ext4Probe {
  std::string label;
  uint64_t free_bytes = 0;
  uint64_t free_inodes = 0;
  uint32_t block_size = 0;
  int64_t write_time = 0;
};
// Is there an ext4 (or ext2/3) filesystem at offset? (superblock magic)
bool looks_like_ext(const stdfs::path& image, uint64_t offset);
// e2fsck -fn on the filesystem at offset: read-only, every structure checked
// (bitmaps, inodes, extents, directories). Errc::refused with e2fsck's first
// findings when it is not clean; never changes the image.
Status check_ext4(const stdfs::path& image, uint64_t offset);

// An opened filesystem image for reading (arch detection, sizes) and writing.
class Ext4Image {
 public:
  static Result<Ext4Image> open(const stdfs::path& image, uint64_t offset, bool writable);
  Ext4Image(Ext4Image&& o) noexcept;
  Ext4Image& operator=(Ext4Image&&) = delete;
  ~Ext4Image();
  Ext4Probe probe() const;
  Result<NodeInfo> lstat(const std::string& path);
  Result<std::string> read_head(const std::string& path, size_t n);
  // Blocks and inodes the payload needs (conservative).
  std::pair<uint64_t, uint64_t> needs(const Payload& p) const;
  Status write(const Payload& p);
  Status close();  // flushes; the destructor closes without flushing on error paths

 private:
  Ext4Image() = default;
  void* fs_ = nullptr;
};

// Tarballs: the set of entries of the input for arch detection.
struct TarIndex {
  std::string compression;  // "", "gz", "zst"
  std::map<std::string, NodeInfo> nodes;        // by normalised absolute path
  std::map<std::string, std::string> heads;     // first 64 bytes of regular files
  int64_t newest_mtime = 0;
};
Result<TarIndex> index_tar(const stdfs::path& tarball);
// Copies every input entry not replaced by the payload, then the payload, to
// out (same compression, PAX, deterministic headers).
Status write_tar(const stdfs::path& input, const TarIndex& index, const Payload& p, const stdfs::path& out);

// Directories: in place, each file by temp + fsync + rename.
Status write_dir(const stdfs::path& root, const Payload& p);

}  // namespace flotilla::images

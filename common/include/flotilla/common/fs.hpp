#pragma once
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>

#include "flotilla/common/result.hpp"

namespace flotilla::fs {

namespace stdfs = std::filesystem;

// Reads a whole file, refusing files above max_bytes (unbounded input is a bug).
Result<std::string> read_file(const stdfs::path& path, size_t max_bytes = 64u << 20);

// Write-to-temp + fsync + rename + fsync(dir): after a crash the file holds
// either the old or the new content, never a mix.
Status write_file_atomic(const stdfs::path& path, std::string_view content, unsigned mode = 0644);

// Creates the missing directories of `dir`, each with exactly `mode`.
// Directories that already exist keep their mode and owner.
Status ensure_dir(const stdfs::path& dir, unsigned mode = 0755);
// A directory this program owns (its data or state directory): created like
// ensure_dir, and set to `mode` even if it existed.
Status ensure_own_dir(const stdfs::path& dir, unsigned mode);
Status fsync_dir(const stdfs::path& dir);

// A path a file refers to, `ref`, resolved against the directory `dir` it
// sits in (both relative to one root, '/'-separated) and normalised ("a/./b",
// "a/x/../b" -> "a/b"). nullopt when ref is absolute, empty, or climbs above
// the root: what one file names can never leave the tree it came from.
std::optional<std::string> confined_path(const std::string& dir, const std::string& ref);

// Bytes free for an unprivileged writer on the filesystem holding path.
Result<uint64_t> free_bytes(const stdfs::path& path);
// Size of the filesystem holding `path` (statvfs f_blocks * f_frsize).
Result<uint64_t> total_bytes(const stdfs::path& path);

}  // namespace flotilla::fs

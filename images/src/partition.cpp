// MBR and GPT, read by hand: a few structures at fixed offsets are all the
// injector needs to find the root partition's byte offset.
#include <array>
#include <cstring>

#include "image_fs.hpp"

namespace flotilla::images {
namespace {

uint32_t le32(const std::string& b, size_t at) {
  return uint32_t(uint8_t(b[at])) | uint32_t(uint8_t(b[at + 1])) << 8 | uint32_t(uint8_t(b[at + 2])) << 16 |
         uint32_t(uint8_t(b[at + 3])) << 24;
}
uint64_t le64(const std::string& b, size_t at) { return uint64_t(le32(b, at)) | uint64_t(le32(b, at + 4)) << 32; }

uint32_t crc32(const std::string& data) {
  static const auto table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  uint32_t c = 0xFFFFFFFFu;
  for (unsigned char ch : data) c = table[(c ^ ch) & 0xFF] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

std::string guid_text(const std::string& b, size_t at) {
  static const char* hex = "0123456789ABCDEF";
  // The first three fields are little-endian, the last two big-endian.
  static const int order[16] = {3, 2, 1, 0, 5, 4, 7, 6, 8, 9, 10, 11, 12, 13, 14, 15};
  std::string out;
  for (int i = 0; i < 16; ++i) {
    if (i == 4 || i == 6 || i == 8 || i == 10) out += '-';
    const auto v = uint8_t(b[at + order[i]]);
    out += hex[v >> 4];
    out += hex[v & 15];
  }
  return out;
}

std::string utf16le_ascii(const std::string& b, size_t at, size_t bytes) {
  std::string out;
  for (size_t i = 0; i + 1 < bytes; i += 2) {
    const unsigned c = uint8_t(b[at + i]) | unsigned(uint8_t(b[at + i + 1])) << 8;
    if (c == 0) break;
    out += c < 0x80 ? char(c) : '?';
  }
  return out;
}

constexpr unsigned kMaxPartitions = 128;

Result<PartitionTable> read_gpt(const std::function<Result<std::string>(uint64_t, size_t)>& read_at,
                                uint64_t image_size, uint64_t sector) {
  auto hdr = read_at(sector, 92);
  if (!hdr) return hdr.error();
  if (hdr->compare(0, 8, "EFI PART") != 0) return make_error(Errc::not_found, "no GPT header");
  const uint32_t hdr_size = le32(*hdr, 12);
  if (hdr_size < 92 || hdr_size > sector) return make_error(Errc::parse, "GPT header size " + std::to_string(hdr_size) + " is invalid");
  auto full = read_at(sector, hdr_size);
  if (!full) return full.error();
  std::string zeroed = *full;
  std::memset(zeroed.data() + 16, 0, 4);
  if (crc32(zeroed) != le32(*full, 16)) return make_error(Errc::parse, "GPT header checksum is wrong (damaged table)");
  const uint64_t entries_lba = le64(*full, 72);
  const uint32_t count = le32(*full, 80), entry_size = le32(*full, 84);
  if (entry_size < 128 || entry_size > 4096 || count > 1024) {
    return make_error(Errc::parse, "GPT partition array has implausible geometry");
  }
  auto arr = read_at(entries_lba * sector, size_t(count) * entry_size);
  if (!arr) return arr.error();
  if (crc32(*arr) != le32(*full, 88)) return make_error(Errc::parse, "GPT partition array checksum is wrong");
  PartitionTable t{"gpt", {}};
  for (uint32_t i = 0; i < count && t.partitions.size() < kMaxPartitions; ++i) {
    const size_t at = size_t(i) * entry_size;
    if (arr->compare(at, 16, std::string(16, '\0')) == 0) continue;  // unused
    Partition p;
    p.number = i + 1;
    const uint64_t first = le64(*arr, at + 32), last = le64(*arr, at + 40);
    if (last < first || (last + 1) * sector > image_size) {
      return make_error(Errc::parse, "GPT partition " + std::to_string(p.number) + " lies outside the image");
    }
    p.offset = first * sector;
    p.size = (last - first + 1) * sector;
    p.type = guid_text(*arr, at);
    p.name = utf16le_ascii(*arr, at + 56, 72);
    t.partitions.push_back(p);
  }
  return t;
}

}  // namespace

Result<PartitionTable> read_partition_table(const std::function<Result<std::string>(uint64_t, size_t)>& read_at,
                                            uint64_t image_size) {
  if (image_size < 1024) return make_error(Errc::invalid_argument, "too small to hold a partition table");
  auto mbr = read_at(0, 512);
  if (!mbr) return mbr.error();
  if (uint8_t((*mbr)[510]) != 0x55 || uint8_t((*mbr)[511]) != 0xAA) {
    return make_error(Errc::invalid_argument, "no MBR boot signature (55 AA) at byte 510");
  }
  bool protective = false;
  for (int i = 0; i < 4; ++i) protective |= uint8_t((*mbr)[446 + 16 * i + 4]) == 0xEE;
  if (protective) {
    for (uint64_t sector : {512u, 4096u}) {
      auto g = read_gpt(read_at, image_size, sector);
      if (g) return g;
      if (g.error().code != Errc::not_found) return g.error();
    }
    return make_error(Errc::parse, "protective MBR but no GPT header at LBA 1");
  }
  PartitionTable t{"mbr", {}};
  uint64_t ext_base = 0;
  for (unsigned i = 0; i < 4; ++i) {
    const size_t at = 446 + 16 * i;
    const uint8_t type = uint8_t((*mbr)[at + 4]);
    const uint64_t start = le32(*mbr, at + 8), sectors = le32(*mbr, at + 12);
    if (type == 0 || sectors == 0) continue;
    if ((start + sectors) * 512 > image_size) {
      return make_error(Errc::parse, "MBR partition " + std::to_string(i + 1) + " lies outside the image");
    }
    if (type == 0x05 || type == 0x0F || type == 0x85) {
      ext_base = start;
      continue;
    }
    static const char* hex = "0123456789abcdef";
    t.partitions.push_back({i + 1, start * 512, sectors * 512, "", std::string{hex[type >> 4], hex[type & 15]}});
  }
  // Logical partitions: a chain of EBRs inside the extended partition, numbered from 5.
  uint64_t ebr = ext_base;
  for (unsigned n = 5; ext_base != 0 && n < 5 + kMaxPartitions; ++n) {
    auto b = read_at(ebr * 512, 512);
    if (!b) return b.error();
    if (uint8_t((*b)[510]) != 0x55 || uint8_t((*b)[511]) != 0xAA) break;
    const uint8_t type = uint8_t((*b)[446 + 4]);
    const uint64_t start = ebr + le32(*b, 446 + 8), sectors = le32(*b, 446 + 12);
    if (type != 0 && sectors != 0) {
      if ((start + sectors) * 512 > image_size) return make_error(Errc::parse, "logical partition outside the image");
      static const char* hex = "0123456789abcdef";
      t.partitions.push_back({n, start * 512, sectors * 512, "", std::string{hex[type >> 4], hex[type & 15]}});
    }
    const uint64_t next = le32(*b, 446 + 16 + 8);
    if (next == 0) break;
    ebr = ext_base + next;
  }
  return t;
}

}  // namespace flotilla::images

#include "dataset.hpp"

#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "util.hpp"

namespace rd {

static constexpr uint64_t kGamma = 0x9E3779B97F4A7C15ULL;

uint64_t splitmix64_mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

uint64_t epoch_state(uint64_t seed, uint64_t epoch) {
  return splitmix64_mix((splitmix64_mix(seed + kGamma) ^ epoch) + kGamma);
}

std::vector<uint32_t> epoch_order(uint64_t seed, uint64_t epoch, uint64_t n) {
  std::vector<uint32_t> order(n);
  for (uint64_t i = 0; i < n; ++i) order[i] = static_cast<uint32_t>(i);
  SplitMix64 rng(epoch_state(seed, epoch));
  for (uint64_t i = n; i-- > 1;) {
    uint64_t j = rng.below(i + 1);
    std::swap(order[i], order[j]);
  }
  return order;
}

bool epoch_flip(uint64_t seed, uint64_t epoch, uint64_t k) {
  return (splitmix64_mix(epoch_state(seed, epoch) ^ splitmix64_mix(k + kGamma)) >> 63) != 0;
}

static uint32_t u32(const uint8_t* p) {
  return static_cast<uint32_t>(p[0]) | static_cast<uint32_t>(p[1]) << 8 | static_cast<uint32_t>(p[2]) << 16 |
         static_cast<uint32_t>(p[3]) << 24;
}
static uint64_t u64(const uint8_t* p) { return static_cast<uint64_t>(u32(p)) | static_cast<uint64_t>(u32(p + 4)) << 32; }

static void pread_all(int fd, void* buf, size_t n, uint64_t offset, const std::string& path) {
  auto* out = static_cast<uint8_t*>(buf);
  size_t done = 0;
  while (done < n) {
    ssize_t r = ::pread(fd, out + done, n - done, static_cast<off_t>(offset + done));
    if (r < 0) {
      if (errno == EINTR) continue;
      fail(Code::Io, "cannot read dataset " + path + ": " + std::strerror(errno));
    }
    if (r == 0) fail(Code::Invalid, "dataset " + path + " is truncated");
    done += static_cast<size_t>(r);
  }
}

Dataset::Dataset(const std::string& path, bool verify) : path_(path) {
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0)
    fail(errno == ENOENT ? Code::NotFound : Code::Io,
         "dataset " + path + (errno == ENOENT ? " not found" : std::string(": ") + std::strerror(errno)));
  try {
    struct stat st;
    if (::fstat(fd_, &st) != 0) fail(Code::Io, "cannot read dataset " + path + ": " + std::strerror(errno));
    const uint64_t size = static_cast<uint64_t>(st.st_size);
    uint8_t raw[kDatasetHeaderBytes];
    if (size < kDatasetHeaderBytes) fail(Code::Invalid, "dataset " + path + " is not a repnet dataset file (too short)");
    pread_all(fd_, raw, sizeof raw, 0, path);
    if (std::memcmp(raw, kDatasetMagic, 8) != 0) fail(Code::Invalid, path + " is not a repnet dataset file (bad magic)");
    const uint32_t version = u32(raw + 8), header_bytes = u32(raw + 12);
    if (version != kDatasetVersion || header_bytes != kDatasetHeaderBytes)
      fail(Code::Invalid, "dataset " + path + " has format version " + std::to_string(version) + ", this trainer reads " +
                              std::to_string(kDatasetVersion));
    h_.count = u64(raw + 16);
    h_.channels = u32(raw + 24);
    h_.height = u32(raw + 28);
    h_.width = u32(raw + 32);
    h_.dtype = u32(raw + 36);
    h_.num_classes = u32(raw + 40);
    h_.flags = u32(raw + 44);
    std::memcpy(h_.sha256, raw + 48, 32);
    if (h_.dtype != kDtypeFloat32) fail(Code::Invalid, "dataset " + path + ": unknown image dtype " + std::to_string(h_.dtype));
    if (h_.count == 0 || h_.channels == 0 || h_.height == 0 || h_.width == 0 || h_.num_classes == 0 ||
        h_.count > (1ULL << 32))
      fail(Code::Invalid, "dataset " + path + " has an impossible header");
    const unsigned __int128 expected = static_cast<unsigned __int128>(kDatasetHeaderBytes) + 4 * h_.count +
                                       static_cast<unsigned __int128>(4) * h_.count * image_floats();
    if (expected != size)
      fail(Code::Invalid, "dataset " + path + " is truncated or damaged (" + std::to_string(size) + " bytes, its header says " +
                              std::to_string(static_cast<uint64_t>(expected)) + ")");
    labels_.resize(h_.count);
    pread_all(fd_, labels_.data(), 4 * h_.count, kDatasetHeaderBytes, path);
    if (verify) {
      Sha256 sha;
      std::vector<uint8_t> buf(1 << 20);
      uint64_t off = kDatasetHeaderBytes;
      while (off < size) {
        size_t n = static_cast<size_t>(std::min<uint64_t>(buf.size(), size - off));
        pread_all(fd_, buf.data(), n, off, path);
        sha.update(buf.data(), n);
        off += n;
      }
      auto d = sha.digest();
      if (std::memcmp(d.data(), h_.sha256, 32) != 0)
        fail(Code::Invalid, "dataset " + path + " is damaged (its checksum does not match its content)");
    }
    for (uint64_t i = 0; i < h_.count; ++i)
      if (labels_[i] < 0 || static_cast<uint32_t>(labels_[i]) >= h_.num_classes)
        fail(Code::Invalid, "dataset " + path + ": label " + std::to_string(labels_[i]) + " of image " + std::to_string(i) +
                                " is outside its " + std::to_string(h_.num_classes) + " classes");
    row_.resize(h_.width);
  } catch (...) {
    ::close(fd_);
    fd_ = -1;
    throw;
  }
}

Dataset::~Dataset() {
  if (fd_ >= 0) ::close(fd_);
}

void Dataset::read_image(uint64_t i, float* out, bool flip) const {
  const size_t floats = image_floats();
  const uint64_t offset = kDatasetHeaderBytes + 4 * h_.count + 4 * static_cast<uint64_t>(floats) * i;
  pread_all(fd_, out, 4 * floats, offset, path_);
  if (flip) {
    const size_t w = h_.width;
    for (size_t row = 0; row < static_cast<size_t>(h_.channels) * h_.height; ++row) {
      float* r = out + row * w;
      for (size_t a = 0, b = w - 1; a < b; ++a, --b) std::swap(r[a], r[b]);
    }
  }
}

}  // namespace rd

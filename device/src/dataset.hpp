// Packed datasets (repnet.runtime.device.files.write_dataset; format in docs/device.md), read one
// sample at a time with pread (bounded memory: nothing of the file is mapped), and the device's
// seeded order and flips.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace rd {

constexpr char kDatasetMagic[8] = {'R', 'P', 'N', 'D', 'A', 'T', 'A', '\0'};
constexpr uint32_t kDatasetVersion = 1;
constexpr uint32_t kDatasetHeaderBytes = 96;
constexpr uint32_t kDtypeFloat32 = 1;
constexpr uint32_t kFlagHflip = 1;

struct DatasetHeader {
  uint64_t count = 0;
  uint32_t channels = 0, height = 0, width = 0, dtype = 0, num_classes = 0, flags = 0;
  uint8_t sha256[32] = {};
};

class Dataset {
 public:
  // Opens and checks `path`: magic, version, dtype, file size, and (verify) the SHA-256 of the payload.
  Dataset(const std::string& path, bool verify = true);
  ~Dataset();
  Dataset(const Dataset&) = delete;
  Dataset& operator=(const Dataset&) = delete;

  const DatasetHeader& header() const { return h_; }
  const std::string& path() const { return path_; }
  size_t image_floats() const { return static_cast<size_t>(h_.channels) * h_.height * h_.width; }
  bool hflip() const { return (h_.flags & kFlagHflip) != 0; }
  int32_t label(uint64_t i) const { return labels_[i]; }
  // Image i into `out` (image_floats() floats), mirrored left-right if `flip`.
  void read_image(uint64_t i, float* out, bool flip) const;

 private:
  std::string path_;
  int fd_ = -1;
  DatasetHeader h_;
  std::vector<int32_t> labels_;
  std::vector<float> row_;
};

// SplitMix64 (Steele, Lea, Flood 2014): state += 0x9E3779B97F4A7C15, then the finaliser below.
uint64_t splitmix64_mix(uint64_t z);  // the finaliser: z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; ...
struct SplitMix64 {
  uint64_t state;
  explicit SplitMix64(uint64_t s) : state(s) {}
  uint64_t next() {
    state += 0x9E3779B97F4A7C15ULL;
    return splitmix64_mix(state);
  }
  // uniform in [0, bound): the high 64 bits of next() * bound (Lemire's multiply, no division)
  uint64_t below(uint64_t bound) {
    return static_cast<uint64_t>((static_cast<unsigned __int128>(next()) * bound) >> 64);
  }
};

// The initial stream state of epoch `epoch`: mix(mix(seed + G) ^ epoch + G) with G the golden gamma,
// i.e. splitmix64_mix(splitmix64_mix(seed + 0x9E37...) ^ epoch + 0x9E37...)
uint64_t epoch_state(uint64_t seed, uint64_t epoch);
// Epoch order: Fisher-Yates over 0 .. n-1, i from n-1 down to 1, j = below(i + 1), swap(i, j), with the
// SplitMix64 stream started at epoch_state(seed, epoch).
std::vector<uint32_t> epoch_order(uint64_t seed, uint64_t epoch, uint64_t n);
// Whether the image at position k of epoch's order is mirrored: the top bit of
// splitmix64_mix(epoch_state(seed, epoch) ^ splitmix64_mix(k + 0x9E37...)).
bool epoch_flip(uint64_t seed, uint64_t epoch, uint64_t k);

}  // namespace rd

// The dataset reader on a file written here by hand (header, labels, images, SHA-256), its checks
// (truncated, damaged, foreign), flips, and the seeded order.
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <set>
#include <string>
#include <vector>

#include "check.hpp"
#include "dataset.hpp"
#include "util.hpp"

static void put32(std::string& s, uint32_t v) { s.append(reinterpret_cast<const char*>(&v), 4); }
static void put64(std::string& s, uint64_t v) { s.append(reinterpret_cast<const char*>(&v), 8); }

static std::string make(uint64_t n, uint32_t c, uint32_t h, uint32_t w, uint32_t classes, uint32_t flags,
                        std::vector<float>* images, std::vector<int32_t>* labels) {
  std::string payload;
  for (uint64_t i = 0; i < n; ++i) {
    int32_t l = static_cast<int32_t>(i % classes);
    labels->push_back(l);
    payload.append(reinterpret_cast<const char*>(&l), 4);
  }
  for (uint64_t i = 0; i < n * c * h * w; ++i) images->push_back(static_cast<float>(i) * 0.5f - 3.0f);
  payload.append(reinterpret_cast<const char*>(images->data()), images->size() * 4);
  rd::Sha256 sha;
  sha.update(payload);
  auto d = sha.digest();
  std::string f(rd::kDatasetMagic, 8);
  put32(f, 1);
  put32(f, 96);
  put64(f, n);
  put32(f, c);
  put32(f, h);
  put32(f, w);
  put32(f, 1);
  put32(f, classes);
  put32(f, flags);
  f.append(reinterpret_cast<const char*>(d.data()), 32);
  f.append(16, '\0');
  CHECK(f.size() == 96);
  return f + payload;
}

static void write(const std::string& path, const std::string& bytes) {
  FILE* f = std::fopen(path.c_str(), "wb");
  CHECK(f != nullptr);
  CHECK(std::fwrite(bytes.data(), 1, bytes.size(), f) == bytes.size());
  std::fclose(f);
}

int main() {
  std::vector<float> images;
  std::vector<int32_t> labels;
  const std::string file = make(5, 2, 3, 4, 3, rd::kFlagHflip, &images, &labels);
  write("ds_ok.rpd", file);
  rd::Dataset d("ds_ok.rpd");
  CHECK(d.header().count == 5 && d.header().channels == 2 && d.header().height == 3 && d.header().width == 4);
  CHECK(d.header().num_classes == 3 && d.hflip());
  std::vector<float> img(d.image_floats());
  for (uint64_t i = 0; i < 5; ++i) {
    CHECK(d.label(i) == labels[i]);
    d.read_image(i, img.data(), false);
    CHECK(std::memcmp(img.data(), images.data() + i * 24, 24 * 4) == 0);
  }
  d.read_image(3, img.data(), true);  // mirrored: row r, column x <- column w - 1 - x
  for (int r = 0; r < 6; ++r)
    for (int x = 0; x < 4; ++x) CHECK(img[r * 4 + x] == images[3 * 24 + r * 4 + (3 - x)]);

  write("ds_short.rpd", file.substr(0, file.size() - 4));
  CHECK_THROWS(rd::Dataset("ds_short.rpd"), rd::Code::Invalid);
  std::string damaged = file;
  damaged[damaged.size() - 3] ^= 0x40;
  write("ds_bad.rpd", damaged);
  CHECK_THROWS(rd::Dataset("ds_bad.rpd"), rd::Code::Invalid);
  rd::Dataset unchecked("ds_bad.rpd", false);  // (the checksum pass can be skipped; the size is still checked)
  std::string foreign = file;
  foreign[0] = 'X';
  write("ds_foreign.rpd", foreign);
  CHECK_THROWS(rd::Dataset("ds_foreign.rpd"), rd::Code::Invalid);
  CHECK_THROWS(rd::Dataset("ds_missing.rpd"), rd::Code::NotFound);
  std::vector<float> i2;
  std::vector<int32_t> l2;
  std::string bad_label = make(2, 1, 1, 1, 2, 0, &i2, &l2);
  // label 7 of 2 classes (and the checksum recomputed so only the label check can fail)
  int32_t seven = 7;
  std::memcpy(&bad_label[96], &seven, 4);
  {
    rd::Sha256 sha;
    sha.update(bad_label.data() + 96, bad_label.size() - 96);
    auto dd = sha.digest();
    std::memcpy(&bad_label[48], dd.data(), 32);
  }
  write("ds_label.rpd", bad_label);
  CHECK_THROWS(rd::Dataset("ds_label.rpd"), rd::Code::Invalid);

  // the seeded order: a permutation, the same for the same (seed, epoch), another for another epoch
  auto o1 = rd::epoch_order(7, 0, 1000), o2 = rd::epoch_order(7, 0, 1000), o3 = rd::epoch_order(7, 1, 1000);
  CHECK(o1 == o2 && o1 != o3 && o1 != rd::epoch_order(8, 0, 1000));
  CHECK(std::set<uint32_t>(o1.begin(), o1.end()).size() == 1000 && *std::max_element(o1.begin(), o1.end()) == 999);
  int flips = 0;
  for (uint64_t k = 0; k < 10000; ++k) flips += rd::epoch_flip(7, 0, k);
  CHECK(flips > 4700 && flips < 5300);
  CHECK(rd::epoch_flip(7, 0, 3) == rd::epoch_flip(7, 0, 3));
  // SplitMix64's reference output for seed 0 (Vigna's splitmix64.c): 0xE220A8397B1DCDAF
  rd::SplitMix64 sm(0);
  CHECK(sm.next() == 0xE220A8397B1DCDAFULL);
  std::puts("dataset: ok");
  return 0;
}

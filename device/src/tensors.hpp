// Safetensors files and repnet's content digest (repnet.storage.content_digest), so an adapter written
// here is one repnet.from_pretrained loads and checks.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace rd {

struct TensorView {
  std::string name;
  std::string dtype;  // safetensors code: F32, I64, I32, U8
  std::vector<int64_t> shape;
  const void* data = nullptr;
  size_t nbytes = 0;
};

struct OwnedTensor {
  std::string dtype;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
};

// repnet.storage.content_digest(dict(sorted(tensors.items()))) with keys = names (sorted here):
// "D<n>", then per item "Vstr:'<name>';" and "T<torch dtype>(<shape tuple>)" + the raw bytes.
std::string content_digest(std::vector<TensorView> tensors);
// Python's repr of a str (the digest hashes keys by repr); names needing escapes are refused.
std::string python_repr(const std::string& s);
// The bytes of a safetensors file of `tensors` (sorted by name), with metadata + "__sha256__" = digest.
std::string safetensors_bytes(std::vector<TensorView> tensors, std::map<std::string, std::string> metadata = {});
// The same file written atomically to `path`, streamed (the tensors are not copied).
void write_safetensors(const std::string& path, std::vector<TensorView> tensors, std::map<std::string, std::string> metadata = {});
// Read a safetensors file; `metadata` receives its "__metadata__" strings.
std::map<std::string, OwnedTensor> read_safetensors(const std::string& path, std::map<std::string, std::string>* metadata);
size_t dtype_size(const std::string& dtype);

}  // namespace rd

#include "tensors.hpp"

#include <algorithm>
#include <cstring>
#include <nlohmann/json.hpp>

#include "util.hpp"

namespace rd {

size_t dtype_size(const std::string& dtype) {
  if (dtype == "F32" || dtype == "I32") return 4;
  if (dtype == "I64" || dtype == "F64") return 8;
  if (dtype == "U8" || dtype == "I8") return 1;
  fail(Code::Invalid, "unsupported tensor dtype " + dtype);
}

static std::string torch_dtype(const std::string& dtype) {
  if (dtype == "F32") return "torch.float32";
  if (dtype == "F64") return "torch.float64";
  if (dtype == "I64") return "torch.int64";
  if (dtype == "I32") return "torch.int32";
  if (dtype == "U8") return "torch.uint8";
  if (dtype == "I8") return "torch.int8";
  fail(Code::Invalid, "unsupported tensor dtype " + dtype);
}

std::string python_repr(const std::string& s) {
  bool single = false, dbl = false;
  for (unsigned char c : s) {
    if (c < 0x20 || c > 0x7e || c == '\\') fail(Code::Invalid, "tensor name '" + s + "' needs escapes: not supported");
    single |= c == '\'';
    dbl |= c == '"';
  }
  if (single && dbl) fail(Code::Invalid, "tensor name '" + s + "' holds both quote characters: not supported");
  const char q = single ? '"' : '\'';
  return std::string(1, q) + s + std::string(1, q);
}

static std::string shape_repr(const std::vector<int64_t>& shape) {
  std::string out = "(";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(shape[i]);
  }
  if (shape.size() == 1) out += ",";
  return out + ")";
}

static void sort_by_name(std::vector<TensorView>& tensors) {
  std::sort(tensors.begin(), tensors.end(), [](const TensorView& a, const TensorView& b) { return a.name < b.name; });
}

std::string content_digest(std::vector<TensorView> tensors) {
  sort_by_name(tensors);
  Sha256 h;
  h.update("D" + std::to_string(tensors.size()));
  for (const auto& t : tensors) {
    h.update("Vstr:" + python_repr(t.name) + ";");
    h.update("T" + torch_dtype(t.dtype) + shape_repr(t.shape));
    h.update(t.data, t.nbytes);
  }
  return h.hexdigest();
}

static std::string safetensors_header(std::vector<TensorView>& tensors, std::map<std::string, std::string>& metadata) {
  sort_by_name(tensors);
  metadata["__sha256__"] = content_digest(tensors);
  nlohmann::json header = nlohmann::json::object();
  header["__metadata__"] = metadata;
  size_t offset = 0;
  for (const auto& t : tensors) {
    size_t numel = 1;
    for (auto d : t.shape) numel *= static_cast<size_t>(d);
    if (numel * dtype_size(t.dtype) != t.nbytes) fail(Code::Invalid, "tensor " + t.name + ": size does not match its shape");
    header[t.name] = {{"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {offset, offset + t.nbytes}}};
    offset += t.nbytes;
  }
  std::string text = header.dump();
  while (text.size() % 8) text += ' ';
  std::string out;
  uint64_t n = text.size();
  for (int i = 0; i < 8; ++i) out += static_cast<char>((n >> (8 * i)) & 0xff);
  return out + text;
}

std::string safetensors_bytes(std::vector<TensorView> tensors, std::map<std::string, std::string> metadata) {
  std::string out = safetensors_header(tensors, metadata);
  for (const auto& t : tensors) out.append(static_cast<const char*>(t.data), t.nbytes);
  return out;
}

void write_safetensors(const std::string& path, std::vector<TensorView> tensors, std::map<std::string, std::string> metadata) {
  std::string head = safetensors_header(tensors, metadata);
  AtomicFile f(path);
  f.write(head.data(), head.size());
  for (const auto& t : tensors) f.write(t.data, t.nbytes);
  f.commit();
}

std::map<std::string, OwnedTensor> read_safetensors(const std::string& path, std::map<std::string, std::string>* metadata) {
  std::string raw = read_file(path, "tensor file");
  if (raw.size() < 8) fail(Code::Invalid, path + " is not a safetensors file (too short)");
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= static_cast<uint64_t>(static_cast<uint8_t>(raw[i])) << (8 * i);
  if (n > raw.size() - 8) fail(Code::Invalid, path + " is not a safetensors file (bad header length)");
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(raw.substr(8, n));
  } catch (const std::exception&) {
    fail(Code::Invalid, path + " is not a safetensors file (bad header)");
  }
  std::map<std::string, OwnedTensor> out;
  const size_t base = 8 + n;
  try {
    for (auto it = header.begin(); it != header.end(); ++it) {
      if (it.key() == "__metadata__") {
        if (metadata)
          for (auto m = it->begin(); m != it->end(); ++m) (*metadata)[m.key()] = m->get<std::string>();
        continue;
      }
      OwnedTensor t;
      t.dtype = (*it)["dtype"].get<std::string>();
      t.shape = (*it)["shape"].get<std::vector<int64_t>>();
      auto offs = (*it)["data_offsets"].get<std::vector<size_t>>();
      if (offs.size() != 2 || offs[0] > offs[1] || base + offs[1] > raw.size())
        fail(Code::Invalid, path + ": tensor " + it.key() + " lies outside the file");
      t.bytes.assign(raw.begin() + static_cast<long>(base + offs[0]), raw.begin() + static_cast<long>(base + offs[1]));
      out.emplace(it.key(), std::move(t));
    }
  } catch (const nlohmann::json::exception&) {
    fail(Code::Invalid, path + " is not a safetensors file (bad header entries)");
  }
  return out;
}

}  // namespace rd

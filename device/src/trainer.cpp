#include "trainer.hpp"

#include <executorch/extension/data_loader/mmap_data_loader.h>
#include <executorch/extension/memory_allocator/malloc_memory_allocator.h>
#include <executorch/extension/tensor/tensor_ptr.h>
#include <executorch/extension/tensor/tensor_ptr_maker.h>
#include <executorch/extension/threadpool/threadpool_guard.h>
#include <executorch/runtime/core/hierarchical_allocator.h>
#include <executorch/runtime/executor/memory_manager.h>
#include <executorch/runtime/executor/method.h>
#include <executorch/runtime/executor/program.h>
#include <executorch/runtime/platform/platform.h>
#include <executorch/runtime/platform/runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#if defined(__GLIBC__)
#include <malloc.h>
#endif
#include <cstring>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>

#include "dataset.hpp"
#include "optim.hpp"
#include "tensors.hpp"
#include "util.hpp"

#pragma GCC diagnostic ignored "-Wdeprecated-declarations"  // Method::mutable_input: the planned input slots

namespace rd {

namespace et = executorch::runtime;
using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using json = nlohmann::json;

// ----------------------------------------------------------------------------- runtime log
static std::mutex g_log_mutex;
static std::string g_log;
static bool g_verbose = false;

static void emit_log(et_timestamp_t, et_pal_log_level_t level, const char* filename, const char*, size_t line,
                     const char* message, size_t length) {
  std::string msg(message, length);
  while (!msg.empty() && (msg.back() == '\n' || msg.back() == '\r')) msg.pop_back();
  for (auto& c : msg)  // one printable line (a foreign file's bytes can land in a message)
    if (static_cast<unsigned char>(c) < 0x20 || static_cast<unsigned char>(c) > 0x7e) c = '?';
  if (g_verbose) std::fprintf(stderr, "[executorch %c %s:%zu] %s\n", static_cast<char>(level), filename, line, msg.c_str());
  if (level == kError || level == kFatal) {
    std::lock_guard<std::mutex> lock(g_log_mutex);
    if (g_log.size() < 400) g_log += (g_log.empty() ? "" : "; ") + msg;
  }
}

// REPNET_DEVICE_VERBOSE=1: where the memory is at a milestone (stderr)
static void memory_note(const char* where) {
  if (!g_verbose) return;
#if defined(__GLIBC__)
  struct mallinfo2 mi = mallinfo2();
  std::fprintf(stderr, "[repnet-device] %s: peak RSS %.2f MB, heap in use %.2f MB (mmapped %.2f MB)\n", where,
               peak_rss_bytes() / 1e6, mi.uordblks / 1e6, mi.hblkhd / 1e6);
#else
  std::fprintf(stderr, "[repnet-device] %s: peak RSS %.2f MB\n", where, peak_rss_bytes() / 1e6);
#endif
}

std::string take_runtime_log() {
  std::lock_guard<std::mutex> lock(g_log_mutex);
  std::string out;
  out.swap(g_log);
  return out;
}

static void init_runtime() {
  static bool done = false;
  if (done) return;
  done = true;
  const char* v = std::getenv("REPNET_DEVICE_VERBOSE");
  g_verbose = v != nullptr && *v && std::strcmp(v, "0") != 0;
  // Runtime messages go to the error lines (or stderr with REPNET_DEVICE_VERBOSE=1), never loose on stderr.
  et::register_pal(et::PalImpl::create(emit_log, __FILE__));
  et::runtime_init();
}

static std::string et_error(et::Error e) {
  std::string log = take_runtime_log();
  return "error " + std::to_string(static_cast<int>(e)) + (log.empty() ? "" : ": " + log);
}

// ----------------------------------------------------------------------------- a loaded method
// The kernels' scratch memory (temp allocations during one instruction): malloc'd, all freed at reset()
// (after every execute), its peak counted (rd_stats.scratch_peak_bytes).
class ScratchAllocator : public et::MemoryAllocator {
 public:
  ScratchAllocator() : et::MemoryAllocator(0, nullptr) {}
  ~ScratchAllocator() override { reset(); }
  void* allocate(size_t size, size_t alignment = kDefaultAlignment) override {
    if (alignment == 0 || (alignment & (alignment - 1)) != 0) return nullptr;
    void* p = std::malloc(size + alignment);
    if (p == nullptr) return nullptr;
    blocks_.push_back(p);
    current_ += size + alignment;
    if (current_ > peak_) peak_ = current_;
    auto addr = reinterpret_cast<uintptr_t>(p);
    return reinterpret_cast<void*>((addr + alignment - 1) & ~(static_cast<uintptr_t>(alignment) - 1));
  }
  void reset() override {
    for (void* p : blocks_) std::free(p);
    blocks_.clear();
    current_ = 0;
  }
  size_t peak() const { return peak_; }

 private:
  std::vector<void*> blocks_;
  size_t current_ = 0, peak_ = 0;
};

// The method's own allocations (values, tensor metadata, instruction arguments: thousands of small
// objects that live as long as the method): carved from 64 KB chunks, without malloc's per-object header
// and alignment padding.
class ChunkAllocator : public et::MemoryAllocator {
 public:
  ChunkAllocator() : et::MemoryAllocator(0, nullptr) {}
  ~ChunkAllocator() override { reset(); }
  void* allocate(size_t size, size_t alignment = kDefaultAlignment) override {
    if (alignment == 0 || (alignment & (alignment - 1)) != 0) return nullptr;
    uintptr_t p = (next_ + alignment - 1) & ~(static_cast<uintptr_t>(alignment) - 1);
    if (chunks_.empty() || p + size > end_) {
      const size_t want = std::max<size_t>(kChunk, size + alignment);
      void* c = std::malloc(want);
      if (c == nullptr) return nullptr;
      chunks_.push_back(c);
      next_ = reinterpret_cast<uintptr_t>(c);
      end_ = next_ + want;
      p = (next_ + alignment - 1) & ~(static_cast<uintptr_t>(alignment) - 1);
    }
    next_ = p + size;
    return reinterpret_cast<void*>(p);
  }
  void reset() override {
    for (void* c : chunks_) std::free(c);
    chunks_.clear();
    next_ = end_ = 0;
  }

 private:
  static constexpr size_t kChunk = 64 * 1024;
  std::vector<void*> chunks_;
  uintptr_t next_ = 0, end_ = 0;
};

struct LoadedMethod {
  std::vector<uint8_t*> buffers;
  std::vector<et::Span<uint8_t>> spans;
  std::unique_ptr<et::HierarchicalAllocator> planned;
  std::unique_ptr<ChunkAllocator> method_allocator;
  std::unique_ptr<ScratchAllocator> temp_allocator;
  std::unique_ptr<et::MemoryManager> memory;
  std::unique_ptr<et::Method> method;
  int64_t planned_bytes = 0;

  LoadedMethod() = default;
  LoadedMethod(const LoadedMethod&) = delete;
  LoadedMethod& operator=(const LoadedMethod&) = delete;
  ~LoadedMethod() {
    method.reset();
    for (auto* b : buffers) std::free(b);
  }
};

static std::unique_ptr<LoadedMethod> load_method(et::Program& program, const std::string& name, const std::string& pte) {
  auto meta = program.method_meta(name.c_str());
  if (!meta.ok()) fail(Code::Invalid, "program " + pte + " has no method '" + name + "': not a repnet device program");
  auto lm = std::make_unique<LoadedMethod>();
  for (size_t i = 0; i < meta->num_memory_planned_buffers(); ++i) {
    int64_t size = meta->memory_planned_buffer_size(i).get();
    size_t rounded = static_cast<size_t>((size + 63) / 64 * 64);
    auto* buf = static_cast<uint8_t*>(std::aligned_alloc(64, rounded ? rounded : 64));
    if (buf == nullptr) fail(Code::Runtime, "out of memory allocating the arena of method '" + name + "'");
    lm->buffers.push_back(buf);
    lm->spans.emplace_back(buf, static_cast<size_t>(size));
    lm->planned_bytes += size;
  }
  lm->planned = std::make_unique<et::HierarchicalAllocator>(et::Span<et::Span<uint8_t>>(lm->spans.data(), lm->spans.size()));
  lm->method_allocator = std::make_unique<ChunkAllocator>();
  lm->temp_allocator = std::make_unique<ScratchAllocator>();
  lm->memory = std::make_unique<et::MemoryManager>(lm->method_allocator.get(), lm->planned.get(), lm->temp_allocator.get());
  auto m = program.load_method(name.c_str(), lm->memory.get());
  if (!m.ok()) fail(Code::Runtime, "cannot load method '" + name + "' of " + pte + " (" + et_error(m.error()) + ")");
  lm->method = std::make_unique<et::Method>(std::move(m.get()));
  return lm;
}

struct SmallOutputs {
  std::vector<int64_t> ints;
  std::vector<std::string> strings;
  size_t others = 0;
};

// Run a method without inputs (the hidden training methods) and copy its outputs out before its memory goes.
static SmallOutputs run_small(et::Program& program, const std::string& name, const std::string& pte) {
  auto lm = load_method(program, name, pte);
  auto err = lm->method->execute();
  if (err != et::Error::Ok) fail(Code::Runtime, "method '" + name + "' of " + pte + " failed (" + et_error(err) + ")");
  SmallOutputs out;
  for (size_t i = 0; i < lm->method->outputs_size(); ++i) {
    const et::EValue& v = lm->method->get_output(i);
    if (v.isInt()) {
      out.ints.push_back(v.toInt());
    } else if (v.isString()) {
      auto s = v.toString();
      out.strings.emplace_back(s.data(), s.size());
    } else {
      out.others += 1;
    }
  }
  return out;
}

// ----------------------------------------------------------------------------- the trainer
struct TrainedTensor {
  std::string name;  // the adapter's key (the program's FQN without "model.")
  std::vector<int64_t> shape;
  size_t numel = 0;
  double lr = 0;  // of its parameter group
  float* data = nullptr;  // in the training method's arena
};

class Trainer {
 public:
  std::string pte_path, meta_path, program_sha;
  json meta;
  rd_options opt{};
  std::unique_ptr<executorch::extension::MmapDataLoader> loader;
  std::unique_ptr<et::Program> program;
  std::unique_ptr<LoadedMethod> train, eval;
  std::vector<TrainedTensor> trained;
  size_t grad_start = 0, param_start = 0;
  int64_t batch = 0, channels = 0, height = 0, width = 0, num_classes = 0;
  std::unique_ptr<Optimizer> optimizer;
  Schedule schedule;
  double clip_norm = 0;  // 0: no clipping
  bool eval_bound = false;
  std::string eval_name;
  double train_peak_rss = 0;  // the process peak before the evaluation method was first loaded
  executorch::extension::TensorPtr eval_images;  // the evaluation method's images: the training input slot
  std::unique_ptr<Dataset> data[2];
  std::unique_ptr<executorch::extension::threadpool::NoThreadPoolGuard> no_pool;
  // progress (what a checkpoint restores)
  int64_t step_count = 0, epoch = 0, position = 0;  // position: images taken in the current epoch
  int64_t total_steps = 0, steps_per_epoch = 0, epochs = 1;
  double epoch_loss_sum = 0, train_seconds = 0;
  int64_t epoch_correct = 0, epoch_seen = 0, images = 0;
  int64_t session_steps = 0;
  double session_seconds = 0;
  std::vector<uint32_t> order;
  int64_t order_epoch = -1;
};

static const json& need(const json& j, const char* key, const std::string& where) {
  if (!j.is_object() || !j.contains(key)) fail(Code::Invalid, "metadata " + where + " lacks '" + key + "'");
  return j.at(key);
}

template <class T>
static T get(const json& j, const char* key, const std::string& where) {
  try {
    return need(j, key, where).get<T>();
  } catch (const json::exception&) {
    fail(Code::Invalid, std::string("metadata ") + where + ": '" + key + "' has the wrong type");
  }
}

static Tensor& input_tensor(et::Method& m, size_t i) { return m.mutable_input(i).toTensor(); }

Trainer* open_trainer(const std::string& pte, const std::string& meta_arg, const rd_options& options) {
  init_runtime();
  take_runtime_log();
  auto t = std::make_unique<Trainer>();
  t->opt = options;
  t->pte_path = pte;
  t->meta_path = meta_arg;
  if (t->meta_path.empty()) {
    auto dot = pte.rfind('.');
    t->meta_path = (dot == std::string::npos || dot < pte.rfind('/') + 1 ? pte : pte.substr(0, dot)) + ".json";
  }
  if (!file_exists(pte)) fail(Code::NotFound, "program " + pte + " not found");
  std::string text = read_file(t->meta_path, "program metadata");
  try {
    t->meta = json::parse(text);
  } catch (const json::exception&) {
    fail(Code::Invalid, "program metadata " + t->meta_path + " is not valid JSON");
  }
  const std::string& where = t->meta_path;
  if (!t->meta.is_object() || t->meta.value("format", "") != "repnet-device-program")
    fail(Code::Invalid, where + " is not repnet device program metadata");
  if (get<int>(t->meta, "version", where) != 1)
    fail(Code::Invalid, "program metadata " + where + " has version " + std::to_string(get<int>(t->meta, "version", where)) +
                            ", this trainer reads 1");
  const json& prog = need(t->meta, "program", where);
  t->program_sha = sha256_file(pte);
  if (t->program_sha != get<std::string>(prog, "sha256", where))
    fail(Code::Invalid, "program " + pte + " does not match its metadata " + where +
                            " (SHA-256 differs): a damaged, truncated or different .pte");
  using executorch::extension::MmapDataLoader;
  {  // the full structural check, on a mapping of its own that goes away after (its pages leave the RSS)
    auto check = MmapDataLoader::from(pte.c_str(), MmapDataLoader::MlockConfig::NoMlock);
    if (!check.ok()) fail(Code::Io, "cannot map program " + pte + " (" + et_error(check.error()) + ")");
    auto verified = et::Program::load(&check.get(), et::Program::Verification::InternalConsistency);
    if (!verified.ok()) fail(Code::Invalid, pte + " is not a valid ExecuTorch program (" + et_error(verified.error()) + ")");
  }
  auto loaded = MmapDataLoader::from(pte.c_str(), MmapDataLoader::MlockConfig::NoMlock);
  if (!loaded.ok()) fail(Code::Io, "cannot map program " + pte + " (" + et_error(loaded.error()) + ")");
  t->loader = std::make_unique<MmapDataLoader>(std::move(loaded.get()));
  auto p = et::Program::load(t->loader.get(), et::Program::Verification::Minimal);
  if (!p.ok()) fail(Code::Invalid, pte + " is not a valid ExecuTorch program (" + et_error(p.error()) + ")");
  t->program = std::make_unique<et::Program>(std::move(p.get()));
  memory_note("program loaded");
  const std::string train_name = get<std::string>(prog, "train_method", where);
  const std::string eval_name = get<std::string>(prog, "eval_method", where);

  // where gradients and parameters start among the outputs, and their names (the hidden methods)
  auto gi = run_small(*t->program, "__et_training_gradients_index_" + train_name, pte);
  auto pi = run_small(*t->program, "__et_training_parameters_index_" + train_name, pte);
  auto fq = run_small(*t->program, "__et_training_fqn_" + train_name, pte);
  if (gi.ints.size() != 1 || pi.ints.size() != 1 || fq.others || gi.others || pi.others)
    fail(Code::Invalid, pte + ": its training index methods do not return one integer each");
  t->grad_start = static_cast<size_t>(gi.ints[0]);
  t->param_start = static_cast<size_t>(pi.ints[0]);
  std::vector<std::string> fqns = fq.strings;
  memory_note("hidden methods run");
  t->train = load_method(*t->program, train_name, pte);
  memory_note("training method loaded");
  et::Method& m = *t->train->method;
  const size_t n_train = fqns.size();
  if (t->param_start - t->grad_start != n_train || m.outputs_size() != t->param_start + n_train || t->grad_start < 2)
    fail(Code::Invalid, pte + ": the outputs of '" + train_name + "' are not (loss, logits, gradients, parameters)");

  // shapes
  t->batch = get<int64_t>(t->meta, "batch_size", where);
  t->channels = get<int64_t>(t->meta, "channels", where);
  t->height = t->width = get<int64_t>(t->meta, "image_size", where);
  t->num_classes = get<int64_t>(t->meta, "num_classes", where);
  if (m.inputs_size() != 2) fail(Code::Invalid, pte + ": '" + train_name + "' does not take (images, labels)");
  Tensor& x = input_tensor(m, 0);
  Tensor& y = input_tensor(m, 1);
  if (x.scalar_type() != ScalarType::Float || x.dim() != 4 || x.size(0) != t->batch || x.size(1) != t->channels ||
      x.size(2) != t->height || x.size(3) != t->width || y.scalar_type() != ScalarType::Long || y.dim() != 1 ||
      y.size(0) != t->batch || x.mutable_data_ptr() == nullptr || y.mutable_data_ptr() == nullptr)
    fail(Code::Invalid, pte + ": its inputs do not match its metadata (batch " + std::to_string(t->batch) + ", " +
                            std::to_string(t->height) + " px)");

  // trained tensors: metadata order = program order
  const json& tr = need(t->meta, "trainable", where);
  if (!tr.is_array() || tr.size() != n_train)
    fail(Code::Invalid, "metadata " + where + " lists " + std::to_string(tr.is_array() ? tr.size() : 0) +
                            " trained tensors, the program trains " + std::to_string(n_train));
  std::vector<size_t> sizes;
  for (size_t i = 0; i < n_train; ++i) {
    TrainedTensor tt;
    tt.name = get<std::string>(tr[i], "name", where);
    if (fqns[i] != "model." + tt.name)
      fail(Code::Invalid, "metadata " + where + " does not belong to " + pte + " (trained tensor " + std::to_string(i) + " is " +
                              fqns[i] + ", the metadata says " + tt.name + ")");
    tt.shape = get<std::vector<int64_t>>(tr[i], "shape", where);
    tt.lr = get<double>(tr[i], "lr", where);
    Tensor p = m.get_output(t->param_start + i).toTensor();
    Tensor g = m.get_output(t->grad_start + i).toTensor();
    tt.numel = static_cast<size_t>(p.numel());
    size_t expect = 1;
    for (auto d : tt.shape) expect *= static_cast<size_t>(d);
    if (p.scalar_type() != ScalarType::Float || g.scalar_type() != ScalarType::Float || expect != tt.numel ||
        static_cast<size_t>(g.numel()) != tt.numel)
      fail(Code::Invalid, pte + ": trained tensor " + tt.name + " does not match its metadata shape");
    tt.data = p.mutable_data_ptr<float>();
    if (tt.data == nullptr) fail(Code::Invalid, pte + ": trained tensor " + tt.name + " is not in the arena");
    sizes.push_back(tt.numel);
    t->trained.push_back(std::move(tt));
  }

  // the recipe
  const json& o = need(t->meta, "optimizer", where);
  OptimConfig oc;
  oc.name = get<std::string>(o, "name", where);
  oc.weight_decay = o.value("weight_decay", 0.0);
  oc.momentum = o.value("momentum", 0.0);
  oc.dampening = o.value("dampening", 0.0);
  oc.nesterov = o.value("nesterov", false);
  oc.eps = o.value("eps", 1e-8);
  if (o.contains("betas")) {
    auto b = o.at("betas").get<std::vector<double>>();
    if (b.size() != 2) fail(Code::Invalid, "metadata " + where + ": optimizer betas must be two numbers");
    oc.beta1 = b[0];
    oc.beta2 = b[1];
  }
  t->optimizer = std::make_unique<Optimizer>(oc, sizes);
  const json& s = need(t->meta, "schedule", where);
  t->schedule.name = get<std::string>(s, "name", where);
  if (t->schedule.name != "cosine" && t->schedule.name != "constant")
    fail(Code::Invalid, "metadata " + where + ": unknown schedule '" + t->schedule.name + "' (cosine, constant)");
  t->schedule.warmup_steps = s.value("warmup_steps", static_cast<int64_t>(0));
  if (t->meta.contains("clip_grad_norm") && !t->meta.at("clip_grad_norm").is_null())
    t->clip_norm = t->meta.at("clip_grad_norm").get<double>();
  const json train_plan = t->meta.value("train", json::object());
  t->epochs = options.epochs > 0 ? options.epochs : train_plan.value("epochs", static_cast<int64_t>(1));
  if (options.threads == 1) t->no_pool = std::make_unique<executorch::extension::threadpool::NoThreadPoolGuard>();
  else if (options.threads != 0) fail(Code::Invalid, "threads must be 0 (the runtime's pool) or 1 (none)");

  // the evaluation method is loaded when first used (its arena is not held while only training); it
  // takes its images in the training method's input slot and the trained tensors where they are
  auto em = t->program->method_meta(eval_name.c_str());
  if (!em.ok() || em->num_inputs() != 1 + n_train || em->num_outputs() != 1)
    fail(Code::Invalid, pte + ": no method '" + eval_name + "' taking (images, trained tensors) -> logits");
  t->eval_name = eval_name;
  return t.release();
}

static void bind_eval_inputs(Trainer& t) {
  if (t.eval_bound) return;
  if (t.train_peak_rss <= 0) t.train_peak_rss = peak_rss_bytes();  // training's own peak, before this arena
  t.eval = load_method(*t.program, t.eval_name, t.pte_path);
  et::Method& m = *t.train->method;
  et::Method& e = *t.eval->method;
  Tensor& x = input_tensor(m, 0);
  t.eval_images = executorch::extension::from_blob(x.mutable_data_ptr<float>(),
                                               {static_cast<int>(t.batch), static_cast<int>(t.channels),
                                                static_cast<int>(t.height), static_cast<int>(t.width)});
  auto err = e.set_input(et::EValue(*t.eval_images), 0);
  if (err != et::Error::Ok) fail(Code::Runtime, "cannot set the images of the evaluation method (" + et_error(err) + ")");
  for (size_t i = 0; i < t.trained.size(); ++i) {
    err = e.set_input(m.get_output(t.param_start + i), 1 + i);
    if (err != et::Error::Ok)
      fail(Code::Runtime, "cannot hand " + t.trained[i].name + " to the evaluation method (" + et_error(err) + ")");
  }
  t.eval_bound = true;
}

void bind_dataset(Trainer& t, rd_split split, const std::string& path) {
  if (split != RD_TRAIN && split != RD_TEST) fail(Code::Invalid, "unknown split");
  auto d = std::make_unique<Dataset>(path);
  const auto& h = d->header();
  if (h.channels != t.channels || h.height != t.height || h.width != t.width)
    fail(Code::Invalid, "dataset " + path + " holds " + std::to_string(h.channels) + " x " + std::to_string(h.height) + " x " +
                            std::to_string(h.width) + " images, the program trains " + std::to_string(t.channels) + " x " +
                            std::to_string(t.height) + " x " + std::to_string(t.width));
  if (h.num_classes != t.num_classes)
    fail(Code::Invalid, "dataset " + path + " has " + std::to_string(h.num_classes) + " classes, the program " +
                            std::to_string(t.num_classes));
  if (split == RD_TRAIN) {
    int64_t spe = static_cast<int64_t>(h.count) / t.batch;
    if (t.opt.steps_per_epoch > 0 && t.opt.steps_per_epoch < spe) spe = t.opt.steps_per_epoch;
    const json plan = t.meta.value("train", json::object());
    if (t.opt.steps_per_epoch <= 0 && plan.contains("steps_per_epoch") && !plan["steps_per_epoch"].is_null()) {
      int64_t cap = plan["steps_per_epoch"].get<int64_t>();
      if (cap > 0 && cap < spe) spe = cap;
    }
    if (spe < 1)
      fail(Code::Invalid, "dataset " + path + " has " + std::to_string(h.count) + " images, less than one batch of " +
                              std::to_string(t.batch));
    int64_t total = t.epochs * spe;
    int64_t max_steps = t.opt.max_steps > 0 ? t.opt.max_steps
                        : (plan.contains("max_steps") && !plan["max_steps"].is_null() ? plan["max_steps"].get<int64_t>() : 0);
    if (max_steps > 0 && max_steps < total) total = max_steps;
    t.steps_per_epoch = spe;
    t.total_steps = total;
    t.schedule.total_steps = total;
    t.order_epoch = -1;
  }
  t.data[split] = std::move(d);
}

static void fill_batch(Trainer& t, const Dataset& d, const uint32_t* indices, const bool* flips, int64_t n) {
  et::Method& m = *t.train->method;
  float* x = input_tensor(m, 0).mutable_data_ptr<float>();
  int64_t* y = input_tensor(m, 1).mutable_data_ptr<int64_t>();
  const size_t floats = d.image_floats();
  for (int64_t b = 0; b < t.batch; ++b) {
    if (b < n) {
      d.read_image(indices[b], x + b * floats, flips[b]);
      y[b] = d.label(indices[b]);
    } else {  // padding of a last partial evaluation batch (its outputs are ignored)
      std::memset(x + b * floats, 0, floats * sizeof(float));
      y[b] = 0;
    }
  }
}

static const Dataset& train_data(Trainer& t) {
  if (!t.data[RD_TRAIN]) fail(Code::Invalid, "no training dataset bound");
  return *t.data[RD_TRAIN];
}

static void ensure_order(Trainer& t) {
  const Dataset& d = train_data(t);
  if (t.order_epoch == t.epoch) return;
  if (t.opt.sequential) {
    t.order.resize(d.header().count);
    for (size_t i = 0; i < t.order.size(); ++i) t.order[i] = static_cast<uint32_t>(i);
  } else {
    t.order = epoch_order(t.opt.seed, static_cast<uint64_t>(t.epoch), d.header().count);
  }
  t.order_epoch = t.epoch;
}

static int32_t count_correct(const float* logits, const int64_t* labels, int64_t n, int64_t classes) {
  int32_t correct = 0;
  for (int64_t b = 0; b < n; ++b) {
    const float* row = logits + b * classes;
    int64_t best = 0;
    for (int64_t c = 1; c < classes; ++c)
      if (row[c] > row[best]) best = c;
    correct += best == labels[b];
  }
  return correct;
}

static void run_train_method(Trainer& t) {
  auto err = t.train->method->execute();
  t.train->temp_allocator->reset();  // kernels' scratch memory: nothing of it lives past the step
  if (err != et::Error::Ok) fail(Code::Runtime, "the training step failed in the runtime (" + et_error(err) + ")");
}

rd_step_info step(Trainer& t) {
  rd_step_info info{};
  const Dataset& d = train_data(t);
  info.total_steps = t.total_steps;
  info.steps_per_epoch = t.steps_per_epoch;
  if (t.step_count >= t.total_steps || t.epoch >= t.epochs) {
    info.done = 1;
    info.step = t.step_count;
    info.epoch = t.epoch;
    return info;
  }
  ensure_order(t);
  const double t0 = now_seconds();
  std::vector<bool> flip_v(static_cast<size_t>(t.batch));
  bool flips[4096];
  if (t.batch > 4096) fail(Code::Invalid, "batch size above 4096");
  const bool may_flip = d.hflip() && !t.opt.sequential;
  for (int64_t b = 0; b < t.batch; ++b)
    flips[b] = may_flip && epoch_flip(t.opt.seed, static_cast<uint64_t>(t.epoch), static_cast<uint64_t>(t.position + b));
  fill_batch(t, d, t.order.data() + t.position, flips, t.batch);
  et::Method& m = *t.train->method;
  // the labels, before the arena slot can be reused by the step
  std::vector<int64_t> labels(input_tensor(m, 1).const_data_ptr<int64_t>(),
                              input_tensor(m, 1).const_data_ptr<int64_t>() + t.batch);
  run_train_method(t);
  if (t.session_steps == 0 || t.session_steps == 9) memory_note(t.session_steps ? "tenth step run" : "first step run");
  const float loss = m.get_output(0).toTensor().const_data_ptr<float>()[0];
  const std::string at = " at step " + std::to_string(t.step_count + 1) + " (epoch " + std::to_string(t.epoch + 1) + ")";
  if (!std::isfinite(loss))
    fail(Code::NonFinite, std::string("the loss became non-finite (") + (std::isnan(loss) ? "nan" : "inf") + ")" + at);
  std::vector<const float*> grads;
  std::vector<size_t> sizes;
  for (size_t i = 0; i < t.trained.size(); ++i) {
    Tensor g = m.get_output(t.grad_start + i).toTensor();
    const float* gp = g.const_data_ptr<float>();
    for (size_t k = 0; k < t.trained[i].numel; ++k)
      if (!std::isfinite(gp[k])) fail(Code::NonFinite, "the gradient of " + t.trained[i].name + " became non-finite" + at);
    grads.push_back(gp);
    sizes.push_back(t.trained[i].numel);
  }
  const int32_t correct = count_correct(m.get_output(1).toTensor().const_data_ptr<float>(), labels.data(), t.batch,
                                        t.num_classes);
  if (t.clip_norm > 0) {
    const float c = static_cast<float>(clip_coefficient(grads, sizes, t.clip_norm));
    if (c < 1.0f)
      for (size_t i = 0; i < t.trained.size(); ++i) {
        float* g = m.get_output(t.grad_start + i).toTensor().mutable_data_ptr<float>();
        for (size_t k = 0; k < sizes[i]; ++k) g[k] = g[k] * c;
      }
  }
  const double factor = t.schedule.factor(t.step_count);
  for (size_t i = 0; i < t.trained.size(); ++i)
    t.optimizer->update(i, t.trained[i].data, grads[i], t.trained[i].lr * factor, t.step_count + 1);
  const double dt = now_seconds() - t0;
  t.step_count += 1;
  t.position += t.batch;
  t.epoch_loss_sum += static_cast<double>(loss) * static_cast<double>(t.batch);
  t.epoch_correct += correct;
  t.epoch_seen += t.batch;
  t.images += t.batch;
  t.train_seconds += dt;
  t.session_seconds += dt;
  t.session_steps += 1;
  info.step = t.step_count;
  info.loss = loss;
  info.lr = static_cast<float>(t.trained.empty() ? 0.0 : t.trained[0].lr * factor);
  info.correct = correct;
  info.step_seconds = dt;
  info.epoch_loss = t.epoch_loss_sum / static_cast<double>(t.epoch_seen);
  info.epoch_accuracy = static_cast<double>(t.epoch_correct) / static_cast<double>(t.epoch_seen);
  if (t.position / t.batch >= t.steps_per_epoch || t.step_count >= t.total_steps) {
    info.epoch_end = 1;
    t.epoch += 1;
    t.position = 0;
    t.epoch_loss_sum = 0;
    t.epoch_correct = t.epoch_seen = 0;
  }
  info.epoch = t.epoch;
  info.done = t.step_count >= t.total_steps || t.epoch >= t.epochs;
  return info;
}

rd_eval_result evaluate(Trainer& t, rd_split split) {
  if ((split != RD_TRAIN && split != RD_TEST) || !t.data[split]) fail(Code::Invalid, "no dataset bound for that split");
  const Dataset& d = *t.data[split];
  bind_eval_inputs(t);
  et::Method& e = *t.eval->method;
  const uint64_t n = d.header().count;
  std::vector<uint32_t> idx(static_cast<size_t>(t.batch));
  bool flips[4096] = {};
  double loss_sum = 0;
  int64_t correct = 0;
  std::vector<int64_t> labels(static_cast<size_t>(t.batch));
  for (uint64_t start = 0; start < n; start += static_cast<uint64_t>(t.batch)) {
    int64_t k = static_cast<int64_t>(std::min<uint64_t>(static_cast<uint64_t>(t.batch), n - start));
    for (int64_t b = 0; b < k; ++b) {
      idx[b] = static_cast<uint32_t>(start + b);
      labels[b] = d.label(start + b);
    }
    fill_batch(t, d, idx.data(), flips, k);
    auto err = e.execute();
    t.eval->temp_allocator->reset();
    if (err != et::Error::Ok) fail(Code::Runtime, "evaluation failed in the runtime (" + et_error(err) + ")");
    const float* logits = e.get_output(0).toTensor().const_data_ptr<float>();
    correct += count_correct(logits, labels.data(), k, t.num_classes);
    for (int64_t b = 0; b < k; ++b) {  // cross-entropy: logsumexp - logit of the label, in double
      const float* row = logits + b * t.num_classes;
      double mx = row[0];
      for (int64_t c = 1; c < t.num_classes; ++c) mx = std::max(mx, static_cast<double>(row[c]));
      double s = 0;
      for (int64_t c = 0; c < t.num_classes; ++c) s += std::exp(static_cast<double>(row[c]) - mx);
      loss_sum += mx + std::log(s) - row[labels[b]];
    }
  }
  rd_eval_result r{};
  r.images = static_cast<int64_t>(n);
  r.loss = loss_sum / static_cast<double>(n);
  r.accuracy = static_cast<double>(correct) / static_cast<double>(n);
  return r;
}

// ----------------------------------------------------------------------------- checkpoints
static constexpr char kCkptMagic[8] = {'R', 'P', 'N', 'C', 'K', 'P', 'T', '\0'};
static constexpr uint32_t kCkptVersion = 1;

// Checkpoint bytes straight into the temp file, hashed on the way (nothing of the tensors is copied).
struct Writer {
  AtomicFile file;
  Sha256 sha;
  explicit Writer(const std::string& path) : file(path) {}
  template <class T>
  void put(T v) {
    bytes(&v, sizeof v);
  }
  void bytes(const void* p, size_t n) {
    sha.update(p, n);
    file.write(p, n);
  }
  void str(const std::string& s) {
    put<uint32_t>(static_cast<uint32_t>(s.size()));
    bytes(s.data(), s.size());
  }
  void commit() {
    auto d = sha.digest();
    file.write(d.data(), d.size());
    file.commit();
  }
};

struct Reader {
  const std::string& in;
  size_t pos = 0;
  std::string path;
  template <class T>
  T get() {
    T v;
    take(&v, sizeof v);
    return v;
  }
  void take(void* p, size_t n) {
    if (pos + n > in.size()) fail(Code::Invalid, "checkpoint " + path + " is truncated");
    std::memcpy(p, in.data() + pos, n);
    pos += n;
  }
  std::string str() {
    uint32_t n = get<uint32_t>();
    if (n > 1u << 20) fail(Code::Invalid, "checkpoint " + path + " is damaged");
    std::string s(n, '\0');
    take(s.data(), n);
    return s;
  }
};

void save_checkpoint(Trainer& t, const std::string& path) {
  Writer w(path);
  w.bytes(kCkptMagic, 8);
  w.put<uint32_t>(kCkptVersion);
  w.put<uint32_t>(0);
  w.str(t.program_sha);
  w.put<uint64_t>(t.opt.seed);
  w.put<int64_t>(t.step_count);
  w.put<int64_t>(t.epoch);
  w.put<int64_t>(t.position);
  w.put<int64_t>(t.total_steps);
  w.put<uint64_t>(epoch_state(t.opt.seed, static_cast<uint64_t>(t.epoch)));  // the RNG of the epoch's order / flips
  w.put<double>(t.epoch_loss_sum);
  w.put<int64_t>(t.epoch_correct);
  w.put<int64_t>(t.epoch_seen);
  w.put<double>(t.train_seconds);
  w.put<int64_t>(t.images);
  w.str(t.optimizer->config().name);
  auto names = t.optimizer->state_names();
  w.put<uint32_t>(static_cast<uint32_t>(t.trained.size()));
  w.put<uint32_t>(static_cast<uint32_t>(names.size()));
  auto& st = t.optimizer->state();
  for (size_t i = 0; i < t.trained.size(); ++i) {
    const auto& tt = t.trained[i];
    w.str(tt.name);
    w.put<uint64_t>(tt.numel);
    w.put<uint8_t>(st[i].started ? 1 : 0);
    w.bytes(tt.data, tt.numel * sizeof(float));
    if (names.size() >= 1) w.bytes(st[i].a.data(), tt.numel * sizeof(float));
    if (names.size() >= 2) w.bytes(st[i].b.data(), tt.numel * sizeof(float));
  }
  w.commit();
}

bool resume(Trainer& t, const std::string& path, bool weights_only) {
  if (!file_exists(path)) return false;
  std::string raw = read_file(path, "checkpoint");
  if (raw.size() < 8 + 32 || std::memcmp(raw.data(), kCkptMagic, 8) != 0)
    fail(Code::Invalid, path + " is not a repnet-device checkpoint");
  {
    Sha256 h;
    h.update(raw.data(), raw.size() - 32);
    auto d = h.digest();
    if (std::memcmp(d.data(), raw.data() + raw.size() - 32, 32) != 0)
      fail(Code::Invalid, "checkpoint " + path + " is damaged (its checksum does not match its content)");
  }
  Reader r{raw, 8, path};
  if (r.get<uint32_t>() != kCkptVersion) fail(Code::Invalid, "checkpoint " + path + " has another format version");
  r.get<uint32_t>();
  if (r.str() != t.program_sha)
    fail(Code::Invalid, "checkpoint " + path + " belongs to another program (not " + t.pte_path + ")");
  const uint64_t seed = r.get<uint64_t>();
  const int64_t step_count = r.get<int64_t>(), epoch = r.get<int64_t>(), position = r.get<int64_t>();
  const int64_t total = r.get<int64_t>();
  const uint64_t rng = r.get<uint64_t>();
  if (seed != t.opt.seed && !weights_only)
    fail(Code::Invalid, "checkpoint " + path + " was made with seed " + std::to_string(seed) + ", not " + std::to_string(t.opt.seed));
  if (rng != epoch_state(seed, static_cast<uint64_t>(epoch))) fail(Code::Invalid, "checkpoint " + path + " is damaged (RNG state)");
  if (total != t.total_steps && !weights_only)
    fail(Code::Invalid, "cannot resume from " + path + ": the data or limits changed (" + std::to_string(total) +
                            " total steps recorded, " + std::to_string(t.total_steps) + " now)");
  if (position % t.batch != 0 || (!weights_only && position / t.batch > t.steps_per_epoch)) fail(Code::Invalid, "checkpoint " + path + " is damaged");
  const double loss_sum = r.get<double>();
  const int64_t correct = r.get<int64_t>(), seen = r.get<int64_t>();
  const double secs = r.get<double>();
  const int64_t images = r.get<int64_t>();
  if (r.str() != t.optimizer->config().name) fail(Code::Invalid, "checkpoint " + path + " was trained with another optimizer");
  const uint32_t n = r.get<uint32_t>(), k = r.get<uint32_t>();
  if (n != t.trained.size() || k != t.optimizer->state_names().size())
    fail(Code::Invalid, "checkpoint " + path + " does not fit this program");
  // read everything before changing anything
  std::vector<std::vector<float>> params(n), a(n), b(n);
  std::vector<uint8_t> started(n);
  for (uint32_t i = 0; i < n; ++i) {
    if (r.str() != t.trained[i].name || r.get<uint64_t>() != t.trained[i].numel)
      fail(Code::Invalid, "checkpoint " + path + " does not fit this program (tensor " + t.trained[i].name + ")");
    started[i] = r.get<uint8_t>();
    params[i].resize(t.trained[i].numel);
    r.take(params[i].data(), params[i].size() * sizeof(float));
    if (k >= 1) {
      a[i].resize(t.trained[i].numel);
      r.take(a[i].data(), a[i].size() * sizeof(float));
    }
    if (k >= 2) {
      b[i].resize(t.trained[i].numel);
      r.take(b[i].data(), b[i].size() * sizeof(float));
    }
  }
  if (r.pos != raw.size() - 32) fail(Code::Invalid, "checkpoint " + path + " is damaged (trailing bytes)");
  for (uint32_t i = 0; i < n; ++i) std::memcpy(t.trained[i].data, params[i].data(), params[i].size() * sizeof(float));
  if (weights_only) return true;
  auto& st = t.optimizer->state();
  for (uint32_t i = 0; i < n; ++i) {
    st[i].started = started[i] != 0;
    if (k >= 1) st[i].a = std::move(a[i]);
    if (k >= 2) st[i].b = std::move(b[i]);
  }
  t.step_count = step_count;
  t.epoch = epoch;
  t.position = position;
  t.epoch_loss_sum = loss_sum;
  t.epoch_correct = correct;
  t.epoch_seen = seen;
  t.train_seconds = secs;
  t.images = images;
  t.order_epoch = -1;
  return true;
}

// ----------------------------------------------------------------------------- adapters
void write_adapter(Trainer& t, const std::string& folder) {
  const json& config = need(t.meta, "adapter_config", t.meta_path);
  make_dirs(folder);
  std::vector<TensorView> views;
  for (const auto& tt : t.trained) views.push_back({tt.name, "F32", tt.shape, tt.data, tt.numel * sizeof(float)});
  write_safetensors(folder + "/adapter.safetensors", views);
  atomic_write(folder + "/config.json", config.dump(2));
}

void dump_gradients(Trainer& t, const std::string& path) {
  const Dataset& d = train_data(t);
  std::vector<uint32_t> idx(static_cast<size_t>(t.batch));
  bool flips[4096] = {};
  for (int64_t b = 0; b < t.batch; ++b) idx[b] = static_cast<uint32_t>(b % d.header().count);
  fill_batch(t, d, idx.data(), flips, t.batch);
  run_train_method(t);
  et::Method& m = *t.train->method;
  std::vector<TensorView> views;
  Tensor loss = m.get_output(0).toTensor();
  Tensor logits = m.get_output(1).toTensor();
  views.push_back({"loss", "F32", {}, loss.const_data_ptr<float>(), sizeof(float)});
  views.push_back({"logits", "F32", {t.batch, t.num_classes}, logits.const_data_ptr<float>(),
                   static_cast<size_t>(t.batch * t.num_classes) * sizeof(float)});
  for (size_t i = 0; i < t.trained.size(); ++i) {
    Tensor g = m.get_output(t.grad_start + i).toTensor();
    views.push_back({"grad." + t.trained[i].name, "F32", t.trained[i].shape, g.const_data_ptr<float>(),
                     t.trained[i].numel * sizeof(float)});
  }
  // the evaluation method on the same images (refilled: the step may have reused the input slot);
  // the training outputs are copied out first
  std::vector<float> train_logits(logits.const_data_ptr<float>(), logits.const_data_ptr<float>() + t.batch * t.num_classes);
  views[1].data = train_logits.data();
  std::vector<float> loss_v(1, loss.const_data_ptr<float>()[0]);
  views[0].data = loss_v.data();
  std::vector<std::vector<float>> grad_copies;
  for (size_t i = 2; i < views.size(); ++i) {
    const float* g = static_cast<const float*>(views[i].data);
    grad_copies.emplace_back(g, g + views[i].nbytes / sizeof(float));
  }
  for (size_t i = 2; i < views.size(); ++i) views[i].data = grad_copies[i - 2].data();
  fill_batch(t, d, idx.data(), flips, t.batch);
  bind_eval_inputs(t);
  auto err = t.eval->method->execute();
  if (err != et::Error::Ok) fail(Code::Runtime, "evaluation failed in the runtime (" + et_error(err) + ")");
  Tensor el = t.eval->method->get_output(0).toTensor();
  views.push_back({"eval_logits", "F32", {t.batch, t.num_classes}, el.const_data_ptr<float>(),
                   static_cast<size_t>(t.batch * t.num_classes) * sizeof(float)});
  write_safetensors(path, views);
}

rd_stats stats(const Trainer& t) {
  rd_stats s{};
  s.peak_rss_bytes = peak_rss_bytes();
  s.train_peak_rss_bytes = t.train_peak_rss > 0 ? t.train_peak_rss : s.peak_rss_bytes;
  s.train_seconds = t.train_seconds;
  s.images_per_second = t.train_seconds > 0 ? static_cast<double>(t.images) / t.train_seconds : 0;
  s.step_seconds = t.session_steps > 0 ? t.session_seconds / static_cast<double>(t.session_steps) : 0;
  s.arena_bytes = t.train->planned_bytes;
  if (t.eval) {
    s.eval_arena_bytes = t.eval->planned_bytes;
  } else if (auto em = t.program->method_meta(t.eval_name.c_str()); em.ok()) {
    for (size_t i = 0; i < em->num_memory_planned_buffers(); ++i) s.eval_arena_bytes += em->memory_planned_buffer_size(i).get();
  }
  const json mem = t.meta.value("memory", json::object());
  s.weights_bytes = mem.value("weights_bytes", static_cast<int64_t>(0));
  s.input_bytes = t.batch * t.channels * t.height * t.width * 4 + t.batch * 8;
  s.steps = t.step_count;
  s.scratch_peak_bytes = static_cast<int64_t>(t.train->temp_allocator->peak());
  s.epoch = t.epoch;
  return s;
}

void close_trainer(Trainer* t) { delete t; }

}  // namespace rd

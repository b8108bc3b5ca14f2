// Shared helpers of repnet's ExecuTorch kernels: argument unboxing, checks, the thread pool,
// per-thread scratch memory. Every kernel is a boxed ExecuTorch kernel
// (void(KernelRuntimeContext&, Span<EValue*>)): the stack holds the schema's arguments in order
// (out tensors last), then the returned values.
#pragma once

#include <executorch/runtime/core/evalue.h>
#include <executorch/runtime/kernel/kernel_includes.h>
#include <executorch/runtime/kernel/operator_registry.h>
#include <executorch/runtime/kernel/thread_parallel_interface.h>
#include <executorch/runtime/platform/log.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <vector>

#if defined(__SSE__) || defined(__x86_64__)
#include <xmmintrin.h>
#define REPNET_KERNELS_MXCSR 1
#endif

namespace repnet_kernels {

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::EValue;
using executorch::runtime::KernelRuntimeContext;
using executorch::runtime::Span;

// A failed check: log one line naming the kernel, mark the call failed (the method returns an
// error to its caller) and leave the kernel.
#define RK_CHECK(ctx, cond, ...)                                  \
  do {                                                            \
    if (!(cond)) {                                                \
      ET_LOG(Error, "repnet kernels: " __VA_ARGS__);              \
      (ctx).fail(executorch::runtime::Error::InvalidArgument);    \
      return;                                                     \
    }                                                             \
  } while (0)

inline const Tensor* opt_tensor(EValue* v) {
  return v->isNone() ? nullptr : &v->toTensor();
}

// A float tensor in the default (contiguous) dim order.
inline bool is_plain(const Tensor& t, ScalarType dtype) {
  return t.scalar_type() == dtype && executorch::runtime::tensor_is_default_dim_order(t);
}

// out takes `sizes` (memory-planned outputs already have them; a dynamic one is resized)
template <typename T>
inline bool resize_to(Tensor& out, const T* sizes, size_t n) {
  executorch::aten::SizesType s[8];
  if (n > 8) return false;
  for (size_t i = 0; i < n; ++i) s[i] = static_cast<executorch::aten::SizesType>(sizes[i]);
  return executorch::runtime::resize_tensor(out, {s, n}) == executorch::runtime::Error::Ok;
}

// Denormal floats flushed to zero (inputs and results) while a kernel runs: gradients deep in a
// frozen backbone can reach the denormal range, where x86 arithmetic is ~100x slower (eager
// PyTorch's oneDNN kernels run so too). Restores the thread's previous mode.
struct FlushDenormals {
#if REPNET_KERNELS_MXCSR
  unsigned saved;
  FlushDenormals() : saved(_mm_getcsr()) { _mm_setcsr(saved | 0x8040); }  // FTZ | DAZ
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

// Runs f(i) for i in [0, n) on ExecuTorch's thread pool (its size: the runtime's thread count).
template <typename F>
inline void parallel(int64_t n, const F& f) {
  if (n <= 0) return;
  if (n == 1) {
    f(int64_t(0));
    return;
  }
  executorch::extension::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
    FlushDenormals ftz;
    for (int64_t i = b; i < e; ++i) f(i);
  });
}

// Per-thread scratch, reused across calls (bounded: kernels tile their work so that a thread
// never needs more than a few hundred KB).
inline float* scratch(int slot, size_t n) {
  thread_local std::vector<float> buf[6];
  auto& b = buf[slot];
  if (b.size() < n) b.resize(n + 64);
  return b.data();
}

constexpr float kInf = INFINITY;

}  // namespace repnet_kernels

// Elementwise / mask / reduction kernels of frozen-backbone training programs:
//
//   repnet::mask_outside(x, lo, hi)  1-bit mask of (x <= lo) | (x >= hi), packed 8 per byte
//                                    (byte j, bit i = element 8j + i of the flat tensor): what a
//                                    ReLU / ReLU6 backward needs, made in one pass over x
//   repnet::mask_fill(x, mask, v)    x where the mask bit is clear, v where it is set (the
//                                    backward of that activation), in place when planned so
//   repnet::channel_sum(x)           sum over N, H, W of an NCHW tensor (a bias gradient)
#include "common.h"
#include "simd.h"

#include <cfloat>

namespace repnet_kernels {

namespace {
constexpr int64_t kChunk = 1 << 14;  // elements per parallel task (a multiple of 8)
}

// mask_outside(Tensor input, float lo, float hi, *, Tensor(a!) out): lo <= -FLT_MAX / hi >= FLT_MAX
// leaves that side out.
void mask_outside_out(KernelRuntimeContext& ctx, Span<EValue*> stack) {
  RK_CHECK(ctx, stack.size() >= 4, "mask_outside: expected 4 arguments, got %zu", stack.size());
  const Tensor& x = stack[0]->toTensor();
  const double lo_d = stack[1]->toDouble(), hi_d = stack[2]->toDouble();
  Tensor& out = stack[3]->toTensor();
  RK_CHECK(ctx, is_plain(x, ScalarType::Float) && x.numel() % 8 == 0, "mask_outside: input must be a contiguous "
           "float tensor with a multiple of 8 elements");
  const int64_t nbytes = x.numel() / 8;
  RK_CHECK(ctx, out.scalar_type() == ScalarType::Byte && out.dim() == 1 && resize_to(out, &nbytes, 1),
           "mask_outside: output must be uint8 [numel / 8]");
  const float lo = lo_d <= -FLT_MAX ? -kInf : static_cast<float>(lo_d);
  const float hi = hi_d >= FLT_MAX ? kInf : static_cast<float>(hi_d);
  const bool use_lo = lo_d > -FLT_MAX, use_hi = hi_d < FLT_MAX;
  const float* xp = x.const_data_ptr<float>();
  uint8_t* op = out.mutable_data_ptr<uint8_t>();
  const int64_t n = x.numel();
  parallel((n + kChunk - 1) / kChunk, [&](int64_t t) {
    const int64_t b0 = t * (kChunk / 8), b1 = std::min(nbytes, (t + 1) * (kChunk / 8));
    for (int64_t b = b0; b < b1; ++b) op[b] = pack8_outside(xp + 8 * b, lo, hi, use_lo, use_hi);
  });
}

// mask_fill(Tensor input, Tensor mask, float value, *, Tensor(a!) out)
void mask_fill_out(KernelRuntimeContext& ctx, Span<EValue*> stack) {
  RK_CHECK(ctx, stack.size() >= 4, "mask_fill: expected 4 arguments, got %zu", stack.size());
  const Tensor& x = stack[0]->toTensor();
  const Tensor& mask = stack[1]->toTensor();
  const float value = static_cast<float>(stack[2]->toDouble());
  Tensor& out = stack[3]->toTensor();
  RK_CHECK(ctx, is_plain(x, ScalarType::Float) && mask.scalar_type() == ScalarType::Byte &&
           mask.numel() * 8 == x.numel(), "mask_fill: input must be contiguous float, mask uint8 [numel / 8]");
  RK_CHECK(ctx, executorch::runtime::resize_tensor(out, x.sizes()) == executorch::runtime::Error::Ok &&
           is_plain(out, ScalarType::Float), "mask_fill: output must be float, shaped like the input");
  const float* xp = x.const_data_ptr<float>();
  const uint8_t* mp = mask.const_data_ptr<uint8_t>();
  float* op = out.mutable_data_ptr<float>();
  const int64_t n = x.numel();
  parallel((n + kChunk - 1) / kChunk, [&](int64_t t) {
    const int64_t e0 = t * kChunk, e1 = std::min(n, e0 + kChunk);
    fill_masked(xp + e0, op + e0, mp, e0, e1 - e0, value);
  });
}

// channel_sum(Tensor input, *, Tensor(a!) out): [N, C, ...] -> [C]
void channel_sum_out(KernelRuntimeContext& ctx, Span<EValue*> stack) {
  RK_CHECK(ctx, stack.size() >= 2, "channel_sum: expected 2 arguments, got %zu", stack.size());
  const Tensor& x = stack[0]->toTensor();
  Tensor& out = stack[1]->toTensor();
  RK_CHECK(ctx, is_plain(x, ScalarType::Float) && x.dim() >= 2, "channel_sum: input must be contiguous float "
           "[N, C, ...]");
  const int64_t n = x.size(0), c = x.size(1), hw = x.numel() / std::max<int64_t>(1, n * c);
  RK_CHECK(ctx, out.dim() == 1 && resize_to(out, &c, 1) && is_plain(out, ScalarType::Float),
           "channel_sum: output must be float [C]");
  const float* xp = x.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  parallel(c, [&](int64_t ch) {
    double total = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      const float* row = xp + (i * c + ch) * hw;
      float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // 8 lanes: vectorised, then summed in double
      int64_t e = 0;
      for (; e + 8 <= hw; e += 8)
        for (int l = 0; l < 8; ++l) part[l] += row[e + l];
      double s = 0.0;
      for (int l = 0; l < 8; ++l) s += part[l];
      for (; e < hw; ++e) s += row[e];
      total += s;
    }
    op[ch] = static_cast<float>(total);
  });
}

}  // namespace repnet_kernels

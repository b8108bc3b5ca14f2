// Bilinear resizing (F.interpolate(mode="bilinear"), what Rep-Net's modules use to bring their
// output to the backbone's map size) and its backward, NCHW fp32, one plane per task:
//
//   repnet::resize_bilinear(x, size, align_corners)
//   repnet::resize_bilinear_backward(grad, input_size, align_corners)
//
// Source coordinates as ATen's CPU kernel computes them (float): scale = in / out (or
// (in - 1) / (out - 1) with align_corners), src = max(scale * (dst + 0.5) - 0.5, 0) (or
// scale * dst), i0 = floor(src) (at most in - 1), i1 = i0 + 1 (at most in - 1), lambda = src - i0.
// The backward adds each output gradient, weighted, into its four sources, plane by plane in
// output order (deterministic).
#include "common.h"

namespace repnet_kernels {
namespace {

struct Taps {
  std::vector<int64_t> i0, i1;
  std::vector<float> l0, l1;
};

Taps taps(int64_t in, int64_t out, bool align_corners) {
  Taps t;
  t.i0.resize(size_t(out));
  t.i1.resize(size_t(out));
  t.l0.resize(size_t(out));
  t.l1.resize(size_t(out));
  float scale;
  if (align_corners) scale = out > 1 ? static_cast<float>(in - 1) / static_cast<float>(out - 1) : 0.0f;
  else scale = static_cast<float>(in) / static_cast<float>(out);
  for (int64_t d = 0; d < out; ++d) {
    float src = align_corners ? scale * static_cast<float>(d) : scale * (static_cast<float>(d) + 0.5f) - 0.5f;
    if (src < 0.0f) src = 0.0f;
    int64_t i0 = std::min<int64_t>(static_cast<int64_t>(src), in - 1);
    float l1 = std::min(std::max(src - static_cast<float>(i0), 0.0f), 1.0f);
    t.i0[size_t(d)] = i0;
    t.i1[size_t(d)] = i0 + (i0 < in - 1 ? 1 : 0);
    t.l1[size_t(d)] = l1;
    t.l0[size_t(d)] = 1.0f - l1;
  }
  return t;
}

}  // namespace

// resize_bilinear(Tensor input, int[] size, bool align_corners, *, Tensor(a!) out)
void resize_bilinear_out(KernelRuntimeContext& ctx, Span<EValue*> stack) {
  RK_CHECK(ctx, stack.size() >= 4, "resize_bilinear: expected 4 arguments, got %zu", stack.size());
  const Tensor& x = stack[0]->toTensor();
  auto size = stack[1]->toIntList();
  const bool ac = stack[2]->toBool();
  Tensor& out = stack[3]->toTensor();
  RK_CHECK(ctx, is_plain(x, ScalarType::Float) && x.dim() == 4 && size.size() == 2 && size[0] > 0 && size[1] > 0,
           "resize_bilinear: input must be contiguous float NCHW, size [H, W]");
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3), ho = size[0], wo = size[1];
  const int64_t osz[4] = {n, c, ho, wo};
  RK_CHECK(ctx, resize_to(out, osz, 4) && is_plain(out, ScalarType::Float), "resize_bilinear: bad output");
  const Taps th = taps(h, ho, ac), tw = taps(w, wo, ac);
  const float* xp = x.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  parallel(n * c, [&](int64_t p) {
    const float* src = xp + p * h * w;
    float* dst = op + p * ho * wo;
    for (int64_t oh = 0; oh < ho; ++oh) {
      const float* r0 = src + th.i0[size_t(oh)] * w;
      const float* r1 = src + th.i1[size_t(oh)] * w;
      const float h0 = th.l0[size_t(oh)], h1 = th.l1[size_t(oh)];
      float* d = dst + oh * wo;
      for (int64_t ow = 0; ow < wo; ++ow) {
        const int64_t a = tw.i0[size_t(ow)], b = tw.i1[size_t(ow)];
        const float w0 = tw.l0[size_t(ow)], w1 = tw.l1[size_t(ow)];
        d[ow] = h0 * (w0 * r0[a] + w1 * r0[b]) + h1 * (w0 * r1[a] + w1 * r1[b]);
      }
    }
  });
}

// resize_bilinear_backward(Tensor grad_output, int[] input_size, bool align_corners, *, Tensor(a!) out)
void resize_bilinear_backward_out(KernelRuntimeContext& ctx, Span<EValue*> stack) {
  RK_CHECK(ctx, stack.size() >= 4, "resize_bilinear_backward: expected 4 arguments, got %zu", stack.size());
  const Tensor& g = stack[0]->toTensor();
  auto isz = stack[1]->toIntList();
  const bool ac = stack[2]->toBool();
  Tensor& out = stack[3]->toTensor();
  RK_CHECK(ctx, is_plain(g, ScalarType::Float) && g.dim() == 4 && isz.size() == 4 && isz[0] == g.size(0) &&
           isz[1] == g.size(1), "resize_bilinear_backward: grad must be contiguous float NCHW, input_size [N, C, H, W]");
  RK_CHECK(ctx, resize_to(out, isz.data(), 4) && is_plain(out, ScalarType::Float), "resize_bilinear_backward: bad "
           "output");
  const int64_t n = g.size(0), c = g.size(1), ho = g.size(2), wo = g.size(3), h = isz[2], w = isz[3];
  const Taps th = taps(h, ho, ac), tw = taps(w, wo, ac);
  const float* gp = g.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  parallel(n * c, [&](int64_t p) {
    const float* src = gp + p * ho * wo;
    float* dst = op + p * h * w;
    std::memset(dst, 0, sizeof(float) * size_t(h * w));
    for (int64_t oh = 0; oh < ho; ++oh) {
      float* r0 = dst + th.i0[size_t(oh)] * w;
      float* r1 = dst + th.i1[size_t(oh)] * w;
      const float h0 = th.l0[size_t(oh)], h1 = th.l1[size_t(oh)];
      const float* s = src + oh * wo;
      for (int64_t ow = 0; ow < wo; ++ow) {
        const int64_t a = tw.i0[size_t(ow)], b = tw.i1[size_t(ow)];
        const float w0 = tw.l0[size_t(ow)], w1 = tw.l1[size_t(ow)];
        const float v = s[ow];
        r0[a] += h0 * w0 * v;
        r0[b] += h0 * w1 * v;
        r1[a] += h1 * w0 * v;
        r1[b] += h1 * w1 * v;
      }
    }
  });
}

}  // namespace repnet_kernels

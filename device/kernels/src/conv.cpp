// Convolutions of frozen-backbone training (NCHW, fp32 activations, fp32 accumulation):
//
//   repnet::conv2d             forward, weights fp32 or int8 codes + a scale per output channel,
//                              with an optional fused eval-mode batch norm and clamp (ReLU / ReLU6)
//   repnet::conv2d_input_grad  the input gradient (a transposed convolution of the output
//                              gradient), with an optional per-output-channel factor folded into
//                              the weights (a frozen batch norm's backward) and an optional 1-bit
//                              mask applied to the result (a ReLU6's backward)
//   repnet::conv2d_weight_grad the weight gradient of a trained convolution
//
// All three run one "direct convolution" engine: destination channel rows = effective weight
// rows x columns of the (virtual) source. The input gradient is a stride-1 convolution of the
// output gradient, zero-inserted by the stride and padded, with the weights flipped and
// transposed; nothing of that is materialised beyond a tile. Two paths:
//   * depthwise (one source channel per destination channel): per plane, a padded copy of the
//     source plane (columns split by parity for stride 2), rows accumulated with vectorised
//     multiply-adds;
//   * everything else: tiles of destination positions, the weight block dequantised into
//     per-thread scratch, im2col columns (none for a 1x1 stride-1 conv: the source rows
//     themselves), an Eigen GEMM, and the epilogue on the tile while it is in cache.
// Work is split into independent tiles run on ExecuTorch's thread pool.
#include "common.h"
#include "simd.h"

#include <Eigen/Core>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace repnet_kernels {
namespace {

using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MapC = Eigen::Map<const RowMat, 0, Eigen::OuterStride<>>;
using MapM = Eigen::Map<RowMat, 0, Eigen::OuterStride<>>;

// A convolution weight [Co, Ci/groups, kh, kw]: fp32, or int8 codes with a scale per output
// channel (w = code * scale); `extra` (optional, [Co]) multiplies output channel co's weights.
struct Weight {
  const float* f = nullptr;
  const int8_t* q = nullptr;
  const float* scale = nullptr;
  const float* extra = nullptr;
  int64_t co = 0, cig = 0, kh = 0, kw = 0;
  int64_t k() const { return cig * kh * kw; }
  inline float at(int64_t o, int64_t idx) const {
    float v = f ? f[o * k() + idx] : static_cast<float>(q[o * k() + idx]) * scale[o];
    return extra ? v * extra[o] : v;
  }
};

// dest[n, cd, oh, ow] = sum over (cs in the group, i, j) of weff[cd][cs, i, j] * V[n, cs, vh, vw]
// with vh = oh * sh + i * dh - ph (likewise w), V[v] = src[v / u] where v % u == 0 (zero
// elsewhere and outside the source).
struct Geom {
  int64_t n = 0;
  int64_t cs = 0, hs = 0, ws = 0;  // source
  int64_t cd = 0, hd = 0, wd = 0;  // destination
  int64_t groups = 1, kh = 1, kw = 1;
  int64_t sh = 1, sw = 1, ph = 0, pw = 0, dh = 1, dw = 1, uh = 1, uw = 1;
  bool transposed = false;  // weff is the forward weight flipped and transposed (input gradient)
  int64_t csg() const { return cs / groups; }
  int64_t cdg() const { return cd / groups; }
  int64_t k() const { return csg() * kh * kw; }
  bool identity_cols() const {  // a 1x1 stride-1 conv: the columns are the source rows
    return kh == 1 && kw == 1 && sh == 1 && sw == 1 && ph == 0 && pw == 0 && uh == 1 && uw == 1 &&
        hd == hs && wd == ws;
  }
};

// Effective weight row of destination channel `d` (global), entry (s_g, i, j) of its group.
inline float weff(const Weight& w, const Geom& g, int64_t d, int64_t s, int64_t i, int64_t j) {
  if (!g.transposed) return w.at(d, (s * g.kh + i) * g.kw + j);
  const int64_t grp = d / g.cdg();
  const int64_t co = grp * g.csg() + s;  // the forward conv's output channel
  const int64_t ci = d - grp * g.cdg();  // the forward conv's input channel within its group
  return w.at(co, (ci * g.kh + (g.kh - 1 - i)) * g.kw + (g.kw - 1 - j));
}

// What happens to a destination row segment once computed.
struct Epilogue {
  const float* bias = nullptr;  // [Cd]
  const float* mul = nullptr;   // [Cd] affine (a fused batch norm): v * mul + add
  const float* add = nullptr;
  float lo = -kInf, hi = kInf;  // clamp
  bool clamp_lo = false, clamp_hi = false;
  const uint8_t* mask = nullptr;  // 1 bit per destination element (flat NCHW): set -> 0
  int64_t mask_bytes = 0;
  // 1-bit mask of the result, (v <= bits_lo) | (v >= bits_hi), written for whole bytes (a plane's size
  // is a multiple of 8)
  uint8_t* bits_out = nullptr;
  float bits_lo = 0.0f, bits_hi = 0.0f;
  bool bits_use_lo = false, bits_use_hi = false;
  inline void bits(const float* row, int64_t flat0, int64_t len) const {
    for (int64_t i = 0; i + 8 <= len; i += 8)
      bits_out[(flat0 + i) >> 3] = pack8_outside(row + i, bits_lo, bits_hi, bits_use_lo, bits_use_hi);
  }
  // row: destination values of channel c at flat positions [flat0, flat0 + len)
  inline void apply(float* row, int64_t c, int64_t flat0, int64_t len) const {
    if (bias) {
      const float b = bias[c];
      for (int64_t i = 0; i < len; ++i) row[i] += b;
    }
    if (mul) {
      const float a = mul[c], b = add[c];
      for (int64_t i = 0; i < len; ++i) row[i] = row[i] * a + b;
    }
    if (clamp_lo) {
      const float l = lo;
      for (int64_t i = 0; i < len; ++i) row[i] = row[i] < l ? l : row[i];
    }
    if (clamp_hi) {
      const float h = hi;
      for (int64_t i = 0; i < len; ++i) row[i] = row[i] > h ? h : row[i];
    }
    if (mask) fill_masked(row, row, mask, flat0, len, 0.0f);
  }
};

// ---------------------------------------------------------------------------- depthwise path
bool is_depthwise(const Geom& g) {
  return g.groups == g.cs && g.groups == g.cd && g.dh == 1 && g.dw == 1;
}

constexpr int64_t kBlock = 16;  // destination columns per register block

// The padded source plane P[i][j] = V[i - ph][j - pw] (rows 0 .. PH), its columns split by parity
// for a stride-2 conv (evens at [0, half), odds at [half, 2 half)) so that every tap of a block
// of destination columns reads contiguously; wide enough that a block never reads past a row.
struct Plane {
  float* data;
  int64_t ld, half, rows;
};

Plane make_plane(const float* src, const Geom& g) {
  Plane pl;
  pl.rows = (g.hd - 1) * g.sh + g.kh;
  const int64_t wpad = (g.wd + kBlock - 1) / kBlock * kBlock;  // destination columns, rounded to blocks
  if (g.sw == 2) {
    pl.half = wpad + g.kw;
    pl.ld = 2 * pl.half;
  } else {
    pl.half = 0;
    pl.ld = wpad * g.sw + g.kw;
  }
  pl.data = scratch(0, size_t(pl.rows * pl.ld));
  const int64_t cols = g.sw == 2 ? 2 * pl.half : pl.ld;  // padded source columns represented
  for (int64_t i = 0; i < pl.rows; ++i) {
    float* prow = pl.data + i * pl.ld;
    const int64_t vh = i - g.ph;
    const bool row_in = vh >= 0 && vh % g.uh == 0 && vh / g.uh < g.hs;
    if (!row_in) {
      std::memset(prow, 0, sizeof(float) * size_t(pl.ld));
      continue;
    }
    const float* srow = src + (vh / g.uh) * g.ws;
    if (g.uw == 1 && g.sw != 2) {  // zeros, the source row, zeros
      const int64_t lo = std::min(g.pw, cols), hi = std::min(cols, g.pw + g.ws);
      std::memset(prow, 0, sizeof(float) * size_t(lo));
      if (hi > lo) std::memcpy(prow + lo, srow, sizeof(float) * size_t(hi - lo));
      if (cols > hi) std::memset(prow + hi, 0, sizeof(float) * size_t(cols - std::max(hi, lo)));
    } else if (g.uw == 1) {  // stride 2: deinterleaved
      float* ev = prow;
      float* od = prow + pl.half;
      // k with both 2k - pw and 2k + 1 - pw inside the row: a branch-free (vectorisable) middle
      const int64_t k0 = std::min(pl.half, (g.pw + 1) / 2), k1 = std::max(k0, std::min(pl.half, (g.ws + g.pw - 1) / 2));
      for (int64_t k = 0; k < k0; ++k) {
        const int64_t x0 = 2 * k - g.pw, x1 = x0 + 1;
        ev[k] = (x0 >= 0 && x0 < g.ws) ? srow[x0] : 0.0f;
        od[k] = (x1 >= 0 && x1 < g.ws) ? srow[x1] : 0.0f;
      }
      const float* sp = srow + 2 * k0 - g.pw;
      for (int64_t k = k0; k < k1; ++k) {
        ev[k] = sp[2 * (k - k0)];
        od[k] = sp[2 * (k - k0) + 1];
      }
      for (int64_t k = k1; k < pl.half; ++k) {
        const int64_t x0 = 2 * k - g.pw, x1 = x0 + 1;
        ev[k] = (x0 >= 0 && x0 < g.ws) ? srow[x0] : 0.0f;
        od[k] = (x1 >= 0 && x1 < g.ws) ? srow[x1] : 0.0f;
      }
    } else {  // zero-inserted source (an input gradient of a strided conv)
      std::memset(prow, 0, sizeof(float) * size_t(pl.ld));
      for (int64_t x = 0; x < g.ws; ++x) {
        const int64_t j = x * g.uw + g.pw;
        if (j >= cols) break;
        if (g.sw == 2) prow[(j & 1) * pl.half + (j >> 1)] = srow[x];
        else prow[j] = srow[x];
      }
    }
  }
  return pl;
}

// 16 floats (one AVX-512 register, two AVX2 ones, four NEON ones): GCC / Clang vector extensions
typedef float vf16 __attribute__((vector_size(64)));
inline vf16 load16(const float* p) {
  vf16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store16(float* p, vf16 v) { std::memcpy(p, &v, sizeof v); }
typedef int32_t vi16 __attribute__((vector_size(64)));
static_assert(kBlock == 16, "one vf16 per block");

// the first n (< 16) lanes of v to p
inline void store_first(float* p, vf16 v, int64_t n) {
#if defined(__AVX512F__)
  _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), reinterpret_cast<__m512&>(v));
#else
  for (int64_t l = 0; l < n; ++l) p[l] = v[l];
#endif
}

// 16 bits of a 1-bit mask starting at bit f (bit i of byte j: element 8j + i)
inline uint32_t mask16(const uint8_t* m, int64_t nbytes, int64_t f) {
  const int64_t b = f >> 3;
  uint32_t word = 0;
  if (b + 4 <= nbytes) std::memcpy(&word, m + b, 4);
  else
    for (int64_t k = 0; k < 4 && b + k < nbytes; ++k) word |= uint32_t(m[b + k]) << (8 * k);
  return (word >> (f & 7)) & 0xFFFFu;
}

// destination plane from P: blocks of 16 columns accumulated in registers over the taps, the
// epilogue's per-channel affine + clamp applied in registers
template <int KH, int KW, int SW>
void dw_plane(const Plane& pl, const float* w, float* dst, const Geom& g, const Epilogue& ep, int64_t c,
              int64_t flat0) {
  const int64_t kh = KH ? KH : g.kh, kw = KW ? KW : g.kw, sw = SW ? SW : g.sw;
  const int64_t ld = pl.ld, half = pl.half;
  const float bias = ep.bias ? ep.bias[c] : 0.0f;
  const float mul = ep.mul ? ep.mul[c] : 1.0f, add = ep.mul ? ep.add[c] : 0.0f;
  const bool affine = ep.mul != nullptr, biased = ep.bias != nullptr;
  const vf16 lo = vf16{} + ep.lo, hi = vf16{} + ep.hi;
  for (int64_t oh = 0; oh < g.hd; ++oh) {
    const float* base = pl.data + oh * g.sh * ld;
    float* drow = dst + oh * g.wd;
    for (int64_t x0 = 0; x0 < g.wd; x0 += kBlock) {
      vf16 acc = {};
      for (int64_t i = 0; i < kh; ++i) {
        const float* prow = base + i * ld;
        for (int64_t j = 0; j < kw; ++j) {
          const float wv = w[i * kw + j];
          if (sw == 2) acc += wv * load16(prow + (j & 1) * half + (j >> 1) + x0);
          else if (sw == 1) acc += wv * load16(prow + j + x0);
          else {
            const float* s = prow + j + x0 * sw;
            vf16 v;
            for (int l = 0; l < 16; ++l) v[l] = s[l * sw];
            acc += wv * v;
          }
        }
      }
      if (biased) acc += bias;
      if (affine) acc = acc * mul + add;
      if (ep.clamp_lo) acc = acc < lo ? lo : acc;
      if (ep.clamp_hi) acc = acc > hi ? hi : acc;
      if (ep.mask) {  // lanes whose mask bit is set -> 0
        const vi16 lanes = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768};
        const vi16 set = (vi16{} + int32_t(mask16(ep.mask, ep.mask_bytes, flat0 + oh * g.wd + x0))) & lanes;
        acc = set != 0 ? vf16{} : acc;
      }
      const int64_t n = std::min(kBlock, g.wd - x0);
      if (n == kBlock) store16(drow + x0, acc);
      else store_first(drow + x0, acc, n);
    }
  }
}

using PlaneFn = void (*)(const Plane&, const float*, float*, const Geom&, const Epilogue&, int64_t, int64_t);

template <int K>
PlaneFn pick_stride(int64_t sw) {
  if (sw == 1) return dw_plane<K, K, 1>;
  if (sw == 2) return dw_plane<K, K, 2>;
  return dw_plane<K, K, 0>;
}

PlaneFn pick_plane_fn(const Geom& g) {
  if (g.kh == g.kw) {
    switch (g.kh) {
      case 1: return pick_stride<1>(g.sw);
      case 2: return pick_stride<2>(g.sw);
      case 3: return pick_stride<3>(g.sw);
      case 4: return pick_stride<4>(g.sw);
      case 5: return pick_stride<5>(g.sw);
      case 7: return pick_stride<7>(g.sw);
      default: break;
    }
  }
  return g.sw == 2 ? dw_plane<0, 0, 2> : g.sw == 1 ? dw_plane<0, 0, 1> : dw_plane<0, 0, 0>;
}

void run_depthwise(const float* src, float* dst, const Weight& w, const Geom& g, const Epilogue& ep) {
  const int64_t planes = g.n * g.cd;
  const PlaneFn fn = pick_plane_fn(g);
  parallel(planes, [&](int64_t t) {
    const int64_t c = t % g.cd;
    float wk[64];
    const int64_t kk = g.kh * g.kw;
    float* wp = kk <= 64 ? wk : scratch(2, size_t(kk));
    // channel c's kernel (flipped for an input gradient), dequantised as the graph would: code * scale
    const float extra = w.extra ? w.extra[c] : 1.0f;
    for (int64_t e = 0; e < kk; ++e) {
      const int64_t src_e = g.transposed ? kk - 1 - e : e;
      const float v = w.f ? w.f[c * kk + src_e] : static_cast<float>(w.q[c * kk + src_e]) * w.scale[c];
      wp[e] = w.extra ? v * extra : v;
    }
    const Plane pl = make_plane(src + t * g.hs * g.ws, g);
    fn(pl, wp, dst + t * g.hd * g.wd, g, ep, c, t * g.hd * g.wd);
    if (ep.bits_out) ep.bits(dst + t * g.hd * g.wd, t * g.hd * g.wd, g.hd * g.wd);
  });
}

// ---------------------------------------------------------------------------- GEMM path
// columns [k, tp] of destination positions [p0, p0 + tp) of image n, group grp
void im2col(const float* src_n, float* cols, const Geom& g, int64_t grp, int64_t p0, int64_t tp) {
  const int64_t hw = g.hs * g.ws;
  int64_t r = 0;
  for (int64_t s = 0; s < g.csg(); ++s) {
    const float* plane = src_n + (grp * g.csg() + s) * hw;
    for (int64_t i = 0; i < g.kh; ++i) {
      for (int64_t j = 0; j < g.kw; ++j, ++r) {
        float* out = cols + r * tp;
        int64_t q = 0, oh = p0 / g.wd, ow = p0 % g.wd;
        while (q < tp) {  // one destination row segment at a time
          const int64_t len = std::min(g.wd - ow, tp - q);
          const int64_t vh = oh * g.sh + i * g.dh - g.ph;
          float* o = out + q;
          if (vh < 0 || vh % g.uh || vh / g.uh >= g.hs) {
            std::memset(o, 0, sizeof(float) * size_t(len));
          } else {
            const float* row = plane + (vh / g.uh) * g.ws;
            const int64_t off = j * g.dw - g.pw;  // vw = (ow + t) * sw + off
            if (g.uw == 1) {
              // valid t: 0 <= (ow + t) * sw + off < ws
              int64_t t0 = 0, t1 = len;
              while (t0 < len && (ow + t0) * g.sw + off < 0) ++t0;
              while (t1 > t0 && (ow + t1 - 1) * g.sw + off >= g.ws) --t1;
              for (int64_t t = 0; t < t0; ++t) o[t] = 0.0f;
              const float* rs = row + (ow + t0) * g.sw + off;
              if (g.sw == 1) std::memcpy(o + t0, rs, sizeof(float) * size_t(t1 - t0));
              else
                for (int64_t t = t0; t < t1; ++t) o[t] = rs[(t - t0) * g.sw];
              for (int64_t t = t1; t < len; ++t) o[t] = 0.0f;
            } else {
              for (int64_t t = 0; t < len; ++t) {
                const int64_t vw = (ow + t) * g.sw + off;
                o[t] = (vw >= 0 && vw % g.uw == 0 && vw / g.uw < g.ws) ? row[vw / g.uw] : 0.0f;
              }
            }
          }
          q += len;
          ow = 0;
          ++oh;
        }
      }
    }
  }
}

struct Tiling {
  int64_t rows, nrb, tp, ntp;
};

Tiling gemm_tiling(const Geom& g) {
  const int64_t k = g.k(), p = g.hd * g.wd;
  Tiling t;
  t.rows = std::min<int64_t>(g.cdg(), std::max<int64_t>(16, 65536 / std::max<int64_t>(k, 1)));
  t.nrb = (g.cdg() + t.rows - 1) / t.rows;
  int64_t tp = std::max<int64_t>(64, 131072 / t.rows);  // a destination tile of <= 512 KB
  if (!g.identity_cols()) tp = std::min(tp, std::max<int64_t>(16, 65536 / std::max<int64_t>(k, 1)));
  tp = std::min(p, (tp + 15) / 16 * 16);
  t.tp = tp;
  t.ntp = (p + tp - 1) / tp;
  return t;
}

// rows [d0, d0 + rows) of the effective weight matrix (destination channel x k), dequantised
void weight_block(const Weight& w, const Geom& g, int64_t d0, int64_t rows, float* wb) {
  const int64_t k = g.k();
  for (int64_t r = 0; r < rows; ++r) {
    float* row = wb + r * k;
    const int64_t d = d0 + r;
    if (!g.transposed) {
      if (w.f) std::memcpy(row, w.f + d * k, sizeof(float) * size_t(k));
      else {
        const int8_t* qr = w.q + d * k;
        const float s = w.scale[d];
        for (int64_t e = 0; e < k; ++e) row[e] = static_cast<float>(qr[e]) * s;
      }
      if (w.extra) {
        const float a = w.extra[d];
        for (int64_t e = 0; e < k; ++e) row[e] *= a;
      }
      continue;
    }
    const int64_t grp = d / g.cdg(), ci = d - grp * g.cdg(), kk = g.kh * g.kw;
    for (int64_t s = 0; s < g.csg(); ++s) {
      const int64_t co = grp * g.csg() + s;
      const int64_t base = co * w.k() + ci * kk;
      float f = w.extra ? w.extra[co] : 1.0f;
      if (w.q) f *= w.scale[co];
      float* out = row + s * kk;
      for (int64_t i = 0; i < g.kh; ++i)
        for (int64_t j = 0; j < g.kw; ++j) {
          const int64_t e = base + (g.kh - 1 - i) * g.kw + (g.kw - 1 - j);
          // same rounding as the graph's dequantisation (code * scale) before the extra factor
          out[i * g.kw + j] = w.q ? (w.extra ? static_cast<float>(w.q[e]) * w.scale[co] * w.extra[co]
                                             : static_cast<float>(w.q[e]) * w.scale[co])
                                  : w.f[e] * f;
        }
    }
  }
}

// The input gradient of a 1x1 conv reads weight columns: dequantise the forward weight's rows
// instead ([k = source channels of the group] x rows, contiguous reads) and multiply by its transpose.
void weight_block_t(const Weight& w, const Geom& g, int64_t d0, int64_t rows, float* wt) {
  const int64_t grp = d0 / g.cdg(), ci0 = d0 - grp * g.cdg();
  for (int64_t s = 0; s < g.csg(); ++s) {
    const int64_t co = grp * g.csg() + s;
    float* row = wt + s * rows;
    float f = w.extra ? w.extra[co] : 1.0f;
    if (w.f) {
      const float* src = w.f + co * w.k() + ci0;
      for (int64_t r = 0; r < rows; ++r) row[r] = src[r] * f;
    } else {
      const int8_t* src = w.q + co * w.k() + ci0;
      const float sc = w.scale[co];
      if (w.extra)
        for (int64_t r = 0; r < rows; ++r) row[r] = static_cast<float>(src[r]) * sc * f;
      else
        for (int64_t r = 0; r < rows; ++r) row[r] = static_cast<float>(src[r]) * sc;
    }
  }
}

void run_gemm(const float* src, float* dst, const Weight& w, const Geom& g, const Epilogue& ep) {
  const int64_t k = g.k(), p = g.hd * g.wd, hw = g.hs * g.ws;
  const Tiling t = gemm_tiling(g);
  const bool columns = g.transposed && g.kh == 1 && g.kw == 1;  // weff = a transposed block of W
  // a task: one weight block (dequantised once) x a run of (image, position tile) items; no more
  // runs than needed for the threads, and each of at least ~2K destination columns (dequantising is
  // then a small part of the work)
  const int64_t items = g.n * t.ntp, blocks = g.groups * t.nrb;
  const int64_t threads = std::max<int64_t>(1, executorch::extension::get_thread_count());
  const int64_t by_work = std::max<int64_t>(1, items * t.tp / 2048);
  const int64_t chunks = std::min({items, by_work, std::max<int64_t>(1, (4 * threads + blocks - 1) / blocks)});
  const int64_t per_chunk = (items + chunks - 1) / chunks;
  parallel(blocks * chunks, [&](int64_t task) {
    const int64_t block = task / chunks, chunk = task % chunks;
    const int64_t grp = block / t.nrb, rb = block % t.nrb;
    const int64_t d0 = grp * g.cdg() + rb * t.rows;
    const int64_t rows = std::min(t.rows, (grp + 1) * g.cdg() - d0);
    float* wb = scratch(0, size_t(rows * k));
    if (columns) weight_block_t(w, g, d0, rows, wb);
    else weight_block(w, g, d0, rows, wb);
    // A = rows x k: the block, or the transpose of the (k x rows) block of W
    const MapC Arow(wb, rows, k, Eigen::OuterStride<>(k));
    const MapC Acol(wb, k, rows, Eigen::OuterStride<>(rows));
    for (int64_t item = chunk * per_chunk; item < std::min(items, (chunk + 1) * per_chunk); ++item) {
      const int64_t n = item / t.ntp, it = item % t.ntp;
      const int64_t p0 = it * t.tp, tp = std::min(t.tp, p - p0);
      const float* src_n = src + n * g.cs * hw;
      const float* bptr;
      int64_t ldb;
      if (g.identity_cols()) {
        bptr = src_n + grp * g.csg() * hw + p0;
        ldb = hw;
      } else {
        float* cols = scratch(1, size_t(k * tp));
        im2col(src_n, cols, g, grp, p0, tp);
        bptr = cols;
        ldb = tp;
      }
      float* out = dst + (n * g.cd + d0) * p + p0;
      MapM C(out, rows, tp, Eigen::OuterStride<>(p));
      const MapC B(bptr, k, tp, Eigen::OuterStride<>(ldb));
      if (columns) C.noalias() = Acol.transpose() * B;
      else C.noalias() = Arow * B;
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t flat = (n * g.cd + d0 + r) * p + p0;
        ep.apply(out + r * p, d0 + r, flat, tp);
        if (ep.bits_out) ep.bits(out + r * p, flat, tp);
      }
    }
  });
}

void run_conv(const float* src, float* dst, const Weight& w, const Geom& g, const Epilogue& ep) {
  if (is_depthwise(g)) run_depthwise(src, dst, w, g, ep);
  else run_gemm(src, dst, w, g, ep);
}

// ---------------------------------------------------------------------------- argument checks
bool read_pair(EValue* v, int64_t out[2]) {
  auto l = v->toIntList();
  if (l.size() == 1) out[0] = out[1] = l[0];
  else if (l.size() == 2) {
    out[0] = l[0];
    out[1] = l[1];
  } else return false;
  return true;
}

// weight (fp32, or int8 + a fp32 scale per output channel) -> Weight
bool read_weight(KernelRuntimeContext& ctx, const Tensor& wt, const Tensor* scale, Weight& w) {
  if (wt.dim() != 4 || !executorch::runtime::tensor_is_default_dim_order(wt)) return false;
  w.co = wt.size(0);
  w.cig = wt.size(1);
  w.kh = wt.size(2);
  w.kw = wt.size(3);
  if (wt.scalar_type() == ScalarType::Float && scale == nullptr) {
    w.f = wt.const_data_ptr<float>();
    return true;
  }
  if (wt.scalar_type() == ScalarType::Char && scale != nullptr && is_plain(*scale, ScalarType::Float) &&
      scale->numel() == w.co) {
    w.q = wt.const_data_ptr<int8_t>();
    w.scale = scale->const_data_ptr<float>();
    return true;
  }
  (void)ctx;
  return false;
}

}  // namespace

// conv2d(Tensor input, Tensor weight, Tensor? weight_scale, Tensor? bias, int[] stride,
//        int[] padding, int[] dilation, int groups, Tensor? bn_weight, Tensor? bn_bias,
//        Tensor? bn_mean, Tensor? bn_var, float bn_eps, float act_min, float act_max, *, Tensor(a!) out)
namespace {
void conv2d_impl(KernelRuntimeContext& ctx, Span<EValue*> stack, Tensor& out, Tensor* bits, double bits_lo,
                 double bits_hi) {
  const Tensor& x = stack[0]->toTensor();
  const Tensor& wt = stack[1]->toTensor();
  const Tensor* scale = opt_tensor(stack[2]);
  const Tensor* bias = opt_tensor(stack[3]);
  Geom g;
  int64_t s[2], p[2], d[2];
  RK_CHECK(ctx, read_pair(stack[4], s) && read_pair(stack[5], p) && read_pair(stack[6], d),
           "conv2d: stride / padding / dilation must have 1 or 2 values");
  g.groups = stack[7]->toInt();
  const Tensor* bnw = opt_tensor(stack[8]);
  const Tensor* bnb = opt_tensor(stack[9]);
  const Tensor* bnm = opt_tensor(stack[10]);
  const Tensor* bnv = opt_tensor(stack[11]);
  const double eps = stack[12]->toDouble();
  const double lo = stack[13]->toDouble(), hi = stack[14]->toDouble();
  RK_CHECK(ctx, is_plain(x, ScalarType::Float) && x.dim() == 4, "conv2d: input must be a contiguous float NCHW tensor");
  Weight w;
  RK_CHECK(ctx, read_weight(ctx, wt, scale, w), "conv2d: weight must be float [Co, Ci/g, kh, kw], or int8 with a "
           "float scale per output channel");
  g.n = x.size(0);
  g.cs = x.size(1);
  g.hs = x.size(2);
  g.ws = x.size(3);
  g.cd = w.co;
  g.kh = w.kh;
  g.kw = w.kw;
  g.sh = s[0];
  g.sw = s[1];
  g.ph = p[0];
  g.pw = p[1];
  g.dh = d[0];
  g.dw = d[1];
  RK_CHECK(ctx, g.groups > 0 && g.cs % g.groups == 0 && g.cd % g.groups == 0 && w.cig * g.groups == g.cs,
           "conv2d: channels do not match the groups");
  RK_CHECK(ctx, g.sh > 0 && g.sw > 0 && g.dh > 0 && g.dw > 0 && g.ph >= 0 && g.pw >= 0, "conv2d: bad stride / "
           "padding / dilation");
  g.hd = (g.hs + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  g.wd = (g.ws + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  RK_CHECK(ctx, g.hd > 0 && g.wd > 0, "conv2d: empty output");
  const int64_t osz[4] = {g.n, g.cd, g.hd, g.wd};
  RK_CHECK(ctx, resize_to(out, osz, 4) && is_plain(out, ScalarType::Float), "conv2d: output has the wrong shape");
  Epilogue ep;
  if (bias) {
    RK_CHECK(ctx, is_plain(*bias, ScalarType::Float) && bias->numel() == g.cd, "conv2d: bad bias");
    ep.bias = bias->const_data_ptr<float>();
  }
  std::vector<float> aff;
  if (bnm || bnv || bnw || bnb) {
    RK_CHECK(ctx, bnm && bnv, "conv2d: a fused batch norm needs its running mean and variance");
    for (const Tensor* t : {bnw, bnb, bnm, bnv})
      RK_CHECK(ctx, t == nullptr || (is_plain(*t, ScalarType::Float) && t->numel() == g.cd),
               "conv2d: batch norm parameters must be float [Co]");
    aff.resize(size_t(2 * g.cd));
    const float* mean = bnm->const_data_ptr<float>();
    const float* var = bnv->const_data_ptr<float>();
    for (int64_t c = 0; c < g.cd; ++c) {
      // (v - mean) * invstd * weight + bias, as one multiply-add
      const float invstd = 1.0f / std::sqrt(var[c] + static_cast<float>(eps));
      const float a = invstd * (bnw ? bnw->const_data_ptr<float>()[c] : 1.0f);
      aff[size_t(c)] = a;
      aff[size_t(g.cd + c)] = (bnb ? bnb->const_data_ptr<float>()[c] : 0.0f) - mean[c] * a;
    }
    ep.mul = aff.data();
    ep.add = aff.data() + g.cd;
  }
  ep.lo = static_cast<float>(lo);
  ep.hi = static_cast<float>(hi);
  ep.clamp_lo = lo > -3.0e38;
  ep.clamp_hi = hi < 3.0e38;
  if (bits) {
    const int64_t nbytes = out.numel() / 8;
    RK_CHECK(ctx, (g.hd * g.wd) % 8 == 0 && bits->scalar_type() == ScalarType::Byte && bits->dim() == 1 &&
             resize_to(*bits, &nbytes, 1), "conv2d_mask: the mask must be uint8 [numel / 8] of maps whose size is a "
             "multiple of 8");
    ep.bits_out = bits->mutable_data_ptr<uint8_t>();
    ep.bits_use_lo = bits_lo > -3.0e38;
    ep.bits_use_hi = bits_hi < 3.0e38;
    ep.bits_lo = static_cast<float>(bits_lo);
    ep.bits_hi = static_cast<float>(bits_hi);
  }
  run_conv(x.const_data_ptr<float>(), out.mutable_data_ptr<float>(), w, g, ep);
}
}  // namespace

void conv2d_out(KernelRuntimeContext& ctx, Span<EValue*> stack) {
  RK_CHECK(ctx, stack.size() >= 16, "conv2d: expected 16 arguments, got %zu", stack.size());
  conv2d_impl(ctx, stack, stack[15]->toTensor(), nullptr, 0.0, 0.0);
}

// conv2d_mask(<conv2d's arguments>, float mask_lo, float mask_hi, *, Tensor(a!) out, Tensor(b!) mask):
// conv2d, and the 1-bit mask (out <= mask_lo) | (out >= mask_hi) of its result, made in its epilogue
void conv2d_mask_out(KernelRuntimeContext& ctx, Span<EValue*> stack) {
  RK_CHECK(ctx, stack.size() >= 19, "conv2d_mask: expected 19 arguments, got %zu", stack.size());
  conv2d_impl(ctx, stack, stack[17]->toTensor(), &stack[18]->toTensor(), stack[15]->toDouble(),
              stack[16]->toDouble());
}

// conv2d_input_grad(Tensor grad_output, Tensor weight, Tensor? weight_scale, Tensor? grad_scale,
//                   Tensor? mask, int[] input_size, int[] stride, int[] padding, int[] dilation,
//                   int groups, *, Tensor(a!) out)
void conv2d_input_grad_out(KernelRuntimeContext& ctx, Span<EValue*> stack) {
  RK_CHECK(ctx, stack.size() >= 11, "conv2d_input_grad: expected 11 arguments, got %zu", stack.size());
  const Tensor& go = stack[0]->toTensor();
  const Tensor& wt = stack[1]->toTensor();
  const Tensor* scale = opt_tensor(stack[2]);
  const Tensor* gscale = opt_tensor(stack[3]);
  const Tensor* mask = opt_tensor(stack[4]);
  auto in_size = stack[5]->toIntList();
  int64_t s[2], p[2], d[2];
  RK_CHECK(ctx, read_pair(stack[6], s) && read_pair(stack[7], p) && read_pair(stack[8], d),
           "conv2d_input_grad: stride / padding / dilation must have 1 or 2 values");
  const int64_t groups = stack[9]->toInt();
  Tensor& out = stack[10]->toTensor();
  RK_CHECK(ctx, is_plain(go, ScalarType::Float) && go.dim() == 4, "conv2d_input_grad: grad_output must be a "
           "contiguous float NCHW tensor");
  RK_CHECK(ctx, in_size.size() == 4, "conv2d_input_grad: input_size must be [N, C, H, W]");
  Weight w;
  RK_CHECK(ctx, read_weight(ctx, wt, scale, w), "conv2d_input_grad: bad weight");
  if (gscale) {
    RK_CHECK(ctx, is_plain(*gscale, ScalarType::Float) && gscale->numel() == w.co, "conv2d_input_grad: grad_scale "
             "must be float [Co]");
    w.extra = gscale->const_data_ptr<float>();
  }
  Geom g;
  g.transposed = true;
  g.groups = groups;
  g.n = go.size(0);
  g.cs = go.size(1);
  g.hs = go.size(2);
  g.ws = go.size(3);
  g.cd = in_size[1];
  g.hd = in_size[2];
  g.wd = in_size[3];
  g.kh = w.kh;
  g.kw = w.kw;
  RK_CHECK(ctx, in_size[0] == g.n && groups > 0 && g.cs == w.co && g.cd == w.cig * groups && g.cs % groups == 0,
           "conv2d_input_grad: shapes do not match");
  RK_CHECK(ctx, s[0] > 0 && s[1] > 0 && d[0] > 0 && d[1] > 0, "conv2d_input_grad: bad stride / dilation");
  // the input gradient is a stride-1 conv of the output gradient zero-inserted by the stride
  g.sh = g.sw = 1;
  g.dh = d[0];
  g.dw = d[1];
  g.uh = s[0];
  g.uw = s[1];
  g.ph = d[0] * (g.kh - 1) - p[0];
  g.pw = d[1] * (g.kw - 1) - p[1];
  RK_CHECK(ctx, g.ph >= 0 && g.pw >= 0, "conv2d_input_grad: padding larger than the kernel is not supported");
  const int64_t osz[4] = {g.n, g.cd, g.hd, g.wd};
  RK_CHECK(ctx, resize_to(out, osz, 4) && is_plain(out, ScalarType::Float), "conv2d_input_grad: output has the "
           "wrong shape");
  Epilogue ep;
  if (mask) {
    RK_CHECK(ctx, mask->scalar_type() == ScalarType::Byte && mask->numel() * 8 == out.numel(),
             "conv2d_input_grad: the mask must be uint8 codes, one bit per output element");
    ep.mask = mask->const_data_ptr<uint8_t>();
    ep.mask_bytes = mask->numel();
  }
  run_conv(go.const_data_ptr<float>(), out.mutable_data_ptr<float>(), w, g, ep);
}

// conv2d_weight_grad(Tensor grad_output, Tensor input, int[] weight_size, int[] stride,
//                    int[] padding, int[] dilation, int groups, *, Tensor(a!) out)
void conv2d_weight_grad_out(KernelRuntimeContext& ctx, Span<EValue*> stack) {
  RK_CHECK(ctx, stack.size() >= 8, "conv2d_weight_grad: expected 8 arguments, got %zu", stack.size());
  const Tensor& go = stack[0]->toTensor();
  const Tensor& x = stack[1]->toTensor();
  auto wsize = stack[2]->toIntList();
  int64_t s[2], p[2], d[2];
  RK_CHECK(ctx, read_pair(stack[3], s) && read_pair(stack[4], p) && read_pair(stack[5], d),
           "conv2d_weight_grad: stride / padding / dilation must have 1 or 2 values");
  const int64_t groups = stack[6]->toInt();
  Tensor& out = stack[7]->toTensor();
  RK_CHECK(ctx, is_plain(go, ScalarType::Float) && go.dim() == 4 && is_plain(x, ScalarType::Float) && x.dim() == 4,
           "conv2d_weight_grad: grad_output and input must be contiguous float NCHW tensors");
  RK_CHECK(ctx, wsize.size() == 4, "conv2d_weight_grad: weight_size must be [Co, Ci/g, kh, kw]");
  Geom g;  // the forward conv's geometry: source = input, destination = grad_output
  g.groups = groups;
  g.n = x.size(0);
  g.cs = x.size(1);
  g.hs = x.size(2);
  g.ws = x.size(3);
  g.cd = go.size(1);
  g.hd = go.size(2);
  g.wd = go.size(3);
  g.kh = wsize[2];
  g.kw = wsize[3];
  g.sh = s[0];
  g.sw = s[1];
  g.ph = p[0];
  g.pw = p[1];
  g.dh = d[0];
  g.dw = d[1];
  RK_CHECK(ctx, go.size(0) == g.n && groups > 0 && wsize[0] == g.cd && wsize[1] * groups == g.cs &&
           g.cd % groups == 0, "conv2d_weight_grad: shapes do not match");
  RK_CHECK(ctx, resize_to(out, wsize.data(), 4) && is_plain(out, ScalarType::Float), "conv2d_weight_grad: output "
           "has the wrong shape");
  const int64_t k = g.k(), p_all = g.hd * g.wd, hw = g.hs * g.ws;
  const float* gop = go.const_data_ptr<float>();
  const float* xp = x.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  // tasks: (group, block of output channels), each over every image and position tile
  const int64_t threads = std::max<int64_t>(1, executorch::extension::get_thread_count());
  const int64_t per_group = std::max<int64_t>(1, (threads + groups - 1) / groups);
  const int64_t rows = std::max<int64_t>(1, (g.cdg() + per_group - 1) / per_group);
  const int64_t nrb = (g.cdg() + rows - 1) / rows;
  int64_t tp = std::min<int64_t>(p_all, std::max<int64_t>(64, 65536 / std::max<int64_t>(k, 1)));
  tp = std::min<int64_t>(p_all, (tp + 15) / 16 * 16);
  const int64_t ntp = (p_all + tp - 1) / tp;
  parallel(groups * nrb, [&](int64_t task) {
    const int64_t grp = task / nrb, rb = task % nrb;
    const int64_t d0 = grp * g.cdg() + rb * rows;
    const int64_t nr = std::min(rows, (grp + 1) * g.cdg() - d0);
    if (nr <= 0) return;
    MapM O(op + d0 * k, nr, k, Eigen::OuterStride<>(k));
    O.setZero();
    for (int64_t n = 0; n < g.n; ++n) {
      const float* src_n = xp + n * g.cs * hw;
      for (int64_t it = 0; it < ntp; ++it) {
        const int64_t p0 = it * tp, t = std::min(tp, p_all - p0);
        const float* bptr;
        int64_t ldb;
        if (g.identity_cols()) {
          bptr = src_n + grp * g.csg() * hw + p0;
          ldb = hw;
        } else {
          float* cols = scratch(1, size_t(k * t));
          im2col(src_n, cols, g, grp, p0, t);
          bptr = cols;
          ldb = t;
        }
        MapC G(gop + (n * g.cd + d0) * p_all + p0, nr, t, Eigen::OuterStride<>(p_all));
        O.noalias() += G * MapC(bptr, k, t, Eigen::OuterStride<>(ldb)).transpose();
      }
    }
  });
}

}  // namespace repnet_kernels

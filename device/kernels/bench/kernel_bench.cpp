// repnet kernels: a C++ self-check and micro-benchmark, calling the kernels the way the runtime
// does (looked up in ExecuTorch's operator registry by name, boxed arguments).
//
//   repnet_kernels_bench --check            every kernel path against naive loops (small shapes)
//   repnet_kernels_bench [--reps N] [--threads T] [filter]
//                                           min-of-N time of MobileNetV2 / ProxylessNAS layers at
//                                           224 px, batch 8 (filter: a substring of the case name)
#include <executorch/extension/threadpool/threadpool_guard.h>
#include <executorch/runtime/core/evalue.h>
#include <executorch/runtime/kernel/kernel_runtime_context.h>
#include <executorch/runtime/kernel/operator_registry.h>
#include <executorch/runtime/platform/runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

extern "C" int repnet_kernels_register();

namespace executorch::extension::threadpool {
class ThreadPool {
 public:
  bool _unsafe_reset_threadpool(uint32_t num_threads);
};
ThreadPool* get_threadpool();
}  // namespace executorch::extension::threadpool

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::aten::TensorImpl;
using executorch::runtime::BoxedEvalueList;
using executorch::runtime::EValue;
using executorch::runtime::KernelRuntimeContext;

namespace {

// an owned tensor (data + impl)
struct T {
  std::vector<TensorImpl::SizesType> sizes;
  std::vector<TensorImpl::DimOrderType> order;
  std::vector<TensorImpl::StridesType> strides;
  std::vector<uint8_t> bytes;
  std::unique_ptr<TensorImpl> impl;
  ScalarType dtype;
  T(ScalarType dt, std::vector<int64_t> s) : dtype(dt) {
    for (auto v : s) sizes.push_back(static_cast<TensorImpl::SizesType>(v));
    order.resize(sizes.size());
    strides.resize(sizes.size());
    int64_t st = 1, n = 1;
    for (int i = int(sizes.size()) - 1; i >= 0; --i) {
      order[size_t(i)] = static_cast<TensorImpl::DimOrderType>(i);
      strides[size_t(i)] = static_cast<TensorImpl::StridesType>(st);
      st *= sizes[size_t(i)];
    }
    n = st;
    const size_t es = dt == ScalarType::Float ? 4 : 1;
    bytes.assign(size_t(n) * es + 64, 0);
    impl = std::make_unique<TensorImpl>(dt, ssize_t(sizes.size()), sizes.data(), bytes.data(), order.data(),
                                        strides.data());
  }
  int64_t numel() const { return impl->numel(); }
  float* f() { return reinterpret_cast<float*>(bytes.data()); }
  int8_t* q() { return reinterpret_cast<int8_t*>(bytes.data()); }
  uint8_t* u() { return bytes.data(); }
  Tensor t() { return Tensor(impl.get()); }
};

// an int list argument
struct IntList {
  std::vector<int64_t> vals;
  std::vector<EValue> boxed;
  std::vector<EValue*> ptrs;
  std::vector<int64_t> scratch;
  std::unique_ptr<BoxedEvalueList<int64_t>> list;
  explicit IntList(std::vector<int64_t> v) : vals(std::move(v)) {
    for (auto x : vals) boxed.emplace_back(x);
    for (auto& e : boxed) ptrs.push_back(&e);
    scratch.resize(vals.size());
    list = std::make_unique<BoxedEvalueList<int64_t>>(ptrs.data(), scratch.data(), int(vals.size()));
  }
  EValue ev() { return EValue(list.get()); }
};

bool call(const char* op, std::vector<EValue>& args) {
  auto fn = executorch::runtime::get_op_function_from_registry(op);
  if (!fn.ok()) {
    std::fprintf(stderr, "error: %s is not registered\n", op);
    std::exit(2);
  }
  std::vector<EValue*> stack;
  for (auto& a : args) stack.push_back(&a);
  KernelRuntimeContext ctx;
  (*fn.get())(ctx, {stack.data(), stack.size()});
  return ctx.failure_state() == executorch::runtime::Error::Ok;
}

std::mt19937 rng(0);
void fill(T& t, float lo = -1.f, float hi = 1.f) {
  std::uniform_real_distribution<float> d(lo, hi);
  if (t.dtype == ScalarType::Float)
    for (int64_t i = 0; i < t.numel(); ++i) t.f()[i] = d(rng);
  else if (t.dtype == ScalarType::Char)
    for (int64_t i = 0; i < t.numel(); ++i) t.q()[i] = static_cast<int8_t>(std::lround(d(rng) * 127));
  else
    for (int64_t i = 0; i < t.numel(); ++i) t.u()[i] = static_cast<uint8_t>(rng());
}

struct Conv {
  std::string name;
  int64_t n, ci, h, w, co, k, stride, pad, groups;
  bool q, bn, relu6, mask, gscale;
  int64_t ho() const { return (h + 2 * pad - k) / stride + 1; }
  int64_t wo() const { return (w + 2 * pad - k) / stride + 1; }
};

// weight value (dequantised, times the grad scale for the input gradient)
float wval(const Conv& c, T& wt, T* sc, T* gs, int64_t o, int64_t idx) {
  const int64_t K = (c.ci / c.groups) * c.k * c.k;
  float v = c.q ? static_cast<float>(wt.q()[o * K + idx]) * sc->f()[o] : wt.f()[o * K + idx];
  return gs ? v * gs->f()[o] : v;
}

// naive references ------------------------------------------------------------------------------
void ref_forward(const Conv& c, T& x, T& wt, T* sc, T* bn, std::vector<float>& y) {
  const int64_t ho = c.ho(), wo = c.wo(), cig = c.ci / c.groups, cog = c.co / c.groups;
  y.assign(size_t(c.n * c.co * ho * wo), 0.f);
  for (int64_t n = 0; n < c.n; ++n)
    for (int64_t o = 0; o < c.co; ++o) {
      const int64_t g = o / cog;
      for (int64_t oh = 0; oh < ho; ++oh)
        for (int64_t ow = 0; ow < wo; ++ow) {
          double acc = 0;
          for (int64_t s = 0; s < cig; ++s)
            for (int64_t i = 0; i < c.k; ++i)
              for (int64_t j = 0; j < c.k; ++j) {
                const int64_t ih = oh * c.stride + i - c.pad, iw = ow * c.stride + j - c.pad;
                if (ih < 0 || iw < 0 || ih >= c.h || iw >= c.w) continue;
                acc += double(wval(c, wt, sc, nullptr, o, (s * c.k + i) * c.k + j)) *
                       x.f()[((n * c.ci + g * cig + s) * c.h + ih) * c.w + iw];
              }
          float v = float(acc);
          if (bn) {
            const float* b = bn->f();  // weight, bias, mean, var rows
            v = (v - b[2 * c.co + o]) / std::sqrt(b[3 * c.co + o] + 1e-5f) * b[o] + b[c.co + o];
          }
          if (c.relu6) v = std::min(6.f, std::max(0.f, v));
          y[size_t(((n * c.co + o) * ho + oh) * wo + ow)] = v;
        }
    }
}

void ref_input_grad(const Conv& c, T& go, T& wt, T* sc, T* gs, T* mask, std::vector<float>& gx) {
  const int64_t ho = c.ho(), wo = c.wo(), cig = c.ci / c.groups, cog = c.co / c.groups;
  std::vector<double> acc(size_t(c.n * c.ci * c.h * c.w), 0.0);
  for (int64_t n = 0; n < c.n; ++n)
    for (int64_t o = 0; o < c.co; ++o) {
      const int64_t g = o / cog;
      for (int64_t oh = 0; oh < ho; ++oh)
        for (int64_t ow = 0; ow < wo; ++ow) {
          const double gv = go.f()[((n * c.co + o) * ho + oh) * wo + ow];
          for (int64_t s = 0; s < cig; ++s)
            for (int64_t i = 0; i < c.k; ++i)
              for (int64_t j = 0; j < c.k; ++j) {
                const int64_t ih = oh * c.stride + i - c.pad, iw = ow * c.stride + j - c.pad;
                if (ih < 0 || iw < 0 || ih >= c.h || iw >= c.w) continue;
                acc[size_t(((n * c.ci + g * cig + s) * c.h + ih) * c.w + iw)] +=
                    double(wval(c, wt, sc, gs, o, (s * c.k + i) * c.k + j)) * gv;
              }
        }
    }
  gx.resize(acc.size());
  for (size_t e = 0; e < acc.size(); ++e)
    gx[e] = (mask && ((mask->u()[e >> 3] >> (e & 7)) & 1)) ? 0.f : float(acc[e]);
}

void ref_weight_grad(const Conv& c, T& go, T& x, std::vector<float>& gw) {
  const int64_t ho = c.ho(), wo = c.wo(), cig = c.ci / c.groups, cog = c.co / c.groups;
  gw.assign(size_t(c.co * cig * c.k * c.k), 0.f);
  for (int64_t o = 0; o < c.co; ++o)
    for (int64_t s = 0; s < cig; ++s)
      for (int64_t i = 0; i < c.k; ++i)
        for (int64_t j = 0; j < c.k; ++j) {
          double acc = 0;
          const int64_t g = o / cog;
          for (int64_t n = 0; n < c.n; ++n)
            for (int64_t oh = 0; oh < ho; ++oh)
              for (int64_t ow = 0; ow < wo; ++ow) {
                const int64_t ih = oh * c.stride + i - c.pad, iw = ow * c.stride + j - c.pad;
                if (ih < 0 || iw < 0 || ih >= c.h || iw >= c.w) continue;
                acc += double(go.f()[((n * c.co + o) * ho + oh) * wo + ow]) *
                       x.f()[((n * c.ci + g * cig + s) * c.h + ih) * c.w + iw];
              }
          gw[size_t(((o * cig + s) * c.k + i) * c.k + j)] = float(acc);
        }
}

double max_rel_err(const float* got, const std::vector<float>& ref) {
  double m = 0, scale = 1e-30;
  for (size_t i = 0; i < ref.size(); ++i) {
    m = std::max(m, double(std::fabs(got[i] - ref[i])));
    scale = std::max(scale, double(std::fabs(ref[i])));
  }
  return m / scale;
}

// the op calls ------------------------------------------------------------------------------
struct ConvRun {
  Conv c;
  T x, wt, sc, bn, go, gs, mask, y, gx, gw;
  IntList stride, pad, dil, isize, wsize;
  ConvRun(const Conv& c_)
      : c(c_),
        x(ScalarType::Float, {c.n, c.ci, c.h, c.w}),
        wt(c.q ? ScalarType::Char : ScalarType::Float, {c.co, c.ci / c.groups, c.k, c.k}),
        sc(ScalarType::Float, {c.co}),
        bn(ScalarType::Float, {4, c.co}),
        go(ScalarType::Float, {c.n, c.co, c.ho(), c.wo()}),
        gs(ScalarType::Float, {c.co}),
        mask(ScalarType::Byte, {(c.n * c.ci * c.h * c.w + 7) / 8}),
        y(ScalarType::Float, {c.n, c.co, c.ho(), c.wo()}),
        gx(ScalarType::Float, {c.n, c.ci, c.h, c.w}),
        gw(ScalarType::Float, {c.co, c.ci / c.groups, c.k, c.k}),
        stride({c.stride, c.stride}), pad({c.pad, c.pad}), dil({1, 1}), isize({c.n, c.ci, c.h, c.w}),
        wsize({c.co, c.ci / c.groups, c.k, c.k}) {
    fill(x);
    fill(wt);
    fill(sc, 0.001f, 0.02f);
    fill(bn, 0.5f, 1.5f);
    fill(go);
    fill(gs, 0.5f, 1.5f);
    fill(mask);
  }
  // weight / scale / bn tensors as the weights of separate tensors (bn rows)
  bool forward() {
    std::vector<T*> rows;
    // bn rows as separate [Co] tensors sharing bn's storage
    TensorImpl::SizesType s[1] = {static_cast<TensorImpl::SizesType>(c.co)};
    TensorImpl::DimOrderType o[1] = {0};
    TensorImpl::StridesType st[1] = {1};
    TensorImpl r0(ScalarType::Float, 1, s, bn.f(), o, st), r1(ScalarType::Float, 1, s, bn.f() + c.co, o, st),
        r2(ScalarType::Float, 1, s, bn.f() + 2 * c.co, o, st), r3(ScalarType::Float, 1, s, bn.f() + 3 * c.co, o, st);
    std::vector<EValue> a;
    a.emplace_back(x.t());
    a.emplace_back(wt.t());
    a.push_back(c.q ? EValue(sc.t()) : EValue());
    a.emplace_back();  // bias
    a.push_back(stride.ev());
    a.push_back(pad.ev());
    a.push_back(dil.ev());
    a.emplace_back(int64_t(c.groups));
    if (c.bn) {
      a.emplace_back(Tensor(&r0));
      a.emplace_back(Tensor(&r1));
      a.emplace_back(Tensor(&r2));
      a.emplace_back(Tensor(&r3));
    } else
      for (int i = 0; i < 4; ++i) a.emplace_back();
    a.emplace_back(1e-5);
    a.emplace_back(c.relu6 ? 0.0 : -3.4028234663852886e38);
    a.emplace_back(c.relu6 ? 6.0 : 3.4028234663852886e38);
    a.emplace_back(y.t());
    return call("repnet::conv2d.out", a);
  }
  bool input_grad() {
    std::vector<EValue> a;
    a.emplace_back(go.t());
    a.emplace_back(wt.t());
    a.push_back(c.q ? EValue(sc.t()) : EValue());
    a.push_back(c.gscale ? EValue(gs.t()) : EValue());
    a.push_back(c.mask ? EValue(mask.t()) : EValue());
    a.push_back(isize.ev());
    a.push_back(stride.ev());
    a.push_back(pad.ev());
    a.push_back(dil.ev());
    a.emplace_back(int64_t(c.groups));
    a.emplace_back(gx.t());
    return call("repnet::conv2d_input_grad.out", a);
  }
  bool weight_grad() {
    std::vector<EValue> a;
    a.emplace_back(go.t());
    a.emplace_back(x.t());
    a.push_back(wsize.ev());
    a.push_back(stride.ev());
    a.push_back(pad.ev());
    a.push_back(dil.ev());
    a.emplace_back(int64_t(c.groups));
    a.emplace_back(gw.t());
    return call("repnet::conv2d_weight_grad.out", a);
  }
};

int check() {
  int bad = 0;
  // name n ci h w co k stride pad groups q bn relu6 mask gscale
  const std::vector<Conv> cases = {
      {"pointwise", 2, 16, 9, 7, 24, 1, 1, 0, 1, true, true, true, true, true},
      {"pointwise fp32", 2, 5, 6, 6, 7, 1, 1, 0, 1, false, false, false, false, false},
      {"pointwise stride 2", 2, 8, 9, 9, 12, 1, 2, 0, 1, true, false, false, true, false},
      {"stem 3x3 s2", 2, 3, 17, 16, 8, 3, 2, 1, 1, true, true, true, true, true},
      {"full 5x5 g2", 2, 6, 11, 10, 8, 5, 1, 2, 2, false, false, false, false, true},
      {"depthwise 3x3 s1", 2, 6, 13, 20, 6, 3, 1, 1, 6, true, true, true, true, true},
      {"depthwise 3x3 s2", 2, 6, 14, 19, 6, 3, 2, 1, 6, true, true, true, true, true},
      {"depthwise 5x5 s2", 2, 4, 23, 22, 4, 5, 2, 2, 4, true, true, true, false, true},
      {"depthwise 7x7 s1", 1, 3, 9, 40, 3, 7, 1, 3, 3, true, false, true, true, false},
      {"depthwise 2x2 s2 (avg pool)", 2, 3, 8, 8, 3, 2, 2, 0, 3, false, false, false, false, false},
      {"depthwise 4x4 s4 (avg pool)", 1, 3, 16, 12, 3, 4, 4, 0, 3, false, false, false, false, false},
      {"depthwise 3x3 s3", 1, 2, 10, 11, 2, 3, 3, 1, 2, false, false, false, false, false},
  };
  for (const auto& c : cases) {
    ConvRun r(c);
    std::vector<float> ref;
    bool ok = r.forward();
    ref_forward(c, r.x, r.wt, c.q ? &r.sc : nullptr, c.bn ? &r.bn : nullptr, ref);
    double e = ok ? max_rel_err(r.y.f(), ref) : 1;
    std::printf("%-30s forward      %s (max err %.2g)\n", c.name.c_str(), ok && e < 1e-5 ? "ok" : "FAILED", e);
    bad += !(ok && e < 1e-5);
    ok = r.input_grad();
    ref_input_grad(c, r.go, r.wt, c.q ? &r.sc : nullptr, c.gscale ? &r.gs : nullptr, c.mask ? &r.mask : nullptr, ref);
    e = ok ? max_rel_err(r.gx.f(), ref) : 1;
    std::printf("%-30s input grad   %s (max err %.2g)\n", c.name.c_str(), ok && e < 1e-5 ? "ok" : "FAILED", e);
    bad += !(ok && e < 1e-5);
    if (!c.q) {
      ok = r.weight_grad();
      ref_weight_grad(c, r.go, r.x, ref);
      e = ok ? max_rel_err(r.gw.f(), ref) : 1;
      std::printf("%-30s weight grad  %s (max err %.2g)\n", c.name.c_str(), ok && e < 1e-5 ? "ok" : "FAILED", e);
      bad += !(ok && e < 1e-5);
    }
  }
  {  // a bad call fails (one line logged), it does not crash
    Conv c{"bad", 1, 4, 4, 4, 4, 1, 1, 0, 3, false, false, false, false, false};
    ConvRun r(c);
    const bool ok = r.forward();
    std::printf("%-30s refused      %s\n", "groups not dividing channels", ok ? "FAILED" : "ok");
    bad += ok;
  }
  {  // masks: mask_outside then mask_fill, against hand-made codes
    T x(ScalarType::Float, {2, 3, 4, 4}), m(ScalarType::Byte, {12}), y(ScalarType::Float, {2, 3, 4, 4});
    fill(x, -2.f, 8.f);
    std::vector<EValue> a;
    a.emplace_back(x.t());
    a.emplace_back(0.0);
    a.emplace_back(6.0);
    a.emplace_back(m.t());
    bool ok = call("repnet::mask_outside.out", a);
    for (int64_t e = 0; e < x.numel(); ++e) {
      const bool want = x.f()[e] <= 0.f || x.f()[e] >= 6.f;
      ok = ok && (((m.u()[e >> 3] >> (e & 7)) & 1) == want);
    }
    std::vector<EValue> b;
    b.emplace_back(x.t());
    b.emplace_back(m.t());
    b.emplace_back(0.5);
    b.emplace_back(y.t());
    ok = ok && call("repnet::mask_fill.out", b);
    for (int64_t e = 0; e < x.numel(); ++e) {
      const bool set = x.f()[e] <= 0.f || x.f()[e] >= 6.f;
      ok = ok && y.f()[e] == (set ? 0.5f : x.f()[e]);
    }
    T s(ScalarType::Float, {3});
    std::vector<EValue> c;
    c.emplace_back(x.t());
    c.emplace_back(s.t());
    ok = ok && call("repnet::channel_sum.out", c);
    for (int ch = 0; ch < 3; ++ch) {
      double want = 0;
      for (int n = 0; n < 2; ++n)
        for (int i = 0; i < 16; ++i) want += x.f()[(n * 3 + ch) * 16 + i];
      ok = ok && std::fabs(s.f()[ch] - want) <= 1e-5 * std::fabs(want) + 1e-6;
    }
    std::printf("%-30s              %s\n", "mask_outside / mask_fill / channel_sum", ok ? "ok" : "FAILED");
    bad += !ok;
  }
  std::printf("%s\n", bad ? "FAILED" : "all ok");
  return bad ? 1 : 0;
}

// MobileNetV2 / ProxylessNAS-Mobile layers at 224 px, batch 8 (frozen: int8 weights, BN, ReLU6)
std::vector<Conv> bench_cases() {
  return {
      {"stem 3x3 s2 3->32 @224", 8, 3, 224, 224, 32, 3, 2, 1, 1, true, true, true, true, true},
      {"dw 3x3 s1 32 @112", 8, 32, 112, 112, 32, 3, 1, 1, 32, true, true, true, true, true},
      {"pw 16->96 @112", 8, 16, 112, 112, 96, 1, 1, 0, 1, true, true, true, true, true},
      {"dw 3x3 s2 96 @112", 8, 96, 112, 112, 96, 3, 2, 1, 96, true, true, true, true, true},
      {"pw 96->24 @56", 8, 96, 56, 56, 24, 1, 1, 0, 1, true, true, false, true, true},
      {"pw 24->144 @56", 8, 24, 56, 56, 144, 1, 1, 0, 1, true, true, true, true, true},
      {"dw 3x3 s1 144 @56", 8, 144, 56, 56, 144, 3, 1, 1, 144, true, true, true, true, true},
      {"dw 5x5 s1 144 @56", 8, 144, 56, 56, 144, 5, 1, 2, 144, true, true, true, true, true},
      {"dw 7x7 s2 144 @56", 8, 144, 56, 56, 144, 7, 2, 3, 144, true, true, true, true, true},
      {"pw 32->192 @28", 8, 32, 28, 28, 192, 1, 1, 0, 1, true, true, true, true, true},
      {"dw 3x3 s1 384 @14", 8, 384, 14, 14, 384, 3, 1, 1, 384, true, true, true, true, true},
      {"pw 384->64 @14", 8, 384, 14, 14, 64, 1, 1, 0, 1, true, true, false, true, true},
      {"dw 3x3 s1 960 @7", 8, 960, 7, 7, 960, 3, 1, 1, 960, true, true, true, true, true},
      {"pw 960->160 @7", 8, 960, 7, 7, 160, 1, 1, 0, 1, true, true, false, true, true},
      {"pw 320->1280 @7", 8, 320, 7, 7, 1280, 1, 1, 0, 1, true, true, true, false, true},
      {"repnet 5x5 g2 24 @28 (fp32)", 8, 24, 28, 28, 24, 5, 1, 2, 2, false, false, false, false, false},
      {"dw 7x7 s1 1152 @7", 8, 1152, 7, 7, 1152, 7, 1, 3, 1152, true, true, true, true, true},
      {"pw 192->1152 @7", 8, 192, 7, 7, 1152, 1, 1, 0, 1, true, true, true, true, true},
      {"dw 5x5 s1 288 @14", 8, 288, 14, 14, 288, 5, 1, 2, 288, true, true, true, true, true},
  };
}

}  // namespace

int main(int argc, char** argv) {
  executorch::runtime::runtime_init();
  if (repnet_kernels_register() <= 0) {
    std::fprintf(stderr, "error: repnet kernels did not register\n");
    return 2;
  }
  int reps = 5, threads = 1;
  std::string filter;
  bool do_check = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--check") do_check = true;
    else if (a == "--reps" && i + 1 < argc) reps = std::atoi(argv[++i]);
    else if (a == "--threads" && i + 1 < argc) threads = std::atoi(argv[++i]);
    else filter = a;
  }
  executorch::extension::threadpool::get_threadpool()->_unsafe_reset_threadpool(uint32_t(threads));
  if (do_check) return check();
  double total = 0;
  for (const auto& c : bench_cases()) {
    if (!filter.empty() && c.name.find(filter) == std::string::npos) continue;
    ConvRun r(c);
    double best[3] = {1e9, 1e9, 1e9};
    for (int rep = 0; rep < reps; ++rep) {
      for (int which = 0; which < (c.q ? 2 : 3); ++which) {
        auto t0 = std::chrono::steady_clock::now();
        const bool ok = which == 0 ? r.forward() : which == 1 ? r.input_grad() : r.weight_grad();
        const double d = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        if (!ok) {
          std::fprintf(stderr, "error: %s failed\n", c.name.c_str());
          return 1;
        }
        best[which] = std::min(best[which], d);
      }
    }
    std::printf("%-32s forward %8.3f ms  input grad %8.3f ms", c.name.c_str(), best[0] * 1e3, best[1] * 1e3);
    if (!c.q) std::printf("  weight grad %8.3f ms", best[2] * 1e3);
    std::printf("\n");
    total += best[0] + best[1] + (c.q ? 0 : best[2]);
  }
  std::printf("total %.3f ms (min of %d, %d thread(s))\n", total * 1e3, reps, threads);
  return 0;
}

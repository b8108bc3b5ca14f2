// The optimizers against hand-computed updates (torch.optim semantics) and a double-precision
// reference of Adam's formula; the schedule and gradient clipping.
#include <vector>

#include "check.hpp"
#include "optim.hpp"
#include "util.hpp"

using rd::OptimConfig;
using rd::Optimizer;

static std::vector<float> run(const OptimConfig& c, float p0, const std::vector<float>& grads, double lr) {
  Optimizer o(c, {1});
  float p = p0;
  for (size_t s = 0; s < grads.size(); ++s) o.update(0, &p, &grads[s], lr, static_cast<int64_t>(s + 1));
  return {p};
}

int main() {
  OptimConfig sgd;
  sgd.name = "sgd";
  CHECK(run(sgd, 1.0f, {0.5f}, 0.1)[0] == 1.0f - 0.1f * 0.5f);
  // momentum 0.9: buf = g1; buf = 0.9 buf + g2
  sgd.momentum = 0.9;
  CHECK_NEAR(run(sgd, 1.0f, {1.0f, 2.0f}, 0.1)[0], 1.0 - 0.1 * 1.0 - 0.1 * 2.9, 1e-6);
  // dampening 0.5: the first step's buffer is g1 undamped (torch), then 0.9 buf + 0.5 g2
  sgd.dampening = 0.5;
  CHECK_NEAR(run(sgd, 1.0f, {1.0f, 2.0f}, 0.1)[0], 1.0 - 0.1 * 1.0 - 0.1 * 1.9, 1e-6);
  // Nesterov: d = g + 0.9 buf
  sgd.dampening = 0.0;
  sgd.nesterov = true;
  CHECK_NEAR(run(sgd, 1.0f, {1.0f, 2.0f}, 0.1)[0], 1.0 - 0.1 * 1.9 - 0.1 * (2.0 + 0.9 * 2.9), 1e-6);
  // weight decay: d = g + wd p
  OptimConfig wd;
  wd.name = "sgd";
  wd.weight_decay = 0.1;
  CHECK_NEAR(run(wd, 2.0f, {1.0f}, 0.5)[0], 2.0 - 0.5 * (1.0 + 0.1 * 2.0), 1e-7);
  {
    OptimConfig bad;
    bad.name = "sgd";
    bad.nesterov = true;
    CHECK_THROWS(Optimizer(bad, {1}), rd::Code::Invalid);
    bad.name = "rmsprop";
    CHECK_THROWS(Optimizer(bad, {1}), rd::Code::Invalid);
  }

  // Adam, step 1: the update is lr * g / (|g| + eps) whatever g is
  OptimConfig adam;
  adam.name = "adam";
  CHECK_NEAR(run(adam, 1.0f, {0.25f}, 1e-3)[0], 1.0 - 1e-3 * 0.25 / (0.25 + 1e-8), 1e-7);
  CHECK_NEAR(run(adam, 1.0f, {-40.0f}, 1e-3)[0], 1.0 + 1e-3, 1e-7);
  // five steps against the formula in double precision
  {
    std::vector<float> g = {0.3f, -1.2f, 0.05f, 2.0f, -0.7f};
    double p = 0.5, m = 0, v = 0;
    const double lr = 3e-3, b1 = 0.9, b2 = 0.999, eps = 1e-8;
    for (int t = 1; t <= 5; ++t) {
      m = b1 * m + (1 - b1) * g[t - 1];
      v = b2 * v + (1 - b2) * g[t - 1] * g[t - 1];
      p -= lr / (1 - std::pow(b1, t)) * m / (std::sqrt(v) / std::sqrt(1 - std::pow(b2, t)) + eps);
    }
    CHECK_NEAR(run(adam, 0.5f, g, lr)[0], p, 1e-6);
  }
  // AdamW: decoupled decay; with a zero gradient only the decay moves the weight
  OptimConfig adamw = adam;
  adamw.name = "adamw";
  adamw.weight_decay = 0.01;
  CHECK_NEAR(run(adamw, 2.0f, {0.0f}, 0.1)[0], 2.0 * (1 - 0.1 * 0.01), 1e-7);
  // Adam with weight decay adds it to the gradient: g' = 0 + 0.01 * 2 -> a full step of lr
  OptimConfig adaml2 = adam;
  adaml2.weight_decay = 0.01;
  CHECK_NEAR(run(adaml2, 2.0f, {0.0f}, 0.1)[0], 2.0 - 0.1 * 0.02 / (0.02 + 1e-8), 1e-6);

  // schedule: repnet.loop.CosineSchedule; warm-up then cosine
  rd::Schedule cos;
  cos.total_steps = 10;
  CHECK(cos.factor(0) == 1.0);
  CHECK_NEAR(cos.factor(5), 0.5, 1e-12);
  CHECK_NEAR(cos.factor(10) + 1.0, 1.0, 1e-12);
  CHECK_NEAR(cos.factor(12) + 1.0, 1.0, 1e-12);
  CHECK_NEAR(cos.factor(2), 0.5 * (1 + std::cos(M_PI * 0.2)), 1e-12);
  rd::Schedule warm = cos;
  warm.warmup_steps = 4;
  CHECK_NEAR(warm.factor(0), 0.25, 1e-12);
  CHECK_NEAR(warm.factor(3), 1.0, 1e-12);
  CHECK_NEAR(warm.factor(4), 1.0, 1e-12);
  CHECK_NEAR(warm.factor(7), 0.5, 1e-12);
  rd::Schedule flat;
  flat.name = "constant";
  CHECK(flat.factor(7) == 1.0);

  // clipping: total norm 5 over two tensors -> 1 / (5 + 1e-6); within the limit -> 1
  std::vector<float> a = {3.0f}, b = {0.0f, 4.0f};
  CHECK_NEAR(rd::clip_coefficient({a.data(), b.data()}, {1, 2}, 1.0), 1.0 / (5.0 + 1e-6), 1e-12);
  CHECK(rd::clip_coefficient({a.data(), b.data()}, {1, 2}, 10.0) == 1.0);
  std::puts("optim: ok");
  return 0;
}

// Optimizers with torch.optim semantics, on flat float32 tensors, and the recipes' schedule.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace rd {

struct OptimConfig {
  std::string name = "adam";  // "sgd" | "adam" (L2 added to the gradient) | "adamw" (decoupled decay)
  double momentum = 0.0, dampening = 0.0;
  bool nesterov = false;
  double weight_decay = 0.0;
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
};

// The state of one tensor: SGD's momentum buffer (a), or Adam's exp_avg (a) and exp_avg_sq (b).
struct TensorState {
  std::vector<float> a, b;
  bool started = false;  // SGD: the momentum buffer exists (torch creates it at the first step)
};

class Optimizer {
 public:
  explicit Optimizer(const OptimConfig& cfg, std::vector<size_t> sizes);
  // One update of tensor `i` (`n` = sizes[i] floats) with gradient `g` at learning rate `lr`;
  // `step` is the 1-based number of this optimizer step (Adam's bias correction).
  void update(size_t i, float* p, const float* g, double lr, int64_t step);
  const OptimConfig& config() const { return cfg_; }
  std::vector<TensorState>& state() { return state_; }
  const std::vector<size_t>& sizes() const { return sizes_; }
  // Names of the state tensors a checkpoint holds per trained tensor ("momentum_buffer" or
  // "exp_avg" + "exp_avg_sq").
  std::vector<std::string> state_names() const;

 private:
  OptimConfig cfg_;
  std::vector<size_t> sizes_;
  std::vector<TensorState> state_;
  std::vector<float> scratch_;
};

// lr factor at 0-based step s: linear warm-up (s + 1) / W for s < W, then cosine
// 0.5 (1 + cos(pi min(s - W, T - W) / (T - W))) (repnet.loop.CosineSchedule when W = 0);
// "constant": 1.
struct Schedule {
  std::string name = "cosine";
  int64_t total_steps = 1, warmup_steps = 0;
  double factor(int64_t step) const;
};

// torch.nn.utils.clip_grad_norm_(max_norm, norm_type=2): the factor every gradient is multiplied by
// (1 when the total norm is within max_norm); norms accumulated in double.
double clip_coefficient(const std::vector<const float*>& grads, const std::vector<size_t>& sizes, double max_norm);

}  // namespace rd

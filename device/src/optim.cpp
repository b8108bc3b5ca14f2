#include "optim.hpp"

#include <cmath>

#include "util.hpp"

namespace rd {

Optimizer::Optimizer(const OptimConfig& cfg, std::vector<size_t> sizes) : cfg_(cfg), sizes_(std::move(sizes)) {
  if (cfg_.name != "sgd" && cfg_.name != "adam" && cfg_.name != "adamw")
    fail(Code::Invalid, "unknown optimizer '" + cfg_.name + "' (sgd, adam, adamw)");
  if (!(cfg_.weight_decay >= 0) || !(cfg_.momentum >= 0) || !(cfg_.eps >= 0) || !(cfg_.beta1 >= 0 && cfg_.beta1 < 1) ||
      !(cfg_.beta2 >= 0 && cfg_.beta2 < 1))
    fail(Code::Invalid, "optimizer hyper-parameters out of range");
  if (cfg_.nesterov && (cfg_.momentum <= 0 || cfg_.dampening != 0))
    fail(Code::Invalid, "Nesterov momentum requires a momentum and zero dampening");
  state_.resize(sizes_.size());
  for (size_t i = 0; i < sizes_.size(); ++i) {
    if (cfg_.name == "sgd") {
      if (cfg_.momentum != 0) state_[i].a.assign(sizes_[i], 0.f);
    } else {
      state_[i].a.assign(sizes_[i], 0.f);
      state_[i].b.assign(sizes_[i], 0.f);
    }
  }
}

std::vector<std::string> Optimizer::state_names() const {
  if (cfg_.name == "sgd") return cfg_.momentum != 0 ? std::vector<std::string>{"momentum_buffer"} : std::vector<std::string>{};
  return {"exp_avg", "exp_avg_sq"};
}

void Optimizer::update(size_t i, float* p, const float* g, double lr, int64_t step) {
  const size_t n = sizes_[i];
  TensorState& st = state_[i];
  if (cfg_.name == "sgd") {
    // torch.optim.SGD (single-tensor): d = g + wd p; buf = d (first step) | m buf + (1 - dampening) d;
    // d = d + m buf (Nesterov) | buf; p = p - lr d
    const float wd = static_cast<float>(cfg_.weight_decay), m = static_cast<float>(cfg_.momentum);
    const float keep = static_cast<float>(1.0 - cfg_.dampening), neg_lr = static_cast<float>(-lr);
    for (size_t k = 0; k < n; ++k) {
      float d = g[k];
      if (cfg_.weight_decay != 0) d = d + wd * p[k];
      if (cfg_.momentum != 0) {
        float& buf = st.a[k];
        buf = st.started ? buf * m + keep * d : d;
        d = cfg_.nesterov ? d + m * buf : buf;
      }
      p[k] = p[k] + neg_lr * d;
    }
    st.started = true;
    return;
  }
  // torch.optim.Adam / AdamW (single-tensor): AdamW p *= 1 - lr wd | Adam g += wd p;
  // m = lerp(m, g, 1 - b1); v = b2 v + (1 - b2) g g; p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
  const double bc1 = 1.0 - std::pow(cfg_.beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(cfg_.beta2, static_cast<double>(step));
  const float w = static_cast<float>(1.0 - cfg_.beta1), b2 = static_cast<float>(cfg_.beta2);
  const float c2 = static_cast<float>(1.0 - cfg_.beta2);
  const float neg_step = static_cast<float>(-(lr / bc1)), bc2_sqrt = static_cast<float>(std::sqrt(bc2));
  const float eps = static_cast<float>(cfg_.eps), wd = static_cast<float>(cfg_.weight_decay);
  const float decay = static_cast<float>(1.0 - lr * cfg_.weight_decay);
  const bool decoupled = cfg_.name == "adamw";
  for (size_t k = 0; k < n; ++k) {
    float grad = g[k];
    if (cfg_.weight_decay != 0) {
      if (decoupled)
        p[k] = p[k] * decay;
      else
        grad = grad + wd * p[k];
    }
    float& m = st.a[k];
    float& v = st.b[k];
    m = w < 0.5f ? m + w * (grad - m) : grad - (grad - m) * (1.0f - w);  // torch.lerp
    v = v * b2;
    v = v + c2 * grad * grad;
    const float denom = std::sqrt(v) / bc2_sqrt + eps;
    p[k] = p[k] + neg_step * m / denom;
  }
  st.started = true;
}

double Schedule::factor(int64_t step) const {
  if (name == "constant") return 1.0;
  const int64_t total = total_steps < 1 ? 1 : total_steps;
  if (warmup_steps > 0 && step < warmup_steps) return static_cast<double>(step + 1) / static_cast<double>(warmup_steps);
  int64_t span = total - warmup_steps;
  if (span < 1) span = 1;
  int64_t s = step - warmup_steps;
  if (s > span) s = span;
  return 0.5 * (1.0 + std::cos(M_PI * static_cast<double>(s) / static_cast<double>(span)));
}

double clip_coefficient(const std::vector<const float*>& grads, const std::vector<size_t>& sizes, double max_norm) {
  double total = 0.0;
  for (size_t i = 0; i < grads.size(); ++i) {
    double sq = 0.0;
    for (size_t k = 0; k < sizes[i]; ++k) sq += static_cast<double>(grads[i][k]) * grads[i][k];
    total += sq;
  }
  const double norm = std::sqrt(total);
  const double coef = max_norm / (norm + 1e-6);
  return coef < 1.0 ? coef : 1.0;
}

}  // namespace rd

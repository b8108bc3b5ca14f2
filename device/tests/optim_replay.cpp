// Test helper (tests/test_device.py): replay a gradient sequence through rd::Optimizer, the schedule
// and clipping, as the trainer applies them, so pytest can compare with torch.optim.
//
//   optim_replay SPEC.json IN.safetensors OUT.safetensors
//
// SPEC: {"optimizer": {...as in program metadata}, "schedule": {...}, "clip_grad_norm": null | x,
//        "steps": N, "tensors": [{"name": ..., "lr": ...}, ...]}
// IN: "p.<name>" (initial values), "g.<step>.<name>" (step = 0 .. N-1). OUT: "p.<name>" after N steps.
#include <cstdio>
#include <cstring>
#include <nlohmann/json.hpp>
#include <vector>

#include "optim.hpp"
#include "tensors.hpp"
#include "util.hpp"

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: optim_replay SPEC.json IN.safetensors OUT.safetensors\n");
    return 2;
  }
  try {
    auto spec = nlohmann::json::parse(rd::read_file(argv[1], "spec"));
    auto in = rd::read_safetensors(argv[2], nullptr);
    const auto& o = spec.at("optimizer");
    rd::OptimConfig c;
    c.name = o.at("name").get<std::string>();
    c.weight_decay = o.value("weight_decay", 0.0);
    c.momentum = o.value("momentum", 0.0);
    c.dampening = o.value("dampening", 0.0);
    c.nesterov = o.value("nesterov", false);
    c.eps = o.value("eps", 1e-8);
    if (o.contains("betas")) {
      c.beta1 = o.at("betas")[0].get<double>();
      c.beta2 = o.at("betas")[1].get<double>();
    }
    rd::Schedule sched;
    sched.name = spec.at("schedule").at("name").get<std::string>();
    sched.total_steps = spec.at("schedule").value("total_steps", static_cast<int64_t>(1));
    sched.warmup_steps = spec.at("schedule").value("warmup_steps", static_cast<int64_t>(0));
    const double clip = spec.value("clip_grad_norm", nlohmann::json()).is_null() ? 0.0 : spec.at("clip_grad_norm").get<double>();
    std::vector<std::string> names;
    std::vector<double> lrs;
    std::vector<std::vector<float>> params;
    std::vector<size_t> sizes;
    for (const auto& t : spec.at("tensors")) {
      names.push_back(t.at("name").get<std::string>());
      lrs.push_back(t.at("lr").get<double>());
      const auto& p = in.at("p." + names.back());
      params.emplace_back(p.bytes.size() / 4);
      std::memcpy(params.back().data(), p.bytes.data(), p.bytes.size());
      sizes.push_back(params.back().size());
    }
    rd::Optimizer opt(c, sizes);
    const int64_t steps = spec.at("steps").get<int64_t>();
    for (int64_t s = 0; s < steps; ++s) {
      std::vector<std::vector<float>> grads;
      std::vector<const float*> ptrs;
      for (size_t i = 0; i < names.size(); ++i) {
        const auto& g = in.at("g." + std::to_string(s) + "." + names[i]);
        grads.emplace_back(g.bytes.size() / 4);
        std::memcpy(grads.back().data(), g.bytes.data(), g.bytes.size());
      }
      for (auto& g : grads) ptrs.push_back(g.data());
      if (clip > 0) {
        const float k = static_cast<float>(rd::clip_coefficient(ptrs, sizes, clip));
        if (k < 1.0f)
          for (auto& g : grads)
            for (auto& v : g) v = v * k;
      }
      const double f = sched.factor(s);
      for (size_t i = 0; i < names.size(); ++i) opt.update(i, params[i].data(), grads[i].data(), lrs[i] * f, s + 1);
    }
    std::vector<rd::TensorView> views;
    for (size_t i = 0; i < names.size(); ++i)
      views.push_back({"p." + names[i], "F32", in.at("p." + names[i]).shape, params[i].data(), params[i].size() * 4});
    rd::atomic_write(argv[3], rd::safetensors_bytes(views));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  }
  return 0;
}

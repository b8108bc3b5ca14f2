// The trainer behind the C API: an ExecuTorch training program (methods "forward" = joint
// forward + backward, "evaluate" = logits), repnet's optimizers and schedule, packed datasets,
// checkpoints and adapters.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "../include/repnet_device.h"

namespace rd {

class Trainer;
Trainer* open_trainer(const std::string& pte, const std::string& meta, const rd_options& options);  // owned: close_trainer
void bind_dataset(Trainer& t, rd_split split, const std::string& path);
bool resume(Trainer& t, const std::string& path, bool weights_only = false);  // false: no file there
rd_step_info step(Trainer& t);
rd_eval_result evaluate(Trainer& t, rd_split split);
void save_checkpoint(Trainer& t, const std::string& path);
void write_adapter(Trainer& t, const std::string& folder);
void dump_gradients(Trainer& t, const std::string& path);
rd_stats stats(const Trainer& t);
void close_trainer(Trainer* t);
// Messages the runtime logged since the last call (joined by "; "), for error lines.
std::string take_runtime_log();

}  // namespace rd

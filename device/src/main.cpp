// repnet-device: the command-line trainer over the C API (repnet_device.h).
//
//   repnet-device train --program P.pte --train train.rpd [--test test.rpd] --out DIR [--resume] ...
//   repnet-device evaluate --program P.pte --data test.rpd [--checkpoint DIR/checkpoint.rdc]
//   repnet-device gradients --program P.pte --data train.rpd --out grads.safetensors
//
// Progress: one JSON object per line on stdout ({"event": "start" | "step" | "checkpoint" | "epoch" |
// "eval" | "adapter" | "end" | "interrupted", ...}). Failure: one line "error: ..." on stderr, exit 2.
#include <cerrno>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <sys/stat.h>

#include <vector>

#include "../include/repnet_device.h"
#include "dataset.hpp"

using json = nlohmann::json;

static const char* kUsage =
    "usage: repnet-device train --program P.pte [--meta P.json] --train TRAIN.rpd [--test TEST.rpd] --out DIR\n"
    "                          [--resume] [--epochs N] [--max-steps N] [--steps-per-epoch N] [--seed S]\n"
    "                          [--threads 0|1] [--sequential] [--checkpoint-every N] [--no-checkpoint]\n"
    "                          [--no-adapter] [--eval-every-epoch] [--quiet-steps] [--stop-after N]\n"
    "       repnet-device evaluate --program P.pte [--meta P.json] --data DATA.rpd [--checkpoint FILE]\n"
    "       repnet-device gradients --program P.pte [--meta P.json] --data DATA.rpd --out FILE.safetensors\n"
    "                              [--checkpoint FILE]\n"
    "       repnet-device order --seed S --epoch E --count N     (the data order and flips: docs/device.md)\n"
    "       repnet-device version\n";

[[noreturn]] static void die(std::string msg) {
  for (auto& c : msg)  // one printable line, whatever a file name or a foreign file holds
    if (static_cast<unsigned char>(c) < 0x20 || static_cast<unsigned char>(c) == 0x7f) c = '?';
  std::fprintf(stderr, "error: %s\n", msg.c_str());
  std::fflush(stderr);
  std::exit(2);
}

static void emit(const json& j) {
  std::fputs((j.dump() + "\n").c_str(), stdout);
  std::fflush(stdout);
}

static volatile std::sig_atomic_t g_stop = 0;
static void on_signal(int) { g_stop = 1; }

struct Args {
  std::map<std::string, std::string> values;
  std::set<std::string> flags;
  bool has(const std::string& k) const { return values.count(k) || flags.count(k); }
  std::string str(const std::string& k, const std::string& dflt = "") const {
    auto it = values.find(k);
    return it == values.end() ? dflt : it->second;
  }
  long long num(const std::string& k, long long dflt) const {
    auto it = values.find(k);
    if (it == values.end()) return dflt;
    char* end = nullptr;
    errno = 0;
    long long v = std::strtoll(it->second.c_str(), &end, 10);
    if (errno || end == it->second.c_str() || *end) die("--" + k + " needs a whole number, got '" + it->second + "'");
    return v;
  }
  std::string need(const std::string& k) const {
    if (!values.count(k)) die("missing --" + k + " (see repnet-device --help)");
    return values.at(k);
  }
};

static Args parse(int argc, char** argv, int start, const std::set<std::string>& valued, const std::set<std::string>& flags) {
  Args a;
  for (int i = start; i < argc; ++i) {
    std::string s = argv[i];
    if (s.rfind("--", 0) != 0) die("unexpected argument '" + s + "'");
    std::string k = s.substr(2);
    if (flags.count(k)) {
      a.flags.insert(k);
    } else if (valued.count(k)) {
      if (i + 1 >= argc) die("--" + k + " needs a value");
      a.values[k] = argv[++i];
    } else {
      die("unknown option --" + k + " (see repnet-device --help)");
    }
  }
  return a;
}

static void check(rd_status s) {
  if (s != RD_OK) die(rd_last_error());
}

static rd_trainer* open_from(const Args& a, rd_options* opt) {
  rd_trainer* t = nullptr;
  std::string meta = a.str("meta");
  check(rd_open(&t, a.need("program").c_str(), meta.empty() ? nullptr : meta.c_str(), opt));
  return t;
}

static json stats_json(rd_trainer* t) {
  rd_stats s{};
  check(rd_get_stats(t, &s));
  return {{"peak_rss_mb", s.peak_rss_bytes / 1e6}, {"train_peak_rss_mb", s.train_peak_rss_bytes / 1e6}, {"arena_mb", s.arena_bytes / 1e6}, {"eval_arena_mb", s.eval_arena_bytes / 1e6},
          {"weights_mb", s.weights_bytes / 1e6}, {"scratch_peak_mb", s.scratch_peak_bytes / 1e6}, {"input_batch_mb", s.input_bytes / 1e6}, {"train_time_s", s.train_seconds},
          {"images_per_s", s.images_per_second}, {"step_time_s", s.step_seconds}, {"steps", s.steps}, {"epoch", s.epoch}};
}

static bool is_dir(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

static int cmd_train(int argc, char** argv) {
  Args a = parse(argc, argv, 2,
                 {"program", "meta", "train", "test", "out", "epochs", "max-steps", "steps-per-epoch", "seed", "threads",
                  "checkpoint-every", "stop-after"},
                 {"resume", "sequential", "no-checkpoint", "no-adapter", "eval-every-epoch", "quiet-steps"});
  rd_options opt{};
  opt.seed = static_cast<uint64_t>(a.num("seed", 0));
  opt.threads = static_cast<int32_t>(a.num("threads", 0));
  opt.sequential = a.has("sequential");
  opt.epochs = a.num("epochs", 0);
  opt.max_steps = a.num("max-steps", 0);
  opt.steps_per_epoch = a.num("steps-per-epoch", 0);
  const long long every = a.num("checkpoint-every", 0);
  const long long stop_after = a.num("stop-after", 0);  // steps of this session, then checkpoint and exit 0
  const bool save = !a.has("no-checkpoint");
  const std::string out = a.need("out");
  if (!is_dir(out) && ::mkdir(out.c_str(), 0777) != 0) die("cannot create --out " + out + ": " + std::strerror(errno));
  const std::string ckpt = out + "/checkpoint.rdc";
  rd_trainer* t = open_from(a, &opt);
  check(rd_bind_dataset(t, RD_TRAIN, a.need("train").c_str()));
  const bool has_test = a.has("test");
  if (has_test) check(rd_bind_dataset(t, RD_TEST, a.str("test").c_str()));
  bool resumed = false;
  if (a.has("resume")) {
    rd_status s = rd_resume(t, ckpt.c_str());
    if (s == RD_ERR_NOT_FOUND) die("cannot resume: no checkpoint in " + out);
    check(s);
    resumed = true;
  } else {
    struct stat st;
    if (save && ::stat(ckpt.c_str(), &st) == 0) die(out + " already holds a run (checkpoint.rdc): continue it with --resume");
  }
  auto save_ckpt = [&](const char* why) {
    rd_status s = rd_save_checkpoint(t, ckpt.c_str());
    if (s != RD_OK) die(std::string(rd_last_error()) + "; last good checkpoint: " + ckpt);
    (void)why;
  };
  std::signal(SIGINT, on_signal);
  std::signal(SIGTERM, on_signal);
  rd_stats st0{};
  check(rd_get_stats(t, &st0));
  rd_step_info info{};
  {
    json start = {{"event", "start"}, {"resumed", resumed}, {"out", out}};
    json s = stats_json(t);
    start["arena_mb"] = s["arena_mb"];
    start["eval_arena_mb"] = s["eval_arena_mb"];
    start["weights_mb"] = s["weights_mb"];
    start["step"] = st0.steps;
    start["epoch"] = st0.epoch;
    emit(start);
  }
  if (!resumed && save) {
    save_ckpt("start");
    emit({{"event", "checkpoint"}, {"step", 0}, {"path", ckpt}});
  }
  int64_t prev = st0.steps;
  bool announced = false;
  for (;;) {
    if (g_stop) {
      if (save) save_ckpt("interrupt");
      emit({{"event", "interrupted"}, {"step", prev}, {"path", save ? ckpt : ""}});
      std::fprintf(stderr, "error: interrupted at step %lld%s\n", static_cast<long long>(prev),
                   save ? ("; checkpoint written, continue with --resume: " + ckpt).c_str() : "");
      return 3;
    }
    rd_status s = rd_step(t, &info);
    if (s != RD_OK) die(std::string(rd_last_error()) + (save ? "; last good checkpoint: " + ckpt : ""));
    if (!announced) {
      emit({{"event", "plan"}, {"total_steps", info.total_steps}, {"steps_per_epoch", info.steps_per_epoch}});
      announced = true;
    }
    if (info.step == prev) break;  // complete: nothing was computed
    prev = info.step;
    if (!a.has("quiet-steps"))
      emit({{"event", "step"}, {"step", info.step}, {"epoch", info.epoch}, {"loss", info.loss}, {"lr", info.lr},
            {"step_time_s", info.step_seconds}, {"total_steps", info.total_steps}});
    if (info.epoch_end) {
      json e = {{"event", "epoch"}, {"epoch", info.epoch}, {"step", info.step}, {"train_loss", info.epoch_loss},
                {"train_accuracy", info.epoch_accuracy}, {"lr", info.lr}};
      if (a.has("eval-every-epoch") && has_test) {
        rd_eval_result r{};
        check(rd_evaluate(t, RD_TEST, &r));
        e["test_accuracy"] = r.accuracy;
        e["test_loss"] = r.loss;
      }
      emit(e);
    }
    if (save && (info.epoch_end || (every > 0 && info.step % every == 0))) {
      save_ckpt("step");
      emit({{"event", "checkpoint"}, {"step", info.step}, {"path", ckpt}});
    }
    if (info.done) break;
    if (stop_after > 0 && info.step - st0.steps >= stop_after) {
      if (save && !(info.epoch_end || (every > 0 && info.step % every == 0))) save_ckpt("pause");
      emit({{"event", "paused"}, {"step", info.step}, {"path", save ? ckpt : ""}});
      rd_close(t);
      return 0;
    }
  }
  if (has_test) {
    rd_eval_result r{};
    check(rd_evaluate(t, RD_TEST, &r));
    emit({{"event", "eval"}, {"split", "test"}, {"loss", r.loss}, {"accuracy", r.accuracy}, {"images", r.images}});
  }
  if (!a.has("no-adapter")) {
    std::string folder = out + "/adapter";
    check(rd_write_adapter(t, folder.c_str()));
    emit({{"event", "adapter"}, {"path", folder}});
  }
  json end = stats_json(t);
  end["event"] = "end";
  emit(end);
  rd_close(t);
  return 0;
}

static int cmd_evaluate(int argc, char** argv) {
  Args a = parse(argc, argv, 2, {"program", "meta", "data", "checkpoint", "threads"}, {});
  rd_options opt{};
  opt.threads = static_cast<int32_t>(a.num("threads", 0));
  rd_trainer* t = open_from(a, &opt);
  const std::string data = a.need("data");
  check(rd_bind_dataset(t, RD_TEST, data.c_str()));
  if (a.has("checkpoint")) check(rd_load_weights(t, a.str("checkpoint").c_str()));
  rd_eval_result r{};
  check(rd_evaluate(t, RD_TEST, &r));
  emit({{"event", "eval"}, {"split", "test"}, {"loss", r.loss}, {"accuracy", r.accuracy}, {"images", r.images}});
  rd_close(t);
  return 0;
}

static int cmd_gradients(int argc, char** argv) {
  Args a = parse(argc, argv, 2, {"program", "meta", "data", "out", "threads", "checkpoint"}, {});
  rd_options opt{};
  opt.threads = static_cast<int32_t>(a.num("threads", 0));
  rd_trainer* t = open_from(a, &opt);
  check(rd_bind_dataset(t, RD_TRAIN, a.need("data").c_str()));
  if (a.has("checkpoint")) check(rd_load_weights(t, a.str("checkpoint").c_str()));
  check(rd_dump_gradients(t, a.need("out").c_str()));
  emit({{"event", "gradients"}, {"path", a.str("out")}});
  rd_close(t);
  return 0;
}

// The device's data order and flips for (seed, epoch) over `count` images (docs/device.md; tests compare a
// Python implementation of the documented RNG with this).
static int cmd_order(int argc, char** argv) {
  Args a = parse(argc, argv, 2, {"seed", "epoch", "count"}, {});
  const uint64_t seed = static_cast<uint64_t>(a.num("seed", 0)), epoch = static_cast<uint64_t>(a.num("epoch", 0));
  const long long count = a.num("count", 0);
  if (count < 1 || count > (1LL << 24)) die("--count must be 1 .. 16777216");
  auto order = rd::epoch_order(seed, epoch, static_cast<uint64_t>(count));
  std::vector<int> flips;
  for (long long k = 0; k < count; ++k) flips.push_back(rd::epoch_flip(seed, epoch, static_cast<uint64_t>(k)));
  emit({{"event", "order"}, {"order", order}, {"flips", flips}});
  return 0;
}

int main(int argc, char** argv) {
  std::signal(SIGXFSZ, SIG_IGN);  // a file-size limit: write() fails with EFBIG instead of killing us
  if (argc < 2 || !std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h")) {
    std::fputs(kUsage, argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  std::string cmd = argv[1];
  if (cmd == "train") return cmd_train(argc, argv);
  if (cmd == "evaluate") return cmd_evaluate(argc, argv);
  if (cmd == "order") return cmd_order(argc, argv);
  if (cmd == "gradients") return cmd_gradients(argc, argv);
  if (cmd == "version") {
    emit({{"event", "version"}, {"api", RD_API_VERSION}, {"checkpoint_format", 1}, {"dataset_format", 1}, {"program_format", 1}});
    return 0;
  }
  die("unknown command '" + cmd + "' (train, evaluate, gradients, version)");
}

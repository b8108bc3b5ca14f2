/*
 * repnet-device: train a repnet ExecuTorch training program on a device, without Python.
 *
 * The C API a JNI / iOS / embedded wrapper calls. Every function that can fail returns an
 * rd_status (RD_OK = 0); on failure rd_last_error() returns one line naming the problem (the
 * message of the last failed call on this thread; valid until the next call on it). Handles are
 * not thread-safe: use one trainer from one thread at a time.
 *
 * A typical session:
 *
 *   rd_trainer *t;
 *   if (rd_open(&t, "program.pte", "program.json", 0) != RD_OK) die(rd_last_error());
 *   rd_bind_dataset(t, RD_TRAIN, "train.rpd");
 *   rd_bind_dataset(t, RD_TEST, "test.rpd");
 *   rd_resume(t, "run/checkpoint.rdc");             // optional: continue a run (RD_ERR_NOT_FOUND: none)
 *   rd_step_info info;
 *   while (rd_step(t, &info) == RD_OK && !info.done) { ... every N steps rd_save_checkpoint(...) }
 *   rd_eval_result r; rd_evaluate(t, RD_TEST, &r);
 *   rd_write_adapter(t, "run/adapter");              // config.json + adapter.safetensors
 *   rd_close(t);
 *
 * File formats (program metadata, dataset, checkpoint, adapter): docs/device.md.
 */
#ifndef REPNET_DEVICE_H
#define REPNET_DEVICE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define RD_API_VERSION 1

typedef enum rd_status {
  RD_OK = 0,
  RD_ERR_INVALID = 1,    /* bad argument or input file (wrong program, dataset of another size, ...) */
  RD_ERR_IO = 2,         /* a file could not be read or written (missing, full disk, ...) */
  RD_ERR_RUNTIME = 3,    /* the ExecuTorch runtime failed */
  RD_ERR_NONFINITE = 4,  /* the loss or a gradient became NaN / inf: nothing was updated */
  RD_ERR_NOT_FOUND = 5   /* rd_resume: no checkpoint at that path */
} rd_status;

typedef enum rd_split { RD_TRAIN = 0, RD_TEST = 1 } rd_split;

typedef struct rd_trainer rd_trainer;

/* Options of rd_open (zero-initialise, then set what you need; pass NULL for the defaults). */
typedef struct rd_options {
  uint64_t seed;          /* data order and flips (default 0) */
  int32_t threads;        /* 1: no thread pool; 0: the runtime's default */
  int32_t sequential;     /* 1: no shuffling, no flips (tests, debugging) */
  int64_t epochs;         /* > 0: override the metadata's schedule length in epochs (else from metadata) */
  int64_t max_steps;      /* > 0: stop after this many steps (the schedule spans the capped run) */
  int64_t steps_per_epoch;/* > 0: cap the steps of an epoch */
} rd_options;

typedef struct rd_step_info {
  int64_t step;           /* steps done after this call */
  int64_t epoch;          /* epochs done */
  int64_t total_steps;
  int64_t steps_per_epoch;
  int32_t done;           /* 1: the run is complete (nothing was computed by this call) */
  int32_t epoch_end;      /* 1: this step ended an epoch */
  float loss;             /* the step's loss (with the recipe's label smoothing) */
  float lr;               /* the scheduled learning rate of the first parameter group */
  int32_t correct;        /* training images of the batch the logits got right */
  double step_seconds;    /* wall time of forward + backward + update */
  double epoch_loss;      /* mean loss of the epoch so far */
  double epoch_accuracy;  /* training accuracy of the epoch so far */
} rd_step_info;

typedef struct rd_eval_result {
  int64_t images;
  double loss;            /* mean cross-entropy, no smoothing */
  double accuracy;        /* top-1 */
} rd_eval_result;

typedef struct rd_stats {
  double peak_rss_bytes;     /* the process's peak resident set (Linux: /proc/self/status VmHWM; else
                                getrusage ru_maxrss, which Linux carries over an exec from the parent) */
  double train_peak_rss_bytes; /* the same, before the evaluation method was first loaded (training only) */
  double train_seconds;      /* time in rd_step, summed over this and resumed sessions */
  double images_per_second;  /* training images / train_seconds */
  double step_seconds;       /* train_seconds / steps of this session */
  int64_t arena_bytes;       /* the training method's planned memory */
  int64_t eval_arena_bytes;  /* the evaluation method's */
  int64_t weights_bytes;     /* the model's weights (from the metadata) */
  int64_t input_bytes;       /* one input batch */
  int64_t steps;             /* steps done (resumed sessions included) */
  int64_t epoch;             /* epochs done */
  int64_t scratch_peak_bytes;/* the kernels' largest temporary memory during a training step */
} rd_stats;

/* Open program `pte` with its metadata `meta_json` (NULL: the .pte path with .json). */
rd_status rd_open(rd_trainer **out, const char *pte, const char *meta_json, const rd_options *options);
/* Bind a packed dataset (checked: header, size, checksum, image size, class count). */
rd_status rd_bind_dataset(rd_trainer *t, rd_split split, const char *path);
/* Restore the trained tensors, optimizer state, step and RNG of a checkpoint of this program. */
rd_status rd_resume(rd_trainer *t, const char *checkpoint);
/* Load only the trained tensors of a checkpoint of this program (no optimizer state, no progress). */
rd_status rd_load_weights(rd_trainer *t, const char *checkpoint);
/* One training step (forward + backward + optimizer); info may be NULL. */
rd_status rd_step(rd_trainer *t, rd_step_info *info);
/* Evaluate the current weights on a bound split (the program's method "evaluate"). */
rd_status rd_evaluate(rd_trainer *t, rd_split split, rd_eval_result *out);
/* Write a checkpoint atomically (temp file + fsync + rename); the previous one stays on failure. */
rd_status rd_save_checkpoint(rd_trainer *t, const char *path);
/* Write an adapter folder (config.json + adapter.safetensors) that repnet.from_pretrained loads. */
rd_status rd_write_adapter(rd_trainer *t, const char *folder);
/* Run the first batch of the training split (sequential order) through forward + backward without
   updating anything, and write its loss, logits, every gradient ("grad.<name>") and the evaluation
   method's logits of the same images ("eval_logits") as a safetensors file (checks against Python). */
rd_status rd_dump_gradients(rd_trainer *t, const char *path);
rd_status rd_get_stats(rd_trainer *t, rd_stats *out);
void rd_close(rd_trainer *t);
/* The last error of this thread ("" if none). */
const char *rd_last_error(void);

#ifdef __cplusplus
}
#endif
#endif /* REPNET_DEVICE_H */

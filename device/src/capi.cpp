// The C API (repnet_device.h) over rd::Trainer: exceptions become a status and rd_last_error().
#include <string>

#include "../include/repnet_device.h"
#include "trainer.hpp"
#include "util.hpp"

struct rd_trainer {
  rd::Trainer* impl;
};

static thread_local std::string g_error;

template <class F>
static rd_status guarded(F&& f) {
  try {
    g_error.clear();
    f();
    return RD_OK;
  } catch (const rd::Error& e) {
    g_error = e.what();
    return static_cast<rd_status>(static_cast<int>(e.code));
  } catch (const std::bad_alloc&) {
    g_error = "out of memory";
    return RD_ERR_RUNTIME;
  } catch (const std::exception& e) {
    g_error = std::string("internal error: ") + e.what();
    return RD_ERR_RUNTIME;
  }
}

static rd_status no_handle() {
  g_error = "no trainer (NULL handle)";
  return RD_ERR_INVALID;
}

extern "C" {

rd_status rd_open(rd_trainer** out, const char* pte, const char* meta_json, const rd_options* options) {
  if (out == nullptr || pte == nullptr) return no_handle();
  *out = nullptr;
  rd_options opt{};
  if (options) opt = *options;
  return guarded([&] {
    rd::Trainer* t = rd::open_trainer(pte, meta_json ? meta_json : "", opt);
    *out = new rd_trainer{t};
  });
}

rd_status rd_bind_dataset(rd_trainer* t, rd_split split, const char* path) {
  if (!t || !path) return no_handle();
  return guarded([&] { rd::bind_dataset(*t->impl, split, path); });
}

rd_status rd_resume(rd_trainer* t, const char* checkpoint) {
  if (!t || !checkpoint) return no_handle();
  bool found = true;
  rd_status s = guarded([&] { found = rd::resume(*t->impl, checkpoint); });
  if (s == RD_OK && !found) {
    g_error = std::string("no checkpoint at ") + checkpoint;
    return RD_ERR_NOT_FOUND;
  }
  return s;
}

rd_status rd_load_weights(rd_trainer* t, const char* checkpoint) {
  if (!t || !checkpoint) return no_handle();
  bool found = true;
  rd_status s = guarded([&] { found = rd::resume(*t->impl, checkpoint, true); });
  if (s == RD_OK && !found) {
    g_error = std::string("checkpoint ") + checkpoint + " not found";
    return RD_ERR_NOT_FOUND;
  }
  return s;
}

rd_status rd_step(rd_trainer* t, rd_step_info* info) {
  if (!t) return no_handle();
  return guarded([&] {
    rd_step_info i = rd::step(*t->impl);
    if (info) *info = i;
  });
}

rd_status rd_evaluate(rd_trainer* t, rd_split split, rd_eval_result* out) {
  if (!t || !out) return no_handle();
  return guarded([&] { *out = rd::evaluate(*t->impl, split); });
}

rd_status rd_save_checkpoint(rd_trainer* t, const char* path) {
  if (!t || !path) return no_handle();
  return guarded([&] { rd::save_checkpoint(*t->impl, path); });
}

rd_status rd_write_adapter(rd_trainer* t, const char* folder) {
  if (!t || !folder) return no_handle();
  return guarded([&] { rd::write_adapter(*t->impl, folder); });
}

rd_status rd_dump_gradients(rd_trainer* t, const char* path) {
  if (!t || !path) return no_handle();
  return guarded([&] { rd::dump_gradients(*t->impl, path); });
}

rd_status rd_get_stats(rd_trainer* t, rd_stats* out) {
  if (!t || !out) return no_handle();
  return guarded([&] { *out = rd::stats(*t->impl); });
}

void rd_close(rd_trainer* t) {
  if (!t) return;
  rd::close_trainer(t->impl);
  delete t;
}

const char* rd_last_error(void) { return g_error.c_str(); }

}  // extern "C"

// Registers repnet's kernels with ExecuTorch's operator registry (in libexecutorch.so, shared by
// every runtime in the process: the Python bindings and the C++ trainer). Registration runs when
// the library is loaded; repnet_kernels_register() is also exported so that a program linking the
// library has a symbol to reference (the linker then keeps the library) and can check the count.
#include "common.h"

#include <mutex>

namespace repnet_kernels {
void conv2d_out(KernelRuntimeContext&, Span<EValue*>);
void conv2d_input_grad_out(KernelRuntimeContext&, Span<EValue*>);
void conv2d_weight_grad_out(KernelRuntimeContext&, Span<EValue*>);
void mask_outside_out(KernelRuntimeContext&, Span<EValue*>);
void mask_fill_out(KernelRuntimeContext&, Span<EValue*>);
void channel_sum_out(KernelRuntimeContext&, Span<EValue*>);

namespace {
using executorch::runtime::Kernel;

const Kernel kKernels[] = {
    Kernel("repnet::conv2d.out", conv2d_out),
    Kernel("repnet::conv2d_input_grad.out", conv2d_input_grad_out),
    Kernel("repnet::conv2d_weight_grad.out", conv2d_weight_grad_out),
    Kernel("repnet::mask_outside.out", mask_outside_out),
    Kernel("repnet::mask_fill.out", mask_fill_out),
    Kernel("repnet::channel_sum.out", channel_sum_out),
};

int do_register() {
  static int result = -1;
  static std::once_flag once;
  std::call_once(once, [] {
    const size_t n = sizeof(kKernels) / sizeof(kKernels[0]);
    auto err = executorch::runtime::register_kernels({kKernels, n});
    result = err == executorch::runtime::Error::Ok ? static_cast<int>(n) : -static_cast<int>(err);
    if (err != executorch::runtime::Error::Ok)
      ET_LOG(Error, "repnet kernels: registering %zu kernels failed (error %d)", n, static_cast<int>(err));
  });
  return result;
}

const int kRegistered = do_register();
}  // namespace
}  // namespace repnet_kernels

extern "C" {
// number of kernels registered (negative: the registry's error)
__attribute__((visibility("default"))) int repnet_kernels_register() { return repnet_kernels::do_register(); }
// the names, one per line (for the Python loader's checks)
__attribute__((visibility("default"))) const char* repnet_kernels_names() {
  return "repnet::conv2d.out\nrepnet::conv2d_input_grad.out\nrepnet::conv2d_weight_grad.out\n"
         "repnet::mask_outside.out\nrepnet::mask_fill.out\nrepnet::channel_sum.out";
}
}

// Registers repnet's kernels with ExecuTorch's operator registry (in libexecutorch.so, shared by
// every runtime in the process: the Python bindings and the C++ trainer). Registration runs when
// the library is loaded; repnet_kernels_register() is also exported so that a program linking the
// library has a symbol to reference (the linker then keeps the library) and can check the count.
#include "common.h"

#include <executorch/runtime/core/event_tracer_hooks.h>

#include <mutex>

namespace repnet_kernels {
void conv2d_out(KernelRuntimeContext&, Span<EValue*>);
void conv2d_mask_out(KernelRuntimeContext&, Span<EValue*>);
void conv2d_input_grad_out(KernelRuntimeContext&, Span<EValue*>);
void conv2d_weight_grad_out(KernelRuntimeContext&, Span<EValue*>);
void mask_outside_out(KernelRuntimeContext&, Span<EValue*>);
void mask_fill_out(KernelRuntimeContext&, Span<EValue*>);
void channel_sum_out(KernelRuntimeContext&, Span<EValue*>);
void resize_bilinear_out(KernelRuntimeContext&, Span<EValue*>);
void resize_bilinear_backward_out(KernelRuntimeContext&, Span<EValue*>);

namespace {
using executorch::runtime::Kernel;

// each kernel call is an event of the runtime's profiler (ETDump), named after its operator
template <void (*F)(KernelRuntimeContext&, Span<EValue*>), const char* Name>
void traced(KernelRuntimeContext& ctx, Span<EValue*> stack) {
  executorch::runtime::internal::EventTracerProfileOpScope scope(ctx.internal_event_tracer(), Name);
  FlushDenormals ftz;
  F(ctx, stack);
}

constexpr char kConv2d[] = "repnet::conv2d.out";
constexpr char kConv2dMask[] = "repnet::conv2d_mask.out";
constexpr char kConv2dInputGrad[] = "repnet::conv2d_input_grad.out";
constexpr char kConv2dWeightGrad[] = "repnet::conv2d_weight_grad.out";
constexpr char kMaskOutside[] = "repnet::mask_outside.out";
constexpr char kMaskFill[] = "repnet::mask_fill.out";
constexpr char kChannelSum[] = "repnet::channel_sum.out";
constexpr char kResize[] = "repnet::resize_bilinear.out";
constexpr char kResizeBackward[] = "repnet::resize_bilinear_backward.out";

const Kernel kKernels[] = {
    Kernel(kConv2d, traced<conv2d_out, kConv2d>),
    Kernel(kConv2dMask, traced<conv2d_mask_out, kConv2dMask>),
    Kernel(kConv2dInputGrad, traced<conv2d_input_grad_out, kConv2dInputGrad>),
    Kernel(kConv2dWeightGrad, traced<conv2d_weight_grad_out, kConv2dWeightGrad>),
    Kernel(kMaskOutside, traced<mask_outside_out, kMaskOutside>),
    Kernel(kMaskFill, traced<mask_fill_out, kMaskFill>),
    Kernel(kChannelSum, traced<channel_sum_out, kChannelSum>),
    Kernel(kResize, traced<resize_bilinear_out, kResize>),
    Kernel(kResizeBackward, traced<resize_bilinear_backward_out, kResizeBackward>),
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
  return "repnet::conv2d.out\nrepnet::conv2d_mask.out\nrepnet::conv2d_input_grad.out\nrepnet::conv2d_weight_grad.out\n"
         "repnet::mask_outside.out\nrepnet::mask_fill.out\nrepnet::channel_sum.out\nrepnet::resize_bilinear.out\n"
         "repnet::resize_bilinear_backward.out";
}
}

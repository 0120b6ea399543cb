// What bindings.cpp shares with the XLA FFI handlers (xla_ffi.cpp), so that a kernel call from a jitted
// JAX program uses the same build of kernel.cpp, the same thread count and the same class-index check
// as a call from NumPy: crossent.set_num_threads and select_isa apply to both.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernel_api.hpp"

namespace crossent {

const Kernels& active_kernels();
int active_threads();
// Whether every one of the n class indices is in [0, classes) or equals ignore_index.
bool class_indices_valid(const void* target, TargetKind kind, int64_t n, int64_t classes, int64_t ignore_index);

// The custom-call targets of xla_ffi.cpp (built only where jaxlib's FFI headers were found): a name for
// jax.ffi.register_ffi_target and its XLA_FFI_Handler, as a void pointer so that this header needs no XLA.
struct XlaTarget {
    const char* name;
    void* handler;
};
extern const XlaTarget kXlaTargets[];
extern const size_t kXlaTargetCount;
// The XLA FFI C API version the handlers were compiled against, "major.minor".
extern const char* const kXlaFfiApiVersion;

}  // namespace crossent

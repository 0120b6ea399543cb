// crossent's kernel as XLA custom calls: the handlers that a jitted JAX program calls through the XLA FFI
// (crossent.jax._ffi registers them with jax.ffi.register_ffi_target for the CPU platform).
//
// XLA passes its own buffers, which the kernel reads and writes in place (no copy). Every operand arrives
// in the (outer, classes, inner) view of kernel_api.hpp, with any leading dimensions the batching rule of
// ffi_call(vmap_method="expand_dims") adds: the same number on every operand, each either the batch size
// or 1 (that operand is shared by the whole batch). Each batch item is one kernel call, on crossent's
// OpenMP threads, so a batch item gets the same bits as the same call from NumPy.
//
// A value cannot raise inside a compiled program: class indices outside [0, classes) (and not
// ignore_index) and a negative, infinite or NaN normalizer turn the loss and the gradient they reach into NaN.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#if defined(__SSE__) || defined(__x86_64__)
#include <xmmintrin.h>
#endif

#include "kernel_api.hpp"
#include "runtime.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace crossent {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// XLA runs CPU programs with denormals flushed to zero (MXCSR FTZ and DAZ); the kernel's results, and its
// thread-count invariance, assume IEEE arithmetic as on a call from NumPy. The flags are per thread: the
// calling thread is the first of the OpenMP team, and a thread that OpenMP creates inherits them.
class IeeeDenormals {
   public:
#if defined(__SSE__) || defined(__x86_64__)
    IeeeDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ & ~kFlushBits); }
    ~IeeeDenormals() { _mm_setcsr(saved_); }

   private:
    static constexpr unsigned kFlushBits = 0x8040u;  // FTZ (bit 15) and DAZ (bit 6)
    unsigned saved_;
#endif
};

std::optional<DType> dtype_of(ffi::DataType t) {
    switch (t) {
        case ffi::DataType::F32:
            return DType::f32;
        case ffi::DataType::F64:
            return DType::f64;
        case ffi::DataType::F16:
            return DType::f16;
        case ffi::DataType::BF16:
            return DType::bf16;
        default:
            return std::nullopt;
    }
}

std::optional<TargetKind> index_kind_of(ffi::DataType t) {
    switch (t) {
        case ffi::DataType::S64:
            return TargetKind::i64;
        case ffi::DataType::S32:
            return TargetKind::i32;
        case ffi::DataType::U8:
            return TargetKind::u8;
        default:
            return std::nullopt;
    }
}

size_t byte_width(DType d) { return d == DType::f64 ? 8 : d == DType::f32 ? 4 : 2; }
size_t compute_width(DType d) { return d == DType::f64 ? 8 : 4; }
size_t index_width(TargetKind k) { return k == TargetKind::i64 ? 8 : k == TargetKind::i32 ? 4 : 1; }

// A double to x's storage type, rounded once as NumPy does for the reduced loss (np.array(total, dtype)):
// directly for float32 and float16, through float32 for bfloat16 (ml_dtypes converts a double that way).
uint16_t bits_of_half(double v) {
#ifdef __FLT16_MAX__
    const _Float16 h = static_cast<_Float16>(v);
#else
#error "crossent's XLA handlers need the compiler's _Float16 (GCC 12 or Clang 15 on x86-64 and ARM64)"
#endif
    uint16_t bits;
    std::memcpy(&bits, &h, sizeof bits);
    return bits;
}

uint16_t bits_of_bfloat16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    if (std::isnan(f)) return static_cast<uint16_t>((u >> 16) | 0x0040u);  // stays a quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);                                          // round to nearest even
    return static_cast<uint16_t>(u >> 16);
}

void store_scalar(void* out, double v, DType d) {
    switch (d) {
        case DType::f64:
            *static_cast<double*>(out) = v;
            break;
        case DType::f32:
            *static_cast<float*>(out) = static_cast<float>(v);
            break;
        case DType::f16:
            *static_cast<uint16_t*>(out) = bits_of_half(v);
            break;
        case DType::bf16:
            *static_cast<uint16_t*>(out) = bits_of_bfloat16(static_cast<float>(v));
            break;
    }
}

void fill_nan(void* out, int64_t n, DType d) {
    for (int64_t i = 0; i < n; ++i) store_scalar(static_cast<char*>(out) + static_cast<size_t>(i) * byte_width(d), kNaN, d);
}

// The broadcast batch of ffi_call's expand_dims rule: leading dimensions beyond each operand's own rank.
class Batch {
   public:
    // `rank` is the batch rank; `dims` the batch dimensions of every operand and result seen so far.
    explicit Batch(int rank) : dims_(static_cast<size_t>(rank), 1) {}

    // Adds an operand's leading dimensions; false when they do not broadcast.
    bool add(ffi::Span<const int64_t> operand_dims) {
        for (size_t j = 0; j < dims_.size(); ++j) {
            const int64_t d = operand_dims[j];
            if (d != 1 && dims_[j] != 1 && d != dims_[j]) return false;
            dims_[j] = std::max(dims_[j], d);
        }
        return true;
    }

    int64_t count() const {
        int64_t n = 1;
        for (const int64_t d : dims_) n *= d;
        return n;
    }

    // Byte offset of batch item b in an operand with these dimensions and `item_bytes` per item.
    size_t offset(ffi::Span<const int64_t> operand_dims, int64_t b, size_t item_bytes) const {
        size_t off = 0, stride = item_bytes;
        for (size_t j = dims_.size(); j-- > 0;) {
            const int64_t idx = b % dims_[j];
            b /= dims_[j];
            if (operand_dims[j] != 1) off += static_cast<size_t>(idx) * stride;
            stride *= static_cast<size_t>(operand_dims[j]);
        }
        return off;
    }

    size_t rank() const { return dims_.size(); }

   private:
    std::vector<int64_t> dims_;
};

const void* at(const ffi::AnyBuffer& b, size_t off) { return static_cast<const char*>(b.untyped_data()) + off; }
void* at(ffi::Result<ffi::AnyBuffer> b, size_t off) { return static_cast<char*>(b->untyped_data()) + off; }

ffi::Error invalid(const std::string& what) { return ffi::Error::InvalidArgument("crossent: " + what); }

// The static options of a loss call (FFI attributes).
struct LossAttrs {
    int64_t outer, classes, inner;
    bool probability;
    int64_t ignore_index;
    double label_smoothing, z_loss, softcap;
    int64_t reduction;
    bool zero_if_all_ignored, has_weight, has_normalizer;
};

// Rows whose class index is neither in [0, classes) nor ignore_index, and a copy of the target with class
// 0 in their place, which the kernel then reads safely; the caller overwrites those rows' results.
template <class TI>
std::vector<int64_t> bad_rows(const TI* t, int64_t rows, int64_t classes, int64_t ignore_index, std::vector<char>& safe) {
    std::vector<int64_t> bad;
    safe.resize(static_cast<size_t>(rows) * sizeof(TI));
    TI* s = reinterpret_cast<TI*>(safe.data());
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t v = static_cast<int64_t>(t[r]);
        const bool ok = (v >= 0 && v < classes) || v == ignore_index;
        s[r] = ok ? t[r] : TI(0);
        if (!ok) bad.push_back(r);
    }
    return bad;
}

std::vector<int64_t> bad_rows(const void* t, TargetKind kind, int64_t rows, int64_t classes, int64_t ignore_index,
                              std::vector<char>& safe) {
    switch (kind) {
        case TargetKind::i32:
            return bad_rows(static_cast<const int32_t*>(t), rows, classes, ignore_index, safe);
        case TargetKind::u8:
            return bad_rows(static_cast<const uint8_t*>(t), rows, classes, ignore_index, safe);
        default:
            return bad_rows(static_cast<const int64_t*>(t), rows, classes, ignore_index, safe);
    }
}

// cross_entropy (nll = false) or nll_loss: args x, target, then weight and normalizer where the attributes
// say so; results the loss (a scalar of x's dtype for mean and sum, per-row in the compute type for none)
// and, for cross_entropy when asked, the gradient for a unit upstream gradient (of each row for none).
ffi::Error loss_impl(bool nll, const ffi::AnyBuffer& x, const ffi::AnyBuffer& target, const ffi::RemainingArgs& rest,
                     ffi::Result<ffi::AnyBuffer> loss, std::optional<ffi::Result<ffi::AnyBuffer>> grad,
                     const LossAttrs& a) {
    const std::optional<DType> dtype = dtype_of(x.element_type());
    if (!dtype) return invalid("logits must be float32, float64, float16 or bfloat16");
    const Layout layout{a.outer, a.classes, a.inner};
    const int64_t rows = a.outer * a.inner;
    const size_t x_item = static_cast<size_t>(rows * a.classes) * byte_width(*dtype);
    TargetKind kind = TargetKind::probability;
    if (!a.probability) {
        const std::optional<TargetKind> k = index_kind_of(target.element_type());
        if (!k) return invalid("class-index targets must be int32, int64 or uint8");
        kind = *k;
    } else if (target.element_type() != x.element_type()) {
        return invalid("probability targets must have the logits' dtype");
    }
    const size_t t_item =
        a.probability ? x_item : static_cast<size_t>(rows) * index_width(kind);
    const int batch_rank = static_cast<int>(x.dimensions().size()) - 3;
    if (batch_rank < 0) return invalid("logits must be passed as (outer, classes, inner)");
    Batch batch(batch_rank);
    size_t next = 0;
    std::optional<ffi::AnyBuffer> weight, normalizer;
    if (a.has_weight) {
        auto w = rest.get<ffi::AnyBuffer>(next++);
        if (w.has_error()) return w.error();
        weight = *w;
        if (weight->element_type() != (*dtype == DType::f64 ? ffi::DataType::F64 : ffi::DataType::F32)) {
            return invalid("class weights must be in the compute dtype (float64 for float64 logits, else float32)");
        }
    }
    if (a.has_normalizer) {
        auto n = rest.get<ffi::AnyBuffer>(next++);
        if (n.has_error()) return n.error();
        normalizer = *n;
        if (normalizer->element_type() != ffi::DataType::F64 && normalizer->element_type() != ffi::DataType::F32) {
            return invalid("the normalizer must be float32 or float64");
        }
    }
    // Every operand has the batch rank in front of its own; sizes must match what the attributes say, so
    // that nothing is read or written out of bounds.
    const auto check = [&](ffi::Span<const int64_t> dims, size_t own_rank, int64_t own_elements, const char* what) {
        if (dims.size() != static_cast<size_t>(batch_rank) + own_rank) return invalid(std::string(what) + " has the wrong rank");
        int64_t n = 1;
        for (size_t j = static_cast<size_t>(batch_rank); j < dims.size(); ++j) n *= dims[j];
        if (n != own_elements) return invalid(std::string(what) + " has the wrong size");
        if (!batch.add(dims)) return invalid(std::string(what) + "'s batch dimensions do not broadcast");
        return ffi::Error::Success();
    };
    const bool reduced = a.reduction != static_cast<int64_t>(Reduction::none);
    for (const ffi::Error& e : {
             check(x.dimensions(), 3, rows * a.classes, "logits"),
             check(target.dimensions(), a.probability ? 3 : 2, a.probability ? rows * a.classes : rows, "target"),
             weight ? check(weight->dimensions(), 1, a.classes, "weight") : ffi::Error::Success(),
             normalizer ? check(normalizer->dimensions(), 0, 1, "normalizer") : ffi::Error::Success(),
             check(loss->dimensions(), reduced ? 0 : 2, reduced ? 1 : rows, "loss"),
             grad ? check((*grad)->dimensions(), 3, rows * a.classes, "grad") : ffi::Error::Success(),
         }) {
        if (e.failure()) return e;
    }
    if (!reduced && loss->element_type() != (*dtype == DType::f64 ? ffi::DataType::F64 : ffi::DataType::F32)) {
        return invalid("per-row losses are returned in the compute dtype");
    }
    if (reduced && loss->element_type() != x.element_type()) return invalid("the loss has the logits' dtype");
    if (grad && (*grad)->element_type() != x.element_type()) return invalid("the gradient has the logits' dtype");

    const Kernels& kernels = active_kernels();
    const size_t loss_item = reduced ? byte_width(*dtype) : static_cast<size_t>(rows) * compute_width(*dtype);
    std::vector<char> safe_target;
    IeeeDenormals ieee;
    for (int64_t b = 0; b < batch.count(); ++b) {
        LossCall call;
        call.x = at(x, batch.offset(x.dimensions(), b, x_item));
        call.dtype = *dtype;
        call.layout = layout;
        call.target = at(target, batch.offset(target.dimensions(), b, t_item));
        call.target_kind = kind;
        call.weight = weight ? at(*weight, batch.offset(weight->dimensions(), b, static_cast<size_t>(a.classes) *
                                                                                     compute_width(*dtype)))
                             : nullptr;
        call.ignore_index = a.ignore_index;
        call.label_smoothing = a.label_smoothing;
        call.z_loss = a.z_loss;
        call.softcap = a.softcap;
        call.reduction = static_cast<Reduction>(a.reduction);
        call.zero_if_all_ignored = a.zero_if_all_ignored;
        call.threads = active_threads();
        void* loss_out = at(loss, batch.offset(loss->dimensions(), b, loss_item));
        void* grad_out = grad ? at(*grad, batch.offset((*grad)->dimensions(), b, x_item)) : nullptr;
        call.grad = grad_out;
        call.loss_rows = reduced ? nullptr : loss_out;
        // The one place the normalizer operand reaches the kernel.
        bool all_nan = false;
        if (normalizer) {
            const void* p = at(*normalizer, batch.offset(normalizer->dimensions(), b, compute_width(*dtype)));
            const double v = normalizer->element_type() == ffi::DataType::F64 ? *static_cast<const double*>(p)
                                                                              : *static_cast<const float*>(p);
            // 0 is a valid normalizer (mean divides by it, as for an all-ignored batch); a negative,
            // infinite or NaN one has no right loss, and no error can be raised under jit.
            all_nan = !(v >= 0.0 && v < std::numeric_limits<double>::infinity());
            call.has_normalizer = true;
            call.normalizer = v;
        }
        std::vector<int64_t> bad;
        if (!a.probability && !class_indices_valid(call.target, kind, rows, a.classes, a.ignore_index)) {
            // Class 0 in their place keeps the kernel in bounds; the rows' results are overwritten below.
            bad = bad_rows(call.target, kind, rows, a.classes, a.ignore_index, safe_target);
            call.target = safe_target.data();
            // A mean or sum with a bad index has no value; nor has the gradient of any row of a mean (its
            // denominator is unknown), nor, to keep one rule for both, that of a sum.
            if (reduced) all_nan = true;
        }
        double total = kNaN;
        if (!all_nan) total = nll ? kernels.nll_loss(call) : kernels.cross_entropy(call);
        if (all_nan) {
            if (reduced) {
                store_scalar(loss_out, kNaN, *dtype);
            } else {
                fill_nan(loss_out, rows, *dtype == DType::f64 ? DType::f64 : DType::f32);
            }
            if (grad_out) fill_nan(grad_out, rows * a.classes, *dtype);
            continue;
        }
        if (reduced) store_scalar(loss_out, total, *dtype);
        const DType cdt = *dtype == DType::f64 ? DType::f64 : DType::f32;
        for (const int64_t r : bad) {
            if (!reduced) store_scalar(static_cast<char*>(loss_out) + static_cast<size_t>(r) * byte_width(cdt), kNaN, cdt);
            if (grad_out) {
                const int64_t o = r / a.inner, i = r % a.inner;
                for (int64_t c = 0; c < a.classes; ++c) {
                    const int64_t e = (o * a.classes + c) * a.inner + i;
                    store_scalar(static_cast<char*>(grad_out) + static_cast<size_t>(e) * byte_width(*dtype), kNaN,
                                 *dtype);
                }
            }
        }
    }
    return ffi::Error::Success();
}

LossAttrs loss_attrs(int64_t outer, int64_t classes, int64_t inner, bool probability, int64_t ignore_index,
                     double label_smoothing, double z_loss, double softcap, int64_t reduction, bool zero_if_all_ignored,
                     bool has_weight, bool has_normalizer) {
    return {outer,     classes,   inner, probability, ignore_index, label_smoothing, z_loss, softcap,
            reduction, zero_if_all_ignored, has_weight, has_normalizer};
}

ffi::Error cross_entropy_impl(ffi::AnyBuffer x, ffi::AnyBuffer target, ffi::RemainingArgs rest,
                              ffi::Result<ffi::AnyBuffer> loss, ffi::RemainingRets more, int64_t outer, int64_t classes,
                              int64_t inner, bool probability, int64_t ignore_index, double label_smoothing,
                              double z_loss, double softcap, int64_t reduction, bool zero_if_all_ignored,
                              bool has_weight, bool has_normalizer) {
    std::optional<ffi::Result<ffi::AnyBuffer>> grad;
    if (more.size() > 0) {
        auto g = more.get<ffi::AnyBuffer>(0);
        if (g.has_error()) return g.error();
        grad = *g;
    }
    return loss_impl(false, x, target, rest, loss, grad,
                     loss_attrs(outer, classes, inner, probability, ignore_index, label_smoothing, z_loss, softcap,
                                reduction, zero_if_all_ignored, has_weight, has_normalizer));
}

ffi::Error nll_loss_impl(ffi::AnyBuffer x, ffi::AnyBuffer target, ffi::RemainingArgs rest,
                         ffi::Result<ffi::AnyBuffer> loss, int64_t outer, int64_t classes, int64_t inner,
                         int64_t ignore_index, int64_t reduction, bool zero_if_all_ignored, bool has_weight,
                         bool has_normalizer) {
    return loss_impl(true, x, target, rest, loss, std::nullopt,
                     loss_attrs(outer, classes, inner, false, ignore_index, 0.0, 0.0, 0.0, reduction,
                                zero_if_all_ignored, has_weight, has_normalizer));
}

// log_softmax, softmax or logsumexp (op: SoftmaxOp) of x viewed as (outer, classes, inner), into out of
// x's dtype: (outer, classes, inner), or (outer, inner) for logsumexp.
ffi::Error softmax_impl(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> out, int64_t outer, int64_t classes,
                        int64_t inner, int64_t op) {
    const std::optional<DType> dtype = dtype_of(x.element_type());
    if (!dtype) return invalid("x must be float32, float64, float16 or bfloat16");
    if (op < 0 || op > static_cast<int64_t>(SoftmaxOp::logsumexp)) return invalid("unknown softmax op");
    if (out->element_type() != x.element_type()) return invalid("out has x's dtype");
    const bool lse = op == static_cast<int64_t>(SoftmaxOp::logsumexp);
    const int batch_rank = static_cast<int>(x.dimensions().size()) - 3;
    if (batch_rank < 0) return invalid("x must be passed as (outer, classes, inner)");
    Batch batch(batch_rank);
    const int64_t n_in = outer * classes * inner, n_out = lse ? outer * inner : n_in;
    const auto fits = [&](ffi::Span<const int64_t> dims, size_t own_rank, int64_t own) {
        if (dims.size() != static_cast<size_t>(batch_rank) + own_rank) return false;
        int64_t n = 1;
        for (size_t j = static_cast<size_t>(batch_rank); j < dims.size(); ++j) n *= dims[j];
        return n == own && batch.add(dims);
    };
    if (!fits(x.dimensions(), 3, n_in) || !fits(out->dimensions(), lse ? 2 : 3, n_out)) {
        return invalid("x and out do not match (outer, classes, inner)");
    }
    const Kernels& kernels = active_kernels();
    const size_t w = byte_width(*dtype);
    IeeeDenormals ieee;
    for (int64_t b = 0; b < batch.count(); ++b) {
        SoftmaxCall call;
        call.x = at(x, batch.offset(x.dimensions(), b, static_cast<size_t>(n_in) * w));
        call.out = at(out, batch.offset(out->dimensions(), b, static_cast<size_t>(n_out) * w));
        call.dtype = *dtype;
        call.layout = {outer, classes, inner};
        call.op = static_cast<SoftmaxOp>(op);
        call.threads = active_threads();
        kernels.softmax(call);
    }
    return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER(kCrossEntropyHandler, cross_entropy_impl,
                       ffi::Ffi::Bind()
                           .Arg<ffi::AnyBuffer>()
                           .Arg<ffi::AnyBuffer>()
                           .RemainingArgs()
                           .Ret<ffi::AnyBuffer>()
                           .RemainingRets()
                           .Attr<int64_t>("outer")
                           .Attr<int64_t>("classes")
                           .Attr<int64_t>("inner")
                           .Attr<bool>("probability")
                           .Attr<int64_t>("ignore_index")
                           .Attr<double>("label_smoothing")
                           .Attr<double>("z_loss")
                           .Attr<double>("softcap")
                           .Attr<int64_t>("reduction")
                           .Attr<bool>("zero_if_all_ignored")
                           .Attr<bool>("has_weight")
                           .Attr<bool>("has_normalizer"));

XLA_FFI_DEFINE_HANDLER(kNllLossHandler, nll_loss_impl,
                       ffi::Ffi::Bind()
                           .Arg<ffi::AnyBuffer>()
                           .Arg<ffi::AnyBuffer>()
                           .RemainingArgs()
                           .Ret<ffi::AnyBuffer>()
                           .Attr<int64_t>("outer")
                           .Attr<int64_t>("classes")
                           .Attr<int64_t>("inner")
                           .Attr<int64_t>("ignore_index")
                           .Attr<int64_t>("reduction")
                           .Attr<bool>("zero_if_all_ignored")
                           .Attr<bool>("has_weight")
                           .Attr<bool>("has_normalizer"));

XLA_FFI_DEFINE_HANDLER(kSoftmaxHandler, softmax_impl,
                       ffi::Ffi::Bind()
                           .Arg<ffi::AnyBuffer>()
                           .Ret<ffi::AnyBuffer>()
                           .Attr<int64_t>("outer")
                           .Attr<int64_t>("classes")
                           .Attr<int64_t>("inner")
                           .Attr<int64_t>("op"));

const XlaTarget kXlaTargets[] = {
    {"crossent_cross_entropy", reinterpret_cast<void*>(kCrossEntropyHandler)},
    {"crossent_nll_loss", reinterpret_cast<void*>(kNllLossHandler)},
    {"crossent_softmax", reinterpret_cast<void*>(kSoftmaxHandler)},
};
const size_t kXlaTargetCount = sizeof(kXlaTargets) / sizeof(kXlaTargets[0]);

#define CROSSENT_STR2(x) #x
#define CROSSENT_STR(x) CROSSENT_STR2(x)
const char* const kXlaFfiApiVersion = CROSSENT_STR(XLA_FFI_API_MAJOR) "." CROSSENT_STR(XLA_FFI_API_MINOR);

}  // namespace crossent

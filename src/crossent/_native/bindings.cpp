// The Python binding of the native kernel: checks sizes, releases the GIL, calls the best build of
// kernel.cpp for this CPU. Shapes, dtypes and options are validated in Python (crossent._validate);
// this layer only refuses what would make the kernel read or write out of bounds.

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>

#include <cstdlib>
#include <stdexcept>
#include <string>

#include "kernel_api.hpp"
#include "runtime.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace nb = nanobind;
// Inputs are taken read-only, so that read-only NumPy arrays (np.broadcast_to, read-only memory maps)
// pass; outputs must be writable.
using Array = nb::ndarray<nb::ro, nb::device::cpu, nb::c_contig>;
using OutArray = nb::ndarray<nb::device::cpu, nb::c_contig>;

namespace {

using crossent::Kernels;

// Whether this CPU runs the build of kernel.cpp for `isa`, and that build exists in this binary.
bool isa_supported(const std::string& isa) {
    if (isa == "baseline") return true;
#if defined(__x86_64__) || defined(_M_X64)
    __builtin_cpu_init();
#if defined(CROSSENT_HAVE_AVX2)
    if (isa == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
#if defined(CROSSENT_HAVE_AVX512)
    if (isa == "avx512") {
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    }
#endif
#endif
    return false;
}

Kernels kernels_for(const std::string& isa) {
#if defined(CROSSENT_HAVE_AVX512)
    if (isa == "avx512") return crossent::kernels_avx512();
#endif
#if defined(CROSSENT_HAVE_AVX2)
    if (isa == "avx2") return crossent::kernels_avx2();
#endif
    return crossent::kernels_baseline();
}

const char* const kIsasBestFirst[] = {"avx512", "avx2", "baseline"};

Kernels best_kernels() {
    for (const char* isa : kIsasBestFirst) {
        if (isa_supported(isa)) return kernels_for(isa);
    }
    return crossent::kernels_baseline();
}

Kernels g_kernels = best_kernels();

int default_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();  // honours OMP_NUM_THREADS
#else
    return 1;
#endif
}

int g_threads = default_threads();

template <class A>
int64_t elements(const A& a) { return a.is_valid() ? static_cast<int64_t>(a.size()) : 0; }

const void* data_or_null(const Array& a) { return a.is_valid() ? a.data() : nullptr; }

template <class A>
void require_size(const A& a, int64_t expected, const char* what) {
    if (a.is_valid() && elements(a) != expected) {
        throw nb::value_error((std::string(what) + " has " + std::to_string(elements(a)) + " elements, expected " +
                               std::to_string(expected))
                                  .c_str());
    }
}

crossent::LossCall loss_call(const Array& x, int dtype, int64_t outer, int64_t classes, int64_t inner,
                             const Array& target, int target_kind, const Array& weight, int64_t ignore_index,
                             double label_smoothing, double z_loss, double softcap, int reduction, bool has_normalizer,
                             double normalizer, bool zero_if_all_ignored, const OutArray& grad, const Array& grad_rows,
                             double grad_scale, const OutArray& loss_rows) {
    const int64_t rows = outer * inner;
    require_size(x, rows * classes, "logits");
    const bool probability = target_kind == static_cast<int>(crossent::TargetKind::probability);
    require_size(target, probability ? rows * classes : rows, "target");
    require_size(weight, classes, "weight");
    require_size(grad, rows * classes, "grad");
    require_size(grad_rows, rows, "grad_rows");
    require_size(loss_rows, rows, "loss_rows");
    if (!target.is_valid()) throw nb::value_error("target is required");
    crossent::LossCall call;
    call.x = x.data();
    call.dtype = static_cast<crossent::DType>(dtype);
    call.layout = {outer, classes, inner};
    call.target = target.data();
    call.target_kind = static_cast<crossent::TargetKind>(target_kind);
    call.weight = data_or_null(weight);
    call.ignore_index = ignore_index;
    call.label_smoothing = label_smoothing;
    call.z_loss = z_loss;
    call.softcap = softcap;
    call.reduction = static_cast<crossent::Reduction>(reduction);
    call.has_normalizer = has_normalizer;
    call.normalizer = normalizer;
    call.zero_if_all_ignored = zero_if_all_ignored;
    call.grad = grad.is_valid() ? grad.data() : nullptr;
    call.grad_rows = data_or_null(grad_rows);
    call.grad_scale = grad_scale;
    call.loss_rows = loss_rows.is_valid() ? loss_rows.data() : nullptr;
    call.threads = g_threads;
    return call;
}

// Whether every class index is in [0, classes) or equal to ignore_index: one branch-free pass that the
// compiler vectorises, where NumPy needs four (the Python check then finds and names an offender).
// Split over the threads past this many targets (the 524288 labels of 8x256x256 segmentation): the
// check is a serial pass before the parallel kernel otherwise.
constexpr int64_t kParallelCheckFrom = 1 << 17;

template <class TI>
bool indices_valid(const TI* t, int64_t n, int64_t classes, int64_t ignore_index) {
    int ok = 1;
#pragma omp parallel for schedule(static) reduction(& : ok) if (n >= kParallelCheckFrom) num_threads(g_threads)
    for (int64_t i = 0; i < n; ++i) {
        const int64_t v = static_cast<int64_t>(t[i]);
        ok &= static_cast<int>((v >= 0 && v < classes) || v == ignore_index);
    }
    return ok != 0;
}

}  // namespace

bool crossent::class_indices_valid(const void* t, TargetKind kind, int64_t n, int64_t classes, int64_t ignore_index) {
    switch (kind) {
        case crossent::TargetKind::i32:
            return indices_valid(static_cast<const int32_t*>(t), n, classes, ignore_index);
        case crossent::TargetKind::u8:
            return indices_valid(static_cast<const uint8_t*>(t), n, classes, ignore_index);
        case crossent::TargetKind::i64:
            return indices_valid(static_cast<const int64_t*>(t), n, classes, ignore_index);
        default:
            return false;
    }
}

const crossent::Kernels& crossent::active_kernels() { return g_kernels; }
int crossent::active_threads() { return g_threads; }

namespace {

bool class_indices_valid(const Array& target, int target_kind, int64_t classes, int64_t ignore_index) {
    return crossent::class_indices_valid(target.data(), static_cast<crossent::TargetKind>(target_kind),
                                         elements(target), classes, ignore_index);
}

// Binds name(x, out) for arrays of V to one of the kernel's elementwise functions (its own exp and log,
// exposed for their accuracy tests), looked up in g_kernels at each call so that select_isa applies.
template <class V>
void def_elementwise(nb::module_& m, const char* name, void (*Kernels::*fn)(const V*, V*, int64_t, int)) {
    using Vector = nb::ndarray<V, nb::device::cpu, nb::c_contig>;
    m.def(
        name,
        [fn](Vector in, Vector out) {
            require_size(out, elements(in), "out");
            nb::gil_scoped_release release;
            (g_kernels.*fn)(in.data(), out.data(), static_cast<int64_t>(in.size()), g_threads);
        },
        nb::arg("x"), nb::arg("out"), "The kernel's own vectorised function of that name, for accuracy tests.");
}

}  // namespace

NB_MODULE(_crossent_native, m) {
    m.doc() = "crossent's fused cross-entropy kernel (C++17, OpenMP, SIMD).";

    m.def(
        "cross_entropy",
        [](const Array& x, int dtype, int64_t outer, int64_t classes, int64_t inner, const Array& target,
           int target_kind, const Array& weight, int64_t ignore_index, double label_smoothing, double z_loss,
           double softcap, int reduction, bool has_normalizer, double normalizer, bool zero_if_all_ignored,
           const OutArray& grad, const Array& grad_rows, double grad_scale, const OutArray& loss_rows) {
            const crossent::LossCall call =
                loss_call(x, dtype, outer, classes, inner, target, target_kind, weight, ignore_index, label_smoothing,
                          z_loss, softcap, reduction, has_normalizer, normalizer, zero_if_all_ignored, grad, grad_rows,
                          grad_scale, loss_rows);
            nb::gil_scoped_release release;
            return g_kernels.cross_entropy(call);
        },
        nb::arg("x"), nb::arg("dtype"), nb::arg("outer"), nb::arg("classes"), nb::arg("inner"), nb::arg("target"),
        nb::arg("target_kind"), nb::arg("weight").none(), nb::arg("ignore_index"), nb::arg("label_smoothing"),
        nb::arg("z_loss"), nb::arg("softcap"), nb::arg("reduction"), nb::arg("has_normalizer"), nb::arg("normalizer"),
        nb::arg("zero_if_all_ignored"), nb::arg("grad").none(), nb::arg("grad_rows").none(), nb::arg("grad_scale"),
        nb::arg("loss_rows").none(),
        "Fused softmax cross-entropy over an (outer, classes, inner) view; returns the reduced loss.");

    m.def(
        "nll_loss",
        [](const Array& x, int dtype, int64_t outer, int64_t classes, int64_t inner, const Array& target,
           int target_kind, const Array& weight, int64_t ignore_index, int reduction, bool has_normalizer,
           double normalizer, bool zero_if_all_ignored, const OutArray& loss_rows) {
            const crossent::LossCall call =
                loss_call(x, dtype, outer, classes, inner, target, target_kind, weight, ignore_index, 0.0, 0.0, 0.0,
                          reduction, has_normalizer, normalizer, zero_if_all_ignored, OutArray(), Array(), 1.0,
                          loss_rows);
            nb::gil_scoped_release release;
            return g_kernels.nll_loss(call);
        },
        nb::arg("x"), nb::arg("dtype"), nb::arg("outer"), nb::arg("classes"), nb::arg("inner"), nb::arg("target"),
        nb::arg("target_kind"), nb::arg("weight").none(), nb::arg("ignore_index"), nb::arg("reduction"),
        nb::arg("has_normalizer"), nb::arg("normalizer"), nb::arg("zero_if_all_ignored"), nb::arg("loss_rows").none());

    m.def(
        "softmax",
        [](const Array& x, const OutArray& out, int dtype, int64_t outer, int64_t classes, int64_t inner, int op) {
            require_size(x, outer * classes * inner, "x");
            const bool lse = op == static_cast<int>(crossent::SoftmaxOp::logsumexp);
            require_size(out, lse ? outer * inner : outer * classes * inner, "out");
            crossent::SoftmaxCall call;
            call.x = x.data();
            call.out = out.data();
            call.dtype = static_cast<crossent::DType>(dtype);
            call.layout = {outer, classes, inner};
            call.op = static_cast<crossent::SoftmaxOp>(op);
            call.threads = g_threads;
            nb::gil_scoped_release release;
            g_kernels.softmax(call);
        },
        nb::arg("x"), nb::arg("out"), nb::arg("dtype"), nb::arg("outer"), nb::arg("classes"), nb::arg("inner"),
        nb::arg("op"));

    m.def(
        "token_stats",
        [](const Array& x, int dtype, int64_t rows, int64_t classes, const Array& target, int target_kind,
           int64_t ignore_index, double inv_temperature, const OutArray& log_prob, const OutArray& entropy,
           const OutArray& logsumexp, const Array& g_log_prob, const Array& g_entropy, const Array& g_logsumexp,
           const OutArray& grad) {
            require_size(x, rows * classes, "logits");
            if (!target.is_valid()) throw nb::value_error("target is required");
            require_size(target, rows, "target");
            for (const OutArray* out : {&log_prob, &entropy, &logsumexp}) require_size(*out, rows, "statistic");
            for (const Array* g : {&g_log_prob, &g_entropy, &g_logsumexp}) require_size(*g, rows, "upstream");
            require_size(grad, rows * classes, "grad");
            crossent::TokenStatsCall call;
            call.x = x.data();
            call.dtype = static_cast<crossent::DType>(dtype);
            call.rows = rows;
            call.classes = classes;
            call.target = target.data();
            call.target_kind = static_cast<crossent::TargetKind>(target_kind);
            call.ignore_index = ignore_index;
            call.inv_temperature = inv_temperature;
            call.log_prob = log_prob.is_valid() ? log_prob.data() : nullptr;
            call.entropy = entropy.is_valid() ? entropy.data() : nullptr;
            call.logsumexp = logsumexp.is_valid() ? logsumexp.data() : nullptr;
            call.g_log_prob = data_or_null(g_log_prob);
            call.g_entropy = data_or_null(g_entropy);
            call.g_logsumexp = data_or_null(g_logsumexp);
            call.grad = grad.is_valid() ? grad.data() : nullptr;
            call.threads = g_threads;
            nb::gil_scoped_release release;
            g_kernels.token_stats(call);
        },
        nb::arg("x"), nb::arg("dtype"), nb::arg("rows"), nb::arg("classes"), nb::arg("target"),
        nb::arg("target_kind"), nb::arg("ignore_index"), nb::arg("inv_temperature"), nb::arg("log_prob").none(),
        nb::arg("entropy").none(), nb::arg("logsumexp").none(), nb::arg("g_log_prob").none(),
        nb::arg("g_entropy").none(), nb::arg("g_logsumexp").none(), nb::arg("grad").none(),
        "Per-row log-probability of the target, entropy and logsumexp of x / T over (rows, classes); with "
        "upstream gradients, their gradient with respect to x.");

    def_elementwise<float>(m, "exp", &Kernels::exp_f32);
    def_elementwise<double>(m, "exp", &Kernels::exp_f64);
    def_elementwise<float>(m, "log", &Kernels::log_f32);
    def_elementwise<double>(m, "log", &Kernels::log_f64);

    m.def(
        "plain_cross_entropy",
        [](const Array& x, const Array& target, int64_t ignore_index, int reduction) -> nb::object {
            // The plainest call, float32/float64 (rows, classes) logits and (rows,) class indices, mean or
            // sum, with its checks done here: a small call is otherwise dominated by Python-side argument
            // handling. None for anything else, or an index out of range: the general path then checks
            // and reports.
            const nb::dlpack::dtype xt = x.dtype(), tt = target.dtype();
            const int dtype = xt == nb::dtype<float>()    ? static_cast<int>(crossent::DType::f32)
                              : xt == nb::dtype<double>() ? static_cast<int>(crossent::DType::f64)
                                                          : -1;
            const int kind = tt == nb::dtype<int64_t>()   ? static_cast<int>(crossent::TargetKind::i64)
                             : tt == nb::dtype<int32_t>() ? static_cast<int>(crossent::TargetKind::i32)
                             : tt == nb::dtype<uint8_t>() ? static_cast<int>(crossent::TargetKind::u8)
                                                          : -1;
            const bool reduced = reduction == static_cast<int>(crossent::Reduction::mean) ||
                                 reduction == static_cast<int>(crossent::Reduction::sum);
            if (dtype < 0 || kind < 0 || !reduced || x.ndim() != 2 || target.ndim() != 1 ||
                target.shape(0) != x.shape(0) || x.size() == 0) {
                return nb::none();
            }
            const int64_t rows = static_cast<int64_t>(x.shape(0)), classes = static_cast<int64_t>(x.shape(1));
            const crossent::LossCall call =
                loss_call(x, dtype, rows, classes, 1, target, kind, Array(), ignore_index, 0.0, 0.0, 0.0, reduction,
                          false, 0.0, false, OutArray(), Array(), 1.0, OutArray());
            bool valid;
            double total = 0.0;
            {
                nb::gil_scoped_release release;
                valid = class_indices_valid(target, kind, classes, ignore_index);
                if (valid) total = g_kernels.cross_entropy(call);
            }
            if (!valid) return nb::none();
            return nb::float_(total);
        },
        nb::arg("x").noconvert(), nb::arg("target").noconvert(), nb::arg("ignore_index"), nb::arg("reduction"),
        "cross_entropy of (rows, classes) logits and (rows,) class indices without options, or None.");

    m.def(
        "class_indices_valid",
        [](const Array& target, int target_kind, int64_t classes, int64_t ignore_index) {
            nb::gil_scoped_release release;
            return class_indices_valid(target, target_kind, classes, ignore_index);
        },
        nb::arg("target"), nb::arg("target_kind"), nb::arg("classes"), nb::arg("ignore_index"),
        "Whether every class index is in [0, classes) or equals ignore_index.");

    m.def("set_num_threads", [](int n) {
        if (n < 1) throw nb::value_error(("threads must be >= 1, got " + std::to_string(n)).c_str());
        g_threads = n;
    });
    m.def("get_num_threads", []() { return g_threads; });
    m.def("isa", []() { return std::string(g_kernels.isa); });
    m.def("available_isas", []() {
        nb::list names;
        for (const char* isa : kIsasBestFirst) {
            if (isa_supported(isa)) names.append(isa);
        }
        return names;
    });
    m.def(
        "select_isa",
        [](const std::string& name) {
            if (name == "best") {
                g_kernels = best_kernels();
            } else if (isa_supported(name)) {
                g_kernels = kernels_for(name);
            } else {
                throw nb::value_error(("instruction set '" + name + "' is not available on this CPU or build").c_str());
            }
        },
        nb::arg("name"), "Use one build of the kernel (tests compare them); 'best' restores the default.");
#ifdef CROSSENT_XLA_FFI
    m.def(
        "xla_targets",
        []() {
            nb::dict targets;
            for (size_t i = 0; i < crossent::kXlaTargetCount; ++i) {
                targets[crossent::kXlaTargets[i].name] = nb::capsule(crossent::kXlaTargets[i].handler);
            }
            return targets;
        },
        "The XLA FFI handlers (name: PyCapsule) for jax.ffi.register_ffi_target(..., platform='cpu').");
    m.attr("xla_ffi_api_version") = crossent::kXlaFfiApiVersion;
#endif
#ifdef _OPENMP
    m.attr("openmp") = true;
#else
    m.attr("openmp") = false;
#endif
}

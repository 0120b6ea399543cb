// The interface between the Python binding and the kernel.
//
// kernel.cpp is compiled once per instruction set (baseline, AVX2, AVX-512 on x86-64; baseline on
// other CPUs) into its own namespace; the binding picks the best build the CPU supports at import time.
// Every array is C-contiguous and viewed as (outer, classes, inner): classes contiguous when inner == 1,
// the (N, C, H, W) segmentation layout when inner == H * W.
#pragma once

#include <cstdint>

namespace crossent {

enum class DType : int { f32 = 0, f64 = 1, f16 = 2, bf16 = 3 };
// Class-index targets of three integer widths, or class probabilities of the logits' dtype.
enum class TargetKind : int { i64 = 0, i32 = 1, u8 = 2, probability = 3 };
enum class Reduction : int { none = 0, mean = 1, sum = 2 };
enum class SoftmaxOp : int { log_softmax = 0, softmax = 1, logsumexp = 2 };

struct Layout {
    int64_t outer = 0;
    int64_t classes = 0;
    int64_t inner = 1;
};

// One cross-entropy (or NLL) call. "Compute type" is float for f32/f16/bf16 logits, double for f64.
struct LossCall {
    const void* x = nullptr;  // logits (log-probabilities for NLL), dtype
    DType dtype = DType::f32;
    Layout layout;
    const void* target = nullptr;  // (outer, inner) indices, or (outer, classes, inner) probabilities
    TargetKind target_kind = TargetKind::i64;
    const void* weight = nullptr;  // (classes,) in the compute type, or null for all ones
    int64_t ignore_index = -100;
    double label_smoothing = 0.0;
    double z_loss = 0.0;
    double softcap = 0.0;  // 0: no capping
    Reduction reduction = Reduction::mean;
    bool has_normalizer = false;  // true: mean divides by `normalizer` (0 included); else torch's denominator
    double normalizer = 0.0;
    bool zero_if_all_ignored = false;
    // Outputs, each optional:
    void* grad = nullptr;             // d(loss)/d(x), dtype and layout of x
    const void* grad_rows = nullptr;  // upstream gradient per row (reduction none), compute type
    double grad_scale = 1.0;          // upstream gradient of the reduced loss (mean, sum)
    void* loss_rows = nullptr;        // per-row loss (reduction none), compute type
    int threads = 1;
};

struct SoftmaxCall {
    const void* x = nullptr;
    void* out = nullptr;  // x's dtype; (outer, classes, inner), or (outer, inner) for logsumexp
    DType dtype = DType::f32;
    Layout layout;
    SoftmaxOp op = SoftmaxOp::log_softmax;
    int threads = 1;
};

// Per-row statistics of tempered logits z = x / T over (rows, classes) with the classes contiguous: the
// target's log-probability z_t - lse(z), the entropy lse(z) - sum_c p_c z_c, and lse(z); for an ignored
// (or out-of-range) target 0, 0 and lse(z). With upstream gradients per row (any of the three may be
// null for zero), d/dx of sum_r g_lp[r] log_prob[r] + g_ent[r] entropy[r] + g_lse[r] lse[r] is written to
// grad (x's dtype; it may be x itself: each row is read before it is written).
struct TokenStatsCall {
    const void* x = nullptr;
    DType dtype = DType::f32;
    int64_t rows = 0;
    int64_t classes = 0;
    const void* target = nullptr;  // (rows,) class indices
    TargetKind target_kind = TargetKind::i64;
    int64_t ignore_index = -100;
    double inv_temperature = 1.0;
    void* log_prob = nullptr;  // (rows,) each, compute type, optional
    void* entropy = nullptr;
    void* logsumexp = nullptr;
    const void* g_log_prob = nullptr;  // (rows,) each, compute type, optional
    const void* g_entropy = nullptr;
    const void* g_logsumexp = nullptr;
    void* grad = nullptr;
    int threads = 1;
};

struct Kernels {
    const char* isa;
    // Returns the reduced loss (mean or sum) in double; 0 for reduction none (rows go to loss_rows).
    double (*cross_entropy)(const LossCall&);
    double (*nll_loss)(const LossCall&);
    void (*softmax)(const SoftmaxCall&);
    // The vectorised exponential and logarithm themselves, exposed so that their accuracy can be tested.
    void (*exp_f32)(const float*, float*, int64_t, int);
    void (*exp_f64)(const double*, double*, int64_t, int);
    void (*log_f32)(const float*, float*, int64_t, int);
    void (*log_f64)(const double*, double*, int64_t, int);
    void (*token_stats)(const TokenStatsCall&);
};

Kernels kernels_baseline();
#if defined(CROSSENT_HAVE_AVX2)
Kernels kernels_avx2();
#endif
#if defined(CROSSENT_HAVE_AVX512)
Kernels kernels_avx512();
#endif

}  // namespace crossent

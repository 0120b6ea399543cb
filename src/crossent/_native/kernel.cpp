// The fused cross-entropy kernel: softmax statistics, loss and gradient in one sweep over the logits.
//
// This file is compiled once per instruction set (CROSSENT_ISA = baseline, avx2, avx512); the loops
// are plain C++ with `omp simd` hints that the compiler turns into SIMD code for that target.
//
// Per row of C logits (classes contiguous) the kernel
//   1. streams the row once from memory, in chunks, for its maximum m and s = sum_c exp(x_c - m) (an
//      online softmax: see online_row), storing the exponentials in a row of the thread's own if a
//      gradient is asked for, and then the sums the options need (label smoothing, probability targets)
//      from L2 (a 32k-class float row is 128 KiB),
//   2. for the gradient, writes p_c * A - B_c, p_c = exp(x_c - m) / s, from the stored exponentials
//      while they are still in L2,
// so DRAM sees one read of the logits and one write of the gradient: the memory floor of the problem.
// Only scalars are kept per row. The (N, C, H, W) layout runs the same steps on tiles of H*W positions,
// vectorised across positions.
//
// Determinism: rows are grouped into fixed work items; each item sums its rows' losses in order, and
// the items' partial sums are added in order at the end, so the result is bitwise the same for any
// number of threads.

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "kernel_api.hpp"
#if defined(__AVX__)
#include <immintrin.h>
#endif

#ifndef CROSSENT_ISA
#define CROSSENT_ISA baseline
#endif
#define CROSSENT_CAT_(a, b) a##b
#define CROSSENT_CAT(a, b) CROSSENT_CAT_(a, b)

namespace crossent {
namespace CROSSENT_CAT(isa_, CROSSENT_ISA) {
namespace {

template <class To, class From>
inline To bits_as(From from) {
    static_assert(sizeof(To) == sizeof(From), "bit cast between types of different sizes");
    To to;
    std::memcpy(&to, &from, sizeof(To));
    return to;
}

// ---------------------------------------------------------------------------------------------------
// exp and tanh, branch-free so that loops calling them vectorise.
//
// exp(x) = 2^k * exp(r) with k = round(x / ln 2) and r = x - k ln 2 in [-ln2/2, ln2/2]. Adding the
// "shifter" 1.5 * 2^23 (2^52 for double) rounds x / ln 2 to an integer that lands in the low mantissa
// bits, so k needs no float-to-int conversion (which AVX2 lacks for doubles); those same bits, moved
// into the exponent field, give 2^k. ln 2 is split into a head with trailing zero bits (k * head is
// exact) and a tail (Cody & Waite). exp(r) - 1 - r is r^2 times a polynomial: for float a minimax
// fit of degree 4, for double the Taylor series to r^13 (remainder below 0.1 ulp on |r| <= 0.347).
// The polynomials are evaluated by Estrin's scheme (pairs of terms, then pairs of pairs) rather than
// Horner's: fewer operations in a row, so that more loop iterations are in flight at once. The loss's
// passes are bound by this latency more than by the FMA units: with this scheme, the shorter fit and
// vexp's single clamp, the 4096x32768 float forward went from 38.5 to 30.0 ms (AVX2, AMD EPYC, 2 threads).
//
// vexp takes only what the kernel passes (a logit minus a running maximum: x <= kExpHeadroom = 16, or
// NaN) and spends no instructions on overflow; vexp_whole_range adds the overflow to inf for the
// accuracy test.

struct ExpParts {
    // exp(x) = scale * (1 + em1_r); kept apart so that expm1 avoids cancelling near 0.
    float scale;
    float em1_r;
};

inline ExpParts exp_parts(float x) {
    const float shifter = 0x1.8p23f;
    const float kd = x * 1.44269504088896341f + shifter;
    const float k = kd - shifter;
    float r = x - k * 0.693359375f;  // ln 2 head: 9 significant bits, so k * head is exact
    r = r - k * -2.12194440e-4f;     // ln 2 tail
    // p is the minimax fit for relative error that tools/fit_exp_polynomial.py derives: 0.064 half-ulps,
    // far below the rounding of the few operations after it.
    const float r2 = r * r;
    const float p01 = 1.66665211e-1f * r + 4.99999940e-1f;
    const float p23 = 8.36871006e-3f * r + 4.16683890e-2f;
    const float p = (1.38146151e-3f * r2 + p23) * r2 + p01;
    const float em1_r = p * r2 + r;
    const float scale = bits_as<float>((bits_as<uint32_t>(kd) + 127u) << 23);
    return {scale, em1_r};
}

// For x up to 88 or NaN: 0 below -87.33 (flushing what would be subnormal), NaN for NaN.
inline float vexp(float x) {
    const ExpParts e = exp_parts(x);
    const float y = e.scale + e.scale * e.em1_r;
    return x < -87.33654f ? 0.0f : y;
}

// For x up to 709 or NaN: 0 below -708.39, NaN for NaN.
inline double vexp(double x) {
    const double shifter = 0x1.8p52;
    const double kd = x * 1.4426950408889634074 + shifter;
    const double k = kd - shifter;
    double r = x - k * 6.93147180369123816490e-01;  // fdlibm's ln 2 head (trailing zero bits)
    r = r - k * 1.90821492927058770002e-10;         // and tail
    // p(r) = sum_i r^i / (i + 2)! for i = 0..11, as pairs (two terms), quads and the last four.
    const double r2 = r * r;
    const double r4 = r2 * r2;
    const double q0 = 1.6666666666666666667e-01 * r + 0.5;
    const double q1 = 8.3333333333333333333e-03 * r + 4.1666666666666666667e-02;
    const double q2 = 1.9841269841269841270e-04 * r + 1.3888888888888888889e-03;
    const double q3 = 2.7557319223985890653e-06 * r + 2.4801587301587301587e-05;
    const double q4 = 2.5052108385441718775e-08 * r + 2.7557319223985890653e-07;
    const double q5 = 1.6059043836821614599e-10 * r + 2.0876756987868098979e-09;
    const double low = (q1 * r2 + q0) + (q3 * r2 + q2) * r4;
    const double high = q5 * r2 + q4;
    const double p = high * (r4 * r4) + low;
    const double em1_r = p * r2 + r;
    const double scale = bits_as<double>((bits_as<uint64_t>(kd) + 1023u) << 52);
    const double y = scale + scale * em1_r;
    return x < -708.39 ? 0.0 : y;
}

// exp over the whole range of the type: vexp, and inf above the largest x whose 2^k is finite.
inline float vexp_whole_range(float x) { return x > 88.37f ? std::numeric_limits<float>::infinity() : vexp(x); }
inline double vexp_whole_range(double x) { return x > 709.43 ? std::numeric_limits<double>::infinity() : vexp(x); }

// tanh(y) = -expm1(-2|y|) / (2 + expm1(-2|y|)) with the sign of y; expm1 = scale * em1_r + (scale - 1)
// keeps full relative accuracy for small |y|, where (1 - e) / (1 + e) would cancel.
inline float vtanh(float y) {
    const float a = std::fabs(y);
    const float z = -2.0f * a;
    const ExpParts e = exp_parts(z);
    float em1 = e.scale * e.em1_r + (e.scale - 1.0f);
    em1 = z < -87.33654f ? -1.0f : em1;
    const float t = -em1 / (2.0f + em1);
    return std::copysign(t, y);
}

inline double vtanh(double y) {
    // Double logits are rare enough under softcap that the library tanh (scalar) is fine here.
    return std::tanh(y);
}

// log's special values over the series' result y, for both widths: -inf at 0, inf at inf, NaN below 0
// and for NaN.
template <class F>
inline F with_log_special_values(F x, F y) {
    y = x == F(0) ? -std::numeric_limits<F>::infinity() : y;
    y = x == std::numeric_limits<F>::infinity() ? x : y;
    return (x < F(0) || x != x) ? std::numeric_limits<F>::quiet_NaN() : y;
}

// log(x) for double, branch-free: x = 2^k * f with f in [sqrt(1/2), sqrt(2)), and
// log(f) = 2 atanh(u), u = (f - 1) / (f + 1), as an odd series in u (the coefficients of fdlibm's
// __ieee754_log, error below 1 ulp). Exact for 0 (-inf), inf and NaN; negative x gives NaN; subnormal
// x is not needed here (the kernel takes logs of sums >= 1, or of 0 for an all -inf row).
inline double vlog(double x) {
    const uint64_t u = bits_as<uint64_t>(x);
    const uint64_t exponent_bits = (u >> 52) & 0x7FFu;
    double f = bits_as<double>((u & 0x000FFFFFFFFFFFFFull) | 0x3FF0000000000000ull);  // [1, 2)
    // The exponent as a double without an int64 -> double conversion (AVX2 has none): put the
    // integer in the low mantissa bits of 2^52 and subtract 2^52.
    double k = bits_as<double>(0x4330000000000000ull | exponent_bits) - 0x1p52 - 1023.0;
    const bool high = f > 1.4142135623730951;
    f = high ? 0.5 * f : f;
    k = high ? k + 1.0 : k;
    const double g = f - 1.0;
    const double s = g / (2.0 + g);
    const double z = s * s;
    const double w = z * z;
    const double t1 = w * (3.999999999940941908e-01 + w * (2.222219843214978396e-01 + w * 1.531383769920937332e-01));
    const double t2 = z * (6.666666666666735130e-01 +
                           w * (2.857142874366239149e-01 + w * (1.818357216161805012e-01 + w * 1.479819860511658591e-01)));
    const double half_g2 = 0.5 * g * g;
    const double y =
        k * 6.93147180369123816490e-01 - ((half_g2 - (s * (half_g2 + t1 + t2) + k * 1.90821492927058770002e-10)) - g);
    return with_log_special_values(x, y);
}

// log(x) for float, the same reduction in float with a polynomial of four terms (the minimax fit of
// FreeBSD's e_logf.c, error below 1 ulp), for the per-position finalisation of float tiles.
inline float vlog(float x) {
    const uint32_t u = bits_as<uint32_t>(x);
    const int32_t exponent = static_cast<int32_t>((u >> 23) & 0xFFu) - 127;
    float f = bits_as<float>((u & 0x007FFFFFu) | 0x3F800000u);  // [1, 2)
    float k = static_cast<float>(exponent);
    const bool high = f > 1.41421356f;
    f = high ? 0.5f * f : f;
    k = high ? k + 1.0f : k;
    const float g = f - 1.0f;
    const float s = g / (2.0f + g);
    const float z = s * s;
    const float w = z * z;
    const float t1 = w * (0.40000972152f + w * 0.24279078841f);
    const float t2 = z * (0.66666662693f + w * 0.28498786688f);
    const float half_g2 = 0.5f * g * g;
    const float y = k * 6.9313812256e-01f - ((half_g2 - (s * (half_g2 + t1 + t2) + k * 9.0580006145e-06f)) - g);
    return with_log_special_values(x, y);
}

// ---------------------------------------------------------------------------------------------------
// Element types: logits are stored as T and computed in Compute<T> (float, or double for double).

// Tags for the two 16-bit float formats (their elements are stored as uint16_t, see Elem).
struct Half {};
struct BFloat16 {};

template <class T>
struct Elem;

// C: the compute type; S: how one element is stored (half types as their uint16_t bits, so that loads
// and stores vectorise: GCC does not vectorise loads of a one-member struct).
template <>
struct Elem<float> {
    using C = float;
    using S = float;
    static C load(S v) { return v; }
    static S store(C v) { return v; }
};

template <>
struct Elem<double> {
    using C = double;
    using S = double;
    static C load(S v) { return v; }
    static S store(C v) { return v; }
};

// IEEE half precision by integer arithmetic (branch-free, so it vectorises; compilers convert
// _Float16 with scalar library calls unless the target has F16C, and some have no _Float16).
template <>
struct Elem<Half> {
    using C = float;
    using S = uint16_t;
    static C load(S h) {
        const uint32_t sign = (static_cast<uint32_t>(h) & 0x8000u) << 16;
        const uint32_t magnitude = static_cast<uint32_t>(h) & 0x7FFFu;
        // Shifted into float position, the half's exponent is 112 too small: one multiply by 2^112
        // rebiases normal numbers and normalises subnormal ones exactly.
        uint32_t bits = bits_as<uint32_t>(bits_as<float>(magnitude << 13) * 0x1p112f);
        bits = magnitude >= 0x7C00u ? (bits | 0x7F800000u) : bits;  // inf and NaN keep all exponent bits
        return bits_as<float>(bits | sign);
    }
    static S store(C f) {
        const uint32_t x = bits_as<uint32_t>(f);
        const uint32_t sign = (x >> 16) & 0x8000u;
        const uint32_t ax = x & 0x7FFFFFFFu;
        // Normal results: rebias the exponent and round the 13 dropped bits to nearest even.
        const uint32_t normal = ((ax - 0x38000000u) + 0xFFFu + ((ax >> 13) & 1u)) >> 13;
        // Subnormal results (|f| < 2^-14): adding 0.5 lets the float adder do the rounding.
        const uint32_t subnormal = bits_as<uint32_t>(bits_as<float>(ax) + 0.5f) - 0x3F000000u;
        uint32_t h = ax < 0x38800000u ? subnormal : normal;
        h = ax >= 0x477FF000u ? 0x7C00u : h;  // 65520 and above round to inf
        h = ax > 0x7F800000u ? 0x7E00u : h;   // NaN
        return static_cast<uint16_t>(h | sign);
    }
};

template <>
struct Elem<BFloat16> {
    using C = float;
    using S = uint16_t;
    static C load(S v) { return bits_as<float>(static_cast<uint32_t>(v) << 16); }
    static S store(C v) {
        // Round to nearest even on the 16 dropped bits; a NaN stays a (quiet) NaN.
        const uint32_t u = bits_as<uint32_t>(v);
        const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
        const uint32_t quiet_nan = (u >> 16) | 0x40u;
        return static_cast<uint16_t>(v != v ? quiet_nan : rounded);
    }
};

template <class T>
using Compute = typename Elem<T>::C;
template <class T>
using Store = typename Elem<T>::S;

// Per-call constants in the compute type.
template <class C>
struct Consts {
    C cap = 0, inv_cap = 0;
};

// x'_c - m, given m and, under the soft cap, tm = tanh(max_c x_c / s) (m = s * tm):
// s * (tanh(x_c / s) - tm), exactly 0 at the maximum and one rounding elsewhere. s * tanh(x_c / s) - m
// would round s * tanh(...) first, or not at all where the compiler fuses it with the subtraction into an
// FMA, and differently in different loops: the sum's term at the target then differs from x'_y - m by up
// to half an ulp of s, which made float losses of a few classes slightly negative.
template <class T, bool CAP>
inline Compute<T> shifted_logit(const Store<T>* x, int64_t i, const Consts<Compute<T>>& k, Compute<T> m, Compute<T> tm,
                                Compute<T>& t) {
    const Compute<T> v = Elem<T>::load(x[i]);
    if constexpr (CAP) {
        t = vtanh(v * k.inv_cap);
        return k.cap * (t - tm);
    }
    return v - m;
}

// The rows layout keeps its running maximum in the units that shifted_logit subtracts: x_c, or under the
// soft cap tanh(x_c / s). key_logit gives x'_c - shift for a shift in those units, and the class's key.
template <class T, bool CAP>
inline Compute<T> key_logit(const Store<T>* x, int64_t i, const Consts<Compute<T>>& k, Compute<T> shift,
                            Compute<T>& key) {
    const Compute<T> v = Elem<T>::load(x[i]);
    if constexpr (CAP) {
        key = vtanh(v * k.inv_cap);
        return k.cap * (key - shift);
    }
    key = v;
    return v - shift;
}

// Work below this many logits per thread is not worth waking a thread for (about 10 us of work).
constexpr int64_t kMinElementsPerThread = 1 << 15;
// Blocked summation: float partial sums over this many terms, then added in double. Bounds the error
// of a 256k-term row sum by that of a 512-term float sum plus double rounding.
constexpr int64_t kSumBlock = 512;
// Rows per work item (classes-contiguous layout): enough to amortise scheduling, small enough for
// balance across threads.
constexpr int64_t kRowsPerItem = 8;
// Positions per tile (strided layout): 128 floats = 8 AVX-512 / 16 AVX2 vectors per class, and the
// per-tile statistics (a dozen arrays of 128) stay in L1. Measured at 8x21x256x256 on AVX2: 64 was 5%
// slower, 256 no faster.
constexpr int64_t kTile = 128;
// Classes up to this many, when contiguous, are vectorised across rows (cross_entropy_tiles, SMALL_ROWS).
constexpr int64_t kSmallClasses = 32;

inline int thread_count(int requested, int64_t elements, int64_t items) {
    const int64_t useful = std::max<int64_t>(1, elements / kMinElementsPerThread);
    return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({requested, useful, items})));
}

template <class TI>
inline int64_t target_at(const void* target, int64_t row) {
    return static_cast<int64_t>(static_cast<const TI*>(target)[row]);
}

// A row's class index, whatever the target's integer width (the loss's and the token statistics' targets).
inline int64_t class_index_of(const void* target, TargetKind kind, int64_t row) {
    switch (kind) {
        case TargetKind::i32:
            return target_at<int32_t>(target, row);
        case TargetKind::u8:
            return target_at<uint8_t>(target, row);
        default:
            return target_at<int64_t>(target, row);
    }
}

inline int64_t class_index(const LossCall& call, int64_t row) {
    return class_index_of(call.target, call.target_kind, row);
}

// The class indices of rows [r0, r0 + n) as int64, one typed loop per target kind (not a switch per row).
inline void class_indices(const LossCall& call, int64_t r0, int64_t n, int64_t* out) {
    auto copy = [&](auto* t) {
        for (int64_t i = 0; i < n; ++i) out[i] = static_cast<int64_t>(t[r0 + i]);
    };
    switch (call.target_kind) {
        case TargetKind::i32:
            return copy(static_cast<const int32_t*>(call.target));
        case TargetKind::u8:
            return copy(static_cast<const uint8_t*>(call.target));
        default:
            return copy(static_cast<const int64_t*>(call.target));
    }
}

// Whether a class index counts towards the loss: not ignore_index, and within [0, classes) (one unsigned
// compare for both bounds, which loops over rows vectorise).
inline bool counted_class(int64_t y, int64_t ignore_index, int64_t classes) {
    return y != ignore_index && static_cast<uint64_t>(y) < static_cast<uint64_t>(classes);
}

// What `mean` divides by: the normalizer, the row count (probabilities), or the summed target weights.
// Summed over fixed blocks of rows in parallel, then the blocks in order: the same for any thread count
// (a serial pass over the 524288 targets of 8x21x256x256 took a tenth of the forward). Without class
// weights it is a count of the rows not ignored, in a loop that vectorises.
template <class C>
double mean_denominator(const LossCall& call) {
    const Layout& L = call.layout;
    const int64_t rows = L.outer * L.inner;
    if (call.has_normalizer) return call.normalizer;
    if (call.target_kind == TargetKind::probability) return static_cast<double>(rows);
    const C* w = static_cast<const C*>(call.weight);
    const int64_t ignore = call.ignore_index;
    const int64_t classes = L.classes;
    constexpr int64_t kBlock = 4096;
    const int64_t blocks = (rows + kBlock - 1) / kBlock;
    std::vector<double> partial(static_cast<size_t>(blocks), 0.0);
    const int threads = thread_count(call.threads, rows, blocks);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; ++b) {
        int64_t y[kBlock];
        const int64_t r0 = b * kBlock, n = std::min(kBlock, rows - r0);
        class_indices(call, r0, n, y);
        if (w == nullptr) {
            int64_t count = 0;
#pragma omp simd reduction(+ : count)
            for (int64_t i = 0; i < n; ++i) count += counted_class(y[i], ignore, classes) ? 1 : 0;
            partial[static_cast<size_t>(b)] = static_cast<double>(count);
        } else {
            double lane[4] = {0.0, 0.0, 0.0, 0.0};  // four interleaved sums: a fixed order, no serial chain
            for (int64_t i = 0; i < n; ++i) {
                const bool counted = counted_class(y[i], ignore, classes);
                lane[i % 4] += counted ? static_cast<double>(w[counted ? y[i] : 0]) : 0.0;
            }
            partial[static_cast<size_t>(b)] = (lane[0] + lane[1]) + (lane[2] + lane[3]);
        }
    }
    double total = 0.0;
    for (const double p : partial) total += p;
    return total;
}

// Scalars of one row after the statistics pass, in double.
struct RowTerms {
    double loss = 0;
    double A = 0;       // grad_c = p_c * A - B * w_c (...) ; see row_gradient
    double B = 0;       // coefficient of w_c (label smoothing) or of w_c t'_c (probabilities)
    double fix = 0;     // subtracted at the target class: g (1 - eps) w_y
    int64_t y = -1;     // target class, or -1
    bool valid = true;  // false for an ignored row: loss 0, gradient 0
};

// The row's loss and gradient coefficients from its statistics. Shared by both layouts.
//   s_sum: sum_c exp(x'_c - m); xy: x'_y - m; wx: sum_c w_c (x'_c - m);
//   wtx: sum_c w_c t'_c (x'_c - m); wt: sum_c w_c t'_c, for the smoothed probability target t'.
struct RowSums {
    double m = 0, s_sum = 0, xy = 0, wx = 0, wtx = 0, wt = 0;
    double tm = 0;  // under the soft cap, tanh(max_c x_c / s): m = s * tm (see shifted_logit)
};

// The row's loss and gradient coefficients from its statistics, for both layouts. Plain scalars in and
// out so that the strided layout can call it inside a SIMD loop over positions.
//   m: the shift; s: sum_c exp(x'_c - m); xy: x'_y - m; wx: sum_c w_c (x'_c - m);
//   wtx: sum_c w_c t'_c (x'_c - m); wt: sum_c w_c t'_c (t' smoothed); wy: w_y; g: upstream gradient of this row.
// Gradient: grad_c = p_c * A - B * w_c (class indices; minus `fix` at the target class), or
// p_c * A - B * w_c * t'_c (probabilities).
struct TermConsts {
    double eps, uniform, z_loss, w_total;  // uniform = eps / C; w_total = sum_c w_c
};

inline TermConsts term_consts(const LossCall& call, double w_total) {
    return {call.label_smoothing, call.label_smoothing / static_cast<double>(call.layout.classes), call.z_loss,
            w_total};
}

template <bool PROBABILITY, class R>
inline void loss_terms(const TermConsts k, R m, R s, R xy, R wx, R wtx, R wt, R wy, R g, R& loss, R& A, R& B, R& fix) {
    const R eps = static_cast<R>(k.eps), uniform = static_cast<R>(k.uniform);
    const R z_loss = static_cast<R>(k.z_loss), w_total = static_cast<R>(k.w_total);
    const R log_s = vlog(s);
    const R lse = m + log_s;
    if constexpr (PROBABILITY) {
        // wt and wtx hold the smoothed target t' = (1 - eps) t + eps / C already (see option_sums):
        // loss = -sum w t' (x' - m) + log_s * sum w t'.
        loss = log_s * wt - wtx;
        A = g * wt;
        B = g;
        fix = 0;
        static_cast<void>(wx);
    } else {
        // -log p_y = log_s - (x'_y - m); the smoothing term sum_c w_c (-log p_c) = log_s W - wx. A target
        // without weight (eps = 1, or w_y = 0) contributes 0 even where p_y = 0 (0 * inf would be NaN);
        // 0 * log_s keeps a row without a finite maximum NaN.
        const R y_scale = (1 - eps) * wy;
        loss = (y_scale == 0 ? R(0) * log_s : y_scale * (log_s - xy)) + uniform * (log_s * w_total - wx);
        A = g * ((1 - eps) * wy + uniform * w_total);
        B = g * uniform;
        fix = g * (1 - eps) * wy;
    }
    loss += z_loss * lse * lse;
    A += g * 2 * z_loss * lse;
}

// loss_terms for a tile of positions, vectorised across them (in a function of its own, over restrict
// pointers, so that the compiler sees no aliasing between the tile's arrays), in the compute type R:
// float tiles take 8 positions per AVX2 vector where double took 4 (2x21x256x256 float forward+backward,
// one thread, callgrind: 2.64M -> 1.30M instructions here). Ignored positions (keep == 0) get exactly 0
// through selects, since they may hold NaN (all -inf logits); 1 / s is folded into A for the gradient
// loop.
template <bool PROBABILITY, class R>
void finalize_positions(const TermConsts k, int64_t len, const R* __restrict m, const R* __restrict s,
                        const R* __restrict xy, const R* __restrict wx, const R* __restrict wtx,
                        const R* __restrict wt, const R* __restrict wy, const R* __restrict g,
                        const R* __restrict keep, R* __restrict loss, R* __restrict A, R* __restrict B,
                        R* __restrict fix) {
#pragma omp simd
    for (int64_t l = 0; l < len; ++l) {
        R loss_l, A_l, B_l, fix_l;
        loss_terms<PROBABILITY>(k, m[l], s[l], xy[l], wx[l], wtx[l], wt[l], wy[l], g[l], loss_l, A_l, B_l, fix_l);
        const bool valid = keep[l] != R(0);
        loss[l] = valid ? loss_l : R(0);
        A[l] = valid ? A_l / s[l] : R(0);
        B[l] = valid ? B_l : R(0);
        fix[l] = fix_l;
    }
}

inline RowTerms row_terms(const LossCall& call, const RowSums& S, double wy, double w_total, double g,
                          bool probability) {
    RowTerms out;
    const TermConsts k = term_consts(call, w_total);
    if (probability) {
        loss_terms<true>(k, S.m, S.s_sum, S.xy, S.wx, S.wtx, S.wt, wy, g, out.loss, out.A, out.B, out.fix);
    } else {
        loss_terms<false>(k, S.m, S.s_sum, S.xy, S.wx, S.wtx, S.wt, wy, g, out.loss, out.A, out.B, out.fix);
    }
    return out;
}

// ---------------------------------------------------------------------------------------------------
// Classes contiguous: one row of C logits at x.

template <class T, bool CAP>
Compute<T> row_max(const Store<T>* x, int64_t n, const Consts<Compute<T>>& k) {
    using C = Compute<T>;
    C m = -std::numeric_limits<C>::infinity();
#pragma omp simd reduction(max : m)
    for (int64_t c = 0; c < n; ++c) m = std::max(m, Elem<T>::load(x[c]));
    if constexpr (CAP) m = k.cap * vtanh(m * k.inv_cap);  // tanh is increasing: cap the maximum
    // A row of -inf has no finite maximum: shift by 0, so that the row's sum is 0 and its loss NaN
    // (as in torch), while an ignored such row stays exactly 0.
    return m == -std::numeric_limits<C>::infinity() ? C(0) : m;
}

// sum_c f(c) in blocks: float (or double) partial sums of kSumBlock terms, added in double.
template <class C, class F>
inline double blocked_sum(int64_t n, F f) {
    double total = 0.0;
    for (int64_t b = 0; b < n; b += kSumBlock) {
        const int64_t e = std::min(n, b + kSumBlock);
        C part = 0;
#pragma omp simd reduction(+ : part)
        for (int64_t c = b; c < e; ++c) part += f(c);
        total += static_cast<double>(part);
    }
    return total;
}

// The sum of v[0, n) from four interleaved partial sums: a fixed order (the same bits for any thread
// count) without one chain of n dependent additions.
template <class V>
inline double sum_in_four_lanes(const V* v, int64_t n) {
    double lane[4] = {0.0, 0.0, 0.0, 0.0};
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        for (int j = 0; j < 4; ++j) lane[j] += static_cast<double>(v[i + j]);
    }
    for (; i < n; ++i) lane[0] += static_cast<double>(v[i]);
    return (lane[0] + lane[1]) + (lane[2] + lane[3]);
}

// The batch total from the work items' partial sums, added in item order (so the same for any thread
// count), divided by the mean's denominator for reduction="mean".
inline double reduce_items(const std::vector<double>& partial, double denom, const LossCall& call) {
    double total = 0.0;
    for (double p : partial) total += p;
    if (call.reduction != Reduction::mean) return total;
    if (call.zero_if_all_ignored && denom == 0) return 0.0;
    return total / denom;
}

// What both layouts of cross_entropy start from: typed pointers, the soft-cap constants, the class
// weights (never null), the mean's denominator and the upstream gradient of each element.
template <class T>
struct Prepared {
    using C = Compute<T>;
    const Store<T>* x;
    const Store<T>* targets;  // probability targets, or null
    Store<T>* grad;
    C* loss_rows;
    const C* grad_rows;
    // Without class weights, a vector of ones: a `w ? w[c] : 1` in the loops compiles to a masked load
    // from a null pointer, which some CPUs (AMD Zen) serve through a microcode assist, 10x slower.
    std::vector<C> unit_weight;
    const C* w;
    Consts<C> k;
    double w_total;
    bool probability;
    double denom;     // what mean divides by (1 for the other reductions)
    double g_scalar;  // upstream gradient of each element for mean and sum

    Prepared(const LossCall& call, bool cap)
        : x(static_cast<const Store<T>*>(call.x)),
          targets(call.target_kind == TargetKind::probability ? static_cast<const Store<T>*>(call.target) : nullptr),
          grad(static_cast<Store<T>*>(call.grad)),
          loss_rows(static_cast<C*>(call.loss_rows)),
          grad_rows(static_cast<const C*>(call.grad_rows)),
          w(static_cast<const C*>(call.weight)),
          probability(call.target_kind == TargetKind::probability) {
        const int64_t n = call.layout.classes;
        if (w == nullptr) {
            unit_weight.assign(static_cast<size_t>(n), C(1));
            w = unit_weight.data();
        }
        if (cap) {
            k.cap = static_cast<C>(call.softcap);
            k.inv_cap = static_cast<C>(1.0 / call.softcap);
        }
        const C* weights = w;
        w_total = blocked_sum<C>(n, [&](int64_t c) { return weights[c]; });
        denom = call.reduction == Reduction::mean ? mean_denominator<C>(call) : 1.0;
        g_scalar = call.grad_scale;
        if (call.reduction == Reduction::mean) {
            // A denominator of 0 (a normalizer of 0, or no counted weight) leaves the mean's gradient
            // undefined: NaN on the rows that count (ignored rows get 0 whatever the scale), or 0 with
            // zero_if_all_ignored. grad_scale / 0 would give +-inf and, at the target, inf - inf.
            if (denom == 0) {
                g_scalar = call.zero_if_all_ignored ? 0.0 : std::numeric_limits<double>::quiet_NaN();
            } else {
                g_scalar = call.grad_scale / denom;
            }
        }
    }
    Prepared(const Prepared&) = delete;  // w may point into unit_weight
    Prepared& operator=(const Prepared&) = delete;
};

// The row's chunks: at most kMaxChunks of at least kChunk classes. Each chunk is read from memory for
// its maximum and then, from L1, for its exponentials, so that the row is streamed from DRAM once
// while the exponentials of the previous chunk are computed (an "online" softmax at chunk grain).
constexpr int64_t kChunk = 1024;
constexpr int64_t kMaxChunks = 256;

template <class T>
constexpr int64_t kLineElements = 64 / static_cast<int64_t>(sizeof(Store<T>));  // per cache line

inline int64_t chunk_size(int64_t n) { return std::max(kChunk, (n + kMaxChunks - 1) / kMaxChunks); }

// How far above the running maximum a chunk's maximum may lie for the chunk's exponentials against
// the running maximum to be kept: they are then at most e^12 (no overflow in a 512-term float sum), and
// a chunk's gradient factor exp(shift - m) underflows float only for probabilities below e^-75, which
// are 1e-33 and flushed to 0 (vexp already flushes those below e^-87). It also keeps s >= 1: the new
// maximum's term, exp(x'_y - shift) rescaled by exp(shift - m) in double, is 1 only to within the
// rounding of the float exponent x'_y - shift (below 12 * 2^-23 = 1.4e-6 with the soft cap's two
// roundings) and of exp, while the old maximum adds exp(shift - m) >= e^-12 = 6e-6. At 16 (e^-16 =
// 1.1e-7) float losses with the target at a maximum that a later chunk raised by 12 to 16 came out as
// low as -4e-7 (-1e-6 under the soft cap).
constexpr double kExpHeadroom = 12.0;

// The exponentials exp(x'_c - shift) of classes [b, e), shift and maximum in key_logit's units, stored
// to e_out when given; returns their sum (in the compute type) and, with TRACK_MAX, the largest key in
// `cm`.
template <class T, bool CAP, bool TRACK_MAX>
inline Compute<T> chunk_exps(const Store<T>* x, int64_t b, int64_t e, const Consts<Compute<T>>& k, Compute<T> shift,
                             Compute<T>* e_out, Compute<T>& cm) {
    using C = Compute<T>;
    C part = 0;
    C mx = cm;
    if (e_out) {
#pragma omp simd reduction(+ : part) reduction(max : mx)
        for (int64_t c = b; c < e; ++c) {
            C key;
            const C d = key_logit<T, CAP>(x, c, k, shift, key);
            if constexpr (TRACK_MAX) mx = std::max(mx, key);
            const C ec = vexp(d);
            e_out[c] = ec;
            part += ec;
        }
    } else {
#pragma omp simd reduction(+ : part) reduction(max : mx)
        for (int64_t c = b; c < e; ++c) {
            C key;
            const C d = key_logit<T, CAP>(x, c, k, shift, key);
            if constexpr (TRACK_MAX) mx = std::max(mx, key);
            part += vexp(d);
        }
    }
    cm = mx;
    return part;
}

// The online pass: the row maximum m and s = sum_c exp(x'_c - m) in one read of the row, the running
// sum rescaled by exp(old - new) whenever the maximum grows. The first chunk is read for its maximum,
// then (from L1) for its exponentials. Once the running maximum is finite, each later chunk's
// exponentials are taken against it in the same loop that finds the chunk's maximum: one loop over the
// chunk instead of two (4096x32768 float on one AVX2 thread of an AMD EPYC, A/B in one process: forward
// 0.480 -> 0.438 ns per logit, forward+backward 0.901 -> 0.761). A chunk whose maximum lies more than
// kExpHeadroom above the running one is redone, from L1, against its own. The shift each chunk's
// exponentials were taken against is recorded in chunk_shift. With `e_out`, the exponentials are also
// stored there, so the backward pass needs no second exponential. Under the soft cap the maximum and
// the shifts are kept as tanh(x / s) (see key_logit), and S.tm receives the final one: the sum's term
// at the maximum is then exp(0) = 1 exactly, as x'_y - m is 0 exactly there (formed as s * tanh(x / s)
// - m, float losses of more than 32 classes came out as low as -6e-13, and -1e-6 when a later chunk
// raised the maximum).
template <class T, bool CAP>
void online_row(const Store<T>* x, int64_t n, const Consts<Compute<T>>& k, Compute<T>* e_out, Compute<T>* chunk_shift,
                RowSums& S) {
    using C = Compute<T>;
    const C neg_inf = -std::numeric_limits<C>::infinity();
    const int64_t step = chunk_size(n);
    C m_true = neg_inf;  // the running maximum, in key_logit's units (may stay -inf)
    C shift = 0;         // what exponents are taken against: m_true, or 0 while m_true is -inf
    // x'_c - shift is scale * (key_c - shift)
    const double scale = CAP ? static_cast<double>(k.cap) : 1.0;
    double s = 0.0;
    // Raise the running maximum to cm (no-op unless larger), rescaling s to the new shift.
    auto raise_max = [&](C cm) {
        if (!(cm > m_true)) return;
        m_true = cm;
        const C new_shift = m_true == neg_inf ? C(0) : m_true;
        // s is 0 until a finite maximum appears (the stand-in shift 0 must not be rescaled then:
        // exp(0 - (-710)) overflows double and 0 * inf is NaN).
        if (s != 0.0) s *= std::exp(scale * (static_cast<double>(shift) - static_cast<double>(new_shift)));
        shift = new_shift;
    };
    for (int64_t b = 0, chunk = 0; b < n; b += step, ++chunk) {
        const int64_t e = std::min(n, b + step);
        // Ask for the next chunk now: its lines arrive while this chunk's exponentials are computed.
        for (int64_t c = e; c < std::min(n, e + step); c += kLineElements<T>) __builtin_prefetch(x + c);
        if (m_true != neg_inf) {
            C cm = neg_inf;
            const C part = chunk_exps<T, CAP, true>(x, b, e, k, shift, e_out, cm);
            bool kept;  // false for NaN: redone below
            if constexpr (CAP) {
                kept = k.cap * (cm - shift) <= static_cast<C>(kExpHeadroom);
            } else {
                kept = cm <= shift + static_cast<C>(kExpHeadroom);
            }
            if (kept) {
                chunk_shift[chunk] = shift;
                s += static_cast<double>(part);
                raise_max(cm);
                continue;
            }
        }
        C cm = neg_inf;
#pragma omp simd reduction(max : cm)
        for (int64_t c = b; c < e; ++c) cm = std::max(cm, Elem<T>::load(x[c]));
        if constexpr (CAP) cm = vtanh(cm * k.inv_cap);  // tanh is increasing: the maximum's key
        raise_max(cm);
        chunk_shift[chunk] = shift;
        C unused = neg_inf;
        s += static_cast<double>(chunk_exps<T, CAP, false>(x, b, e, k, shift, e_out, unused));
    }
    S.m = scale * static_cast<double>(shift);
    S.tm = static_cast<double>(shift);
    S.s_sum = s;
}

// v * d, but 0 where the weight v is exactly 0: a class without weight contributes nothing to a sum,
// even where its logit is -inf (0 * -inf would be NaN; torch's loss is NaN there).
template <class C>
inline C weighted_term(C v, C d) {
    return v == C(0) ? C(0) : v * d;
}

// The sums that label smoothing (class-index targets) and probability targets add, against the final
// maximum; the row is in L2 by now. Probability targets' sums are of the smoothed target
// t' = (1 - eps) t + eps / C, summed per class, so that a class whose t' is 0 adds 0 and one whose
// t' > 0 at a -inf logit adds -inf (an infinite loss, as torch's).
template <class T, bool CAP>
void option_sums(const Store<T>* x, const Store<T>* t_row, const Compute<T>* w, int64_t n, const Consts<Compute<T>>& k,
                 bool need_wx, Compute<T> eps, Compute<T> uniform, RowSums& S) {
    using C = Compute<T>;
    const C m = static_cast<C>(S.m), tm = static_cast<C>(S.tm);
    if (need_wx) {
        S.wx = blocked_sum<C>(n, [&](int64_t c) {
            C t;
            return weighted_term(w[c], shifted_logit<T, CAP>(x, c, k, m, tm, t));
        });
    }
    if (t_row) {
        S.wtx = blocked_sum<C>(n, [&](int64_t c) {
            C t;
            const C wt = w[c] * ((C(1) - eps) * Elem<T>::load(t_row[c]) + uniform);
            return weighted_term(wt, shifted_logit<T, CAP>(x, c, k, m, tm, t));
        });
        S.wt = blocked_sum<C>(
            n, [&](int64_t c) { return w[c] * ((C(1) - eps) * Elem<T>::load(t_row[c]) + uniform); });
    }
}

// dst[i] = src[i] * factor, written with non-temporal stores where the target has them (AVX): the lines
// go to memory without first being read from it, as an ordinary store's read for ownership would.
// Callers issue _mm_sfence before other threads may read dst.
template <class C>
inline void stream_scaled(const C* src, C factor, C* dst, int64_t n) {
    int64_t i = 0;
#if defined(__AVX__)
    for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) & 31) != 0; ++i) dst[i] = src[i] * factor;
    if constexpr (std::is_same<C, float>::value) {
        const __m256 f = _mm256_set1_ps(factor);
        for (; i + 8 <= n; i += 8) _mm256_stream_ps(dst + i, _mm256_mul_ps(_mm256_loadu_ps(src + i), f));
    } else {
        const __m256d f = _mm256_set1_pd(factor);
        for (; i + 4 <= n; i += 4) _mm256_stream_pd(dst + i, _mm256_mul_pd(_mm256_loadu_pd(src + i), f));
    }
#endif
    for (; i < n; ++i) dst[i] = src[i] * factor;
}

// grad_c = p_c * A - B * w_c [* t'_c], times (1 - tanh^2) under the soft cap, with p_c = exp(x'_c - m) / s.
// The exponentials exp(x'_c - shift) are in `exps`, a row of the thread's own (in L2) where online_row
// stored them against each chunk's shift; the gradient row is written once, from them. For float and
// double, each chunk's gradient is computed over its exponentials, in place, and then streamed to
// `grad` with non-temporal stores (4096x32768 float forward+backward with out=, A/B in one process:
// 0.532 -> 0.446 ns per logit on two threads, 0.824 -> 0.734 on one, for the plain loss; they were no
// faster when the online pass had two loops per chunk). Half types store through their conversion.
template <class T, bool CAP>
void row_gradient(const LossCall& call, const Store<T>* x, const Store<T>* t_row, const Compute<T>* w, const Consts<Compute<T>>& k,
                  const RowSums& S, const RowTerms& R, const Compute<T>* chunk_shift, Compute<T>* exps,
                  Store<T>* grad) {
    using C = Compute<T>;
    constexpr bool stream = std::is_same<T, C>::value;
    Store<T>* dst = grad;  // where the loops below write: the exponentials themselves when streamed
    if constexpr (stream) dst = exps;
    const int64_t n = call.layout.classes;
    if (!R.valid) {
        const Store<T> zero = Elem<T>::store(C(0));
        for (int64_t c = 0; c < n; ++c) grad[c] = zero;
        return;
    }
    const C m = static_cast<C>(S.m), tm = static_cast<C>(S.tm);
    const C B = static_cast<C>(R.B);
    const C eps = static_cast<C>(call.label_smoothing);
    const C uniform = static_cast<C>(call.label_smoothing / static_cast<double>(n));
    const double A_over_s = R.A / S.s_sum;
    const int64_t step = chunk_size(n);
    for (int64_t b = 0, chunk = 0; b < n; b += step, ++chunk) {
        const int64_t e = std::min(n, b + step);
        // p_c * A = exp(x'_c - shift_k) * exp(shift_k - m) * A / s. shift_k <= m, except the stand-in
        // shift 0 of chunks before the first finite logit, whose exponentials are all 0: capping the
        // exponent at 0 keeps their factor finite (exp(0 - m) overflows for m below -88 in float, and
        // 0 * inf would be NaN).
        const double shift_k = static_cast<double>(chunk_shift[chunk]);  // in key_logit's units
        const double to_max = std::min(CAP ? static_cast<double>(k.cap) * (shift_k - S.tm) : shift_k - S.m, 0.0);
        const C factor = static_cast<C>(std::exp(to_max) * A_over_s);
        if (t_row) {
#pragma omp simd
            for (int64_t c = b; c < e; ++c) {
                C t = 0;
                const C ec = exps[c];
                if constexpr (CAP) t = vtanh(Elem<T>::load(x[c]) * k.inv_cap);
                const C target = (C(1) - eps) * Elem<T>::load(t_row[c]) + uniform;
                C gc = ec * factor - B * w[c] * target;
                if constexpr (CAP) gc *= (C(1) - t) * (C(1) + t);
                dst[c] = Elem<T>::store(gc);
            }
        } else if (B == C(0) && !CAP) {
            // Without label smoothing only the one-hot is subtracted (below): a plain scaling, which
            // saves streaming the class weights through the loop.
            if constexpr (stream) {
                stream_scaled(exps + b, factor, grad + b, e - b);
                continue;
            } else {
#pragma omp simd
                for (int64_t c = b; c < e; ++c) grad[c] = Elem<T>::store(exps[c] * factor);
            }
        } else {
#pragma omp simd
            for (int64_t c = b; c < e; ++c) {
                C t = 0;
                const C ec = exps[c];
                if constexpr (CAP) t = vtanh(Elem<T>::load(x[c]) * k.inv_cap);
                C gc = ec * factor - B * w[c];
                if constexpr (CAP) gc *= (C(1) - t) * (C(1) + t);
                dst[c] = Elem<T>::store(gc);
            }
        }
        if constexpr (stream) stream_scaled(exps + b, C(1), grad + b, e - b);
    }
    if (t_row) return;
    // The 1 of the one-hot, subtracted at the target class only, from a freshly computed p_y.
    C t;
    const C dy = shifted_logit<T, CAP>(x, R.y, k, m, tm, t);
    C gy = static_cast<C>(static_cast<double>(vexp(dy)) * A_over_s) - B * w[R.y] -
           static_cast<C>(R.fix);
    if constexpr (CAP) gy *= (C(1) - t) * (C(1) + t);
    grad[R.y] = Elem<T>::store(gy);
}

template <class T, bool CAP>
double cross_entropy_rows(const LossCall& call) {
    using C = Compute<T>;
    const Layout& L = call.layout;
    const int64_t rows = L.outer;
    const int64_t n = L.classes;
    const Prepared<T> P(call, CAP);
    const Store<T>* x = P.x;
    const C* w = P.w;
    const bool probability = P.probability;
    const Store<T>* targets = P.targets;
    Store<T>* grad = P.grad;
    C* loss_rows = P.loss_rows;
    const C* grad_rows = P.grad_rows;
    const Consts<C>& k = P.k;
    const double w_total = P.w_total;
    const bool need_wx = call.label_smoothing > 0 && !probability;  // probability targets: see option_sums
    const C eps = static_cast<C>(call.label_smoothing);
    const C uniform = static_cast<C>(call.label_smoothing / static_cast<double>(n));

    const double denom = P.denom;
    const double g_scalar = P.g_scalar;

    const int64_t items = (rows + kRowsPerItem - 1) / kRowsPerItem;
    std::vector<double> partial(static_cast<size_t>(items), 0.0);
    const int threads = thread_count(call.threads, rows * n, items);
    // In place (the gradient overwrites the logits, crossent.torch's inplace_backward): each row is
    // first copied to a buffer of the thread's own, which the passes read while the gradient is written.
    const bool in_place = grad != nullptr && static_cast<const void*>(grad) == static_cast<const void*>(x);
    // Items are handed out one at a time rather than in fixed shares, so that a thread that is held up
    // (on a shared host, by another tenant) leaves its items to the other instead of making the whole
    // call wait; the partial sums stay per item, so the result does not depend on who took which.
    // 4096x32768 float on two threads, two A/Bs in one process, medians of 25 and 30 calls: forward
    // 32.0 -> 30.0 and 36.3 -> 32.6 ms, forward+backward 53.6 -> 51.7 and 59.3 -> 53.5 ms; best times
    // unchanged.
#pragma omp parallel for schedule(dynamic) num_threads(threads)
    for (int64_t item = 0; item < items; ++item) {
        C chunk_shift[kMaxChunks];
        std::vector<Store<T>> row_copy(in_place ? static_cast<size_t>(n) : 0);
        // The row's exponentials in the compute type, for the gradient pass (a thread's row, in L2).
        std::vector<C> row_exps(grad ? static_cast<size_t>(n) : 0);
        double sum = 0.0;
        const int64_t r_end = std::min(rows, (item + 1) * kRowsPerItem);
        for (int64_t r = item * kRowsPerItem; r < r_end; ++r) {
            const Store<T>* xr = x + r * n;
            if (in_place) {
                std::copy(xr, xr + n, row_copy.data());
                xr = row_copy.data();
            }
            const Store<T>* tr = targets ? targets + r * n : nullptr;
            Store<T>* gr = grad ? grad + r * n : nullptr;
            RowTerms R;
            double wy = 0.0;
            if (!probability) {
                R.y = class_index(call, r);
                R.valid = counted_class(R.y, call.ignore_index, n);
                if (R.valid) wy = static_cast<double>(w[R.y]);
            }
            RowSums S;
            if (R.valid) {
                C* e_out = nullptr;
                if (gr) e_out = row_exps.data();
                online_row<T, CAP>(xr, n, k, e_out, chunk_shift, S);
                option_sums<T, CAP>(xr, tr, w, n, k, need_wx, eps, uniform, S);
                if (!probability) {
                    C t;
                    S.xy = static_cast<double>(
                        shifted_logit<T, CAP>(xr, R.y, k, static_cast<C>(S.m), static_cast<C>(S.tm), t));
                }
                const double g = grad_rows ? static_cast<double>(grad_rows[r]) : g_scalar;
                const int64_t y = R.y;
                R = row_terms(call, S, wy, w_total, g, probability);
                R.y = y;
            }
            if (loss_rows) loss_rows[r] = static_cast<C>(R.loss);
            sum += R.loss;
            if (gr) {
                row_gradient<T, CAP>(call, xr, tr, w, k, S, R, chunk_shift, row_exps.data(), gr);
            }
        }
        partial[static_cast<size_t>(item)] = sum;
#if defined(__AVX__)
        _mm_sfence();  // the gradient's non-temporal stores, visible before the threads join
#endif
    }
    return reduce_items(partial, denom, call);
}

// ---------------------------------------------------------------------------------------------------
// Strided: classes at stride `inner`, vectorised across a tile of up to kTile positions. With
// SMALL_ROWS, the same for classes contiguous and few: (rows, C) is read as positions at stride C and
// classes at stride 1, so that rows of ten classes are vectorised across rows (with gathers) instead
// of each paying the per-row reductions and scalar remainders of cross_entropy_rows.

template <class T, bool CAP, bool SMALL_ROWS>
double cross_entropy_tiles(const LossCall& call) {
    using C = Compute<T>;
    const Layout& L = call.layout;
    const int64_t n = L.classes;
    const int64_t inner = SMALL_ROWS ? L.outer : L.inner;  // positions per outer index
    const int64_t outer = SMALL_ROWS ? 1 : L.outer;
    const int64_t cs = SMALL_ROWS ? 1 : inner;  // class stride
    const int64_t ps = SMALL_ROWS ? n : 1;      // position stride
    const Prepared<T> P(call, CAP);
    const Store<T>* x = P.x;
    const C* w = P.w;
    const bool probability = P.probability;
    const Store<T>* targets = P.targets;
    Store<T>* grad = P.grad;
    C* loss_rows = P.loss_rows;
    const C* grad_rows = P.grad_rows;
    const Consts<C>& k = P.k;
    const double w_total = P.w_total;
    const bool need_wx = call.label_smoothing > 0 && !probability;  // probability targets: see option_sums
    const C eps = static_cast<C>(call.label_smoothing);
    const C uniform = static_cast<C>(call.label_smoothing / static_cast<double>(n));
    const TermConsts terms_k = term_consts(call, w_total);

    const double denom = P.denom;
    const double g_scalar = P.g_scalar;
    const bool weighted = call.weight != nullptr;
    const int64_t ignore = call.ignore_index;

    // In place (see cross_entropy_rows): a tile of contiguous rows is copied first; strided positions
    // would need a gather of the whole tile, so that layout refuses it.
    const bool in_place = grad != nullptr && static_cast<const void*>(grad) == static_cast<const void*>(x);
    if (in_place && !SMALL_ROWS) {
        throw std::invalid_argument("the gradient may overwrite the logits only with the classes contiguous");
    }
    const int64_t tiles_per_outer = (inner + kTile - 1) / kTile;
    const int64_t items = outer * tiles_per_outer;
    std::vector<double> partial(static_cast<size_t>(items), 0.0);
    const int threads = thread_count(call.threads, outer * n * inner, items);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t item = 0; item < items; ++item) {
        const int64_t o = item / tiles_per_outer;
        const int64_t i0 = (item % tiles_per_outer) * kTile;
        const int64_t len = std::min(kTile, inner - i0);
        const Store<T>* xo = x + o * n * inner + i0 * ps;  // x[o, c, i0 + l] = xo[c * cs + l * ps]
        std::vector<Store<T>> tile_copy(in_place ? static_cast<size_t>(len * n) : 0);
        if (in_place) {
            std::copy(xo, xo + len * n, tile_copy.data());
            xo = tile_copy.data();
        }
        const Store<T>* to = targets ? targets + o * n * inner + i0 * ps : nullptr;
        C m[kTile], part[kTile], A[kTile], B[kTile], fix_c[kTile], keep_c[kTile];
        C tm[kTile] = {};  // under the soft cap, tanh(max / s): see shifted_logit
        // The sums per position, each added up over the classes (see tile_sum); the options' sums are 0
        // when unused.
        C s_sum[kTile], wx[kTile], wtx[kTile], wt[kTile];
        // What the per-position finalisation reads and writes, in the compute type (see finalize_positions).
        C wy[kTile], xy[kTile], g[kTile], loss[kTile];
        // The target class per position, or -1 (ignored, or probability targets): the gradient pass
        // subtracts the one-hot with a vector compare and select instead of a scalar store per position.
        int32_t y[kTile];
        int64_t y64[kTile];
        if (probability) {
            std::fill(y64, y64 + len, int64_t(-1));  // no class index; every position counts
        } else {
            class_indices(call, o * inner + i0, len, y64);
        }
        // Per-position state, in loops without branches that vectorise; without class weights w_y is 1.
#pragma omp simd
        for (int64_t l = 0; l < len; ++l) {
            m[l] = -std::numeric_limits<C>::infinity();
            const int64_t yl = y64[l];
            const bool counted = counted_class(yl, ignore, n);
            y[l] = counted && !probability ? static_cast<int32_t>(yl) : -1;
            keep_c[l] = counted || probability ? C(1) : C(0);
            wy[l] = y[l] < 0 ? C(0) : C(1);
        }
        if (weighted) {
            for (int64_t l = 0; l < len; ++l) wy[l] = y[l] < 0 ? C(0) : w[y[l]];
        }
        const int64_t row0 = o * inner + i0;
        if (grad_rows) {
            std::copy(grad_rows + row0, grad_rows + row0 + len, g);
        } else {
            std::fill(g, g + len, static_cast<C>(g_scalar));
        }
        // The next tile's classes are n streams at stride `inner`, more than the hardware prefetcher
        // follows: ask for their lines while this tile is computed, a class at a time in the pass
        // below, so that the misses in flight stay within what the core can track. A whole next tile
        // (the usual case) takes a loop of constant length, which compiles to the prefetches alone.
        const int64_t next_end = !SMALL_ROWS && i0 + kTile < inner ? std::min(2 * kTile, inner - i0) : 0;
        for (int64_t c = 0; c < n; ++c) {
            const Store<T>* xc = xo + c * cs;
            if (next_end == 2 * kTile) {
                for (int64_t l = kTile; l < 2 * kTile; l += kLineElements<T>) __builtin_prefetch(xc + l);
            } else {
                for (int64_t l = kTile; l < next_end; l += kLineElements<T>) __builtin_prefetch(xc + l);
            }
#pragma omp simd
            for (int64_t l = 0; l < len; ++l) m[l] = std::max(m[l], Elem<T>::load(xc[l * ps]));
        }
        // The target's logit, one load per position: cheaper than a compare and select per logit above.
        C x_target[kTile];
        for (int64_t l = 0; l < len; ++l) {
            const C xt = Elem<T>::load(xo[static_cast<int64_t>(std::max(y[l], 0)) * cs + l * ps]);
            x_target[l] = y[l] < 0 ? C(0) : xt;  // a select: no branch on the target
        }
#pragma omp simd
        for (int64_t l = 0; l < len; ++l) {
            C d = x_target[l] - m[l];
            if constexpr (CAP) {
                tm[l] = vtanh(m[l] * k.inv_cap);  // tanh is increasing: cap the maximum
                m[l] = k.cap * tm[l];
                d = k.cap * (vtanh(x_target[l] * k.inv_cap) - tm[l]);  // as shifted_logit
            }
            m[l] = m[l] == -std::numeric_limits<C>::infinity() ? C(0) : m[l];
            xy[l] = y[l] < 0 ? C(0) : d;
        }
        // One blocked sum per statistic, as in the contiguous layout, vectorised across positions: a
        // block's sum in the compute type, the blocks added in double. Up to kSumBlock classes (the
        // usual tile) that is the block's own sum, written to `out` directly.
        auto tile_sum = [&](C* out, auto term) {
            const bool one_block = n <= kSumBlock;
            double total[kTile];  // the blocks' sums, for more than one block
            for (int64_t b = 0; b < n; b += kSumBlock) {
                const int64_t e = std::min(n, b + kSumBlock);
                C* block = one_block ? out : part;
                for (int64_t l = 0; l < len; ++l) block[l] = 0;
                // Two classes per pass over the positions: half the loads and stores of the block's sums.
                int64_t c = b;
                for (; c + 1 < e; c += 2) {
#pragma omp simd
                    for (int64_t l = 0; l < len; ++l) block[l] += term(c, l) + term(c + 1, l);
                }
                if (c < e) {
#pragma omp simd
                    for (int64_t l = 0; l < len; ++l) block[l] += term(c, l);
                }
                if (one_block) return;
#pragma omp simd
                for (int64_t l = 0; l < len; ++l) total[l] = (b == 0 ? 0.0 : total[l]) + static_cast<double>(part[l]);
            }
#pragma omp simd
            for (int64_t l = 0; l < len; ++l) out[l] = static_cast<C>(total[l]);
        };
        // For float and double, the exponentials go into the gradient buffer as they are summed, so the
        // gradient pass reads them back (from L1/L2) instead of computing each a second time.
        constexpr bool stored = std::is_same<T, C>::value;
        Store<T>* go = grad ? grad + o * n * inner + i0 * ps : nullptr;
        if (stored && go) {
            tile_sum(s_sum, [&](int64_t c, int64_t l) {
                C t;
                const C e = vexp(shifted_logit<T, CAP>(xo, c * cs + l * ps, k, m[l], tm[l], t));
                go[c * cs + l * ps] = Elem<T>::store(e);
                return e;
            });
        } else {
            tile_sum(s_sum, [&](int64_t c, int64_t l) {
                C t;
                return vexp(shifted_logit<T, CAP>(xo, c * cs + l * ps, k, m[l], tm[l], t));
            });
        }
        if (!need_wx) std::fill(wx, wx + len, C(0));
        if (!to) {
            std::fill(wtx, wtx + len, C(0));
            std::fill(wt, wt + len, C(0));
        }
        if (need_wx) {
            tile_sum(wx, [&](int64_t c, int64_t l) {
                C t;
                const C d = shifted_logit<T, CAP>(xo, c * cs + l * ps, k, m[l], tm[l], t);
                return weighted_term(w[c], d);
            });
        }
        if (to) {  // of the smoothed target, as in option_sums
            tile_sum(wtx, [&](int64_t c, int64_t l) {
                C t;
                const C wtc = w[c] * ((C(1) - eps) * Elem<T>::load(to[c * cs + l * ps]) + uniform);
                return weighted_term(wtc, shifted_logit<T, CAP>(xo, c * cs + l * ps, k, m[l], tm[l], t));
            });
            tile_sum(wt, [&](int64_t c, int64_t l) {
                return w[c] * ((C(1) - eps) * Elem<T>::load(to[c * cs + l * ps]) + uniform);
            });
        }
        // The loss and gradient coefficients per position, in one SIMD loop (the log and the divisions
        // dominate at C ~ 20).
        if (probability) {
            finalize_positions<true>(terms_k, len, m, s_sum, xy, wx, wtx, wt, wy, g, keep_c, loss, A, B, fix_c);
        } else {
            finalize_positions<false>(terms_k, len, m, s_sum, xy, wx, wtx, wt, wy, g, keep_c, loss, A, B, fix_c);
        }
        if (loss_rows) {
            for (int64_t l = 0; l < len; ++l) loss_rows[row0 + l] = static_cast<C>(loss[l]);
        }
        partial[static_cast<size_t>(item)] = sum_in_four_lanes(loss, len);
        if (!go) continue;
        for (int64_t c = 0; c < n; ++c) {
            const C wc = w[c];
            const Store<T>* xc = xo + c * cs;
            Store<T>* gc_out = go + c * cs;
            if (to) {
                const Store<T>* tc = to + c * cs;
#pragma omp simd
                for (int64_t l = 0; l < len; ++l) {
                    C t = 0;
                    const C d = shifted_logit<T, CAP>(xc, l * ps, k, m[l], tm[l], t);
                    const C target = (C(1) - eps) * Elem<T>::load(tc[l * ps]) + uniform;
                    const C e = stored ? Elem<T>::load(gc_out[l * ps]) : vexp(d);
                    C gc = e * A[l] - B[l] * wc * target;
                    if constexpr (CAP) gc *= (C(1) - t) * (C(1) + t);
                    gc_out[l * ps] = Elem<T>::store(gc);  // probability targets have no ignored position
                }
            } else {
                const int32_t c32 = static_cast<int32_t>(c);
                // B is 0 without label smoothing: a loop without it saves streaming B through.
                auto class_gradient = [&](auto smoothing) {
#pragma omp simd
                    for (int64_t l = 0; l < len; ++l) {
                        C t = 0;
                        const C d = shifted_logit<T, CAP>(xc, l * ps, k, m[l], tm[l], t);
                        // p * A - B * w_c, minus (1 - eps) w_y g at the target class: the one-hot's 1.
                        const C e = stored ? Elem<T>::load(gc_out[l * ps]) : vexp(d);
                        C gc = e * A[l];
                        if constexpr (decltype(smoothing)::value) gc -= B[l] * wc;
                        gc -= y[l] == c32 ? fix_c[l] : C(0);
                        if constexpr (CAP) gc *= (C(1) - t) * (C(1) + t);
                        // A select, not a multiply: an ignored position may hold NaN (all -inf logits).
                        gc_out[l * ps] = Elem<T>::store(keep_c[l] != C(0) ? gc : C(0));
                    }
                };
                if (need_wx) {
                    class_gradient(std::true_type{});
                } else {
                    class_gradient(std::false_type{});
                }
            }
        }
    }
    return reduce_items(partial, denom, call);
}

// Calls f with a value of the element type that `dtype` names (float, double, BFloat16, Half), for the
// entry points below; an unknown code (the bindings never pass one) gives NaN.
template <class F>
double with_element_type(DType dtype, F f) {
    switch (dtype) {
        case DType::f32:
            return f(float{});
        case DType::f64:
            return f(double{});
        case DType::bf16:
            return f(BFloat16{});
        case DType::f16:
            return f(Half{});
        default:
            return std::numeric_limits<double>::quiet_NaN();
    }
}

template <class T>
double cross_entropy_layout(const LossCall& call) {
    const bool cap = call.softcap > 0;
    if (call.layout.inner == 1) {
        if (call.layout.classes <= kSmallClasses) {
            return cap ? cross_entropy_tiles<T, true, true>(call) : cross_entropy_tiles<T, false, true>(call);
        }
        return cap ? cross_entropy_rows<T, true>(call) : cross_entropy_rows<T, false>(call);
    }
    return cap ? cross_entropy_tiles<T, true, false>(call) : cross_entropy_tiles<T, false, false>(call);
}

template <class T>
double cross_entropy_typed(const LossCall& call) {
    if (!(call.grad && call.reduction == Reduction::mean && call.zero_if_all_ignored)) {
        return cross_entropy_layout<T>(call);
    }
    // zero_if_all_ignored over a denominator of 0: the loss 0 and a gradient of exactly 0, also on a
    // counted row with no finite logit, whose NaN softmax times the 0 upstream gradient is NaN. The
    // denominator is found once, here, and handed down as the normalizer (what mean divides by).
    LossCall known = call;
    known.has_normalizer = true;
    known.normalizer = mean_denominator<Compute<T>>(call);
    if (known.normalizer != 0) return cross_entropy_layout<T>(known);
    known.grad = nullptr;
    const double loss = cross_entropy_layout<T>(known);
    const Layout& L = call.layout;
    Store<T>* g = static_cast<Store<T>*>(call.grad);
    std::fill(g, g + L.outer * L.classes * L.inner, Elem<T>::store(Compute<T>(0)));
    return loss;
}

double cross_entropy(const LossCall& call) {
    return with_element_type(call.dtype, [&](auto tag) { return cross_entropy_typed<decltype(tag)>(call); });
}

// ---------------------------------------------------------------------------------------------------
// NLL: -w_y x_y per row, no softmax. Rows in fixed items for a thread-independent sum.

template <class T>
double nll_typed(const LossCall& call) {
    using C = Compute<T>;
    const Layout& L = call.layout;
    const int64_t rows = L.outer * L.inner;
    const Store<T>* x = static_cast<const Store<T>*>(call.x);
    const C* w = static_cast<const C*>(call.weight);
    C* loss_rows = static_cast<C*>(call.loss_rows);
    const double denom = call.reduction == Reduction::mean ? mean_denominator<C>(call) : 1.0;
    const int64_t per_item = 1024;
    const int64_t items = (rows + per_item - 1) / per_item;
    std::vector<double> partial(static_cast<size_t>(items), 0.0);
    const int threads = thread_count(call.threads, rows * 16, items);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t item = 0; item < items; ++item) {
        double sum = 0.0;
        const int64_t r_end = std::min(rows, (item + 1) * per_item);
        for (int64_t r = item * per_item; r < r_end; ++r) {
            const int64_t y = class_index(call, r);
            double loss = 0.0;
            if (counted_class(y, call.ignore_index, L.classes)) {
                const int64_t o = r / L.inner, i = r % L.inner;
                const double xy = static_cast<double>(Elem<T>::load(x[(o * L.classes + y) * L.inner + i]));
                loss = -(w ? static_cast<double>(w[y]) : 1.0) * xy;
            }
            if (loss_rows) loss_rows[r] = static_cast<C>(loss);
            sum += loss;
        }
        partial[static_cast<size_t>(item)] = sum;
    }
    return reduce_items(partial, denom, call);
}

double nll_loss(const LossCall& call) {
    return with_element_type(call.dtype, [&](auto tag) { return nll_typed<decltype(tag)>(call); });
}

// ---------------------------------------------------------------------------------------------------
// softmax, log_softmax, logsumexp over the class axis.

// The log-sum-exp of a row whose maximum is +inf, as torch gives it: +inf, or NaN if the row also holds
// a NaN (the shifted sum cannot tell them apart: exp(inf - inf) is NaN either way). A rare path, off the
// loops over classes.
template <class T>
double lse_of_infinite_row(const Store<T>* x, int64_t n, int64_t stride) {
    for (int64_t c = 0; c < n; ++c) {
        const Compute<T> v = Elem<T>::load(x[c * stride]);
        if (v != v) return std::numeric_limits<double>::quiet_NaN();
    }
    return std::numeric_limits<double>::infinity();
}

template <class T>
void softmax_typed(const SoftmaxCall& call) {
    using C = Compute<T>;
    const Layout& L = call.layout;
    const int64_t n = L.classes, inner = L.inner;
    const Store<T>* x = static_cast<const Store<T>*>(call.x);
    Store<T>* out = static_cast<Store<T>*>(call.out);
    const Consts<C> k;
    const int64_t tiles_per_outer = (inner + kTile - 1) / kTile;
    const int64_t items = L.outer * tiles_per_outer;
    const int threads = thread_count(call.threads, L.outer * n * inner, items);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t item = 0; item < items; ++item) {
        const int64_t o = item / tiles_per_outer;
        const int64_t i0 = (item % tiles_per_outer) * kTile;
        const int64_t len = std::min(kTile, inner - i0);
        const Store<T>* xo = x + o * n * inner + i0;
        if (inner == 1) {
            // Classes contiguous: one row.
            const C m = row_max<T, false>(xo, n, k);
            const double s = blocked_sum<C>(n, [&](int64_t c) { return vexp(Elem<T>::load(xo[c]) - m); });
            if (call.op == SoftmaxOp::logsumexp) {
                const double lse = m == std::numeric_limits<C>::infinity() ? lse_of_infinite_row<T>(xo, n, 1)
                                                                            : static_cast<double>(m) + std::log(s);
                out[o] = Elem<T>::store(static_cast<C>(lse));
                continue;
            }
            Store<T>* oo = out + o * n;
            if (call.op == SoftmaxOp::log_softmax) {
                const C log_s = static_cast<C>(std::log(s));
#pragma omp simd
                for (int64_t c = 0; c < n; ++c) oo[c] = Elem<T>::store((Elem<T>::load(xo[c]) - m) - log_s);
            } else {
                const C inv_s = static_cast<C>(1.0 / s);
#pragma omp simd
                for (int64_t c = 0; c < n; ++c) oo[c] = Elem<T>::store(vexp(Elem<T>::load(xo[c]) - m) * inv_s);
            }
            continue;
        }
        C m[kTile], part[kTile], scale[kTile];
        double s[kTile];
        for (int64_t l = 0; l < len; ++l) {
            m[l] = -std::numeric_limits<C>::infinity();
            s[l] = 0.0;
        }
        for (int64_t c = 0; c < n; ++c) {
#pragma omp simd
            for (int64_t l = 0; l < len; ++l) m[l] = std::max(m[l], Elem<T>::load(xo[c * inner + l]));
        }
        for (int64_t l = 0; l < len; ++l) {
            if (m[l] == -std::numeric_limits<C>::infinity()) m[l] = 0;
        }
        for (int64_t b = 0; b < n; b += kSumBlock) {
            const int64_t e = std::min(n, b + kSumBlock);
            for (int64_t l = 0; l < len; ++l) part[l] = 0;
            for (int64_t c = b; c < e; ++c) {
#pragma omp simd
                for (int64_t l = 0; l < len; ++l) part[l] += vexp(Elem<T>::load(xo[c * inner + l]) - m[l]);
            }
            for (int64_t l = 0; l < len; ++l) s[l] += static_cast<double>(part[l]);
        }
        if (call.op == SoftmaxOp::logsumexp) {
            for (int64_t l = 0; l < len; ++l) {
                const double lse = m[l] == std::numeric_limits<C>::infinity() ? lse_of_infinite_row<T>(xo + l, n, inner)
                                                                               : static_cast<double>(m[l]) + std::log(s[l]);
                out[o * inner + i0 + l] = Elem<T>::store(static_cast<C>(lse));
            }
            continue;
        }
        const bool log_op = call.op == SoftmaxOp::log_softmax;
        for (int64_t l = 0; l < len; ++l) scale[l] = static_cast<C>(log_op ? std::log(s[l]) : 1.0 / s[l]);
        Store<T>* oo = out + o * n * inner + i0;
        for (int64_t c = 0; c < n; ++c) {
            if (log_op) {
#pragma omp simd
                for (int64_t l = 0; l < len; ++l) {
                    oo[c * inner + l] = Elem<T>::store((Elem<T>::load(xo[c * inner + l]) - m[l]) - scale[l]);
                }
            } else {
#pragma omp simd
                for (int64_t l = 0; l < len; ++l) {
                    oo[c * inner + l] = Elem<T>::store(vexp(Elem<T>::load(xo[c * inner + l]) - m[l]) * scale[l]);
                }
            }
        }
    }
}

void softmax(const SoftmaxCall& call) {
    with_element_type(call.dtype, [&](auto tag) {
        softmax_typed<decltype(tag)>(call);
        return 0.0;
    });
}

// f of every element, in parallel: the kernel's own exp and log, exposed for their accuracy tests.
template <class V, class F>
void map_array(const V* in, V* out, int64_t n, int threads, F f) {
    const int nt = thread_count(threads, n, n / 4096 + 1);
#pragma omp parallel for simd schedule(static) num_threads(nt)
    for (int64_t i = 0; i < n; ++i) out[i] = f(in[i]);
}

void exp_f32(const float* in, float* out, int64_t n, int threads) {
    map_array(in, out, n, threads, [](float v) { return vexp_whole_range(v); });
}
void exp_f64(const double* in, double* out, int64_t n, int threads) {
    map_array(in, out, n, threads, [](double v) { return vexp_whole_range(v); });
}
void log_f32(const float* in, float* out, int64_t n, int threads) {
    map_array(in, out, n, threads, [](float v) { return vlog(v); });
}
void log_f64(const double* in, double* out, int64_t n, int threads) {
    map_array(in, out, n, threads, [](double v) { return vlog(v); });
}

// ---------------------------------------------------------------------------------------------------
// Per-token statistics of tempered logits z = x / T (TokenStatsCall), a row at a time: one pass for the
// maximum m, one for s = sum_c e_c and u = sum_c e_c (z_c - m) with e_c = exp(z_c - m), so that
// lse = m + log s, entropy = log s - u / s and log p_c = (z_c - m) - log s; with upstream gradients a
// third pass writes d/dx. A class at z_c = -inf has e_c = 0 and adds 0 to u (not 0 * -inf = NaN). A row
// holding +inf, NaN or only -inf gives torch's values: logsumexp +inf, -inf or NaN, the rest NaN.
//
// Gradient: with p = softmax(z), H = lse - sum_c p_c z_c, d lse/dz_c = p_c, d log p_y/dz_c = [c = y] - p_c
// and dH/dz_c = -p_c (z_c - sum_j p_j z_j) = -p_c (log p_c + H); so for upstream (g_lp, g_ent, g_lse)
//   d/dz_c = g_lp [c = y] + p_c (g_lse - g_lp - g_ent H - g_ent log p_c),  d/dx_c = d/dz_c / T.

inline int64_t token_target(const TokenStatsCall& call, int64_t row) {
    return class_index_of(call.target, call.target_kind, row);
}

template <class T>
void token_stats_typed(const TokenStatsCall& call) {
    using C = Compute<T>;
    const int64_t n = call.classes;
    const Store<T>* x = static_cast<const Store<T>*>(call.x);
    Store<T>* grad = static_cast<Store<T>*>(call.grad);
    const C inv_t = static_cast<C>(call.inv_temperature);
    const C inf = std::numeric_limits<C>::infinity();
    const int64_t items = (call.rows + kRowsPerItem - 1) / kRowsPerItem;
    const int threads = thread_count(call.threads, call.rows * n, items);
    auto put = [](void* out, int64_t r, double v) {
        if (out) static_cast<C*>(out)[r] = static_cast<C>(v);
    };
    auto upstream = [](const void* g, int64_t r) { return g ? static_cast<const C*>(g)[r] : C(0); };
#pragma omp parallel for schedule(dynamic) num_threads(threads)
    for (int64_t item = 0; item < items; ++item) {
        const int64_t r_end = std::min(call.rows, (item + 1) * kRowsPerItem);
        for (int64_t r = item * kRowsPerItem; r < r_end; ++r) {
            const Store<T>* xr = x + r * n;
            const int64_t y = token_target(call, r);
            const bool counted = y != call.ignore_index && y >= 0 && y < n;
            if (!counted) {  // nothing to compute: 0 for every statistic and gradient
                put(call.log_prob, r, 0.0);
                put(call.entropy, r, 0.0);
                put(call.logsumexp, r, 0.0);
                if (grad) std::fill(grad + r * n, grad + (r + 1) * n, Elem<T>::store(C(0)));
                continue;
            }
            C xm = -inf;
#pragma omp simd reduction(max : xm)
            for (int64_t c = 0; c < n; ++c) xm = std::max(xm, Elem<T>::load(xr[c]));
            // Shifted before tempering, d_c = (x_c - max(x)) / T, which is exactly 0 at the maximum: the
            // form x_c / T - max(x) / T lets the compiler fuse x_c * (1/T) - m into one FMA whose exact
            // product differs from the rounded m (by 1e14 at x = 1e30), a finite wrong log-probability.
            // A row of all -inf, or holding +inf or NaN, is shifted by 0, and IEEE arithmetic gives
            // torch's NaN (or inf) for that row alone.
            const C shift = std::abs(xm) < inf ? xm : C(0);
            const C m = shift * inv_t;
            double s = 0.0, u = 0.0;
            for (int64_t b = 0; b < n; b += kSumBlock) {
                const int64_t e_end = std::min(n, b + kSumBlock);
                C ps = 0, pu = 0;
#pragma omp simd reduction(+ : ps, pu)
                for (int64_t c = b; c < e_end; ++c) {
                    const C d = (Elem<T>::load(xr[c]) - shift) * inv_t;
                    const C e = vexp(d);
                    ps += e;
                    pu += e > 0 ? e * d : C(0);
                }
                s += static_cast<double>(ps);
                u += static_cast<double>(pu);
            }
            if (!(s > 0 && s < HUGE_VAL)) {
                // The row holds +inf or NaN (else every e_c <= 1), or only -inf (else the maximum's e is 1):
                // torch's logsumexp is +inf or -inf, NaN with a NaN, its log_softmax (so log p, H and every
                // gradient) NaN. Not IEEE arithmetic on e = exp(inf - 0) or 1 / s = inf, whose NaN p_c,
                // failing p_c > 0 below, would give finite gradients.
                bool has_nan = false;
                for (int64_t c = 0; c < n; ++c) has_nan = has_nan || std::isnan(Elem<T>::load(xr[c]));
                const double nan = std::numeric_limits<double>::quiet_NaN();
                put(call.log_prob, r, nan);
                put(call.entropy, r, nan);
                put(call.logsumexp, r, has_nan ? nan : s == 0 ? -HUGE_VAL : HUGE_VAL);
                if (grad) std::fill(grad + r * n, grad + (r + 1) * n, Elem<T>::store(static_cast<C>(nan)));
                continue;
            }
            const double log_s = std::log(s);
            const double entropy = log_s - u / s;
            const double dy = static_cast<double>((Elem<T>::load(xr[y]) - shift) * inv_t);
            put(call.log_prob, r, dy - log_s);
            put(call.entropy, r, entropy);
            put(call.logsumexp, r, static_cast<double>(m) + log_s);
            if (!grad) continue;
            const C g_lp = upstream(call.g_log_prob, r), g_ent = upstream(call.g_entropy, r);
            const C a = upstream(call.g_logsumexp, r) - g_lp - g_ent * static_cast<C>(entropy);
            const C inv_s = static_cast<C>(1.0 / s), ls = static_cast<C>(log_s);
            // The target's own term first: grad may be x itself, and the loop below overwrites x_y.
            const C p_y = vexp(static_cast<C>(dy)) * inv_s;
            const C lp_y = static_cast<C>(dy - log_s);
            const C g_y = (g_lp + (p_y > 0 ? p_y * (a - g_ent * lp_y) : C(0))) * inv_t;
            Store<T>* gr = grad + r * n;
#pragma omp simd
            for (int64_t c = 0; c < n; ++c) {
                const C d = (Elem<T>::load(xr[c]) - shift) * inv_t;
                const C p = vexp(d) * inv_s;
                gr[c] = Elem<T>::store((p > 0 ? p * (a - g_ent * (d - ls)) : C(0)) * inv_t);
            }
            gr[y] = Elem<T>::store(g_y);
        }
    }
}

void token_stats(const TokenStatsCall& call) {
    with_element_type(call.dtype, [&](auto tag) {
        token_stats_typed<decltype(tag)>(call);
        return 0.0;
    });
}

}  // namespace
}  // namespace CROSSENT_CAT(isa_, CROSSENT_ISA)

Kernels CROSSENT_CAT(kernels_, CROSSENT_ISA)() {
    namespace isa = CROSSENT_CAT(isa_, CROSSENT_ISA);
#define CROSSENT_STR_(a) #a
#define CROSSENT_STR(a) CROSSENT_STR_(a)
    return Kernels{CROSSENT_STR(CROSSENT_ISA), isa::cross_entropy, isa::nll_loss, isa::softmax, isa::exp_f32,
                   isa::exp_f64, isa::log_f32, isa::log_f64, isa::token_stats};
}

}  // namespace crossent

// Helpers shared by the CPU kernels (csrc/cpu/*.cpp): storage-dtype load/store in fp32,
// a vectorizable exp/sigmoid, dtype dispatch, ISA-independent sums and the parallel-chunk policy.
//
// Everything here is written so that `#pragma omp simd` loops calling it vectorize: branch-free
// selects, integer bit tricks, no libm calls (glibc's expf is not vectorized without
// -ffast-math). Conversions round exactly like c10::BFloat16 / c10::Half (round to nearest even).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>

#define CALM_CPU_INLINE inline __attribute__((always_inline))

namespace calm_fast {
namespace cpu {

// Elements per parallel task: below this an op runs on the calling thread.
constexpr int64_t kGrain = 32768;

CALM_CPU_INLINE float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

CALM_CPU_INLINE uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

// c ? a : b for floats, as a bitwise blend. With gcc's default -ftrapping-math a plain `?:` on
// floats lets gcc sink the float arithmetic feeding one arm into a branch, which it then will
// not if-convert, and the loop does not vectorize; the blend keeps both arms computed.
CALM_CPU_INLINE uint32_t select_u32(bool c, uint32_t a, uint32_t b) {
  const uint32_t mask = 0u - uint32_t(c);
  return (a & mask) | (b & ~mask);
}

CALM_CPU_INLINE float select_f32(bool c, float a, float b) {
  return bits_to_float(select_u32(c, float_to_bits(a), float_to_bits(b)));
}

// ---- storage dtypes -------------------------------------------------------------------------
// Each describes how one storage dtype is read into and written from fp32.

struct F32 {
  using storage = float;
  using bits = uint32_t;  // same-width unsigned integer, for radix selection
  static constexpr int kBits = 32;
  static constexpr bits kAbsMask = 0x7fffffffu;
  static CALM_CPU_INLINE float load(float v) { return v; }
  static CALM_CPU_INLINE float store(float v) { return v; }
};

struct BF16 {
  using storage = uint16_t;
  using bits = uint16_t;
  static constexpr int kBits = 16;
  static constexpr bits kAbsMask = 0x7fff;
  static CALM_CPU_INLINE float load(uint16_t v) { return bits_to_float(uint32_t(v) << 16); }
  // c10::BFloat16's round_to_nearest_even, with its NaN -> 0x7fc0.
  static CALM_CPU_INLINE uint16_t store(float v) {
    const uint32_t u = float_to_bits(v);
    const uint32_t rounded = (u + (((u >> 16) & 1u) + 0x7fffu)) >> 16;
    return uint16_t(select_u32(v != v, 0x7fc0u, rounded));
  }
};

struct F16 {
  using storage = uint16_t;
  using bits = uint16_t;
  static constexpr int kBits = 16;
  static constexpr bits kAbsMask = 0x7fff;
  // c10::detail::fp16_ieee_to_fp32_value (exact, handles subnormals, inf, NaN).
  static CALM_CPU_INLINE float load(uint16_t h) {
    const uint32_t w = uint32_t(h) << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const float normalized = bits_to_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
    const float magnitude = select_f32(two_w < (1u << 27), denormalized, normalized);
    return bits_to_float(sign | float_to_bits(magnitude));
  }
  // c10::detail::fp16_ieee_from_fp32_value (round to nearest even, overflow -> inf).
  static CALM_CPU_INLINE uint16_t store(float f) {
    float base = (__builtin_fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = float_to_bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    bias = select_u32(bias < 0x71000000u, 0x71000000u, bias);
    base = bits_to_float((bias >> 1) + 0x07800000u) + base;
    const uint32_t b = float_to_bits(base);
    const uint32_t nonsign = ((b >> 13) & 0x00007C00u) + (b & 0x00000FFFu);
    return uint16_t((sign >> 16) | select_u32(shl1_w > 0xFF000000u, 0x7E00u, nonsign));
  }
};

// Calls fn(F32{}), fn(BF16{}) or fn(F16{}) for a float dtype (the checks have run already).
template <typename Fn>
void dispatch_float(at::ScalarType type, Fn&& fn) {
  switch (type) {
    case at::kFloat:
      fn(F32{});
      return;
    case at::kBFloat16:
      fn(BF16{});
      return;
    case at::kHalf:
      fn(F16{});
      return;
    default:
      TORCH_CHECK(false, "calm_fast: unexpected dtype ", type);
  }
}

template <typename T>
CALM_CPU_INLINE typename T::storage* data(const at::Tensor& t) {
  return static_cast<typename T::storage*>(t.data_ptr());
}

// ---- math -----------------------------------------------------------------------------------

// exp(x) in fp32, ~1 ulp: Cody-Waite reduction by ln 2, SLEEF's expf polynomial, and a 2^q
// scaling split in two halves so that results near overflow and in the subnormal range are
// right. exp(+inf) = inf, exp(-inf) = 0, exp(NaN) = NaN (NaN passes the clamps and poisons the
// polynomial). Branch-free.
CALM_CPU_INLINE float exp_f32(float x) {
  float xc = select_f32(x < -104.0f, -104.0f, x);  // exp(-104) rounds to 0
  xc = select_f32(xc > 89.0f, 89.0f, xc);          // exp(89) overflows to inf
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float shifted = xc * 1.442695040888963407f + kRound;
  const int32_t q = int32_t(float_to_bits(shifted) - float_to_bits(kRound));
  const float qf = shifted - kRound;
  float s = qf * -0.693145751953125f + xc;  // exact: q has <= 8 bits, the constant 16
  s = qf * -1.428606765330187045e-06f + s;
  float u = 0.000198527617612853646278381f;
  u = u * s + 0.00139304355252534151077271f;
  u = u * s + 0.00833336077630519866943359f;
  u = u * s + 0.0416664853692054748535156f;
  u = u * s + 0.166666671633720397949219f;
  u = u * s + 0.5f;
  u = (s * s) * u + (s + 1.0f);
  const int32_t q1 = q >> 1;  // q in [-150, 128]: both halves give normal powers of two
  const int32_t q2 = q - q1;
  return u * bits_to_float((uint32_t(q1) + 127u) << 23) *
         bits_to_float((uint32_t(q2) + 127u) << 23);
}

// torch.sigmoid's formula: 1 / (1 + exp(-x)).
CALM_CPU_INLINE float sigmoid_f32(float x) { return 1.0f / (1.0f + exp_f32(-x)); }

// ---- reductions -----------------------------------------------------------------------------

// Sums accumulate in kSumLanes fixed lanes (element i of a range goes to lane i % kSumLanes),
// then the lanes are added in order. An `omp simd reduction` has as many lanes as the vector is
// wide, so its rounding would differ between the ISA builds; this one does not.
constexpr int kSumLanes = 16;

// Calls add(lane, i) for every i in [begin, end), lane = (i - begin) % kSumLanes, vectorized
// across the lanes. Keep `add` to loads and adds: compute the terms first in their own
// `omp simd` loop into an L1 tile (the lane arrays live in memory, and sigmoids inside `add`
// measured 2x slower on AVX-512).
template <typename Fn>
CALM_CPU_INLINE void for_each_in_lanes(int64_t begin, int64_t end, const Fn& add) {
  int64_t i = begin;
  for (; i + kSumLanes <= end; i += kSumLanes) {
#pragma omp simd
    for (int lane = 0; lane < kSumLanes; ++lane) add(lane, i + lane);
  }
  for (int lane = 0; i < end; ++i, ++lane) add(lane, i);
}

template <typename Acc>
CALM_CPU_INLINE Acc sum_lanes(const Acc (&lanes)[kSumLanes]) {
  Acc total = 0;
  for (int lane = 0; lane < kSumLanes; ++lane) total += lanes[lane];
  return total;
}

// ---- parallelism ----------------------------------------------------------------------------

// Runs fn(begin, end) over [0, n) in contiguous chunks of at least `grain` items, on the
// calling thread when n <= grain (no thread spawn for small inputs).
template <typename Fn>
void parallel_chunks(int64_t n, int64_t grain, const Fn& fn) {
  if (n <= 0) return;
  at::parallel_for(0, n, grain, fn);
}

}  // namespace cpu
}  // namespace calm_fast

// CPU kernel of entropy_argmax: per row of [B, C] logits, the softmax entropy (fp32) and the
// first index of the max (int64), reading each row once.
//
// Online softmax over blocks of the row: with m the running max, s = Σ exp(z - m) and
// t = Σ exp(z - m)·(z - m), entropy = log(s) - t/s. When a block raises the max from m to m',
// s <- s·e^(m-m') and t <- e^(m-m')·(t + s·(m - m')). Blocks are converted to fp32 in a small
// buffer (L1) and swept there: block max first, then the exp terms, then their sums in fixed lanes
// (cpu_utils.h: the same bits on every ISA build). Special values follow
// reference.py: a NaN makes the entropy NaN and the argmax the first NaN; a row whose max is
// +inf, or which is all -inf, has entropy -0 (every term is NaN, zeroed by nan_to_num);
// -inf entries and exp underflow contribute 0.
#include "ops.h"

#include <torch/library.h>

#include <cmath>
#include <limits>

#include "cpu_utils.h"

namespace calm_fast {
namespace cpu {
namespace {

constexpr int64_t kRowBlock = 256;

struct RowResult {
  float entropy;
  int64_t argmax;
};

template <typename T>
RowResult entropy_argmax_row(const typename T::storage* __restrict row, int64_t cols) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  constexpr float kMaxFloat = std::numeric_limits<float>::max();
  float z[kRowBlock], e_terms[kRowBlock], ed_terms[kRowBlock];
  float m = -kInf;  // running max
  float s = 0.0f;   // Σ exp(z - m)
  float t = 0.0f;   // Σ exp(z - m) · (z - m)
  int64_t argmax = 0;
  for (int64_t start = 0; start < cols; start += kRowBlock) {
    const int64_t len = std::min(kRowBlock, cols - start);
    float block_max = -kInf;
    int any_nan = 0;
#pragma omp simd reduction(max : block_max) reduction(| : any_nan)
    for (int64_t i = 0; i < len; ++i) {
      const float v = T::load(row[start + i]);
      z[i] = v;
      block_max = v > block_max ? v : block_max;
      any_nan |= int(v != v);
    }
    if (any_nan) {
      int64_t i = 0;
      while (!(z[i] != z[i])) ++i;
      return {std::numeric_limits<float>::quiet_NaN(), start + i};
    }
    if (block_max > m) {
      int64_t i = 0;
      while (z[i] != block_max) ++i;
      argmax = start + i;
      if (s > 0.0f) {  // rescale the sums to the new max (m is finite here)
        const float shift = std::max(m - block_max, -kMaxFloat);
        const float scale = exp_f32(shift);
        if (scale > 0.0f) {
          t = scale * (t + s * shift);
          s = s * scale;
        } else {
          t = 0.0f;
          s = 0.0f;
        }
      }
      m = block_max;
    }
    if (m == -kInf || m == kInf) continue;  // handled after the loop
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      // z - m can be -inf (z = -inf, or overflow): clamp so that 0 · d stays 0.
      const float diff = z[i] - m;
      const float d = select_f32(diff < -kMaxFloat, -kMaxFloat, diff);
      const float e = exp_f32(d);
      e_terms[i] = e;
      ed_terms[i] = e * d;
    }
    float bs[kSumLanes] = {}, bt[kSumLanes] = {};
    for_each_in_lanes(0, len, [&](int lane, int64_t i) {
      bs[lane] += e_terms[i];
      bt[lane] += ed_terms[i];
    });
    s += sum_lanes(bs);
    t += sum_lanes(bt);
  }
  if (m == -kInf || m == kInf) return {-0.0f, argmax};
  return {std::log(s) - t / s, argmax};
}

template <typename T>
void entropy_argmax_impl(const at::Tensor& logits, at::Tensor& entropy, at::Tensor& argmax) {
  const int64_t rows = logits.size(0);
  const int64_t cols = logits.size(1);
  const auto* z = data<T>(logits);
  float* h = entropy.data_ptr<float>();
  int64_t* idx = argmax.data_ptr<int64_t>();
  const int64_t grain = std::max<int64_t>(1, kGrain / cols);
  parallel_chunks(rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const RowResult res = entropy_argmax_row<T>(z + r * cols, cols);
      h[r] = res.entropy;
      idx[r] = res.argmax;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> entropy_argmax_cpu(const at::Tensor& logits) {
  check_entropy_argmax(logits);
  const int64_t rows = logits.size(0);
  at::Tensor entropy = at::empty({rows}, logits.options().dtype(at::kFloat));
  at::Tensor argmax = at::empty({rows}, logits.options().dtype(at::kLong));
  dispatch_float(logits.scalar_type(), [&](auto tag) {
    entropy_argmax_impl<decltype(tag)>(logits, entropy, argmax);
  });
  return {entropy, argmax};
}

}  // namespace
}  // namespace cpu
}  // namespace calm_fast

TORCH_LIBRARY_IMPL(calm_fast, CPU, m) {
  m.impl("entropy_argmax", &calm_fast::cpu::entropy_argmax_cpu);
}

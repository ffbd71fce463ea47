// CPU kernels of mask_step_ (CALM's fused mask update), mask_grad_sumsq (the normalized step's
// Σ (g·δ·σ'(S))²) and masked_apply_ (θ += m ⊙ δ). One sweep over the scalars, fp32 arithmetic,
// the reference's per-element formulas and order.
#include "ops.h"

#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu_utils.h"

namespace calm_fast {
namespace cpu {
namespace {

// ---- mask_step_ -----------------------------------------------------------------------------

struct MaskStepArgs {
  float lr;
  float reg_pos;  // coefficient of σ'(S) in the regularizer where S > 0
  float reg_neg;  // ... where S <= 0
};

// Polarize: l1 · sign(S) · σ'(S) with sign(0) = -1; L1: -l1 · σ'(S); none: 0 · σ'(S) = +0
// (σ'(S) is never NaN unless S is, so adding it reproduces the reference's `+ 0`).
MaskStepArgs mask_step_args(double lr, double l1, MaskReg reg) {
  const float l1f = static_cast<float>(l1);
  switch (reg) {
    case MaskReg::kPolarize:
      return {static_cast<float>(lr), l1f, -l1f};
    case MaskReg::kL1:
      return {static_cast<float>(lr), static_cast<float>(-l1), static_cast<float>(-l1)};
    case MaskReg::kNone:
    default:
      return {static_cast<float>(lr), 0.0f, 0.0f};
  }
}

template <typename W, typename D, bool kHasBase>
void mask_step_chunk(float* __restrict s_ptr, typename W::storage* __restrict w_ptr,
                     const typename W::storage* __restrict g_ptr,
                     const typename D::storage* __restrict d_ptr,
                     const typename W::storage* __restrict b_ptr, MaskStepArgs a, int64_t begin,
                     int64_t end) {
  const float lr = a.lr, reg_pos = a.reg_pos, reg_neg = a.reg_neg;
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const float s = s_ptr[i];
    const float d = D::load(d_ptr[i]);
    const float p = sigmoid_f32(s);
    const float dsig = p * (1.0f - p);
    const float reg = select_f32(s > 0.0f, reg_pos, reg_neg) * dsig;
    const float s_new = (s - lr * W::load(g_ptr[i]) * d * dsig) + reg;
    const float b = kHasBase ? W::load(b_ptr[i]) : W::load(w_ptr[i]) - p * d;
    w_ptr[i] = W::store(b + sigmoid_f32(s_new) * d);
    s_ptr[i] = s_new;
  }
}

template <typename W, typename D>
void mask_step_impl(const at::Tensor& logits, const at::Tensor& weight, const at::Tensor& grad,
                    const at::Tensor& delta, const std::optional<at::Tensor>& base,
                    MaskStepArgs args) {
  float* s = logits.data_ptr<float>();
  auto* w = data<W>(weight);
  const auto* g = data<W>(grad);
  const auto* d = data<D>(delta);
  const bool has_base = base.has_value();
  const auto* b = has_base ? data<W>(*base) : nullptr;
  parallel_chunks(logits.numel(), kGrain, [&](int64_t begin, int64_t end) {
    if (has_base) {
      mask_step_chunk<W, D, true>(s, w, g, d, b, args, begin, end);
    } else {
      mask_step_chunk<W, D, false>(s, w, g, d, b, args, begin, end);
    }
  });
}

void mask_step_cpu(at::Tensor& logits, at::Tensor& weight, const at::Tensor& grad,
                   const at::Tensor& delta, const std::optional<at::Tensor>& base, double lr,
                   double l1, c10::string_view reg) {
  const MaskReg parsed = check_mask_step(logits, weight, grad, delta, base, reg);
  const MaskStepArgs args = mask_step_args(lr, l1, parsed);
  dispatch_float(weight.scalar_type(), [&](auto w_tag) {
    dispatch_float(delta.scalar_type(), [&](auto d_tag) {
      mask_step_impl<decltype(w_tag), decltype(d_tag)>(logits, weight, grad, delta, base, args);
    });
  });
}

// ---- mask_grad_sumsq -----------------------------------------------------------------------

// Squares are formed in fp32 like the reference's (a tile at a time, vectorized) and summed in
// double, per fixed chunk of kGrain scalars in fixed lanes, then the chunks in order: the same bits
// for every thread count and ISA build (at::parallel_reduce would split by thread).
template <typename G, typename D>
double mask_grad_sumsq_chunk(const float* __restrict s_ptr, const typename G::storage* __restrict g_ptr,
                             const typename D::storage* __restrict d_ptr, int64_t begin, int64_t end) {
  constexpr int kTile = 256;
  double lanes[kSumLanes] = {};
  float sq[kTile];
  for (int64_t t0 = begin; t0 < end; t0 += kTile) {
    const int len = static_cast<int>(std::min<int64_t>(kTile, end - t0));
#pragma omp simd
    for (int j = 0; j < len; ++j) {
      const int64_t i = t0 + j;
      const float p = sigmoid_f32(s_ptr[i]);
      const float v = (G::load(g_ptr[i]) * D::load(d_ptr[i])) * (p * (1.0f - p));
      sq[j] = v * v;
    }
    for_each_in_lanes(0, len, [&](int lane, int64_t j) { lanes[lane] += static_cast<double>(sq[j]); });
  }
  return sum_lanes(lanes);
}

at::Tensor mask_grad_sumsq_cpu(const at::Tensor& logits, const at::Tensor& grad, const at::Tensor& delta) {
  check_mask_grad_sumsq(logits, grad, delta);
  const int64_t n = logits.numel();
  std::vector<double> partial((n + kGrain - 1) / kGrain, 0.0);
  dispatch_float(grad.scalar_type(), [&](auto g_tag) {
    dispatch_float(delta.scalar_type(), [&](auto d_tag) {
      using G = decltype(g_tag);
      using D = decltype(d_tag);
      const float* s = logits.data_ptr<float>();
      const auto* g = data<G>(grad);
      const auto* d = data<D>(delta);
      parallel_chunks(static_cast<int64_t>(partial.size()), 1, [&](int64_t first, int64_t last) {
        for (int64_t c = first; c < last; ++c) {
          partial[c] = mask_grad_sumsq_chunk<G, D>(s, g, d, c * kGrain, std::min(n, (c + 1) * kGrain));
        }
      });
    });
  });
  double total = 0.0;
  for (const double p : partial) total += p;
  return at::full({}, static_cast<float>(total), logits.options());
}

// ---- masked_apply_ --------------------------------------------------------------------------

// The mask value m of element i for each mode; θ_i <- θ_i + m · δ_i (m = 0 still multiplies).
template <typename W, typename D, MaskMode kMode>
void masked_apply_chunk(typename W::storage* __restrict w_ptr,
                        const typename D::storage* __restrict d_ptr,
                        const float* __restrict mask_ptr, int64_t begin, int64_t end) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const float m = kMode == MaskMode::kSoft ? sigmoid_f32(mask_ptr[i])
                                             : select_f32(mask_ptr[i] > 0.0f, 1.0f, 0.0f);
    w_ptr[i] = W::store(W::load(w_ptr[i]) + m * D::load(d_ptr[i]));
  }
}

// The 8 mask values (0.0f / 1.0f) of every byte of a packed mask, bit b -> entry b.
struct PackedMaskTable {
  float values[256][8];
  PackedMaskTable() {
    for (int byte = 0; byte < 256; ++byte) {
      for (int bit = 0; bit < 8; ++bit) values[byte][bit] = static_cast<float>((byte >> bit) & 1);
    }
  }
};

const PackedMaskTable& packed_mask_table() {
  static const PackedMaskTable table;
  return table;
}

// Packed mode over whole bytes [byte_begin, byte_end): element 8j + b uses bit b of byte j.
template <typename W, typename D>
void masked_apply_packed_chunk(typename W::storage* __restrict w_ptr,
                               const typename D::storage* __restrict d_ptr,
                               const uint8_t* __restrict packed, int64_t byte_begin,
                               int64_t byte_end) {
  const PackedMaskTable& table = packed_mask_table();
  for (int64_t j = byte_begin; j < byte_end; ++j) {
    const float* m = table.values[packed[j]];
    typename W::storage* w = w_ptr + 8 * j;
    const typename D::storage* d = d_ptr + 8 * j;
#pragma omp simd
    for (int b = 0; b < 8; ++b) w[b] = W::store(W::load(w[b]) + m[b] * D::load(d[b]));
  }
}

template <typename W, typename D>
void masked_apply_impl(const at::Tensor& weight, const at::Tensor& delta, const at::Tensor& mask,
                       MaskMode mode) {
  auto* w = data<W>(weight);
  const auto* d = data<D>(delta);
  const int64_t n = weight.numel();
  if (mode == MaskMode::kPacked) {
    const auto* packed = mask.data_ptr<uint8_t>();
    const int64_t full_bytes = n / 8;
    parallel_chunks(full_bytes, kGrain / 8, [&](int64_t begin, int64_t end) {
      masked_apply_packed_chunk<W, D>(w, d, packed, begin, end);
    });
    for (int64_t i = full_bytes * 8; i < n; ++i) {  // the last, partial byte
      const float m = static_cast<float>((packed[i / 8] >> (i % 8)) & 1);
      w[i] = W::store(W::load(w[i]) + m * D::load(d[i]));
    }
    return;
  }
  const float* logits = mask.data_ptr<float>();
  parallel_chunks(n, kGrain, [&](int64_t begin, int64_t end) {
    if (mode == MaskMode::kSoft) {
      masked_apply_chunk<W, D, MaskMode::kSoft>(w, d, logits, begin, end);
    } else {
      masked_apply_chunk<W, D, MaskMode::kHard>(w, d, logits, begin, end);
    }
  });
}

void masked_apply_cpu(at::Tensor& weight, const at::Tensor& delta, const at::Tensor& mask,
                      c10::string_view mode) {
  const MaskMode parsed = check_masked_apply(weight, delta, mask, mode);
  dispatch_float(weight.scalar_type(), [&](auto w_tag) {
    dispatch_float(delta.scalar_type(), [&](auto d_tag) {
      masked_apply_impl<decltype(w_tag), decltype(d_tag)>(weight, delta, mask, parsed);
    });
  });
}

}  // namespace
}  // namespace cpu
}  // namespace calm_fast

TORCH_LIBRARY_IMPL(calm_fast, CPU, m) {
  m.impl("mask_step_", &calm_fast::cpu::mask_step_cpu);
  m.impl("mask_grad_sumsq", &calm_fast::cpu::mask_grad_sumsq_cpu);
  m.impl("masked_apply_", &calm_fast::cpu::masked_apply_cpu);
}

// CUDA kernels of mask_step_, mask_grad_sumsq and masked_apply_ (see calm_fast/reference.py for
// the math).
//
// mask_grad_sumsq is a grid-stride reduction: per-block partial sums, then at::sum over them, so
// the result does not depend on scheduling (no atomics). The other two are one-pass element-wise kernels on the grid-stride driver of cuda_utils.cuh: each
// thread handles groups of kVec = 8 elements (two 16-byte accesses per fp32 operand, one per
// 16-bit operand, one byte of a packed mask) when every operand is aligned, single elements
// otherwise and for the tail. fp32 math with the reference's operation order and no fma
// contraction (__fmul_rn / __fadd_rn / __fsub_rn), so results match the plain-torch reference
// on CUDA bit for bit.
#include <torch/library.h>

#include "ops.h"

#include "cuda_utils.cuh"

namespace calm_fast {
namespace {

using cuda::Elem;
using cuda::load_float;
using cuda::store_float;

constexpr int kVec = 8;

// S <- S - lr·g·δ·σ'(S) + reg(S);  θ <- b + σ(S_new)·δ with b = base or θ - σ(S)·δ.
// W: dtype of weight / grad / base; D: dtype of delta.
template <typename W, typename D, bool kHasBase>
struct MaskStepOp {
  float* logits;
  W* weight;
  const W* grad;
  const D* delta;
  const W* base;  // unused unless kHasBase
  float lr;
  float l1;
  MaskReg reg;

  template <int N>
  __device__ __forceinline__ void apply(int64_t i) const {
    float s[N], g[N], d[N], b[N];
    load_float<N>(logits + i, s);
    load_float<N>(grad + i, g);
    load_float<N>(delta + i, d);
    load_float<N>(kHasBase ? base + i : weight + i, b);
    float w[N];
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const float p = cuda::sigmoid_f32(s[j]);
      const float dsig = __fmul_rn(p, __fsub_rn(1.0f, p));
      // reg = coef·σ'(S): polarize l1·(S > 0 ? 1 : -1), l1 -l1, none 0 (0·σ' = +0, S_new + 0
      // is the reference's S_new + zeros).
      const float coef = reg == MaskReg::kPolarize ? (s[j] > 0.0f ? l1 : -l1)
                         : reg == MaskReg::kL1     ? -l1
                                                   : 0.0f;
      const float step = __fmul_rn(__fmul_rn(__fmul_rn(lr, g[j]), d[j]), dsig);
      const float s_new = __fadd_rn(__fsub_rn(s[j], step), __fmul_rn(coef, dsig));
      const float bj = kHasBase ? b[j] : __fsub_rn(b[j], __fmul_rn(p, d[j]));
      w[j] = __fadd_rn(bj, __fmul_rn(cuda::sigmoid_f32(s_new), d[j]));
      s[j] = s_new;
    }
    store_float<N>(weight + i, w);
    store_float<N>(logits + i, s);
  }
};

void mask_step_cuda(at::Tensor& logits, at::Tensor& weight, const at::Tensor& grad,
                    const at::Tensor& delta, const std::optional<at::Tensor>& base, double lr,
                    double l1, c10::string_view reg) {
  const MaskReg parsed = check_mask_step(logits, weight, grad, delta, base, reg);
  TORCH_CHECK_VALUE(logits.is_cuda(), "calm_fast.mask_step_: logits must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t n = logits.numel();
  if (n == 0) return;
  const bool has_base = base.has_value();
  cuda::dispatch_float(weight.scalar_type(), "mask_step_", [&](auto wtag) {
    using W = typename decltype(wtag)::type;
    cuda::dispatch_float(delta.scalar_type(), "mask_step_", [&](auto dtag) {
      using D = typename decltype(dtag)::type;
      const W* base_ptr = has_base ? cuda::ptr_of<const W>(*base) : nullptr;
      const bool aligned = cuda::is_vec_aligned<kVec, float>(logits.data_ptr()) &&
                           cuda::is_vec_aligned<kVec, W>(weight.data_ptr()) &&
                           cuda::is_vec_aligned<kVec, W>(grad.data_ptr()) &&
                           cuda::is_vec_aligned<kVec, D>(delta.data_ptr()) &&
                           (!has_base || cuda::is_vec_aligned<kVec, W>(base_ptr));
      auto run = [&](auto has_base_tag) {
        constexpr bool kHasBase = decltype(has_base_tag)::value;
        const MaskStepOp<W, D, kHasBase> op{cuda::ptr_of<float>(logits), cuda::ptr_of<W>(weight),
                                             cuda::ptr_of<const W>(grad), cuda::ptr_of<const D>(delta),
                                             base_ptr, static_cast<float>(lr), static_cast<float>(l1),
                                             parsed};
        cuda::launch_elementwise<kVec>(op, n, aligned);
      };
      if (has_base) {
        run(std::true_type{});
      } else {
        run(std::false_type{});
      }
    });
  });
}

// Σ (g·δ·σ'(S))² over [0, n): each thread sums kVec-groups (aligned) or single elements, the
// block reduces through shuffles and shared memory, thread 0 writes partials[blockIdx.x].
template <typename G, typename D, int N>
__global__ void __launch_bounds__(cuda::kThreads)
    mask_grad_sumsq_kernel(const float* __restrict__ logits, const G* __restrict__ grad,
                           const D* __restrict__ delta, int64_t n, float* __restrict__ partials) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  float acc = 0.0f;
  auto add = [&](int64_t i, auto width) {
    constexpr int M = decltype(width)::value;
    float s[M], g[M], d[M];
    load_float<M, float, true>(logits + i, s);
    load_float<M, G, true>(grad + i, g);
    load_float<M, D, true>(delta + i, d);
#pragma unroll
    for (int j = 0; j < M; ++j) {
      const float p = cuda::sigmoid_f32(s[j]);
      const float v = __fmul_rn(__fmul_rn(g[j], d[j]), __fmul_rn(p, __fsub_rn(1.0f, p)));
      acc = __fadd_rn(acc, __fmul_rn(v, v));
    }
  };
  const int64_t groups = n / N;
  for (int64_t v = tid; v < groups; v += stride) add(v * N, std::integral_constant<int, N>{});
  if constexpr (N > 1) {
    const int64_t i = groups * N + tid;
    if (i < n) add(i, std::integral_constant<int, 1>{});
  }
  __shared__ float warp_sums[cuda::kThreads / 32];
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_down_sync(0xffffffffu, acc, offset);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = acc;
  __syncthreads();
  if (threadIdx.x < 32) {
    acc = threadIdx.x < cuda::kThreads / 32 ? warp_sums[threadIdx.x] : 0.0f;
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_down_sync(0xffffffffu, acc, offset);
    if (threadIdx.x == 0) partials[blockIdx.x] = acc;
  }
}

template <typename G, typename D, int N>
at::Tensor launch_mask_grad_sumsq(const at::Tensor& logits, const at::Tensor& grad, const at::Tensor& delta) {
  static const int blocks_per_sm = cuda::occupancy(mask_grad_sumsq_kernel<G, D, N>);
  const int64_t n = logits.numel();
  const int64_t blocks = cuda::grid_stride_blocks(n / N + 1, blocks_per_sm);
  at::Tensor partials = at::empty({blocks}, logits.options());
  mask_grad_sumsq_kernel<G, D, N><<<static_cast<unsigned>(blocks), cuda::kThreads, 0,
                                    c10::cuda::getCurrentCUDAStream()>>>(
      cuda::ptr_of<const float>(logits), cuda::ptr_of<const G>(grad), cuda::ptr_of<const D>(delta), n,
      cuda::ptr_of<float>(partials));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return partials.sum();
}

at::Tensor mask_grad_sumsq_cuda(const at::Tensor& logits, const at::Tensor& grad, const at::Tensor& delta) {
  check_mask_grad_sumsq(logits, grad, delta);
  TORCH_CHECK_VALUE(logits.is_cuda(), "calm_fast.mask_grad_sumsq: logits must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(logits.device());
  if (logits.numel() == 0) return at::zeros({}, logits.options());
  return cuda::dispatch_float(grad.scalar_type(), "mask_grad_sumsq", [&](auto gtag) {
    using G = typename decltype(gtag)::type;
    return cuda::dispatch_float(delta.scalar_type(), "mask_grad_sumsq", [&](auto dtag) {
      using D = typename decltype(dtag)::type;
      const bool aligned = cuda::is_vec_aligned<kVec, float>(logits.data_ptr()) &&
                           cuda::is_vec_aligned<kVec, G>(grad.data_ptr()) &&
                           cuda::is_vec_aligned<kVec, D>(delta.data_ptr());
      return aligned ? launch_mask_grad_sumsq<G, D, kVec>(logits, grad, delta)
                     : launch_mask_grad_sumsq<G, D, 1>(logits, grad, delta);
    });
  });
}

// θ <- θ + m·δ (fp32). The product m·δ is formed even for m = 0 (0·inf = NaN, as in torch).
template <typename W, typename D, MaskMode kMode>
struct MaskedApplyOp {
  W* weight;
  const D* delta;
  const void* mask;  // float logits (soft / hard) or uint8 packed bits

  template <int N>
  __device__ __forceinline__ void apply(int64_t i) const {
    static_assert(N == 1 || N % 8 == 0, "packed groups must start on a byte");
    float w[N], d[N], m[N];
    load_float<N>(weight + i, w);
    load_float<N>(delta + i, d);
    if constexpr (kMode == MaskMode::kPacked) {
      const uint8_t* bytes = static_cast<const uint8_t*>(mask);
      if constexpr (N == 1) {
        m[0] = ((bytes[i >> 3] >> (i & 7)) & 1) ? 1.0f : 0.0f;
      } else {
        uint8_t packed[N / 8];
        cuda::load_bits<N / 8>(bytes + i / 8, packed);
#pragma unroll
        for (int j = 0; j < N; ++j) m[j] = ((packed[j / 8] >> (j % 8)) & 1) ? 1.0f : 0.0f;
      }
    } else {
      load_float<N>(static_cast<const float*>(mask) + i, m);
#pragma unroll
      for (int j = 0; j < N; ++j) {
        m[j] = kMode == MaskMode::kSoft ? cuda::sigmoid_f32(m[j]) : (m[j] > 0.0f ? 1.0f : 0.0f);
      }
    }
#pragma unroll
    for (int j = 0; j < N; ++j) w[j] = __fadd_rn(w[j], __fmul_rn(m[j], d[j]));
    store_float<N>(weight + i, w);
  }
};

void masked_apply_cuda(at::Tensor& weight, const at::Tensor& delta, const at::Tensor& mask,
                       c10::string_view mode) {
  const MaskMode parsed = check_masked_apply(weight, delta, mask, mode);
  TORCH_CHECK_VALUE(weight.is_cuda(), "calm_fast.masked_apply_: weight must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(weight.device());
  const int64_t n = weight.numel();
  if (n == 0) return;
  cuda::dispatch_float(weight.scalar_type(), "masked_apply_", [&](auto wtag) {
    using W = typename decltype(wtag)::type;
    cuda::dispatch_float(delta.scalar_type(), "masked_apply_", [&](auto dtag) {
      using D = typename decltype(dtag)::type;
      const bool aligned =
          cuda::is_vec_aligned<kVec, W>(weight.data_ptr()) && cuda::is_vec_aligned<kVec, D>(delta.data_ptr()) &&
          (parsed == MaskMode::kPacked ? cuda::is_vec_aligned<kVec / 8, uint8_t>(mask.data_ptr())
                                       : cuda::is_vec_aligned<kVec, float>(mask.data_ptr()));
      auto run = [&](auto mode_tag) {
        constexpr MaskMode kMode = decltype(mode_tag)::value;
        const MaskedApplyOp<W, D, kMode> op{cuda::ptr_of<W>(weight), cuda::ptr_of<const D>(delta),
                                            mask.data_ptr()};
        cuda::launch_elementwise<kVec>(op, n, aligned);
      };
      switch (parsed) {
        case MaskMode::kSoft:
          run(std::integral_constant<MaskMode, MaskMode::kSoft>{});
          break;
        case MaskMode::kHard:
          run(std::integral_constant<MaskMode, MaskMode::kHard>{});
          break;
        case MaskMode::kPacked:
          run(std::integral_constant<MaskMode, MaskMode::kPacked>{});
          break;
      }
    });
  });
}

}  // namespace
}  // namespace calm_fast

TORCH_LIBRARY_IMPL(calm_fast, CUDA, m) {
  m.impl("mask_step_", &calm_fast::mask_step_cuda);
  m.impl("mask_grad_sumsq", &calm_fast::mask_grad_sumsq_cuda);
  m.impl("masked_apply_", &calm_fast::masked_apply_cuda);
}

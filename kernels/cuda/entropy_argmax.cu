// CUDA kernel of entropy_argmax (see calm_fast/reference.py): per row of [B, C] logits, the
// softmax entropy (fp32) and the first index of the max (int64), reading each logit once.
//
// A group of threads (one warp per row for C <= kWarpRowMax, else one block of kThreads per row)
// strides over the row; each thread keeps an online state over its entries
//   m = max of the finite entries, s = Σ exp(z - m), u = Σ exp(z - m)·(z - m)
// plus the argmax (value, first index) over non-NaN entries and the first NaN index. States are
// combined across lanes (shuffles) and warps (shared memory) with the rescaling rule
//   M = max(m1, m2), a_i = exp(m_i - M): s = Σ a_i·s_i, u = Σ a_i·(u_i + (m_i - M)·s_i),
// and entropy = log(s) - u/s. Special rows follow the reference (log_softmax then nan_to_num):
//   a NaN -> entropy NaN, argmax = first NaN index (torch.argmax);
//   a +inf (no NaN) -> log_softmax is all NaN -> entropy 0 (even for several +inf); argmax =
//   first +inf; -inf entries contribute 0; all -inf -> entropy 0, argmax 0.
#include <torch/library.h>

#include "ops.h"

#include "cuda_utils.cuh"

#include <tuple>

namespace calm_fast {
namespace {

using cuda::Elem;

constexpr int kWarpRowMax = 2048;  // widest row handled by one warp
constexpr int kWarpsPerBlock = cuda::kThreads / 32;
constexpr int kUnroll = 4;  // loads in flight per thread
constexpr int64_t kNone = INT64_MAX;

struct RowState {
  float m;        // max over finite entries; -inf while there is none
  float s;        // Σ exp(z - m) over finite entries (0 while there is none)
  float u;        // Σ exp(z - m)·(z - m)
  float am;       // max over non-NaN entries
  int64_t ai;     // smallest index holding am (kNone: no entry yet)
  int64_t nan_i;  // smallest NaN index (kNone: no NaN)
};

__device__ __forceinline__ RowState empty_state() { return RowState{-INFINITY, 0.0f, 0.0f, -INFINITY, kNone, kNone}; }

__device__ __forceinline__ void update(RowState& st, float z, int64_t i) {
  if (isnan(z)) {
    st.nan_i = min(st.nan_i, i);
    return;
  }
  if (z > st.am || (z == st.am && i < st.ai)) {
    st.am = z;
    st.ai = i;
  }
  if (isinf(z)) return;  // +inf is handled by am, -inf contributes nothing
  if (st.s == 0.0f) {
    st.m = z, st.s = 1.0f, st.u = 0.0f;
  } else if (z > st.m) {
    const float d = st.m - z;  // < 0
    const float a = __expf(d);
    st.u = a * (st.u + d * st.s);
    st.s = a * st.s + 1.0f;
    st.m = z;
  } else {
    const float d = z - st.m;  // <= 0
    const float e = __expf(d);
    st.s += e;
    st.u += e * d;
  }
}

__device__ __forceinline__ RowState combine(const RowState& x, const RowState& y) {
  RowState r;
  r.nan_i = min(x.nan_i, y.nan_i);
  const bool take_y = y.am > x.am || (y.am == x.am && y.ai < x.ai);
  r.am = take_y ? y.am : x.am;
  r.ai = take_y ? y.ai : x.ai;
  if (y.s == 0.0f) {
    r.m = x.m, r.s = x.s, r.u = x.u;
  } else if (x.s == 0.0f) {
    r.m = y.m, r.s = y.s, r.u = y.u;
  } else {
    const float mm = fmaxf(x.m, y.m);
    const float dx = x.m - mm, dy = y.m - mm;  // <= 0
    const float ax = __expf(dx), ay = __expf(dy);
    r.m = mm;
    r.s = ax * x.s + ay * y.s;
    r.u = ax * (x.u + dx * x.s) + ay * (y.u + dy * y.s);
  }
  return r;
}

__device__ __forceinline__ RowState warp_reduce(RowState st) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    RowState other;
    other.m = __shfl_xor_sync(0xffffffffu, st.m, offset);
    other.s = __shfl_xor_sync(0xffffffffu, st.s, offset);
    other.u = __shfl_xor_sync(0xffffffffu, st.u, offset);
    other.am = __shfl_xor_sync(0xffffffffu, st.am, offset);
    other.ai = __shfl_xor_sync(0xffffffffu, static_cast<long long>(st.ai), offset);
    other.nan_i = __shfl_xor_sync(0xffffffffu, static_cast<long long>(st.nan_i), offset);
    st = combine(st, other);
  }
  return st;
}

// This thread's entries c = first, first + step, ... of a row of C logits.
template <typename T>
__device__ __forceinline__ RowState scan_row(const T* row, int64_t C, int64_t first, int64_t step) {
  using Bits = typename Elem<T>::Bits;
  const Bits* raw = reinterpret_cast<const Bits*>(row);
  RowState st = empty_state();
  int64_t c = first;
  for (; c + (kUnroll - 1) * step < C; c += kUnroll * step) {
    Bits x[kUnroll];
#pragma unroll
    for (int q = 0; q < kUnroll; ++q) x[q] = raw[c + q * step];
#pragma unroll
    for (int q = 0; q < kUnroll; ++q) update(st, Elem<T>::to_float(x[q]), c + q * step);
  }
  for (; c < C; c += step) update(st, Elem<T>::to_float(raw[c]), c);
  return st;
}

__device__ __forceinline__ void write_row(const RowState& st, int64_t row, float* entropy, int64_t* argmax) {
  if (st.nan_i != kNone) {
    entropy[row] = __int_as_float(0x7fc00000);  // NaN
    argmax[row] = st.nan_i;
    return;
  }
  argmax[row] = st.ai;
  // Written as -(u/s - log s) so that zero entropies are -0.0 like the reference's -(Σ p·log p).
  entropy[row] = (st.am == INFINITY || st.s == 0.0f) ? -0.0f : -(st.u / st.s - logf(st.s));
}

// One warp per row, kWarpsPerBlock rows per block, grid-stride over rows.
template <typename T>
__global__ void __launch_bounds__(cuda::kThreads)
    entropy_argmax_warp_kernel(const T* __restrict__ logits, int64_t B, int64_t C, float* __restrict__ entropy,
                               int64_t* __restrict__ argmax) {
  const int lane = threadIdx.x % 32;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t row = warp; row < B; row += warps) {  // warp-uniform
    RowState st = scan_row(logits + row * C, C, lane, 32);
    st = warp_reduce(st);
    if (lane == 0) write_row(st, row, entropy, argmax);
  }
}

// One block of kThreads per row, grid-stride over rows.
template <typename T>
__global__ void __launch_bounds__(cuda::kThreads)
    entropy_argmax_block_kernel(const T* __restrict__ logits, int64_t B, int64_t C, float* __restrict__ entropy,
                                int64_t* __restrict__ argmax) {
  __shared__ RowState partial[kWarpsPerBlock];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  for (int64_t row = blockIdx.x; row < B; row += gridDim.x) {  // block-uniform
    RowState st = scan_row(logits + row * C, C, threadIdx.x, blockDim.x);
    st = warp_reduce(st);
    if (lane == 0) partial[warp] = st;
    __syncthreads();
    if (warp == 0) {
      st = lane < kWarpsPerBlock ? partial[lane] : empty_state();
      st = warp_reduce(st);
      if (lane == 0) write_row(st, row, entropy, argmax);
    }
    __syncthreads();  // partial is reused by the next row
  }
}

std::tuple<at::Tensor, at::Tensor> entropy_argmax_cuda(const at::Tensor& logits) {
  check_entropy_argmax(logits);
  TORCH_CHECK_VALUE(logits.is_cuda(), "calm_fast.entropy_argmax: logits must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t B = logits.size(0);
  const int64_t C = logits.size(1);
  at::Tensor entropy = at::empty({B}, logits.options().dtype(at::kFloat));
  at::Tensor argmax = at::empty({B}, logits.options().dtype(at::kLong));
  if (B == 0) return {entropy, argmax};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cuda::dispatch_float(logits.scalar_type(), "entropy_argmax", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* in = cuda::ptr_of<const T>(logits);
    float* ent = entropy.data_ptr<float>();
    int64_t* arg = argmax.data_ptr<int64_t>();
    if (C <= kWarpRowMax) {
      static const int bps = cuda::occupancy(entropy_argmax_warp_kernel<T>);
      const int64_t blocks = cuda::grid_stride_blocks(B * 32, bps);
      entropy_argmax_warp_kernel<T><<<static_cast<unsigned>(blocks), cuda::kThreads, 0, stream>>>(in, B, C, ent, arg);
    } else {
      static const int bps = cuda::occupancy(entropy_argmax_block_kernel<T>);
      const int64_t blocks = cuda::grid_stride_blocks(B * cuda::kThreads, bps);
      entropy_argmax_block_kernel<T><<<static_cast<unsigned>(blocks), cuda::kThreads, 0, stream>>>(in, B, C, ent, arg);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {entropy, argmax};
}

}  // namespace
}  // namespace calm_fast

TORCH_LIBRARY_IMPL(calm_fast, CUDA, m) { m.impl("entropy_argmax", &calm_fast::entropy_argmax_cuda); }

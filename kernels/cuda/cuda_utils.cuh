// Device helpers shared by the calm_fast CUDA kernels (kernels/cuda/*.cu).
//
//  * Elem<T>: storage types (float, __half, __nv_bfloat16, uint8_t for bool/packed bytes) as raw
//    bit patterns, and their exact conversions to/from fp32 (round-to-nearest-even on the way
//    back, like torch's .to()). Explicit intrinsics: torch's nvcc flags define
//    __CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__.
//  * load_bits / store_bits / load_float / store_float: N consecutive elements with the widest
//    access (16, 8 or 4 bytes) that N * sizeof(T) allows; the caller guarantees the alignment,
//    checked on the host with is_vec_aligned<N, T>(ptr). Loads can be read-only (ld.global.nc).
//  * sigmoid_f32: torch's CUDA sigmoid for fp32 (1 / (1 + exp(-x)), IEEE division, no fma).
//  * elementwise_kernel / launch_elementwise: a grid-stride driver over n items that calls
//    op.template apply<VEC>(i) on aligned groups of VEC items and op.template apply<1>(i) on the
//    tail; falls back to VEC = 1 everywhere when the operands are not aligned.
//  * dispatch_float: at::ScalarType (float32 / bfloat16 / float16) -> a C++ storage type.
//  * upload_words: a small host table (pointers, sizes) as a device int64 tensor, without a host
//    sync and capturable in a CUDA graph (device_table.cu).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace calm_fast {
namespace cuda {

// ------------------------------------------------------------------------------------------------
// Storage types
// ------------------------------------------------------------------------------------------------
template <typename T>
struct Elem;

template <>
struct Elem<float> {
  using Bits = uint32_t;
  static __device__ __forceinline__ float to_float(Bits b) { return __uint_as_float(b); }
  static __device__ __forceinline__ Bits from_float(float x) { return __float_as_uint(x); }
};

template <>
struct Elem<__half> {
  using Bits = uint16_t;
  static __device__ __forceinline__ float to_float(Bits b) { return __half2float(__ushort_as_half(b)); }
  static __device__ __forceinline__ Bits from_float(float x) {
    return __half_as_ushort(__float2half_rn(x));
  }
};

template <>
struct Elem<__nv_bfloat16> {
  using Bits = uint16_t;
  static __device__ __forceinline__ float to_float(Bits b) {
    return __bfloat162float(__ushort_as_bfloat16(b));
  }
  static __device__ __forceinline__ Bits from_float(float x) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(x));
  }
};

// Bytes: bool tensors (0/1) and packed masks. No float conversion.
template <>
struct Elem<uint8_t> {
  using Bits = uint8_t;
};

// Bytes moved by one memory access when N consecutive T are loaded together.
template <int N, typename T>
__host__ __device__ constexpr int access_bytes() {
  constexpr int bytes = N * static_cast<int>(sizeof(T));
  return bytes % 16 == 0 ? 16 : bytes % 8 == 0 ? 8 : bytes % 4 == 0 ? 4 : static_cast<int>(sizeof(T));
}

// Whether load_bits<N, T> / store_bits<N, T> may be used at p + i for every i multiple of N.
template <int N, typename T>
inline bool is_vec_aligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % access_bytes<N, T>() == 0;
}

// One access of type V at p: a plain load, or a read-only global load (ld.global.nc) when
// kReadOnly. kReadOnly also tells the compiler that p is global memory, which it cannot infer
// for pointers read from a table (it would otherwise emit generic LD instead of LDG); use it
// only for data that no thread writes during the kernel.
template <bool kReadOnly, typename V>
__device__ __forceinline__ V load_one(const void* p) {
  if constexpr (kReadOnly) {
    return __ldg(static_cast<const V*>(p));
  } else {
    return *static_cast<const V*>(p);
  }
}

// out[j] = bits of p[j], j < N. p must be aligned to access_bytes<N, T>().
template <int N, typename T, bool kReadOnly = false>
__device__ __forceinline__ void load_bits(const T* p, typename Elem<T>::Bits (&out)[N]) {
  using Bits = typename Elem<T>::Bits;
  constexpr int kAccess = access_bytes<N, T>();
  if constexpr (kAccess < 4) {
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = load_one<kReadOnly, Bits>(reinterpret_cast<const Bits*>(p) + j);
  } else {
    constexpr int kWords = N * static_cast<int>(sizeof(T)) / 4;
    uint32_t w[kWords];
    if constexpr (kAccess == 16) {
#pragma unroll
      for (int c = 0; c < kWords / 4; ++c) {
        const uint4 v = load_one<kReadOnly, uint4>(reinterpret_cast<const uint4*>(p) + c);
        w[4 * c] = v.x, w[4 * c + 1] = v.y, w[4 * c + 2] = v.z, w[4 * c + 3] = v.w;
      }
    } else if constexpr (kAccess == 8) {
#pragma unroll
      for (int c = 0; c < kWords / 2; ++c) {
        const uint2 v = load_one<kReadOnly, uint2>(reinterpret_cast<const uint2*>(p) + c);
        w[2 * c] = v.x, w[2 * c + 1] = v.y;
      }
    } else {
#pragma unroll
      for (int c = 0; c < kWords; ++c) {
        w[c] = load_one<kReadOnly, unsigned int>(reinterpret_cast<const unsigned int*>(p) + c);
      }
    }
    constexpr int kPerWord = 4 / static_cast<int>(sizeof(T));
#pragma unroll
    for (int j = 0; j < N; ++j) {
      out[j] = static_cast<Bits>(w[j / kPerWord] >> (8 * static_cast<int>(sizeof(T)) * (j % kPerWord)));
    }
  }
}

// p[j] = in[j], j < N. p must be aligned to access_bytes<N, T>().
template <int N, typename T>
__device__ __forceinline__ void store_bits(T* p, const typename Elem<T>::Bits (&in)[N]) {
  using Bits = typename Elem<T>::Bits;
  constexpr int kAccess = access_bytes<N, T>();
  if constexpr (kAccess < 4) {
#pragma unroll
    for (int j = 0; j < N; ++j) reinterpret_cast<Bits*>(p)[j] = in[j];
  } else {
    constexpr int kWords = N * static_cast<int>(sizeof(T)) / 4;
    constexpr int kPerWord = 4 / static_cast<int>(sizeof(T));
    uint32_t w[kWords];
#pragma unroll
    for (int c = 0; c < kWords; ++c) w[c] = 0;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      w[j / kPerWord] |= static_cast<uint32_t>(in[j]) << (8 * static_cast<int>(sizeof(T)) * (j % kPerWord));
    }
    if constexpr (kAccess == 16) {
#pragma unroll
      for (int c = 0; c < kWords / 4; ++c) {
        reinterpret_cast<uint4*>(p)[c] = make_uint4(w[4 * c], w[4 * c + 1], w[4 * c + 2], w[4 * c + 3]);
      }
    } else if constexpr (kAccess == 8) {
#pragma unroll
      for (int c = 0; c < kWords / 2; ++c) reinterpret_cast<uint2*>(p)[c] = make_uint2(w[2 * c], w[2 * c + 1]);
    } else {
#pragma unroll
      for (int c = 0; c < kWords; ++c) reinterpret_cast<uint32_t*>(p)[c] = w[c];
    }
  }
}

template <int N, typename T, bool kReadOnly = false>
__device__ __forceinline__ void load_float(const T* p, float (&out)[N]) {
  typename Elem<T>::Bits b[N];
  load_bits<N, T, kReadOnly>(p, b);
#pragma unroll
  for (int j = 0; j < N; ++j) out[j] = Elem<T>::to_float(b[j]);
}

template <int N, typename T>
__device__ __forceinline__ void store_float(T* p, const float (&in)[N]) {
  typename Elem<T>::Bits b[N];
#pragma unroll
  for (int j = 0; j < N; ++j) b[j] = Elem<T>::from_float(in[j]);
  store_bits<N>(p, b);
}

// torch.sigmoid on CUDA for fp32: one / (one + exp(-x)) with IEEE division; no contraction.
__device__ __forceinline__ float sigmoid_f32(float x) { return __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-x))); }

// ------------------------------------------------------------------------------------------------
// Launch helpers
// ------------------------------------------------------------------------------------------------
constexpr int kThreads = 256;

inline int num_sms() {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return std::max(sms, 1);
}

// Blocks of kThreads for a grid-stride loop over `items` work items: enough to cover them, at
// most one full wave of resident blocks given `blocks_per_sm` (the kernel's occupancy).
inline int64_t grid_stride_blocks(int64_t items, int blocks_per_sm) {
  const int64_t needed = (std::max<int64_t>(items, 1) + kThreads - 1) / kThreads;
  const int64_t wave = static_cast<int64_t>(num_sms()) * std::max(blocks_per_sm, 1);
  return std::max<int64_t>(1, std::min<int64_t>(needed, wave));
}

// Resident blocks of kThreads per SM for `kernel` (no dynamic shared memory).
template <typename Kernel>
inline int occupancy(Kernel kernel) {
  int blocks = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, 0));
  return std::max(blocks, 1);
}

// Items [0, n): groups [v * VEC, v * VEC + VEC) for v < n / VEC through apply<VEC>, then the
// n % VEC < VEC <= kThreads leftover items through apply<1> by the first threads.
template <int VEC, typename Op>
__global__ void __launch_bounds__(kThreads) elementwise_kernel(const Op op, const int64_t n) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t groups = n / VEC;
  for (int64_t v = tid; v < groups; v += stride) op.template apply<VEC>(v * VEC);
  if constexpr (VEC > 1) {
    const int64_t i = groups * VEC + tid;
    if (i < n) op.template apply<1>(i);
  }
}

template <int VEC, typename Op>
void launch_elementwise_impl(const Op& op, int64_t n, cudaStream_t stream) {
  static const int blocks_per_sm = occupancy(elementwise_kernel<VEC, Op>);  // once per kernel
  const int64_t blocks = grid_stride_blocks(n / VEC, blocks_per_sm);
  elementwise_kernel<VEC, Op><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(op, n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Runs op over n items on the current stream: vectorized when `vectorize` (the caller checked the
// alignment of every operand with is_vec_aligned<VEC, ...>), scalar otherwise. n == 0: no launch.
template <int VEC, typename Op>
void launch_elementwise(const Op& op, int64_t n, bool vectorize) {
  static_assert(VEC >= 1 && VEC <= kThreads, "VEC must lie in [1, kThreads]");
  if (n <= 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (vectorize && VEC > 1) {
    launch_elementwise_impl<VEC>(op, n, stream);
  } else {
    launch_elementwise_impl<1>(op, n, stream);
  }
}

// ------------------------------------------------------------------------------------------------
// dtype dispatch
// ------------------------------------------------------------------------------------------------
template <typename T>
struct TypeTag {
  using type = T;
};

// f(TypeTag<T>{}) with T the storage type of a float32 / bfloat16 / float16 dtype.
template <typename F>
decltype(auto) dispatch_float(at::ScalarType dtype, const char* op, F&& f) {
  if (dtype == at::kFloat) return f(TypeTag<float>{});
  if (dtype == at::kBFloat16) return f(TypeTag<__nv_bfloat16>{});
  TORCH_CHECK_TYPE(dtype == at::kHalf, "calm_fast.", op, ": unsupported dtype ", dtype);
  return f(TypeTag<__half>{});
}

// `words` as an int64 tensor on `device`, written by kernels on the current stream.
at::Tensor upload_words(const std::vector<int64_t>& words, const at::Device& device);

template <typename T>
inline T* ptr_of(const at::Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}

}  // namespace cuda
}  // namespace calm_fast

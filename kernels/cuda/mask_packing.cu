// CUDA kernels of pack_mask and unpack_mask (see calm_fast/reference.py).
//
// pack_mask: one work item per output byte; a thread packs kPackBytes = 2 bytes (16 inputs: one
// 16-byte load for bool, two / four for 16-bit / fp32 inputs) per group. Bit j of byte b is
// [x[8b + j] > 0] (bool: x != 0); bits past numel are 0.
// unpack_mask: one work item per output bool; a thread expands 2 packed bytes into 16 bools (one
// 16-byte store) per group.
#include <torch/library.h>

#include "ops.h"

#include "cuda_utils.cuh"

namespace calm_fast {
namespace {

using cuda::Elem;

constexpr int kPackBytes = 2;     // output bytes per thread and group in pack_mask
constexpr int kUnpackBools = 16;  // output bools per thread and group in unpack_mask

template <typename T>
__device__ __forceinline__ bool mask_bit(typename Elem<T>::Bits x) {
  if constexpr (std::is_same_v<T, uint8_t>) {
    return x != 0;  // bool storage
  } else {
    return Elem<T>::to_float(x) > 0.0f;  // NaN -> 0
  }
}

// T: storage of the input (uint8_t for bool).
template <typename T>
struct PackOp {
  const T* in;
  uint8_t* out;
  int64_t numel;

  // Output bytes [j, j + N).
  template <int N>
  __device__ __forceinline__ void apply(int64_t j) const {
    uint8_t bytes[N];
    if (N > 1 && (j + N) * 8 <= numel) {  // every input of the group exists: vector loads
      typename Elem<T>::Bits x[8 * N];
      cuda::load_bits<8 * N>(in + j * 8, x);
#pragma unroll
      for (int q = 0; q < N; ++q) {
        uint32_t byte = 0;
#pragma unroll
        for (int b = 0; b < 8; ++b) byte |= static_cast<uint32_t>(mask_bit<T>(x[8 * q + b])) << b;
        bytes[q] = static_cast<uint8_t>(byte);
      }
    } else {  // tail: element by element, zero past numel
#pragma unroll
      for (int q = 0; q < N; ++q) {
        uint32_t byte = 0;
#pragma unroll
        for (int b = 0; b < 8; ++b) {
          const int64_t idx = (j + q) * 8 + b;
          if (idx < numel) {
            typename Elem<T>::Bits x[1];
            cuda::load_bits<1>(in + idx, x);
            byte |= static_cast<uint32_t>(mask_bit<T>(x[0])) << b;
          }
        }
        bytes[q] = static_cast<uint8_t>(byte);
      }
    }
    cuda::store_bits<N>(out + j, bytes);
  }
};

at::Tensor pack_mask_cuda(const at::Tensor& mask) {
  check_pack_mask(mask);
  TORCH_CHECK_VALUE(mask.is_cuda(), "calm_fast.pack_mask: mask must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(mask.device());
  const int64_t numel = mask.numel();
  const int64_t nbytes = packed_numel(numel);
  at::Tensor out = at::empty({nbytes}, mask.options().dtype(at::kByte));
  if (nbytes == 0) return out;
  auto run = [&](auto tag) {
    using T = typename decltype(tag)::type;
    const PackOp<T> op{cuda::ptr_of<const T>(mask), cuda::ptr_of<uint8_t>(out), numel};
    const bool aligned = cuda::is_vec_aligned<8 * kPackBytes, T>(mask.data_ptr()) &&
                         cuda::is_vec_aligned<kPackBytes, uint8_t>(out.data_ptr());
    cuda::launch_elementwise<kPackBytes>(op, nbytes, aligned);
  };
  if (mask.scalar_type() == at::kBool) {
    run(cuda::TypeTag<uint8_t>{});
  } else {
    cuda::dispatch_float(mask.scalar_type(), "pack_mask", run);
  }
  return out;
}

struct UnpackOp {
  const uint8_t* packed;
  uint8_t* out;  // bool storage, 0 / 1

  // Output bools [i, i + N); N == 1 or a multiple of 8 (groups start on a byte).
  template <int N>
  __device__ __forceinline__ void apply(int64_t i) const {
    static_assert(N == 1 || N % 8 == 0, "unpack groups must start on a byte");
    uint8_t bits[N];
    if constexpr (N == 1) {
      bits[0] = (packed[i >> 3] >> (i & 7)) & 1;
    } else {
      uint8_t bytes[N / 8];
      cuda::load_bits<N / 8>(packed + i / 8, bytes);
#pragma unroll
      for (int j = 0; j < N; ++j) bits[j] = (bytes[j / 8] >> (j % 8)) & 1;
    }
    cuda::store_bits<N>(out + i, bits);
  }
};

at::Tensor unpack_mask_cuda(const at::Tensor& packed, int64_t numel) {
  check_unpack_mask(packed, numel);
  TORCH_CHECK_VALUE(packed.is_cuda(), "calm_fast.unpack_mask: packed must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(packed.device());
  at::Tensor out = at::empty({numel}, packed.options().dtype(at::kBool));
  if (numel == 0) return out;
  const UnpackOp op{cuda::ptr_of<const uint8_t>(packed), cuda::ptr_of<uint8_t>(out)};
  const bool aligned = cuda::is_vec_aligned<kUnpackBools / 8, uint8_t>(packed.data_ptr()) &&
                       cuda::is_vec_aligned<kUnpackBools, uint8_t>(out.data_ptr());
  cuda::launch_elementwise<kUnpackBools>(op, numel, aligned);
  return out;
}

}  // namespace
}  // namespace calm_fast

TORCH_LIBRARY_IMPL(calm_fast, CUDA, m) {
  m.impl("pack_mask", &calm_fast::pack_mask_cuda);
  m.impl("unpack_mask", &calm_fast::unpack_mask_cuda);
}

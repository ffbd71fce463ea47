// CUDA kernel of magnitude_threshold (see calm_fast/reference.py): the k-th largest |x| over a
// list of tensors by radix selection on the IEEE bit patterns of |x| (fp32: bits & 0x7fffffff,
// 4 passes of 8 bits from the top; bf16 / fp16: bits & 0x7fff, 2 passes).
//
// One launch per pass covers every tensor of the list: a small device table holds per-tensor
// pointers, numels, first block and 16-byte alignment; block b handles chunk b - first[t] (kChunk
// scalars) of the tensor t whose block range holds b (binary search). A block histograms the
// digit of the entries whose higher digits equal the prefix chosen so far into shared memory
// (warp-aggregated with __match_any_sync, since magnitudes crowd a few bins), then adds its
// non-zero bins to the per-tensor global histogram hist[t * 256 + bin] (uint64 atomics).
// After each pass one block (radix_select_kernel) picks the bin on the device, as
// select_radix_bin does on the host, and keeps (prefix, k remaining) in a device state that the
// next pass reads; after the last pass it writes the threshold and the tie quotas (filled in
// tensor order, as the reference). The table and the state reach the device through kernel
// arguments (cuda::upload_words), so the op never synchronizes with the host and can be
// captured in a CUDA graph. No concatenation, no sort, no N-sized temporary.
#include <torch/library.h>

#include "ops.h"

#include "cuda_utils.cuh"

#include <climits>
#include <cmath>
#include <tuple>
#include <vector>

namespace calm_fast {
namespace {

using cuda::Elem;

constexpr int kChunk = 16384;  // scalars per block (a multiple of kThreads * 8)
constexpr unsigned kNoBin = kRadixBins;  // sentinel: entry not counted this pass

// table (int64 words): ptr[L], numel[L], first_block[L + 1], aligned[L]; state: prefix, k left.
template <typename T>
__global__ void __launch_bounds__(cuda::kThreads)
    radix_histogram_kernel(const int64_t* __restrict__ table, int num_tensors, const int64_t* __restrict__ state,
                           int shift, unsigned long long* __restrict__ hist) {
  using Bits = typename Elem<T>::Bits;
  constexpr uint32_t kAbsMask = sizeof(T) == 4 ? 0x7fffffffu : 0x7fffu;
  constexpr int kVec = 16 / sizeof(T);
  static_assert(kChunk % (cuda::kThreads * kVec) == 0, "chunks must hold whole groups");
  __shared__ uint32_t counts[kRadixBins];

  const int64_t* ptrs = table;
  const int64_t* numels = table + num_tensors;
  const int64_t* first_block = table + 2 * num_tensors;
  const int64_t* aligned = table + 3 * num_tensors + 1;

  // Tensor t with first_block[t] <= b < first_block[t + 1] (empty tensors own no block).
  const int64_t b = blockIdx.x;
  int lo = 0, hi = num_tensors;  // invariant: first_block[lo] <= b < first_block[hi]
  while (hi - lo > 1) {
    const int mid = lo + (hi - lo) / 2;
    if (first_block[mid] <= b) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  const int t = lo;
  const T* data = reinterpret_cast<const T*>(ptrs[t]);
  const int64_t begin = (b - first_block[t]) * kChunk;
  const int64_t end = min(begin + static_cast<int64_t>(kChunk), numels[t]);
  const bool vectorized = aligned[t] != 0;
  const uint32_t prefix = static_cast<uint32_t>(state[0]);

  for (int bin = threadIdx.x; bin < kRadixBins; bin += blockDim.x) counts[bin] = 0;
  __syncthreads();

  const unsigned lane = threadIdx.x % 32;
  // Block-uniform trip count: every lane reaches __match_any_sync together.
  for (int64_t base = begin; base < end; base += static_cast<int64_t>(blockDim.x) * kVec) {
    const int64_t i = base + static_cast<int64_t>(threadIdx.x) * kVec;
    const int64_t valid = max(int64_t{0}, min(static_cast<int64_t>(kVec), end - i));
    Bits x[kVec];
    if (vectorized && valid == kVec) {
      cuda::load_bits<kVec, T, /*kReadOnly=*/true>(data + i, x);
    } else {
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        x[j] = 0;
        if (j < valid) {
          Bits one[1];
          cuda::load_bits<1, T, /*kReadOnly=*/true>(data + i + j, one);
          x[j] = one[0];
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const uint32_t bits = static_cast<uint32_t>(x[j]) & kAbsMask;
      const bool counted = j < valid && (static_cast<uint64_t>(bits) >> (shift + kRadixBits)) == prefix;
      const unsigned bin = counted ? (bits >> shift) & (kRadixBins - 1) : kNoBin;
      if (!__any_sync(0xffffffffu, counted)) continue;  // common in later passes
      const unsigned peers = __match_any_sync(0xffffffffu, bin);
      if (bin != kNoBin && lane == static_cast<unsigned>(__ffs(peers) - 1)) {
        atomicAdd(&counts[bin], static_cast<uint32_t>(__popc(peers)));
      }
    }
  }
  __syncthreads();
  for (int bin = threadIdx.x; bin < kRadixBins; bin += blockDim.x) {
    if (counts[bin] != 0) {
      atomicAdd(&hist[static_cast<int64_t>(t) * kRadixBins + bin], static_cast<unsigned long long>(counts[bin]));
    }
  }
}

// One block of kRadixBins threads, after each histogram pass: select_radix_bin on the device.
// state = (prefix, k remaining) is updated in place; after the last pass (quota != nullptr) the
// threshold's bits and the per-tensor tie quotas are written.
template <typename Bits>
__global__ void __launch_bounds__(kRadixBins)
    radix_select_kernel(const unsigned long long* __restrict__ hist, int num_tensors, int64_t* __restrict__ state,
                        int64_t* __restrict__ quota, Bits* __restrict__ threshold) {
  __shared__ unsigned long long totals[kRadixBins];
  __shared__ long long chunk_base[kRadixBins];
  __shared__ int chosen;
  __shared__ long long k_left;
  const int tid = threadIdx.x;

  unsigned long long total = 0;
  for (int t = 0; t < num_tensors; ++t) total += hist[static_cast<int64_t>(t) * kRadixBins + tid];
  totals[tid] = total;
  __syncthreads();
  if (tid == 0) {
    long long k = state[1];
    int bin = 0;  // k <= numel (checked on the host), so the walk always stops at some bin
    for (int b = kRadixBins - 1; b >= 0; --b) {
      const long long count = static_cast<long long>(totals[b]);
      if (count >= k) {
        bin = b;
        break;
      }
      k -= count;
    }
    chosen = bin;
    k_left = k;
    state[0] = (state[0] << kRadixBits) | bin;
    state[1] = k;
  }
  __syncthreads();
  if (quota == nullptr) return;

  // k_left ties to select among the entries equal to the threshold: tensor t takes
  // clamp(k_left - (ties of tensors before t), 0, its ties). Thread j owns a contiguous range of
  // tensors; an exclusive scan of the per-thread sums gives each range its offset.
  const int per_thread = (num_tensors + kRadixBins - 1) / kRadixBins;
  const int first = min(tid * per_thread, num_tensors);
  const int last = min(first + per_thread, num_tensors);
  long long own = 0;
  for (int t = first; t < last; ++t) own += static_cast<long long>(hist[static_cast<int64_t>(t) * kRadixBins + chosen]);
  chunk_base[tid] = own;
  __syncthreads();
  if (tid == 0) {
    long long running = 0;
    for (int j = 0; j < kRadixBins; ++j) {
      const long long c = chunk_base[j];
      chunk_base[j] = running;
      running += c;
    }
    *threshold = static_cast<Bits>(state[0]);
  }
  __syncthreads();
  long long before = chunk_base[tid];
  for (int t = first; t < last; ++t) {
    const long long ties = static_cast<long long>(hist[static_cast<int64_t>(t) * kRadixBins + chosen]);
    quota[t] = max(0LL, min(ties, k_left - before));
    before += ties;
  }
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> select_kth(const std::vector<at::Tensor>& tensors, int64_t k) {
  using Bits = typename Elem<T>::Bits;
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kPasses = sizeof(T);  // 8 bits per pass
  const at::Tensor& first = tensors[0];
  const int num_tensors = static_cast<int>(tensors.size());

  // The list's table, then the selection state (prefix 0, k to go), in one upload.
  const int64_t table_words = 4 * static_cast<int64_t>(num_tensors) + 1;
  std::vector<int64_t> words(table_words + 2);
  int64_t blocks = 0;
  for (int t = 0; t < num_tensors; ++t) {
    const int64_t n = tensors[t].numel();
    words[t] = static_cast<int64_t>(reinterpret_cast<uintptr_t>(tensors[t].data_ptr()));
    words[num_tensors + t] = n;
    words[2 * num_tensors + t] = blocks;
    words[3 * num_tensors + 1 + t] = cuda::is_vec_aligned<kVec, T>(tensors[t].data_ptr()) ? 1 : 0;
    blocks += (n + kChunk - 1) / kChunk;
  }
  words[3 * num_tensors] = blocks;
  words[table_words] = 0;
  words[table_words + 1] = k;
  TORCH_CHECK(blocks > 0 && blocks <= INT_MAX, "calm_fast.magnitude_threshold: ", blocks,
              " blocks do not fit one launch");
  const at::Tensor uploaded = cuda::upload_words(words, first.device());
  const int64_t* table = uploaded.data_ptr<int64_t>();
  int64_t* state = uploaded.data_ptr<int64_t>() + table_words;
  at::Tensor hist = at::empty({static_cast<int64_t>(num_tensors) * kRadixBins}, first.options().dtype(at::kLong));
  auto* hist_words = reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>());
  at::Tensor threshold = at::empty(at::IntArrayRef{}, first.options());
  at::Tensor quota = at::empty({num_tensors}, first.options().dtype(at::kLong));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  for (int pass = 0; pass < kPasses; ++pass) {
    const int shift = kRadixBits * (kPasses - 1 - pass);
    const bool last = pass == kPasses - 1;
    hist.zero_();
    radix_histogram_kernel<T><<<static_cast<unsigned>(blocks), cuda::kThreads, 0, stream>>>(
        table, num_tensors, state, shift, hist_words);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    radix_select_kernel<Bits><<<1, kRadixBins, 0, stream>>>(
        hist_words, num_tensors, state, last ? quota.data_ptr<int64_t>() : nullptr,
        last ? static_cast<Bits*>(threshold.data_ptr()) : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {threshold, quota};
}

std::tuple<at::Tensor, at::Tensor> magnitude_threshold_cuda(at::TensorList tensors_list, int64_t k) {
  const std::vector<at::Tensor> tensors = tensors_list.vec();
  check_magnitude_threshold(tensors, k);
  const at::Tensor& first = tensors[0];
  TORCH_CHECK_VALUE(first.is_cuda(), "calm_fast.magnitude_threshold: tensors must be CUDA tensors");
  const c10::cuda::CUDAGuard guard(first.device());
  const int64_t num_tensors = static_cast<int64_t>(tensors.size());
  TORCH_CHECK_VALUE(num_tensors <= INT_MAX / 4, "calm_fast.magnitude_threshold: too many tensors");
  if (k == 0) {
    return {at::full(at::IntArrayRef{}, INFINITY, first.options()), at::zeros({num_tensors}, first.options().dtype(at::kLong))};
  }
  return cuda::dispatch_float(first.scalar_type(), "magnitude_threshold", [&](auto tag) {
    using T = typename decltype(tag)::type;
    return select_kth<T>(tensors, k);
  });
}

}  // namespace
}  // namespace calm_fast

TORCH_LIBRARY_IMPL(calm_fast, CUDA, m) { m.impl("magnitude_threshold", &calm_fast::magnitude_threshold_cuda); }

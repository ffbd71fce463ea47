// CUDA kernel of consensus_merge (see calm_fast/reference.py, README op 3).
//
// One element-wise kernel over N scalars reading the T task vectors through a table of device
// pointers (no [T, N] stacking): passed by value in the kernel arguments for T <= kInlineTasks,
// uploaded to a small device buffer above that (cuda::upload_words: no sync, capturable). Per
// thread and group of 16 bytes of each task vector (4 fp32 / 8 bf16 or fp16 scalars; single
// scalars when a pointer is misaligned):
//   sum:        weighted = Σ_t w_t·τ_t                                   (one read of each τ_t)
//   ties:       pass 1 trimmed = Σ_t keep_t(τ_t); pass 2 weighted / count over agreeing tasks
//   consensus:  pass 1 total = Σ_t τ_t;          pass 2 votes and weighted
// The second pass re-reads the group it just read (L1/L2 hits; DRAM traffic stays one read).
// Every sum runs t = 0..T-1 in fp32 with __fadd_rn / __fmul_rn (no fma contraction), exactly
// the reference's order and rounding, so the TIES sign election and the TALL votes are
// bit-identical to calm_fast.reference.consensus_merge on CUDA.
#include <torch/library.h>

#include "ops.h"

#include "cuda_utils.cuh"

#include <cstring>
#include <vector>

namespace calm_fast {
namespace {

using cuda::load_float;

constexpr int kInlineTasks = 64;

// Task table held in the kernel arguments (1 KiB + 4 bytes).
struct InlineTable {
  const void* ptr[kInlineTasks];
  float w[kInlineTasks];
  float thr[kInlineTasks];
  int count;
  __device__ __forceinline__ const void* task(int t) const { return ptr[t]; }
  __device__ __forceinline__ float weight(int t) const { return w[t]; }
  __device__ __forceinline__ float threshold(int t) const { return thr[t]; }
};

// Task table in device memory: `count` pointers (8 bytes each), then count weights and count
// thresholds (fp32).
struct DeviceTable {
  const void* const* ptr;
  const float* w;
  const float* thr;
  int count;
  __device__ __forceinline__ const void* task(int t) const { return ptr[t]; }
  __device__ __forceinline__ float weight(int t) const { return w[t]; }
  __device__ __forceinline__ float threshold(int t) const { return thr[t]; }
};

// torch.sign for fp32 on CUDA: (0 < x) - (x < 0); NaN -> 0.
__device__ __forceinline__ float sign_f32(float x) {
  return static_cast<float>((0.0f < x) - (x < 0.0f));
}

template <typename T, ConsensusMethod kMethod, typename Table>
struct ConsensusOp {
  Table tab;
  T* out;
  float min_votes;

  template <int N>
  __device__ __forceinline__ void load_task(int t, int64_t i, float (&x)[N]) const {
    load_float<N, T, /*kReadOnly=*/true>(static_cast<const T*>(tab.task(t)) + i, x);
  }

  template <int N>
  __device__ __forceinline__ void apply(int64_t i) const {
    const int num_tasks = tab.count;
    float result[N];
    float weighted[N];
#pragma unroll
    for (int j = 0; j < N; ++j) weighted[j] = 0.0f;

    if constexpr (kMethod == ConsensusMethod::kSum) {
#pragma unroll 2  // deeper unrolling spills a register with the device-memory table (fp16/bf16)
      for (int t = 0; t < num_tasks; ++t) {
        float x[N];
        load_task<N>(t, i, x);
        const float w = tab.weight(t);
#pragma unroll
        for (int j = 0; j < N; ++j) weighted[j] = __fadd_rn(weighted[j], __fmul_rn(w, x[j]));
      }
#pragma unroll
      for (int j = 0; j < N; ++j) result[j] = weighted[j];
    } else if constexpr (kMethod == ConsensusMethod::kTies) {
      // kept_t = |τ_t| >= thr_t ? τ_t : 0; elected = sign(Σ_t kept_t).
      float trimmed[N];
#pragma unroll
      for (int j = 0; j < N; ++j) trimmed[j] = 0.0f;
      for (int t = 0; t < num_tasks; ++t) {
        float x[N];
        load_task<N>(t, i, x);
        const float thr = tab.threshold(t);
#pragma unroll
        for (int j = 0; j < N; ++j) trimmed[j] = __fadd_rn(trimmed[j], fabsf(x[j]) >= thr ? x[j] : 0.0f);
      }
      float elected[N], count[N];
#pragma unroll
      for (int j = 0; j < N; ++j) elected[j] = sign_f32(trimmed[j]), count[j] = 0.0f;
      for (int t = 0; t < num_tasks; ++t) {
        float x[N];
        load_task<N>(t, i, x);
        const float thr = tab.threshold(t);
        const float w = tab.weight(t);
#pragma unroll
        for (int j = 0; j < N; ++j) {
          const float k = fabsf(x[j]) >= thr ? x[j] : 0.0f;
          const bool agree = sign_f32(k) == elected[j] && k != 0.0f;
          weighted[j] = __fadd_rn(weighted[j], agree ? __fmul_rn(w, k) : 0.0f);
          count[j] = __fadd_rn(count[j], agree ? 1.0f : 0.0f);
        }
      }
#pragma unroll
      for (int j = 0; j < N; ++j) {
        result[j] = count[j] > 0.0f ? __fdiv_rn(weighted[j], fmaxf(count[j], 1.0f)) : 0.0f;
      }
    } else {  // consensus (TALL): votes_t = |τ_t| >= thr_t·|total - τ_t|
      float total[N], votes[N];
#pragma unroll
      for (int j = 0; j < N; ++j) total[j] = 0.0f, votes[j] = 0.0f;
      for (int t = 0; t < num_tasks; ++t) {
        float x[N];
        load_task<N>(t, i, x);
#pragma unroll
        for (int j = 0; j < N; ++j) total[j] = __fadd_rn(total[j], x[j]);
      }
      for (int t = 0; t < num_tasks; ++t) {
        float x[N];
        load_task<N>(t, i, x);
        const float thr = tab.threshold(t);
        const float w = tab.weight(t);
#pragma unroll
        for (int j = 0; j < N; ++j) {
          const bool vote = fabsf(x[j]) >= __fmul_rn(thr, fabsf(__fsub_rn(total[j], x[j])));
          votes[j] = __fadd_rn(votes[j], vote ? 1.0f : 0.0f);
          weighted[j] = __fadd_rn(weighted[j], __fmul_rn(w, x[j]));
        }
      }
#pragma unroll
      for (int j = 0; j < N; ++j) result[j] = votes[j] >= min_votes ? weighted[j] : 0.0f;
    }
    cuda::store_float<N>(out + i, result);
  }
};

at::Tensor consensus_merge_cuda(at::TensorList task_vectors_list, at::ArrayRef<double> weights_list,
                                at::ArrayRef<double> thresholds_list, c10::string_view method,
                                int64_t min_votes) {
  const std::vector<at::Tensor> task_vectors = task_vectors_list.vec();
  const std::vector<double> weights = weights_list.vec();
  const std::vector<double> thresholds = thresholds_list.vec();
  const ConsensusMethod parsed = check_consensus_merge(task_vectors, weights, thresholds, method, min_votes);
  const at::Tensor& first = task_vectors[0];
  TORCH_CHECK_VALUE(first.is_cuda(), "calm_fast.consensus_merge: task vectors must be CUDA tensors");
  const c10::cuda::CUDAGuard guard(first.device());
  const int num_tasks = static_cast<int>(task_vectors.size());
  TORCH_CHECK_VALUE(task_vectors.size() <= static_cast<size_t>(INT32_MAX),
                    "calm_fast.consensus_merge: too many task vectors");
  at::Tensor out = at::empty_like(first, at::MemoryFormat::Contiguous);
  const int64_t n = first.numel();
  if (n == 0) return out;

  // weights / thresholds as the reference uses them: Python floats rounded to fp32.
  std::vector<float> w32(num_tasks), thr32(num_tasks, 0.0f);
  for (int t = 0; t < num_tasks; ++t) {
    w32[t] = static_cast<float>(weights[t]);
    if (parsed != ConsensusMethod::kSum) thr32[t] = static_cast<float>(thresholds[t]);
  }

  cuda::dispatch_float(first.scalar_type(), "consensus_merge", [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int kVec = 16 / sizeof(T);
    bool aligned = cuda::is_vec_aligned<kVec, T>(out.data_ptr());
    for (const at::Tensor& tv : task_vectors) aligned = aligned && cuda::is_vec_aligned<kVec, T>(tv.data_ptr());

    auto launch = [&](const auto& table) {
      using Table = std::decay_t<decltype(table)>;
      const float mv = static_cast<float>(min_votes);
      switch (parsed) {
        case ConsensusMethod::kSum:
          cuda::launch_elementwise<kVec>(ConsensusOp<T, ConsensusMethod::kSum, Table>{table, cuda::ptr_of<T>(out), mv},
                                         n, aligned);
          break;
        case ConsensusMethod::kTies:
          cuda::launch_elementwise<kVec>(ConsensusOp<T, ConsensusMethod::kTies, Table>{table, cuda::ptr_of<T>(out), mv},
                                         n, aligned);
          break;
        case ConsensusMethod::kConsensus:
          cuda::launch_elementwise<kVec>(
              ConsensusOp<T, ConsensusMethod::kConsensus, Table>{table, cuda::ptr_of<T>(out), mv}, n, aligned);
          break;
      }
    };

    if (num_tasks <= kInlineTasks) {
      InlineTable table{};
      for (int t = 0; t < num_tasks; ++t) {
        table.ptr[t] = task_vectors[t].data_ptr();
        table.w[t] = w32[t];
        table.thr[t] = thr32[t];
      }
      table.count = num_tasks;
      launch(table);
    } else {
      // Pointers, weights and thresholds packed into one int64 table (pointers first, so they
      // stay 8-byte aligned) and uploaded through kernel arguments: no host sync, capturable.
      // num_tasks words of pointers, then 2 * num_tasks floats = num_tasks more words.
      std::vector<int64_t> words(2 * static_cast<size_t>(num_tasks));
      for (int t = 0; t < num_tasks; ++t) {
        words[t] = static_cast<int64_t>(reinterpret_cast<uintptr_t>(task_vectors[t].data_ptr()));
      }
      auto* floats = reinterpret_cast<float*>(words.data() + num_tasks);
      std::memcpy(floats, w32.data(), sizeof(float) * num_tasks);
      std::memcpy(floats + num_tasks, thr32.data(), sizeof(float) * num_tasks);
      const at::Tensor dev = cuda::upload_words(words, first.device());
      const auto* dev_words = dev.data_ptr<int64_t>();
      const auto* dev_floats = reinterpret_cast<const float*>(dev_words + num_tasks);
      const DeviceTable table{reinterpret_cast<const void* const*>(dev_words), dev_floats,
                              dev_floats + num_tasks, num_tasks};
      launch(table);
    }
  });
  return out;
}

}  // namespace
}  // namespace calm_fast

TORCH_LIBRARY_IMPL(calm_fast, CUDA, m) { m.impl("consensus_merge", &calm_fast::consensus_merge_cuda); }

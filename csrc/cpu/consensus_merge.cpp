// CPU kernel of consensus_merge: task arithmetic, TIES and TALL/consensus merging of T task
// vectors in one pass over memory. The scalars are processed in small blocks; within a block the
// T inputs are read in order t = 0..T-1 (a second sweep, where a method needs one, hits cache),
// accumulating in fp32 with the reference's exact operation order, so decisions taken on sums
// (TIES sign election, TALL votes) are bit-identical to calm_fast/reference.py.
#include "ops.h"

#include <torch/library.h>

#include <vector>

#include "cpu_utils.h"

namespace calm_fast {
namespace cpu {
namespace {

// Scalars per block: T inputs of a block stay in L1/L2 between the sweeps a method makes.
constexpr int64_t kBlock = 512;

struct MergeArgs {
  std::vector<float> weights;     // fp32, as torch multiplies a Python float into fp32 tensors
  std::vector<float> thresholds;  // fp32, as torch compares fp32 tensors with Python floats
  float min_votes;
};

template <typename T>
using Inputs = std::vector<const typename T::storage*>;

CALM_CPU_INLINE float trim(float x, float threshold) {
  return select_f32(__builtin_fabsf(x) >= threshold, x, 0.0f);
}

// torch.sign: (0 < x) - (x < 0); sign(±0) = sign(NaN) = 0.
CALM_CPU_INLINE float sign_f32(float x) {
  return static_cast<float>(0.0f < x) - static_cast<float>(x < 0.0f);
}

// One task's sweep over a block. These are deliberately not inlined into the loop over tasks:
// there gcc's unroll-and-jam fuses two tasks' sweeps into one scalar loop instead of
// vectorizing them (measured: 3.5x slower at T = 8).
#define CALM_CPU_SWEEP template <typename T> __attribute__((noinline)) void

// acc += w · x
CALM_CPU_SWEEP add_weighted(float* __restrict acc, const typename T::storage* __restrict x, float w,
                            int64_t len) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) acc[i] = acc[i] + w * T::load(x[i]);
}

// acc += x
CALM_CPU_SWEEP add_plain(float* __restrict acc, const typename T::storage* __restrict x,
                         int64_t len) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) acc[i] = acc[i] + T::load(x[i]);
}

// acc += (|x| >= thr ? x : 0)
CALM_CPU_SWEEP add_trimmed(float* __restrict acc, const typename T::storage* __restrict x,
                           float thr, int64_t len) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) acc[i] = acc[i] + trim(T::load(x[i]), thr);
}

// The trimmed x that agree with the elected sign: acc += w · kept, count += 1.
CALM_CPU_SWEEP add_agreeing(float* __restrict acc, float* __restrict count,
                            const float* __restrict elected,
                            const typename T::storage* __restrict x, float thr, float w,
                            int64_t len) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    const float kept = trim(T::load(x[i]), thr);
    const bool agree = (sign_f32(kept) == elected[i]) & (kept != 0.0f);
    acc[i] = acc[i] + select_f32(agree, w * kept, 0.0f);
    count[i] = count[i] + select_f32(agree, 1.0f, 0.0f);
  }
}

// votes += [|x| >= thr · |total - x|], acc += w · x
CALM_CPU_SWEEP add_votes(float* __restrict acc, float* __restrict votes,
                         const float* __restrict total, const typename T::storage* __restrict x,
                         float thr, float w, int64_t len) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    const float v = T::load(x[i]);
    const bool vote = __builtin_fabsf(v) >= thr * __builtin_fabsf(total[i] - v);
    votes[i] = votes[i] + select_f32(vote, 1.0f, 0.0f);
    acc[i] = acc[i] + w * v;
  }
}

#undef CALM_CPU_SWEEP

CALM_CPU_INLINE void fill_zero(float* __restrict a, int64_t len) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) a[i] = 0.0f;
}

// weighted = Σ_t w_t · τ_t
template <typename T>
void merge_sum(const Inputs<T>& taus, const MergeArgs& a, typename T::storage* __restrict out,
               int64_t begin, int64_t len) {
  float acc[kBlock];
  fill_zero(acc, len);
  for (size_t t = 0; t < taus.size(); ++t) add_weighted<T>(acc, taus[t] + begin, a.weights[t], len);
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) out[begin + i] = T::store(acc[i]);
}

// kept_t = τ_t where |τ_t| >= thr_t; elected = sign(Σ_t kept_t); disjoint mean of the w_t·kept_t
// whose sign agrees with the elected one.
template <typename T>
void merge_ties(const Inputs<T>& taus, const MergeArgs& a, typename T::storage* __restrict out,
                int64_t begin, int64_t len) {
  float elected[kBlock], acc[kBlock], count[kBlock];
  fill_zero(elected, len);
  fill_zero(acc, len);
  fill_zero(count, len);
  for (size_t t = 0; t < taus.size(); ++t) {
    add_trimmed<T>(elected, taus[t] + begin, a.thresholds[t], len);
  }
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) elected[i] = sign_f32(elected[i]);
  for (size_t t = 0; t < taus.size(); ++t) {
    add_agreeing<T>(acc, count, elected, taus[t] + begin, a.thresholds[t], a.weights[t], len);
  }
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    const float c = count[i];
    out[begin + i] = T::store(select_f32(c > 0.0f, acc[i] / select_f32(c < 1.0f, 1.0f, c), 0.0f));
  }
}

// total = Σ_t τ_t; votes = Σ_t [|τ_t| >= thr_t · |total - τ_t|]; Σ_t w_t·τ_t where votes >= k.
template <typename T>
void merge_consensus(const Inputs<T>& taus, const MergeArgs& a,
                     typename T::storage* __restrict out, int64_t begin, int64_t len) {
  float total[kBlock], acc[kBlock], votes[kBlock];
  fill_zero(total, len);
  fill_zero(acc, len);
  fill_zero(votes, len);
  for (size_t t = 0; t < taus.size(); ++t) add_plain<T>(total, taus[t] + begin, len);
  for (size_t t = 0; t < taus.size(); ++t) {
    add_votes<T>(acc, votes, total, taus[t] + begin, a.thresholds[t], a.weights[t], len);
  }
  const float min_votes = a.min_votes;
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) out[begin + i] = T::store(select_f32(votes[i] >= min_votes, acc[i], 0.0f));
}

template <typename T, typename BlockFn>
void merge_blocks(const std::vector<at::Tensor>& task_vectors, const MergeArgs& args,
                  at::Tensor& out, BlockFn block_fn) {
  Inputs<T> taus;
  taus.reserve(task_vectors.size());
  for (const auto& tv : task_vectors) taus.push_back(data<T>(tv));
  auto* out_ptr = data<T>(out);
  parallel_chunks(out.numel(), kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; b += kBlock) {
      block_fn(taus, args, out_ptr, b, std::min(kBlock, end - b));
    }
  });
}

at::Tensor consensus_merge_cpu(at::TensorList task_vectors, at::ArrayRef<double> weights,
                               at::ArrayRef<double> thresholds, c10::string_view method,
                               int64_t min_votes) {
  const std::vector<at::Tensor> tvs = task_vectors.vec();
  const ConsensusMethod parsed =
      check_consensus_merge(tvs, weights.vec(), thresholds.vec(), method, min_votes);
  MergeArgs args;
  for (double w : weights) args.weights.push_back(static_cast<float>(w));
  for (double t : thresholds) args.thresholds.push_back(static_cast<float>(t));
  args.min_votes = static_cast<float>(min_votes);
  at::Tensor out = at::empty(tvs[0].sizes(), tvs[0].options());
  dispatch_float(out.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    switch (parsed) {
      case ConsensusMethod::kSum:
        merge_blocks<T>(tvs, args, out, merge_sum<T>);
        break;
      case ConsensusMethod::kTies:
        merge_blocks<T>(tvs, args, out, merge_ties<T>);
        break;
      case ConsensusMethod::kConsensus:
        merge_blocks<T>(tvs, args, out, merge_consensus<T>);
        break;
    }
  });
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace calm_fast

TORCH_LIBRARY_IMPL(calm_fast, CPU, m) {
  m.impl("consensus_merge", &calm_fast::cpu::consensus_merge_cpu);
}

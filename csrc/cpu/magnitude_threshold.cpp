// CPU kernel of magnitude_threshold: the exact k-th largest |x| over a list of tensors, by radix
// selection on the IEEE bit patterns of |x| (8 bits per pass from the top: 4 passes for fp32,
// 2 for bf16/fp16), with per-tensor histograms so that the last pass yields the per-tensor
// counts of entries tied with the threshold. Reads the tensors in place: no concatenation, no
// sort, no N-sized temporaries.
#include "ops.h"

#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <mutex>
#include <vector>

#include "cpu_utils.h"

namespace calm_fast {
namespace cpu {
namespace {

// A histogram bin for entries outside the current prefix, so the hot loop has no branch.
constexpr int kSkipBin = kRadixBins;
// Interleaved copies of the local histogram: consecutive entries rarely hit the same counter,
// which would serialize on store-to-load forwarding.
constexpr int kCopies = 4;
// Local counters are 32-bit: segments are cut at this many entries before they are flushed.
constexpr int64_t kMaxSegment = int64_t(1) << 30;

// Counts, into hist[0..255], digit (|x| >> shift) & 0xff of the entries of x[0..n) whose digits
// above `shift` equal `prefix` (all entries on the first pass).
template <typename T, bool kFirstPass>
void histogram_segment(const typename T::bits* __restrict x, int64_t n, int shift,
                       typename T::bits prefix, int64_t* __restrict hist) {
  using Bits = typename T::bits;
  for (int64_t start = 0; start < n; start += kMaxSegment) {
    const int64_t len = std::min(kMaxSegment, n - start);
    const Bits* __restrict p = x + start;
    uint32_t local[kCopies][kRadixBins + 1] = {};
    auto bin = [&](Bits v) -> int {
      const uint32_t mag = uint32_t(v & T::kAbsMask);
      const int digit = int((mag >> shift) & (kRadixBins - 1));
      if (kFirstPass) return digit;
      // shift + 8 < kBits on every later pass, so this shift is well defined.
      return (mag >> (shift + kRadixBits)) == uint32_t(prefix) ? digit : kSkipBin;
    };
    int64_t i = 0;
    for (; i + kCopies <= len; i += kCopies) {
      for (int c = 0; c < kCopies; ++c) ++local[c][bin(p[i + c])];
    }
    for (; i < len; ++i) ++local[0][bin(p[i])];
    for (int b = 0; b < kRadixBins; ++b) {
      int64_t sum = 0;
      for (int c = 0; c < kCopies; ++c) sum += local[c][b];
      hist[b] += sum;
    }
  }
}

struct Segment {
  int64_t tensor;  // index in the list
  int64_t offset;  // first flat index of the tensor in the virtual concatenation
  int64_t numel;
};

// One radix pass: hist[t * 256 + digit] over every tensor t, in parallel over the virtual
// concatenation of the tensors (each thread chunk may span several tensors).
template <typename T, bool kFirstPass>
void histogram_pass(const std::vector<const typename T::bits*>& ptrs,
                    const std::vector<Segment>& segments, int64_t total, int shift,
                    typename T::bits prefix, std::vector<int64_t>& hist) {
  std::fill(hist.begin(), hist.end(), 0);
  std::mutex merge_mutex;
  parallel_chunks(total, kGrain, [&](int64_t begin, int64_t end) {
    // First segment overlapping [begin, end).
    auto it = std::upper_bound(segments.begin(), segments.end(), begin,
                               [](int64_t v, const Segment& s) { return v < s.offset; });
    --it;
    for (; it != segments.end() && it->offset < end; ++it) {
      const int64_t lo = std::max(begin, it->offset);
      const int64_t hi = std::min(end, it->offset + it->numel);
      if (lo >= hi) continue;
      int64_t local[kRadixBins] = {};
      histogram_segment<T, kFirstPass>(ptrs[it->tensor] + (lo - it->offset), hi - lo, shift,
                                       prefix, local);
      std::lock_guard<std::mutex> lock(merge_mutex);
      int64_t* dst = hist.data() + it->tensor * kRadixBins;
      for (int b = 0; b < kRadixBins; ++b) dst[b] += local[b];
    }
  });
}

template <typename T>
void magnitude_threshold_impl(const std::vector<at::Tensor>& tensors, int64_t k,
                              at::Tensor& threshold, at::Tensor& quota) {
  using Bits = typename T::bits;
  const int64_t num_tensors = static_cast<int64_t>(tensors.size());
  std::vector<const Bits*> ptrs(num_tensors);
  std::vector<Segment> segments;  // non-empty tensors only, in list order
  int64_t total = 0;
  for (int64_t t = 0; t < num_tensors; ++t) {
    ptrs[t] = static_cast<const Bits*>(tensors[t].data_ptr());
    const int64_t n = tensors[t].numel();
    if (n > 0) segments.push_back({t, total, n});
    total += n;
  }

  std::vector<int64_t> hist(num_tensors * kRadixBins);
  int64_t k_remaining = k;
  uint32_t prefix = 0;
  int bin = 0;
  for (int shift = T::kBits - kRadixBits; shift >= 0; shift -= kRadixBits) {
    if (shift == T::kBits - kRadixBits) {
      histogram_pass<T, true>(ptrs, segments, total, shift, Bits(prefix), hist);
    } else {
      histogram_pass<T, false>(ptrs, segments, total, shift, Bits(prefix), hist);
    }
    bin = select_radix_bin(hist.data(), num_tensors, &k_remaining);
    prefix = (prefix << kRadixBits) | uint32_t(bin);
  }

  // k_remaining is now the number of entries equal to the threshold that the k need; the last
  // pass's bin holds each tensor's count of such entries. Fill quotas in tensor order.
  int64_t* q = quota.data_ptr<int64_t>();
  for (int64_t t = 0; t < num_tensors; ++t) {
    const int64_t take = std::min(k_remaining, hist[t * kRadixBins + bin]);
    q[t] = take;
    k_remaining -= take;
  }
  *static_cast<Bits*>(threshold.data_ptr()) = Bits(prefix);
}

std::tuple<at::Tensor, at::Tensor> magnitude_threshold_cpu(at::TensorList tensor_list, int64_t k) {
  const std::vector<at::Tensor> tensors = tensor_list.vec();
  check_magnitude_threshold(tensors, k);
  const auto options = tensors[0].options();
  at::Tensor quota = at::zeros({static_cast<int64_t>(tensors.size())}, options.dtype(at::kLong));
  if (k == 0) {
    return {at::full({}, std::numeric_limits<double>::infinity(), options), quota};
  }
  at::Tensor threshold = at::empty({}, options);
  dispatch_float(threshold.scalar_type(), [&](auto tag) {
    magnitude_threshold_impl<decltype(tag)>(tensors, k, threshold, quota);
  });
  return {threshold, quota};
}

}  // namespace
}  // namespace cpu
}  // namespace calm_fast

TORCH_LIBRARY_IMPL(calm_fast, CPU, m) {
  m.impl("magnitude_threshold", &calm_fast::cpu::magnitude_threshold_cpu);
}

// The calm_fast op contract shared by every native backend (CPU and CUDA).
//
// Schemas are defined once in csrc/registration.cpp. Each backend implements the functions
// declared here for its device and registers them with TORCH_LIBRARY_IMPL. The check_*
// functions enforce the same input contract as calm_fast/_meta.py and raise ValueError /
// TypeError in Python (TORCH_CHECK_VALUE / TORCH_CHECK_TYPE), with the same wording.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <tuple>
#include <vector>

namespace calm_fast {

// Regularizer of the mask step: the authors' polarizing term, a true L1 on sigmoid(S), none.
enum class MaskReg : int { kPolarize = 0, kL1 = 1, kNone = 2 };
// How masked_apply_ reads its mask: sigmoid(S), [S > 0], or packed bits.
enum class MaskMode : int { kSoft = 0, kHard = 1, kPacked = 2 };
// Consensus vote across task vectors: weighted sum, TIES, TALL / consensus.
enum class ConsensusMethod : int { kSum = 0, kTies = 1, kConsensus = 2 };

MaskReg check_mask_step(const at::Tensor& logits, const at::Tensor& weight, const at::Tensor& grad,
                        const at::Tensor& delta, const std::optional<at::Tensor>& base,
                        c10::string_view reg);
void check_mask_grad_sumsq(const at::Tensor& logits, const at::Tensor& grad,
                           const at::Tensor& delta);
MaskMode check_masked_apply(const at::Tensor& weight, const at::Tensor& delta,
                            const at::Tensor& mask, c10::string_view mode);
ConsensusMethod check_consensus_merge(const std::vector<at::Tensor>& task_vectors,
                                      const std::vector<double>& weights,
                                      const std::vector<double>& thresholds,
                                      c10::string_view method, int64_t min_votes);
void check_magnitude_threshold(const std::vector<at::Tensor>& tensors, int64_t k);
void check_entropy_argmax(const at::Tensor& logits);
void check_pack_mask(const at::Tensor& mask);
void check_unpack_mask(const at::Tensor& packed, int64_t numel);

inline int64_t packed_numel(int64_t numel) { return (numel + 7) / 8; }

// Radix selection of the k-th largest |x| runs over IEEE bit patterns of |x|, 8 bits per pass.
constexpr int kRadixBits = 8;
constexpr int kRadixBins = 1 << kRadixBits;

// Given the per-tensor histograms of one radix pass (hist[t * kRadixBins + bin], counting only
// entries whose higher digits equal the prefix chosen so far), pick the bin that holds the k-th
// largest entry. Returns the bin and updates *k_remaining to the rank within that bin.
int select_radix_bin(const int64_t* hist, int64_t num_tensors, int64_t* k_remaining);

}  // namespace calm_fast

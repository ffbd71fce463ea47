// Input contract of every op (see ops.h); mirrors calm_fast/_meta.py.
#include "ops.h"

#include <initializer_list>
#include <sstream>
#include <string>
#include <utility>

namespace calm_fast {
namespace {

bool is_float(const at::Tensor& t) {
  const auto d = t.scalar_type();
  return d == at::kFloat || d == at::kBFloat16 || d == at::kHalf;
}

void check_float(const char* op, const std::string& name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(is_float(t), "calm_fast.", op, ": ", name,
                   " must be float32, bfloat16 or float16, got ", t.scalar_type());
}

void check_contiguous(const char* op, const std::string& name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.is_contiguous(), "calm_fast.", op, ": ", name, " must be contiguous");
}

void check_same(const char* op, const std::string& ref_name, const at::Tensor& ref,
                const std::string& name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), "calm_fast.", op, ": ", name, " is on ",
                    t.device(), " but ", ref_name, " is on ", ref.device());
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), "calm_fast.", op, ": ", name, " has shape ",
                    t.sizes(), " but ", ref_name, " has ", ref.sizes());
  check_contiguous(op, name, t);
}

// What the mask ops share: fp32 contiguous logits, and float operands shaped like them.
void check_logits_and_operands(const char* op, const at::Tensor& logits,
                               std::initializer_list<std::pair<const char*, const at::Tensor*>> operands) {
  TORCH_CHECK_TYPE(logits.scalar_type() == at::kFloat, "calm_fast.", op,
                   ": logits must be float32, got ", logits.scalar_type());
  check_contiguous(op, "logits", logits);
  for (const auto& [name, t] : operands) {
    check_float(op, name, *t);
    check_same(op, "logits", logits, name, *t);
  }
}

}  // namespace

MaskReg check_mask_step(const at::Tensor& logits, const at::Tensor& weight, const at::Tensor& grad,
                        const at::Tensor& delta, const std::optional<at::Tensor>& base,
                        c10::string_view reg) {
  const char* op = "mask_step_";
  check_logits_and_operands(op, logits, {{"weight", &weight}, {"grad", &grad}, {"delta", &delta}});
  TORCH_CHECK_TYPE(grad.scalar_type() == weight.scalar_type(), "calm_fast.", op,
                   ": grad must have weight's dtype ", weight.scalar_type(), ", got ",
                   grad.scalar_type());
  if (base.has_value()) {
    check_same(op, "logits", logits, "base", *base);
    TORCH_CHECK_TYPE(base->scalar_type() == weight.scalar_type(), "calm_fast.", op,
                     ": base must have weight's dtype ", weight.scalar_type(), ", got ",
                     base->scalar_type());
  }
  if (reg == "polarize") return MaskReg::kPolarize;
  if (reg == "l1") return MaskReg::kL1;
  if (reg == "none") return MaskReg::kNone;
  TORCH_CHECK_VALUE(false, "calm_fast.", op, ": reg must be one of ('polarize', 'l1', 'none'), got '",
                    std::string(reg), "'");
}

void check_mask_grad_sumsq(const at::Tensor& logits, const at::Tensor& grad,
                           const at::Tensor& delta) {
  check_logits_and_operands("mask_grad_sumsq", logits, {{"grad", &grad}, {"delta", &delta}});
}

MaskMode check_masked_apply(const at::Tensor& weight, const at::Tensor& delta,
                            const at::Tensor& mask, c10::string_view mode) {
  const char* op = "masked_apply_";
  check_float(op, "weight", weight);
  check_float(op, "delta", delta);
  check_contiguous(op, "weight", weight);
  check_same(op, "weight", weight, "delta", delta);
  MaskMode parsed;
  if (mode == "soft") {
    parsed = MaskMode::kSoft;
  } else if (mode == "hard") {
    parsed = MaskMode::kHard;
  } else if (mode == "packed") {
    parsed = MaskMode::kPacked;
  } else {
    TORCH_CHECK_VALUE(false, "calm_fast.", op,
                      ": mode must be one of ('soft', 'hard', 'packed'), got '", std::string(mode), "'");
  }
  if (parsed == MaskMode::kPacked) {
    TORCH_CHECK_TYPE(mask.scalar_type() == at::kByte, "calm_fast.", op,
                     ": a packed mask must be uint8, got ", mask.scalar_type());
    TORCH_CHECK_VALUE(mask.device() == weight.device(), "calm_fast.", op, ": mask is on ",
                      mask.device(), " but weight is on ", weight.device());
    TORCH_CHECK_VALUE(mask.dim() == 1 && mask.numel() == packed_numel(weight.numel()), "calm_fast.",
                      op, ": a packed mask for ", weight.numel(), " scalars must have shape (",
                      packed_numel(weight.numel()), ",), got ", mask.sizes());
    check_contiguous(op, "mask", mask);
  } else {
    TORCH_CHECK_TYPE(mask.scalar_type() == at::kFloat, "calm_fast.", op,
                     ": mask logits must be float32, got ", mask.scalar_type());
    check_same(op, "weight", weight, "mask", mask);
  }
  return parsed;
}

ConsensusMethod check_consensus_merge(const std::vector<at::Tensor>& task_vectors,
                                      const std::vector<double>& weights,
                                      const std::vector<double>& thresholds,
                                      c10::string_view method, int64_t min_votes) {
  const char* op = "consensus_merge";
  const auto num_tasks = static_cast<int64_t>(task_vectors.size());
  TORCH_CHECK_VALUE(num_tasks > 0, "calm_fast.", op, ": needs at least one task vector");
  const at::Tensor& first = task_vectors[0];
  check_float(op, "task_vectors[0]", first);
  for (int64_t i = 0; i < num_tasks; ++i) {
    const std::string name = "task_vectors[" + std::to_string(i) + "]";
    check_same(op, "task_vectors[0]", first, name, task_vectors[i]);
    TORCH_CHECK_TYPE(task_vectors[i].scalar_type() == first.scalar_type(), "calm_fast.", op, ": ",
                     name, " has dtype ", task_vectors[i].scalar_type(),
                     " but task_vectors[0] has ", first.scalar_type());
  }
  ConsensusMethod parsed;
  if (method == "sum") {
    parsed = ConsensusMethod::kSum;
  } else if (method == "ties") {
    parsed = ConsensusMethod::kTies;
  } else if (method == "consensus") {
    parsed = ConsensusMethod::kConsensus;
  } else {
    TORCH_CHECK_VALUE(false, "calm_fast.", op,
                      ": method must be one of ('sum', 'ties', 'consensus'), got '",
                      std::string(method), "'");
  }
  TORCH_CHECK_VALUE(static_cast<int64_t>(weights.size()) == num_tasks, "calm_fast.", op, ": got ",
                    weights.size(), " weights for ", num_tasks, " task vectors");
  TORCH_CHECK_VALUE(parsed == ConsensusMethod::kSum ||
                        static_cast<int64_t>(thresholds.size()) == num_tasks,
                    "calm_fast.", op, ": method '", std::string(method),
                    "' needs one threshold per task vector, got ", thresholds.size());
  TORCH_CHECK_VALUE(parsed != ConsensusMethod::kConsensus || (min_votes >= 0 && min_votes <= num_tasks),
                    "calm_fast.", op, ": min_votes must lie in [0, ", num_tasks, "], got ", min_votes);
  return parsed;
}

void check_magnitude_threshold(const std::vector<at::Tensor>& tensors, int64_t k) {
  const char* op = "magnitude_threshold";
  TORCH_CHECK_VALUE(!tensors.empty(), "calm_fast.", op, ": needs at least one tensor");
  const at::Tensor& first = tensors[0];
  check_float(op, "tensors[0]", first);
  int64_t total = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const std::string name = "tensors[" + std::to_string(i) + "]";
    TORCH_CHECK_TYPE(tensors[i].scalar_type() == first.scalar_type(), "calm_fast.", op, ": ", name,
                     " has dtype ", tensors[i].scalar_type(), " but tensors[0] has ",
                     first.scalar_type());
    TORCH_CHECK_VALUE(tensors[i].device() == first.device(), "calm_fast.", op, ": ", name,
                      " is on ", tensors[i].device(), " but tensors[0] is on ", first.device());
    check_contiguous(op, name, tensors[i]);
    total += tensors[i].numel();
  }
  TORCH_CHECK_VALUE(k >= 0 && k <= total, "calm_fast.", op, ": k must lie in [0, ", total,
                    "] (the number of scalars), got ", k);
}

void check_entropy_argmax(const at::Tensor& logits) {
  const char* op = "entropy_argmax";
  check_float(op, "logits", logits);
  TORCH_CHECK_VALUE(logits.dim() == 2 && logits.size(1) > 0, "calm_fast.", op,
                    ": logits must have shape [B, C] with C >= 1, got ", logits.sizes());
  check_contiguous(op, "logits", logits);
}

void check_pack_mask(const at::Tensor& mask) {
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool || is_float(mask),
                   "calm_fast.pack_mask: mask must be bool or a float dtype, got ",
                   mask.scalar_type());
  check_contiguous("pack_mask", "mask", mask);
}

void check_unpack_mask(const at::Tensor& packed, int64_t numel) {
  const char* op = "unpack_mask";
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kByte, "calm_fast.", op,
                   ": packed must be uint8, got ", packed.scalar_type());
  TORCH_CHECK_VALUE(numel >= 0 && packed.dim() == 1 && packed.numel() == packed_numel(numel),
                    "calm_fast.", op, ": packed must have shape (",
                    packed_numel(numel < 0 ? 0 : numel), ",) for numel=", numel, ", got ",
                    packed.sizes());
  check_contiguous(op, "packed", packed);
}

int select_radix_bin(const int64_t* hist, int64_t num_tensors, int64_t* k_remaining) {
  for (int bin = kRadixBins - 1; bin >= 0; --bin) {
    int64_t count = 0;
    for (int64_t t = 0; t < num_tensors; ++t) count += hist[t * kRadixBins + bin];
    if (count >= *k_remaining) return bin;
    *k_remaining -= count;
  }
  TORCH_CHECK(false, "calm_fast.magnitude_threshold: radix selection ran past the last bin");
}

}  // namespace calm_fast

// The one place where calm_fast's op schemas are written. Backends register kernels for them
// with TORCH_LIBRARY_IMPL (csrc/cpu/*.cpp for CPU, built as one module per vector ISA and
// loaded by calm_fast/_extension.py; kernels/cuda/*.cu for CUDA, in this module); fake kernels
// for torch.compile live in calm_fast/_meta.py.
#include <torch/library.h>
#include <c10/util/Flags.h>
#include <pybind11/pybind11.h>

// c10's CPU allocator fills new allocations with a NaN pattern when this flag is set; tests
// turn it on so that an output element a kernel forgets to write cannot pass by luck.
C10_DECLARE_bool(caffe2_cpu_allocator_do_junk_fill);

TORCH_LIBRARY(calm_fast, m) {
  m.def("mask_step_(Tensor(a!) logits, Tensor(b!) weight, Tensor grad, Tensor delta, "
        "Tensor? base, float lr, float l1, str reg) -> ()");
  m.def("mask_grad_sumsq(Tensor logits, Tensor grad, Tensor delta) -> Tensor");
  // "mask_mode", not "mode": torch.library.opcheck breaks on an argument named mode.
  m.def("masked_apply_(Tensor(a!) weight, Tensor delta, Tensor mask, str mask_mode) -> ()");
  m.def("consensus_merge(Tensor[] task_vectors, float[] weights, float[] thresholds, str method, "
        "int min_votes) -> Tensor");
  m.def("magnitude_threshold(Tensor[] tensors, int k) -> (Tensor, Tensor)");
  m.def("entropy_argmax(Tensor logits) -> (Tensor, Tensor)");
  m.def("pack_mask(Tensor mask) -> Tensor");
  m.def("unpack_mask(Tensor packed, int numel) -> Tensor");
}

PYBIND11_MODULE(_C, module) {
  module.doc() = "calm_fast native kernels; the ops themselves live in torch.ops.calm_fast";
  module.attr("with_cuda") =
#ifdef CALM_FAST_WITH_CUDA
      true;
#else
      false;
#endif
  module.def("set_cpu_poison", [](bool enabled) {
    FLAGS_caffe2_cpu_allocator_do_junk_fill = enabled;
  }, "Fill every new CPU allocation with a NaN pattern (for tests)");
}

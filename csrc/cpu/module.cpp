// The Python module of one CPU kernel build (calm_fast._C_cpu_<isa>): the same csrc/cpu sources
// compiled once per vector ISA (csrc/cpu/ISAS). Importing it registers the CPU kernels; the
// loader (calm_fast/_extension.py) imports exactly one, the best this CPU runs.
#include <pybind11/pybind11.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#define CALM_FAST_STR_(x) #x
#define CALM_FAST_STR(x) CALM_FAST_STR_(x)

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "calm_fast CPU kernels for one vector ISA (registered with torch.ops.calm_fast)";
  module.attr("isa") = CALM_FAST_STR(CALM_FAST_CPU_ISA);
  module.def("num_threads", [] {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
  }, "OpenMP threads the CPU kernels use");
}

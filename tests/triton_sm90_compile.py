"""Compile the calm_fast Triton kernels for sm_90 (H100/H200) on a machine without a GPU.

Run as a script (tests/test_triton_compile.py does): it installs a driver that reports an
sm_90 target and makes every `kernel[grid](...)` launch compile without running, then calls
the real Python wrappers on CPU tensors, so the exact launch paths are compiled. Prints one
JSON line per compiled kernel: its name, whether a cubin came out, its 16-byte loads.
"""
import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


class Sm90CompileDriver:
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def is_active(self):
        return True

    def map_python_to_cpp_type(self, t):
        return t


def compile_instead_of_launch(self, grid):
    def launch(*args, **kwargs):
        kernel = self.run(*args, grid=grid, warmup=True, **kwargs)
        ptx = kernel.asm.get("ptx", "")
        print(json.dumps({"kernel": self.fn.__name__, "cubin": bool(kernel.asm.get("cubin")),
                          "vector_loads": ptx.count("ld.global.v4") + ptx.count("ld.global.L1::evict")}),
              flush=True)
    return launch


driver.set_active(Sm90CompileDriver())
JITFunction.__getitem__ = compile_instead_of_launch

from calm_fast._source_tree import import_subpackage  # noqa: E402

tk = import_subpackage("triton_kernels")

n = 1 << 16
for dtype in (torch.float32, torch.bfloat16):
    x = torch.randn(n).to(dtype)
    s = torch.randn(n)
    tk.mask_step_(s, x.clone(), x, x, None, 1.0, 1.0, "polarize")
    tk.mask_grad_sumsq(s, x, x)
    tk.masked_apply_(x.clone(), x, torch.zeros(n // 8, dtype=torch.uint8), "packed")
    tk.consensus_merge([x] * 8, [0.3] * 8, [0.1] * 8, "ties", 0)
    tk.entropy_argmax(torch.randn(64, 1000).to(dtype))
    tk.pack_mask(x)
    tk.magnitude_threshold([x], 10)
tk.unpack_mask(torch.zeros(n // 8, dtype=torch.uint8), n)
sys.exit(0)

"""Every Triton kernel compiles to sm_90 machine code, checked without a GPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
KERNELS = {"_mask_step_kernel", "_mask_grad_sumsq_kernel", "_masked_apply_kernel", "_consensus_merge_kernel", "_entropy_argmax_kernel",
           "_pack_kernel", "_unpack_kernel", "_radix_hist_kernel", "_radix_select_kernel"}
# The streaming kernels must read with 16-byte loads on aligned inputs (a scalar-load regression
# costs bandwidth silently). entropy_argmax reads rows of any length; unpack_mask reads bytes;
# the radix select reads one small histogram.
VECTORIZED = KERNELS - {"_entropy_argmax_kernel", "_unpack_kernel", "_radix_select_kernel"}


def test_triton_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("triton_sm90_compile.py")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    compiled = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert {c["kernel"] for c in compiled} == KERNELS, run.stdout
    assert all(c["cubin"] for c in compiled), compiled
    scalar = {c["kernel"] for c in compiled if c["kernel"] in VECTORIZED and c["vector_loads"] == 0}
    assert not scalar, f"no 16-byte loads in {sorted(scalar)}"

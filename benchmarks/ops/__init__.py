"""Microbenchmarks of the calm_fast ops: eager PyTorch vs torch.compile vs native vs Triton.

    python -m benchmarks.ops [--device cpu|cuda] [--sizes 16M ...] [--quick]
                             [--ops mask_step_ ...] [--variants eager native ...]
                             [--out benchmarks/results]        (also: calm-fast bench ...)

Per op and size it times
  eager    the research-code composition in benchmarks/ops/eager.py (separate kernels, temporaries)
  compile  torch.compile(eager fn) (default mode; compile time excluded: first call is warm-up)
  native   calm_fast op, backend="native" (torch.ops.calm_fast.*, C++/OpenMP or CUDA)
  triton   calm_fast op, backend="triton" (CUDA tensors only)
and reports the median time, GB/s under each op's minimal-traffic byte model (BYTE MODELS below),
that bandwidth as a fraction of a device copy measured in the same run, and the speedup over
eager measured in the same run. Before timing, every variant's output is checked against eager's
on the same inputs (column `check`).

Timing. CPU: time.perf_counter around each call after warm-up, median of >= 7 calls (more while
the per-row time budget lasts). GPU: CUDA events around each call after warm-up, a 256 MiB L2
flush before each call, median of >= 10 calls. When one input set would fit in the last-level
cache, several input sets are allocated and the calls rotate among them.

BYTE MODELS (bytes read + written per call, each input read once, each output written once;
es = element size of the op's tensors; N = elements):
  mask_step_      base=None: read S (4), theta, g, delta; write S (4), theta: N*(8 + 4*es)
                  (fp32: 24 B/elem, bf16 weights/grad/delta: 16 B/elem)
  mask_grad_sumsq read S (4), g, delta; write one scalar: N*(4 + 2*es)  (fp32: 12 B, bf16: 8 B)
  masked_apply_   hard: read theta, delta, S (4); write theta: N*(3*es + 4)  (fp32: 16 B)
                  packed: read theta, delta, N/8 mask bytes; write theta: N*3*es + N/8 (12.125 B)
  consensus_merge read T task vectors, write 1 merged: (T+1)*N*es  (T=8 fp32: 36 B/elem)
  magnitude_threshold  read every |x| once: N*es (radix passes that re-read are the kernel's cost)
  entropy_argmax  read B*C logits, write B fp32 entropies + B int64 indices: B*C*es + 12*B
  pack_mask       read N mask values, write ceil(N/8) bytes: N*es_in + ceil(N/8)
  unpack_mask     read ceil(N/8) bytes, write N bools: ceil(N/8) + N
Copy bandwidth: CPU dst.copy_(src) of 256 MiB fp32; GPU device-to-device copy of 1 GiB; counted as
bytes read + bytes written, measured at the start and at the end of the run; the larger is used.

Targets (printed, not asserted): GPU streaming ops (all but magnitude_threshold) >= 85 % of copy
bandwidth and >= 3x eager; magnitude_threshold >= 5x torch.topk over the concatenated |x|
(= its eager column); CPU native ops >= 2x eager (evaluated at the largest size of each case).

Outputs: <out>/ops_<device-slug>.json (rows + metadata) and <out>/ops_<device-slug>.md.
--quick shrinks every size (CI smoke test; runs in seconds) and, unless --out is given, writes to
benchmarks/results/quick/ so that it never overwrites a full run's results.

Modules: sizes.py (element counts, the ViT-like tensor list), cases.py (per op: inputs, call,
outputs, byte model; adding an op means one builder in its CASES table), eager.py (the eager
baselines), measure.py (check, then time one case), report.py (metadata, targets, markdown),
run.py (options and main). Timing, copy bandwidth and the writer are benchmarks/harness's.
"""
from .run import main  # noqa: E402,F401  (calm-fast bench)

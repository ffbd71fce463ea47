"""End-to-end CALM benchmark: the authors' data-movement scheme vs eager PyTorch on the device
vs calm_fast.merge, on an open_clip ViT visual tower with synthetic task vectors.

    python -m benchmarks.e2e --config cpu-small|vit-l|vit-h [--updates 5] [--variants a,b,c]
                             [--batch-size 64] [--tf32] [--autocast] [--delta-dtype bf16] ...

Configurations (every field can be overridden by its flag):
  cpu-small  ViT-B-32 visual tower at 64 px, batch 8, 3 updates per step, CPU: runs anywhere (CI
             runs a still smaller open_clip tower through tests/test_e2e_bench.py).
  vit-l      ViT-L-14 visual tower (304 M parameters) at 224 px, the authors' schedule: 8 tasks,
             6 merged by task arithmetic, 2 sequential steps x 100 updates x 2 batches of 128 per
             seen task. On one GPU. --updates N shortens it; the full schedule is projected.
  vit-h      ViT-H-14 visual tower (632 M), calm_fast only, bf16 δ and bf16 autocast: shows that a
             larger backbone completes on one GPU (--model ViT-bigG-14 --grad-checkpointing for the
             largest: at batch 128 its bf16 activations alone exceed 80 GB).

Workload: open_clip.create_model(model, pretrained=None).visual (random weights). Eight synthetic
"fine-tuned" copies θt = θ0 + τt with τt = small dense noise (noise x RMS of each tensor) plus a
few larger coordinated changes (rank-4 updates of a random ~6 % of the matrices, coord x RMS).
Frozen random CLIP-style heads (centered, normalized features against random unit class vectors,
logit scale 100). Unlabeled data: synthetic images (per-task class prototypes + noise).

Variants, side by side in one process, on the same weights, pseudo-labels and batches:
  (a) authors  benchmarks/e2e/authors_scheme.py: the authors' scripts' data movement (fp32 θ0, τ_merged,
               τ_new, S, G on the CPU; θ rebuilt and uploaded every update; per-batch gradient
               copies through the CPU), fp32 forward/backward as in the scripts.
  (b) eager    benchmarks/e2e/eager_gpu.py: the same algorithm in plain eager PyTorch, all state on the
               device, no fused ops.
  (c) calm_fast calm_fast.merge(method="calm", step="authors") so that all three run the same update
               rule (lr 1e7, polarizing term, gradients summed).
Pseudo-labels are computed once with calm_fast's own CB-EMS code (calm_fast.sampling), and (a) and
(b) replay calm_fast's batch sampler (same generator and seed): the script checks that (c) saw
exactly the same batch sequence, and that the binary masks of (b) and (c) agree.

Measured per variant: per update, forward/backward time and element-wise time (for (a):
everything else in the update, i.e. element-wise work plus host<->device transfers), total wall
time, peak device memory (torch.cuda.max_memory_allocated) against a probe of model + grads +
activations (two fwd/bwd of one batch), reported as a multiple of the parameter bytes, and peak
host RSS (sampled every 10 ms, and VmHWM after /proc/self/clear_refs where allowed).
(c)'s per-update split comes from calm_fast's own report (its phase timer synchronizes the device
at the end of each phase, as (a) and (b) do here). A short probe times calm_fast internals
that run every update (the fused mask-step sweep, the "normalized" step-size reduction, the
per-parameter dispatch overhead) to back the notes in the report.

Targets (printed, not asserted): element-wise work <= 5 % of an update; whole run >= 5x faster than
(a); extra device memory <= 2 x parameter bytes beyond model + grads + activations; the vit-h
configuration completes on one GPU.

Output: benchmarks/results/e2e_<device>.json and .md (<device> = cpu, or cuda-<gpu name>; a
configuration other than that device's default gets a _<config> suffix), with device, driver,
torch/triton/open_clip versions and the exact command.

CPU runs fix glibc's mmap threshold (--malloc-mmap-threshold, default 1 MiB on CPU): by default
glibc raises it after the first large free, and what (a) allocates and frees then leaves a heap
in which the forward/backward of the variants that follow runs up to 3x slower (measured on 2
cores: fwd/bwd per update 11.8 / 10.5 / 3.2 s for a, b, c in that order; 3.6 s for (b) run
after (c); 4.6 / 5.1 / 5.2 s with the threshold fixed). Fixed, every variant sees the same
allocator and the comparison is fair; CUDA runs use the caching allocator and are unaffected.

open_clip needs torchvision; beside a CPU torch, the matching torchvision wheel may be a CUDA build
whose compiled ops do not load (`operator torchvision::nms does not exist` on import).
benchmarks/open_clip_compat.py then defines the torchvision::nms / qnms schemas itself.

Modules: problem.py (the workload, pseudo-labels, batch replay), authors_scheme.py (a),
eager_gpu.py (b), variants.py ((c), running and summarizing each variant), measure.py (memory
windows, the probe, calm_fast internals), checks.py (checks, ratios, targets), report.py
(metadata, markdown), run.py (options and main); `python -m benchmarks.e2e` runs it.
"""

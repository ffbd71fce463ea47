"""How the cost grows: CALM's and the data-free merges' time and memory against the task count T,
the model size N and the unlabeled pool size, measured, fitted and plotted.

    python -m benchmarks.scaling [--quick] [--device cpu|cuda] [--sweeps tasks size pool] [--threads N]
                                 [--out DIR] [--name STEM] [--workdir DIR]
    python -m benchmarks.scaling --render benchmarks/results/scaling_cpu.json   # redo .md/.png only

Sweeps (open_clip visual towers, random weights, scaled down for a CPU: 32 px images, few layers):
  tasks  T in {2, 4, 8, 16} on the ViT-B-class tower, pool 64: CALM, task arithmetic, TIES, TALL
  size   towers S / B / L (ViT-S-16, ViT-B-16 at 4 layers, ViT-L-14 at 6 layers) at T = 4, pool 64
  pool   unlabeled images per task in {32, 64, 256, 1024} on the S tower at T = 4: CALM only
--quick: the sweep at its smallest size (one tiny tower, T = 2, pool 16, one point per method);
tests/test_scaling_bench.py runs it.

Workload: the pretrained tower and T synthetic fine-tuned copies (benchmarks/e2e/problem.py's
synthetic_finetuned: dense noise + rank-4 changes) are written as safetensors to a temporary
folder; every merge reads them lazily from those paths (CALM too, with model= the tower). CALM
runs the sequential framework with one task merged by task arithmetic and the other T - 1 added
one by one (so a run of T tasks has steps with 2 .. T seen tasks), 3 updates per step, 1 batch
of 8 per seen task, benchmarks/e2e's synthetic heads and images.

Each point runs in a fresh subprocess (`--child`): the peak RSS is the kernel's VmHWM after
resetting it (/proc/self/clear_refs) once imports, the tower, heads and pools are built, so it is
that point's alone; on a CPU each point runs at 1 thread (2 threads on 2 shared cores stalled
updates up to 10x whenever another job ran) and a step's update time is its fastest; glibc's mmap threshold is fixed at 1 MiB (as in benchmarks/e2e) so that freed
parameter-sized buffers go back to the OS. Reported per point: wall time per phase (CALM: calm_fast's
own report, per step and per update: forward/backward vs element-wise), peak RSS above that baseline
(file-backed pages of mapped checkpoints included) and peak device memory (CUDA), in bytes and as
multiples of P = the merged parameters' bytes. For CALM a probe (one forward/backward of one batch
on the same tower) gives model gradients + activations; "extra" = the merge's peak minus the probe.

Fits: least squares on log-log data (numpy), time ∝ T^a · N^b · pool^c per method, and per CALM
update ∝ seen^a · T^b over every step; memory against T also as a straight line (P per task).
Claims checked with the numbers (see `claims` in the JSON and the markdown):
  1. CALM's extra memory does not grow with T (two parameter-sized buffers, S and δ, whatever T);
  2. a streamed data-free merge peaks at about one model + T parameters, not T models;
  3. CALM's time per update grows with the number of seen tasks and not with T otherwise.

Output: benchmarks/results/scaling_<device>.json, .md and .png (<device> = cpu or cuda-<gpu>).

Modules: workload.py (towers, sweeps, checkpoints), point.py (one point in a fresh process),
fits.py (multiples of P, fits, claims, notes), report.py (metadata, markdown, writing), plot.py
(the figure), run.py (options and main).
"""

"""Start the ranks of a distributed test worker as processes on this machine (gloo, a file store), and
what a rank reports back: its answer (write_found) and the gloo threads it left running."""
from __future__ import annotations

import json
import os
import subprocess
import sys


def start_ranks(worker, world, mode, tmp_path, *args, timeout_s=20, wait_for=None, wait_s=180, name=None):
    """Start `world` ranks of `worker`; wait for the ranks in `wait_for` (all by default), kill
    the others. Each rank gets RANK, WORLD_SIZE and CALM_FAST_TEST_TIMEOUT (the process group's
    timeout, seconds) and one thread. Returns rank -> (exit code, output, the JSON the rank
    wrote or None)."""
    name = name or mode
    out = tmp_path / f"{name}-results"
    out.mkdir()
    env = {**os.environ, "WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1", "CALM_FAST_TEST_TIMEOUT": str(timeout_s)}
    # -X faulthandler: a rank killed by a signal (an abort in C++) prints where its threads were
    command = [sys.executable, "-X", "faulthandler", str(worker), mode, str(tmp_path / f"{name}.store"), str(out),
               *map(str, args)]
    procs = [subprocess.Popen(command, env={**env, "RANK": str(rank)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in range(world)]
    results = {}
    try:
        for rank in (range(world) if wait_for is None else wait_for):
            output, _ = procs[rank].communicate(timeout=wait_s)
            path = out / f"rank{rank}.json"
            results[rank] = (procs[rank].returncode, output, json.loads(path.read_text()) if path.exists() else None)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def write_found(out, found) -> None:
    """A rank's answer, where start_ranks reads it (in the rank's process, RANK from its environment)."""
    with open(os.path.join(out, f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump(found, f)
    sys.stdout.flush()


def gloo_threads() -> list[str]:
    """Names of this process's threads that belong to gloo (its run loops, its TCP loop): none is
    left once the process group is destroyed, unless something still holds the group."""
    names = (open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
    return sorted(name for name in names if "gloo" in name)


def finished(results, rank=0):
    code, output, found = results[rank]
    assert code == 0 and found is not None, f"rank {rank} exited {code}:\n{output}"
    return found

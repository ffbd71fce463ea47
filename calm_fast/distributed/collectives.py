"""Collectives that fail loudly: every rank raises the same clear error, none waits forever.

Three ways a distributed merge can go wrong, and what each becomes here:
- a rank raises in its own work (a NaN in its keys, a missing file): the work runs inside
  `run_checked`/`gather_checked`, whose one all_gather carries the error, so every rank raises
  a DistributedMergeError naming the failing rank(s) and their errors at once;
- ranks disagree (different inputs, config or seed): `agree` all_gathers the fields that must
  match and every rank raises, naming the rank and the field that differs;
- a rank dies or hangs: the next collective fails, on a closed connection or at the process
  group's timeout (`init_process_group(timeout=...)`), and `collective` turns that into a
  DistributedMergeError naming this rank, the step, and the ranks that never reached it.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
import torch.distributed as dist


class DistributedMergeError(RuntimeError):
    """A rank failed, died, timed out or disagrees with the others; the message says which."""


def comm_device(group=None) -> torch.device:
    """Where a collective's tensors must live: gloo moves CPU tensors, NCCL CUDA ones."""
    if dist.get_backend(group) == "gloo":
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


_calls = itertools.count()  # calm_fast collectives this process entered: in lockstep, equal on every rank


def _store():
    """The process group's rendezvous store. It outlives broken gloo/NCCL connections, so it can
    tell which rank fell behind; torch keeps it private, hence None where it is not there."""
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:
        return None


def _stragglers(store, call: int, group) -> str:
    """Which ranks never entered collective number `call`, from what each last wrote to the store."""
    behind = []
    try:
        for peer in dist.get_process_group_ranks(group):
            key = f"calm_fast/progress/{peer}"
            seen, last = store.get(key).decode().split("\n", 1) if store.check([key]) else ("-1", "none")
            if int(seen) < call:
                behind.append(f"rank {peer} never got there (its last collective: {last})")
    except Exception:  # the store went down with the rank that hosted it
        return "another rank exited, crashed or did not answer within the process group's timeout"
    return "; ".join(behind) or "every rank got there; one exited or stopped answering inside it"


def collective(what: str, fn: Callable, group=None):
    """fn(), one collective call. A peer that exited or did not answer within the process group's
    timeout becomes a DistributedMergeError naming this rank, the step, and the ranks that never
    reached it (each rank records its progress in the store as it enters a collective)."""
    store, call = _store(), next(_calls)
    if store is not None:
        store.set(f"calm_fast/progress/{dist.get_rank()}", f"{call}\n{what}")
    try:
        return fn()
    except DistributedMergeError:
        raise
    except RuntimeError as exc:  # DistBackendError, gloo's "Connection closed by peer", timeouts
        raise lost_peer(what, exc, call, group) from exc


def lost_peer(what: str, exc: Exception, call: int | None = None, group=None) -> DistributedMergeError:
    """The error for a collective that failed in `what` (calm_fast's collective number `call`, or
    one of torch's own, FSDP's, after the last of ours): this rank, the step, and which ranks
    fell behind, from what each last wrote to the store."""
    store = _store()
    call = next(_calls) - 1 if call is None else call
    who = _stragglers(store, call, group) if store is not None else "another rank exited or hung"
    return DistributedMergeError(f"calm_fast: rank {dist.get_rank(group)}: {what}: the collective failed: "
                                 f"{who} ({exc})")


def gather_objects(obj, what: str, group=None) -> list:
    """Every rank's `obj` (picklable, small), in rank order."""
    out = [None] * dist.get_world_size(group)
    collective(what, lambda: dist.all_gather_object(out, obj, group=group), group)
    return out


def gather_checked(what: str, fn: Callable, group=None) -> list:
    """fn() on every rank, then one all_gather of the outcomes: every rank's result, in rank order,
    or, if any rank raised, a DistributedMergeError on every rank naming the failing ranks and
    their errors. A DistributedMergeError from inside fn is already collective: it passes through."""
    local_error = None
    try:
        outcome = (None, fn())
    except DistributedMergeError:
        raise
    except Exception as exc:
        local_error, outcome = exc, (f"{type(exc).__name__}: {exc}", None)
    outcomes = gather_objects(outcome, what, group)
    failed = [f"rank {rank}: {error}" for rank, (error, _) in enumerate(outcomes) if error is not None]
    if failed:
        raise DistributedMergeError(f"calm_fast: {what} failed on " + "; ".join(failed)) from local_error
    return [result for _, result in outcomes]


def run_checked(what: str, fn: Callable, group=None):
    """fn()'s result on this rank, after gather_checked's error exchange (only errors travel).
    Wrap the local work before a collective in it, so a rank's failure stops the others at once
    rather than at the timeout."""
    result = []
    gather_checked(what, lambda: result.append(fn()), group)
    return result[0]


def _difference(mine, theirs) -> str:
    if isinstance(mine, list) and isinstance(theirs, list):
        for i, (a, b) in enumerate(zip(mine, theirs)):
            if a != b:
                return f"entry {i}: {b!r} vs {a!r}"
        return f"{len(theirs)} entries vs {len(mine)}"
    return f"{theirs!r} vs {mine!r}"


def agree(fields: dict, what: str, group=None) -> None:
    """Raise on every rank unless every rank passed equal `fields` (small picklable values; lists
    are compared entry by entry). The error names each differing rank, field and value against
    rank 0's."""
    everyone = gather_checked(f"{what}: agreement check", lambda: fields, group)
    names = list(dict.fromkeys(name for theirs in everyone for name in theirs))
    differences = [f"rank {rank} differs from rank 0 in {name!r}: "
                   f"{_difference(everyone[0].get(name), theirs.get(name))}"
                   for rank, theirs in enumerate(everyone) for name in names
                   if theirs.get(name) != everyone[0].get(name)]
    if differences:
        raise DistributedMergeError(f"calm_fast: {what}: ranks disagree: " + "; ".join(differences))


def normalized_step_size(local_sumsq: torch.Tensor, local_count: int, step_size: float, group=None) -> float:
    """CALM's normalized step (calm_fast.calm.step_size) over parameter shards: step_size / RMS of
    the logit step's gradient term. Each rank passes its Σ(g·δ·σ'(S))² over its shards (the fp32
    sum of ops.mask_grad_sumsq) and how many scalars that covered; one all_gather of the pair.
    The sums are added in rank order in fp32, not by an all-reduce whose order is the backend's:
    every rank takes the same step, and one rank gives the single-process value bit for bit."""
    pair = torch.stack([local_sumsq.detach().to(torch.float64).reshape(()),
                        torch.tensor(float(local_count), dtype=torch.float64, device=local_sumsq.device)])
    pair = pair.to(comm_device(group))
    parts = [torch.empty_like(pair) for _ in range(dist.get_world_size(group))]
    collective("normalized step: sum of squares", lambda: dist.all_gather(parts, pair, group=group), group)
    count = sum(int(p[1]) for p in parts)
    if count == 0:
        return 0.0
    total = parts[0][0].float()
    for p in parts[1:]:
        total = total + p[0].float()
    rms = (total / count).sqrt().item()
    return step_size / rms if rms > 0 else 0.0

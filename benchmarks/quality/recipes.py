"""The fixed sizes of the benchmark. Every number that shapes a result is here and is
written into the results JSON; the fine-tuning part also keys the checkpoint cache."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace


BAR_KEEP = 0.92  # CALM should keep this fraction of the individual models' accuracy
BAR_MARGIN = 0.10  # ... and beat TIES and task arithmetic by this many normalized points


@dataclass(frozen=True)
class FineTune:
    """How each task's model is fine-tuned from the ImageNet EfficientNet-Lite0 (once per task)."""

    image_size: int = 64  # inputs resized (bilinear) to image_size x image_size, 3 channels
    train_examples: int | None = 1024  # per task, class-balanced subset of the train split; None: all
    epochs: int = 3
    batch_size: int = 64
    backbone_lr: float = 1e-4  # Adam; lr 1e-3 collapses the fine-tuned models to chance
    head_lr: float = 1e-2  # the linear head, trained jointly, then frozen for merging
    weight_decay: float = 0.0
    batchnorm: str = "eval"  # BatchNorm statistics frozen at ImageNet values (and no dropout)
    augment: str = "none"
    seed: int = 0

    def key(self) -> str:
        """Cache key: a hash of the recipe, of the split definition and of the weights."""
        from .data import SPLIT_SEED, UNLABELED_PER_CLASS

        payload = {"recipe": asdict(self), "split_seed": SPLIT_SEED, "unlabeled": UNLABELED_PER_CLASS,
                   "weights": "efficientnet-lite0-57934424", "version": 1}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Evaluation:
    test_examples: int | None = 500  # per task, class-balanced subset of the test split; None: all
    unlabeled_examples: int | None = 500  # per task, the honest unlabeled split; None: all of it
    batch_size: int = 256


@dataclass(frozen=True)
class CALMBudget:
    """The CALM loop's size. The authors' values are 100 updates x 2 batches of 128 per seen
    task; the CI size shrinks the loop to fit 2 CPU cores, everything else stays default."""

    updates: int = 100
    batches_per_task: int = 2
    batch_size: int = 128


@dataclass(frozen=True)
class Recipe:
    name: str
    finetune: FineTune = field(default_factory=FineTune)
    evaluation: Evaluation = field(default_factory=Evaluation)
    calm: CALMBudget = field(default_factory=CALMBudget)
    seed: int = 0  # merge seed (CALM's batch sampling)

    def to_dict(self) -> dict:
        return asdict(self)


RECIPES = {
    # 2 CPU cores, a few minutes including fine-tuning: the pilot's fine-tuning recipe, test and
    # unlabeled subsets of 500 per task, CALM's loop shrunk to 12 updates x 1 batch of 64.
    "ci": Recipe("ci", FineTune(), Evaluation(test_examples=500, unlabeled_examples=500),
                 CALMBudget(updates=12, batches_per_task=1, batch_size=64)),
    # The CPU's stand-in for `full` (about 40 min on 2 cores): full training splits and full test
    # splits, so the individual models and their task vectors are as strong as at full size, but
    # at the CI's 64x64 inputs and CALM loop. For measuring what stronger models do to merging.
    "mid": Recipe("mid", FineTune(train_examples=None), Evaluation(test_examples=None, unlabeled_examples=None),
                  CALMBudget(updates=12, batches_per_task=1, batch_size=64)),
    # Full training splits, 128x128 inputs, full test splits, the authors' CALM loop (GPU).
    "full": Recipe("full", FineTune(image_size=128, train_examples=None, epochs=3, batch_size=128),
                   Evaluation(test_examples=None, unlabeled_examples=None), CALMBudget()),
}


def get(name: str, **overrides) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown size {name!r}; one of {sorted(RECIPES)}")
    return replace(RECIPES[name], **overrides) if overrides else RECIPES[name]

"""The merge methods, one module each behind methods.base.MergeMethod; merge(), check(), the CLI
and the YAML config find them here by name. Adding a method (DARE, say) is one new module and
one line in METHODS."""
from .average import Average
from .base import Merged, MergeInputs, MergeMethod
from .calm import CALM
from .consensus import Consensus
from .data_free import DataFreeMethod
from .task_arithmetic import TaskArithmetic
from .ties import TIES

METHODS: dict[str, MergeMethod] = {m.name: m for m in (CALM(), Average(), TaskArithmetic(), TIES(), Consensus())}
DATA_FREE = tuple(name for name, m in METHODS.items() if not m.needs_data)


def get(name: str) -> MergeMethod:
    """The registered method called `name`; ValueError naming the choices otherwise."""
    if name not in METHODS:
        raise ValueError(f"calm_fast: unknown method {name!r}; one of {tuple(METHODS)}")
    return METHODS[name]


__all__ = ["DATA_FREE", "METHODS", "DataFreeMethod", "Merged", "MergeInputs", "MergeMethod", "get"]

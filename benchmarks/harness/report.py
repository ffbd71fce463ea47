"""The results writer: JSON + markdown beside each other, each written atomically."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch


def write_atomic(path: Path, text: str) -> None:
    """path gets text whole or not at all (a run cut short leaves the previous file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def json_default(o):
    """Tensors as lists, dtypes and devices as their names."""
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (torch.dtype, torch.device)):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def write_results(out, stem: str, payload: dict, markdown: str, indent: int = 2) -> tuple[Path, Path]:
    """<out>/<stem>.json and <out>/<stem>.md; returns their paths."""
    out = Path(out)
    paths = out / f"{stem}.json", out / f"{stem}.md"
    write_atomic(paths[0], json.dumps(payload, indent=indent, default=json_default) + "\n")
    write_atomic(paths[1], markdown)
    return paths


def table_header(columns: list[str], align: str = "") -> list[str]:
    """A markdown table's header and rule; align: one character per column, "r" for right."""
    rule = "|" + "".join("---:|" if a == "r" else "---|" for a in align.ljust(len(columns)))
    return ["| " + " | ".join(columns) + " |", rule]

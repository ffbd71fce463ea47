"""Element counts and shapes of the op benchmark: parsing, printing, and a ViT-like tensor list."""
from __future__ import annotations

import argparse
import math
import re

VIT_L14_VISUAL = 303_966_208  # CLIP ViT-L/14 visual tower parameters


def parse_count(text: str) -> int:
    """'16M' -> 16 * 2**20, '1e6' -> 1000000, '303966208' -> 303966208 (K/M/G are binary)."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgG]?)i?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not an element count: {text!r}")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def parse_shape(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\w+)\s*[xX*,]\s*(\w+)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a BxC shape: {text!r}")
    return parse_count(m.group(1)), parse_count(m.group(2))


def human(n: int) -> str:
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= scale and n % (scale // 16) == 0:
            v = n / scale
            return f"{v:g}{unit}"
    return f"{n:,}"


def vit_like_shapes(total: int) -> list[tuple[int, ...]]:
    """Parameter shapes of a CLIP-ViT-like visual tower (24 blocks, 294 tensors) summing to `total`.

    total == 303,966,208 gives exactly ViT-L/14's visual tower (width 1024, patch 14, proj 768).
    Otherwise the width is scaled down and the last tensor (proj) absorbs the remainder.
    """
    def shapes(d: int, proj: int | None) -> list[tuple[int, ...]]:
        h = 4 * d
        out = [(d, 3, 14, 14), (d,), (257, d), (d,), (d,)]
        for _ in range(24):
            out += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (h, d), (h,), (d, h), (d,)]
        out += [(d,), (d,)]
        if proj is not None:
            out.append((proj,))
        return out

    def count(shs):
        return sum(math.prod(s) for s in shs)

    if total == VIT_L14_VISUAL:
        return shapes(1024, None) + [(1024, 768)]
    best = None
    d = 8
    while count(shapes(d, None)) + 1 <= total:
        best = d
        d += 8
    if best is None:  # too small for even width 8: split evenly into up to 294 pieces
        pieces = max(1, min(294, total))
        base, extra = divmod(total, pieces)
        return [(base + (1 if i < extra else 0),) for i in range(pieces)]
    body = shapes(best, None)
    return body + [(total - count(body),)]

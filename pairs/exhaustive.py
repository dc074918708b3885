"""All N(N-1)/2 pairs: the right choice for small collections."""

from __future__ import annotations

from collections.abc import Sequence


def exhaustive_pairs(names: Sequence[str]) -> list[tuple[str, str]]:
    names = list(names)
    return [(names[i], names[j]) for i in range(len(names)) for j in range(i + 1, len(names))]

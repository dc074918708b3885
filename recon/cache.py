"""A least-recently-used cache under a byte budget, for the per-image data that pair loops revisit
(features in the match stage, decoded images in the dense stage)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

import numpy as np

Value = TypeVar("Value")


def nbytes(value) -> int:
    """Bytes held by an array or a dict of arrays."""
    if isinstance(value, dict):
        return sum(np.asarray(v).nbytes for v in value.values())
    return np.asarray(value).nbytes


class ByteBudgetCache(Generic[Value]):
    def __init__(self, load: Callable[[str], Value], max_bytes: int, min_items: int = 2):
        self.load, self.max_bytes, self.min_items = load, max_bytes, min_items
        self.bytes = 0
        self.items: OrderedDict[str, Value] = OrderedDict()

    def __getitem__(self, name: str) -> Value:
        if name in self.items:
            self.items.move_to_end(name)
            return self.items[name]
        value = self.load(name)
        self.items[name] = value
        self.bytes += nbytes(value)
        # Keep at least the two members of the current pair, whatever their size.
        while self.bytes > self.max_bytes and len(self.items) > self.min_items:
            _, evicted = self.items.popitem(last=False)
            self.bytes -= nbytes(evicted)
        return value

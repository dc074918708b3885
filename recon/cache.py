"""Least-recently-used caches under byte budgets, for the per-image data that pair loops revisit (features in the
match stage, images and encoder features in the dense stage).

`ByteBudgetCache` keeps values in one memory. `SpillCache` has two tiers, for encodings that live on a GPU: the
newest values stay on the device up to a budget, older ones are moved to host memory (spill-over) up to a second
budget and moved back when a pair asks for them again, so an image is encoded once per stage as long as the two
budgets together hold the images a pair loop revisits; copying a RoMa encoding back to the device costs a small
fraction of encoding the image again (a few hundred MB over PCIe against a VGG + DINOv2 pass).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

import numpy as np

Value = TypeVar("Value")


def _array_bytes(value) -> int:
    if hasattr(value, "element_size") and hasattr(value, "nelement"):  # a torch tensor, on any device
        return value.element_size() * value.nelement()
    return np.asarray(value).nbytes


def nbytes(value) -> int:
    """Bytes held by an array or tensor, or a dict of them."""
    if isinstance(value, dict):
        return sum(_array_bytes(v) for v in value.values())
    return _array_bytes(value)


class _Tier:
    """One LRU memory under a byte budget; `push` returns the values it had to let go, oldest first."""

    def __init__(self, max_bytes: int, min_items: int):
        self.max_bytes, self.min_items = max_bytes, min_items
        self.bytes = 0
        self.items: OrderedDict[str, object] = OrderedDict()

    def push(self, name: str, value) -> list[tuple[str, object]]:
        self.items[name] = value
        self.bytes += nbytes(value)
        evicted = []
        while self.bytes > self.max_bytes and len(self.items) > self.min_items:
            old, old_value = self.items.popitem(last=False)
            self.bytes -= nbytes(old_value)
            evicted.append((old, old_value))
        return evicted

    def pop(self, name: str):
        value = self.items.pop(name)
        self.bytes -= nbytes(value)
        return value


class ByteBudgetCache(Generic[Value]):
    def __init__(self, load: Callable[[str], Value], max_bytes: int, min_items: int = 2):
        self.load = load
        # Keep at least the two members of the current pair, whatever their size.
        self.tier = _Tier(max_bytes, min_items)

    @property
    def bytes(self) -> int:
        return self.tier.bytes

    @property
    def items(self) -> OrderedDict:
        return self.tier.items

    def __getitem__(self, name: str) -> Value:
        if name in self.tier.items:
            self.tier.items.move_to_end(name)
            return self.tier.items[name]
        value = self.load(name)
        self.tier.push(name, value)
        return value


class SpillCache(Generic[Value]):
    """Two-tier LRU (module docstring): `device_bytes` of the newest values, then `host_bytes` of spilled ones
    (`spill` moves a value to the host, `unspill` back). The `min_items` newest stay on the device whatever their
    size (the two images of the current pair). Counts `loads`, `spills` and `unspills` (for tests and benchmarks)."""

    def __init__(self, load: Callable[[str], Value], device_bytes: int, host_bytes: int,
                 spill: Callable[[Value], Value], unspill: Callable[[Value], Value], min_items: int = 2):
        self.load, self.spill, self.unspill = load, spill, unspill
        self.device, self.host = _Tier(device_bytes, min_items), _Tier(host_bytes, 0)
        self.loads = self.spills = self.unspills = 0

    def __getitem__(self, name: str) -> Value:
        if name in self.device.items:
            self.device.items.move_to_end(name)
            return self.device.items[name]
        if name in self.host.items:
            value = self.unspill(self.host.pop(name))
            self.unspills += 1
        else:
            value = self.load(name)
            self.loads += 1
        for old, old_value in self.device.push(name, value):
            if self.host.max_bytes > 0:
                self.spills += 1
                self.host.push(old, self.spill(old_value))  # what the host budget cannot hold is dropped
        return value

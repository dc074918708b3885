"""Pairs for ordered frames (video): each frame with the next `overlap` frames, optionally with
quadratic overlap (frames i+1, i+2, i+4, i+8 ... as COLMAP's sequential matcher offers), plus loop-closure
candidates supplied by retrieval for every `loop_every`-th frame.

Frames are ordered by name (natural sort, so frame2 < frame10), per sub-folder when `per_folder`.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence

from .io import deduplicate


def natural_key(name: str) -> list[int | str]:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def sequential_pairs(
    names: Sequence[str],
    overlap: int = 10,
    quadratic: bool = False,
    per_folder: bool = True,
    loop_candidates: Mapping[str, Sequence[str]] | None = None,
    loop_every: int = 1,
) -> list[tuple[str, str]]:
    """`loop_candidates[name]` lists retrieval neighbours; only every `loop_every`-th frame uses them."""
    sequences: dict[str, list[str]] = defaultdict(list)
    for name in names:
        folder = name.rsplit("/", 1)[0] if (per_folder and "/" in name) else ""
        sequences[folder].append(name)
    steps = set(range(1, overlap + 1))
    if quadratic:
        steps |= {2**k for k in range(overlap)}
    pairs = []
    ordered: list[str] = []
    for folder in sorted(sequences):
        frames = sorted(sequences[folder], key=natural_key)
        ordered += frames
        for i, frame in enumerate(frames):
            for step in sorted(steps):
                if i + step < len(frames):
                    pairs.append((frame, frames[i + step]))
    if loop_candidates:
        for index, frame in enumerate(ordered):
            if index % max(loop_every, 1) == 0:
                pairs += [(frame, other) for other in loop_candidates.get(frame, ())]
    return deduplicate(pairs)

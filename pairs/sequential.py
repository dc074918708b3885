"""Pairs for ordered frames (video), with COLMAP's sequential-matcher semantics.

For frame i of a sequence: frames i+1 … i+overlap, plus with `quadratic` frames i+2^k for k = 0 … overlap-1
(COLMAP's `quadratic_overlap`, on by default there and here). Loop closure: every `loop_every`-th frame
(indices 0, L, 2L, … as COLMAP's `loop_detection_period`) is paired with its retrieval neighbours from the whole
collection; COLMAP takes them from a vocabulary tree, we take them from global descriptors (see pairs.planner).

Two deliberate differences from COLMAP, both for folders of frames that COLMAP users meet:
- Frames are ordered by natural sort (frame2 < frame10); COLMAP sorts names as plain strings, which is the
  same for zero-padded names and wrong for unpadded ones.
- With `per_folder`, each sub-folder is its own sequence (cam0/…, cam1/…), so the window never links the last
  frame of one camera to the first frame of the next; indices for `loop_every` count within each sequence.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence

from feature_backends.errors import InputError

from .io import deduplicate


def natural_key(name: str) -> list[int | str]:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def ordered_sequences(names: Sequence[str], per_folder: bool = True) -> list[list[str]]:
    """The frames of each sequence in temporal order; sequences ordered by folder name."""
    sequences: dict[str, list[str]] = defaultdict(list)
    for name in names:
        folder = name.rsplit("/", 1)[0] if (per_folder and "/" in name) else ""
        sequences[folder].append(name)
    return [sorted(sequences[folder], key=natural_key) for folder in sorted(sequences, key=natural_key)]


def window_steps(overlap: int, quadratic: bool) -> list[int]:
    if overlap < 1:
        raise InputError("--overlap must be at least 1")
    steps = set(range(1, overlap + 1))
    if quadratic:
        steps |= {2**k for k in range(overlap)}
    return sorted(steps)


def loop_frames(names: Sequence[str], loop_every: int, per_folder: bool = True) -> list[str]:
    """Frames that query retrieval for loop closure: indices 0, L, 2L, … of each sequence."""
    if loop_every < 1:
        raise InputError("--loop-every must be at least 1")
    return [frame for frames in ordered_sequences(names, per_folder) for frame in frames[::loop_every]]


def sequential_pairs(
    names: Sequence[str],
    overlap: int = 10,
    quadratic: bool = True,
    per_folder: bool = True,
    loop_candidates: Mapping[str, Sequence[str]] | None = None,
    loop_every: int = 10,
) -> list[tuple[str, str]]:
    """Window pairs, then `loop_candidates[frame]` for each loop frame (see `loop_frames`), de-duplicated."""
    steps = window_steps(overlap, quadratic)
    pairs = []
    for frames in ordered_sequences(names, per_folder):
        for i, frame in enumerate(frames):
            pairs += [(frame, frames[i + step]) for step in steps if i + step < len(frames)]
    if loop_candidates:
        for frame in loop_frames(names, loop_every, per_folder):
            pairs += [(frame, other) for other in loop_candidates.get(frame, ())]
    return deduplicate(pairs)

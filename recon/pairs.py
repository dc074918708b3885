"""The pairs stage: images in, hloc's pairs.txt out (with pairs-stats.json and, for retrieval, global-feats.h5).

`plan_pairs(image_dir, pairs_path, options)` plans with pairs.planner (exhaustive, sequential + loop closure,
retrieval, spatial; "auto" picks exhaustive up to `exhaustive_max_images` and retrieval above) and writes the
pairs file, its statistics next to it, and the global descriptors beside it (`global-feats.h5`, hloc's name).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from feature_backends.images import list_images
from pairs.planner import PairOptions, PairPlan, plan, write_plan

__all__ = ["PairOptions", "plan_pairs"]


def plan_pairs(image_dir: str | Path, pairs_path: str | Path, options: PairOptions | None = None,
               image_list: Sequence[str] | None = None, device: Any = None,
               global_features_path: str | Path | None = None, executor=None) -> PairPlan:
    """Write `pairs_path` (and `<stem>-stats.json`); returns the plan (method chosen, pairs, counts per source).
    `executor` (recon.executor.ExecutorOptions): where the retrieval descriptors are computed."""
    pairs_path = Path(pairs_path)
    names = list_images(image_dir, image_list)
    descriptors = Path(global_features_path) if global_features_path else pairs_path.parent / "global-feats.h5"
    pairs_plan = plan(image_dir, names, options or PairOptions(), descriptors, device, executor)
    write_plan(pairs_plan, pairs_path)
    return pairs_plan

"""MINIMA's LightGlue (Ren et al., "MINIMA: Modality Invariant Image Matching", CVPR 2025) for SuperPoint features.

`recon run --features superpoint --matcher minima-lightglue`. MINIMA fine-tuned SuperPoint+LightGlue on its
synthetic multi-modal data (RGB paired with infrared, depth, event, normal, sketch and paint renderings) and
released only the matcher: `minima_lightglue.pth`, loaded by MINIMA's `load_sp_lg` into cvg's
`LightGlue(features="superpoint")` after renaming the legacy `self_attn.<i>` / `cross_attn.<i>` keys, with
`strict=False`. The architecture is therefore LightGlue's SuperPoint configuration, and the file goes through
feature_backends.lightglue's renaming (legacy keys, a leading `matcher.`) and strict loading; that the file is a
flat state dict with no other nesting is inferred from MINIMA's loader, which would otherwise silently keep cvg's
weights (a file of another layout is refused here with the keys it lacks).

MINIMA's settings: LightGlue's defaults (filter threshold 0.1, depth 0.95, width 0.99), the same as recon's. Its
extractor is cvg's SuperPoint with LightGlue's defaults (2048 keypoints, NMS radius 4, threshold 0.0005, longer side
1024), which differ from recon's `superpoint` defaults (hloc's): to reproduce MINIMA's pipeline use `--features
superpoint --conf max_keypoints=2048 --conf nms_radius=4 --conf detection_threshold=0.0005`. No SHA-256 is
published.
Licence: Apache-2.0 for MINIMA; the SuperPoint weights it runs on are MagicLeap's (non-commercial).
"""

from __future__ import annotations

from typing import Any, ClassVar

from .lightglue import LightGlue
from .weights import WeightFile

MINIMA_LIGHTGLUE = WeightFile(
    "minima_lightglue.pth", "https://github.com/LSXI7/storage/releases/download/MINIMA/minima_lightglue.pth",
    note="MINIMA's LightGlue for SuperPoint (legacy key names)",
)


class MinimaLightGlue(LightGlue):
    default_conf = {"features": "superpoint"}
    weight_table: ClassVar[dict[str, WeightFile]] = {"superpoint": MINIMA_LIGHTGLUE}
    weight_files: ClassVar[dict[str, Any]] = {"minima": (MINIMA_LIGHTGLUE,)}

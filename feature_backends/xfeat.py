"""XFeat (Potje et al., CVPR 2024) through kornia's `kornia.feature.XFeat`: sparse XFeat, semi-dense XFeat* and
XFeat's LighterGlue matcher, with recon's weight handling.

- `xfeat` (features): kornia's `detectAndCompute` (keypoints are strict maxima of the 5x5 window of the keypoint
  heatmap above 0.05, scored by heatmap x reliability; 64-d L2-normalised descriptors sampled bicubically).
  Defaults are those of XFeat's MegaDepth-1500 evaluation: 4096 keypoints, longer side 1200, sides floored to a
  multiple of 32 (recon resizes once, so kornia's own /32 resize is the identity and keypoints are integer pixels
  of the resized image, hloc's convention). Match with `mnn` (XFeat's own matcher is plain mutual NN, cosine
  threshold off: `--matcher-conf ratio_threshold=null`) or `lighterglue`.
- `lighterglue` (matcher): kornia's LightGlue in its `xfeat` configuration (64-d input, 96-d model, 6 layers,
  1 head), with `xfeat-lighterglue.pt` loaded strictly through feature_backends.lightglue (its `matcher.` prefix
  stripped as verlab's and kornia's loaders do); verlab's settings: filter threshold 0.1, no early stopping, point
  pruning 0.95.
- `xfeat-star` (dense): XFeat*'s coarse-to-fine matching. It is a *dense* backend in quantised mode, not a
  features + matcher pair, because its output is not a match between fixed per-image keypoints: each match moves
  the point of image 0 by an offset predicted from *both* descriptors (the fine matcher), so the same coarse
  feature lands on different sub-pixel positions in different pairs. hloc's layout can only hold it the way it
  holds LoFTR's matches, by quantising matched points into per-image keypoints (recon.dense). There is no warp, so
  anchored mode (FEATURES+xfeat-star) is refused. Per image, `encode` runs kornia's `detectAndComputeDense` (10000
  features over two scales, 0.6x and 1.3x, as XFeat's MegaDepth evaluation); per pair, mutual nearest neighbours on
  the raw coarse descriptors (feature_backends.nearest_neighbor, in bounded memory, where kornia's `_batch_match`
  builds the full 10000 x 10000 matrix), then the fine matcher's offset and confidence as kornia's
  `match_xfeat_star` computes them; own code here only because kornia returns no confidence, which recon keeps as
  the match score. Matches with confidence <= 0.25 are dropped (XFeat's threshold).

One checkpoint, `xfeat.pt` (verlab's release; kornia's `XFeat.from_pretrained` loads the same file), holds the
backbone, both heads and the fine matcher; it is loaded strictly into kornia's `XFeatModel`. No official SHA-256 is
published. XFeat's evaluation feeds 0-255 images where recon feeds 0-1; the network instance-normalises its input,
so this changes the outputs only through the norm's epsilon (kornia measures at most 1 keypoint of 2048).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from kornia.feature import XFeat as KorniaXFeat

from .base import Conf, DenseMatcher, LocalFeatures
from .errors import ConfigError
from .images import resize_image
from .lightglue import LightGlue
from .nearest_neighbor import mutual_nearest_neighbors
from .weights import WeightFile, load_checkpoint, load_state_dict_strict

_VERLAB = "https://github.com/verlab/accelerated_features/raw/main/weights"
XFEAT = WeightFile("xfeat.pt", f"{_VERLAB}/xfeat.pt", note="XFeat backbone, heads and XFeat* fine matcher")
XFEAT_LIGHTERGLUE = WeightFile("xfeat-lighterglue.pt", f"{_VERLAB}/xfeat-lighterglue.pt",
                               note="LighterGlue for XFeat (LightGlue, 6 layers, 96-d)")
ALL_KEYPOINTS = 1 << 30


def build_xfeat(explicit: str | None, device: torch.device, detection_threshold: float = 0.05) -> KorniaXFeat:
    """kornia's XFeat, randomly initialised, then `xfeat.pt` loaded strictly; eval mode on `device`."""
    model = KorniaXFeat(detection_threshold=detection_threshold)
    load_state_dict_strict(model.net, load_checkpoint(XFEAT, explicit), XFEAT.filename)
    return model.eval().to(device)


class XFeat(LocalFeatures):
    default_conf = {
        "weights": None,  # explicit path to xfeat.pt
        "max_keypoints": 4096,
        "resize_max": 1200,
        "detection_threshold": 0.05,
    }
    size_multiple = 32
    descriptor_family = "xfeat"
    weight_files: ClassVar[dict[str, Any]] = {"xfeat": (XFEAT,)}

    def _init(self, conf: Conf) -> None:
        self.model = build_xfeat(conf.weights, self.device, conf.detection_threshold)

    def _extract(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.model.detectAndCompute(image, top_k=self.conf.max_keypoints or ALL_KEYPOINTS)[0]
        return {"keypoints": out["keypoints"], "descriptors": out["descriptors"], "scores": out["scores"]}


class LighterGlue(LightGlue):
    """kornia's LightGlue in its `xfeat` configuration with XFeat's LighterGlue weights (module docstring)."""

    default_conf = {"features": "xfeat", "depth_confidence": -1, "width_confidence": 0.95}
    weight_table: ClassVar[dict[str, WeightFile]] = {"xfeat": XFEAT_LIGHTERGLUE}
    weight_files: ClassVar[dict[str, Any]] = {"xfeat": (XFEAT_LIGHTERGLUE,)}


class XFeatStar(DenseMatcher):
    """XFeat* semi-dense matching as a dense backend in quantised mode (module docstring)."""

    default_conf = {
        "weights": None,  # explicit path to xfeat.pt
        "top_k": 10000,  # coarse features per image, over both scales
        "resize_max": 1200,
        "multiscale": True,  # 0.6x and 1.3x extractions (XFeat*); False: one extraction at 1x
        "fine_threshold": 0.25,  # matches whose fine-matcher confidence is not above this are dropped
    }
    weight_files: ClassVar[dict[str, Any]] = {"xfeat": (XFEAT,)}

    def _init(self, conf: Conf) -> None:
        if conf.top_k is not None and conf.top_k < 1:
            raise ConfigError(f"xfeat-star top_k must be positive or null (every cell), got {conf.top_k}")
        self.model = build_xfeat(conf.weights, self.device)

    def encode(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """Coarse keypoints (K, 2) in XFeat's pixel frame of the resized image, raw descriptors (K, 64), the scale
        factor of the extraction of each (K,), and the resize factors (sx, sy) back to the original image."""
        resized, scale = resize_image(image, self.conf.resize_max, False, 32)
        with torch.inference_mode(), self.autocast():
            out = self.model.detectAndComputeDense(self.to_tensor(resized), top_k=self.conf.top_k or 0,
                                                   multiscale=self.conf.multiscale)
        arrays = {key: value[0].float().cpu().numpy() for key, value in out.items()}
        return {**arrays, "resize": np.asarray(scale, np.float32),
                "size": np.asarray(image.shape[1::-1][:2], np.float32)}

    def match_encoded(self, encoded0: dict[str, np.ndarray], encoded1: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode(), self.autocast():
            points0, points1, confidence = self._match_coarse_fine(encoded0, encoded1)
        keypoints = [(points.cpu().numpy() + 0.5) / encoded["resize"] - 0.5
                     for points, encoded in ((points0, encoded0), (points1, encoded1))]
        # The fine offsets can move a point past the border; hloc keypoints lie inside the image.
        inside = np.ones(len(keypoints[0]), bool)
        for points, encoded in zip(keypoints, (encoded0, encoded1)):
            inside &= ((points >= -0.5) & (points <= encoded["size"] - 0.5)).all(axis=1)
        return {"keypoints0": keypoints[0][inside].astype(np.float32),
                "keypoints1": keypoints[1][inside].astype(np.float32),
                "scores": confidence.float().cpu().numpy()[inside]}

    def match_images(self, image0: np.ndarray, image1: np.ndarray) -> dict[str, np.ndarray]:
        return self.match_encoded(self.encode(image0), self.encode(image1))

    def _match_coarse_fine(self, encoded0, encoded1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mutual NN of the coarse descriptors, then XFeat*'s refinement of the image-0 points (resized pixels)."""
        tensors = [{k: torch.from_numpy(v).to(self.device) for k, v in e.items() if k != "resize"}
                   for e in (encoded0, encoded1)]
        descriptors0, descriptors1 = tensors[0]["descriptors"], tensors[1]["descriptors"]
        if len(descriptors0) == 0 or len(descriptors1) == 0:
            empty = descriptors0.new_zeros((0, 2))
            return empty, empty, descriptors0.new_zeros(0)
        matches0, _ = mutual_nearest_neighbors(descriptors0, descriptors1, ratio_threshold=None,
                                               compute_dtype=torch.float32)
        index0 = torch.nonzero(matches0 >= 0)[:, 0]
        index1 = matches0[index0].long()
        logits = self.model.net.fine_matcher(torch.cat([descriptors0[index0], descriptors1[index1]], dim=-1))
        confidence = F.softmax(logits * 3, dim=-1).max(dim=-1).values
        offsets = self.model._subpix_softmax2d(logits.view(-1, 8, 8))
        points0 = tensors[0]["keypoints"][index0] + offsets * tensors[0]["scales"][index0, None]
        keep = confidence > self.conf.fine_threshold
        return points0[keep], tensors[1]["keypoints"][index1][keep], confidence[keep]

"""OmniGlue (Jiang et al., CVPR 2024) through its ONNX export: SuperPoint + DINOv2 features, the OmniGlue matcher.

Which recon kinds: a features backend (`omniglue`: SuperPoint keypoints and descriptors plus DINOv2 descriptors at
those keypoints) and a sparse matcher (`omniglue`: the OmniGlue graph). Everything OmniGlue reads from an image is
per image (the official `FindMatches` runs SuperPoint and DINOv2 on both images, then the matcher), so it is
computed once per image and cached in features.h5; only the matcher runs per pair. As a DenseMatcher-like pair
matcher the ViT-B/14 would run twice per pair: 66 pairs of 12 images = 132 DINOv2 passes instead of 12.

Files (the exports image-matching-webui runs; google-research/omniglue ships TensorFlow SavedModels, which
Vincentqyw/omniglue-onnx converts with tf2onnx): `omniglue.onnx` and `sp_v6.onnx` (rpautrat's SuperPoint v6, not
MagicLeap's) from the Hugging Face repo Realcat/imcui_checkpoints, and DINOv2 ViT-B/14 (`dinov2_vitb14_pretrain.pth`,
facebookresearch) loaded strictly into kornia's DINOv2 ViT, whose module layout and position-embedding
interpolation are OmniGlue's third_party/dinov2 copy. No SHA-256 is published for any of them (unpinned).

Pipeline, as the official code (omniglue_extract.py, superpoint_extract.py, dino_extract.py, utils.py):
- SuperPoint: image resized to the nearest multiple of 8 per side (cv2 INTER_LINEAR), grayscale / 255 as
  (1,H,W,1); the graph gives `prob_nms` (1,H,W) and `descriptors` (1,H,W,256); keypoints are the pixels with
  prob > 0, the top 1024 by probability, scaled back with (size - 1) / (new - 1) (pixel centres at integers, the
  hloc convention), descriptors read at them.
- DINOv2-B/14: image resized so the longer side is <= 630, both sides floored to multiples of 14, ImageNet
  normalisation, last block's normalised patch tokens (768-D); read at keypoint * (grid / image size) with the
  official bilinear lookup (cells at integer coordinates, no half-cell offset; its edge behaviour kept).
- Matcher graph: keypoints0/1 (1,N,2) px, descriptors0/1 (1,N,256), scores0/1 (1,N,1), descriptors0_dino/1_dino
  (1,N,768), width0/1 and height0/1 (1,) int32 → soft_assignment (1,N0+1,N1+1) with dustbins. Matches: mutual
  row/column maxima of the assignment without dustbins, above MATCH_THRESHOLD = 1e-3 (published value; the webui
  adds its own 0.02), and both keypoints with a score > 0.
features.h5 stores one 1024-D descriptor per keypoint: SuperPoint's 256 then DINOv2's 768 (the matcher splits
them); MNN on them is possible but is not OmniGlue.

The tensor names of the two tf2onnx graphs are inferred from the TensorFlow signatures ('superpoint/image:0',
'superpoint/prob_nms:0', 'superpoint/descriptors:0'; the matcher's named inputs above, its first output taken as
the assignment, as the ONNX wrapper does); they are checked when a graph opens. Tested only against small graphs of
that contract built in tests/test_omniglue.py (the real files could not be downloaded here): no numerical parity
with the published OmniGlue is claimed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import cv2
import numpy as np
import torch

from .base import LocalFeatures, SparseMatcher
from .errors import ConfigError, WeightsError
from .onnx_models import OnnxGraph
from .weights import WeightFile, load_checkpoint, load_state_dict_strict

_IMCUI = "https://huggingface.co/Realcat/imcui_checkpoints/resolve/main/omniglue"
SUPERPOINT = WeightFile("sp_v6.onnx", f"{_IMCUI}/sp_v6.onnx", note="rpautrat SuperPoint v6, tf2onnx")
MATCHER = WeightFile("omniglue.onnx", f"{_IMCUI}/omniglue.onnx", note="OmniGlue og_export, tf2onnx")
DINOV2_B = WeightFile("dinov2_vitb14_pretrain.pth",
                      "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth",
                      note="DINOv2 ViT-B/14 (no registers)")
SP_DIM, DINO_DIM = 256, 768
DINO_MAX_SIDE, PATCH = 630, 14
MATCH_THRESHOLD = 1e-3
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def dinov2_vitb14() -> torch.nn.Module:
    """DINOv2 ViT-B/14 with kornia's modules (the official hub layout: 518 px position grid, no registers)."""
    from functools import partial

    from kornia.feature.dedode.transformer.dinov2 import Block, DinoVisionTransformer, MemEffAttention

    return DinoVisionTransformer(img_size=518, patch_size=PATCH, embed_dim=DINO_DIM, depth=12, num_heads=12,
                                 mlp_ratio=4, init_values=1e-5, block_chunks=0,
                                 block_fn=partial(Block, attn_class=MemEffAttention))


def lookup_bilinear(points: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """OmniGlue's `lookup_descriptor_bilinear`, vectorised: (N,2) x/y in cell units on an (H,W,D) grid, cells at
    integer coordinates; the right/bottom neighbour is used only when the coordinate is fractional and below
    W-1 (H-1), so beyond the last cell the weight is not renormalised, as in the official code. Departure: a
    coordinate exactly at W (H), which the official bounds check admits and then indexes out of range, reads the
    last cell."""
    height, width = grid.shape[:2]
    if len(points) and (points.min() < 0 or (points[:, 0] > width).any() or (points[:, 1] > height).any()):
        raise ConfigError("a keypoint lies outside the descriptor map")
    out = np.zeros((len(points), grid.shape[2]), np.float64)
    x, y = points[:, 0].astype(np.float64), points[:, 1].astype(np.float64)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    has_x1 = (x != x0) & (x < width - 1)
    has_y1 = (y != y0) & (y < height - 1)
    for dx, use_x in ((0, np.ones_like(has_x1)), (1, has_x1)):
        for dy, use_y in ((0, np.ones_like(has_y1)), (1, has_y1)):
            use = use_x & use_y
            xi, yi = np.minimum(x0 + dx, width - 1), np.minimum(y0 + dy, height - 1)
            weight = (1 - np.abs(x - (x0 + dx))) * (1 - np.abs(y - (y0 + dy))) * use
            out += weight[:, None] * grid[yi, xi]
    return out.astype(np.float32)


def dino_input_size(width: int, height: int) -> tuple[int, int]:
    """OmniGlue's DINO resize: longer side <= 630 (int() of the scaled shorter side), sides floored to x14."""
    if max(width, height) > DINO_MAX_SIDE:
        if height > width:
            width, height = int(DINO_MAX_SIDE * width / height), DINO_MAX_SIDE
        else:
            width, height = DINO_MAX_SIDE, int(DINO_MAX_SIDE * height / width)
    return width // PATCH * PATCH, height // PATCH * PATCH


def superpoint_size(side: int) -> int:
    """OmniGlue's SuperPoint resize: to the nearest multiple of 8 (ties up)."""
    return side - side % 8 if side % 8 < 4 else side + 8 - side % 8


class OmniGlueFeatures(LocalFeatures):
    default_conf = {
        "max_keypoints": 1024,  # the official num_features
        "resize_max": None,  # the official code runs SuperPoint at full resolution
        "num_threads": None,  # onnxruntime intra-op threads
        "weights": None,  # {"superpoint": path, "dinov2": path}
    }
    weight_files: ClassVar[dict[str, Any]] = {"superpoint": (SUPERPOINT,), "dinov2": (DINOV2_B,)}

    @classmethod
    def required_weights(cls, conf):
        explicit = dict(conf.get("weights") or {}) if isinstance(conf.get("weights"), Mapping) else {}
        return [(SUPERPOINT, explicit.get("superpoint")), (DINOV2_B, explicit.get("dinov2"))]

    def _init(self, conf) -> None:
        explicit = dict(conf.weights or {})
        if not isinstance(conf.weights, (Mapping, type(None))) or set(explicit) - {"superpoint", "dinov2"}:
            raise ConfigError("'weights' must be a mapping of 'superpoint' and/or 'dinov2' to paths")
        self.superpoint = OnnxGraph(
            SUPERPOINT, {"superpoint/image:0": (1, None, None, 1)},
            {"superpoint/prob_nms:0": (1, None, None), "superpoint/descriptors:0": (1, None, None, SP_DIM)},
            explicit.get("superpoint"), self.device, conf.num_threads)
        state_dict = load_checkpoint(DINOV2_B, explicit.get("dinov2"))
        if not isinstance(state_dict, Mapping):
            raise WeightsError(f"'{DINOV2_B.filename}' is not a state dict (got {type(state_dict).__name__})")
        self.dino = dinov2_vitb14()
        load_state_dict_strict(self.dino, dict(state_dict), DINOV2_B.filename)
        self.dino.eval().to(self.device)

    def _superpoint(self, image_u8: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        height, width = image_u8.shape[:2]
        new_w, new_h = superpoint_size(width), superpoint_size(height)
        resized = cv2.resize(image_u8, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        gray = cv2.cvtColor(resized, cv2.COLOR_RGB2GRAY).astype(np.float32)[None, :, :, None] / 255.0
        out = self.superpoint.run(**{"superpoint/image:0": gray})
        prob, dense = out["superpoint/prob_nms:0"][0], out["superpoint/descriptors:0"][0]
        rows, cols = np.nonzero(prob > 0)
        scores = prob[rows, cols]
        order = np.argsort(scores, kind="stable")[::-1]  # the official sort keeps the highest last; ties aside
        if self.conf.max_keypoints:
            order = order[: self.conf.max_keypoints]
        rows, cols, scores = rows[order], cols[order], scores[order]
        descriptors = dense[rows, cols].astype(np.float32)
        scale = np.array([(new_w - 1) / (width - 1), (new_h - 1) / (height - 1)], np.float32)
        keypoints = np.stack([cols, rows], 1).astype(np.float32) / scale
        return keypoints, descriptors, scores.astype(np.float32)

    def _dino(self, image_u8: np.ndarray, keypoints: np.ndarray) -> np.ndarray:
        height, width = image_u8.shape[:2]
        size = dino_input_size(width, height)
        resized = cv2.resize(image_u8, size, interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255.0
        tensor = torch.from_numpy(((resized - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1))[None]
        with torch.inference_mode():
            tokens = self.dino.get_intermediate_layers(tensor.float().to(self.device), n=1)[0]
        grid = tokens[0].float().cpu().numpy().reshape(size[1] // PATCH, size[0] // PATCH, DINO_DIM)
        cells = keypoints / np.array([width, height], np.float32) * np.array(grid.shape[1::-1], np.float32)
        return lookup_bilinear(cells, grid)

    def _extract_image(self, image: np.ndarray) -> dict[str, np.ndarray]:
        if image.shape[2] != 3:
            raise ConfigError("OmniGlue needs RGB images; do not set grayscale=true")
        image_u8 = np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)
        keypoints, descriptors, scores = self._superpoint(image_u8)
        dino = self._dino(image_u8, keypoints)
        return {"keypoints": keypoints, "descriptors": np.concatenate([descriptors, dino], 1), "scores": scores}


def mutual_max_matches(assignment: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """OmniGlue's `soft_assignment_to_match_matrix` for one (N0,N1) assignment without dustbins: i ↔ j when j is
    the row maximum of i and i the column maximum of j, and the value exceeds `threshold`."""
    best1 = assignment.argmax(axis=1)
    best0 = assignment.argmax(axis=0)
    values = assignment[np.arange(len(best1)), best1]
    mutual = best0[best1] == np.arange(len(best1))
    keep = mutual & (values > threshold)
    return np.where(keep, best1, -1), np.where(keep, values, 0.0).astype(np.float32)


class OmniGlueMatcher(SparseMatcher):
    default_conf = {
        "match_threshold": MATCH_THRESHOLD,
        "num_threads": None,
        "weights": None,  # explicit path of omniglue.onnx
    }
    weight_files: ClassVar[dict[str, Any]] = {"matcher": (MATCHER,)}
    required_inputs = ("keypoints", "descriptors", "scores", "image_size")
    INPUTS: ClassVar[dict[str, tuple]] = {
        **{f"keypoints{i}": (1, None, 2) for i in "01"}, **{f"descriptors{i}": (1, None, SP_DIM) for i in "01"},
        **{f"scores{i}": (1, None, 1) for i in "01"}, **{f"descriptors{i}_dino": (1, None, DINO_DIM) for i in "01"},
        **{f"{side}{i}": (1,) for side in ("width", "height") for i in "01"},
    }

    def _init(self, conf) -> None:
        self.graph = OnnxGraph(MATCHER, self.INPUTS, (1, None, None), conf.weights, self.device, conf.num_threads)

    def _match(self, data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        feeds = {}
        for i in "01":
            descriptors = data[f"descriptors{i}"][0].T.float().cpu().numpy()
            if descriptors.shape[1] != SP_DIM + DINO_DIM:
                raise ConfigError(f"OmniGlue needs the 1024-D descriptors of --features omniglue, got "
                                  f"{descriptors.shape[1]}-D")
            width, height = (int(v) for v in data[f"image_size{i}"][0].cpu())
            scores = data[f"scores{i}"][0].float().cpu().numpy()
            feeds |= {f"keypoints{i}": data[f"keypoints{i}"][0].float().cpu().numpy()[None],
                      f"descriptors{i}": np.ascontiguousarray(descriptors[None, :, :SP_DIM]),
                      f"descriptors{i}_dino": np.ascontiguousarray(descriptors[None, :, SP_DIM:]),
                      f"scores{i}": scores[None, :, None], f"width{i}": np.array([width], np.int32),
                      f"height{i}": np.array([height], np.int32)}
        assignment = next(iter(self.graph.run(**feeds).values()))[0, :-1, :-1]
        matches, values = mutual_max_matches(assignment, self.conf.match_threshold)
        valid = (matches >= 0) & (feeds["scores0"][0, :, 0] > 0)
        valid[valid] &= feeds["scores1"][0, matches[valid], 0] > 0
        matches, values = np.where(valid, matches, -1), np.where(valid, values, 0.0).astype(np.float32)
        return {"matches0": torch.from_numpy(matches.astype(np.int64))[None],
                "matching_scores0": torch.from_numpy(values)[None]}

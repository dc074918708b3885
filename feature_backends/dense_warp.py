"""What every warp-predicting dense matcher shares (RoMa, tiny RoMa, GIM's RoMa and DKM, MINIMA's RoMa).

A `Warp` holds, for a grid over image 0, where each grid cell lands in image 1 and how certain the network is;
symmetric matchers also hold the reverse direction. Coordinates are RoMa's normalised convention: x, y in
[-1, 1] over the whole image, pixel centres of an n-pixel axis at linspace(-1 + 1/n, 1 - 1/n, n). Because the
convention is resolution-free, the warp is converted straight to *original*-image pixels in hloc's convention
(centre of the top-left pixel = (0, 0)): x_px = (x + 1) / 2 * W - 0.5; no resize scale is ever carried around.

Sampling re-implements romatch's "threshold_balanced" (certainties above `sample_thresh` count as 1, draw 4x
candidates by certainty, then thin them by the inverse of a Gaussian KDE so matches spread over the overlap)
instead of calling `RegressionMatcher.sample`, for three reasons: (1) romatch draws from torch's global RNG, so
the same pair gives different matches on a re-run; here every pair draws from its own seeded generator, which
keeps a resumed run identical to an uninterrupted one; (2) romatch's KDE builds the full (4N x 4N) distance
matrix (40k x 40k for the default 10k matches: 3.2 GB in fp16), here it is computed in row chunks against at
most `kde_max_points` candidates (a stride subsample, density rescaled), so memory and time stay bounded; (3) the
same sampler serves DKM, tiny RoMa and the test oracles, which romatch's method (bound to a model) cannot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from .base import DenseMatcher
from .errors import ConfigError


def pixel_centres(size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Normalised coordinates of the pixel centres of an axis of `size` pixels."""
    return torch.linspace(-1 + 1 / size, 1 - 1 / size, size, device=device)


def identity_grid(height: int, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(H, W, 2) normalised (x, y) of every pixel centre."""
    ys, xs = torch.meshgrid(pixel_centres(height, device), pixel_centres(width, device), indexing="ij")
    return torch.stack((xs, ys), dim=-1)


def to_pixels(coords: torch.Tensor | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Normalised (..., 2) → pixels (hloc convention) of an image of `size` = (width, height)."""
    coords = coords.detach().float().cpu().numpy() if isinstance(coords, torch.Tensor) else np.asarray(coords)
    scale = np.asarray(size, np.float64)
    return ((coords.astype(np.float64) + 1.0) / 2.0 * scale - 0.5).astype(np.float32)


def to_normalized(points: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Pixels (hloc convention) → normalised coordinates; inverse of `to_pixels`."""
    scale = np.asarray(size, np.float64)
    return ((np.asarray(points, np.float64) + 0.5) / scale * 2.0 - 1.0).astype(np.float32)


def kernel_density(points: torch.Tensor, std: float, max_points: int, chunk: int = 2048) -> torch.Tensor:
    """Gaussian KDE of every point against (a stride subsample of) all points, in bounded memory.

    With a subsample of every `stride`-th point the sum is multiplied by `stride`, so the density keeps the
    unit romatch's thresholds assume (number of equivalent neighbours).
    """
    stride = max(1, int(np.ceil(len(points) / max_points)))
    reference = points[::stride]
    density = torch.empty(len(points), device=points.device, dtype=torch.float32)
    for start in range(0, len(points), chunk):
        block = points[start:start + chunk]
        distances = torch.cdist(block, reference) ** 2
        density[start:start + chunk] = torch.exp(-distances / (2 * std**2)).sum(dim=-1) * stride
    return density


def balanced_sample(
    matches: torch.Tensor,
    certainty: torch.Tensor,
    num: int,
    sample_thresh: float,
    generator: torch.Generator,
    kde_std: float = 0.1,
    kde_max_points: int = 2048,
    balanced: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """romatch's threshold_balanced sampling; returns (M, 4) matches and their *raw* certainties (M,)."""
    matches, certainty = matches.reshape(-1, 4), certainty.reshape(-1).float()
    weights = certainty.clone()
    weights[weights > sample_thresh] = 1.0
    available = int((weights > 0).sum())
    if available == 0 or num <= 0:
        return matches[:0], certainty[:0]
    expansion = 4 if balanced else 1
    candidates = torch.multinomial(weights, min(expansion * num, available), replacement=False, generator=generator)
    if not balanced:
        return matches[candidates], certainty[candidates]
    density = kernel_density(matches[candidates].float(), kde_std, kde_max_points)
    probability = 1.0 / (density + 1.0)
    probability[density < 10] = 1e-7  # romatch: a match needs about ten perfect neighbours to count
    chosen = candidates[torch.multinomial(probability, min(num, len(candidates)), replacement=False,
                                          generator=generator)]
    return matches[chosen], certainty[chosen]


@dataclass
class Warp:
    """A dense correspondence field between two images (normalised coordinates, see the module docstring).

    forward: (H, W, 2) position in image 1 of each pixel centre of an H x W grid over image 0;
    certainty: (H, W) in [0, 1]; backward / backward_certainty: the same from image 1 to image 0, or None.
    size0 / size1: original image sizes (width, height), used to convert to pixels.
    """

    forward: torch.Tensor
    certainty: torch.Tensor
    size0: tuple[int, int]
    size1: tuple[int, int]
    backward: torch.Tensor | None = None
    backward_certainty: torch.Tensor | None = None

    @property
    def symmetric(self) -> bool:
        return self.backward is not None

    def reversed(self) -> Warp:
        if not self.symmetric:
            raise ValueError("only a symmetric warp can be reversed")
        return Warp(self.backward, self.backward_certainty, self.size1, self.size0, self.forward, self.certainty)

    def correspondences(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All grid correspondences as (N, 4) [x0, y0, x1, y1] normalised, and certainties (N,)."""
        parts, certainties = [], []
        height, width = self.forward.shape[:2]
        grid = identity_grid(height, width, self.forward.device)
        parts.append(torch.cat((grid, self.forward), dim=-1).reshape(-1, 4))
        certainties.append(self.certainty.reshape(-1))
        if self.symmetric:
            height, width = self.backward.shape[:2]
            grid = identity_grid(height, width, self.backward.device)
            parts.append(torch.cat((self.backward, grid), dim=-1).reshape(-1, 4))
            certainties.append(self.backward_certainty.reshape(-1))
        return torch.cat(parts), torch.cat(certainties)

    def sample(self, num: int, sample_thresh: float, seed: int, min_certainty: float = 0.0,
               balanced: bool = True) -> dict[str, np.ndarray]:
        """Sampled matches in original-image pixels: keypoints0, keypoints1 (M, 2) and scores (M,)."""
        matches, certainty = self.correspondences()
        generator = torch.Generator(device=matches.device).manual_seed(seed)
        matches, certainty = balanced_sample(matches, certainty, num, sample_thresh, generator, balanced=balanced)
        keep = certainty > min_certainty
        matches, certainty = matches[keep], certainty[keep]
        return {
            "keypoints0": to_pixels(matches[:, :2], self.size0).reshape(-1, 2),
            "keypoints1": to_pixels(matches[:, 2:], self.size1).reshape(-1, 2),
            "scores": certainty.float().cpu().numpy().astype(np.float32),
        }

    def transfer(self, points0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Map pixels of image 0 into image 1 (bilinear in the warp); returns pixels and certainties."""
        return _lookup(self.forward, self.certainty, points0, self.size0, self.size1)

    def transfer_back(self, points1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Map pixels of image 1 into image 0 through the backward warp (symmetric warps only)."""
        if not self.symmetric:
            raise ValueError("this warp has no backward direction (symmetric=False)")
        return _lookup(self.backward, self.backward_certainty, points1, self.size1, self.size0)


def _lookup(field: torch.Tensor, certainty: torch.Tensor, points: np.ndarray, size_from: tuple[int, int],
            size_to: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    if len(points) == 0:
        return np.zeros((0, 2), np.float32), np.zeros(0, np.float32)
    query = torch.from_numpy(to_normalized(points, size_from)).to(field.device)[None, None]
    # Both the field and the certainty are sampled bilinearly, as romatch's match_keypoints does.
    stacked = torch.cat((field.permute(2, 0, 1), certainty[None]), dim=0)[None].float()
    values = F.grid_sample(stacked, query, mode="bilinear", align_corners=False, padding_mode="border")[0, :, 0]
    return to_pixels(values[:2].T, size_to), values[2].cpu().numpy().astype(np.float32)


class WarpMatcher(DenseMatcher):
    """A dense matcher that predicts a full `Warp`; subclasses implement `_warp(image0, image1)`.

    `image0`, `image1` are (1, 3, H, W) float tensors in [0, 1] on the backend's device, original size; the
    subclass resizes and normalises as its network expects and returns a `Warp` (sizes filled in here).
    """

    has_warp = True
    default_conf: ClassVar[dict[str, Any]] = {
        "num_matches": 10000,  # sampled matches per pair (romatch's `num`)
        "sample_thresh": 0.05,  # certainties above count as 1 when sampling (romatch's sample_thresh)
        "min_certainty": 0.0,  # sampled matches / anchored keypoints below this certainty are dropped
        "balanced": True,  # KDE-balanced sampling (romatch "threshold_balanced") or plain by certainty
        "seed": 0,  # per-pair sampling seed: the same pair always yields the same matches
    }

    def _warp(self, image0: torch.Tensor, image1: torch.Tensor) -> Warp:
        raise NotImplementedError

    def _check_image(self, image: np.ndarray) -> None:
        if image.ndim != 3 or image.shape[2] not in (1, 3):
            raise ConfigError(f"{type(self).__name__} expects (H, W, 1|3) images, got shape {image.shape}")

    def image_tensor(self, image: np.ndarray) -> torch.Tensor:
        self._check_image(image)
        if image.shape[2] == 1:
            image = np.repeat(image, 3, axis=2)
        return self.to_tensor(image)

    def warp_images(self, image0: np.ndarray, image1: np.ndarray) -> Warp:
        with torch.inference_mode(), self.autocast():
            warp = self._warp(self.image_tensor(image0), self.image_tensor(image1))
        warp.size0 = (image0.shape[1], image0.shape[0])
        warp.size1 = (image1.shape[1], image1.shape[0])
        return warp

    def match_images(self, image0: np.ndarray, image1: np.ndarray) -> dict[str, np.ndarray]:
        return self._sample(self.warp_images(image0, image1))

    def _sample(self, warp: Warp) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            return warp.sample(self.conf.num_matches, self.conf.sample_thresh, self.conf.seed,
                               self.conf.min_certainty, self.conf.balanced)

    def match_encoded(self, encoded0: dict[str, np.ndarray], encoded1: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._sample(self.warp_encoded(encoded0, encoded1))


class EncodedWarpMatcher(WarpMatcher):
    """A warp matcher whose network is a per-image encoder followed by a pair decoder (RoMa and its variants,
    DKMv3): `encode` runs the encoder once per image, the dense stage caches the result (on the GPU within a share
    of its free memory, spilling over to host memory: recon.dense.common), and `warp_encoded` runs the decoder on
    two cached encodings. Subclasses implement `_encoder_features` ((1,3,H,W) image in [0,1] on the device →
    named feature tensors) and `_decode` (two such dicts → a Warp; sizes are filled in here).

    An encoding is {"size": (width, height), name: tensor on the backend's device, ...}; the cache may hand back a
    spilled one with its tensors on the host, which `warp_encoded` moves to the device."""

    def _encoder_features(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _decode(self, features0: dict[str, torch.Tensor], features1: dict[str, torch.Tensor]) -> Warp:
        raise NotImplementedError

    def encode(self, image: np.ndarray) -> dict[str, Any]:
        with torch.inference_mode(), self.autocast():
            features = self._encoder_features(self.image_tensor(image))
        return {"size": np.array([image.shape[1], image.shape[0]]), **features}

    def _features(self, encoded: dict[str, Any]) -> tuple[dict[str, torch.Tensor], tuple[int, int]]:
        features = {k: torch.as_tensor(v, device=self.device) for k, v in encoded.items() if k != "size"}
        return features, tuple(int(v) for v in encoded["size"])

    def warp_encoded(self, encoded0: dict[str, Any], encoded1: dict[str, Any]) -> Warp:
        (features0, size0), (features1, size1) = self._features(encoded0), self._features(encoded1)
        with torch.inference_mode(), self.autocast():
            warp = self._decode(features0, features1)
        warp.size0, warp.size1 = size0, size1
        return warp

    def warp_images(self, image0: np.ndarray, image1: np.ndarray) -> Warp:
        return self.warp_encoded(self.encode(image0), self.encode(image1))

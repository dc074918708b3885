"""Dense matchers that know the answer: the exact warps of generated images (recon.synthetic), for tests and
benchmarks of the dense stage, where a learned matcher's errors would hide the stage's own.

They are ordinary dense backends (`WarpMatcher` subclasses, sampled as RoMa samples), so a stage takes them by
dotted path, with no registration: `recon run … --matcher recon.oracles:PlaneOracle --matcher-conf scene=DIR`,
or `sift+recon.oracles:PlaneOracle` for the anchored mode.

- `TranslationOracle`: images that are crops of one canvas at known integer offsets (conf `offsets`: a list of
  [image key, x, y]); the warp is a translation.
- `SceneOracle`: a `recon.synthetic.make_scene` scene; exact only near each drawn 3D point.
- `PlaneOracle`: a `recon.synthetic.make_plane_scene` scene; exact at every pixel, occlusion-aware.

Images are recognised by the hash of their pixels (`image_key`), since a matcher sees arrays, not names.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pycolmap
import torch
from scipy.spatial import cKDTree

from feature_backends.dense_warp import Warp, WarpMatcher, to_normalized


def image_key(image: np.ndarray) -> str:
    """What identifies an image given as an array: the SHA-1 of its float32 pixels."""
    return hashlib.sha1(np.ascontiguousarray(image, np.float32).tobytes()).hexdigest()


def warp_from_function(mapping, size0, size1, step: int = 1):
    """A normalised warp grid and certainty from a pixel → (pixel, valid) function, on a grid over image 0 of
    one cell per `step` x `step` pixels (warps need not be at full resolution)."""
    width0, height0 = size0
    columns, rows = width0 // step, height0 // step
    ys, xs = np.meshgrid((np.arange(rows) + 0.5) * height0 / rows - 0.5, (np.arange(columns) + 0.5) * width0 / columns
                         - 0.5, indexing="ij")
    points = np.stack([xs.ravel(), ys.ravel()], axis=1)
    mapped, valid = mapping(points)
    inside = valid & (mapped[:, 0] >= -0.5) & (mapped[:, 0] < size1[0] - 0.5) & (mapped[:, 1] >= -0.5) \
        & (mapped[:, 1] < size1[1] - 0.5)
    grid = to_normalized(mapped, size1).reshape(rows, columns, 2)
    return torch.from_numpy(np.clip(grid, -1, 1)), torch.from_numpy(inside.reshape(rows, columns).astype(np.float32))


class TranslationOracle(WarpMatcher):
    """Images are crops of one canvas at known integer offsets: the exact warp is a translation."""

    default_conf = {"offsets": [], "symmetric": True, "num_matches": 400}  # [[image key, x, y], ...]

    def _init(self, conf) -> None:
        self.offsets = {key: np.array([x, y], np.float64) for key, x, y in conf.offsets}

    def warp_images(self, image0, image1) -> Warp:
        offset0, offset1 = self.offsets[image_key(image0)], self.offsets[image_key(image1)]
        size0, size1 = (image0.shape[1], image0.shape[0]), (image1.shape[1], image1.shape[0])
        forward, certainty = warp_from_function(lambda p: (p + offset0 - offset1, np.ones(len(p), bool)), size0, size1)
        warp = Warp(forward, certainty, size0, size1)
        if self.conf.symmetric:
            warp.backward, warp.backward_certainty = warp_from_function(
                lambda p: (p + offset1 - offset0, np.ones(len(p), bool)), size1, size0)
        return warp


class SceneOracle(WarpMatcher):
    """The ground truth of a recon.synthetic scene. pycolmap stamps the same 2D patch at each projected 3D point,
    so only a point's projection is geometrically exact; pixels within `radius` (the drawn peak, 2 px) are
    mapped with the point's translation and everything else is uncertain."""

    default_conf = {"scene": "", "radius": 2, "symmetric": True, "num_matches": 2000, "grid_step": 1}

    def _init(self, conf) -> None:
        from feature_backends.images import read_image

        scene = Path(conf.scene)
        reconstruction = pycolmap.Reconstruction(scene / "gt")
        self.projections, self.names = {}, {}
        for image in reconstruction.images.values():
            observed = {p.point3D_id: np.asarray(p.xy) - 0.5 for p in image.points2D if p.has_point3D()}
            self.projections[image.name] = observed
            self.names[image_key(read_image(scene / "images" / image.name))] = image.name

    def _field(self, name0, name1, size0, size1):
        points0, points1 = self.projections[name0], self.projections[name1]
        ids = sorted(points0)
        tree = cKDTree(np.array([points0[i] for i in ids]))
        shift = np.array([points1[i] - points0[i] if i in points1 else (np.nan, np.nan) for i in ids])

        def mapping(pixels):
            # Only pixels near exactly one point: where peaks overlap, the one drawn last is unknown.
            distance, nearest = tree.query(pixels, k=2, p=np.inf)
            target = pixels + shift[nearest[:, 0]]
            valid = (distance[:, 0] <= self.conf.radius) & (distance[:, 1] > self.conf.radius)
            valid &= np.isfinite(target).all(axis=1)
            return np.nan_to_num(target, nan=-10.0), valid

        return warp_from_function(mapping, size0, size1, step=self.conf.grid_step)

    def warp_images(self, image0, image1) -> Warp:
        name0, name1 = self.names[image_key(image0)], self.names[image_key(image1)]
        size0, size1 = (image0.shape[1], image0.shape[0]), (image1.shape[1], image1.shape[0])
        warp = Warp(*self._field(name0, name1, size0, size1), size0, size1)
        if self.conf.symmetric:
            warp.backward, warp.backward_certainty = self._field(name1, name0, size1, size0)
        return warp


class PlaneOracle(WarpMatcher):
    """The exact dense warp of a recon.synthetic plane scene: every pixel of one frame mapped into the other by
    its ray-cast 3D point, certainty 1 where that point is seen in the other frame and 0 where it is occluded,
    outside or on no surface. Sampling is the one RoMa's matchers use (random, certainty-thresholded,
    KDE-balanced), so samples spread over the covisible area as a real matcher's do."""

    default_conf = {"scene": "", "symmetric": True, "num_matches": 2000, "grid_step": 1}

    def _init(self, conf) -> None:
        from feature_backends.images import read_image
        from recon.synthetic import load_plane_scene

        self.scene = load_plane_scene(conf.scene)
        self.index = {image_key(read_image(Path(conf.scene) / "images" / name)): i
                      for i, name in enumerate(self.scene.names)}

    def _field(self, index0, index1, size0, size1):
        return warp_from_function(lambda p: self.scene.correspondence(index0, index1, p), size0, size1,
                                  step=self.conf.grid_step)

    def warp_images(self, image0, image1) -> Warp:
        index0, index1 = self.index[image_key(image0)], self.index[image_key(image1)]
        size0, size1 = (image0.shape[1], image0.shape[0]), (image1.shape[1], image1.shape[0])
        warp = Warp(*self._field(index0, index1, size0, size1), size0, size1)
        if self.conf.symmetric:
            warp.backward, warp.backward_certainty = self._field(index1, index0, size1, size0)
        return warp

"""Gaussian splats in the PLY layout of the original 3DGS code (graphdeco-inria/gaussian-splatting).

Viewers (SuperSplat, the SIBR viewer, gsplat's own loader, nerfstudio's importers) identify a splat file by its
property names, so the layout is reproduced exactly: one binary little-endian `vertex` element of float32
properties in this order

    x y z  nx ny nz  f_dc_0..2  f_rest_0..(3*K-4)  opacity  scale_0..2  rot_0..3

with normals written as zeros, `f_rest` stored channel-major (all red coefficients first, then green, then blue,
as the reference's `transpose(1, 2).flatten`), opacity as a logit, scales as logs and rotations as (w, x, y, z)
quaternions, all un-activated. gsplat's `export_splats` writes the same file from a torch dict; this module
exists because the reader is needed too (tests, resuming from a PLY) and works on plain numpy arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from plyfile import PlyData, PlyElement

from feature_backends.errors import InputError


@dataclass(frozen=True)
class GaussianArrays:
    """Raw (pre-activation) Gaussian parameters; N Gaussians, K = (sh_degree + 1)**2 SH coefficients."""

    means: np.ndarray  # (N, 3)
    sh0: np.ndarray  # (N, 1, 3) DC coefficients
    shN: np.ndarray  # (N, K-1, 3) higher-order coefficients
    opacities: np.ndarray  # (N,) logits
    scales: np.ndarray  # (N, 3) logs
    quats: np.ndarray  # (N, 4) w, x, y, z


def property_names(num_rest_coeffs: int) -> list[str]:
    """The 3DGS property order for `num_rest_coeffs` = K-1 higher-order SH coefficients per channel."""
    names = ["x", "y", "z", "nx", "ny", "nz"]
    names += [f"f_dc_{i}" for i in range(3)]
    names += [f"f_rest_{i}" for i in range(3 * num_rest_coeffs)]
    names += ["opacity"]
    names += [f"scale_{i}" for i in range(3)]
    names += [f"rot_{i}" for i in range(4)]
    return names


def write_ply(path: str | Path, gaussians: GaussianArrays) -> Path:
    path = Path(path)
    n = len(gaussians.means)
    num_rest = gaussians.shN.shape[1]
    columns = [
        gaussians.means.reshape(n, 3),
        np.zeros((n, 3), np.float32),
        gaussians.sh0.reshape(n, 3),
        # (N, K-1, 3) -> (N, 3, K-1): the reference flattens channel-major
        np.transpose(gaussians.shN.reshape(n, num_rest, 3), (0, 2, 1)).reshape(n, 3 * num_rest),
        gaussians.opacities.reshape(n, 1),
        gaussians.scales.reshape(n, 3),
        gaussians.quats.reshape(n, 4),
    ]
    table = np.concatenate([np.asarray(c, np.float32) for c in columns], axis=1)
    names = property_names(num_rest)
    vertices = np.empty(n, dtype=[(name, "<f4") for name in names])
    for i, name in enumerate(names):
        vertices[name] = table[:, i]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    PlyData([PlyElement.describe(vertices, "vertex")], text=False, byte_order="<").write(str(tmp))
    tmp.replace(path)
    return path


def read_ply(path: str | Path) -> GaussianArrays:
    """Read a 3DGS PLY; raise InputError if it is not one (missing or misordered properties)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"splat file '{path}' does not exist")
    ply = PlyData.read(str(path))
    if "vertex" not in ply:
        raise InputError(f"'{path}' has no vertex element; it is not a 3DGS splat file")
    vertex = ply["vertex"]
    names = [p.name for p in vertex.properties]
    num_rest_total = sum(name.startswith("f_rest_") for name in names)
    if num_rest_total % 3 or names != property_names(num_rest_total // 3):
        raise InputError(f"'{path}' does not have the 3DGS property layout (found: {' '.join(names[:12])} ...)")
    n = vertex.count
    num_rest = num_rest_total // 3

    def stack(prefix_names: list[str]) -> np.ndarray:
        return np.stack([np.asarray(vertex[name], np.float32) for name in prefix_names], axis=1)

    rest = stack([f"f_rest_{i}" for i in range(num_rest_total)]).reshape(n, 3, num_rest)
    return GaussianArrays(
        means=stack(["x", "y", "z"]),
        sh0=stack([f"f_dc_{i}" for i in range(3)]).reshape(n, 1, 3),
        shN=np.ascontiguousarray(np.transpose(rest, (0, 2, 1))),
        opacities=np.asarray(vertex["opacity"], np.float32),
        scales=stack([f"scale_{i}" for i in range(3)]),
        quats=stack([f"rot_{i}" for i in range(4)]),
    )

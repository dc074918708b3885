"""`recon splat`: train a 3D Gaussian Splatting scene from the undistorted SfM model, evaluated on held-out views.

Design choices
- Input is the undistorted PINHOLE export (`OUT/undistorted/{images,sparse/0}`), or any folder holding
  `images/` + `sparse/0` directly. Splatting rasterizers are pinhole-only, so a distorted model is refused with
  an InputError instead of being trained with the wrong projection (gsplat's parser undistorts on the fly; we
  leave that to the export stage so every consumer sees the same images).
- Initialisation follows the 3DGS paper and gsplat's simple_trainer: one Gaussian per 3D point, colour from the
  point as the SH DC term, scale from the root-mean-square distance to the 3 nearest neighbours (scipy cKDTree:
  open3d does not import here), identity rotation, opacity 0.1. SH degree rises by one every
  `sh_degree_interval` steps up to `sh_degree`.
- Training loop, learning rates and densification are gsplat's: its `DefaultStrategy` (3DGS split/clone/prune)
  or `MCMCStrategy`, Adam per parameter group, means lr decayed exponentially to 1% over the run, loss
  0.8·L1 + 0.2·(1−SSIM) (+ the MCMC opacity/scale regularisers).
- Rasterizer. On CUDA: `gsplat.rasterization`. Without CUDA, gsplat's own pure-PyTorch path cannot serve:
  `gsplat.rendering._rasterization` still calls the CUDA `isect_tiles` and `rasterize_to_indices_in_range`
  kernels and needs nerfacc (not installable without CUDA), and the pure `_isect_tiles` in
  `gsplat/cuda/_torch_impl.py` is a Python loop over every Gaussian and tile (seconds per frame for a few hundred
  Gaussians). So the CPU path uses gsplat's pure-torch projection (`_quat_scale_to_covar_preci`,
  `_fully_fused_projection`, `_spherical_harmonics`, identical maths to the CUDA kernels, EWA with the same 0.3
  px² dilation and 3.33σ radii) and a small compositor of our own (`composite_sorted_pairs`): it enumerates
  (Gaussian, pixel) pairs inside each projected radius, drops alphas below 1/255, sorts by (pixel, depth) and
  computes transmittance with a segmented exclusive cumulative sum of log(1−α) in float64, stopping at T < 1e-4
  as the CUDA kernel does. Autograd provides the backward pass, including the screen-space `means2d` gradient
  that `DefaultStrategy` densifies on. The log says which path ran; metrics.json records it.
- MCMC without CUDA: `MCMCStrategy` calls two CUDA kernels (`compute_relocation`, `quat_scale_to_covar_preci`)
  through `gsplat.strategy.ops`; on CPU they are swapped, only for the duration of the strategy call, for
  gsplat's torch covariance and a torch version of the paper's Eq. 9 relocation (`relocation_torch`).
- Resume: checkpoints hold parameters, Adam states, the strategy state, the torch/numpy RNG states, the
  metrics curve and the step. The training image of step s is a pure function of (seed, s) (one permutation per
  epoch), so a resumed run on CPU repeats the uninterrupted run bit for bit; on CUDA, gsplat's atomic adds make it
  equal only up to float rounding.
- Metrics: PSNR and SSIM (kornia) on every `eval_every`-th image (sorted by name, index 0 first, as gsplat's
  parser); LPIPS needs pretrained AlexNet/VGG weights that cannot be fetched offline and no LPIPS package is a
  dependency, so it is reported as null with the reason.
- Mixed precision is not used: gsplat's kernels run in float32 and 3DGS quality is sensitive to it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal
from unittest import mock

import numpy as np
import pycolmap
import torch
from kornia.metrics import ssim as kornia_ssim
from PIL import Image
from scipy.spatial import cKDTree

from feature_backends.base import select_device
from feature_backends.errors import ConfigError, InputError
from feature_backends.images import read_image
from recon.ply3dgs import GaussianArrays, write_ply

logger = logging.getLogger(__name__)

SH_C0 = 0.28209479177387814  # Y_0^0, maps an RGB colour to the DC coefficient: (rgb - 0.5) / SH_C0
PINHOLE_MODELS = ("PINHOLE", "SIMPLE_PINHOLE")
CUDA_BACKEND = "gsplat-cuda"
TORCH_BACKEND = "torch-reference"
LPIPS_UNAVAILABLE = "not computed: LPIPS needs pretrained AlexNet/VGG weights, which cannot be downloaded here"


@dataclass(frozen=True, kw_only=True)
class SplatConfig:
    iterations: int = 30_000
    #: hold out every k-th image (sorted by name, starting with the first); 0 trains on all images
    eval_every: int = 8
    #: image downscale factor; None: 1 on CUDA, on CPU the smallest power of 2 bringing the longer side to
    #: at most `cpu_max_side` pixels
    resolution_scale: int | None = None
    cpu_max_side: int = 320
    strategy: Literal["default", "mcmc"] = "default"
    sh_degree: int = 3
    sh_degree_interval: int = 1000
    # Densification schedule; None keeps the gsplat strategy's own default.
    refine_start_iter: int | None = None
    refine_stop_iter: int | None = None
    refine_every: int | None = None
    reset_every: int | None = None  # default strategy only
    cap_max: int = 1_000_000  # mcmc only: Gaussian budget
    init_opacity: float = 0.1
    ssim_lambda: float = 0.2
    #: evaluate train/test PSNR every this many steps; None: 10 points over the run
    curve_every: int | None = None
    checkpoint_every: int = 5000
    keep_checkpoints: int = 2
    num_renders: int = 4
    seed: int = 0
    device: str | None = None
    #: torch CPU threads while training (None: torch's default). On a shared machine 1 thread avoids OpenMP
    #: spin-waiting, which made a CPU step 20x slower in our measurements with 2 cores and 10 busy processes.
    cpu_threads: int | None = None
    #: False: start fresh; True: continue from the latest checkpoint; a path: continue from that checkpoint
    resume: bool | str = False

    def check(self) -> None:
        if self.iterations < 1:
            raise ConfigError(f"iterations must be positive, got {self.iterations}")
        if self.eval_every < 0 or self.eval_every == 1:
            raise ConfigError(f"eval_every must be 0 (no hold-out) or >= 2, got {self.eval_every}")
        if self.resolution_scale is not None and self.resolution_scale < 1:
            raise ConfigError(f"resolution_scale must be >= 1, got {self.resolution_scale}")
        if self.strategy not in ("default", "mcmc"):
            raise ConfigError(f"unknown strategy '{self.strategy}'; choose 'default' or 'mcmc'")
        if not 0 <= self.sh_degree <= 3:
            raise ConfigError(f"sh_degree must be in 0..3 (the 3DGS PLY layout), got {self.sh_degree}")
        if not 0.0 < self.init_opacity < 1.0:
            raise ConfigError(f"init_opacity must be in (0, 1), got {self.init_opacity}")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ConfigError(f"cpu_threads must be positive, got {self.cpu_threads}")
        if self.checkpoint_every < 1 or self.keep_checkpoints < 1 or self.sh_degree_interval < 1:
            raise ConfigError("checkpoint_every, keep_checkpoints and sh_degree_interval must be positive")


# ----------------------------------------------------------------------------------------------------------
# Input


@dataclass
class View:
    name: str
    image: torch.Tensor  # (H, W, 3) float32 in [0, 1]
    viewmat: torch.Tensor  # (4, 4) cam_from_world
    K: torch.Tensor  # (3, 3)

    @property
    def width(self) -> int:
        return self.image.shape[1]

    @property
    def height(self) -> int:
        return self.image.shape[0]


@dataclass
class Scene:
    train: list[View]
    test: list[View]
    points: np.ndarray  # (N, 3)
    colors: np.ndarray  # (N, 3) in [0, 1]
    scene_scale: float
    resolution_scale: int
    model_dir: Path


def find_model(out_dir: str | Path) -> tuple[Path, Path]:
    """(image_dir, sparse_dir) of the undistorted export in `out_dir`, or of `out_dir` itself."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise InputError(f"'{out_dir}' is not a folder")
    for root in (out_dir / "undistorted", out_dir):
        for sparse in (root / "sparse" / "0", root / "sparse"):
            if (sparse / "cameras.bin").is_file() or (sparse / "cameras.txt").is_file():
                if not (root / "images").is_dir():
                    raise InputError(f"found the model '{sparse}' but no image folder '{root / 'images'}'")
                return root / "images", sparse
    raise InputError(
        f"no sparse model in '{out_dir}': expected the undistorted export OUT/undistorted/{{images,sparse/0}} "
        "(written by recon's export stage) or a folder holding images/ and sparse/0/"
    )


def _auto_scale(width: int, height: int, max_side: int) -> int:
    scale = 1
    while max(width, height) / scale > max_side:
        scale *= 2
    return scale


def load_scene(out_dir: str | Path, config: SplatConfig, device: torch.device) -> Scene:
    image_dir, sparse_dir = find_model(out_dir)
    reconstruction = pycolmap.Reconstruction(sparse_dir)
    for camera in reconstruction.cameras.values():
        if camera.model.name not in PINHOLE_MODELS:
            raise InputError(
                f"camera {camera.camera_id} in '{sparse_dir}' is {camera.model.name}; Gaussian splatting needs "
                f"undistorted {' or '.join(PINHOLE_MODELS)} cameras: run the export stage (undistortion) and pass "
                "its output folder"
            )
    images = sorted((im for im in reconstruction.images.values() if im.has_pose), key=lambda im: im.name)
    if len(images) < 2:
        raise InputError(f"the model in '{sparse_dir}' has {len(images)} posed image(s); splatting needs at least 2")
    if len(reconstruction.points3D) < 4:
        raise InputError(f"the model in '{sparse_dir}' has {len(reconstruction.points3D)} 3D points; need >= 4")

    first_camera = reconstruction.cameras[images[0].camera_id]
    scale = config.resolution_scale
    if scale is None:
        scale = 1 if device.type == "cuda" else _auto_scale(first_camera.width, first_camera.height,
                                                             config.cpu_max_side)
    views: list[View] = []
    for image in images:
        camera = reconstruction.cameras[image.camera_id]
        path = image_dir / image.name
        pixels = read_image(path)
        if pixels.shape[:2] != (camera.height, camera.width):
            raise InputError(
                f"image '{path}' is {pixels.shape[1]}x{pixels.shape[0]} but its camera is "
                f"{camera.width}x{camera.height}; pass the undistorted images that belong to this model"
            )
        K = camera.calibration_matrix().astype(np.float64)
        if scale > 1:
            width, height = max(1, camera.width // scale), max(1, camera.height // scale)
            pixels = np.asarray(Image.fromarray((pixels * 255).round().astype(np.uint8)).resize(
                (width, height), Image.Resampling.BOX), np.float32) / 255.0
            # COLMAP pixel centres sit at +0.5, so scaling the whole first two rows is exact
            K[0] *= width / camera.width
            K[1] *= height / camera.height
        viewmat = np.eye(4)
        viewmat[:3] = image.cam_from_world().matrix()
        views.append(View(
            name=image.name,
            image=torch.from_numpy(np.ascontiguousarray(pixels[..., :3])).float().to(device),
            viewmat=torch.from_numpy(viewmat).float().to(device),
            K=torch.from_numpy(K).float().to(device),
        ))
    k = config.eval_every
    test = [v for i, v in enumerate(views) if k and i % k == 0]
    train = [v for i, v in enumerate(views) if not (k and i % k == 0)]

    ids = sorted(reconstruction.points3D)
    points = np.array([reconstruction.points3D[i].xyz for i in ids], np.float64)
    colors = np.array([reconstruction.points3D[i].color for i in ids], np.float64) / 255.0
    centers = np.array([im.projection_center() for im in images])
    # gsplat's parser: 1.1 x the largest camera distance from the mean camera centre
    scene_scale = float(np.linalg.norm(centers - centers.mean(0), axis=1).max() * 1.1) or 1.0
    return Scene(train, test, points, colors, scene_scale, scale, sparse_dir)


# ----------------------------------------------------------------------------------------------------------
# Gaussians


PARAM_NAMES = ("means", "scales", "quats", "opacities", "sh0", "shN")


def init_gaussians(points: np.ndarray, colors: np.ndarray, sh_degree: int, init_opacity: float,
                   device: torch.device) -> torch.nn.ParameterDict:
    num_neighbours = min(3, len(points) - 1)
    distances, _ = cKDTree(points).query(points, k=num_neighbours + 1)
    mean_distance = np.sqrt((distances[:, 1:] ** 2).mean(axis=1)).clip(min=1e-7)
    n = len(points)
    tensors = {
        "means": torch.from_numpy(points).float(),
        "scales": torch.from_numpy(np.log(mean_distance)).float()[:, None].repeat(1, 3),
        "quats": torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(n, 1),
        "opacities": torch.full((n,), math.log(init_opacity / (1 - init_opacity))),
        "sh0": ((torch.from_numpy(colors).float() - 0.5) / SH_C0)[:, None, :],
        "shN": torch.zeros(n, (sh_degree + 1) ** 2 - 1, 3),
    }
    return torch.nn.ParameterDict({k: torch.nn.Parameter(v.to(device)) for k, v in tensors.items()})


def to_arrays(params: torch.nn.ParameterDict) -> GaussianArrays:
    def get(name: str) -> np.ndarray:
        return params[name].detach().cpu().numpy()

    return GaussianArrays(means=get("means"), sh0=get("sh0"), shN=get("shN"), opacities=get("opacities"),
                          scales=get("scales"), quats=get("quats"))


# ----------------------------------------------------------------------------------------------------------
# Rasterization


def composite_sorted_pairs(means2d: torch.Tensor, conics: torch.Tensor, opacities: torch.Tensor,
                           colors: torch.Tensor, depths: torch.Tensor, radii: torch.Tensor,
                           width: int, height: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Front-to-back alpha compositing of projected Gaussians, differentiable by autograd.

    means2d (N,2) px, conics (N,3) upper triangle of the inverse 2D covariance, opacities (N,), colors (N,C),
    depths (N,), radii (N,2) int px (0 = culled). Returns image (H,W,C) and alpha (H,W,1).

    Candidate pixels are those of the box where the Gaussian's alpha can reach 1/255 (the CUDA kernel's
    cut-off): the ellipse d^T Σ^-1 d <= 2 ln(255 o), tighter than the 3.33σ radius for low opacities. All
    per-pair quantities come from one gather of a packed per-Gaussian tensor, which keeps the backward pass
    to a single scatter.
    """
    device = means2d.device
    channels = colors.shape[-1]
    visible = (radii > 0).all(dim=-1) & (opacities.detach() * 255.0 > 1.0)
    ids = visible.nonzero()[:, 0]
    ids = ids[torch.argsort(depths[ids].detach(), stable=True)]  # depth rank -> Gaussian id
    packed = torch.cat([means2d, conics, opacities[:, None], colors], dim=1)[ids]  # (R, 6+C)

    with torch.no_grad():
        center, conic, opacity = packed[:, 0:2], packed[:, 2:5], packed[:, 5]
        determinant = (conic[:, 0] * conic[:, 2] - conic[:, 1] ** 2).clamp_min(1e-12)
        reach = torch.sqrt(2.0 * torch.log(255.0 * opacity))
        half_w = torch.minimum(reach * torch.sqrt(conic[:, 2] / determinant), radii[ids, 0].float())
        half_h = torch.minimum(reach * torch.sqrt(conic[:, 0] / determinant), radii[ids, 1].float())
        x0 = (center[:, 0] - half_w).floor().clamp(0, width).long()
        x1 = (center[:, 0] + half_w).ceil().clamp(0, width).long()
        y0 = (center[:, 1] - half_h).floor().clamp(0, height).long()
        y1 = (center[:, 1] + half_h).ceil().clamp(0, height).long()
        box_w = x1 - x0
        area = box_w * (y1 - y0)
        rank = torch.repeat_interleave(torch.arange(len(ids), device=device), area)
        local = torch.arange(len(rank), device=device) - torch.repeat_interleave(torch.cumsum(area, 0) - area, area)
        px = x0[rank] + local % box_w[rank]
        py = y0[rank] + local // box_w[rank]
        g = packed[rank]
        dx, dy = px + 0.5 - g[:, 0], py + 0.5 - g[:, 1]
        sigma = 0.5 * (g[:, 2] * dx * dx + g[:, 4] * dy * dy) + g[:, 3] * dx * dy
        keep = (sigma >= 0) & (g[:, 5] * torch.exp(-sigma) >= 1.0 / 255.0)  # pairs the CUDA kernel skips
        rank, pixel = rank[keep], (py * width + px)[keep]
        # enumeration is in depth order, so a stable sort by pixel keeps each pixel's list front to back
        pixel, order = torch.sort(pixel, stable=True)
        rank = rank[order]
        px, py = (pixel % width).to(packed.dtype) + 0.5, (pixel // width).to(packed.dtype) + 0.5
        segment_start = torch.ones_like(pixel, dtype=torch.bool)
        segment_start[1:] = pixel[1:] != pixel[:-1]
        first = torch.cummax(torch.where(segment_start, torch.arange(len(pixel), device=device), 0), 0).values

    g = packed[rank]
    dx, dy = px - g[:, 0], py - g[:, 1]
    sigma = 0.5 * (g[:, 2] * dx * dx + g[:, 4] * dy * dy) + g[:, 3] * dx * dy
    alpha = torch.clamp_max(g[:, 5] * torch.exp(-sigma), 0.999)
    log_transmit = torch.log1p(-alpha.double())
    running = torch.cumsum(log_transmit, 0) - log_transmit  # exclusive prefix sum over all pairs
    transmittance = torch.exp(running - running[first]).to(alpha.dtype)  # restart at each pixel's first pair
    with torch.no_grad():
        # stop where the transmittance after this Gaussian would drop to 1e-4, as the CUDA kernel does
        alive = transmittance * (1 - alpha) > 1e-4
    weights = torch.where(alive, alpha * transmittance, 0.0)
    contributions = torch.cat([weights[:, None] * g[:, 6:], weights[:, None]], dim=1)
    accumulated = torch.zeros(width * height, channels + 1, device=device, dtype=packed.dtype)
    accumulated = accumulated.index_add(0, pixel, contributions).reshape(height, width, channels + 1)
    return accumulated[..., :channels], accumulated[..., channels:]


def rasterize_reference(means: torch.Tensor, quats: torch.Tensor, scales: torch.Tensor, opacities: torch.Tensor,
                        sh_coeffs: torch.Tensor, viewmat: torch.Tensor, K: torch.Tensor, width: int, height: int,
                        sh_degree: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """The CPU stand-in for `gsplat.rasterization` (one camera, packed=False); returns (1,H,W,3), (1,H,W,1), info."""
    from gsplat.cuda._torch_impl import _fully_fused_projection, _quat_scale_to_covar_preci, _spherical_harmonics

    covars, _ = _quat_scale_to_covar_preci(quats, scales, compute_covar=True, compute_preci=False, triu=False)
    radii, means2d, depths, conics, _ = _fully_fused_projection(means, covars, viewmat[None], K[None], width, height)
    camera_center = torch.linalg.inv(viewmat)[:3, 3]
    colors = _spherical_harmonics(sh_degree, means - camera_center, sh_coeffs)
    colors = torch.clamp_min(colors + 0.5, 0.0)  # the same offset as gsplat's rasterization
    image, alpha = composite_sorted_pairs(means2d[0], conics[0], opacities, colors, depths[0], radii[0], width, height)
    info = {"means2d": means2d, "radii": radii, "depths": depths, "conics": conics, "width": width,
            "height": height, "n_cameras": 1, "gaussian_ids": None}
    return image[None], alpha[None], info


def render(params: torch.nn.ParameterDict, view: View, sh_degree: int, backend: str,
           absgrad: bool = False) -> tuple[torch.Tensor, dict[str, Any]]:
    """Render `view`; returns the image (H,W,3) and the rasterizer's info dict."""
    means = params["means"]
    quats = params["quats"]
    scales = torch.exp(params["scales"])
    opacities = torch.sigmoid(params["opacities"])
    sh_coeffs = torch.cat([params["sh0"], params["shN"]], dim=1)
    if backend == CUDA_BACKEND:
        from gsplat import rasterization

        image, _, info = rasterization(means, quats, scales, opacities, sh_coeffs, view.viewmat[None], view.K[None],
                                       view.width, view.height, sh_degree=sh_degree, packed=False, absgrad=absgrad)
    else:
        image, _, info = rasterize_reference(means, quats, scales, opacities, sh_coeffs, view.viewmat, view.K,
                                             view.width, view.height, sh_degree)
    return image[0], info


# ----------------------------------------------------------------------------------------------------------
# Strategies


def relocation_torch(opacities: torch.Tensor, scales: torch.Tensor, ratios: torch.Tensor,
                     binoms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 9 of "3D Gaussian Splatting as Markov Chain Monte Carlo", for `gsplat.relocation.compute_relocation`.

    A Gaussian copied into n Gaussians gets opacity 1-(1-o)^(1/n) and its scale multiplied by
    o / sum_{i=1..n} sum_{k=0..i-1} C(i-1,k) (-1)^k o'^(k+1) / sqrt(k+1). Evaluated in float64: the alternating
    binomial sum cancels badly in float32 for large n.
    """
    n_max = binoms.shape[0]
    n = ratios.clamp(1, n_max).long()
    opacity = opacities.double()
    new_opacity = 1.0 - (1.0 - opacity) ** (1.0 / n.double())
    k = torch.arange(n_max, device=opacities.device, dtype=torch.float64)
    coefficient = binoms.double() * (-1.0) ** k / torch.sqrt(k + 1)  # [i-1, k]
    powers = new_opacity[:, None] ** (k + 1)  # [N, k]
    per_i = powers @ coefficient.T  # [N, i-1]
    used = torch.arange(1, n_max + 1, device=opacities.device)[None] <= n[:, None]
    denominator = (per_i * used).sum(dim=1)
    new_scales = (opacity / denominator)[:, None] * scales.double()
    return new_opacity.to(opacities.dtype), new_scales.to(scales.dtype)


@contextlib.contextmanager
def gsplat_strategy_ops_on_cpu():
    """Swap the two CUDA kernels that gsplat's MCMC ops call for torch equivalents, for this block only."""
    import gsplat.strategy.ops as ops
    from gsplat.cuda._torch_impl import _quat_scale_to_covar_preci

    with mock.patch.object(ops, "compute_relocation", relocation_torch), \
            mock.patch.object(ops, "quat_scale_to_covar_preci", _quat_scale_to_covar_preci):
        yield


def make_strategy(config: SplatConfig):
    from gsplat import DefaultStrategy, MCMCStrategy

    overrides = {key: getattr(config, key) for key in ("refine_start_iter", "refine_stop_iter", "refine_every")
                 if getattr(config, key) is not None}
    if config.strategy == "mcmc":
        return MCMCStrategy(cap_max=config.cap_max, **overrides)
    if config.reset_every is not None:
        overrides["reset_every"] = config.reset_every
    return DefaultStrategy(**overrides)


def make_optimizers(params: torch.nn.ParameterDict, scene_scale: float) -> dict[str, torch.optim.Optimizer]:
    # gsplat simple_trainer's learning rates (batch size 1)
    rates = {"means": 1.6e-4 * scene_scale, "scales": 5e-3, "quats": 1e-3, "opacities": 5e-2,
             "sh0": 2.5e-3, "shN": 2.5e-3 / 20}
    return {name: torch.optim.Adam([{"params": params[name], "lr": rates[name], "name": name}], eps=1e-15)
            for name in PARAM_NAMES}


def means_lr(step: int, scene_scale: float, iterations: int) -> float:
    return 1.6e-4 * scene_scale * 0.01 ** (step / iterations)


# ----------------------------------------------------------------------------------------------------------
# Metrics


def psnr(rendered: torch.Tensor, target: torch.Tensor) -> float:
    mse = torch.mean((rendered.clamp(0, 1) - target) ** 2).item()
    return float("inf") if mse == 0 else -10.0 * math.log10(mse)


def ssim(rendered: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return kornia_ssim(rendered.permute(2, 0, 1)[None], target.permute(2, 0, 1)[None], window_size=11).mean()


@torch.no_grad()
def evaluate(params: torch.nn.ParameterDict, views: list[View], sh_degree: int, backend: str) -> dict[str, float]:
    if not views:
        return {"psnr": None, "ssim": None}
    scores = []
    for view in views:
        image, _ = render(params, view, sh_degree, backend)
        scores.append((psnr(image, view.image), ssim(image.clamp(0, 1), view.image).item()))
    return {"psnr": float(np.mean([s[0] for s in scores])), "ssim": float(np.mean([s[1] for s in scores]))}


def train_image_index(step: int, num_train: int, seed: int) -> int:
    """The training view of `step`: one shuffled pass per epoch, a pure function so resuming repeats it."""
    epoch, position = divmod(step, num_train)
    return int(np.random.default_rng([seed, epoch]).permutation(num_train)[position])


# ----------------------------------------------------------------------------------------------------------
# Checkpoints


def _checkpoint_dir(splat_dir: Path) -> Path:
    return splat_dir / "checkpoints"


def latest_checkpoint(splat_dir: Path) -> Path | None:
    paths = sorted(_checkpoint_dir(splat_dir).glob("step_*.pt"))
    return paths[-1] if paths else None


def save_checkpoint(splat_dir: Path, step: int, params, optimizers, strategy_state, record: dict,
                    config: SplatConfig) -> Path:
    directory = _checkpoint_dir(splat_dir)
    directory.mkdir(parents=True, exist_ok=True)
    numpy_state = np.random.get_state()
    payload = {
        "step": step,
        "params": {k: v.detach().cpu() for k, v in params.items()},
        "optimizers": {k: opt.state_dict() for k, opt in optimizers.items()},
        "strategy_state": strategy_state,
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy_keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
            "numpy_pos": int(numpy_state[2]),
        },
        "record": json.dumps(record),
        "config": json.dumps(asdict(config)),
    }
    path = directory / f"step_{step:07d}.pt"
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    for old in sorted(directory.glob("step_*.pt"))[:-config.keep_checkpoints]:
        old.unlink()
    return path


def load_checkpoint(path: Path, device: torch.device) -> dict[str, Any]:
    if not path.is_file():
        raise InputError(f"checkpoint '{path}' does not exist")
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except (RuntimeError, OSError, EOFError) as error:  # torch raises these for truncated or foreign files
        raise InputError(f"cannot read checkpoint '{path}': {error}") from error
    if not isinstance(payload, dict) or "params" not in payload or "step" not in payload:
        raise InputError(f"'{path}' is not a recon splat checkpoint")
    return payload


def _restore_rng(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"].cpu())
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([state.cpu() for state in rng["cuda"]])
    np.random.set_state(("MT19937", rng["numpy_keys"].cpu().numpy().astype(np.uint32), rng["numpy_pos"], 0, 0.0))


# ----------------------------------------------------------------------------------------------------------
# Outputs


def save_renders(params, views: list[View], sh_degree: int, backend: str, directory: Path) -> list[Path]:
    """Ground truth (left) next to the render (right), one PNG per view."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    with torch.no_grad():
        for view in views:
            image, _ = render(params, view, sh_degree, backend)
            pair = torch.cat([view.image, image.clamp(0, 1)], dim=1).cpu().numpy()
            path = directory / (Path(view.name).with_suffix("").as_posix().replace("/", "__") + ".png")
            Image.fromarray((pair * 255).round().astype(np.uint8)).save(path)
            paths.append(path)
    return paths


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


# ----------------------------------------------------------------------------------------------------------
# Training


def splat(out_dir: str | Path, config: SplatConfig = SplatConfig()) -> Path:
    """Train Gaussians on the model in `out_dir`; write `out_dir/splats/` and return that folder.

    splats/ holds point_cloud_init.ply, point_cloud.ply (3DGS layout), metrics.json, renders/*.png
    (ground truth | render for the first held-out views) and checkpoints/step_*.pt.
    """
    config.check()
    previous_threads = torch.get_num_threads()
    if config.cpu_threads:
        torch.set_num_threads(config.cpu_threads)
    try:
        return _train(out_dir, config)
    finally:
        torch.set_num_threads(previous_threads)


def _train(out_dir: str | Path, config: SplatConfig) -> Path:
    device = select_device(config.device)
    backend = CUDA_BACKEND if device.type == "cuda" else TORCH_BACKEND
    out_dir = Path(out_dir)
    scene = load_scene(out_dir, config, device)
    splat_dir = out_dir / "splats"
    splat_dir.mkdir(parents=True, exist_ok=True)
    width, height = scene.train[0].width, scene.train[0].height
    if backend == CUDA_BACKEND:
        logger.info("splat: rasterizer gsplat CUDA `rasterization` on %s, %dx%d (scale 1/%d)", device, width,
                    height, scene.resolution_scale)
    else:
        logger.info("splat: no CUDA; rasterizer is the PyTorch reference path (gsplat torch projection + recon "
                    "compositor) on CPU at %dx%d (scale 1/%d)", width, height, scene.resolution_scale)
    logger.info("splat: %d train / %d held-out views, %d points, strategy %s, %d iterations",
                len(scene.train), len(scene.test), len(scene.points), config.strategy, config.iterations)

    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    strategy = make_strategy(config)
    resume_path = None
    if config.resume is True:
        resume_path = latest_checkpoint(splat_dir)
        if resume_path is None:
            raise InputError(f"nothing to resume: no checkpoint in '{_checkpoint_dir(splat_dir)}'")
    elif config.resume:
        resume_path = Path(config.resume)

    if resume_path is not None:
        payload = load_checkpoint(resume_path, device)
        params = torch.nn.ParameterDict({k: torch.nn.Parameter(v.to(device)) for k, v in payload["params"].items()})
        optimizers = make_optimizers(params, scene.scene_scale)
        for name, optimizer in optimizers.items():
            optimizer.load_state_dict(payload["optimizers"][name])
        strategy_state = payload["strategy_state"]
        record = json.loads(payload["record"])
        start_step = int(payload["step"])
        _restore_rng(payload["rng"])
        saved = json.loads(payload["config"])
        if saved["iterations"] != config.iterations or saved["strategy"] != config.strategy:
            logger.warning("splat: resuming a run made with iterations=%s strategy=%s under iterations=%s "
                           "strategy=%s; the schedules follow the new values", saved["iterations"],
                           saved["strategy"], config.iterations, config.strategy)
        logger.info("splat: resumed from %s at step %d", resume_path, start_step)
    else:
        params = init_gaussians(scene.points, scene.colors, config.sh_degree, config.init_opacity, device)
        optimizers = make_optimizers(params, scene.scene_scale)
        strategy_state = (strategy.initialize_state(scene_scale=scene.scene_scale) if config.strategy == "default"
                          else strategy.initialize_state())
        write_ply(splat_dir / "point_cloud_init.ply", to_arrays(params))
        initial = evaluate(params, scene.test, 0, backend)
        record = {"initial": {"test": initial, "num_gaussians": len(params["means"])}, "curve": [],
                  "train_seconds": 0.0}
        logger.info("splat: initial held-out PSNR %s dB, SSIM %s", _fmt(initial["psnr"]), _fmt(initial["ssim"], 3))
        start_step = 0
    strategy.check_sanity(params, optimizers)

    curve_every = config.curve_every or max(1, config.iterations // 10)
    train_probe = [scene.train[i] for i in np.linspace(0, len(scene.train) - 1, min(4, len(scene.train))).astype(int)]
    is_default = config.strategy == "default"
    absgrad = bool(getattr(strategy, "absgrad", False))
    clock = time.perf_counter()
    for step in range(start_step, config.iterations):
        view = scene.train[train_image_index(step, len(scene.train), config.seed)]
        sh_degree = min(step // config.sh_degree_interval, config.sh_degree)
        lr = means_lr(step, scene.scene_scale, config.iterations)
        for group in optimizers["means"].param_groups:
            group["lr"] = lr
        image, info = render(params, view, sh_degree, backend, absgrad=absgrad)
        if is_default:
            strategy.step_pre_backward(params, optimizers, strategy_state, step, info)
        l1 = torch.abs(image - view.image).mean()
        loss = (1 - config.ssim_lambda) * l1 + config.ssim_lambda * (1 - ssim(image, view.image))
        if not is_default:  # gsplat's MCMC preset regularisers
            loss = loss + 0.01 * torch.sigmoid(params["opacities"]).mean() + 0.01 * torch.exp(params["scales"]).mean()
        loss.backward()
        for optimizer in optimizers.values():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        with gsplat_strategy_ops_on_cpu() if device.type != "cuda" else contextlib.nullcontext():
            if is_default:
                strategy.step_post_backward(params, optimizers, strategy_state, step, info, packed=False)
            else:
                strategy.step_post_backward(params, optimizers, strategy_state, step, info, lr=lr)
        done = step + 1
        if done % curve_every == 0 or done == config.iterations:
            record["train_seconds"] += time.perf_counter() - clock
            point = {"step": done, "loss": float(loss.item()), "num_gaussians": len(params["means"]),
                     "train_psnr": evaluate(params, train_probe, sh_degree, backend)["psnr"],
                     "test_psnr": evaluate(params, scene.test, sh_degree, backend)["psnr"]}
            record["curve"].append(point)
            logger.info("splat: step %d/%d loss %.4f train PSNR %s test PSNR %s, %d Gaussians", done,
                        config.iterations, point["loss"], _fmt(point["train_psnr"]), _fmt(point["test_psnr"]),
                        point["num_gaussians"])
            clock = time.perf_counter()
        if done % config.checkpoint_every == 0 or done == config.iterations:
            record["train_seconds"] += time.perf_counter() - clock
            save_checkpoint(splat_dir, done, params, optimizers, strategy_state, record, config)
            clock = time.perf_counter()

    final_degree = min(max(config.iterations - 1, 0) // config.sh_degree_interval, config.sh_degree)
    write_ply(splat_dir / "point_cloud.ply", to_arrays(params))
    save_renders(params, scene.test[:config.num_renders] or scene.train[:config.num_renders], final_degree, backend,
                 splat_dir / "renders")
    final_test = evaluate(params, scene.test, final_degree, backend)
    final_test["lpips"] = None
    trained_steps = config.iterations
    metrics = {
        "backend": backend,
        "device": str(device),
        "strategy": config.strategy,
        "iterations": trained_steps,
        "resolution_scale": scene.resolution_scale,
        "image_size": [width, height],
        "model": str(scene.model_dir),
        "train_views": [v.name for v in scene.train],
        "test_views": [v.name for v in scene.test],
        "initial": record["initial"],
        "final": {"test": final_test, "train": evaluate(params, train_probe, final_degree, backend),
                  "num_gaussians": len(params["means"])},
        "lpips": LPIPS_UNAVAILABLE,
        "curve": record["curve"],
        "train_seconds": record["train_seconds"],
        "iterations_per_second": trained_steps / record["train_seconds"] if record["train_seconds"] else None,
        "config": asdict(replace(config, resume=str(config.resume))),
    }
    _write_json(splat_dir / "metrics.json", metrics)
    logger.info("splat: held-out PSNR %s -> %s dB, SSIM %s -> %s; wrote %s",
                _fmt(record["initial"]["test"]["psnr"]), _fmt(final_test["psnr"]),
                _fmt(record["initial"]["test"]["ssim"], 3), _fmt(final_test["ssim"], 3), splat_dir)
    return splat_dir

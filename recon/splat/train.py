"""Training: Gaussian initialisation, rendering, the gsplat strategies and optimizers, metrics and the loop.

- Initialisation follows the 3DGS paper and gsplat's simple_trainer: one Gaussian per 3D point, colour from the
  point as the SH DC term, scale from the root-mean-square distance to the 3 nearest neighbours (scipy cKDTree:
  open3d does not import here), identity rotation, opacity 0.1. SH degree rises by one every
  `sh_degree_interval` steps up to `sh_degree`.
- Training loop, learning rates and densification are gsplat's: its `DefaultStrategy` (3DGS split/clone/prune)
  or `MCMCStrategy`, Adam per parameter group, means lr decayed exponentially to 1% over the run, loss
  0.8·L1 + 0.2·(1−SSIM) (+ the MCMC opacity/scale regularisers).
- Rasterizer: `gsplat.rasterization` on CUDA, the PyTorch reference path of `cpu_raster` otherwise. The log says
  which path ran; metrics.json records it.
- Metrics: PSNR and SSIM (kornia) on the held-out views; LPIPS needs pretrained AlexNet/VGG weights that cannot be
  fetched offline and no LPIPS package is a dependency, so it is reported as null with the reason.
- Mixed precision is not used: gsplat's kernels run in float32 and 3DGS quality is sensitive to it.
- `run_training` is cut in `init_or_resume` (a `Run`: the state a step changes and a checkpoint saves), `train_step`,
  `record_curve_point` and `finish`; `Job` holds what stays fixed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from kornia.metrics import ssim as kornia_ssim
from PIL import Image
from scipy.spatial import cKDTree

from feature_backends.base import select_device

from .checkpoint import load_checkpoint, restore_rng, resume_path, save_checkpoint
from .cpu_raster import gsplat_strategy_ops_on_cpu, rasterize_reference
from .ply import GaussianArrays, write_ply
from .scene import Scene, View, load_scene

if TYPE_CHECKING:
    from . import SplatConfig

logger = logging.getLogger(__name__)

SH_C0 = 0.28209479177387814  # Y_0^0, maps an RGB colour to the DC coefficient: (rgb - 0.5) / SH_C0
CUDA_BACKEND = "gsplat-cuda"
TORCH_BACKEND = "torch-reference"
LPIPS_UNAVAILABLE = "not computed: LPIPS needs pretrained AlexNet/VGG weights, which cannot be downloaded here"


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
# Rendering


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


@dataclass
class Job:
    """What stays fixed during a run: the config, the scene, where outputs go and which rasterizer runs."""

    config: SplatConfig
    scene: Scene
    splat_dir: Path
    device: torch.device
    backend: str
    train_probe: list[View]  # up to 4 training views, spread over the sorted list, for the train-PSNR curve


@dataclass
class Run:
    """What training changes: parameters, optimizers, the strategy and its state, the metrics record."""

    params: torch.nn.ParameterDict
    optimizers: dict[str, torch.optim.Optimizer]
    strategy: Any
    strategy_state: dict[str, Any]
    record: dict[str, Any]
    start_step: int


def run_training(out_dir: str | Path, config: SplatConfig) -> Path:
    """Load the scene, start or resume, train to `config.iterations` and write the outputs; see `splat`."""
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
    train_probe = [scene.train[i] for i in np.linspace(0, len(scene.train) - 1, min(4, len(scene.train))).astype(int)]
    job = Job(config, scene, splat_dir, device, backend, train_probe)

    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    run = init_or_resume(job)
    curve_every = config.curve_every or max(1, config.iterations // 10)
    clock = time.perf_counter()
    for step in range(run.start_step, config.iterations):
        loss, sh_degree = train_step(job, run, step)
        done = step + 1
        if done % curve_every == 0 or done == config.iterations:
            run.record["train_seconds"] += time.perf_counter() - clock
            record_curve_point(job, run, done, loss, sh_degree)
            clock = time.perf_counter()
        if done % config.checkpoint_every == 0 or done == config.iterations:
            run.record["train_seconds"] += time.perf_counter() - clock
            save_checkpoint(splat_dir, done, run.params, run.optimizers, run.strategy_state, run.record, config)
            clock = time.perf_counter()
    return finish(job, run)


def init_or_resume(job: Job) -> Run:
    """A fresh run from the sparse points (writing point_cloud_init.ply), or the state of the checkpoint to resume."""
    config, scene = job.config, job.scene
    strategy = make_strategy(config)
    path = resume_path(job.splat_dir, config.resume)
    if path is not None:
        payload = load_checkpoint(path, job.device)
        params = torch.nn.ParameterDict({k: torch.nn.Parameter(v.to(job.device))
                                         for k, v in payload["params"].items()})
        optimizers = make_optimizers(params, scene.scene_scale)
        for name, optimizer in optimizers.items():
            optimizer.load_state_dict(payload["optimizers"][name])
        run = Run(params, optimizers, strategy, payload["strategy_state"], json.loads(payload["record"]),
                  int(payload["step"]))
        restore_rng(payload["rng"])
        saved = json.loads(payload["config"])
        if saved["iterations"] != config.iterations or saved["strategy"] != config.strategy:
            logger.warning("splat: resuming a run made with iterations=%s strategy=%s under iterations=%s "
                           "strategy=%s; the schedules follow the new values", saved["iterations"],
                           saved["strategy"], config.iterations, config.strategy)
        logger.info("splat: resumed from %s at step %d", path, run.start_step)
    else:
        params = init_gaussians(scene.points, scene.colors, config.sh_degree, config.init_opacity, job.device)
        optimizers = make_optimizers(params, scene.scene_scale)
        strategy_state = (strategy.initialize_state(scene_scale=scene.scene_scale) if config.strategy == "default"
                          else strategy.initialize_state())
        write_ply(job.splat_dir / "point_cloud_init.ply", to_arrays(params))
        initial = evaluate(params, scene.test, 0, job.backend)
        record = {"initial": {"test": initial, "num_gaussians": len(params["means"])}, "curve": [],
                  "train_seconds": 0.0}
        logger.info("splat: initial held-out PSNR %s dB, SSIM %s", _fmt(initial["psnr"]), _fmt(initial["ssim"], 3))
        run = Run(params, optimizers, strategy, strategy_state, record, 0)
    strategy.check_sanity(run.params, run.optimizers)
    return run


def train_step(job: Job, run: Run, step: int) -> tuple[torch.Tensor, int]:
    """One optimisation step on the training view of `step`, densification included; returns (loss, SH degree)."""
    config, params, optimizers = job.config, run.params, run.optimizers
    is_default = config.strategy == "default"
    view = job.scene.train[train_image_index(step, len(job.scene.train), config.seed)]
    sh_degree = min(step // config.sh_degree_interval, config.sh_degree)
    lr = means_lr(step, job.scene.scene_scale, config.iterations)
    for group in optimizers["means"].param_groups:
        group["lr"] = lr
    image, info = render(params, view, sh_degree, job.backend, absgrad=bool(getattr(run.strategy, "absgrad", False)))
    if is_default:
        run.strategy.step_pre_backward(params, optimizers, run.strategy_state, step, info)
    l1 = torch.abs(image - view.image).mean()
    loss = (1 - config.ssim_lambda) * l1 + config.ssim_lambda * (1 - ssim(image, view.image))
    if not is_default:  # gsplat's MCMC preset regularisers
        loss = loss + 0.01 * torch.sigmoid(params["opacities"]).mean() + 0.01 * torch.exp(params["scales"]).mean()
    loss.backward()
    for optimizer in optimizers.values():
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    with gsplat_strategy_ops_on_cpu() if job.device.type != "cuda" else contextlib.nullcontext():
        if is_default:
            run.strategy.step_post_backward(params, optimizers, run.strategy_state, step, info, packed=False)
        else:
            run.strategy.step_post_backward(params, optimizers, run.strategy_state, step, info, lr=lr)
    return loss, sh_degree


def record_curve_point(job: Job, run: Run, done: int, loss: torch.Tensor, sh_degree: int) -> None:
    """Append loss, Gaussian count and train/held-out PSNR after `done` steps to the curve, and log them."""
    point = {"step": done, "loss": float(loss.item()), "num_gaussians": len(run.params["means"]),
             "train_psnr": evaluate(run.params, job.train_probe, sh_degree, job.backend)["psnr"],
             "test_psnr": evaluate(run.params, job.scene.test, sh_degree, job.backend)["psnr"]}
    run.record["curve"].append(point)
    logger.info("splat: step %d/%d loss %.4f train PSNR %s test PSNR %s, %d Gaussians", done,
                job.config.iterations, point["loss"], _fmt(point["train_psnr"]), _fmt(point["test_psnr"]),
                point["num_gaussians"])


def finish(job: Job, run: Run) -> Path:
    """Write point_cloud.ply, the renders and metrics.json; return the splats folder."""
    config, scene, params, record = job.config, job.scene, run.params, run.record
    final_degree = min(max(config.iterations - 1, 0) // config.sh_degree_interval, config.sh_degree)
    write_ply(job.splat_dir / "point_cloud.ply", to_arrays(params))
    save_renders(params, scene.test[:config.num_renders] or scene.train[:config.num_renders], final_degree,
                 job.backend, job.splat_dir / "renders")
    final_test = evaluate(params, scene.test, final_degree, job.backend)
    final_test["lpips"] = None
    trained_steps = config.iterations
    metrics = {
        "backend": job.backend,
        "device": str(job.device),
        "strategy": config.strategy,
        "iterations": trained_steps,
        "resolution_scale": scene.resolution_scale,
        "image_size": [scene.train[0].width, scene.train[0].height],
        "model": str(scene.model_dir),
        "train_views": [v.name for v in scene.train],
        "test_views": [v.name for v in scene.test],
        "initial": record["initial"],
        "final": {"test": final_test, "train": evaluate(params, job.train_probe, final_degree, job.backend),
                  "num_gaussians": len(params["means"])},
        "lpips": LPIPS_UNAVAILABLE,
        "curve": record["curve"],
        "train_seconds": record["train_seconds"],
        "iterations_per_second": trained_steps / record["train_seconds"] if record["train_seconds"] else None,
        "config": asdict(replace(config, resume=str(config.resume))),
    }
    _write_json(job.splat_dir / "metrics.json", metrics)
    logger.info("splat: held-out PSNR %s -> %s dB, SSIM %s -> %s; wrote %s",
                _fmt(record["initial"]["test"]["psnr"]), _fmt(final_test["psnr"]),
                _fmt(record["initial"]["test"]["ssim"], 3), _fmt(final_test["ssim"], 3), job.splat_dir)
    return job.splat_dir

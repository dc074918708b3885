"""`recon splat`: train a 3D Gaussian Splatting scene from the undistorted SfM model, evaluated on held-out views.

Design (details in each sub-module's docstring)
- `scene`: the input is the undistorted PINHOLE export (`OUT/undistorted/{images,sparse/0}`) or a folder holding
  `images/` + `sparse/0`; distorted cameras are refused, since splatting rasterizers are pinhole-only.
- `train`: initialisation, learning rates, densification (`DefaultStrategy` / `MCMCStrategy`) and loss follow
  gsplat's simple_trainer; PSNR/SSIM on every `eval_every`-th image; LPIPS is null (no offline weights).
- `cpu_raster`: without CUDA, gsplat's torch projection plus a compositor of our own, differentiable by autograd,
  and torch stand-ins for the two CUDA kernels the MCMC strategy calls.
- `checkpoint`: parameters, Adam and strategy states, RNG states and the metrics record, so a resumed run on CPU
  repeats the uninterrupted run bit for bit.
- `ply`: the 3DGS PLY layout that viewers expect.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from feature_backends.errors import ConfigError
from recon.options import option

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .cpu_raster import composite_sorted_pairs, gsplat_strategy_ops_on_cpu, rasterize_reference, relocation_torch
from .ply import GaussianArrays, read_ply, write_ply
from .scene import Scene, View, find_model, load_scene
from .train import CUDA_BACKEND, TORCH_BACKEND, evaluate, init_gaussians, psnr, render, run_training, ssim

__all__ = [
    "CUDA_BACKEND", "TORCH_BACKEND", "GaussianArrays", "Scene", "SplatConfig", "View", "composite_sorted_pairs",
    "evaluate", "find_model", "gsplat_strategy_ops_on_cpu", "init_gaussians", "latest_checkpoint",
    "load_checkpoint", "load_scene", "psnr", "rasterize_reference", "read_ply", "relocation_torch", "render",
    "save_checkpoint", "splat", "ssim", "write_ply",
]

RESOLUTION_SCALES = (1, 2, 4, 8)


@dataclass(frozen=True, kw_only=True)
class SplatConfig:
    iterations: int = option(30_000, run_flags=("--splat-iterations",), help="training steps")
    eval_every: int = option(8, help="hold out every k-th image (sorted by name, starting with the first); 0 trains "
                                     "on all images")
    resolution_scale: int | None = option(
        None, argparse={"type": int, "choices": RESOLUTION_SCALES},
        help="image downscale factor; None: 1 on CUDA, on CPU the smallest power of 2 bringing the longer side to "
             "at most `cpu_max_side` pixels")
    cpu_max_side: int = option(320, help="longest image side on CPU when resolution_scale is not given")
    strategy: Literal["default", "mcmc"] = option("default", run_flags=("--splat-strategy",),
                                                  help="densification: gsplat's DefaultStrategy or MCMCStrategy")
    sh_degree: int = option(3, help="final spherical-harmonics degree (0..3)")
    sh_degree_interval: int = option(1000, help="steps between raising the SH degree by one")
    refine_start_iter: int | None = option(None, help="first densification step (None: the strategy's default)")
    refine_stop_iter: int | None = option(None, help="last densification step (None: the strategy's default)")
    refine_every: int | None = option(None, help="steps between densifications (None: the strategy's default)")
    reset_every: int | None = option(None, help="default strategy only: steps between opacity resets (None: the "
                                                "strategy's default)")
    cap_max: int = option(1_000_000, help="mcmc only: Gaussian budget")
    init_opacity: float = option(0.1, help="opacity of the initial Gaussians, in (0, 1)")
    ssim_lambda: float = option(0.2, help="weight of 1-SSIM in the loss (the rest is L1)")
    curve_every: int | None = option(None, help="evaluate train/test PSNR every this many steps; None: 10 points "
                                                "over the run")
    checkpoint_every: int = option(5000, help="steps between checkpoints (OUT/splats/checkpoints/step_*.pt)")
    keep_checkpoints: int = option(2, help="newest checkpoints kept")
    num_renders: int = option(4, help="held-out views saved as ground truth | render PNGs")
    seed: int = option(0, help="random seed (initial state and the order of training views)")
    device: str | None = option(None, help="torch device (default: CUDA if available, else CPU)")
    cpu_threads: int | None = option(
        None, help="torch CPU threads while training (None: torch's default). On a shared machine 1 thread avoids "
                   "OpenMP spin-waiting, which made a CPU step 20x slower in our measurements with 2 cores and 10 "
                   "busy processes.")
    resume: bool | str = option(
        False, argparse={"nargs": "?", "const": True, "metavar": "PATH"},
        help="False: start fresh; True (`--resume`): continue from the latest checkpoint; a path (`--resume PATH`): "
             "continue from that checkpoint")

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
        return run_training(out_dir, config)
    finally:
        torch.set_num_threads(previous_threads)

"""Gaussian-splatting benchmark: training speed and held-out quality of `recon splat` after `recon run`.

Takes an existing output folder (`--out`, one holding OUT/undistorted/ from `recon run`) or runs the pipeline on
`--images` (default ../shared/data/temple_ring) first. Then trains with a fixed budget of iterations per
strategy and reports iterations/s (training only, evaluation excluded), the held-out PSNR/SSIM of the initial
render and after the budget, and the number of Gaussians:

- CPU: the torch reference rasterizer at reduced resolution (`--cpu-resolution-scale`, default: longer side
  <= 320 px), `--cpu-iterations` steps;
- CUDA, when present: gsplat's `rasterization` at full resolution, `--cuda-iterations` steps.

    python scripts/bench_splat.py                                   # recon run on temple_ring, then CPU (+CUDA)
    python scripts/bench_splat.py --out /tmp/temple --strategies default,mcmc --cpu-iterations 1000

Every training run writes into its own copy-free folder (a symlink to the export), so the pipeline output is
left untouched; results go to OUT/bench_splat.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from pathlib import Path

import torch

from feature_backends.errors import InputError
from recon.splat import SplatConfig, find_model, splat

import benchlib  # scripts/benchlib.py, next to this file

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = REPO_ROOT.parent / "shared" / "data" / "temple_ring"


def _ensure_model(out: Path, images: Path) -> Path:
    try:
        find_model(out)
        return out
    except InputError:  # no export yet: build it
        pass
    from recon.pipeline import run

    print(f"running `recon run {images} {out}` first")
    result = run(images, out)
    print(result.summary())
    return out


def _train(out: Path, work: Path, label: str, config: SplatConfig) -> dict:
    """Train in work/label, whose undistorted/ links to the export in `out`."""
    run_dir = work / label
    run_dir.mkdir(parents=True, exist_ok=True)
    image_dir, sparse_dir = find_model(out)
    link = run_dir / "undistorted"
    if not link.exists():
        link.mkdir()
        os.symlink(image_dir.resolve(), link / "images")
        (link / "sparse").mkdir()
        os.symlink(sparse_dir.resolve(), link / "sparse" / "0")
    metrics = json.loads((splat(run_dir, config) / "metrics.json").read_text())
    return {
        "run": label,
        "backend": metrics["backend"],
        "strategy": metrics["strategy"],
        "size": "x".join(map(str, metrics["image_size"])),
        "views": f"{len(metrics['train_views'])}/{len(metrics['test_views'])}",
        "iterations": metrics["iterations"],
        "it_per_s": metrics["iterations_per_second"],
        "psnr_init": metrics["initial"]["test"]["psnr"],
        "psnr": metrics["final"]["test"]["psnr"],
        "ssim_init": metrics["initial"]["test"]["ssim"],
        "ssim": metrics["final"]["test"]["ssim"],
        "train_psnr": metrics["final"]["train"]["psnr"],
        "gaussians": f"{metrics['initial']['num_gaussians']}->{metrics['final']['num_gaussians']}",
        "train_s": metrics["train_seconds"],
    }


COLUMNS = [("run", "run"), ("strategy", "strategy"), ("size", "size"), ("views", "train/test"),
           ("iterations", "iters"), ("it_per_s", "it/s"), ("train_s", "train s"), ("psnr_init", "PSNR init"),
           ("psnr", "PSNR"), ("train_psnr", "train PSNR"), ("ssim_init", "SSIM init"), ("ssim", "SSIM"),
           ("gaussians", "Gaussians")]
FORMATS = {"it_per_s": "{:.2f}", "train_s": "{:.0f}", "psnr_init": "{:.2f}", "psnr": "{:.2f}", "train_psnr": "{:.2f}",
           "ssim_init": "{:.3f}", "ssim": "{:.3f}"}


def _table(rows: list[dict], markdown: bool) -> str:
    return benchlib.table(rows, COLUMNS, markdown=markdown, formats=FORMATS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="output folder of `recon run` (created by running it if needed)")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--strategies", default="default", help="comma-separated: default, mcmc")
    parser.add_argument("--cpu-iterations", type=int, default=300)
    parser.add_argument("--cpu-resolution-scale", type=int, default=None)
    parser.add_argument("--cpu-threads", type=int, default=None, help="torch threads on CPU (default: torch's)")
    parser.add_argument("--cuda-iterations", type=int, default=7000)
    parser.add_argument("--eval-every", type=int, default=8)
    parser.add_argument("--no-cpu", action="store_true")
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown (README-ready)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")

    out = args.out or Path(tempfile.mkdtemp(prefix="bench_splat_"))
    out = _ensure_model(out, args.images)
    work = out / "bench_splat"
    rows = []
    for strategy in [s for s in args.strategies.split(",") if s]:
        if not args.no_cpu:
            # densify within the short budget: gsplat's defaults start refining at step 500
            budget = args.cpu_iterations
            rows.append(_train(out, work, f"cpu-{strategy}", SplatConfig(
                iterations=budget, strategy=strategy, device="cpu", eval_every=args.eval_every,
                resolution_scale=args.cpu_resolution_scale, cpu_threads=args.cpu_threads,
                curve_every=max(1, budget // 5), refine_start_iter=budget // 5, refine_every=max(1, budget // 6),
                sh_degree_interval=max(1, budget // 4), checkpoint_every=budget)))
            print(_table(rows[-1:], args.markdown))
        if torch.cuda.is_available():
            rows.append(_train(out, work, f"cuda-{strategy}", SplatConfig(
                iterations=args.cuda_iterations, strategy=strategy, device="cuda", eval_every=args.eval_every,
                resolution_scale=1)))
            print(_table(rows[-1:], args.markdown))
    if not torch.cuda.is_available():
        print("(no CUDA on this machine: CUDA rows skipped)")
    print()
    print(_table(rows, args.markdown))
    (out / "bench_splat.json").write_text(json.dumps(rows, indent=2))
    print(f"\nresults → {out / 'bench_splat.json'}")


if __name__ == "__main__":
    main()

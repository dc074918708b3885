"""Training checkpoints: `OUT/splats/checkpoints/step_*.pt`, enough to continue a run exactly.

A checkpoint holds the parameters, the Adam states, the strategy state, the torch/numpy RNG states, the metrics
record so far and the step. The training image of step s is a pure function of (seed, s) (one permutation per
epoch, `train.train_image_index`), so a resumed run on CPU repeats the uninterrupted run bit for bit; on CUDA,
gsplat's atomic adds make it equal only up to float rounding. Files are written to a temporary name and renamed,
and only the newest `keep_checkpoints` are kept. Loading uses `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from feature_backends.errors import InputError

if TYPE_CHECKING:
    from . import SplatConfig


def checkpoint_dir(splat_dir: Path) -> Path:
    return splat_dir / "checkpoints"


def latest_checkpoint(splat_dir: Path) -> Path | None:
    paths = sorted(checkpoint_dir(splat_dir).glob("step_*.pt"))
    return paths[-1] if paths else None


def save_checkpoint(splat_dir: Path, step: int, params, optimizers, strategy_state, record: dict,
                    config: SplatConfig) -> Path:
    directory = checkpoint_dir(splat_dir)
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


def restore_rng(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"].cpu())
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([state.cpu() for state in rng["cuda"]])
    np.random.set_state(("MT19937", rng["numpy_keys"].cpu().numpy().astype(np.uint32), rng["numpy_pos"], 0, 0.0))


def resume_path(splat_dir: Path, resume: bool | str) -> Path | None:
    """The checkpoint `SplatConfig.resume` asks for: None (fresh start), the latest one (True) or the given path."""
    if resume is True:
        path = latest_checkpoint(splat_dir)
        if path is None:
            raise InputError(f"nothing to resume: no checkpoint in '{checkpoint_dir(splat_dir)}'")
        return path
    return Path(resume) if resume else None

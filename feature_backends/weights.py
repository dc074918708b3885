"""Finding, verifying and safely loading a backend's weight files.

Resolution order for a file `F` (first hit wins):
1. an explicit path given by the user (`--weights PATH`, or `weights=` in a backend conf);
2. `$RECON_WEIGHTS_DIR/F`;
3. the torch hub cache, `<torch.hub.get_dir()>/checkpoints/F` (where torch.hub, kornia and romatch put them);
4. a download from the official URL into the torch hub cache (skipped with `RECON_OFFLINE=1` or `download=False`).

A file with a pinned SHA-256 is verified wherever it was found; a mismatch is an error. Files whose official
checksum we could not read from an official source are marked unpinned: their hash is computed and logged so the
user can pin it, and `recon weights check` reports them. Checkpoints are always loaded with
`torch.load(weights_only=True)`, so a checkpoint can never run code.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import WeightsError

logger = logging.getLogger(__name__)

ENV_WEIGHTS_DIR = "RECON_WEIGHTS_DIR"
ENV_OFFLINE = "RECON_OFFLINE"


@dataclass(frozen=True)
class WeightFile:
    filename: str
    url: str
    sha256: str | None = None  # None: no official checksum known (reported as "unpinned")
    size: int | None = None  # bytes, when known
    note: str = ""


def hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def candidate_paths(weight: WeightFile, explicit: str | Path | None = None) -> list[Path]:
    """Where a file is looked for, in order (the download target is the last one)."""
    paths = []
    if explicit:
        paths.append(Path(explicit).expanduser())
    if os.environ.get(ENV_WEIGHTS_DIR):
        paths.append(Path(os.environ[ENV_WEIGHTS_DIR]).expanduser() / weight.filename)
    paths.append(hub_checkpoint_dir() / weight.filename)
    return paths


def sha256_of(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify(weight: WeightFile, path: Path) -> None:
    if weight.sha256 is None:
        logger.warning(
            "%s has no pinned checksum; its SHA-256 is %s (compare with the official release)",
            path, sha256_of(path),
        )
        return
    actual = sha256_of(path)
    if actual != weight.sha256:
        raise WeightsError(
            f"checksum mismatch for '{path}': expected SHA-256 {weight.sha256}, got {actual}. The file is corrupt "
            f"or not the official '{weight.filename}'; delete it and fetch it again from {weight.url}"
        )


def find_weights(weight: WeightFile, explicit: str | Path | None = None) -> Path | None:
    """The first existing candidate, or None. An explicit path that does not exist is an error."""
    if explicit and not Path(explicit).expanduser().is_file():
        raise WeightsError(f"weight file '{explicit}' (given explicitly for {weight.filename}) does not exist")
    for path in candidate_paths(weight, explicit):
        if path.is_file():
            return path
    return None


def _missing_message(weight: WeightFile, reason: str) -> str:
    where = [str(p) for p in candidate_paths(weight)]
    return (
        f"weight file '{weight.filename}' is not available ({reason}).\n"
        f"  official URL: {weight.url}\n"
        f"  put it in one of: {', '.join(where)}\n"
        f"  or set ${ENV_WEIGHTS_DIR} to the folder holding it, or pass --weights PATH."
    )


def resolve_weights(weight: WeightFile, explicit: str | Path | None = None, download: bool = True) -> Path:
    """Path to a verified copy of `weight`, downloading it if allowed."""
    path = find_weights(weight, explicit)
    if path is None:
        if not download or os.environ.get(ENV_OFFLINE):
            raise WeightsError(_missing_message(weight, "offline mode"))
        target = hub_checkpoint_dir() / weight.filename
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        logger.info("Downloading %s from %s", weight.filename, weight.url)
        try:
            torch.hub.download_url_to_file(weight.url, str(partial), progress=True)
        except Exception as error:  # urllib raises many types; all mean "could not fetch"
            partial.unlink(missing_ok=True)
            raise WeightsError(_missing_message(weight, f"download failed: {error}")) from error
        os.replace(partial, target)
        path = target
    verify(weight, path)
    return path


def load_checkpoint(weight: WeightFile, explicit: str | Path | None = None, download: bool = True) -> Any:
    """Resolve, verify and load a checkpoint without allowing it to execute code."""
    path = resolve_weights(weight, explicit, download)
    return load_file_safely(path)


def load_file_safely(path: str | Path) -> Any:
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle.UnpicklingError, RuntimeError, ...: all mean "refused or unreadable"
        raise WeightsError(
            f"refused to load '{path}': it is not a plain tensor checkpoint loadable with weights_only=True "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
        ) from error


#: DINOv2 ViT-L/14 (Oquab et al. 2023), loaded by every RoMa variant and by the DeDoDe-G descriptor; neither
#: backend's checkpoint holds it. Declared once here so one file serves (and `recon weights check` verifies) both.
DINOV2_VITL14 = WeightFile(
    "dinov2_vitl14_pretrain.pth", "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth",
    note="DINOv2 ViT-L/14 backbone of RoMa (every variant) and of the DeDoDe-G descriptor",
)

_STEERERS = "https://github.com/georg-bn/rotation-steerers/releases/download/release-2"
#: Steerers of the DeDoDe "setting C" descriptors (Bökman et al., CVPR 2024), by descriptor variant. Each file is a
#: bare (256, 256) tensor, not a state dict: for C4 the steerer itself (one quarter turn), for SO2 the Lie-algebra
#: generator, exponentiated at 2*pi/steerer_order to give a discrete steerer. Names and URLs as in kornia's former
#: `dedode_steerer_urls` and the official download_weights.sh; no official checksum is published (unpinned).
STEERER_WEIGHTS: dict[str, WeightFile] = {
    f"{net}-{group}": WeightFile(
        f"{net}_{group}_{kind}_steerer_setting_C.pth", f"{_STEERERS}/{net}_{group}_{kind}_steerer_setting_C.pth",
        note=f"steerer for the {net}-{group} descriptor (steered matching only)",
    )
    for net in ("B", "G") for group, kind in (("C4", "Perm"), ("SO2", "Spread"))
}


def load_steerer_generator(variant: str, steerer_order: int, explicit: str | Path | None = None) -> torch.Tensor:
    """The (D, D) matrix that steers descriptors of `variant` ("B-C4", "G-SO2", ...) by one step.

    C4 files hold that matrix; SO2 files hold the Lie-algebra generator L, and one step is exp(2*pi/order * L),
    as the official demo discretises it (the SO2 descriptors are then matched at `steerer_order` angles).
    """
    if variant not in STEERER_WEIGHTS:
        raise WeightsError(f"no steerer for '{variant}'; known: {', '.join(STEERER_WEIGHTS)}")
    weight = STEERER_WEIGHTS[variant]
    generator = load_checkpoint(weight, explicit)
    if not (isinstance(generator, torch.Tensor) and generator.ndim == 2 and generator.shape[0] == generator.shape[1]):
        shape = tuple(generator.shape) if isinstance(generator, torch.Tensor) else type(generator).__name__
        raise WeightsError(f"'{weight.filename}' is not a square steerer matrix (got {shape})")
    generator = generator.float()
    if variant.endswith("SO2"):
        generator = torch.linalg.matrix_exp((2 * math.pi / steerer_order) * generator)
    return generator


def strip_prefix(state_dict: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Keys that start with `prefix`, with it removed (e.g. Lightning's 'model.')."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def load_state_dict_strict(
    module: torch.nn.Module, state_dict: Any, source: str, derived: frozenset[str] | set[str] = frozenset(),
) -> None:
    """load_state_dict(strict=True), with every way a file can fail to fit raised as one WeightsError naming it:
    not a mapping, missing or unexpected keys (counted, first five listed), or a tensor of the wrong shape (which
    torch reports as a bare RuntimeError). `derived` names buffers a module computes from its configuration, which
    a checkpoint may or may not carry (LightGlue's `confidence_thresholds`)."""
    what = type(module).__name__
    if not isinstance(state_dict, Mapping):
        raise WeightsError(f"'{source}' is not a state dict (got {type(state_dict).__name__}), so it cannot fit {what}")
    try:
        result = module.load_state_dict(state_dict, strict=False)
    except RuntimeError as error:  # shape mismatches are raised even with strict=False
        raise WeightsError(f"'{source}' does not fit {what}: {str(error).strip()[:500]}") from error
    missing = [key for key in result.missing_keys if key not in derived]
    if missing or result.unexpected_keys:
        raise WeightsError(
            f"'{source}' does not fit {what}: {len(missing)} missing keys {missing[:5]}, "
            f"{len(result.unexpected_keys)} unexpected keys {result.unexpected_keys[:5]}"
        )

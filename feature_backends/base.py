"""One base class per backend kind, with a checked configuration.

Every backend declares `default_conf`; the configurations of its parent classes are deep-merged under it, the
user's configuration is merged on top, and any key the backend does not declare raises `ConfigError` (hloc and
LightGlue accept unknown keys silently, so a typo such as `max_keypoint` silently does nothing there). The
result is frozen: a backend cannot mutate its configuration behind the caller's back.

The four kinds share the keys of hloc's files:
- LocalFeatures: image → keypoints (N,2) in original-image pixels, hloc convention (the centre of the top-left
  pixel is (0, 0)), descriptors (D,N), scores (N,).
- SparseMatcher: two feature sets → matches0 (N0,) with -1 for unmatched, matching_scores0 (N0,).
- DenseMatcher: two images → corresponding points (M,2)+(M,2) with a certainty, in original-image pixels.
- GlobalDescriptor: image → one L2-normalised vector (D,).

Backends take numpy images in [0, 1] (H,W,C) from feature_backends.images and return numpy arrays; the
torch device, resizing and mixed precision are handled here once, so a backend implements only its forward pass.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import numpy as np
import torch

from .errors import ConfigError, WeightsError
from .images import resize_image, resized_size
from .weights import STEERER_WEIGHTS, WeightFile, load_checkpoint, load_steerer_generator

REQUIRED = "???"  # a default_conf value that the user must set


class Conf(Mapping):
    """A frozen, attribute-accessible configuration (nested mappings are frozen too)."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, Any]):
        object.__setattr__(self, "_data", {k: Conf(v) if isinstance(v, Mapping) else v for k, v in data.items()})

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __getattr__(self, key: str) -> Any:
        try:
            return self._data[key]
        except KeyError:
            raise AttributeError(key) from None

    def __setattr__(self, key: str, value: Any) -> None:
        raise TypeError("configurations are frozen; pass a new conf to the constructor instead")

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"Conf({self.to_dict()!r})"

    def to_dict(self) -> dict[str, Any]:
        return {k: v.to_dict() if isinstance(v, Conf) else copy.deepcopy(v) for k, v in self._data.items()}


def merge_conf(defaults: Mapping[str, Any], overrides: Mapping[str, Any] | None, where: str = "") -> dict[str, Any]:
    """Deep-merge `overrides` into `defaults`; a key absent from `defaults` is an error."""
    merged = {k: (dict(v) if isinstance(v, Mapping) else copy.deepcopy(v)) for k, v in defaults.items()}
    for key, value in (overrides or {}).items():
        if key not in defaults:
            known = ", ".join(sorted(defaults))
            raise ConfigError(f"unknown configuration key '{where}{key}'; known keys: {known}")
        if isinstance(defaults[key], Mapping) and isinstance(value, Mapping):
            merged[key] = merge_conf(defaults[key], value, where=f"{where}{key}.")
        else:
            _check_type(defaults[key], value, f"{where}{key}")
            merged[key] = value
    return merged


def _check_type(default: Any, value: Any, key: str) -> None:
    """A scalar of another kind than the default's (a word for a number or a flag, a number for a word) is an
    error naming the key. None defaults take anything, and lists stand for sizes given per axis."""
    if default is None or value is None or isinstance(value, (list, tuple, Mapping)):
        return
    number = (int, float)
    if isinstance(default, bool):
        fits = isinstance(value, bool)
    elif isinstance(default, number):
        fits = isinstance(value, number) and not isinstance(value, bool)
    elif isinstance(default, str) and default != REQUIRED:
        fits = isinstance(value, str)
    else:
        return
    if not fits:
        raise ConfigError(f"configuration key '{key}' takes a {type(default).__name__} (default {default!r}), "
                          f"got {value!r}")


def _missing_keys(conf: Mapping[str, Any], prefix: str = "") -> list[str]:
    missing = []
    for key, value in conf.items():
        if isinstance(value, Mapping):
            missing += _missing_keys(value, f"{prefix}{key}.")
        elif isinstance(value, str) and value == REQUIRED:
            missing.append(prefix + key)
    return missing


def select_device(device: str | torch.device | None = None) -> torch.device:
    """`None` or "auto" picks CUDA when present, else CPU; anything else is taken as given."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{device}' was requested but CUDA is not available here; use --device cpu")
    return device


class Backend:
    """Common machinery: configuration, device, mixed precision, named weights."""

    kind: ClassVar[str] = ""
    default_conf: ClassVar[dict[str, Any]] = {"mixed_precision": True}
    #: Weight files this backend can load: variant name → tuple of WeightFile (all the files that variant loads).
    weight_files: ClassVar[dict[str, tuple[WeightFile, ...]]] = {}
    #: The configuration key that selects the entry of `weight_files` (see `required_weights`).
    variant_key: ClassVar[str] = "variant"

    def __init__(self, conf: Mapping[str, Any] | None = None, device: str | torch.device | None = None):
        merged = merge_conf(self.full_default_conf(), conf, where=f"{type(self).__name__}.")
        missing = _missing_keys(merged)
        if missing:
            raise ConfigError(f"{type(self).__name__} needs a value for: {', '.join(missing)}")
        self.conf = Conf(merged)
        self.device = select_device(device)
        self._init(self.conf)

    @classmethod
    def full_default_conf(cls) -> dict[str, Any]:
        """`default_conf` of every class in the MRO, deep-merged from the root down (children win)."""
        conf: dict[str, Any] = {}
        for klass in reversed(cls.__mro__):
            own = klass.__dict__.get("default_conf")
            if own:
                conf = deep_update(conf, own)
        return conf

    @classmethod
    def required_weights(cls, conf: Mapping[str, Any]) -> list[tuple[Any, str | None]]:
        """(WeightFile, explicit path or None) for every file a backend with this (merged) conf loads, so a run
        can check them all before its first stage. By default: the `weight_files` entry that `variant_key`
        selects (the only one when there is one), the first file taking an explicit `weights` path. Backends
        whose files follow other keys override this; the rest are checked when they load."""
        files = cls.weight_files
        key = conf.get(cls.variant_key)
        chosen = files[key] if key in files else (next(iter(files.values())) if len(files) == 1 else ())
        return [(weight, conf.get("weights") if index == 0 else None) for index, weight in enumerate(chosen)]

    def _init(self, conf: Conf) -> None:
        """Build the model. Subclasses load weights here."""

    def autocast(self) -> contextlib.AbstractContextManager:
        """fp16 autocast on CUDA when `mixed_precision` is on; full precision on CPU, where fp16 is slow."""
        if self.device.type == "cuda" and self.conf.mixed_precision:
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def to_tensor(self, image: np.ndarray) -> torch.Tensor:
        """(H,W,C) numpy in [0,1] → (1,C,H,W) float tensor on the backend's device."""
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None].float().to(self.device)


class StateDictBackend(Backend):
    """A backend whose weights are checkpoint files with named roles (RoMa: "weights" and "dinov2"), loadable from
    files (normal use) or given in memory (tests, notebooks, conversions) through exactly the same unpacking and
    strict loading. Subclasses declare `checkpoint_files` and call `load_checkpoints` in `_init`."""

    _given_checkpoints: dict[str, Any] | None = None

    @classmethod
    def from_checkpoints(cls, checkpoints: Mapping[str, Any], conf: Mapping[str, Any] | None = None,
                         device: Any = None):
        """Build from already-loaded checkpoint objects, keyed like `checkpoint_files` (e.g. weights, dinov2)."""
        backend = cls.__new__(cls)
        backend._given_checkpoints = dict(checkpoints)
        Backend.__init__(backend, conf, device)
        backend._given_checkpoints = None
        return backend

    @classmethod
    def checkpoint_files(cls, conf: Conf) -> dict[str, tuple[WeightFile, str | None]]:
        """{role: (file, explicit path or None)} for the configured variant."""
        raise NotImplementedError

    @classmethod
    def required_weights(cls, conf: Mapping[str, Any]) -> list[tuple[WeightFile, str | None]]:
        return list(cls.checkpoint_files(Conf(conf)).values())

    def load_checkpoints(self, conf: Conf) -> dict[str, Any]:
        files = self.checkpoint_files(conf)
        if self._given_checkpoints is not None:
            missing = sorted(set(files) - set(self._given_checkpoints))
            if missing:
                raise WeightsError(f"{type(self).__name__}: checkpoints {missing} were not given")
            return {role: self._given_checkpoints[role] for role in files}
        return {role: load_checkpoint(weight, explicit) for role, (weight, explicit) in files.items()}


def descriptor_family(record: Mapping[str, Any] | None) -> str | None:
    """The `descriptor_family` of the feature backend a features record ({"backend", "conf"}, as features.h5 keeps
    it) names, or None when the record names none or a backend that cannot be resolved here."""
    from .registry import resolve  # the registry imports this module

    if not record or not record.get("backend"):
        return None
    try:
        cls, _ = resolve("features", str(record["backend"]))
    except ConfigError:
        return None
    return cls.descriptor_family


def _per_keypoint_rows(descriptors: np.ndarray, count: int) -> np.ndarray:
    """(N, D) descriptors; with no keypoints (a blank frame) (0, D), which `reshape(0, -1)` cannot infer."""
    if count or descriptors.size:
        return descriptors.reshape(count, -1)
    dims = [d for d in descriptors.shape if d]
    return descriptors.reshape(0, dims[-1] if dims else 0)


def _to_numpy(value: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().float().cpu().numpy()
    return np.asarray(value, dtype=np.float32)


def deep_update(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """`update` merged into a copy of `base`, nested mappings merged key by key (no key checks: see merge_conf)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_update(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def fold_batchnorm(container: torch.nn.Module) -> int:
    """Fold every BatchNorm2d that directly follows a Conv2d among `container`'s children into that convolution
    (eval mode only) and return how many were folded. Only for containers whose forward applies the children in
    order: nn.Sequential always; a ModuleList only when its owner is known to iterate it that way.

    Inference does the same arithmetic up to float rounding (measured max |diff| 3e-7 on DeDoDe's detector logits
    of magnitude 0.3) and skips one full pass over every feature map per normalisation layer.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    children = list(container._modules.items())
    folded = 0
    for (conv_name, conv), (norm_name, norm) in zip(children, children[1:]):
        if (isinstance(conv, torch.nn.Conv2d) and isinstance(norm, torch.nn.BatchNorm2d) and not norm.training
                and norm.track_running_stats):
            container._modules[conv_name] = fuse_conv_bn_eval(conv, norm)
            container._modules[norm_name] = torch.nn.Identity()
            folded += 1
    return folded


class LocalFeatures(Backend):
    """Detect and describe keypoints in one image.

    Subclasses implement `_extract(image)` on a (1,C,h,w) tensor of the resized image and return keypoints
    (N,2) in resized-image pixels (hloc convention), descriptors (N,D) and scores (N,). The base resizes, maps
    keypoints back to the original resolution and enforces `max_keypoints`.
    """

    kind = "features"
    default_conf = {
        "max_keypoints": 4096,
        "resize_max": 1600,  # longer side in pixels, None keeps the original size
        "resize_force": False,  # also upscale images smaller than resize_max
        "grayscale": False,
    }
    #: Sides of the network input must be multiples of this (e.g. 8 or 14).
    size_multiple: ClassVar[int] = 1
    #: Keypoint localisation noise in pixels of the image the detector saw (hloc's `detection_noise`).
    detection_noise: ClassVar[float] = 1.0
    #: Descriptor storage dtype in features.h5.
    descriptor_dtype: ClassVar[Any] = np.float32
    #: Which descriptor the features carry, for matchers whose weights or steerers fit one descriptor ("dedode" for
    #: every detector paired with the DeDoDe descriptor, "sift", "disk", ...); None: no matcher depends on it.
    #: Matchers read it with `descriptor_family(record)`, so a new detector on a known descriptor edits no matcher.
    descriptor_family: ClassVar[str | None] = None

    #: Run the network and its input in channels_last layout on CPU: oneDNN's convolutions are direct in NHWC
    #: and reorder every NCHW tensor otherwise (DeDoDe's detector L at 784x518, 2 threads: 6.9 s → 3.7 s; DISK's
    #: U-Net is slower in it, 7.7 → 9.1 s, so it is opt-in per backend).
    channels_last: ClassVar[bool] = False

    def parallel_images(self) -> int:
        """How many images the extract stage may give `extract` at once on threads (recon.extract). Above one,
        `extract` must run native code that releases the GIL and be safe to call from several threads (OpenCV's
        SIFT); the stage then turns OpenCV's own threading off. Networks keep one image at a time: torch already
        uses every core inside one image."""
        return 1

    def prepare_network(self, network: torch.nn.Module, ordered_lists: tuple[torch.nn.Module, ...] = ()) -> torch.nn.Module:
        """eval(), BatchNorm folded into the preceding convolutions (every nn.Sequential, plus the given ModuleLists
        that the network applies in order), channels_last where it pays, moved to the device."""
        network.eval()
        for module in [*network.modules(), *ordered_lists]:
            if isinstance(module, torch.nn.Sequential) or any(module is m for m in ordered_lists):
                fold_batchnorm(module)
        network.to(self.device)
        if self._use_channels_last():
            network.to(memory_format=torch.channels_last)
        return network

    def _use_channels_last(self) -> bool:
        return self.channels_last and self.device.type == "cpu"

    def _extract(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def keypoint_uncertainty(self, width: int, height: int) -> float:
        """hloc's `uncertainty` attribute of the keypoints: the detection noise (px at the resolution the detector
        saw; `detection_noise`, 1 as in hloc) times the mean scale back to the original image."""
        new_w, new_h = resized_size(width, height, self.conf.resize_max, self.conf.resize_force, self.size_multiple)
        return float(self.detection_noise * (width / new_w + height / new_h) / 2)

    def _extract_image(self, image: np.ndarray) -> dict[str, np.ndarray | torch.Tensor]:
        """Run the model on the resized (H,W,C) image; non-torch backends (SIFT) override this instead."""
        tensor = self.to_tensor(image)
        if self._use_channels_last():
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), self.autocast():
            return self._extract(tensor)

    def resize(self, image: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
        """The network input and its per-axis scale (sx, sy); a backend whose official loader resizes
        differently (e.g. DaD's PIL bicubic) overrides this."""
        return resize_image(image, self.conf.resize_max, self.conf.resize_force, self.size_multiple)

    def extract(self, image: np.ndarray) -> dict[str, np.ndarray]:
        height, width = image.shape[:2]
        resized, scale = self.resize(image)
        pred = {key: _to_numpy(value) for key, value in self._extract_image(resized).items()}
        keypoints = pred["keypoints"].reshape(-1, 2)
        descriptors = _per_keypoint_rows(pred["descriptors"], len(keypoints))
        scores = pred["scores"].reshape(-1)
        # Further per-keypoint arrays (e.g. SIFT's scales and orientations) are kept and filtered alongside.
        extras = {k: v for k, v in pred.items() if k not in ("keypoints", "descriptors", "scores")}
        max_keypoints = self.conf.max_keypoints
        if max_keypoints is not None and len(keypoints) > max_keypoints:
            keep = np.argsort(-scores, kind="stable")[:max_keypoints]
            keypoints, descriptors, scores = keypoints[keep], descriptors[keep], scores[keep]
            extras = {k: v[keep] for k, v in extras.items()}
        # Pixel centres sit at integer coordinates: scale about the centre of the top-left pixel.
        keypoints = (keypoints + 0.5) / np.asarray(scale, np.float32) - 0.5
        return {
            "keypoints": keypoints.astype(np.float32),
            "descriptors": np.ascontiguousarray(descriptors.T).astype(self.descriptor_dtype),
            "scores": scores.astype(np.float32),
            "image_size": np.array([width, height], dtype=np.int64),
            **{k: v.astype(np.float32) for k, v in extras.items()},
        }


class SparseMatcher(Backend):
    """Match two feature sets.

    Subclasses implement `_match(data)` on tensors with a leading batch dimension of 1: keypoints0/1 (1,N,2),
    descriptors0/1 (1,D,N), scores0/1 (1,N), image_size0/1 (1,2) = (width, height); they return matches0 (1,N0)
    with -1 for unmatched and matching_scores0 (1,N0).
    """

    kind = "matcher"
    default_conf: ClassVar[dict[str, Any]] = {}
    #: Inputs that must be present in both feature sets.
    required_inputs: ClassVar[tuple[str, ...]] = ("keypoints", "descriptors")

    @classmethod
    def conf_for_features(cls, record: Mapping[str, Any] | None) -> dict[str, Any]:
        """Configuration implied by the features being matched ({"backend", "conf"} recorded in features.h5),
        e.g. which LightGlue weights fit them; the user's explicit configuration overrides it."""
        return {}

    def _match(self, data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def match_many(
        self, features0: Mapping[str, np.ndarray], others: list[Mapping[str, np.ndarray]]
    ) -> list[dict[str, np.ndarray]]:
        """Match one feature set against several; matchers that can share work across pairs override this."""
        return [self.match(features0, features1) for features1 in others]

    def match(self, features0: Mapping[str, np.ndarray], features1: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        data: dict[str, torch.Tensor] = {}
        for suffix, feats in (("0", features0), ("1", features1)):
            missing = [k for k in self.required_inputs if k not in feats]
            if missing:
                raise ConfigError(f"{type(self).__name__} needs {missing} in the feature file")
            for key, value in feats.items():
                tensor = torch.from_numpy(np.asarray(value))
                if tensor.is_floating_point():
                    tensor = tensor.float()
                data[key + suffix] = tensor[None].to(self.device)
        if data["keypoints0"].shape[1] == 0 or data["keypoints1"].shape[1] == 0:
            n0 = data["keypoints0"].shape[1]
            return {"matches0": np.full(n0, -1, np.int32), "matching_scores0": np.zeros(n0, np.float32)}
        with torch.inference_mode(), self.autocast():
            pred = self._match(data)
        return {
            "matches0": pred["matches0"][0].cpu().numpy().astype(np.int32),
            "matching_scores0": pred["matching_scores0"][0].float().cpu().numpy().astype(np.float32),
        }


class SteerableMatcher(SparseMatcher):
    """A descriptor matcher that can match rotation-steerable descriptors (Bökman et al., "Steerers", CVPR 2024).

    DeDoDe's C4 and SO2 descriptors are trained so that rotating the image multiplies every descriptor by a fixed
    matrix, the steerer. Matching them as published takes, for every pair (i, j), the best similarity between
    descriptor j of image 1 and descriptor i of image 0 steered 0 .. order-1 times (the official
    `MaxSimilarityMatcher`; kornia's `DescriptorMatcherWithSteerer` in its "local" mode), so a pair rotated by a
    multiple of the steerer's angle matches as well as an upright one. The steerer is chosen from the descriptor
    variant recorded in features.h5; `steerer=None` matches them as plain descriptors.
    """

    default_conf = {
        "steerer": None,  # None | "C4" | "SO2"
        "steerer_order": 8,  # SO2 only: angles tried (C4 always tries its 4 quarter turns)
        "steerer_descriptor": "B",  # which descriptor's steerer file: "B" or "G"
        "steerer_weights": None,  # explicit steerer file
    }
    weight_files: ClassVar[dict[str, Any]] = {f"steerer {name}": (file,) for name, file in STEERER_WEIGHTS.items()}

    @classmethod
    def required_weights(cls, conf: Mapping[str, Any]) -> list[tuple[WeightFile, str | None]]:
        """The steerer file when steering is on (a bad steerer name is left to `_init` to report)."""
        variant = f"{conf.get('steerer_descriptor')}-{conf.get('steerer')}"
        return [(STEERER_WEIGHTS[variant], conf.get("steerer_weights"))] if variant in STEERER_WEIGHTS else []

    @classmethod
    def conf_for_features(cls, record):
        if descriptor_family(record) != "dedode":
            return {}
        net, _, group = str((record.get("conf") or {}).get("descriptor", "B-upright")).partition("-")
        return {"steerer": group, "steerer_descriptor": net} if group in ("C4", "SO2") else {}

    def _init(self, conf) -> None:
        self.steerer = None
        if conf.steerer is None:
            return
        from kornia.feature.steerers import DiscreteSteerer

        if conf.steerer not in ("C4", "SO2") or conf.steerer_descriptor not in ("B", "G"):
            raise ConfigError(f"steerer must be None, 'C4' or 'SO2' and steerer_descriptor 'B' or 'G'; "
                              f"got {conf.steerer!r}, {conf.steerer_descriptor!r}")
        self.steerer_order = 4 if conf.steerer == "C4" else int(conf.steerer_order)
        if self.steerer_order < 1:
            raise ConfigError(f"steerer_order must be positive, got {conf.steerer_order}")
        generator = load_steerer_generator(f"{conf.steerer_descriptor}-{conf.steerer}", self.steerer_order,
                                           conf.steerer_weights)
        self.steerer = DiscreteSteerer(generator).eval().requires_grad_(False).to(self.device)

    def steered_similarity(
        self, descriptors0: torch.Tensor, descriptors1: torch.Tensor, normalize: bool = True
    ) -> torch.Tensor:
        """max over k of <steer^k(d0_i), d1_j> for (N0,D), (N1,D) descriptors. With `normalize` (descriptors given
        unit-norm), every steered set is renormalised as the official matcher does: a learned steerer need not be
        orthogonal, and the matchers' scores assume unit vectors."""
        similarity = descriptors0 @ descriptors1.T
        steered = descriptors0
        for _ in range(1, self.steerer_order):
            steered = self.steerer.steer_descriptions(steered, steerer_power=1, normalize=normalize)
            torch.maximum(similarity, steered @ descriptors1.T, out=similarity)
        return similarity


class DenseMatcher(Backend):
    """Match two images densely; the contract the dense stage (recon.dense) relies on.

    `match_images(image0, image1)` returns sampled correspondences keypoints0/1 (M,2) in original-image pixels
    (hloc convention) and their `scores` (M,): all quantised mode needs. Backends that predict a full warp set
    `has_warp` and implement `warp_images` (returning a feature_backends.dense_warp.Warp), which anchored mode
    needs. In a pair stream every image comes back in many pairs: `encode` is the per-image part of the work,
    whose result the stage keeps in a byte-budget cache (a flat dict of host arrays) and hands to
    `match_encoded` / `warp_encoded` for every pair of that image. By default the image itself is the encoding.
    """

    kind = "dense"
    default_conf: ClassVar[dict[str, Any]] = {}
    #: Whether `warp_images` / `warp_encoded` give the full warp (anchored mode needs it; LoFTR-like matchers
    #: give matches only).
    has_warp: ClassVar[bool] = False

    def match_images(self, image0: np.ndarray, image1: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def warp_images(self, image0: np.ndarray, image1: np.ndarray) -> Any:
        raise ConfigError(f"{type(self).__name__} gives matches, not a dense warp, so it cannot match anchored "
                          "keypoints (FEATURES+DENSE); use it alone for quantised keypoints")

    def encode(self, image: np.ndarray) -> dict[str, np.ndarray]:
        return {"image": image}

    def match_encoded(self, encoded0: dict[str, np.ndarray], encoded1: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.match_images(encoded0["image"], encoded1["image"])

    def warp_encoded(self, encoded0: dict[str, np.ndarray], encoded1: dict[str, np.ndarray]) -> Any:
        return self.warp_images(encoded0["image"], encoded1["image"])


class GlobalDescriptor(Backend):
    """One L2-normalised vector per image, for retrieval."""

    kind = "global"
    default_conf = {"resize_max": 1024, "resize_force": False}
    size_multiple: ClassVar[int] = 1

    def prepare(self, image_dir: str, names: list[str]) -> None:
        """Fit collection-dependent state (e.g. a VLAD codebook) before `describe`; learned models need none."""

    def prepared_state(self) -> dict[str, np.ndarray]:
        """What `prepare` fitted, as arrays: the distributed executor fits once on the driver and hands this to
        every worker (`load_prepared_state`), so all images are described with the same state."""
        return {}

    def load_prepared_state(self, state: dict[str, np.ndarray]) -> None:
        """Take the state another instance's `prepare` fitted (see `prepared_state`)."""

    def _describe(self, image: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def describe(self, image: np.ndarray) -> np.ndarray:
        resized, _ = resize_image(image, self.conf.resize_max, self.conf.resize_force, self.size_multiple)
        with torch.inference_mode(), self.autocast():
            descriptor = self._describe(self.to_tensor(resized)).float().reshape(-1)
        return torch.nn.functional.normalize(descriptor, dim=0).cpu().numpy().astype(np.float32)

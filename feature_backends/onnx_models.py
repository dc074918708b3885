"""ONNX graphs as recon backends: resolve and verify the file, open an onnxruntime session, check its contract.

The LoMa and OmniGlue backends run published ONNX exports rather than PyTorch modules. Their files go through
the same resolution as every checkpoint (feature_backends.weights: explicit path, $RECON_WEIGHTS_DIR, torch hub
cache, official URL; SHA-256 verified where one is published) and are then handed to onnxruntime instead of
`torch.load`. An ONNX file is a protobuf graph of standard operators: it carries no Python and onnxruntime runs
only its registered kernels, so the `weights_only=True` concern does not arise.

A graph's contract (input and output names, ranks and the fixed dimensions) is checked when the session opens,
so a wrong or truncated file fails at load time with its name, not deep inside a run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, WeightsError
from .weights import WeightFile, resolve_weights

#: A dimension in a contract: a fixed size, or None for any (dynamic or named) size.
Shape = Sequence[int | None]


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as error:  # the optional extra is missing
        raise ConfigError("this backend runs ONNX graphs and needs onnxruntime: pip install 'recon[onnx]' "
                          f"(or onnxruntime) ({error})") from error
    return onnxruntime


def _dims(shape: Sequence[Any]) -> list[int | None]:
    return [d if isinstance(d, int) and d > 0 else None for d in shape]


class OnnxGraph:
    """One onnxruntime session over a verified file whose inputs and outputs match `inputs` / `outputs`.

    `inputs` and `outputs` map a tensor name to its expected shape (None for a free dimension); outputs not
    listed are allowed and ignored. `outputs` may instead be one shape: the graph's first output, whatever its
    name (COLMAP reads LoMa's descriptor graph so). `run(**feeds)` returns the checked outputs by name.
    """

    def __init__(self, weight: WeightFile, inputs: Mapping[str, Shape], outputs: Mapping[str, Shape] | Shape,
                 explicit: str | Path | None = None, device: Any = "cpu", num_threads: int | None = None):
        onnxruntime = _import_onnxruntime()
        self.path = resolve_weights(weight, explicit)
        self.filename = weight.filename
        options = onnxruntime.SessionOptions()
        if num_threads:
            options.intra_op_num_threads = int(num_threads)
        providers = ["CPUExecutionProvider"]
        if str(device).startswith("cuda") and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = onnxruntime.InferenceSession(str(self.path), options, providers=providers)
        except Exception as error:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise WeightsError(f"'{self.path}' is not a loadable ONNX graph for {weight.filename}: "
                               f"{str(error).splitlines()[0]}") from error
        self.input_shapes = {node.name: _dims(node.shape) for node in self.session.get_inputs()}
        self.output_shapes = {node.name: _dims(node.shape) for node in self.session.get_outputs()}
        if not isinstance(outputs, Mapping):
            outputs = {next(iter(self.output_shapes)): outputs}
        self._check("input", inputs, self.input_shapes, exact=True)
        self._check("output", outputs, self.output_shapes, exact=False)
        self.outputs = list(outputs)

    def _check(self, role: str, expected: Mapping[str, Shape], actual: Mapping[str, list], exact: bool) -> None:
        missing = [name for name in expected if name not in actual]
        extra = [name for name in actual if name not in expected] if exact else []
        if missing or extra:
            raise WeightsError(
                f"'{self.path}' does not have the {role}s of {self.filename}: expected {list(expected)}, "
                f"the graph has {list(actual)}")
        for name, shape in expected.items():
            have = actual[name]
            fits = len(have) == len(shape) and all(e is None or h is None or e == h for e, h in zip(shape, have))
            if not fits:
                raise WeightsError(f"'{self.path}': {role} '{name}' has shape {have}, {self.filename} has "
                                   f"{[d if d is not None else '?' for d in shape]}")

    def run(self, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(self.outputs, self.session.run(self.outputs, feeds)))


def pixels_to_normalized(keypoints: np.ndarray, size: Sequence[float]) -> np.ndarray:
    """hloc pixels (centre of the top-left pixel at (0, 0)) → [-1, 1] with the image corners at ±1
    (grid_sample's align_corners=False; COLMAP's LoMa code: 2 x / W - 1 with x at pixel corners)."""
    size = np.asarray(size, np.float32)
    return (2.0 * (np.asarray(keypoints, np.float32) + 0.5) / size - 1.0).astype(np.float32)


def normalized_to_pixels(keypoints: np.ndarray, size: Sequence[float]) -> np.ndarray:
    """The inverse of `pixels_to_normalized`."""
    size = np.asarray(size, np.float32)
    return ((np.asarray(keypoints, np.float32) + 1.0) * size / 2.0 - 0.5).astype(np.float32)

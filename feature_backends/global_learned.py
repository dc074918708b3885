"""What every learned global descriptor shares: eval-mode torch network, explicit weight path, batched forward.

`describe_batch` runs several images of the same input size through the network at once (the extraction loop in
pairs.retrieval groups them); `describe` is the batch of one, so both paths share every line of preprocessing and
give the same descriptor. A subclass builds `self.net` in `_build` and implements `_describe` on a normalised
(B,3,H,W) batch; the final L2 normalisation happens here once.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .base import GlobalDescriptor
from .errors import InputError
from .images import resize_image


class LearnedGlobalDescriptor(GlobalDescriptor):
    default_conf = {"weights": None}  # explicit weight file; else $RECON_WEIGHTS_DIR, torch hub cache, download
    #: Largest batch the extraction loop should form on CUDA (CPU gains nothing from batching, so it uses 1).
    cuda_batch_size: int = 8

    def _init(self, conf) -> None:
        self.net = self._build(conf)
        self.net.eval().requires_grad_(False).to(self.device)

    def _build(self, conf) -> torch.nn.Module:
        raise NotImplementedError

    def preferred_batch_size(self) -> int:
        return self.cuda_batch_size if self.device.type == "cuda" else 1

    def _prepare_batch(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        resized = []
        for image in images:
            if image.ndim != 3 or image.shape[2] != 3:
                raise InputError(f"{type(self).__name__} needs RGB images (H,W,3), got shape {image.shape}")
            resized.append(resize_image(image, self.conf.resize_max, self.conf.resize_force, self.size_multiple)[0])
        shapes = {r.shape for r in resized}
        if len(shapes) != 1:
            raise InputError(f"a batch must hold images of one size after resizing, got {sorted(shapes)}")
        batch = np.stack([r.transpose(2, 0, 1) for r in resized])
        return torch.from_numpy(np.ascontiguousarray(batch)).float().to(self.device)

    def describe_batch(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(B,D) float32 L2-normalised descriptors of same-size images."""
        if not images:
            return np.zeros((0, 0), np.float32)
        batch = self._prepare_batch(images)
        with torch.inference_mode(), self.autocast():
            descriptors = self._describe(batch).float().reshape(len(images), -1)
        return torch.nn.functional.normalize(descriptors, dim=1).cpu().numpy().astype(np.float32)

    def describe(self, image: np.ndarray) -> np.ndarray:
        return self.describe_batch([image])[0]


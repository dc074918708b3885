"""Weight-free VLAD retrieval over the collection's own RootSIFT descriptors.

The codebook is fitted on the collection itself (k-means on a deterministic sample of descriptors, kornia's
KMeans), so retrieval works with no downloaded weights. Each image's descriptor is the classic VLAD of
Jégou et al. with intra-normalisation (Arandjelović & Zisserman, "All about VLAD") and signed square-root
power normalisation, then L2: 64 clusters x 128 dims = 8192-D.

Fitting is deterministic (fixed sample and seed), so a resumed run reproduces the same codebook and the
descriptors already stored stay comparable with new ones.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from kornia.contrib import KMeans

from feature_backends.base import GlobalDescriptor
from feature_backends.errors import InputError
from feature_backends.images import iter_images
from feature_backends.sift import SIFT

logger = logging.getLogger(__name__)


class VLAD(GlobalDescriptor):
    default_conf = {
        "resize_max": 640,
        "num_clusters": 64,
        "max_keypoints": 1500,
        "fit_images": 200,  # images sampled (evenly) to fit the codebook
        "fit_descriptors": 100_000,
        "kmeans_iterations": 30,
        "seed": 0,
    }

    def _init(self, conf) -> None:
        self._sift = SIFT({"max_keypoints": conf.max_keypoints, "resize_max": conf.resize_max}, device="cpu")
        self.codebook: torch.Tensor | None = None

    def local_descriptors(self, image: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self._sift.extract(image)["descriptors"].T.copy())

    def prepare(self, image_dir, names) -> None:
        step = max(1, len(names) // self.conf.fit_images)
        sample = list(names)[::step][: self.conf.fit_images]
        chunks = []
        for name, image in iter_images(image_dir, sample, grayscale=True):
            if not isinstance(image, Exception):
                chunks.append(self.local_descriptors(image))
        descriptors = torch.cat(chunks) if chunks else torch.zeros(0, 128)
        if len(descriptors) < self.conf.num_clusters:
            raise InputError(
                f"VLAD needs at least {self.conf.num_clusters} local features to fit its codebook, "
                f"found {len(descriptors)} in {len(sample)} images"
            )
        generator = torch.Generator().manual_seed(self.conf.seed)
        if len(descriptors) > self.conf.fit_descriptors:
            descriptors = descriptors[torch.randperm(len(descriptors), generator=generator)[: self.conf.fit_descriptors]]
        kmeans = KMeans(self.conf.num_clusters, None, max_iterations=self.conf.kmeans_iterations, seed=self.conf.seed)
        kmeans.fit(descriptors)
        self.codebook = kmeans.cluster_centers.float()
        logger.info("VLAD codebook: %d clusters fitted on %d descriptors from %d images",
                    len(self.codebook), len(descriptors), len(sample))

    def aggregate(self, descriptors: torch.Tensor) -> torch.Tensor:
        assert self.codebook is not None, "call prepare() first"
        k, dim = self.codebook.shape
        vlad = torch.zeros(k, dim)
        if len(descriptors):
            assignment = torch.cdist(descriptors, self.codebook).argmin(dim=1)
            vlad.index_add_(0, assignment, descriptors - self.codebook[assignment])
        vlad = torch.nn.functional.normalize(vlad, dim=1)  # intra-normalisation
        vlad = vlad.sign() * vlad.abs().sqrt()
        return vlad.reshape(-1)

    def describe(self, image: np.ndarray) -> np.ndarray:
        vlad = torch.nn.functional.normalize(self.aggregate(self.local_descriptors(image)), dim=0)
        return vlad.numpy().astype(np.float32)

"""SIFT with RootSIFT descriptors: the default, weight-free local features.

Both OpenCV and pycolmap ship SIFT. Measured on this machine (2 cores, CPU, warm, same decoded grey image,
`pycolmap.Sift(FeatureExtractionOptions(max_num_features=8192), Device.cpu).extract(img)` against
`cv2.SIFT_create(nfeatures=8192, contrastThreshold=0.02).detectAndCompute(img, None)`):

| image (resized)           | pycolmap.Sift      | OpenCV SIFT        |
|---------------------------|--------------------|--------------------|
| templeR0013 640x480       | 1595 kp, 0.34 s    | 1497 kp, 0.08 s    |
| fountain 0000 1600x1067   | 10856 kp, 2.88 s   | 8192 kp, 0.87 s    |
| sceaux 100_7100 1600x1202 | 10187 kp, 3.50 s   | 8192 kp, 1.03 s    |

OpenCV is 3-4x faster, so it is the backend; quality at the pipeline level (registered images, pose AUC against
ground truth, against COLMAP's own SIFT pipeline) is measured by scripts/bench_sfm.py.

- Threshold: OpenCV's default contrast threshold (0.04) keeps too few points on weakly textured objects (916 on the
  temple image vs COLMAP's 1595). On temple_ring (19 views, ground truth) relative-pose AUC@1° was 28.3 at 0.02,
  29.9 at 0.015, 32.2 at 0.01 and 33.1 at 0.005 (COLMAP's own pipeline: 33.5-34.2); lower thresholds cost
  matching time, so the default is 0.01.
- Position: without `enable_precise_upscale` OpenCV doubles the first octave with a half-pixel misalignment and
  every keypoint lands +0.24 px off in x and y (measured on synthetic blobs at octaves -1..2); with it the bias is
  below 0.02 px, and keypoints are in hloc's convention (pixel centres at integer coordinates).
- Descriptors: RootSIFT (L1-normalise, square root), as COLMAP's default L1_ROOT normalisation.
"""

from __future__ import annotations

import cv2
import numpy as np

from .base import LocalFeatures
from .threads import available_cores


#: Default cap on the images SIFT extracts at once (`num_threads` overrides it): ~0.25 GB each at 1600 px.
MAX_IMAGE_THREADS = 8


def root_sift(descriptors: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    descriptors = descriptors / (np.abs(descriptors).sum(axis=1, keepdims=True) + eps)
    return np.sqrt(np.maximum(descriptors, 0.0)).astype(np.float32)


class SIFT(LocalFeatures):
    default_conf = {
        "max_keypoints": 8192,
        "resize_max": 1600,
        "grayscale": True,
        "contrast_threshold": 0.01,
        "edge_threshold": 10.0,
        "n_octave_layers": 3,
        "root_sift": True,
        "num_threads": None,  # images extracted at once, one OpenCV thread each; None: one per core, at most 8
    }
    descriptor_family = "sift"

    def _init(self, conf) -> None:
        self._sift = cv2.SIFT_create(
            nfeatures=conf.max_keypoints or 0,
            nOctaveLayers=conf.n_octave_layers,
            contrastThreshold=conf.contrast_threshold,
            edgeThreshold=conf.edge_threshold,
            enable_precise_upscale=True,  # see the module docstring: removes a +0.24 px bias
        )

    def parallel_images(self) -> int:
        """One image per core beats OpenCV's threads inside one image: 12 temple_ring_full images (640x480) on 2
        cores took 78-100 ms per image one at a time, 53 ms two at a time on one OpenCV thread each; same
        keypoints and descriptors. At most `MAX_IMAGE_THREADS` by default: each image in flight costs memory (a
        3072x2048 fountain_p11 image at 1600 px: +215 MB peak for OpenCV's pyramid, +25 MB decoded)."""
        if self.conf.num_threads is not None:
            return max(1, self.conf.num_threads)
        return min(available_cores(), MAX_IMAGE_THREADS)

    def _extract_image(self, image: np.ndarray) -> dict[str, np.ndarray]:
        gray = image[..., 0] if image.shape[2] == 1 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        gray = np.clip(gray * 255.0 + 0.5, 0, 255).astype(np.uint8)
        keypoints, descriptors = self._sift.detectAndCompute(gray, None)
        if descriptors is None or len(keypoints) == 0:
            return {
                "keypoints": np.zeros((0, 2), np.float32),
                "descriptors": np.zeros((0, 128), np.float32),
                "scores": np.zeros((0,), np.float32),
                "scales": np.zeros((0,), np.float32),
                "oris": np.zeros((0,), np.float32),
            }
        if self.conf.root_sift:
            descriptors = root_sift(descriptors)
        else:
            descriptors = descriptors / np.linalg.norm(descriptors, axis=1, keepdims=True).clip(min=1e-8)
        return {
            "keypoints": np.array([kp.pt for kp in keypoints], np.float32),
            "descriptors": descriptors.astype(np.float32),
            "scores": np.array([kp.response for kp in keypoints], np.float32),
            # LightGlue's SIFT weights also read each keypoint's size (px) and angle (radians), as cvg's extractor.
            "scales": np.array([kp.size for kp in keypoints], np.float32),
            "oris": np.deg2rad(np.array([kp.angle for kp in keypoints], np.float32)),
        }

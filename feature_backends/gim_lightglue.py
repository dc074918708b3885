"""GIM's SuperPoint + LightGlue (gim_lightglue_100h.ckpt): one checkpoint, two backends.

`recon run --features gim-superpoint --matcher gim-lightglue`. The checkpoint is a PyTorch-Lightning file whose
'state_dict' holds SuperPoint under 'superpoint.' and LightGlue under 'model.' (GIM's demo splits it the same
way). LightGlue is kornia's, in its SuperPoint configuration (256-d descriptors, no scale/orientation), loaded
through feature_backends.lightglue's strict loader; GIM's LightGlue is glue-factory's implementation with the same
parameter names. SuperPoint's network and detection rule are feature_backends.superpoint's (GIM's copy is
glue-factory's, with the same two-round NMS and legacy descriptor sampling). GIM's extraction settings: max 2048
keypoints, NMS radius 3, detection threshold 0, LightGlue filter threshold 0.1 without adaptive depth/width (GIM's
demo disables neither explicitly; we disable both, as the pruning only changes speed, and this keeps CPU and CUDA
results identical).
"""

from __future__ import annotations

from collections.abc import Mapping

from kornia.feature import LightGlue as KorniaLightGlue

from .base import Conf, StateDictBackend
from .errors import WeightsError
from .lightglue import DERIVED_BUFFERS, LightGlue, rename_legacy_keys
from .superpoint import SuperPoint, SuperPointNet
from .weights import WeightFile, load_state_dict_strict, strip_prefix

GIM_LIGHTGLUE = WeightFile(
    "gim_lightglue_100h.ckpt", "https://github.com/xuelunshen/gim/raw/main/weights/gim_lightglue_100h.ckpt",
    note="one Lightning checkpoint: 'superpoint.*' = SuperPoint, 'model.*' = LightGlue (both needed)",
)


class GIMSuperPoint(StateDictBackend, SuperPoint):
    """SuperPoint (feature_backends.superpoint: network and detection) with GIM's weights, the 'superpoint.'
    half of gim_lightglue_100h.ckpt, and GIM's settings."""

    default_conf = {
        "weights": None,
        "max_keypoints": 2048,
        "resize_max": 1024,
        "grayscale": True,
        "nms_radius": 3,
        "detection_threshold": 0.0,
        "remove_borders": 4,
    }
    size_multiple = 8
    #: GIM trained SuperPoint and LightGlue together: its descriptors fit GIM's LightGlue only.
    descriptor_family = "gim-superpoint"
    weight_files = {"gim": (GIM_LIGHTGLUE,)}

    @classmethod
    def checkpoint_files(cls, conf: Conf) -> dict[str, tuple[WeightFile, str | None]]:
        return {"weights": (GIM_LIGHTGLUE, conf.weights)}

    def _init(self, conf: Conf) -> None:
        checkpoint = self.load_checkpoints(conf)["weights"]
        state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else None
        if state is None:
            raise WeightsError("the GIM LightGlue checkpoint is not a dict")
        self.model = SuperPointNet()
        load_state_dict_strict(self.model, strip_prefix(state, "superpoint."), "GIM SuperPoint weights")
        self.prepare_network(self.model)


class GIMLightGlue(LightGlue, StateDictBackend):
    """kornia's LightGlue (SuperPoint configuration) with the 'model.' half of GIM's checkpoint."""

    default_conf = {"features": "superpoint", "depth_confidence": -1, "width_confidence": -1}
    weight_files = {"gim": (GIM_LIGHTGLUE,)}

    @classmethod
    def checkpoint_files(cls, conf: Conf) -> dict[str, tuple[WeightFile, str | None]]:
        return {"weights": (GIM_LIGHTGLUE, conf.weights)}

    def _init(self, conf: Conf) -> None:
        self.features = "superpoint"
        preset = {k: v for k, v in KorniaLightGlue.features["superpoint"].items() if k != "weights"}
        self.model = KorniaLightGlue(
            features=None, **preset, filter_threshold=conf.filter_threshold,
            depth_confidence=conf.depth_confidence, width_confidence=conf.width_confidence, flash=conf.flash,
            mp=self.device.type == "cuda" and conf.mixed_precision,
        )
        checkpoint = self.load_checkpoints(conf)["weights"]
        state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else {}
        lightglue = rename_legacy_keys(strip_prefix(state, "model."), self.model.conf.n_layers)
        load_state_dict_strict(self.model, lightglue, GIM_LIGHTGLUE.filename, derived=DERIVED_BUFFERS)
        self.model.eval().to(self.device)

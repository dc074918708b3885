"""DaD against the authors' package (PyPI `dad-detector`, module `dad`) with the same random weights.

The official entry point `dad.load_DaD()` sets the defaults recon's `dad` now has: longer side resized (up or
down) to 1024 by PIL, 4-px border removal, 3x3 NMS, top-k, sub-pixel refinement at temperature 0.5. The official
modules autocast to float16 even on CPU; that is switched off here (recon runs float32 on CPU), the only change
made to the reference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from feature_backends.images import read_image
from feature_backends.registry import get_backend

dad = pytest.importorskip("dad")

NUM_KEYPOINTS = 512


@pytest.fixture(scope="module")
def dad_weights(tmp_path_factory):
    """A random dad.pth (random BatchNorm statistics, so the logits are not flat) and DeDoDe-B descriptor."""
    from kornia.feature.dedode.dedode_models import dedode_descriptor_B

    from feature_backends.dad import dad_detector

    folder = tmp_path_factory.mktemp("dad_weights")
    torch.manual_seed(0)
    detector = dad_detector()
    with torch.no_grad():
        for module in detector.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
    torch.save(detector.state_dict(), folder / "dad.pth")
    torch.save(dedode_descriptor_B().state_dict(), folder / "dedode_descriptor_B.pth")
    mp = pytest.MonkeyPatch()
    mp.setenv("RECON_WEIGHTS_DIR", str(folder))
    mp.setenv("RECON_OFFLINE", "1")
    yield folder
    mp.undo()


def official_detector(weights: Path, resize: int = 1024):
    model = dad.load_DaD(resize=resize, pretrained=False).to("cpu").eval()  # otherwise the loader's defaults
    model.load_state_dict(torch.load(weights / "dad.pth", weights_only=True))
    for module in model.modules():
        if hasattr(module, "amp"):
            module.amp = False
    return model


def official_keypoints(model, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Keypoints of `detect_from_path`'s pipeline in original-image pixels, hloc convention, and probabilities."""
    width, height = read_image(path).shape[1::-1]
    out = model.detect(model.load_image(path, device="cpu"), num_keypoints=NUM_KEYPOINTS)
    pixels = model.to_pixel_coords(out["keypoints"][0], height, width) - 0.5  # topleft 0.5 → hloc
    return pixels.numpy(), out["keypoint_probs"][0].numpy()


@pytest.mark.parametrize("scene, name, resize", [
    ("temple_ring", "templeR0013.png", 1024),  # 640x480 upscaled to 1024x768: the official default
    ("fountain_p11", "images/0000.jpg", 512),  # 3072x2048 shrunk 6x to 512x336 (341.3 floored to /8), to stay fast
])
def test_dad_matches_the_official_loader_on_real_images(dad_weights, shared_data, scene, name, resize):
    """Same random weights, same image file: the same keypoints (< 0.01 px) and probabilities."""
    path = shared_data / scene / name
    if not path.is_file():
        pytest.skip(f"{path} not present")
    expected, probs = official_keypoints(official_detector(dad_weights, resize), path)
    assert probs.min() > 0  # every official keypoint is an NMS survivor, so the counts are comparable
    ours = get_backend("features", "dad", {"max_keypoints": NUM_KEYPOINTS, "resize_max": resize})
    # The DeDoDe descriptor is not part of the comparison (the official package has none) and is the slowest part.
    ours.describe = lambda normalized, keypoints: keypoints.new_zeros(*keypoints.shape[:2], 256)
    features = ours.extract(read_image(path))
    assert len(features["keypoints"]) == len(expected) == NUM_KEYPOINTS
    # Both are sorted by probability; compare in a tie-proof order (raster order of the integer pixel).
    order_ours = np.lexsort(np.round(features["keypoints"]).T)
    order_official = np.lexsort(np.round(expected).T)
    difference = np.abs(features["keypoints"][order_ours] - expected[order_official]).max()
    assert difference < 0.01, difference
    np.testing.assert_allclose(features["scores"][order_ours], probs[order_official], rtol=1e-3)
    print(f"{scene}: {NUM_KEYPOINTS} keypoints, max |diff| {difference:.2e} px")


def test_dad_defaults_are_the_official_loaders():
    import inspect

    from feature_backends.dad import DaD

    official = inspect.signature(dad.load_DaD).parameters
    conf = DaD.full_default_conf()
    assert conf["resize_max"] == official["resize"].default == 1024
    assert conf["remove_borders"] is official["remove_borders"].default is True
    assert conf["nms_size"] == official["nms_size"].default == 3
    assert conf["subpixel_temperature"] == official["subpixel_temp"].default == 0.5
    assert conf["resize_force"] is True and official["keep_aspect_ratio"].default is True

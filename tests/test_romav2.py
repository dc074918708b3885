"""RoMa v2 offline: parity with romav2's own model (same random weights), the DINOv3 key map, strict loading, and
end-to-end runs through the dense stage in both keypoint modes.

romav2's constructor downloads its checkpoint and Meta's DINOv3 code; the reference here
(recon.references.official_romav2, shared with scripts/bench_dense.py) is built by that very constructor with two
patches: `torch.hub.load` returns Meta's `dinov3_vitl16` architecture assembled from
Meta's own layers as vendored in `romav2.vit` (block, attention with masked key bias, RoPE, patch embedding) with the
token handling of facebookresearch/dinov3 `DinoVisionTransformer.get_intermediate_layers` (commit adc2544, the one
romav2 pins), and the checkpoint download is replaced by loading the random state dict strictly afterwards. With
RECON_DINOV3_REPO naming a checkout of facebookresearch/dinov3 at that commit, the hub load runs Meta's real code
from it instead (checked once here, 2026-11-29: strict load of the same checkpoint, warp and overlap bit-identical
to that glue and to recon's backend).
"""

from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

pytest.importorskip("romav2")
pytest.importorskip("timm")

from feature_backends.errors import WeightsError  # noqa: E402
from recon.references import no_random_init, official_romav2, random_romav2_checkpoint  # noqa: E402

COARSE, FINE = 64, 96  # romav2's precise setting is 800 / 1280; tiny sizes keep a pair well under a second
SMALL = {"setting": "precise", "coarse_res": COARSE, "upsample_res": FINE}


@pytest.fixture(scope="module")
def reference():
    """romav2's own model and the random checkpoint loaded into it."""
    model = official_romav2()
    checkpoint = random_romav2_checkpoint(model)
    nn.Module.load_state_dict(model, checkpoint)  # strict: the checkpoint has the official layout
    return model.eval(), checkpoint


def textured_pair(width: int = 128, height: int = 96, shift: tuple[int, int] = (13, 7)) -> list[np.ndarray]:
    """Two crops of one smooth random canvas, uint8 (H, W, 3)."""
    rng = np.random.default_rng(1)
    canvas = (rng.random((30, 40, 3)) * 255).astype(np.uint8)
    canvas = np.asarray(Image.fromarray(canvas).resize((width + 40, height + 40), Image.BICUBIC))
    return [canvas[:height, :width].copy(), canvas[shift[1]:shift[1] + height, shift[0]:shift[0] + width].copy()]


def ours(checkpoint, **conf):
    from feature_backends.romav2 import RoMaV2

    with no_random_init():
        return RoMaV2.from_checkpoints({"weights": checkpoint}, {**SMALL, **conf}, device="cpu")


def test_romav2_matches_the_official_model(reference):
    model, checkpoint = reference
    backend = ours(checkpoint)
    assert (backend.model.H_lr, backend.model.H_hr, backend.model.bidirectional) == (COARSE, FINE, True)
    model.apply_setting("precise")
    model.H_lr = model.W_lr = COARSE
    model.H_hr = model.W_hr = FINE
    pair = textured_pair()
    expected = model.match(pair[0], pair[1])  # uint8 arrays: romav2 scales by 1/255 as recon's reader does
    warp = backend.warp_images(*(image.astype(np.float32) / 255 for image in pair))
    assert warp.forward.shape == (FINE, FINE, 2) and warp.size0 == (128, 96)
    differences = {
        "warp_AB": (warp.forward - expected["warp_AB"][0]).abs().max(),
        "warp_BA": (warp.backward - expected["warp_BA"][0]).abs().max(),
        "overlap_AB": (warp.certainty - expected["overlap_AB"][0, ..., 0]).abs().max(),
        "overlap_BA": (warp.backward_certainty - expected["overlap_BA"][0, ..., 0]).abs().max(),
    }
    print({k: f"{float(v):.1e}" for k, v in differences.items()})
    assert all(value <= 1e-5 for value in differences.values()), differences
    assert warp.forward.std() > 0.05 and warp.certainty.std() > 0.01  # the random network's output is not flat


def test_dinov3_key_map_agrees_with_timm_and_checks_what_it_drops(reference):
    from timm.models.eva import checkpoint_filter_fn

    from feature_backends.romav2 import DINOv3Features, dinov3_to_timm

    _, checkpoint = reference
    vit = DINOv3Features().vit
    backbone = {k[2:]: v for k, v in checkpoint.items() if k.startswith("f.")}
    mapped = dinov3_to_timm(backbone, vit, "test")
    filtered = checkpoint_filter_fn(dict(backbone), vit)  # timm's own converter for Meta's DINOv3 files
    assert mapped.keys() == filtered.keys() == vit.state_dict().keys()
    assert all(torch.equal(mapped[k], filtered[k]) for k in mapped)
    unmasked = {**backbone, "blocks.3.attn.qkv.bias_mask": torch.ones(3 * 1024)}  # a key bias that would count
    with pytest.raises(WeightsError, match="blocks.3.attn.qkv.bias"):
        dinov3_to_timm(unmasked, vit, "test")
    with pytest.raises(WeightsError, match="periods"):
        dinov3_to_timm({**backbone, "rope_embed.periods": backbone["rope_embed.periods"] * 2}, vit, "test")


def test_romav2_checkpoint_loads_strictly(reference):
    _, checkpoint = reference
    missing = {k: v for k, v in checkpoint.items() if k != "refiners.4.proj.weight"}
    with pytest.raises(WeightsError, match="refiners.4.proj.weight"):
        ours(missing)
    with pytest.raises(WeightsError, match="f.vit.extra"):
        ours({**checkpoint, "f.extra": torch.zeros(1)})


def test_romav2_offline_miss_names_the_file_and_url(tmp_path, monkeypatch):
    from feature_backends.registry import get_backend

    monkeypatch.setenv("RECON_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("RECON_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(WeightsError) as error:
        get_backend("dense", "romav2")
    assert "romav2.0.1.pt" in str(error.value)
    assert "https://github.com/Parskatt/RoMaV2/releases/download/v2.0.1/romav2.0.1.pt" in str(error.value)


@pytest.fixture
def pair_folder(tmp_path, reference, monkeypatch):
    """Three generated crops as PNG files, two pairs, and recon's romav2 fed the random checkpoint in memory."""
    from feature_backends.romav2 import RoMaV2
    from pairs.io import write_pairs

    monkeypatch.setattr(RoMaV2, "_given_checkpoints", {"weights": reference[1]})
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    first, second = textured_pair()
    third = textured_pair(shift=(25, 15))[1]
    for name, image in (("a.png", first), ("b.png", second), ("c.png", third)):
        Image.fromarray(image).save(image_dir / name)
    pairs = write_pairs(tmp_path / "pairs.txt", [("a.png", "b.png"), ("a.png", "c.png")])
    return image_dir, pairs


def stage_outputs(features_path, matches_path, name0, name1):
    from feature_backends.store import FeatureReader, MatchReader

    with FeatureReader(features_path) as reader:
        keypoints = reader.read_keypoints(name0), reader.read_keypoints(name1)
    with MatchReader(matches_path) as reader:
        matches = reader.read(name0, name1)[0]
        raw = reader.read_raw(name0, name1)[0]
    return keypoints, matches, raw


def test_romav2_runs_the_dense_stage_in_quantised_mode(pair_folder, tmp_path):
    from feature_backends.images import read_image
    from feature_backends.registry import get_backend
    from recon.dense import match_dense

    image_dir, pairs = pair_folder
    conf = {"name": "romav2", **SMALL, "num_matches": 300, "cell_size": 4, "max_error": 2}
    features = tmp_path / "f.h5"
    matches = match_dense(conf, pairs, image_dir, features, tmp_path / "m.h5", device="cpu")
    (keypoints0, keypoints1), found, raw = stage_outputs(features, matches, "a.png", "b.png")
    # The stored samples are the network's: the backend's own match_images gives exactly them (seeded sampler).
    with no_random_init():
        backend = get_backend("dense", "romav2", {**SMALL, "num_matches": 300}, device="cpu")
    sampled = backend.match_images(read_image(image_dir / "a.png"), read_image(image_dir / "b.png"))
    np.testing.assert_array_equal(raw["keypoints0"], sampled["keypoints0"])
    np.testing.assert_array_equal(raw["keypoints1"], sampled["keypoints1"])
    assert len(raw["keypoints0"]) == 300 and len(found) > 30  # 45: a random warp bunches its samples
    # Every match joins the cells of one sample (a cell is 4 px wide: its keypoint lies within 4 * sqrt(2) px).
    distance0 = np.linalg.norm(keypoints0[found[:, 0], None] - raw["keypoints0"][None], axis=-1)
    distance1 = np.linalg.norm(keypoints1[found[:, 1], None] - raw["keypoints1"][None], axis=-1)
    assert np.all(((distance0 <= 4 * 2**0.5) & (distance1 <= 4 * 2**0.5)).any(axis=1))


def test_romav2_runs_the_dense_stage_in_anchored_mode(pair_folder, tmp_path):
    from feature_backends.images import read_image
    from feature_backends.registry import get_backend
    from recon.dense import match_dense
    from recon.extract import extract

    image_dir, pairs = pair_folder
    radius = 6.0
    conf = {"name": "sift+romav2", **SMALL, "radius": radius, "cycle": False, "propagate": False}
    features = extract("sift", image_dir, tmp_path / "f.h5")  # the anchors, as `recon run` extracts them first
    matches = match_dense(conf, pairs, image_dir, features, tmp_path / "m.h5", device="cpu")
    (keypoints0, keypoints1), found, _ = stage_outputs(features, matches, "a.png", "b.png")
    with no_random_init():
        backend = get_backend("dense", "romav2", SMALL, device="cpu")
    warp = backend.warp_images(read_image(image_dir / "a.png"), read_image(image_dir / "b.png"))
    projected, _ = warp.transfer(keypoints0[found[:, 0]])
    # Anchored on SIFT keypoints: each match is a keypoint of image 1 within `radius` of where the warp sends its
    # partner, and no keypoint is used twice.
    assert len(found) > 5, len(found)  # 19 here
    assert np.all(np.linalg.norm(projected - keypoints1[found[:, 1]], axis=1) <= radius + 1e-3)
    assert len(set(found[:, 0])) == len(set(found[:, 1])) == len(found)

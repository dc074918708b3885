"""The dense stage's encoding cache: on a GPU it keeps encodings on the device within a share of the free memory
and spills older ones over to host memory, so each image is encoded once per stage. No GPU here: the device
tier is exercised on the CPU with a fake small budget (the moves are then no-ops, the bookkeeping is the same)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from feature_backends import registry
from recon.cache import SpillCache
from recon.dense import common, match_dense
from test_dense import crops  # noqa: F401  (fixture)


def test_spill_cache_spills_to_host_and_brings_back():
    moves = []
    cache = SpillCache(lambda name: {"x": np.full(10, ord(name), np.float32)}, device_bytes=80, host_bytes=80,
                       spill=lambda value: moves.append("out") or value,
                       unspill=lambda value: moves.append("in") or value)
    for name in "abcab":  # device holds 2 (40 B each): c pushes a to the host, a comes back and pushes b out, and so on
        assert cache[name]["x"][0] == ord(name)
    assert (cache.loads, cache.spills, cache.unspills) == (3, 3, 2)
    assert list(cache.device.items) == ["a", "b"] and list(cache.host.items) == ["c"]
    assert moves == ["out", "in", "out", "in", "out"]
    for name in "defg":  # the host holds 2 more; what it cannot hold is dropped, then loaded again
        cache[name]
    assert list(cache.host.items) == ["d", "e"] and cache.loads == 7
    cache["a"]
    assert cache.loads == 8


def test_device_budget_is_a_share_of_the_free_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (6 << 30, 8 << 30))
    assert common.device_budget(torch.device("cuda")) == 3 << 30  # half of the free 6 GiB
    assert common.device_budget(torch.device("cpu")) is None  # one tier: the host

    class OnGPU:
        device = torch.device("cuda")

    cache = common.encoded_images(OnGPU(), "unused")
    assert (cache.device.max_bytes, cache.host.max_bytes) == (3 << 30, common.ENCODED_CACHE_BYTES)


@pytest.fixture(scope="module")
def gim_dkm():
    """GIM's DKMv3 with random weights in GIM's checkpoint layout, at small resolutions."""
    from feature_backends.gim import GIMDKM, DKMv3
    from feature_backends.roma import random_state_dict

    state = {f"model.{k}": v for k, v in random_state_dict(DKMv3(), seed=3).items()}
    conf = {"coarse_res": [64, 96], "upsample_res": [96, 128], "num_matches": 300}
    return GIMDKM.from_checkpoints({"weights": {"state_dict": state}}, conf, device="cpu")


def test_dkm_one_image_at_a_time_equals_the_batched_network(gim_dkm):
    rng = np.random.default_rng(0)
    image0 = rng.random((90, 120, 3)).astype(np.float32)
    image1 = np.roll(image0, 8, axis=1)
    warp = gim_dkm.warp_images(image0, image1)  # encode + decode, as the dense stage runs it
    with torch.inference_mode():
        flow, certainty = gim_dkm.model.match(gim_dkm.image_tensor(image0), gim_dkm.image_tensor(image1),
                                              gim_dkm.coarse_res, gim_dkm.upsample_res, symmetric=True)
    torch.testing.assert_close(warp.forward, flow[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(warp.backward, flow[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(warp.certainty, certainty[0], atol=1e-5, rtol=0)
    assert warp.forward.shape == (96, 128, 2) and float(warp.certainty.std()) > 0


def _contents(path):
    out = {}
    with h5py.File(path) as file:
        file.visititems(lambda name, item: out.__setitem__(name, item[()]) if isinstance(item, h5py.Dataset)
                        else None)
    return out


def test_gim_dkm_spills_over_and_encodes_each_image_once(gim_dkm, crops, tmp_path, monkeypatch):  # noqa: F811
    """Quantised gim-dkm over (a,b), (a,c), (b,c): with the whole budget (CPU: one tier) and with a device budget
    of 1 byte (the two images of the current pair stay, every other one is spilled to the host and brought
    back), each image is encoded once and the files are the same."""
    image_dir, pairs, _, _ = crops
    monkeypatch.setattr(registry, "get_backend", lambda *args, **kwargs: gim_dkm)
    encoder = gim_dkm._encoder_features
    calls = []
    monkeypatch.setattr(gim_dkm, "_encoder_features", lambda image: calls.append(1) or encoder(image))
    caches = []

    class Recorded(SpillCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            caches.append(self)

    monkeypatch.setattr(common, "SpillCache", Recorded)
    match_dense({"name": "gim-dkm"}, pairs, image_dir, tmp_path / "f.h5", tmp_path / "m.h5")
    assert len(calls) == 3 and caches[-1].spills == 0
    monkeypatch.setattr(common, "device_budget", lambda device: 1)
    match_dense({"name": "gim-dkm"}, pairs, image_dir, tmp_path / "sf.h5", tmp_path / "sm.h5")
    assert len(calls) == 6 and (caches[-1].loads, caches[-1].spills, caches[-1].unspills) == (3, 2, 1)
    for name in ("f.h5", "m.h5"):
        got, expected = _contents(tmp_path / f"s{name}"), _contents(tmp_path / name)
        assert sorted(got) == sorted(expected)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    assert len(_contents(tmp_path / "f.h5")["a.png/keypoints"]) > 50

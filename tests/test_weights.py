"""feature_backends.weights: resolution order, checksums, offline errors, safe loading; `recon weights` listing."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from feature_backends.errors import WeightsError
from feature_backends.weights import WeightFile, load_checkpoint, load_file_safely, resolve_weights


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No weights dir, an empty torch hub under tmp_path, downloads allowed unless a test turns them off."""
    monkeypatch.delenv("RECON_WEIGHTS_DIR", raising=False)
    monkeypatch.delenv("RECON_OFFLINE", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path


def save_state(path: Path, value: float = 1.0) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"w": torch.full((3,), value)}, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_explicit_path_wins_over_every_other_location(isolated, monkeypatch):
    weight = WeightFile("model.pth", "https://example.invalid/model.pth")
    save_state(isolated / "env" / "model.pth", 2.0)
    save_state(isolated / "torch_home" / "hub" / "checkpoints" / "model.pth", 3.0)
    monkeypatch.setenv("RECON_WEIGHTS_DIR", str(isolated / "env"))
    save_state(isolated / "mine.pth", 1.0)
    assert resolve_weights(weight, isolated / "mine.pth") == isolated / "mine.pth"
    assert float(load_checkpoint(weight, isolated / "mine.pth")["w"][0]) == 1.0


def test_env_dir_then_hub_cache(isolated, monkeypatch):
    weight = WeightFile("model.pth", "https://example.invalid/model.pth")
    hub = isolated / "torch_home" / "hub" / "checkpoints" / "model.pth"
    save_state(hub, 3.0)
    assert resolve_weights(weight) == hub  # no env dir: the torch hub cache
    save_state(isolated / "env" / "model.pth", 2.0)
    monkeypatch.setenv("RECON_WEIGHTS_DIR", str(isolated / "env"))
    assert resolve_weights(weight) == isolated / "env" / "model.pth"
    assert float(load_checkpoint(weight)["w"][0]) == 2.0


def test_explicit_path_that_does_not_exist_is_an_error(isolated):
    with pytest.raises(WeightsError, match="does not exist"):
        resolve_weights(WeightFile("model.pth", "https://example.invalid/model.pth"), isolated / "nope.pth")


def test_download_from_url_into_hub_cache_with_checksum(isolated):
    """torch.hub.download_url_to_file goes through urllib, which serves file:// URLs: a real download path."""
    source = isolated / "server" / "model.pth"
    digest = save_state(source, 5.0)
    weight = WeightFile("model.pth", source.as_uri(), sha256=digest)
    path = resolve_weights(weight)
    assert path == isolated / "torch_home" / "hub" / "checkpoints" / "model.pth"
    assert path.read_bytes() == source.read_bytes()
    assert not path.with_name("model.pth.partial").exists()
    assert float(load_checkpoint(weight)["w"][0]) == 5.0


def test_failed_download_names_file_url_and_folders(isolated):
    weight = WeightFile("model.pth", (isolated / "server" / "missing.pth").as_uri())
    with pytest.raises(WeightsError, match="download failed") as error:
        resolve_weights(weight)
    assert weight.url in str(error.value)
    assert not list((isolated / "torch_home" / "hub" / "checkpoints").glob("*"))


def test_checksum_mismatch_is_an_error_wherever_the_file_was_found(isolated):
    actual = save_state(isolated / "mine.pth")
    wrong = WeightFile("model.pth", "https://example.invalid/model.pth", sha256="0" * 64)
    with pytest.raises(WeightsError, match=f"checksum mismatch.*got {actual}"):
        resolve_weights(wrong, isolated / "mine.pth")
    source = isolated / "server" / "model.pth"
    save_state(source)
    with pytest.raises(WeightsError, match="checksum mismatch"):
        resolve_weights(WeightFile("model.pth", source.as_uri(), sha256="0" * 64))
    pinned = WeightFile("model.pth", "https://example.invalid/model.pth", sha256=actual)
    assert resolve_weights(pinned, isolated / "mine.pth") == isolated / "mine.pth"


def test_offline_miss_names_file_url_and_folders(isolated, monkeypatch):
    monkeypatch.setenv("RECON_OFFLINE", "1")
    monkeypatch.setenv("RECON_WEIGHTS_DIR", str(isolated / "env"))
    weight = WeightFile("dad.pth", "https://github.com/Parskatt/dad/releases/download/v0.1.0/dad.pth")
    with pytest.raises(WeightsError) as error:
        resolve_weights(weight)
    message = str(error.value)
    assert "dad.pth" in message and weight.url in message
    assert str(isolated / "env" / "dad.pth") in message
    assert str(isolated / "torch_home" / "hub" / "checkpoints" / "dad.pth") in message
    assert error.value.exit_code == 2


def test_cli_exits_2_when_weights_are_missing_offline(isolated, synthetic_scene):
    env = {**os.environ, "RECON_OFFLINE": "1", "TORCH_HOME": str(isolated / "torch_home")}
    env.pop("RECON_WEIGHTS_DIR", None)
    result = subprocess.run(
        [sys.executable, "-m", "recon.cli", "extract", str(synthetic_scene / "images"), str(isolated / "f.h5"),
         "--features", "dad"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert "dad.pth" in result.stderr and "https://github.com/Parskatt/dad/releases" in result.stderr


class _RunsCode:
    marker: Path = Path()

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_that_executes_code_is_refused(isolated):
    marker = isolated / "pwned"
    evil = _RunsCode()
    _RunsCode.marker = marker
    torch.save({"w": torch.zeros(1), "payload": evil}, isolated / "evil.pth")
    with pytest.raises(WeightsError, match="refused"):
        load_file_safely(isolated / "evil.pth")
    assert not marker.exists()
    weight = WeightFile("evil.pth", "https://example.invalid/evil.pth")
    with pytest.raises(WeightsError, match="refused"):
        load_checkpoint(weight, isolated / "evil.pth")
    assert not marker.exists()


def test_weights_list_and_check_report_learned_backends(isolated, monkeypatch, capsys):
    from recon.weights_cli import check_weights, list_weights

    monkeypatch.setenv("RECON_WEIGHTS_DIR", str(isolated / "env"))
    save_state(isolated / "env" / "dad.pth")
    assert list_weights() == 0
    listing = capsys.readouterr().out
    for filename in ("dad.pth", "dad_light.pth", "dedode_detector_L_v2.pth", "dedode_descriptor_G.pth",
                     "dinov2_vitl14_pretrain.pth", "depth-save.pth", "aliked-n16.pth", "sift_lightglue.pth",
                     "dedodeb_lightglue.pth"):
        assert filename in listing
    dad_line = next(line for line in listing.splitlines() if " dad.pth " in line)
    assert "present" in dad_line and str(isolated / "env" / "dad.pth") in dad_line
    assert check_weights() == 0
    checked = capsys.readouterr().out
    assert f"unpinned  dad.pth  sha256={hashlib.sha256((isolated / 'env' / 'dad.pth').read_bytes()).hexdigest()}" in checked
    assert "missing   dad_dark.pth" in checked


def test_steerer_files_are_square_tensors_and_so2_is_exponentiated(isolated, monkeypatch):
    """C4 files are the steerer; SO2 files are a Lie-algebra generator L whose discrete step is exp(2 pi / order L):
    with L = [[0, 1], [-1, 0]] and order 4 that is a quarter turn. A state dict in place of the tensor is refused."""
    import math

    from feature_backends.weights import STEERER_WEIGHTS, load_steerer_generator

    folder = isolated / "w"
    folder.mkdir()
    monkeypatch.setenv("RECON_WEIGHTS_DIR", str(folder))
    monkeypatch.setenv("RECON_OFFLINE", "1")
    assert STEERER_WEIGHTS["G-SO2"].filename == "G_SO2_Spread_steerer_setting_C.pth"
    assert STEERER_WEIGHTS["B-C4"].url.endswith("/release-2/B_C4_Perm_steerer_setting_C.pth")
    torch.save(torch.tensor([[0.0, 1.0], [-1.0, 0.0]]), folder / "B_SO2_Spread_steerer_setting_C.pth")
    step = load_steerer_generator("B-SO2", steerer_order=4)
    torch.testing.assert_close(step, torch.tensor([[0.0, 1.0], [-1.0, 0.0]]), atol=1e-6, rtol=0)
    step8 = load_steerer_generator("B-SO2", steerer_order=8)
    torch.testing.assert_close(step8[0, 0], torch.tensor(math.cos(math.pi / 4)))
    torch.save({"generator": torch.eye(4)}, folder / "B_C4_Perm_steerer_setting_C.pth")
    with pytest.raises(WeightsError, match="not a square steerer matrix"):
        load_steerer_generator("B-C4", steerer_order=4)
    with pytest.raises(WeightsError, match="G_C4_Perm_steerer_setting_C.pth"):
        load_steerer_generator("G-C4", steerer_order=4)

"""recon splat: the 3DGS PLY layout, the CPU rasterizer against a per-pixel reference, training on a generated
scene (held-out PSNR must rise), resume, MCMC on CPU, and clear errors for unusable input.

All training runs use one CPU thread and an 80x60 render of the 640x480 generated scene, so the whole file runs
in well under two minutes on two busy cores.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pycolmap
import pytest
import torch
from plyfile import PlyData

from feature_backends.errors import ConfigError, InputError
from recon.splat.ply import GaussianArrays, property_names, read_ply, write_ply
from recon.splat import SplatConfig, composite_sorted_pairs, relocation_torch, splat

# Short schedules so the strategies act within a test-sized run.
FAST = dict(resolution_scale=8, cpu_threads=1, refine_start_iter=50, refine_every=50, sh_degree_interval=50,
            device="cpu")


def _export_like(scene: Path, out: Path, model: str = "PINHOLE") -> Path:
    """OUT/undistorted/{images, sparse/0} as the export stage writes it, from the generated ground truth.

    The generated cameras are SIMPLE_RADIAL with k=0, i.e. already undistorted; the points get colours from
    the images as COLMAP's mapper gives them.
    """
    reconstruction = pycolmap.Reconstruction(scene / "gt")
    reconstruction.extract_colors_for_all_images(str(scene / "images"))
    if model == "PINHOLE":
        for camera in reconstruction.cameras.values():
            f, cx, cy, _ = camera.params
            camera.model = pycolmap.CameraModelId.PINHOLE
            camera.params = [f, f, cx, cy]
    sparse = out / "undistorted" / "sparse" / "0"
    sparse.mkdir(parents=True)
    reconstruction.write(sparse)
    os.symlink((scene / "images").resolve(), out / "undistorted" / "images")
    return out


@pytest.fixture(scope="module")
def pinhole_out(synthetic_scene, tmp_path_factory) -> Path:
    return _export_like(synthetic_scene, tmp_path_factory.mktemp("splat_out"))


# ---------------------------------------------------------------------------------------------------------- PLY


def test_ply_round_trip_has_the_3dgs_layout(tmp_path):
    rng = np.random.default_rng(0)
    n = 7
    gaussians = GaussianArrays(
        means=rng.normal(size=(n, 3)).astype(np.float32),
        sh0=rng.normal(size=(n, 1, 3)).astype(np.float32),
        shN=rng.normal(size=(n, 15, 3)).astype(np.float32),
        opacities=rng.normal(size=n).astype(np.float32),
        scales=rng.normal(size=(n, 3)).astype(np.float32),
        quats=rng.normal(size=(n, 4)).astype(np.float32),
    )
    path = write_ply(tmp_path / "point_cloud.ply", gaussians)

    ply = PlyData.read(str(path))
    assert [e.name for e in ply.elements] == ["vertex"]
    names = [p.name for p in ply["vertex"].properties]
    expected = (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
                + [f"f_rest_{i}" for i in range(45)]
                + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"])
    assert names == expected == property_names(15)
    assert all(p.val_dtype in ("f4", "float32", "float") for p in ply["vertex"].properties)
    assert not ply.text and ply.byte_order == "<"
    vertex = ply["vertex"]
    np.testing.assert_array_equal(vertex["nx"], 0)
    np.testing.assert_array_equal(vertex["y"], gaussians.means[:, 1])
    np.testing.assert_array_equal(vertex["f_dc_2"], gaussians.sh0[:, 0, 2])
    # f_rest is channel-major as in the reference: all red coefficients, then green, then blue
    np.testing.assert_array_equal(vertex["f_rest_0"], gaussians.shN[:, 0, 0])
    np.testing.assert_array_equal(vertex["f_rest_1"], gaussians.shN[:, 1, 0])
    np.testing.assert_array_equal(vertex["f_rest_15"], gaussians.shN[:, 0, 1])
    np.testing.assert_array_equal(vertex["f_rest_44"], gaussians.shN[:, 14, 2])
    np.testing.assert_array_equal(vertex["rot_0"], gaussians.quats[:, 0])

    back = read_ply(path)
    for field in ("means", "sh0", "shN", "opacities", "scales", "quats"):
        np.testing.assert_array_equal(getattr(back, field), getattr(gaussians, field))


def test_read_ply_refuses_other_layouts(tmp_path):
    path = tmp_path / "points.ply"
    path.write_text("ply\nformat ascii 1.0\nelement vertex 1\nproperty float x\nproperty float y\n"
                    "property float z\nend_header\n0 0 0\n")
    with pytest.raises(InputError, match="3DGS property layout"):
        read_ply(path)
    with pytest.raises(InputError, match="does not exist"):
        read_ply(tmp_path / "missing.ply")


# ---------------------------------------------------------------------------------------------- rasterizer


def _composite_per_pixel(means2d, conics, opacities, colors, depths, radii, width, height):
    """Plain reference: every pixel walks all Gaussians front to back, with the CUDA kernel's cut-offs."""
    order = np.argsort(depths, kind="stable")
    image = np.zeros((height, width, colors.shape[1]))
    alpha_image = np.zeros((height, width))
    for y in range(height):
        for x in range(width):
            transmittance = 1.0
            for g in order:
                if radii[g].min() <= 0:
                    continue
                dx, dy = x + 0.5 - means2d[g, 0], y + 0.5 - means2d[g, 1]
                a, b, c = conics[g]
                sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
                alpha = min(0.999, opacities[g] * math.exp(-sigma))
                if sigma < 0 or alpha < 1 / 255:
                    continue
                if transmittance * (1 - alpha) <= 1e-4:
                    break
                image[y, x] += alpha * transmittance * colors[g]
                alpha_image[y, x] += alpha * transmittance
                transmittance *= 1 - alpha
    return image, alpha_image


def test_compositor_matches_a_per_pixel_reference():
    generator = torch.Generator().manual_seed(0)
    n, width, height = 25, 24, 18
    means2d = torch.rand(n, 2, generator=generator) * torch.tensor([width, height])
    # random SPD 2D covariances with sigmas of 1-4 px, as conics (inverse, upper triangle)
    angle = torch.rand(n, generator=generator) * math.pi
    sig = 1 + 3 * torch.rand(n, 2, generator=generator)
    rot = torch.stack([torch.cos(angle), -torch.sin(angle), torch.sin(angle), torch.cos(angle)], 1).reshape(n, 2, 2)
    cov = rot @ torch.diag_embed(sig**2) @ rot.transpose(1, 2)
    inv = torch.linalg.inv(cov)
    conics = torch.stack([inv[:, 0, 0], inv[:, 0, 1], inv[:, 1, 1]], 1)
    radii = torch.ceil(3.33 * torch.sqrt(torch.stack([cov[:, 0, 0], cov[:, 1, 1]], 1))).int()
    radii[3] = 0  # culled Gaussians must not be drawn
    opacities = 0.05 + 0.95 * torch.rand(n, generator=generator)
    opacities[4] = 0.003  # below 1/255 everywhere
    colors = torch.rand(n, 3, generator=generator)
    depths = torch.rand(n, generator=generator) * 10

    image, alpha = composite_sorted_pairs(means2d, conics, opacities, colors, depths, radii, width, height)
    expected_image, expected_alpha = _composite_per_pixel(
        means2d.numpy().astype(np.float64), conics.numpy().astype(np.float64), opacities.numpy().astype(np.float64),
        colors.numpy().astype(np.float64), depths.numpy(), radii.numpy(), width, height)
    assert expected_alpha.max() > 0.9 and (expected_alpha == 0).any()  # the scene has overlaps and gaps
    np.testing.assert_allclose(image.numpy(), expected_image, atol=2e-5)
    np.testing.assert_allclose(alpha[..., 0].numpy(), expected_alpha, atol=2e-5)


def test_compositor_gradients_reach_every_input():
    n = 6
    means2d = torch.tensor([[5.0, 5.0], [6.0, 4.0], [3.0, 7.0], [8.0, 8.0], [2.0, 2.0], [7.0, 3.0]],
                           requires_grad=True)
    conics = torch.tensor([[0.2, 0.05, 0.3]] * n, requires_grad=True)
    opacities = torch.full((n,), 0.6, requires_grad=True)
    colors = torch.rand(n, 3, generator=torch.Generator().manual_seed(1)).requires_grad_()
    image, _ = composite_sorted_pairs(means2d, conics, opacities, colors, torch.arange(n).float(),
                                      torch.full((n, 2), 8, dtype=torch.int32), 10, 10)
    (image * torch.linspace(0, 1, 300).reshape(10, 10, 3)).sum().backward()
    for tensor in (means2d, conics, opacities, colors):
        assert tensor.grad is not None and (tensor.grad.abs().sum(dim=-1) > 0).all()


def test_relocation_matches_the_paper_formula():
    binoms = torch.tensor([[math.comb(n, k) for k in range(51)] for n in range(51)], dtype=torch.float32)
    opacities = torch.tensor([0.3, 0.9, 0.5, 0.05])
    scales = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5], [1.0, 1.0, 1.0], [2.0, 1.0, 0.1]])
    ratios = torch.tensor([1, 3, 5, 2])
    new_opacities, new_scales = relocation_torch(opacities, scales, ratios, binoms)
    for j in range(4):
        o, n = opacities[j].item(), ratios[j].item()
        new_o = 1 - (1 - o) ** (1 / n)
        denominator = sum(math.comb(i - 1, k) * (-1) ** k * new_o ** (k + 1) / math.sqrt(k + 1)
                          for i in range(1, n + 1) for k in range(i))
        assert new_opacities[j].item() == pytest.approx(new_o, rel=1e-5)
        np.testing.assert_allclose(new_scales[j].numpy(), o / denominator * scales[j].numpy(), rtol=1e-5)
    # one copy is the identity; n copies composite back to the original opacity
    assert new_opacities[0].item() == pytest.approx(0.3) and torch.allclose(new_scales[0], scales[0])
    assert 1 - (1 - new_opacities[1].item()) ** 3 == pytest.approx(0.9, rel=1e-5)


# ------------------------------------------------------------------------------------------------ training


def test_training_raises_held_out_psnr_and_writes_outputs(pinhole_out, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(pinhole_out, out, symlinks=True)
    splat_dir = splat(out, SplatConfig(iterations=200, curve_every=50, **FAST))

    metrics = json.loads((splat_dir / "metrics.json").read_text())
    assert metrics["backend"] == "torch-reference" and metrics["image_size"] == [80, 60]
    assert len(metrics["test_views"]) == 2 and len(metrics["train_views"]) == 10  # every 8th of 12 held out
    initial, final = metrics["initial"]["test"], metrics["final"]["test"]
    # Measured: 15.8 -> 27.0 dB (SSIM 0.35 -> 0.77) at 200 steps. The initial blobs (NN-distance scales, opacity
    # 0.1) grey out the black background, so training must shrink and recolour them; a 6 dB margin leaves room
    # for platform float differences while failing any run that does not fit the scene.
    assert final["psnr"] > initial["psnr"] + 6.0
    assert final["ssim"] > initial["ssim"] + 0.2
    assert final["lpips"] is None and "weights" in metrics["lpips"]
    assert [p["step"] for p in metrics["curve"]] == [50, 100, 150, 200]
    # DefaultStrategy densified at steps 100 and 150 (refine_every=50, after refine_start_iter=50)
    assert metrics["curve"][-1]["num_gaussians"] > metrics["initial"]["num_gaussians"] == 150
    assert metrics["iterations_per_second"] > 0

    init = read_ply(splat_dir / "point_cloud_init.ply")
    trained = read_ply(splat_dir / "point_cloud.ply")
    assert len(init.means) == 150 and len(trained.means) == metrics["final"]["num_gaussians"]
    assert init.shN.shape[1:] == (15, 3)
    np.testing.assert_allclose(1 / (1 + np.exp(-init.opacities)), 0.1, rtol=1e-5)
    np.testing.assert_array_equal(init.quats, np.tile([1, 0, 0, 0], (150, 1)))
    # scales: log of the RMS distance to the 3 nearest neighbours, the same on all axes
    from scipy.spatial import cKDTree

    distances, _ = cKDTree(init.means).query(init.means, k=4)
    np.testing.assert_allclose(init.scales[:, 0], np.log(np.sqrt((distances[:, 1:] ** 2).mean(1))), rtol=1e-4)
    renders = sorted((splat_dir / "renders").glob("*.png"))
    assert len(renders) == 2
    from PIL import Image

    assert Image.open(renders[0]).size == (160, 60)  # ground truth | render
    assert [p.name for p in (splat_dir / "checkpoints").iterdir()] == ["step_0000200.pt"]


@pytest.mark.parametrize("strategy", ["default", "mcmc"])
def test_resume_continues_the_same_trajectory(pinhole_out, tmp_path, strategy):
    # default: the refine at step 20 (after the checkpoint) uses gradient statistics gathered before it, so a
    # lost strategy state changes the result; mcmc: position noise draws from torch's RNG at every step, so a
    # lost RNG state does
    config = SplatConfig(iterations=40, curve_every=10, checkpoint_every=20, strategy=strategy, **{
        **FAST, "refine_start_iter": 10, "refine_every": 10, "sh_degree_interval": 15})
    out = tmp_path / "out"
    shutil.copytree(pinhole_out, out, symlinks=True)
    splat_dir = splat(out, config)
    straight_curve = json.loads((splat_dir / "metrics.json").read_text())["curve"]
    straight = read_ply(splat_dir / "point_cloud.ply")
    checkpoints = sorted((splat_dir / "checkpoints").glob("*.pt"))
    assert [p.name for p in checkpoints] == ["step_0000020.pt", "step_0000040.pt"]

    resumed_dir = splat(out, replace(config, resume=str(checkpoints[0])))
    resumed_curve = json.loads((resumed_dir / "metrics.json").read_text())["curve"]
    resumed = read_ply(resumed_dir / "point_cloud.ply")
    assert [p["step"] for p in resumed_curve] == [10, 20, 30, 40]
    assert resumed_curve == straight_curve
    assert len(resumed.means) == len(straight.means) > 150
    for field in ("means", "sh0", "shN", "opacities", "scales", "quats"):
        np.testing.assert_array_equal(getattr(resumed, field), getattr(straight, field))


def test_mcmc_strategy_runs_on_cpu(pinhole_out, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(pinhole_out, out, symlinks=True)
    splat_dir = splat(out, SplatConfig(iterations=60, strategy="mcmc", curve_every=30, checkpoint_every=60, **{
        **FAST, "refine_start_iter": 20, "refine_every": 20}))
    metrics = json.loads((splat_dir / "metrics.json").read_text())
    # MCMC grows by 5 % per refine (steps 40 only: refine needs step > refine_start_iter): 150 -> 157
    assert metrics["final"]["num_gaussians"] == 157
    assert metrics["final"]["test"]["psnr"] > metrics["initial"]["test"]["psnr"] + 3.0


# ----------------------------------------------------------------------------------------------- bad input


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="no sparse model"):
        splat(tmp_path, SplatConfig(iterations=1, device="cpu"))
    with pytest.raises(InputError, match="is not a folder"):
        splat(tmp_path / "nothing", SplatConfig(iterations=1, device="cpu"))


def test_distorted_cameras_are_refused(synthetic_scene, tmp_path):
    out = _export_like(synthetic_scene, tmp_path / "out", model="SIMPLE_RADIAL")
    with pytest.raises(InputError, match="SIMPLE_RADIAL.*undistort"):
        splat(out, SplatConfig(iterations=1, device="cpu"))


def test_model_without_images_and_resume_without_checkpoint(pinhole_out, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(pinhole_out, out, symlinks=True)
    with pytest.raises(InputError, match="nothing to resume"):
        splat(out, SplatConfig(iterations=1, resume=True, **FAST))
    (out / "undistorted" / "images").unlink()
    with pytest.raises(InputError, match="no image folder"):
        splat(out, SplatConfig(iterations=1, device="cpu"))


@pytest.mark.parametrize("bad", [dict(iterations=0), dict(eval_every=1), dict(strategy="fancy"),
                                 dict(sh_degree=5), dict(resolution_scale=0)])
def test_bad_config_is_refused(pinhole_out, bad):
    with pytest.raises(ConfigError):
        splat(pinhole_out, SplatConfig(**bad))

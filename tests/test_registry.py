"""Every registered backend (every kind, every name), built with random weights and run through its stage.

One recipe per registry line says how to make that backend here: random checkpoints in the official layout under
their official file names (found through $RECON_WEIGHTS_DIR, downloads off), small settings, and for matchers the
features they match. Each backend that builds runs on a generated 96x128 image pair through the stage function a
run uses (recon.extract.extract, recon.match.match, recon.dense.match_dense, pairs.retrieval's extraction) and must
write valid hloc files. `registry.preflight` must name exactly the recipe's files: what a run checks before its
first stage is what the backend loads. Backends too slow to build here (DINOv2 ViT-L inside every RoMa variant)
are checked through preflight alone: with no weights present it must raise a WeightsError naming each file they
need, one after the other.

A registry line without a recipe fails the test with a message saying to add one, so no backend goes untested.
To add a backend: one RECIPES entry, with its random checkpoints made by a small function below (the official
layout: see the backend's own test for the strict-loading proof).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from feature_backends import registry, weights
from feature_backends.errors import ConfigError, WeightsError
from feature_backends.store import FeatureReader, MatchReader, read_global_descriptors
from feature_backends.weights import WeightFile
from pairs.io import write_pairs

SMALL = {"max_keypoints": 64}
HEIGHT, WIDTH = 96, 128


# --- Random checkpoints in the official layouts -------------------------------------------------------------------

def _dedode_detector():
    from kornia.feature.dedode.dedode_models import dedode_detector_L

    return dedode_detector_L().state_dict()


def _dedode_descriptor_b():
    from kornia.feature.dedode.dedode_models import dedode_descriptor_B

    return dedode_descriptor_B().state_dict()


def _dad_detector():
    from feature_backends.dad import dad_detector

    return dad_detector().state_dict()


def _disk():
    from kornia.feature import DISK

    return {"extractor": DISK().state_dict()}


def _aliked():
    from kornia.feature import ALIKED

    return ALIKED("aliked-n16").state_dict()


def _lightglue_state(features: str) -> dict[str, torch.Tensor]:
    from kornia.feature import LightGlue as KorniaLightGlue

    preset = {k: v for k, v in KorniaLightGlue.features[features].items() if k != "weights"}
    state = KorniaLightGlue(features=None, **preset).state_dict()
    state.pop("confidence_thresholds")  # derived from the config; the official files do not carry it
    return state


def _gim_lightglue():
    from feature_backends.gim_lightglue import SuperPointNet

    state = {f"superpoint.{k}": v for k, v in SuperPointNet().state_dict().items()}
    state |= {f"model.{k}": v for k, v in _lightglue_state("superpoint").items()}
    return {"state_dict": state, "epoch": 0}  # a Lightning checkpoint, as GIM publishes it


def _tiny_roma():
    from kornia.feature.xfeat import XFeatModel
    from romatch.models.tiny import TinyRoMa as RomatchTinyRoMa

    from feature_backends.roma import random_state_dict

    return random_state_dict(RomatchTinyRoMa(xfeat=XFeatModel(), freeze_xfeat=False), seed=7)


def _gim_dkm():
    from feature_backends.gim import DKMv3
    from feature_backends.roma import random_state_dict

    state = {f"model.{k}": v for k, v in random_state_dict(DKMv3(), seed=3).items()}
    state["model.encoder.net.fc.weight"] = torch.zeros(1000, 2048)  # upstream's classifier, dropped on load
    state["model.encoder.net.fc.bias"] = torch.zeros(1000)
    return {"state_dict": state, "epoch": 0}


def _cosplace_resnet18():
    from feature_backends.cosplace import GeoLocalizationNet

    return GeoLocalizationNet("ResNet18", 512).state_dict()


def _loftr(temp_bug_fix: bool):
    def make():
        from kornia.feature import LoFTR
        from recon.references import informative_loftr_state  # plain random LoFTR weights match (almost) nothing

        from feature_backends.loftr import kornia_loftr_config

        network = LoFTR(pretrained=None, config=kornia_loftr_config(temp_bug_fix, 0.2))
        texture = torch.from_numpy(np.random.default_rng(0).random((1, 1, HEIGHT, WIDTH), np.float32))
        state = informative_loftr_state(network, texture)
        return {"state_dict": {f"matcher.{k}": v for k, v in state.items()}}  # Lightning layout
    return make


def _gim_loftr():
    from feature_backends.gim_loftr import gim_loftr_network

    return {"state_dict": {f"model.{k}": v for k, v in gim_loftr_network(0.2).state_dict().items()}}


def _onnx_graph(name: str):
    def write(path: Path) -> None:
        import onnx_graphs

        getattr(onnx_graphs, name)(path)
    return write


def _superpoint():
    from feature_backends.superpoint import SuperPointNet

    return SuperPointNet().state_dict()


def _xfeat():
    from kornia.feature import XFeatModel

    from feature_backends.roma import random_state_dict

    state = random_state_dict(XFeatModel(), seed=4)
    state["fine_matcher.12.weight"] *= 20  # peaked offset logits, so XFeat*'s 0.25 confidence keeps matches
    return state


def _legacy_lightglue(features: str, prefix: str = ""):
    def make():
        from test_zoo_sparse import legacy_lightglue_state  # cvg's v0.1_arxiv key names

        return {prefix + k: v for k, v in legacy_lightglue_state(features, seed=2).items()}
    return make


def _netvlad_mat(path: Path) -> None:
    from test_retrieval import write_netvlad_mat

    write_netvlad_mat(path, num_clusters=8, whiten_dim=32)


# --- One recipe per registry line ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Recipe:
    conf: dict[str, Any] = field(default_factory=dict)  # small, fast settings for the stage run
    #: official file name → a random checkpoint in its layout (torch.save'd), or a function writing the file itself
    weights: dict[str, Callable[[], Any] | Callable[[Path], None]] = field(default_factory=dict)
    writes_file: frozenset[str] = frozenset()  # entries of `weights` that take the path and write it themselves
    features: tuple[str, dict[str, Any]] | None = None  # matchers: the feature backend (and conf) they match
    #: Not built here: exactly the files `preflight` must ask for, in its order, and why it is not built.
    preflight_only: tuple[str, ...] = ()
    why: str = ""
    #: Listed but refused with this reason (registry.UNAVAILABLE): naming it must raise a ConfigError saying so.
    unavailable: str = ""


ROMA_NOT_BUILT = "DINOv2 ViT-L/14 (300M parameters) alone takes longer to build than this test's whole budget"
DINOV2 = "dinov2_vitl14_pretrain.pth"
LOFTR = {"resize_max": 128, "match_threshold": 0.0}
LOMA_FEATURES = {"loma_detector.onnx": _onnx_graph("brightest_pixels_detector"),
                 "loma_descriptor_dedode_g.onnx": _onnx_graph("colour_descriptor")}

RECIPES: dict[tuple[str, str], Recipe] = {
    ("features", "sift"): Recipe(SMALL),
    ("features", "dedode"): Recipe({**SMALL, "resize_max": 112}, {
        "dedode_detector_L_v2.pth": _dedode_detector, "dedode_descriptor_B.pth": _dedode_descriptor_b}),
    ("features", "dad"): Recipe({**SMALL, "resize_max": 128}, {
        "dad.pth": _dad_detector, "dedode_descriptor_B.pth": _dedode_descriptor_b}),
    ("features", "disk"): Recipe({**SMALL, "resize_max": 128}, {"depth-save.pth": _disk}),
    ("features", "aliked"): Recipe({**SMALL, "resize_max": 128}, {"aliked-n16.pth": _aliked}),
    ("features", "gim-superpoint"): Recipe({**SMALL, "resize_max": 128}, {"gim_lightglue_100h.ckpt": _gim_lightglue}),
    ("features", "loma"): Recipe({"max_keypoints": 32, "resize_max": 128}, LOMA_FEATURES,
                                 writes_file=frozenset(LOMA_FEATURES)),
    ("features", "omniglue"): Recipe(preflight_only=("sp_v6.onnx", "dinov2_vitb14_pretrain.pth"),
                                     why="DINOv2 ViT-B/14 random weights are 350 MB to write; tests/test_omniglue.py "
                                         "runs it with a one-block ViT"),
    ("features", "superpoint"): Recipe({**SMALL, "resize_max": 128, "detection_threshold": 0.0},
                                       {"superpoint_v1.pth": _superpoint}),
    ("features", "xfeat"): Recipe({**SMALL, "resize_max": 128, "detection_threshold": 0.0}, {"xfeat.pt": _xfeat}),
    ("matcher", "mnn"): Recipe(features=("sift", SMALL)),
    ("matcher", "minima-lightglue"): Recipe({"filter_threshold": 0.0},
                                            {"minima_lightglue.pth": _legacy_lightglue("superpoint")},
                                            features=("superpoint", {**SMALL, "resize_max": 128,
                                                                     "detection_threshold": 0.0})),
    ("matcher", "lighterglue"): Recipe({"filter_threshold": 0.0},
                                       {"xfeat-lighterglue.pt": _legacy_lightglue("xfeat", "matcher.")},
                                       features=("xfeat", {**SMALL, "resize_max": 128, "detection_threshold": 0.0})),
    ("matcher", "loma"): Recipe({"min_score": 0.0}, {"loma_matcher_B.onnx": _onnx_graph("nearest_position_matcher")},
                                writes_file=frozenset({"loma_matcher_B.onnx"}),
                                features=("loma", {"max_keypoints": 32, "resize_max": 128})),
    ("matcher", "omniglue"): Recipe(preflight_only=("omniglue.onnx",), why="needs the omniglue features above"),
    ("matcher", "dual-softmax"): Recipe({"threshold": 0.0}, features=("sift", SMALL)),
    ("matcher", "lightglue"): Recipe({"filter_threshold": 0.0},
                                     {"sift_lightglue.pth": lambda: _lightglue_state("sift")}, features=("sift", SMALL)),
    ("matcher", "gim-lightglue"): Recipe({}, {"gim_lightglue_100h.ckpt": _gim_lightglue},
                                         features=("gim-superpoint", {**SMALL, "resize_max": 128})),
    ("dense", "roma"): Recipe(preflight_only=("roma_outdoor.pth", DINOV2), why=ROMA_NOT_BUILT),
    ("dense", "roma-indoor"): Recipe(preflight_only=("roma_indoor.pth", DINOV2), why=ROMA_NOT_BUILT),
    ("dense", "minima-roma"): Recipe(preflight_only=("minima_roma.pth", DINOV2), why=ROMA_NOT_BUILT),
    ("dense", "gim-roma"): Recipe(preflight_only=("gim_roma_100h.ckpt", DINOV2), why=ROMA_NOT_BUILT),
    ("dense", "romav2"): Recipe(preflight_only=("romav2.0.1.pt",),
                                why="DINOv3 ViT-L/16 inside; tests/test_romav2.py builds it (meta device) for parity"),
    ("dense", "xfeat-star"): Recipe({"resize_max": 128}, {"xfeat.pt": _xfeat}),
    ("dense", "tiny-roma"): Recipe({"resize_max": 128, "num_matches": 500},
                                   {"tiny_roma_v1_outdoor.pth": _tiny_roma}),
    ("dense", "gim-dkm"): Recipe({"coarse_res": [64, 96], "upsample": False, "num_matches": 500},
                                 {"gim_dkm_100h.ckpt": _gim_dkm}),
    ("dense", "loftr"): Recipe(LOFTR, {"loftr_outdoor.ckpt": _loftr(False)}),
    ("dense", "loftr-indoor"): Recipe(LOFTR, {"loftr_indoor.ckpt": _loftr(False)}),
    ("dense", "loftr-indoor-new"): Recipe(LOFTR, {"loftr_indoor_ds_new.ckpt": _loftr(True)}),
    ("dense", "minima-loftr"): Recipe(LOFTR, {"minima_loftr.ckpt": _loftr(True)}),
    ("dense", "gim-loftr"): Recipe(LOFTR, {"gim_loftr_50h.ckpt": _gim_loftr}),
    ("dense", "imd"): Recipe(unavailable="no public code or weights"),
    ("global", "vlad"): Recipe({"num_clusters": 8}),
    ("global", "netvlad"): Recipe({"num_clusters": 8, "whiten_dim": 32, "resize_max": 128},
                                  {"Pitts30K_struct.mat": _netvlad_mat},
                                  writes_file=frozenset({"Pitts30K_struct.mat"})),
    ("global", "cosplace"): Recipe({"backbone": "ResNet18", "dim": 512, "resize_max": 128},
                                   {"ResNet18_512_cosplace.pth": _cosplace_resnet18}),
}

REGISTERED = [(kind, name) for kind in registry.KINDS for name in registry.names(kind)]


# --- Fixtures -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def image_pair(tmp_path_factory) -> tuple[Path, Path]:
    """Two generated 96x128 views of one scene, and the pairs file naming them."""
    from recon.synthetic import SceneSpec, make_scene

    scene = make_scene(tmp_path_factory.mktemp("pair"), SceneSpec(num_frames=2, width=WIDTH, height=HEIGHT))
    names = sorted(p.name for p in (scene / "images").iterdir())
    assert len(names) == 2
    return scene / "images", write_pairs(scene / "pairs.txt", [tuple(names)])


@pytest.fixture
def weights_dir(tmp_path, monkeypatch) -> Path:
    """An empty $RECON_WEIGHTS_DIR, downloads off, and an empty torch hub cache: only what a test writes exists."""
    folder = tmp_path / "weights"
    folder.mkdir()
    monkeypatch.setenv("RECON_WEIGHTS_DIR", str(folder))
    monkeypatch.setenv("RECON_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    # Random stand-ins cannot have a published checksum (GIM DKM's is pinned); test_weights proves the check.
    check = weights.verify
    monkeypatch.setattr(weights, "verify", lambda weight, path: None if weight.sha256 else check(weight, path))
    return folder


def write_weights(recipe: Recipe, folder: Path) -> None:
    torch.manual_seed(0)
    for filename, make in recipe.weights.items():
        if not (folder / filename).exists():
            make(folder / filename) if filename in recipe.writes_file else torch.save(make(), folder / filename)


# --- Checks of the hloc files -------------------------------------------------------------------------------------

def check_features(path: Path, names: list[str]) -> dict[str, int]:
    """keypoints (N,2) float32 inside the image (hloc: pixel centres at integers), descriptors (D,N), scores (N,)."""
    counts = {}
    with FeatureReader(path) as reader:
        assert reader.names() == names
        for name in names:
            features = reader.read(name)
            keypoints = features["keypoints"]
            assert keypoints.dtype == np.float32 and keypoints.ndim == 2 and keypoints.shape[1] == 2
            assert len(keypoints) > 0, f"{name}: no keypoints"
            assert np.isfinite(keypoints).all()
            assert (keypoints >= -0.5).all() and (keypoints <= [WIDTH - 0.5, HEIGHT - 0.5]).all()
            if "descriptors" in features:  # the dense stage's quantised keypoints carry none
                assert features["descriptors"].ndim == 2 and features["descriptors"].shape[1] == len(keypoints)
                assert np.isfinite(features["descriptors"]).all()
            if "scores" in features:
                assert features["scores"].shape == (len(keypoints),)
            counts[name] = len(keypoints)
    return counts


def check_matches(path: Path, names: list[str], counts: dict[str, int]) -> int:
    """matches0 (N0,) with -1 or an index into image 1's keypoints; returns the number of matches."""
    with MatchReader(path) as reader:
        raw, reversed_ = reader.read_raw(*names)
    name0, name1 = names[::-1] if reversed_ else names
    matches0 = raw["matches0"]
    assert matches0.shape == (counts[name0],)
    assert matches0.min() >= -1 and matches0.max() < counts[name1]
    if "matching_scores0" in raw:
        assert raw["matching_scores0"].shape == matches0.shape and np.isfinite(raw["matching_scores0"]).all()
    return int((matches0 >= 0).sum())


# --- The test -----------------------------------------------------------------------------------------------------

def preflight(kind: str, name: str, recipe: Recipe) -> list[str]:
    """registry.preflight with the conf a run passes, including what the matched features imply."""
    conf = dict(recipe.conf)
    if recipe.features:
        matcher_class, _ = registry.resolve(kind, name)
        conf = {**matcher_class.conf_for_features({"backend": recipe.features[0], "conf": recipe.features[1]}),
                **conf}
    return [Path(path).name for path in registry.preflight(kind, name, conf)]


def preflight_names_each_missing_file(kind: str, name: str, recipe: Recipe, folder: Path) -> list[str]:
    """Run preflight with nothing present; each WeightsError must name a file, which is then put in place (an
    empty stand-in: preflight finds and verifies files, it does not load them) until preflight passes."""
    named = []
    for _ in range(len(recipe.preflight_only) + 1):
        try:
            found = preflight(kind, name, recipe)
        except WeightsError as error:
            match = re.search(r"weight file '([^']+)' is not available", str(error))
            assert match, f"{kind} backend '{name}': preflight's error does not name the missing file: {error}"
            assert "official URL: http" in str(error)
            named.append(match.group(1))
            (folder / match.group(1)).touch()
            continue
        assert found == named
        return named
    raise AssertionError(f"{kind} backend '{name}': preflight still fails after {named}")


@pytest.mark.parametrize("kind, name", REGISTERED, ids=[f"{kind}-{name}" for kind, name in REGISTERED])
def test_every_registered_backend_builds_and_writes_valid_files(kind, name, image_pair, weights_dir, tmp_path):
    recipe = RECIPES.get((kind, name))
    if recipe is None:
        pytest.fail(f"no test recipe for the {kind} backend '{name}': add one to RECIPES in tests/test_registry.py "
                    "(random weights in the official layout, or preflight_only with the files it needs and why)")
    if recipe.unavailable:
        with pytest.raises(ConfigError, match=recipe.unavailable):
            registry.resolve(kind, name)
        return
    cls, _ = registry.resolve(kind, name)
    for variant, files in cls.weight_files.items():
        assert isinstance(files, tuple) and all(isinstance(f, WeightFile) for f in files), (variant, files)

    if recipe.preflight_only:
        named = preflight_names_each_missing_file(kind, name, recipe, weights_dir)
        assert named == list(recipe.preflight_only)
        return

    if recipe.features:
        write_weights(RECIPES[("features", recipe.features[0])], weights_dir)
    write_weights(recipe, weights_dir)
    assert preflight(kind, name, recipe) == list(recipe.weights)
    run_stage(kind, name, recipe, image_pair, tmp_path)


def run_stage(kind: str, name: str, recipe: Recipe, image_pair: tuple[Path, Path], out: Path) -> None:
    from pairs.retrieval import extract_global_descriptors
    from recon.dense import match_dense
    from recon.extract import extract
    from recon.match import match

    image_dir, pairs = image_pair
    names = sorted(p.name for p in image_dir.iterdir())
    features, matches = out / "features.h5", out / "matches.h5"
    if kind == "features":
        check_features(extract({"name": name, **recipe.conf}, image_dir, features), names)
    elif kind == "matcher":
        feature_name, feature_conf = recipe.features
        counts = check_features(extract({"name": feature_name, **feature_conf}, image_dir, features), names)
        check_matches(match({"name": name, **recipe.conf}, pairs, features, matches), names, counts)
    elif kind == "dense":
        match_dense({"name": name, **recipe.conf}, pairs, image_dir, features, matches)
        check_matches(matches, names, check_features(features, names))
    elif kind == "global":
        path = extract_global_descriptors(image_dir, out / "global.h5", name, recipe.conf)
        stored, descriptors = read_global_descriptors(path)
        assert stored == names and descriptors.ndim == 2 and descriptors.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(descriptors, axis=1), 1, atol=1e-5)
    else:
        pytest.fail(f"registry kind '{kind}' has no stage in tests/test_registry.py: add it to run_stage")


def test_every_recipe_names_a_registered_backend():
    assert sorted(set(RECIPES) - set(REGISTERED)) == []

"""`--executor ray` on a real local Ray cluster (ray.init(num_cpus=2)): same files as the local run, a killed
worker's tasks retried, a killed driver resumed. One cluster for the module (Ray takes seconds to start)."""

import itertools
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

ray = pytest.importorskip("ray")

from recon import executor as executor_module  # noqa: E402
from recon.executor import ExecutorOptions  # noqa: E402
from recon.extract import ExtractOptions, extract  # noqa: E402
from recon.match import MatchOptions, match  # noqa: E402
from test_dense import crops  # noqa: E402,F401  (fixture)

SIFT = ExtractOptions(features="sift", max_keypoints=512)
MNN = MatchOptions(matcher="mnn")


def datasets(path: Path) -> dict:
    """Every dataset (and keypoint attribute) of an HDF5 file, by path: the content, not the bytes."""
    out = {}
    with h5py.File(path, "r") as file:
        def visit(name, item):
            if isinstance(item, h5py.Dataset):
                out[name] = item[()]
                out.update({f"{name}@{k}": v for k, v in item.attrs.items()})
        file.visititems(visit)
        out["@conf"] = file.attrs["recon_conf"]
    return out


def assert_same(path: Path, reference: Path, float_tolerance: float = 0.0) -> None:
    """Same datasets and attributes; float arrays equal, or within `float_tolerance` where a network's sums run
    on another thread count (a one-thread Ray worker against a two-thread driver reassociates the convolutions)."""
    got, expected = datasets(path), datasets(reference)
    assert sorted(got) == sorted(expected)
    for key in expected:
        if float_tolerance and np.asarray(expected[key]).dtype.kind == "f":
            np.testing.assert_allclose(got[key], expected[key], rtol=0, atol=float_tolerance, err_msg=key)
        else:
            assert np.array_equal(got[key], expected[key]), key


@pytest.fixture(scope="module")
def cluster():
    # Workers import the dense oracles of tests/test_dense.py by module path, as users' external backends.
    tests_dir = str(Path(__file__).parent)
    os.environ["PYTHONPATH"] = os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def local(synthetic_scene, tmp_path_factory):
    """The local executor's features.h5, pairs.txt (exhaustive, 66 pairs) and matches.h5 on the 12-image scene."""
    out = tmp_path_factory.mktemp("local")
    images = synthetic_scene / "images"
    names = sorted(p.name for p in images.iterdir())
    (out / "pairs.txt").write_text("".join(f"{a} {b}\n" for a, b in itertools.combinations(names, 2)))
    extract(SIFT, images, out / "features.h5")
    match(MNN, out / "pairs.txt", out / "features.h5", out / "matches.h5")
    return images, out


def ray_options(cluster, **kwargs) -> ExecutorOptions:
    return ExecutorOptions(executor="ray", workers=2, ray_address=cluster, **kwargs)


@pytest.fixture(scope="module")
def distributed(cluster, local, tmp_path_factory):
    """The same files written with --executor ray --workers 2."""
    images, reference = local
    out = tmp_path_factory.mktemp("ray")
    extract(SIFT, images, out / "features.h5", executor=ray_options(cluster, images_per_task=2))
    match(MNN, reference / "pairs.txt", out / "features.h5", out / "matches.h5", executor=ray_options(cluster))
    return out


def test_ray_executor_writes_the_local_files(local, distributed):
    _, reference = local
    assert_same(distributed / "features.h5", reference / "features.h5")
    assert_same(distributed / "matches.h5", reference / "matches.h5")
    with h5py.File(distributed / "matches.h5") as file:
        groups = [group for key, group in file.items() if not key.startswith(".")]  # not the features record
        assert len(groups) == 11 and sum(len(group) for group in groups) == 66  # by first image


def test_model_from_the_ray_run_equals_the_local_model(local, distributed, tmp_path):
    """SfM on the Ray run's features and matches registers the same views with the same number of points (and the
    same camera centres) as on the local run's: the 12-image generated scene, SIFT + MNN, exhaustive pairs."""
    import pycolmap

    from recon.sfm import SfMOptions, reconstruct

    images, reference = local
    results = {run: reconstruct(tmp_path / run, images, reference / "pairs.txt", folder / "features.h5",
                                folder / "matches.h5", options=SfMOptions(fresh_process=False))
               for run, folder in (("local", reference), ("ray", distributed))}
    models = {run: pycolmap.Reconstruction(result.sparse_dir) for run, result in results.items()}
    names = {run: sorted(image.name for image in model.images.values() if image.has_pose)
             for run, model in models.items()}
    assert names["ray"] == names["local"] and len(names["local"]) == 12
    assert models["ray"].num_points3D() == models["local"].num_points3D() > 300  # 420
    assert results["ray"].num_points == results["local"].num_points
    for image in models["local"].images.values():
        twin = models["ray"].find_image_with_name(image.name)
        np.testing.assert_allclose(twin.projection_center(), image.projection_center(), atol=1e-6)


def test_killed_worker_is_retried_and_output_unchanged(cluster, local, tmp_path, monkeypatch):
    images, reference = local
    seen = {}

    def kill_one_worker(pool, done, result):
        if done == 1:
            seen["killed"] = pool.pids()[0]
            os.kill(seen["killed"], signal.SIGKILL)
        elif done == 6:
            seen["after"] = pool.pids()  # the killed actor was restarted in a new process
    monkeypatch.setattr(executor_module, "result_hooks", [kill_one_worker])
    extract(SIFT, images, tmp_path / "features.h5", executor=ray_options(cluster, images_per_task=1))
    assert seen["killed"] not in seen["after"] and len(seen["after"]) == 2
    assert_same(tmp_path / "features.h5", reference / "features.h5")


DRIVER = """
import functools, os, signal, sys
from pathlib import Path
import recon.extract as stage
from feature_backends.store import FeatureWriter
from recon import executor
from recon.executor import ExecutorOptions

stage.FeatureWriter = functools.partial(FeatureWriter, checkpoint_seconds=0.0)  # publish after every image
executor.result_hooks.append(lambda pool, done, result: done == 3 and os.kill(os.getpid(), signal.SIGKILL))
options = ExecutorOptions(executor="ray", workers=2, ray_address=sys.argv[3], images_per_task=2)
stage.extract(stage.ExtractOptions(features="sift", max_keypoints=512), sys.argv[1], sys.argv[2],
              executor=options)
"""


def test_killed_driver_resumes_from_the_published_file(cluster, local, tmp_path):
    images, reference = local
    features = tmp_path / "features.h5"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), *sys.path])}
    killed = subprocess.run([sys.executable, "-c", textwrap.dedent(DRIVER), str(images), str(features), cluster],
                            env=env, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    with h5py.File(features) as file:
        published = len(file.keys())
    # Killed after 3 tasks of 2 images came back: not all published (how many reached the file before the kill
    # depends on timing: 1 to 6 were seen, fewer under load).
    assert published < 12
    extract(SIFT, images, features, executor=ray_options(cluster))
    assert_same(features, reference / "features.h5")


def test_dense_quantised_on_ray_equals_local(cluster, crops, tmp_path):
    """The dense stage's network pass sharded by first image (a→b,c and b→c on two workers) writes the local
    run's keypoints and matches: the oracle's sampling is seeded per pair."""
    from test_dense import TranslationOracle

    from recon.dense import match_dense

    image_dir, pairs, _, table = crops
    conf = {"name": f"{TranslationOracle.__module__}:TranslationOracle", "offsets": table}
    match_dense(conf, pairs, image_dir, tmp_path / "f.h5", tmp_path / "m.h5")
    match_dense(conf, pairs, image_dir, tmp_path / "rf.h5", tmp_path / "rm.h5", executor=ray_options(cluster))
    assert_same(tmp_path / "rf.h5", tmp_path / "f.h5")
    assert_same(tmp_path / "rm.h5", tmp_path / "m.h5")
    with h5py.File(tmp_path / "m.h5") as file:
        assert sum(len(group) for group in file.values()) == 3
        assert min((group["matches0"][()] >= 0).sum() for pair in file.values() for group in pair.values()) > 150


@pytest.mark.parametrize("backend", ["vlad", "cosplace"])
def test_retrieval_descriptors_on_ray_equal_local(cluster, synthetic_scene, tmp_path, backend):
    """global-feats.h5 from Ray workers (3 images per task) equals the local one: VLAD's codebook is fitted once
    on the driver and shipped to the workers; CosPlace (random weights in the official layout, from a file every
    worker loads) has no fitted state."""
    import torch
    from test_retrieval import _random_state_dict, official_cosplace_shapes

    from pairs.retrieval import extract_global_descriptors

    conf = {}
    if backend == "cosplace":
        torch.save(_random_state_dict(official_cosplace_shapes("ResNet18", 512)), tmp_path / "r18.pth")
        conf = {"backbone": "ResNet18", "dim": 512, "weights": str(tmp_path / "r18.pth"), "resize_max": 160}
    images = synthetic_scene / "images"
    extract_global_descriptors(images, tmp_path / "local.h5", backend, conf)
    extract_global_descriptors(images, tmp_path / "ray.h5", backend, conf,
                               executor=ray_options(cluster, images_per_task=3))
    # VLAD (numpy) is bit-identical; CosPlace's ResNet differs by float rounding with the thread count (1e-8 seen)
    assert_same(tmp_path / "ray.h5", tmp_path / "local.h5", float_tolerance=1e-6 if backend == "cosplace" else 0.0)
    got = datasets(tmp_path / "ray.h5")
    assert len(got) == 13  # 12 descriptors and the record
    assert {value.shape for key, value in got.items() if key != "@conf"} == {(8192 if backend == "vlad" else 512,)}


@pytest.mark.parametrize("propagate", [True, False])
def test_dense_anchored_on_ray_equals_local(cluster, crops, tmp_path, monkeypatch, propagate):
    """Anchored dense (SIFT anchors, the translation oracle's warps) in two phases: warps (with propagation) or
    matches (without) from Ray workers, one pair per task so two workers finish out of order, then anchoring,
    the track check and propagation here in pair order: features.h5 (with the keypoints propagation appended)
    and matches.h5 equal the local run's."""
    from test_dense import TranslationOracle

    from recon.dense import anchored, match_dense

    image_dir, pairs, offsets, table = crops
    conf = {"name": f"sift+{TranslationOracle.__module__}:TranslationOracle", "offsets": table,
            "propagate": propagate}
    monkeypatch.setattr(anchored, "PAIRS_PER_TASK", 1)
    runs = {}
    for run, executor in (("local", None), ("ray", ray_options(cluster))):
        out = tmp_path / run
        extract({"name": "sift", "max_keypoints": 512}, image_dir, out / "f.h5")
        match_dense(dict(conf), pairs, image_dir, out / "f.h5", out / "m.h5", executor=executor)
        runs[run] = out
    assert_same(runs["ray"] / "f.h5", runs["local"] / "f.h5")
    assert_same(runs["ray"] / "m.h5", runs["local"] / "m.h5")
    with h5py.File(runs["ray"] / "f.h5") as file:
        added = sum(len(file[n]["keypoints"]) - file[n]["keypoints"].attrs.get("detected", len(file[n]["keypoints"]))
                    for n in offsets)
    with h5py.File(runs["ray"] / "m.h5") as file:
        matched = [int((group["matches0"][()] >= 0).sum()) for pair in file.values() if isinstance(pair, h5py.Group)
                   for group in pair.values() if isinstance(group, h5py.Group)]
    assert len(matched) == 3 and min(matched) > 20
    assert (added > 0) == propagate

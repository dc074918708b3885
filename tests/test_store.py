"""hloc-format round trips, hloc-written files (float16 keypoints, int16 matches, legacy and reversed keys),
configuration records and crash safety of the writers."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import h5py  # tests emulate files written by hloc itself; the package never imports h5py outside store.py
import numpy as np
import pytest

from feature_backends.errors import ConfigError, InputError
from feature_backends.store import (
    FeatureReader,
    FeatureWriter,
    GlobalWriter,
    MatchReader,
    MatchWriter,
    names_to_pair,
    names_to_pair_legacy,
    read_global_descriptors,
)

NESTED = "seq 1/sub/ïmage 0.jpg"


def random_features(rng, n=50, dim=128, size=(640, 480)):
    return {
        "keypoints": rng.uniform(0, 3000, (n, 2)).astype(np.float32),
        "descriptors": rng.normal(size=(dim, n)).astype(np.float32),
        "scores": rng.uniform(size=n).astype(np.float32),
        "image_size": np.array(size),
    }


def test_feature_round_trip_with_nested_names_and_half_descriptors(tmp_path):
    rng = np.random.default_rng(0)
    feats = {name: random_features(rng) for name in ("a.png", NESTED)}
    path = tmp_path / "features.h5"
    with FeatureWriter(path, as_half=True) as writer:
        for name, data in feats.items():
            writer.write(name, data, uncertainty=0.5)
    with FeatureReader(path) as reader:
        assert reader.names() == sorted(feats)
        for name, data in feats.items():
            back = reader.read(name)
            # Keypoints stay exact float32 beyond 2048 px, unlike hloc's as_half which halves them too.
            np.testing.assert_array_equal(back["keypoints"], data["keypoints"])
            np.testing.assert_allclose(back["descriptors"], data["descriptors"], rtol=1e-3, atol=1e-3)
            np.testing.assert_array_equal(back["image_size"], [640, 480])
            assert reader.uncertainty(name) == 0.5
    with h5py.File(path) as raw:  # hloc's layout: nested groups, descriptors (D,N)
        assert raw["seq 1"]["sub"]["ïmage 0.jpg"]["keypoints"].dtype == np.float32
        assert raw[NESTED]["descriptors"].dtype == np.float16
        assert raw[NESTED]["descriptors"].shape == (128, 50)


def test_pair_keys_match_hloc():
    assert names_to_pair("a/b.jpg", "c.jpg") == "a-b.jpg/c.jpg"
    assert names_to_pair_legacy("a/b.jpg", "c.jpg") == "a-b.jpg_c.jpg"


def write_hloc_style(path, key, matches0, scores):
    with h5py.File(path, "a") as f:
        group = f.create_group(key)
        group.create_dataset("matches0", data=matches0)
        group.create_dataset("matching_scores0", data=scores)


@pytest.mark.parametrize("stored_as", ["direct", "reversed", "legacy", "legacy-reversed"])
def test_reads_hloc_int16_matches_under_every_key(tmp_path, stored_as):
    matches0 = np.array([2, -1, 0, 1], np.int16)  # hloc's sparse path writes int16
    scores = np.array([0.9, 0.0, 0.5, 0.7], np.float16)
    name0, name1 = "x/0.jpg", "1.jpg"
    key = {
        "direct": names_to_pair(name0, name1),
        "reversed": names_to_pair(name1, name0),
        "legacy": names_to_pair_legacy(name0, name1),
        "legacy-reversed": names_to_pair_legacy(name1, name0),
    }[stored_as]
    path = tmp_path / "matches.h5"
    write_hloc_style(path, key, matches0, scores)
    with MatchReader(path) as reader:
        matches, match_scores = reader.read(name0, name1)
    expected = np.array([[0, 2], [2, 0], [3, 1]])
    if stored_as.endswith("reversed"):
        expected = expected[:, ::-1]
    np.testing.assert_array_equal(matches, expected)
    np.testing.assert_allclose(match_scores, [0.9, 0.5, 0.7], atol=1e-3)


def test_reads_hloc_float16_keypoints(tmp_path):
    path = tmp_path / "hloc-feats.h5"
    with h5py.File(path, "w") as f:
        group = f.create_group("img.jpg")
        group.create_dataset("keypoints", data=np.array([[10.5, 20.25]], np.float16))
        group.create_dataset("descriptors", data=np.ones((4, 1), np.float16))
        group.create_dataset("scores", data=np.ones(1, np.float16))
        group.create_dataset("image_size", data=np.array([100, 50]))
    with FeatureReader(path) as reader:
        data = reader.read("img.jpg")
    assert data["keypoints"].dtype == np.float32 and data["descriptors"].dtype == np.float32
    np.testing.assert_array_equal(data["keypoints"], [[10.5, 20.25]])


def test_match_writer_round_trip_and_has(tmp_path):
    path = tmp_path / "m.h5"
    with MatchWriter(path) as writer:
        writer.write("a", "b", {"matches0": np.array([1, -1]), "matching_scores0": np.array([0.5, 0.0], np.float32)})
        assert writer.has("b", "a") and not writer.has("a", "c")
    with h5py.File(path) as raw:
        assert raw["a/b/matches0"].dtype == np.int32
    with MatchReader(path) as reader:
        np.testing.assert_array_equal(reader.read("b", "a")[0], [[1, 0]])
        with pytest.raises(InputError):
            reader.read("a", "c")


def test_global_descriptors_round_trip(tmp_path):
    path = tmp_path / "global-feats.h5"
    with GlobalWriter(path) as writer:
        writer.write("b.jpg", np.array([0.0, 1.0]))
        writer.write("d/a.jpg", np.array([1.0, 0.0]))
    names, descriptors = read_global_descriptors(path)
    assert names == ["b.jpg", "d/a.jpg"]
    np.testing.assert_array_equal(descriptors, [[0, 1], [1, 0]])
    with pytest.raises(InputError):
        read_global_descriptors(path, ["missing.jpg"])


def test_resuming_with_another_configuration_is_refused(tmp_path):
    path = tmp_path / "f.h5"
    with FeatureWriter(path, conf={"backend": "sift", "max_keypoints": 100}) as writer:
        writer.write("a", random_features(np.random.default_rng(0)))
    with pytest.raises(ConfigError, match="different configuration"):
        FeatureWriter(path, conf={"backend": "sift", "max_keypoints": 200})
    with FeatureWriter(path, conf={"backend": "sift", "max_keypoints": 100}) as writer:
        assert writer.names == {"a"}


def test_exception_inside_writer_keeps_what_was_written(tmp_path):
    path = tmp_path / "f.h5"
    with pytest.raises(KeyboardInterrupt):
        with FeatureWriter(path) as writer:
            writer.write("a", random_features(np.random.default_rng(0)))
            raise KeyboardInterrupt
    with FeatureReader(path) as reader:
        assert reader.names() == ["a"]


def test_sigkill_never_leaves_a_corrupt_file(tmp_path):
    """A writer killed with SIGKILL mid-stream leaves the last published file intact and resumable."""
    path = tmp_path / "f.h5"
    script = textwrap.dedent(f"""
        import numpy as np, sys, time
        from feature_backends.store import FeatureWriter
        with FeatureWriter({str(path)!r}, checkpoint_seconds=0.0) as writer:
            for i in range(100000):
                writer.write(f"img{{i:06d}}", {{"keypoints": np.zeros((2000, 2), np.float32),
                                                "descriptors": np.zeros((128, 2000), np.float32)}})
                if i == 3:
                    print("ready", flush=True)
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                               cwd=os.path.dirname(os.path.dirname(__file__)))
    assert process.stdout.readline().strip() == "ready"
    time.sleep(0.5)
    process.send_signal(signal.SIGKILL)
    process.wait()
    with FeatureReader(path) as reader:
        written = reader.names()
    assert len(written) >= 4
    assert written == [f"img{i:06d}" for i in range(len(written))]
    with FeatureWriter(path) as writer:  # the stale .partial is discarded, the published file resumes
        assert writer.names == set(written)


def test_extract_writes_hlocs_keypoint_uncertainty(synthetic_scene, tmp_path):
    """hloc's `uncertainty` attribute: detection noise (1 px) times the scale back to the original image."""
    from recon.extract import extract

    names = sorted(p.name for p in (synthetic_scene / "images").iterdir())[:1]
    for resize_max, expected in ((None, 1.0), (320, 2.0)):
        path = tmp_path / f"f{resize_max}.h5"
        extract({"name": "sift", "resize_max": resize_max, "max_keypoints": 100}, synthetic_scene / "images", path,
                names)
        with FeatureReader(path) as reader:
            assert reader.uncertainty(names[0]) == pytest.approx(expected)

"""The match stage (recon.match): resume, unknown images in the pairs file; the MNN matcher against a plain numpy
reference, and the checked backend configuration."""

import numpy as np
import pytest

from feature_backends.base import Conf, merge_conf
from feature_backends.errors import ConfigError
from feature_backends.nearest_neighbor import MutualNearestNeighbor, mutual_nearest_neighbors
from feature_backends.registry import get_backend, resolve
from feature_backends.store import MatchReader
from pairs.io import read_pairs, write_pairs
from recon.cli import main
from recon.executor import ExecutorOptions
from recon.match import match


def reference_mnn(d0, d1, ratio, max_distance=None):
    """Nearest neighbour both ways, Lowe's ratio test both ways (COLMAP's cross-check)."""
    dist = np.sqrt(np.maximum(((d0[:, None] - d1[None]) ** 2).sum(-1), 0))
    matches = np.full(len(d0), -1)
    ratio = 1.0 if ratio is None else ratio
    for i in range(len(d0)):
        row = np.sort(dist[i])
        j = np.argmin(dist[i])
        column = np.sort(dist[:, j])
        if row[0] > ratio * row[1] or column[0] > ratio * column[1]:
            continue
        if max_distance is not None and row[0] > max_distance:
            continue
        if np.argmin(dist[:, j]) == i:
            matches[i] = j
    return matches


def normalized(rng, n, d=32):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int8"])
@pytest.mark.parametrize("block", [1 << 26, 7 * 50, 1])  # one block, row chunks of 7, chunks of 2
def test_mnn_equals_reference(block, dtype):
    import torch

    rng = np.random.default_rng(0)
    d1 = normalized(rng, 50)
    d0 = np.concatenate([d1[:30] + 0.05 * normalized(rng, 30), normalized(rng, 40)])
    d0 /= np.linalg.norm(d0, axis=1, keepdims=True)
    matches, scores = mutual_nearest_neighbors(torch.from_numpy(d0), torch.from_numpy(d1), 0.8,
                                               max_block_elements=block, compute_dtype=getattr(torch, dtype))
    expected = reference_mnn(d0, d1, 0.8)
    np.testing.assert_array_equal(matches.numpy(), expected)
    assert (matches[:30].numpy() == np.arange(30)).all()  # the perturbed copies find their originals
    assert ((scores.numpy() > 0) == (expected >= 0)).all()


@pytest.mark.parametrize("dtype", ["float32", "int32"])
@pytest.mark.parametrize("width, num_columns, k", [(256, 256, 2), (256, 201, 3), (512, 3, 3), (96, 90, 2)])
def test_row_top_equals_topk(dtype, width, num_columns, k):
    """The grouped top-k search returns what torch's top-k over the unpadded columns returns: same values, same
    columns (distinct values, so no ties), padding never chosen; rows whose best entries share a group included."""
    import torch

    from feature_backends.nearest_neighbor import _row_top

    generator = torch.Generator().manual_seed(width + num_columns + k)
    scores = torch.randperm(300 * width, generator=generator).reshape(300, width).to(getattr(torch, dtype)) - 1000
    scores[:5, 64:67] = 10 ** 6 + torch.arange(3).to(scores.dtype)  # three best in one group
    expected = scores[:, :num_columns].topk(k, dim=1)
    values, columns = _row_top(scores.clone(), k, num_columns)
    assert torch.equal(values, expected.values) and torch.equal(columns, expected.indices)
    assert int(columns.max()) < num_columns


@pytest.mark.parametrize("ratio, max_distance, expected_matches", [
    (None, None, 30), (0.8, 0.3, 30), (0.8, 0.01, 0), (0.02, None, 0)])
def test_mnn_searches_only_columns_that_can_match(ratio, max_distance, expected_matches):
    """Columns are searched only for rows that pass their own tests; the result must not depend on it."""
    import torch

    rng = np.random.default_rng(1)
    d1 = normalized(rng, 60)
    d0 = np.concatenate([d1[:30] + 0.05 * normalized(rng, 30), normalized(rng, 45)])
    d0 /= np.linalg.norm(d0, axis=1, keepdims=True)
    matches, _ = mutual_nearest_neighbors(torch.from_numpy(d0), torch.from_numpy(d1), ratio, max_distance,
                                          compute_dtype=torch.float32)
    expected = reference_mnn(d0, d1, ratio, max_distance)
    np.testing.assert_array_equal(matches.numpy(), expected)
    assert (matches[:30].numpy() >= 0).sum() == expected_matches


def test_matcher_backend_shapes_and_empty_inputs():
    rng = np.random.default_rng(1)
    feats = {"keypoints": rng.uniform(size=(20, 2)).astype(np.float32), "descriptors": normalized(rng, 20).T.copy()}
    matcher = MutualNearestNeighbor({"ratio_threshold": None})
    result = matcher.match(feats, feats)
    np.testing.assert_array_equal(result["matches0"], np.arange(20))
    assert result["matches0"].dtype == np.int32
    empty = {"keypoints": np.zeros((0, 2), np.float32), "descriptors": np.zeros((32, 0), np.float32)}
    assert matcher.match(feats, empty)["matches0"].tolist() == [-1] * 20


def test_conf_is_checked_merged_and_frozen():
    conf = Conf(merge_conf({"a": 1, "nested": {"b": 2, "c": 3}}, {"nested": {"b": 5}}))
    assert conf.nested.b == 5 and conf.nested.c == 3 and conf.a == 1
    with pytest.raises(TypeError):
        conf.a = 2
    with pytest.raises(ConfigError, match="nested.x"):
        merge_conf({"nested": {"b": 2}}, {"nested": {"x": 1}})


def test_registry_lists_known_names_and_accepts_dotted_paths():
    with pytest.raises(ConfigError, match="known: .*mnn"):
        get_backend("matcher", "nope")
    cls, _ = resolve("matcher", "feature_backends.nearest_neighbor:MutualNearestNeighbor")
    assert cls is MutualNearestNeighbor
    with pytest.raises(ConfigError, match="is a matcher backend, not a features backend"):
        resolve("features", "feature_backends.nearest_neighbor:MutualNearestNeighbor")


def test_sift_keypoints_are_unbiased_in_hloc_convention():
    """Blobs centred at known pixel coordinates (pixel centres at integers) are found there, at several scales."""
    from feature_backends.sift import SIFT

    height, width = 400, 400
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    centres = [(100.0, 100.0), (300.0, 110.25), (110.5, 300.0), (290.0, 290.0)]
    sift = SIFT({"contrast_threshold": 0.005, "edge_threshold": 50.0, "resize_max": None})
    for sigma in (2.0, 3.0, 6.0):
        image = sum(np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2)) for cx, cy in centres)
        image = (image / image.max() * 0.8 + 0.1)[..., None].astype(np.float32)
        keypoints = sift.extract(image)["keypoints"]
        for cx, cy in centres:
            nearest = keypoints[np.argmin(np.hypot(keypoints[:, 0] - cx, keypoints[:, 1] - cy))]
            assert np.hypot(nearest[0] - cx, nearest[1] - cy) < 0.05, (sigma, (cx, cy), nearest)


@pytest.mark.parametrize("mutual", [True, False])
def test_one_to_many_equals_pairwise(mutual):
    """The batched path (one product per direction, padded partners) gives exactly the pairwise results."""
    import torch

    from feature_backends.nearest_neighbor import one_to_many_nearest_neighbors

    rng = np.random.default_rng(3)
    d0 = torch.from_numpy(normalized(rng, 60))
    others = [torch.from_numpy(np.concatenate([d0.numpy()[:k] + 0.03 * normalized(rng, k), normalized(rng, n)]))
              for k, n in [(20, 5), (0, 1), (40, 30), (3, 0)]]
    others = [torch.nn.functional.normalize(o, dim=1) for o in others]
    batched = one_to_many_nearest_neighbors(d0, others, 0.8, mutual=mutual, compute_dtype=torch.float32)
    for other, (matches, scores) in zip(others, batched):
        reference, reference_scores = mutual_nearest_neighbors(d0, other, 0.8, mutual=mutual,
                                                               compute_dtype=torch.float32)
        np.testing.assert_array_equal(matches.numpy(), reference.numpy())
        np.testing.assert_allclose(scores.numpy(), reference_scores.numpy(), atol=1e-6)
    assert (batched[2][0][:40].numpy() >= 0).sum() >= 35  # the perturbed copies are found


def test_match_stage_batches_by_first_image(tmp_path):
    from recon.match import _batches_by_first_image

    cache = {f"i{k}": {"keypoints": np.zeros((n, 2))} for k, n in enumerate([10, 4, 8, 6])}
    pairs = [("i0", "i1"), ("i0", "i2"), ("i1", "i2"), ("i0", "i3"), ("i1", "i3")]
    assert list(_batches_by_first_image(pairs, cache)) == [("i0", ["i1", "i2", "i3"]), ("i1", ["i2", "i3"])]
    # budget of 10 x 8 x 2 elements: i0's partners split after two
    assert list(_batches_by_first_image(pairs, cache, max_elements=160)) == [
        ("i0", ["i1", "i2"]), ("i0", ["i3"]), ("i1", ["i2", "i3"])]


class Interrupt(Exception):
    pass


def test_match_resumes_after_interruption(synthetic_scene, synthetic_run, tmp_path, monkeypatch):
    from feature_backends.nearest_neighbor import MutualNearestNeighbor

    out = synthetic_run.out_dir
    matched = []
    original = MutualNearestNeighbor.match_many
    state = {"interrupt": True}

    def counting(self, features0, others):
        if state["interrupt"] and len(matched) + len(others) > 20:
            raise Interrupt
        matched.extend(others)
        return original(self, features0, others)

    monkeypatch.setattr(MutualNearestNeighbor, "match_many", counting)
    here = ExecutorOptions(workers=1)  # `matched` counts calls in this process
    with pytest.raises(Interrupt):
        match("mnn", out / "pairs.txt", out / "features.h5", tmp_path / "m.h5", executor=here)
    written = len(matched)
    assert 0 < written <= 20
    state["interrupt"], matched[:] = False, []
    match("mnn", out / "pairs.txt", out / "features.h5", tmp_path / "m.h5", executor=here)
    assert len(matched) == 66 - written  # only the missing pairs
    with MatchReader(tmp_path / "m.h5") as again, MatchReader(out / "matches.h5") as reference:
        for pair in read_pairs(out / "pairs.txt"):
            np.testing.assert_array_equal(again.read(*pair)[0], reference.read(*pair)[0])


def test_local_processes_match_like_this_process(synthetic_scene, synthetic_run, tmp_path, monkeypatch):
    """Two forked processes match the pairs (each reading the features itself) and give this process' matches."""
    import os

    out = synthetic_run.out_dir
    log = tmp_path / "pids.txt"
    original = MutualNearestNeighbor.match_many

    def logging_pid(self, features0, others):
        with open(log, "a") as file:
            file.write(f"{os.getpid()} {len(others)}\n")
        return original(self, features0, others)

    monkeypatch.setattr(MutualNearestNeighbor, "match_many", logging_pid)
    match("mnn", out / "pairs.txt", out / "features.h5", tmp_path / "m2.h5", executor=ExecutorOptions(workers=2))
    calls = [line.split() for line in log.read_text().splitlines()]
    pids = {pid for pid, _ in calls}
    assert len(pids) == 2 and str(os.getpid()) not in pids
    assert sum(int(count) for _, count in calls) == 66
    log.unlink()
    match("mnn", out / "pairs.txt", out / "features.h5", tmp_path / "m1.h5", executor=ExecutorOptions(workers=1))
    assert {line.split()[0] for line in log.read_text().splitlines()} == {str(os.getpid())}
    with MatchReader(tmp_path / "m2.h5") as pooled, MatchReader(tmp_path / "m1.h5") as here:
        for pair in read_pairs(out / "pairs.txt"):
            for a, b in zip(pooled.read(*pair), here.read(*pair)):
                np.testing.assert_array_equal(a, b)


def test_a_dying_match_process_is_one_line_and_keeps_what_was_written(synthetic_scene, synthetic_run, tmp_path,
                                                                       monkeypatch):
    """A worker killed mid-run (here: its fourth task exits the process, as the out-of-memory killer would)
    ends the stage with a one-line error; the rerun resumes from the pairs written before."""
    import os

    from feature_backends.errors import ReconError

    out = synthetic_run.out_dir
    original = MutualNearestNeighbor.match_many
    calls = {"count": 0}

    def dying(self, features0, others):
        calls["count"] += 1  # per process (forked copies)
        if calls["count"] == 4:
            os._exit(9)
        return original(self, features0, others)

    monkeypatch.setattr(MutualNearestNeighbor, "match_many", dying)
    with pytest.raises(ReconError, match="matching process died.*rerun resumes.*--workers 1"):
        match("mnn", out / "pairs.txt", out / "features.h5", tmp_path / "m.h5", executor=ExecutorOptions(workers=2))
    monkeypatch.setattr(MutualNearestNeighbor, "match_many", original)
    with MatchReader(tmp_path / "m.h5") as partial:
        kept = sum(partial.has(*pair) for pair in read_pairs(out / "pairs.txt"))
    assert 0 < kept < 66
    match("mnn", out / "pairs.txt", out / "features.h5", tmp_path / "m.h5", executor=ExecutorOptions(workers=2))
    with MatchReader(tmp_path / "m.h5") as again, MatchReader(out / "matches.h5") as reference:
        for pair in read_pairs(out / "pairs.txt"):
            np.testing.assert_array_equal(again.read(*pair)[0], reference.read(*pair)[0])


def test_local_processes_default_to_the_cores_up_to_16(monkeypatch):
    import sys

    import recon.executor as executor

    monkeypatch.setattr(sys, "platform", "linux")
    for cores, expected in ((2, 2), (64, 16)):
        monkeypatch.setattr(executor, "available_cores", lambda: cores)
        assert executor.local_processes(None) == expected
        assert executor.local_processes(ExecutorOptions(workers=3)) == 3
    monkeypatch.setattr(sys, "platform", "darwin")  # no fork there: the work stays in this process
    assert executor.local_processes(ExecutorOptions(workers=3)) == 1


def test_matching_stays_here_when_no_process_can_start(synthetic_scene, synthetic_run, tmp_path, monkeypatch,
                                                       caplog):
    """Where the pool cannot start (a container without /dev/shm for its semaphores), the stage says so once and
    matches in this process."""
    import recon.executor

    def no_semaphores(*args, **kwargs):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(recon.executor, "ProcessPoolExecutor", no_semaphores)
    out = synthetic_run.out_dir
    match("mnn", out / "pairs.txt", out / "features.h5", tmp_path / "m.h5", executor=ExecutorOptions(workers=2))
    assert "Matching in this process: cannot start 2 matching processes" in caplog.text
    with MatchReader(tmp_path / "m.h5") as again, MatchReader(out / "matches.h5") as reference:
        for pair in read_pairs(out / "pairs.txt"):
            np.testing.assert_array_equal(again.read(*pair)[0], reference.read(*pair)[0])


def test_pairs_naming_unknown_image_is_a_clear_error(synthetic_scene, synthetic_run, tmp_path, capsys):
    out = synthetic_run.out_dir
    write_pairs(tmp_path / "pairs.txt", [("camera000001_frame000000.png", "nope.png")])
    code = main(["match", str(tmp_path / "pairs.txt"), str(out / "features.h5"), str(tmp_path / "m.h5")])
    assert code == 2 and "nope.png" in capsys.readouterr().err


def test_cpu_precision_is_fixed_by_the_cpu_on_x86(monkeypatch):
    """On x86 the similarity precision follows the CPU, without timing anything (a timed choice could flip under
    load and change a resumed run's matches): int8 with VNNI units, else float32. Other CPUs are probed."""
    import platform

    import torch

    from feature_backends import nearest_neighbor

    def no_probe(*args, **kwargs):
        raise AssertionError("probed")

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch, "randn", no_probe)
    for name in ("_is_amx_tile_supported", "_is_amx_fp16_supported", "_is_avx512_bf16_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: True, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: False, raising=False)
    assert nearest_neighbor.fastest_similarity_dtype.__wrapped__(torch.device("cpu")) == torch.float32
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: True, raising=False)
    assert nearest_neighbor.fastest_similarity_dtype.__wrapped__(torch.device("cpu")) == torch.int8
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    with pytest.raises(AssertionError, match="probed"):
        nearest_neighbor.fastest_similarity_dtype.__wrapped__(torch.device("cpu"))

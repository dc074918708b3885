"""The report (recon.report) and progress events (recon.progress) on a generated scene with known reasons.

One run (~15 s on 2 shared cores) on `make_split_scene`: 8 views of the main model, 5 mirrored views of another
scene that form their own model, a blank frame and a noise frame. Each view's reason in the page's embedded
JSON must be the true one; reasons of the other stages (unreadable, no pairs, rejected by the mapper) are made
by editing a copy of the files the report reads. The browser test runs when Debian's `chromium` is installed.
"""

import json
import shutil
import subprocess

import numpy as np
import pycolmap
import pytest
from PIL import Image

from feature_backends.store import FeatureReader
from pairs.io import read_pairs, write_pairs
from recon.cli import main
from recon.pipeline import RunConfig, run
from recon.report import ReportOptions, read_report_data, write_report
from recon.sfm import SfMOptions
from recon.synthetic import make_split_scene


@pytest.fixture(scope="module")
def split_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("split")
    image_dir, reasons = make_split_scene(root / "scene")
    out = root / "out"
    config = RunConfig(sfm=SfMOptions(mapper_options={"min_model_size": 3}), progress_json=root / "progress.jsonl")
    result = run(image_dir, out, config)
    return image_dir, reasons, out, result, root / "progress.jsonl"


def _views(path):
    return {view["name"]: view for view in read_report_data(path)["views"]}


def test_each_view_has_its_true_reason(split_run):
    image_dir, reasons, out, result, _ = split_run
    assert result.sfm.num_registered == 8 and result.sfm.num_models == 2
    views = _views(out / "report.html")
    assert {name: view["reason"] for name, view in views.items()} == reasons
    assert {view["model"] for name, view in views.items() if name.startswith("b/")} == {1}
    assert "sparse/1" in views["b/camera000001_frame000000.png"]["reason_text"]
    with FeatureReader(out / "features.h5") as features:
        assert all(views[name]["keypoints"] == len(features.read_keypoints(name)) for name in reasons)
    assert views["blank.png"]["keypoints"] == 0 and views["noise.png"]["keypoints"] > 0
    # exhaustive over the 14 views with features; the blank frame is left out of the pairs ("no features")
    assert views["blank.png"]["pairs"] == 0
    assert all(view["pairs"] == 13 for name, view in views.items() if name != "blank.png")
    run_facts = read_report_data(out / "report.html")["run"]["result"]  # the engine choice and its reason
    # the default mapper (auto) saw the incremental model leave views out, so the global mapper ran too
    assert set(run_facts["engine_runs"]) == {"incremental", "global"}, run_facts
    assert run_facts["engine"] in run_facts["engine_runs"] and "registered views" in run_facts["engine_reason"]
    assert views["noise.png"]["verified"] == 0 and views["camera000001_frame000000.png"]["verified"] >= 5
    assert all(view["thumb"].startswith("data:image/jpeg;base64,") for view in views.values())
    components = read_report_data(out / "report.html")["pairs"]["components"]
    assert [c["size"] for c in components] == [8, 5]  # the verified pairs already split the scene


def test_per_view_numbers_match_an_independent_reprojection(split_run):
    _, _, out, _, _ = split_run
    views = _views(out / "report.html")
    model = pycolmap.Reconstruction(out / "sparse" / "0")
    for image in model.images.values():
        if not image.has_pose:
            continue
        observed = [p for p in image.points2D if p.has_point3D()]
        errors = [np.linalg.norm(image.project_point(model.points3D[p.point3D_id].xyz) - p.xy) for p in observed]
        assert views[image.name]["observations"] == len(observed)
        assert views[image.name]["error"] == pytest.approx(np.mean(errors), abs=1e-3)
    data = read_report_data(out / "report.html")
    models = [pycolmap.Reconstruction(out / "sparse" / str(i)) for i in (0, 1)]
    assert sum(data["tracks"]["counts"]) == data["points"]["total"] == sum(m.num_points3D() for m in models)
    assert [m["points"] for m in data["models"]] == [m.num_points3D() for m in models]
    assert len(data["cameras"]) == 13 and {c["model"] for c in data["cameras"]} == {0, 1}


def test_reasons_of_the_other_stages_from_edited_files(split_run, tmp_path):
    image_dir, reasons, out, _, _ = split_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("undistorted", "report.html"))
    images = tmp_path / "images"
    shutil.copytree(image_dir, images)
    (images / "broken.jpg").write_bytes(b"not a jpeg")  # in the folder, never in features.h5
    write_pairs(copy / "pairs.txt", [p for p in read_pairs(copy / "pairs.txt") if "noise.png" not in p])
    shutil.rmtree(copy / "sparse" / "1")  # the mapper's second model gone: its views had verified pairs
    assert main(["report", str(copy), "--images", str(images), "--no-thumbnails"]) == 0
    views = _views(copy / "report.html")
    expected = {**reasons, "broken.jpg": "unreadable", "noise.png": "no_pairs"}
    expected.update({name: "rejected" for name in reasons if name.startswith("b/")})
    assert {name: view["reason"] for name, view in views.items()} == expected
    assert not any("thumb" in view for view in views.values())


def test_report_of_an_hloc_folder(split_run, tmp_path):
    """hloc's files only: features.h5, matches.h5, pairs.txt, sparse/0; no database, no run.json, no images."""
    _, reasons, out, _, _ = split_run
    for name in ("features.h5", "matches.h5", "pairs.txt"):
        shutil.copy(out / name, tmp_path / name)
    shutil.copytree(out / "sparse" / "0", tmp_path / "sparse" / "0")
    views = _views(write_report(tmp_path))
    assert sorted(views) == sorted(reasons)
    registered = [name for name, reason in reasons.items() if reason == "registered"]
    assert sorted(name for name, view in views.items() if view["registered"]) == sorted(registered)
    assert views["blank.png"]["reason"] == "no_features"
    assert views["noise.png"]["reason"] == "unknown"  # no database: verification cannot be told apart


def test_report_size_is_bounded_and_cheap(split_run, tmp_path):
    _, _, out, result, _ = split_run
    data = read_report_data(out / "report.html")
    total = data["points"]["total"]
    assert data["points"]["shown"] == total > 300
    # The cost (< 5 % of the run) is a measured figure (README), not a timed assertion: a loaded machine fails it.
    assert (out / "report.html").stat().st_size < 150_000  # 15 thumbnails (~2 KB) + ~500 points + page
    copy = tmp_path / "out"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("undistorted", "report.html"))
    small = read_report_data(write_report(copy, ReportOptions(max_points=100, max_edges=5, thumbnails=False)))
    assert small["points"]["shown"] == 100 and small["points"]["total"] == total
    assert len(small["points"]["xyz"]) == 300 and len(small["pairs"]["edges"]) == 5
    assert small["pairs"]["edges_total"] == data["pairs"]["num_verified"] == len(data["pairs"]["edges"])
    assert small["pairs"]["edges"][0][2] == max(e[2] for e in data["pairs"]["edges"])  # strongest kept
    assert (copy / "report.html").stat().st_size < 40_000  # page (~19 KB of script and style) + 100 points


def test_progress_json_events(split_run):
    _, _, _, result, progress = split_run
    events = [json.loads(line) for line in progress.read_text().splitlines()]
    assert events[0]["event"] == "run_start" and events[0]["num_images"] == 15
    assert events[-1]["event"] == "run_end" and events[-1]["registered"] == 8 and events[-1]["models"] == 2
    stages = [e["stage"] for e in events if e["event"] == "stage_start"]
    assert stages == ["extract", "pairs", "match", "sfm", "export", "report"]
    assert stages == [e["stage"] for e in events if e["event"] == "stage_end"]
    items = {e["stage"]: (e["done"], e["total"]) for e in events if e["event"] == "items"}
    assert items == {"extract": (14, 15), "pairs": (91, 91), "match": (91, 91), "sfm": (8, 15)}
    assert any("split into 2 models" in e["message"] for e in events if e["event"] == "warning")
    times = [e["time"] for e in events]
    assert times == sorted(times)


def test_report_opens_in_headless_chromium(split_run, tmp_path):
    """Offline (file://, no network used by the page): no console message, every view listed, 3D not blank."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium not installed (Debian: apt-get install chromium)")
    _, reasons, out, _, _ = split_run
    url = (out / "report.html").as_uri()
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--user-data-dir=" + str(tmp_path / "profile")]
    dom = subprocess.run([*flags, "--enable-logging=stderr", "--v=0", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120)
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    assert console == []
    assert 'data-rendered="1"' in dom.stdout
    assert all(f'data-name="{name}"' in dom.stdout for name in reasons)
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, "--window-size=1200,3400", f"--screenshot={shot}", url],
                   capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.std() > 20
    # The 3D canvas is the only wide dark area (thumbnails are 64 px wide): its points and frusta are lit.
    dark = pixels < 40
    rows, cols = np.flatnonzero(dark.sum(1) > 300), np.flatnonzero(dark.sum(0) > 200)
    canvas = pixels[rows.min() + 2:rows.max() - 2, cols.min() + 2:cols.max() - 2]
    assert canvas.shape[0] > 400 and canvas.shape[1] > 600, canvas.shape
    assert (canvas > 60).sum() > 300


def test_sift_on_a_blank_frame_returns_empty_arrays():
    """A uniform frame has no keypoints; extraction used to fail on reshape(0, -1) and end the whole run."""
    from feature_backends.sift import SIFT

    features = SIFT({}).extract(np.full((120, 160, 3), 128, np.uint8))
    assert features["keypoints"].shape == (0, 2) and features["descriptors"].shape == (128, 0)  # hloc: (D, N)


def test_page_of_1000_views_stays_under_10_mb(split_run):
    """The page at the caps: 1,000 views with worst-case thumbnails (random noise compresses worst), 100,000
    points subsampled to max_points, max_edges pairs, 1,000 frusta."""
    from recon.report import render
    from recon.report.data import _subsample

    _, _, out, _, _ = split_run
    data = read_report_data(out / "report.html")
    noise = next(view for view in data["views"] if view["name"] == "noise.png")
    options, rng = ReportOptions(), np.random.default_rng(0)
    data["views"] = [dict(noise, name=f"images/frame_{i:05d}.jpg") for i in range(1000)]
    data["cameras"] = (data["cameras"] * 77)[:1000]
    data["points"] = _subsample([(0, rng.normal(size=(100_000, 3)) * 10, rng.integers(0, 256, (100_000, 3)))],
                                options.max_points, seed=0)
    data["pairs"]["edges"] = [[int(i), int(j), int(k)] for i, j, k in
                              zip(rng.integers(0, 1000, options.max_edges), rng.integers(0, 1000, options.max_edges),
                                  rng.integers(15, 3000, options.max_edges))]
    size = len(render(data, "1000 views").encode())
    assert data["points"]["shown"] == options.max_points
    assert size < 10_000_000, size


def test_failed_mapping_still_writes_the_report(tmp_path):
    """No model at all (noise and a blank frame): the run fails, and the report says why for every view."""
    from feature_backends.errors import ReconError

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(images / f"noise{i}.png")
    Image.new("RGB", (160, 120), (0, 0, 0)).save(images / "black.png")
    with pytest.raises(ReconError, match="mapping failed"):
        run(images, tmp_path / "out")
    views = _views(tmp_path / "out" / "report.html")
    assert {name: view["reason"] for name, view in views.items()} == {
        "black.png": "no_features", **{f"noise{i}.png": "no_verified_pair" for i in range(3)}}


def test_match_visualisations_are_the_true_strongest_weakest_and_rejected_pairs(split_run):
    """Chosen pairs and counts against the database read independently; lines bounded and inside the thumbnails."""
    import sqlite3

    _, _, out, _, _ = split_run
    with sqlite3.connect(out / "sfm" / "database.db") as db:
        names = dict(db.execute("SELECT image_id, name FROM images"))
        pair = lambda pid: (names[pid // 2147483647], names[pid % 2147483647])  # noqa: E731
        inliers = {pair(pid): rows for pid, rows, config in
                   db.execute("SELECT pair_id, rows, config FROM two_view_geometries")
                   if rows > 0 and config in (2, 3, 4, 5, 6, 8, 9)}
        raw = {pair(pid): rows for pid, rows in db.execute("SELECT pair_id, rows FROM matches") if rows > 0}
    rejected = {p: n for p, n in raw.items() if p not in inliers}
    assert len(inliers) > 2 and len(rejected) >= 2
    shown = {p["kind"]: p for p in read_report_data(out / "report.html")["match_pairs"] if p["kind"] != "rejected"}
    for kind, best in (("strongest", max(inliers.values())), ("weakest", min(inliers.values()))):
        entry = shown[kind]
        assert entry["inliers"] == inliers[entry["name0"], entry["name1"]] == best
        assert entry["lines_total"] == best and len(entry["lines"]) == min(best, 100)
        assert entry["matches"] == raw[entry["name0"], entry["name1"]] >= best
    chosen = [p for p in read_report_data(out / "report.html")["match_pairs"] if p["kind"] == "rejected"]
    assert [p["matches"] for p in chosen] == sorted(rejected.values(), reverse=True)[:2]
    from feature_backends.store import MatchReader

    with MatchReader(out / "matches.h5") as matches:
        for entry in chosen:
            assert (entry["name0"], entry["name1"]) in rejected and entry["inliers"] == 0
            assert entry["lines_total"] == len(matches.read(entry["name0"], entry["name1"])[0])
            assert len(entry["lines"]) == min(entry["lines_total"], 100)
    for entry in [*shown.values(), *chosen]:
        sizes = [_jpeg_size(entry[key]) for key in ("thumb0", "thumb1")]
        assert max(sizes[0]) == max(sizes[1]) == 200
        lines = np.array(entry["lines"])
        assert (lines >= 0).all() and (lines[:, [0, 2]].max(0) <= [sizes[0][0], sizes[1][0]]).all()
        assert (lines[:, [1, 3]].max(0) <= [sizes[0][1], sizes[1][1]]).all()


def _jpeg_size(url):
    import base64
    import io

    assert url.startswith("data:image/jpeg;base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size


def test_splat_results_enter_the_report_after_recon_splat(split_run, tmp_path, monkeypatch):
    """`recon splat` (its training replaced by files in metrics.json's layout) refreshes an existing report."""
    import recon.splat

    _, _, out, _, _ = split_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("undistorted"))
    curve = [{"step": s, "loss": 0.1, "num_gaussians": 500, "train_psnr": 14.0 + s / 100, "test_psnr": 13.0 + s / 200}
             for s in (100, 200, 300)]

    def fake_splat(out_dir, config):
        splat_dir = out_dir / "splats"
        (splat_dir / "renders").mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (640, 240), (40 * i, 90, 200)).save(splat_dir / "renders" / f"view{i}.png")
        metrics = {"backend": "cpu", "iterations": 300, "curve": curve, "train_seconds": 12.5,
                   "initial": {"test": {"psnr": 11.5, "ssim": 0.31}, "num_gaussians": 400},
                   "final": {"test": {"psnr": 14.5, "ssim": 0.52}, "num_gaussians": 800}}
        (splat_dir / "metrics.json").write_text(json.dumps(metrics))
        return splat_dir

    monkeypatch.setattr(recon.splat, "splat", fake_splat)
    assert read_report_data(copy / "report.html")["splat"] is None
    assert main(["splat", str(copy)]) == 0
    data = read_report_data(copy / "report.html")
    splat = data["splat"]
    assert splat["curve"] == [[p["step"], p["train_psnr"], p["test_psnr"]] for p in curve]
    assert splat["initial"] == {"psnr": 11.5, "ssim": 0.31} and splat["final"] == {"psnr": 14.5, "ssim": 0.52}
    assert splat["num_gaussians"] == 800 and [r["name"] for r in splat["renders"]] == ["view0.png", "view1.png"]
    assert all(_jpeg_size(r["thumb"]) == (400, 150) for r in splat["renders"])
    assert (copy / "report.html").stat().st_size < 150_000

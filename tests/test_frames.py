"""Video input: keyframe selection with known answers (duplicated, held and motion-blurred frames inserted into a
generated 30 fps video), resume, `recon run` on the video against ground-truth poses, and the video pairs."""

import json

import numpy as np
import pytest

from recon.cli import main
from recon.eval import relative_pose_error_deg
from recon.frames import FrameOptions, find_inputs, write_frames
from recon.synthetic import PlaneScene, PlaneSceneSpec, VideoSpec, make_plane_video

SPEC = PlaneSceneSpec(num_frames=40, width=320, height=240, focal=250.0, supersample=1, texels_per_metre=80.0,
                      arc_degrees=40.0)
VIDEO = VideoSpec(duplicates=(5, 12, 27), blurred=(8, 16, 24, 33), hold=(20, 8))


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """scene.mp4 (55 frames: 40 views, 3 duplicates, 8 more of a stalled camera, 4 blurred copies) and its truth."""
    folder = tmp_path_factory.mktemp("video")
    truth = make_plane_video(folder / "scene.mp4", SPEC, VIDEO)
    return folder / "scene.mp4", truth


@pytest.fixture(scope="module")
def selected(video, tmp_path_factory):
    out = tmp_path_factory.mktemp("frames")
    write_frames([video[0]], out, FrameOptions(target_frames=16))
    return out, json.loads((out / "frames.json").read_text())["videos"]["scene"]


def test_selection_drops_duplicates_and_blurred_frames_and_keeps_coverage(video, selected):
    _, truth = video
    out, record = selected
    assert record["num_decoded"] == len(truth) == 55
    assert [r["index"] for r in record["frames"]] == list(range(55))
    status = {r["index"]: r["status"] for r in record["frames"]}
    kept = [r["index"] for r in record["frames"] if r["status"] == "kept"]
    sources = [truth[i]["source"] for i in kept]
    # Every blurred copy is judged blurred against its neighbours (its sharpness is ~1/7 of theirs).
    assert all(status[i] == "blurred" for i, t in enumerate(truth) if t["kind"] == "blurred")
    assert sum(s == "blurred" for s in status.values()) == 4  # and no sharp frame is
    # No view twice: duplicates and the stalled camera give one keyframe per view.
    assert len(set(sources)) == len(sources)
    held = [i for i, t in enumerate(truth) if t["source"] == 20]
    assert sum(status[i] == "kept" for i in held) == 1 and sum(status[i] == "redundant" for i in held) >= 2
    # Coverage: first and last views, no gap of more than 6 views (the interval is 3.4 frames).
    assert sources[0] == 0 and sources[-1] == 39 and np.diff(sources).max() <= 6, sources
    assert 10 <= len(kept) <= 16
    files = sorted(p.relative_to(out / "frames").as_posix() for p in (out / "frames").rglob("*.jpg"))
    assert files == sorted(record["kept"])
    assert record["kept"][1] == f"scene/t{record['frames'][kept[1]]['t']:010.3f}.jpg"
    from PIL import Image

    assert Image.open(out / "frames" / record["kept"][0]).size == (320, 240)  # original resolution


def test_rerun_resumes_without_decoding(video, selected, tmp_path, monkeypatch):
    out, record = selected
    import recon.frames as frames

    monkeypatch.setattr(frames, "select_keyframes", lambda *a, **k: pytest.fail("decoded again"))
    write_frames([video[0]], out, FrameOptions(target_frames=16))
    assert json.loads((out / "frames.json").read_text())["videos"]["scene"]["kept"] == record["kept"]


def test_inputs_mixing_videos_and_photos(video, tmp_path):
    folder = tmp_path / "capture"
    (folder / "photos").mkdir(parents=True)
    (folder / "walk.mp4").write_bytes(video[0].read_bytes())
    (folder / "photos" / "a.png").write_bytes(b"")
    videos, photos = find_inputs([folder])
    assert [name for _, name in videos] == ["walk"] and [name for _, name in photos] == ["photos/a.png"]
    (folder / "walk").mkdir()
    (folder / "walk" / "b.png").write_bytes(b"")
    with pytest.raises(Exception, match="has the name of a video"):
        find_inputs([folder])


def test_recon_run_on_the_video_registers_keyframes_with_accurate_poses(video, tmp_path):
    path, truth = video
    out = tmp_path / "out"
    assert main(["run", str(path), str(out), "--frames.target-frames", "16"]) == 0
    run = json.loads((out / "run.json").read_text())
    record = run["frames"]["videos"]["scene"]
    assert run["pairs_method"] == "sequential" and run["config"]["sfm"]["camera_mode"] == "per-folder"
    import pycolmap

    model = pycolmap.Reconstruction(out / "sparse" / "0")
    posed = {im.name: im.cam_from_world() for im in model.images.values() if im.has_pose}
    assert sorted(posed) == sorted(record["kept"])
    cameras = PlaneScene.build(SPEC).cameras
    by_name = {r["file"]: cameras[truth[r["index"]]["source"]] for r in record["frames"] if r.get("file")}
    names = sorted(posed)
    errors = [relative_pose_error_deg(np.asarray(posed[a].rotation.matrix()), np.asarray(posed[a].translation),
                                      np.asarray(posed[b].rotation.matrix()), np.asarray(posed[b].translation),
                                      by_name[a].R, by_name[a].t, by_name[b].R, by_name[b].t)
              for i, a in enumerate(names) for b in names[i + 1:]]
    # Relative poses of every keyframe pair within 1 degree (rotation and translation direction), median 0.2.
    assert max(errors) < 1.0 and np.median(errors) < 0.2, (max(errors), np.median(errors))
    # Nested frame names are flat in the export, the same at every scale (gsplat pairs them by sorted order).
    exported = sorted(p.name for p in (out / "undistorted" / "images").iterdir())
    assert exported == sorted(name.replace("/", "__") for name in posed)
    for factor in (2, 4, 8):
        assert sorted(p.name for p in (out / "undistorted" / f"images_{factor}").iterdir()) == exported


def test_video_pairs_window_each_sequence_and_link_sequences_by_retrieval(selected, tmp_path):
    import shutil

    from pairs.planner import PairOptions, plan

    out, record = selected
    for sequence in ("a", "b"):
        shutil.copytree(out / "frames" / "scene", tmp_path / sequence)
    shutil.copy(out / "frames" / record["kept"][3], tmp_path / "photo.jpg")
    names = sorted(f"{s}/{n.split('/')[1]}" for s in "ab" for n in record["kept"]) + ["photo.jpg"]
    options = PairOptions(method="sequential", loop_closure=True, overlap=3, num_matched=2,
                          sequence_folders=("a", "b"))
    result = plan(tmp_path, names, options, tmp_path / "global.h5")
    folder = {n: n.split("/")[0] if "/" in n else "" for n in names}
    window = result.pairs[:result.sources["sequential"]]
    assert all(folder[x] == folder[y] != "" for x, y in window)  # no window across videos, none for the photo
    assert result.sources["between_sequences"] > 0
    crossing = [(x, y) for x, y in result.pairs if folder[x] != folder[y]]
    assert {frozenset((folder[x], folder[y])) for x, y in crossing} >= {frozenset("ab")}
    assert any("photo.jpg" in pair for pair in result.pairs)

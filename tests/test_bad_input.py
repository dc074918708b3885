"""Bad and unusual input: a corpus built here from four generated views and synthetic files.

Each kind is run through `recon` as a user would (cli.main) and checked for: exit status, one line naming the
file, no traceback, and nothing already computed lost (published HDF5 files still open and hold what they held).
Small images, SIFT with 300 keypoints: the module runs in well under a minute.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from feature_backends.errors import InputError, ReconError
from feature_backends.images import list_images, screen_image
from feature_backends.store import FeatureReader, FeatureWriter, MatchReader
from recon.cli import main

FAST = ["--max-keypoints", "300"]


@pytest.fixture(scope="module")
def views(tmp_path_factory) -> list[Path]:
    """Four overlapping generated views (640x480 PNG) of a known scene."""
    from recon.synthetic import SceneSpec, make_scene

    scene = make_scene(tmp_path_factory.mktemp("views"),
                       replace(SceneSpec(), num_frames=4))
    return sorted((scene / "images").glob("*.png"))


def _folder(path: Path, views: list[Path]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for view in views:
        shutil.copy(view, path / view.name)
    return path


def _jpeg(view: Path) -> bytes:
    buffer = io.BytesIO()
    Image.open(view).convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height (a decompression bomb as far as the header goes)."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(["run", *map(str, argv), *FAST])
    except SystemExit as exit_:  # argparse
        code = exit_.code
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, captured.err


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("recon: error:")]
    assert len(lines) == 1, err
    return lines[0]


# Files that are skipped by name with a reason; the run finishes on the good views.
SKIPPED_KINDS = {
    "zero.jpg": ("zero-byte JPEG", lambda v: b""),
    "truncated.png": ("truncated PNG", lambda v: v.read_bytes()[: len(v.read_bytes()) // 2]),
    "truncated.jpg": ("truncated JPEG", lambda v: _jpeg(v)[: len(_jpeg(v)) // 2]),
    "text.jpg": ("text named .jpg", lambda v: b"not an image\n"),
    "html.png": ("HTML page named .png", lambda v: b"<html><body>404</body></html>"),
    "header-only.png": ("PNG signature only", lambda v: b"\x89PNG\r\n\x1a\n"),
    "bomb.png": ("decompression-bomb header", lambda v: _png_declaring(60000, 60000)),
    "blank.png": ("blank frame (no features)", None),
    "tiny.png": ("1x1 image (no features)", None),
    "lenscap.jpg": ("black lens-cap shot (no features)", None),
}


def _make_skipped(folder: Path, view: Path) -> None:
    for name, (_, make) in SKIPPED_KINDS.items():
        if make is not None:
            (folder / name).write_bytes(make(view))
    Image.new("RGB", (320, 240), (128, 128, 128)).save(folder / "blank.png")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(folder / "tiny.png")
    Image.new("RGB", (320, 240), (0, 0, 0)).save(folder / "lenscap.jpg")
    os.symlink(folder / "missing-target.jpg", folder / "dangling.jpg")
    os.mkfifo(folder / "fifo.jpg")  # would block a reader forever
    (folder / "folder.jpg").mkdir()  # a folder named like an image: not an image, not skipped, just a folder
    shutil.copy(view, folder / "ünïcødé 写真.png")  # unusual but good: used


def test_bad_files_among_good_ones_are_skipped_by_name_and_the_run_finishes(views, tmp_path, capsys, caplog):
    images = _folder(tmp_path / "images", views)
    _make_skipped(images, views[0])
    code, out, err = _run(capsys, images, tmp_path / "out")
    assert code == 0, err
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    skipped = {entry["file"]: entry["reason"] for entry in record["skipped"]}
    assert set(skipped) == {*SKIPPED_KINDS, "dangling.jpg", "fifo.jpg"}
    assert skipped["blank.png"] == skipped["tiny.png"] == skipped["lenscap.jpg"] == "no features"
    assert "dangling" in skipped["dangling.jpg"] and "0 bytes" in skipped["zero.jpg"]
    assert "Mpx limit" in skipped["bomb.png"] and "truncated" in skipped["truncated.jpg"]
    assert record["result"]["num_registered"] == 5 and skipped["fifo.jpg"] == "not a file"
    assert "skipped      12:" in out and all(name in out for name in ("zero.jpg", "blank.png"))
    # each skipped file is named in exactly one warning line, and no skipped file reaches the pairs
    for name in skipped:
        assert sum(name in r.getMessage() for r in caplog.records if r.levelname == "WARNING") == 1, name
    pairs = (tmp_path / "out" / "pairs.txt").read_text()
    assert not any(name in pairs for name in skipped) and len(pairs.splitlines()) == 10


def test_a_folder_where_nothing_can_be_matched_ends_with_a_message(views, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (64, 48), (128, 128, 128)).save(images / "blank.png")
    Image.new("RGB", (64, 48), (0, 0, 0)).save(images / "lenscap.png")
    (images / "zero.jpg").write_bytes(b"")
    code, _, err = _run(capsys, images, tmp_path / "out")
    line = _error_line(err)
    assert code == 2 and "SfM needs at least two views" in line and "blank.png (no features)" in line

    single = _folder(tmp_path / "single", views[:1])
    code, _, err = _run(capsys, single, tmp_path / "out1")
    assert code == 2 and "SfM needs at least two views, and 1 usable image(s) remain" in _error_line(err)


def test_screening_names_each_reason(tmp_path, views):
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "bomb.png").write_bytes(_png_declaring(60000, 60000))
    (tmp_path / "cut.png").write_bytes(views[0].read_bytes()[:500])
    assert screen_image(tmp_path / "zero.jpg") == "empty file (0 bytes)"
    assert screen_image(tmp_path / "bomb.png").startswith("declared size 60000x60000")
    assert screen_image(tmp_path / "cut.png") is None  # the header is intact: caught when decoded
    assert "truncated" in screen_image(tmp_path / "cut.png", decode=True)
    assert screen_image(views[0], decode=True) is None


def test_pair_key_collision_is_refused_naming_both(views, tmp_path, capsys):
    images = _folder(tmp_path / "images", views)
    (images / "a").mkdir()
    shutil.copy(views[0], images / "a" / "x.png")
    shutil.copy(views[1], images / "a-x.png")
    code, _, err = _run(capsys, images, tmp_path / "out")
    line = _error_line(err)
    assert code == 2 and "'a-x.png'" in line and "'a/x.png'" in line and "rename one" in line
    assert not (tmp_path / "out" / "features.h5").exists()  # refused before any work


def test_symlink_loop_lists_each_real_file_once_and_warns(views, tmp_path, caplog):
    images = _folder(tmp_path / "images", views)
    (images / "sub").mkdir()
    shutil.copy(views[0], images / "sub" / "extra.png")
    os.symlink("..", images / "sub" / "loop")  # sub/loop -> images: a loop
    os.symlink("sub", images / "again")  # a second link to a folder already listed
    os.symlink(views[1].name, images / "link-to-view.png")  # a second name for a file already listed
    names = list_images(images)
    assert names == sorted([v.name for v in views] + ["sub/extra.png"])
    warning = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warning) == 1 and "sub/loop" in warning[0] and "again" in warning[0]


def _hold_lock(out: Path, seconds: float) -> subprocess.Popen:
    """Another process holding OUT's lock for `seconds` (it prints 'held' once it has it)."""
    code = (f"import sys, time; from recon.lock import OutputLock\n"
            f"with OutputLock(sys.argv[1]):\n    print('held', flush=True); time.sleep({seconds})")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_second_run_on_the_same_output_refuses_naming_the_pid_or_waits(views, tmp_path, capsys):
    images = _folder(tmp_path / "images", views)
    out = tmp_path / "out"
    out.mkdir()
    holder = _hold_lock(out, 60)
    code, _, err = _run(capsys, images, out)
    assert code == 2 and f"in use by another recon run (PID {holder.pid})" in _error_line(err)
    assert "--wait" in err and not (out / "features.h5").exists()
    holder.kill()  # kill -9: the kernel releases the lock
    holder.wait()
    holder = _hold_lock(out, 1.0)
    code, _, err = _run(capsys, images, out, "--wait")
    assert code == 0 and holder.wait() == 0 and (out / "run.json").is_file()


def test_matches_made_from_other_features_are_recomputed_or_refused(views, tmp_path, capsys, caplog):
    from recon.extract import extract
    from recon.match import match
    from recon.pairs import plan_pairs
    from recon.sfm.database import check_matches_fit

    images = _folder(tmp_path / "images", views)
    features, matches, pairs = tmp_path / "features.h5", tmp_path / "matches.h5", tmp_path / "pairs.txt"
    plan_pairs(images, pairs)
    extract({"name": "sift", "max_keypoints": 300}, images, features)
    match("mnn", pairs, features, matches)
    stale_features = tmp_path / "stale.h5"
    shutil.copy(features, stale_features)
    features.unlink()  # recon's own advice after a change of configuration: recompute the features
    extract({"name": "sift", "max_keypoints": 200}, images, features)
    with pytest.raises(InputError, match=r"made from other features .* for 4 image\(s\).*rerun the match stage"):
        check_matches_fit(features, matches, [v.name for v in views])  # what the SfM import does first
    match("mnn", pairs, features, matches)  # every stored pair of a changed image is recomputed
    assert "Recomputing the stored pairs of 4 image(s)" in caplog.text
    check_matches_fit(features, matches, [v.name for v in views])
    with FeatureReader(features) as reader, MatchReader(matches) as stored:
        for name0, name1 in [line.split() for line in pairs.read_text().splitlines()]:
            found, _ = stored.read(name0, name1)
            assert len(found) > 0 and found[:, 0].max() < 200 and found[:, 1].max() < 200
            assert stored.feature_fingerprints()[name0] == reader.fingerprint(name0)


def test_output_path_that_is_a_file_or_not_writable_is_one_line(views, tmp_path, capsys, monkeypatch):
    images = _folder(tmp_path / "images", views[:2])
    (tmp_path / "out.txt").write_text("keep me")
    code, _, err = _run(capsys, images, tmp_path / "out.txt")
    assert code == 2 and "'" + str(tmp_path / "out.txt") + "' is an existing file" in _error_line(err)
    assert (tmp_path / "out.txt").read_text() == "keep me"

    def read_only(self, data):  # root ignores permission bits: refuse the way a read-only mount does
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "write_bytes", read_only)
    code, _, err = _run(capsys, images, tmp_path / "ro")
    assert code == 2 and "cannot write to output folder" in _error_line(err) and "Read-only" in err


def _features(path: Path, names: list[str]) -> None:
    with FeatureWriter(path) as writer:
        for index, name in enumerate(names):
            count = 5 + index
            writer.write(name, {"keypoints": np.full((count, 2), index, np.float32),
                                "descriptors": np.zeros((4, count), np.float32), "scores": np.ones(count, np.float32),
                                "image_size": np.array([64, 48])})


def _disk_full_after(monkeypatch, calls: int) -> None:
    """h5py's dataset creation raises ENOSPC after `calls` successful calls (a writer failing mid-file)."""
    import h5py

    original, count = h5py.Group.create_dataset, [0]

    def create_dataset(self, *args, **kwargs):
        count[0] += 1
        if count[0] > calls:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", create_dataset)


@pytest.mark.parametrize("where", ["mid-file", "at publication"])
def test_disk_full_while_writing_leaves_the_published_file_intact(tmp_path, monkeypatch, where):
    import h5py

    path = tmp_path / "features.h5"
    _features(path, ["a.png", "b.png"])
    before = path.read_bytes()
    if where == "mid-file":
        _disk_full_after(monkeypatch, 5)  # image c's datasets fit, d's second one does not
    else:
        monkeypatch.setattr(h5py.File, "flush", lambda self: (_ for _ in ()).throw(
            OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(ReconError, match=r"the disk is full while writing .*features.h5'; .* still holds what it "
                                         r"held before; free space and run again to resume") as raised:
        with FeatureWriter(path) as writer:
            for name in ["c.png", "d.png"]:
                writer.write(name, {"keypoints": np.zeros((3, 2), np.float32), "descriptors": np.zeros((4, 3)),
                                    "scores": np.ones(3), "image_size": np.array([64, 48])})
    monkeypatch.undo()
    assert raised.value.exit_code == 2
    assert path.read_bytes() == before and not path.with_name("features.h5.partial").exists()
    with FeatureReader(path) as reader:
        assert reader.names() == ["a.png", "b.png"] and len(reader.read_keypoints("b.png")) == 6


def test_disk_full_during_extraction_is_one_line_and_keeps_the_features(views, tmp_path, capsys, monkeypatch):
    images = _folder(tmp_path / "images", views)
    out = tmp_path / "features.h5"
    assert main(["extract", str(images), str(out), "--max-keypoints", "100"]) == 0
    (images / "more.png").write_bytes(views[0].read_bytes())
    _disk_full_after(monkeypatch, 2)
    code = main(["extract", str(images), str(out), "--max-keypoints", "100"])
    err = capsys.readouterr().err
    monkeypatch.undo()
    assert code == 2 and "Traceback" not in err and "the disk is full while writing" in _error_line(err)
    with FeatureReader(out) as reader:
        assert reader.names() == [v.name for v in views]


def test_names_with_spaces_run_through_every_stage(views, tmp_path, capsys):
    from pairs.io import read_pairs, write_pairs

    pairs = [("IMG 0001.JPG", "b.jpg"), ("it's.png", "tab\tname.png"), ("#1.png", 'say "x".png')]
    write_pairs(tmp_path / "pairs.txt", pairs)
    assert read_pairs(tmp_path / "pairs.txt") == pairs
    assert (tmp_path / "pairs.txt").read_text().splitlines()[0] == "'IMG 0001.JPG' b.jpg"

    images = _folder(tmp_path / "images", views[1:])
    shutil.copy(views[0], images / "IMG 0001.png")
    (images / "sub dir").mkdir()
    shutil.copy(views[1], images / "sub dir" / "IMG 0002.png")
    code, out, err = _run(capsys, images, tmp_path / "out")
    assert code == 0, err
    import pycolmap

    model = pycolmap.Reconstruction(tmp_path / "out" / "sparse" / "0")
    assert {"IMG 0001.png", "sub dir/IMG 0002.png"} <= {image.name for image in model.images.values()}
    assert model.num_reg_images() == 5
    assert (tmp_path / "out" / "undistorted" / "images" / "IMG 0001.png").is_file()


def _published(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in ("features.h5", "matches.h5", "pairs.txt")}


@pytest.fixture(scope="module")
def finished(views, tmp_path_factory) -> tuple[Path, Path]:
    """(image folder, OUT) of a finished run, for the refusals that must not touch it."""
    root = tmp_path_factory.mktemp("finished")
    images = _folder(root / "images", views)
    assert main(["run", str(images), str(root / "out"), *FAST]) == 0
    return images, root / "out"


REFUSALS = {
    # kind: (argv after 'recon', exit code, text of the one error line; {images} {out} {tmp} filled in)
    "missing image folder": (["run", "{tmp}/nope", "{out}"], 2, "'{tmp}/nope' does not exist"),
    "folder without images": (["run", "{tmp}/docs", "{out}"], 2, "no images found in '{tmp}/docs'"),
    "option of the wrong type": (["run", "{images}", "{out}", "--max-keypoints", "many"], 2,
                                 "max-keypoints: invalid int value: 'many'"),
    "unknown option value": (["run", "{images}", "{out}", "--features", "siftt"], 2, "siftt"),
    "image list naming a missing file": (["run", "{images}", "{out}", "--image-list", "{tmp}/list.txt"], 2,
                                         "1 listed images are not in"),
    "pairs file naming an unknown image": (["match", "{tmp}/pairs.txt", "{out}/features.h5", "{tmp}/m.h5"], 2,
                                           "names 1 unknown images, e.g. ['ghost.png']"),
    "corrupt features file": (["match", "{out}/pairs.txt", "{tmp}/corrupt.h5", "{tmp}/m.h5"], 1,
                              "'{tmp}/corrupt.h5' is not a readable HDF5 file"),
    "sfm before matching": (["sfm", "{images}", "{tmp}/fresh", "--features", "{out}/features.h5"], 2,
                            "{tmp}/fresh/pairs.txt: no such file; the SfM stage needs its pairs (make them with "
                            "`recon pairs`, or give the file with --pairs)"),
}


@pytest.mark.parametrize("kind", list(REFUSALS))
def test_refusals_are_one_line_and_lose_nothing(kind, finished, tmp_path, capsys):
    images, out = finished
    before = _published(out)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("no images here")
    (tmp_path / "list.txt").write_text("camera000001_frame000000.png\nmissing.png\n")
    (tmp_path / "pairs.txt").write_text("camera000001_frame000000.png ghost.png\n")
    (tmp_path / "corrupt.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    argv, expected_code, text = REFUSALS[kind]
    fill = {"images": str(images), "out": str(out), "tmp": str(tmp_path)}
    try:
        code = main([arg.format(**fill) for arg in argv])
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert "Traceback" not in err and code == expected_code
    lines = [line for line in err.splitlines() if line.startswith("recon: error:")]
    assert len(lines) == 1 and text.format(**fill) in lines[0], err
    assert _published(out) == before
    assert (tmp_path / "corrupt.h5").read_bytes().startswith(b"\x89HDF")  # a corrupt input is never overwritten
    with FeatureReader(out / "features.h5") as reader:
        assert len(reader.names()) == 4


def test_recon_match_with_a_featureless_image_writes_empty_matches(views, tmp_path):
    from recon.extract import extract
    from recon.match import match

    images = _folder(tmp_path / "images", views[:2])
    Image.new("RGB", (64, 48), (90, 90, 90)).save(images / "blank.png")
    extract({"name": "sift", "max_keypoints": 300}, images, tmp_path / "f.h5")
    (tmp_path / "pairs.txt").write_text(f"blank.png {views[0].name}\n{views[0].name} blank.png\n"
                                        f"{views[0].name} {views[1].name}\n")
    match("mnn", tmp_path / "pairs.txt", tmp_path / "f.h5", tmp_path / "m.h5")
    with MatchReader(tmp_path / "m.h5") as reader:
        assert len(reader.read("blank.png", views[0].name)[0]) == 0
        assert len(reader.read(views[0].name, "blank.png")[0]) == 0
        assert len(reader.read(views[0].name, views[1].name)[0]) > 50


def test_recon_extract_alone_skips_an_empty_file_and_a_bomb(views, tmp_path, capsys):
    images = _folder(tmp_path / "images", views[:2])
    (images / "zero.jpg").write_bytes(b"")
    (images / "bomb.png").write_bytes(_png_declaring(60000, 60000))
    assert main(["extract", str(images), str(tmp_path / "f.h5"), "--max-keypoints", "50"]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    with FeatureReader(tmp_path / "f.h5") as reader:
        assert reader.names() == [v.name for v in views[:2]]

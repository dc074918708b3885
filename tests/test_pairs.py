"""The pair planner on generated inputs with known answers: COLMAP's sequential window and loop detection,
retrieval with lists / similarity floor / per-image cap / symmetric de-duplication, EXIF-GPS spatial pairs and the
GPS prior on retrieval, per-source counts in pairs-stats.json, and the `recon pairs` command."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from PIL.TiffImagePlugin import IFDRational

from feature_backends import registry
from feature_backends.base import GlobalDescriptor
from feature_backends.errors import InputError
from pairs.io import read_pairs
from pairs.planner import PairOptions, plan, write_plan
from pairs.retrieval import cap_per_image, retrieve
from pairs.sequential import loop_frames, sequential_pairs
from pairs.spatial import ecef, read_gps, spatial_neighbours


class AngleDescriptor(GlobalDescriptor):
    """Test backend: an image's appearance is an angle encoded in its colour; the descriptor is (cos, sin)."""

    def describe(self, image: np.ndarray) -> np.ndarray:
        red, green = image[..., 0].mean() - 0.5, image[..., 1].mean() - 0.5
        angle = math.atan2(green, red)
        return np.array([math.cos(angle), math.sin(angle)], np.float32)


@pytest.fixture(autouse=True)
def angle_backend(monkeypatch):
    monkeypatch.setitem(registry.BACKENDS["global"], "angle", f"{__name__}:AngleDescriptor")


def _dms(value: float) -> tuple[IFDRational, IFDRational, IFDRational]:
    value = abs(value)
    degrees = int(value)
    minutes = int((value - degrees) * 60)
    seconds = (value - degrees - minutes / 60) * 3600
    return IFDRational(degrees, 1), IFDRational(minutes, 1), IFDRational(round(seconds * 10000), 10000)


def make_image(path: Path, angle: float, gps: tuple[float, float] | None = None) -> None:
    colour = tuple(int(round(255 * v)) for v in (0.5 + 0.4 * math.cos(angle), 0.5 + 0.4 * math.sin(angle), 0.5))
    image = Image.new("RGB", (16, 16), colour)
    exif = Image.Exif()
    if gps is not None:
        latitude, longitude = gps
        exif.get_ifd(0x8825).update({1: "N" if latitude >= 0 else "S", 2: _dms(latitude),
                                     3: "E" if longitude >= 0 else "W", 4: _dms(longitude)})
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, exif=exif, quality=100)


def colmap_sequential_reference(frames: list[str], overlap: int, quadratic: bool) -> set[tuple[str, str]]:
    """COLMAP's SequentialPairGenerator::Next, transcribed loop for loop as the known answer."""
    pairs = set()
    for i in range(len(frames)):
        for k in range(overlap):
            j = i + k + 1
            if j >= len(frames):
                break
            pairs.add((frames[i], frames[j]))
            if quadratic and i + 2**k < len(frames):
                pairs.add((frames[i], frames[i + 2**k]))
    return pairs


# ---------------------------------------------------------------- sequential


@pytest.mark.parametrize("overlap,quadratic,expected", [(3, False, 17 + 18 + 19), (5, True, 101)])
def test_sequential_window_is_colmaps(overlap, quadratic, expected):
    frames = [f"frame{i}.jpg" for i in range(1, 21)]  # unpadded: natural order, not string order
    shuffled = list(np.random.default_rng(0).permutation(frames))
    pairs = sequential_pairs(shuffled, overlap, quadratic, loop_candidates=None)
    assert len(pairs) == expected
    assert set(pairs) == colmap_sequential_reference(frames, overlap, quadratic)


def test_sequential_per_folder_keeps_cameras_apart():
    names = [f"cam{c}/{i:04d}.jpg" for c in range(2) for i in range(10)]
    pairs = sequential_pairs(names, overlap=2, quadratic=False)
    assert len(pairs) == 2 * (9 + 8)
    assert all(a.split("/")[0] == b.split("/")[0] for a, b in pairs)
    assert loop_frames(names, 4) == ["cam0/0000.jpg", "cam0/0004.jpg", "cam0/0008.jpg",
                                     "cam1/0000.jpg", "cam1/0004.jpg", "cam1/0008.jpg"]


def test_sequential_loop_closure_finds_the_revisit(tmp_path):
    """Two laps of a 40-frame circuit: frame f and f+40 look the same. With loop detection every 10 frames and one
    retrieval neighbour, exactly the 4 revisits (0,40) (10,50) (20,60) (30,70) are added to the window pairs."""
    images = tmp_path / "video"
    for i in range(80):
        make_image(images / f"{i:03d}.png", 2 * math.pi * i / 40)
    names = sorted(p.name for p in images.iterdir())
    options = PairOptions(method="sequential", overlap=3, quadratic_overlap=False, loop_closure=True,
                          loop_every=10, num_matched=1)
    result = plan(images, names, replace(options, retrieval="angle"), tmp_path / "global-feats.h5")
    window = colmap_sequential_reference(names, 3, False)
    loops = {tuple(sorted(pair)) for pair in result.pairs} - {tuple(sorted(pair)) for pair in window}
    assert loops == {("000.png", "040.png"), ("010.png", "050.png"), ("020.png", "060.png"), ("030.png", "070.png")}
    assert result.sources == {"sequential": 79 + 78 + 77, "loop_closure": 4}
    assert result.details["loop_closure"]["queries"] == 8

    write_plan(result, tmp_path / "pairs.txt")
    stats = json.loads((tmp_path / "pairs-stats.json").read_text())
    assert stats["num_pairs"] == len(read_pairs(tmp_path / "pairs.txt")) == 234 + 4
    assert stats["pairs_by_source"] == {"sequential": 234, "loop_closure": 4}


# ---------------------------------------------------------------- retrieval


def _ring(count: int = 12) -> tuple[list[str], np.ndarray]:
    """Images on a circle with distinct gaps, so every nearest neighbour is unambiguous."""
    gaps = np.linspace(0.4, 0.6, count)  # any gap < the sum of two: ring neighbours are nearest
    angles = np.cumsum(gaps) * (2 * math.pi / gaps.sum())
    names = [f"img{i:02d}.jpg" for i in range(count)]
    return names, np.stack([np.cos(angles), np.sin(angles)], 1).astype(np.float32)


def test_retrieval_topk_dedup_floor_and_cap():
    names, desc = _ring()
    scored = retrieve(names, desc, names, desc, 2)
    assert len(scored) == 24 and all(a != b for a, b, _ in scored)
    ring_edges = {tuple(sorted((names[i], names[(i + 1) % 12]))) for i in range(12)}
    unique = cap_per_image(scored, None)
    assert {tuple(sorted(p[:2])) for p in unique} == ring_edges  # both directions retrieved, each kept once

    threshold = float(np.median([s for _, _, s in unique]))
    floored = retrieve(names, desc, names, desc, 2, min_score=threshold)
    assert all(s >= threshold for _, _, s in floored)
    assert len(cap_per_image(floored, None)) == sum(s >= threshold for _, _, s in unique)

    capped = cap_per_image(scored, 1)
    degree = {name: sum(name in p[:2] for p in capped) for name in names}
    assert max(degree.values()) == 1
    assert len(capped) == 6  # a perfect matching exists on an even ring and greedy-by-similarity finds one here
    with pytest.raises(InputError):
        cap_per_image(scored, 0)


def test_retrieval_query_and_database_lists(tmp_path):
    images = tmp_path / "images"
    for i in range(12):
        make_image(images / f"img{i:02d}.jpg", 2 * math.pi * i / 12 + 0.01 * i)
    names = sorted(p.name for p in images.iterdir())
    queries, database = names[:3], names[6:]
    options = PairOptions(method="retrieval", num_matched=2, query_list=queries, database_list=database)
    result = plan(images, names, replace(options, retrieval="angle"), tmp_path / "g.h5")
    assert len(result.pairs) == 6
    assert all(a in queries and b in database for a, b in result.pairs)
    with pytest.raises(InputError, match="not in the collection"):
        plan(images, names, PairOptions(method="retrieval", query_list=["nope.jpg"], retrieval="angle"),
             tmp_path / "g.h5")


# ---------------------------------------------------------------- GPS


def test_read_gps_and_ecef_distance(tmp_path):
    make_image(tmp_path / "s.jpg", 0.0, gps=(-33.8598, -70.5))
    latitude, longitude, altitude = read_gps(tmp_path / "s.jpg")
    assert abs(latitude + 33.8598) < 1e-6 and abs(longitude + 70.5) < 1e-6 and altitude is None
    make_image(tmp_path / "none.jpg", 0.0)
    assert read_gps(tmp_path / "none.jpg") is None
    # 0.001° of latitude at 48.85° N is 111.2 m on the WGS84 ellipsoid
    assert abs(np.linalg.norm(ecef(48.851, 2.35) - ecef(48.85, 2.35)) - 111.2) < 0.3


def _two_towns(folder: Path) -> list[str]:
    """Town A and town B, 5 km apart; image i of each town looks the same (repeated façades); two images carry no
    GPS. In each town, images are 0, 10, 25, 45, 70 m along a street (gaps grow, so nearest neighbours are
    unambiguous)."""
    metres_per_degree = 111_200.0
    for town, base in (("a", 48.85), ("b", 48.85 + 5000 / metres_per_degree)):
        for i, offset in enumerate((0, 10, 25, 45, 70)):
            make_image(folder / f"{town}{i}.jpg", 0.4 * i, gps=(base + offset / metres_per_degree, 2.35))
    make_image(folder / "x0.jpg", 0.2)
    make_image(folder / "x1.jpg", 3.0)
    return sorted(p.name for p in folder.iterdir())


def test_spatial_pairs_within_radius_and_k_nearest(tmp_path):
    names = _two_towns(tmp_path / "images")
    result = plan(tmp_path / "images", names, PairOptions(method="spatial", spatial_max_distance=100),
                  tmp_path / "g.h5")
    assert {tuple(sorted(p)) for p in result.pairs} == {
        (f"{t}{i}.jpg", f"{t}{j}.jpg") for t in "ab" for i in range(5) for j in range(i + 1, 5)}
    assert result.details["images_with_gps"] == 10
    assert result.stats()["images_without_pairs"] == 2  # x0, x1 have no position

    near = plan(tmp_path / "images", names, PairOptions(method="spatial", spatial_max_distance=30,
                                                        spatial_max_neighbors=1), tmp_path / "g.h5")
    # nearest within 30 m: a0→a1 (10 m), a1→a0, a2→a1 (15 m), a3→a2 (20 m), a4→a3 (25 m)
    assert {tuple(sorted(p)) for p in near.pairs} == {
        (f"{t}{i}.jpg", f"{t}{j}.jpg") for t in "ab" for i, j in ((0, 1), (1, 2), (2, 3), (3, 4))}


def test_gps_prior_restricts_retrieval(tmp_path):
    names = _two_towns(tmp_path / "images")
    free = plan(tmp_path / "images", names, PairOptions(method="retrieval", num_matched=1, retrieval="angle"),
                tmp_path / "g.h5")
    twins = {(f"a{i}.jpg", f"b{i}.jpg") for i in range(5)}
    assert twins <= {tuple(sorted(p)) for p in free.pairs}  # appearance alone pairs the look-alike towns

    prior = plan(tmp_path / "images", names, PairOptions(method="retrieval", num_matched=1, gps_prior=True,
                                                         retrieval="angle"), tmp_path / "g.h5")
    pairs = {tuple(sorted(p)) for p in prior.pairs}
    assert not pairs & twins
    assert all(a[0] == b[0] or "x" in (a[0], b[0]) for a, b in pairs)  # same town, or an image without GPS
    assert any("x" in (a[0], b[0]) for a, b in pairs)  # images without GPS were not excluded

    loops = PairOptions(method="sequential", overlap=1, loop_closure=True, loop_every=1, num_matched=1)
    free = plan(tmp_path / "images", names, replace(loops, retrieval="angle"), tmp_path / "g.h5")
    assert twins <= {tuple(sorted(p)) for p in free.pairs}
    prior = plan(tmp_path / "images", names, replace(loops, retrieval="angle", gps_prior=True), tmp_path / "g.h5")
    assert not {tuple(sorted(p)) for p in prior.pairs} & twins  # the prior applies to loop closure as well


def test_neighbours_radius_and_minimum():
    positions = {f"p{i}": np.array([d, 0.0, 0.0]) for i, d in enumerate((0, 10, 200, 500))}
    assert spatial_neighbours(positions, 5, 100)["p0"] == ["p1"]
    assert spatial_neighbours(positions, 5, 100, min_neighbors=2)["p0"] == ["p1", "p2"]
    assert spatial_neighbours(positions, 5, 100)["p3"] == []


# ---------------------------------------------------------------- planner + CLI


def test_exhaustive_counts_and_cli(tmp_path, capsys):
    from recon.cli import main

    images = tmp_path / "images"
    for i in range(9):
        make_image(images / f"{i}.jpg", 0.5 * i)
    assert main(["pairs", str(images), str(tmp_path / "ex.txt"), "--method", "exhaustive"]) == 0
    assert len(read_pairs(tmp_path / "ex.txt")) == 36
    assert json.loads((tmp_path / "ex-stats.json").read_text())["pairs_by_source"] == {"exhaustive": 36}

    (tmp_path / "queries.txt").write_text("0.jpg\n# comment\n\n1.jpg\n")
    argv = ["pairs", str(images), str(tmp_path / "r.txt"), "--method", "retrieval", "--retrieval", "angle",
            "--num-matched", "3", "--query-list", str(tmp_path / "queries.txt"), "--max-pairs-per-image", "2"]
    assert main(argv) == 0
    pairs = read_pairs(tmp_path / "r.txt")
    stats = json.loads((tmp_path / "r-stats.json").read_text())
    assert stats["num_pairs"] == len(pairs) == stats["pairs_by_source"]["retrieval"]
    assert stats["retrieval"]["candidates"] == 6 and stats["pairs_per_image"]["max"] <= 2
    assert all({"0.jpg", "1.jpg"} & {a, b} for a, b in pairs)
    assert "pairs (retrieval)" in capsys.readouterr().out

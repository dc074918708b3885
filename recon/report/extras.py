"""The report's match visualisations (a few pairs with their match lines) and `recon splat`'s results.

Pairs shown: the strongest and the weakest verified pair (inliers in the COLMAP database's two_view_geometries),
and up to two rejected pairs (raw matches, no verified geometry; those with most raw matches, the most puzzling
ones). Lines join keypoints in thumbnail pixels: the inliers of a verified pair (indices into the database's
keypoints, as COLMAP verified them), the raw matches of a rejected one (matches.h5 on features.h5's keypoints, or
the database's `matches` table when matches.h5 is absent), at most `max_lines` of them (uniform subsample, fixed
seed). The page draws them as SVG over the two thumbnails, so the size per pair is two small JPEGs and ~100 lines.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np

from feature_backends.store import FeatureReader, MatchReader

from .data import _PAIR_ID_FACTOR, Sources, encode_thumbnail


def choose_pairs(verified: dict[tuple[str, str], int], raw: dict[tuple[str, str], int],
                 max_rejected: int = 2) -> list[tuple[str, tuple[str, str], int]]:
    """[(kind, pair, count)]: the strongest and weakest verified pairs (by inliers), then the rejected pairs
    with most raw matches (count = raw matches). Ties are broken by name so the choice is stable."""
    chosen = []
    if verified:
        ranked = sorted(verified.items(), key=lambda item: (-item[1], item[0]))
        chosen.append(("strongest", *ranked[0]))
        if len(ranked) > 1:
            chosen.append(("weakest", *ranked[-1]))
    rejected = sorted(((pair, n) for pair, n in raw.items() if pair not in verified and n > 0),
                      key=lambda item: (-item[1], item[0]))
    chosen += [("rejected", pair, n) for pair, n in rejected[:max_rejected]]
    return chosen


def match_pairs(sources: Sources, verified: dict, raw: dict, size: int, max_lines: int = 100,
                draw: bool = True) -> list[dict]:
    """The chosen pairs with their counts, and (when `draw` and the images are found) thumbnails and lines."""
    if sources.database is None:
        return []
    shown = []
    with sqlite3.connect(f"file:{sources.database}?mode=ro", uri=True) as db:
        ids = {name: image_id for image_id, name in db.execute("SELECT image_id, name FROM images")}
        for kind, (name0, name1), count in choose_pairs(verified, raw):
            entry = {"kind": kind, "name0": name0, "name1": name1,
                     "inliers": count if kind != "rejected" else 0, "matches": raw.get((name0, name1), 0)}
            if kind == "rejected":
                points0, points1 = _raw_matches(sources, db, ids, name0, name1)
            else:
                points0, points1 = _db_matches(db, ids, name0, name1, "two_view_geometries")
            entry["lines_total"] = len(points0)
            if draw and sources.image_dir is not None:
                entry.update(_drawn(sources.image_dir, name0, name1, points0, points1, size, max_lines))
            shown.append(entry)
    return shown


def _db_keypoints(db: sqlite3.Connection, image_id: int) -> np.ndarray:
    rows, cols, data = db.execute("SELECT rows, cols, data FROM keypoints WHERE image_id=?", (image_id,)).fetchone()
    return np.frombuffer(data, np.float32).reshape(rows, cols)[:, :2] if rows else np.zeros((0, 2), np.float32)


def _db_matches(db, ids: dict, name0: str, name1: str, table: str) -> tuple[np.ndarray, np.ndarray]:
    """Matched keypoint positions of a pair from the database (`matches` or `two_view_geometries`)."""
    id0, id1 = ids[name0], ids[name1]
    pair_id = min(id0, id1) * _PAIR_ID_FACTOR + max(id0, id1)
    row = db.execute(f"SELECT rows, data FROM {table} WHERE pair_id=?", (pair_id,)).fetchone()  # noqa: S608
    if row is None or not row[0]:
        return np.zeros((0, 2)), np.zeros((0, 2))
    indices = np.frombuffer(row[1], np.uint32).reshape(row[0], 2)
    if id0 > id1:  # stored from the smaller image id's side
        indices = indices[:, ::-1]
    return _db_keypoints(db, id0)[indices[:, 0]], _db_keypoints(db, id1)[indices[:, 1]]


def _raw_matches(sources: Sources, db, ids: dict, name0: str, name1: str) -> tuple[np.ndarray, np.ndarray]:
    """A pair's raw matches from matches.h5 on features.h5's keypoints (the database's when absent)."""
    matches_path = sources.out_dir / "matches.h5"
    if sources.features is None or not matches_path.is_file():
        return _db_matches(db, ids, name0, name1, "matches")
    with MatchReader(matches_path) as reader:
        if not reader.has(name0, name1):
            return _db_matches(db, ids, name0, name1, "matches")
        matches, _ = reader.read(name0, name1)
    with FeatureReader(sources.features) as features:
        return features.read_keypoints(name0)[matches[:, 0]], features.read_keypoints(name1)[matches[:, 1]]


def _drawn(image_dir: Path, name0: str, name1: str, points0, points1, size: int, max_lines: int) -> dict:
    """Thumbnails of both views and at most `max_lines` lines [x0, y0, x1, y1] in thumbnail pixels."""
    encoded = [encode_thumbnail(image_dir / name, size, quality=60) for name in (name0, name1)]
    if None in encoded:
        return {}
    keep = np.arange(len(points0))
    if len(keep) > max_lines:
        keep = np.sort(np.random.default_rng(0).choice(len(keep), max_lines, replace=False))
    lines = np.hstack([np.asarray(points0)[keep] * encoded[0][1], np.asarray(points1)[keep] * encoded[1][1]])
    return {"thumb0": encoded[0][0], "thumb1": encoded[1][0], "lines": np.round(lines, 1).tolist()}


def splat_results(out_dir: Path, size: int, max_renders: int = 8, draw: bool = True) -> dict | None:
    """`recon splat`'s held-out curve (PSNR per evaluated step; SSIM at the start and the end, the only steps
    where it is measured) and its render thumbnails (ground truth | render), or None without splats/metrics.json."""
    splat_dir = out_dir / "splats"
    path = splat_dir / "metrics.json"
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text())
    initial = (metrics.get("initial") or {}).get("test") or {}
    final = (metrics.get("final") or {}).get("test") or {}
    curve = [[p["step"], p.get("train_psnr"), p.get("test_psnr")] for p in metrics.get("curve", [])]
    renders = []
    for render in sorted((splat_dir / "renders").glob("*.png"))[:max_renders]:
        encoded = encode_thumbnail(render, size) if draw else None
        renders.append({"name": render.name, "thumb": encoded[0] if encoded else None})
    return {"curve": curve, "initial": {k: initial.get(k) for k in ("psnr", "ssim")},
            "final": {k: final.get(k) for k in ("psnr", "ssim")}, "iterations": metrics.get("iterations"),
            "num_gaussians": (metrics.get("final") or {}).get("num_gaussians"), "backend": metrics.get("backend"),
            "train_seconds": metrics.get("train_seconds"), "renders": renders}

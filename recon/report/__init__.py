"""The report stage: OUT/report.html, one self-contained page that says why each view registered or not.

`write_report(out_dir, options)` reads only the folder's files (recon's layout, or hloc's: features.h5,
pairs.txt, a COLMAP database, sparse/N or a model in sfm/), computes each view's reason (recon.report.data), and
writes one HTML file with the data embedded as JSON (`<script id="report-data" type="application/json">`, which
tests and other tools parse) and its own small renderer inlined (report.js, report.css: tables, SVG histograms,
a canvas pair matrix or graph, a canvas 3D view with orbit controls). It opens offline, with no CDN.

Why our own ~300 lines of JavaScript rather than plotly.js or three.js: plotly's bundled plotly.min.js is about
4.6 MB and three.js needs a module loader or an inlined build of ~650 KB; a report of a 20-image scene would be
almost all library. The page needs a point cloud with frusta, two histograms and a matrix, which a canvas draws
directly. Size is bounded by `max_points` (uniform subsample, fixed seed), `max_edges` (strongest pairs) and
`thumbnail_size`; on 1,000 views thumbnails dominate (~3 KB each). The match visualisations (recon.report.extras:
at most 4 pairs, two JPEGs and `max_match_lines` lines each) and `recon splat`'s renders add a fixed ~0.1 MB.
"""

from __future__ import annotations

import html
import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from feature_backends.errors import InputError

from ..options import option
from .data import REASONS, Sources, components, histogram, read_keypoint_counts, read_models, read_pair_counts, \
    read_verified_pairs, thumbnail, view_reasons, _list_image_dir
from .extras import match_pairs, splat_results

__all__ = ["ReportOptions", "REASONS", "collect", "write_report", "read_report_data"]

_HERE = Path(__file__).parent


@dataclass
class ReportOptions:
    max_points: int = option(20000, help="3D points shown in the report at most (uniform subsample above)")
    max_edges: int = option(20000, help="verified pairs drawn in the pair graph at most (the strongest kept)")
    thumbnails: bool = option(True, help="embed a small JPEG of every view")
    thumbnail_size: int = option(96, help="longer side of the thumbnails in pixels")
    matrix_max_views: int = option(80, help="draw the pair graph as a matrix up to this many views, a graph above")
    pair_thumbnail_size: int = option(200, help="longer side of each view in the match visualisations (pixels)")
    max_match_lines: int = option(100, help="match lines drawn per visualised pair at most (uniform subsample)")


def collect(out_dir: str | Path, options: ReportOptions | None = None, image_dir: str | Path | None = None) -> dict:
    """Everything the page shows, as plain JSON-able data (also what tests read back)."""
    options = options or ReportOptions()
    sources = Sources.find(out_dir, image_dir)
    if sources.features is None and not sources.models:
        raise InputError(f"'{out_dir}' holds neither features.h5 nor a model (sparse/0); nothing to report")
    keypoints = read_keypoint_counts(sources.features)
    pair_counts, num_pairs = read_pair_counts(sources.pairs)
    verified, raw = read_verified_pairs(sources.database)
    models = read_models(sources.models, options.max_points)
    names = sorted(set(_list_image_dir(sources.image_dir)) | set(keypoints) | set(models["views"]))
    verified_counts: Counter = Counter()
    for name0, name1 in verified:
        verified_counts[name0] += 1
        verified_counts[name1] += 1
    reasons = view_reasons(names, sources, keypoints, pair_counts, verified_counts, models["views"])
    views = [_view(name, reasons[name], keypoints, pair_counts, verified_counts, models) for name in names]
    if options.thumbnails and sources.image_dir is not None:
        # Decoding dominates the report's time (PNG cannot decode at reduced scale); Pillow's decoders release
        # the GIL, so threads overlap them.
        paths = [sources.image_dir / name for name in names]
        with ThreadPoolExecutor(max_workers=4) as pool:
            for view, thumb in zip(views, pool.map(lambda p: thumbnail(p, options.thumbnail_size), paths)):
                view["thumb"] = thumb
    index = {name: i for i, name in enumerate(names)}
    edges = sorted(([index[a], index[b], n] for (a, b), n in verified.items() if a in index and b in index),
                   key=lambda e: -e[2])
    record = sources.run_record
    return {
        "out_dir": str(Path(out_dir).resolve()), "image_dir": str(sources.image_dir) if sources.image_dir else None,
        "sources": {k: str(getattr(sources, k)) if getattr(sources, k) else None
                    for k in ("features", "pairs", "database")} | {"models": [str(m) for m in sources.models]},
        "views": views, "reasons": REASONS,
        "pairs": {"num_planned": num_pairs, "num_matched": len(raw), "num_verified": len(verified),
                  "edges": edges[:options.max_edges], "edges_total": len(edges),
                  "layout": "matrix" if len(names) <= options.matrix_max_views else "graph",
                  "stats": _json_file(Path(out_dir) / "pairs-stats.json"),
                  "components": [{"size": len(c), "examples": c[:5]} for c in components(names, verified)]},
        "tracks": histogram(models["track_lengths"], bins=_integer_bins(models["track_lengths"])),
        "errors": histogram(models["point_errors"], bins=20),
        "match_pairs": match_pairs(sources, verified, raw, options.pair_thumbnail_size, options.max_match_lines,
                                   draw=options.thumbnails),
        "splat": splat_results(Path(out_dir), 2 * options.pair_thumbnail_size, draw=options.thumbnails),
        "models": models["models"], "points": models["points"], "cameras": models["cameras"],
        "run": {"config": record.get("config"), "timings": record.get("timings"),
                "result": record.get("result"), "skipped": record.get("skipped", []),
                "pairs_method": record.get("pairs_method")},
    }


def _view(name, reason, keypoints, pair_counts, verified_counts, models) -> dict:
    registered = models["views"].get(name)
    model_name = f"sparse/{registered.model}" if registered else None
    view = {"name": name, "registered": registered is not None, "model": registered.model if registered else None,
            "reason": reason, "reason_text": REASONS[reason].format(model=model_name),
            "keypoints": keypoints.get(name), "pairs": pair_counts.get(name, 0),
            "verified": verified_counts.get(name, 0),
            "observations": registered.observations if registered else 0,
            "error": round(registered.error, 4) if registered else None}
    return view


def _integer_bins(values) -> list[float]:
    top = int(max(values, default=2))
    return [b + 0.5 for b in range(1, max(top, 2) + 1)]


def _json_file(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def render(data: dict, title: str) -> str:
    """The page: data as JSON (with '</' escaped so no string can close the script element), script, styles."""
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    return (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{(_HERE / 'report.css').read_text()}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><div id=\"app\"></div>"
            f"<script id=\"report-data\" type=\"application/json\">{payload}</script>"
            f"<script>{(_HERE / 'report.js').read_text()}</script></body></html>\n")


def write_report(out_dir: str | Path, options: ReportOptions | None = None,
                 image_dir: str | Path | None = None) -> Path:
    """Write OUT/report.html (see the module docstring); returns its path."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    data = collect(out_dir, options, image_dir)
    data["seconds"] = round(time.perf_counter() - start, 3)
    path = out_dir / "report.html"
    partial = path.with_name(path.name + ".partial")
    partial.write_text(render(data, f"recon report: {out_dir.resolve().name}"), encoding="utf-8")
    partial.replace(path)
    return path


def read_report_data(path: str | Path) -> dict:
    """The data embedded in a report.html (for tests and tools)."""
    text = Path(path).read_text(encoding="utf-8")
    start = text.index('<script id="report-data" type="application/json">')
    start = text.index(">", start) + 1
    return json.loads(text[start:text.index("</script>", start)].replace("<\\/", "</"))

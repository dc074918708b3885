"""The pair planner: one entry point that combines exhaustive, sequential (+ loop closure), retrieval and the GPS
prior, and reports how many pairs each source contributed.

Sources and their rules:
- exhaustive: all N(N-1)/2 pairs.
- sequential: the COLMAP window (pairs.sequential); with `loop_closure`, every `loop_every`-th frame also gets
  its `num_matched` retrieval neighbours from the whole collection (COLMAP's loop detection with global
  descriptors in place of the vocabulary tree). With `sequence_folders` (what `recon run` sets for video input),
  only those folders are windowed; the other images (photos beside the videos) are retrieval queries, and with
  several sequences each loop frame also gets `num_matched` neighbours from outside its own sequence
  ("between_sequences"), so two videos of one scene are linked even when each video's own frames look closer.
- retrieval: each query (all images, or `query_list`) with its `num_matched` most similar images of the database
  (all images, or `database_list`), above `min_similarity`, with at most `max_pairs_per_image` pairs per image.
- spatial: COLMAP's spatial matcher on EXIF GPS (pairs.spatial). With `gps_prior`, retrieval candidates of a
  positioned query are restricted to its spatial neighbours instead.
The per-image cap and the similarity floor apply to retrieval-derived pairs only: capping a sequential window
would cut the chain that keeps a video connected. Pairs are de-duplicated symmetrically across all sources.

`PairPlan.stats()` is what `recon` writes to OUT/pairs-stats.json: pairs per source (each counted where it first
appeared), the pair-count distribution over images and the images left without any pair.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from feature_backends.errors import ConfigError, InputError
from feature_backends.store import read_global_descriptors

from .exhaustive import exhaustive_pairs
from .io import deduplicate, read_name_list, write_pairs
from .retrieval import cap_per_image, extract_global_descriptors, retrieve
from .sequential import loop_frames, sequential_pairs
from .spatial import read_positions, spatial_neighbours, spatial_pairs

logger = logging.getLogger(__name__)

Method = Literal["auto", "exhaustive", "sequential", "retrieval", "spatial"]
METHODS: tuple[str, ...] = ("exhaustive", "sequential", "retrieval", "spatial")


def _opt(default: Any = None, help: str = "", factory: Any = None, **meta: Any) -> Any:
    """A field with the help text (and extra flag names) recon's generated command line shows."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class PairOptions:
    method: Method = _opt("auto", "auto: exhaustive up to --exhaustive-max-images images, retrieval above",
                          flags=("--method", "--pairs"), run_flags=("--method", "--pairs"))
    exhaustive_max_images: int = _opt(50, "auto: match exhaustively up to this many images",
                                      flags=("--exhaustive-max-images",))
    num_matched: int = _opt(20, "retrieval: neighbours per query; sequential: loop-closure neighbours per loop frame",
                            flags=("--num-matched",))
    retrieval: str = _opt("vlad", "global descriptor for retrieval and loop closure (vlad, netvlad, cosplace)",
                          flags=("--retrieval",))
    retrieval_conf: dict = _opt(help="global descriptor option, e.g. backbone=ResNet18, dim=512, weights=PATH",
                                factory=dict, flags=("--retrieval-conf",))
    query_list: list[str] | None = _opt(None, "retrieval: file of image names that query (default: all)",
                                        flags=("--query-list",), parse=read_name_list, metavar="FILE")
    database_list: list[str] | None = _opt(None, "retrieval: file of image names to retrieve from (default: all)",
                                           flags=("--database-list",), parse=read_name_list, metavar="FILE")
    min_similarity: float | None = _opt(None, "retrieval: drop neighbours below this cosine similarity",
                                        flags=("--min-similarity",))
    max_pairs_per_image: int | None = _opt(None, "retrieval: no image in more than this many pairs",
                                           flags=("--max-pairs-per-image",))
    overlap: int = _opt(10, "sequential: frames matched ahead", flags=("--overlap",))
    quadratic_overlap: bool = _opt(True, "sequential: also frames i+2^k (COLMAP's default)",
                                   flags=("--quadratic-overlap",))
    per_folder: bool = _opt(True, "sequential: each sub-folder is its own sequence", flags=("--per-folder",))
    loop_closure: bool = _opt(False, "sequential: add retrieval neighbours of every loop_every-th frame",
                              flags=("--loop-closure",))
    loop_every: int = _opt(10, "sequential: loop-closure frame interval", flags=("--loop-every",))
    sequence_folders: tuple[str, ...] | None = _opt(
        None, "sequential: only these sub-folders are ordered sequences (video frames); every other image and every "
              "loop frame queries retrieval, and with several sequences each loop frame also gets its neighbours "
              "from the other sequences (default: every folder is a sequence)", flags=("--sequence-folders",))
    gps_prior: bool = _opt(False, "retrieval / loop closure: only among EXIF-GPS neighbours (images without GPS "
                                  "stay in)", flags=("--gps",))
    spatial_max_neighbors: int = _opt(50, "spatial / --gps: nearest images kept", flags=("--spatial-max-neighbors",))
    spatial_max_distance: float = _opt(100.0, "spatial / --gps: radius in metres", flags=("--spatial-max-distance",))
    spatial_min_neighbors: int = _opt(0, "spatial / --gps: at least this many nearest images, even beyond the "
                                         "radius", flags=("--spatial-min-neighbors",))
    spatial_ignore_z: bool = _opt(True, "spatial / --gps: ignore altitude", flags=("--spatial-ignore-z",))

    def resolved_method(self, num_images: int) -> str:
        """The method "auto" stands for with this many images (other methods as they are)."""
        if self.method != "auto":
            return self.method
        return "exhaustive" if num_images <= self.exhaustive_max_images else "retrieval"


@dataclass
class PairPlan:
    method: str
    names: list[str]
    pairs: list[tuple[str, str]]
    sources: dict[str, int] = field(default_factory=dict)  # pairs each source added (first occurrence)
    details: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def stats(self) -> dict[str, Any]:
        degree = Counter()
        for name0, name1 in self.pairs:
            degree[name0] += 1
            degree[name1] += 1
        counts = [degree[name] for name in self.names]
        isolated = [name for name in self.names if degree[name] == 0]
        return {
            "method": self.method,
            "num_images": len(self.names),
            "num_pairs": len(self.pairs),
            "pairs_by_source": dict(self.sources),
            "pairs_per_image": {
                "min": min(counts, default=0), "max": max(counts, default=0),
                "mean": round(sum(counts) / len(counts), 3) if counts else 0.0,
            },
            "images_without_pairs": len(isolated),
            "images_without_pairs_examples": isolated[:20],
            "seconds": {k: round(v, 4) for k, v in self.seconds.items()},
            **self.details,
        }


class _Accumulator:
    """Symmetric de-duplication across sources, counting what each source adds."""

    def __init__(self):
        self.pairs: list[tuple[str, str]] = []
        self.seen: set[tuple[str, str]] = set()
        self.sources: dict[str, int] = {}

    def add(self, source: str, pairs: Sequence[tuple[str, str]]) -> None:
        added = deduplicate(pairs, self.seen)
        self.pairs += added
        self.sources[source] = self.sources.get(source, 0) + len(added)


def _check_subset(listed: Sequence[str] | None, names: Sequence[str], what: str) -> None:
    if listed is None:
        return
    unknown = sorted(set(listed) - set(names))
    if unknown:
        raise InputError(f"the {what} list names {len(unknown)} images not in the collection, e.g. {unknown[:3]}")
    if not listed:
        raise InputError(f"the {what} list is empty")


def plan(
    image_dir: str | Path,
    names: Sequence[str],
    options: PairOptions,
    descriptors_path: str | Path | None = None,
    device: Any = None,
    executor: Any = None,
) -> PairPlan:
    """Choose the pairs for `names` (relative to `image_dir`). Global descriptors go to `descriptors_path`, computed
    where `executor` (recon.executor.ExecutorOptions) says."""
    names = list(names)
    if options.method == "auto":
        options = replace(options, method=options.resolved_method(len(names)))
        logger.info("Pairs: %s for %d images (exhaustive up to %d)", options.method, len(names),
                    options.exhaustive_max_images)
    if options.method not in METHODS:
        raise ConfigError(f"unknown pairs method '{options.method}'; choose one of {', '.join(METHODS)}")
    _check_subset(options.query_list, names, "query")
    _check_subset(options.database_list, names, "database")
    _warn_unused(options)
    result = _Accumulator()
    details: dict[str, Any] = {"options": asdict(options) | {"query_list": _size(options.query_list),
                                                            "database_list": _size(options.database_list)}}
    seconds: dict[str, float] = {}
    ordered, unordered = _split_sequences(names, options)
    needs_retrieval = options.method == "retrieval" or (options.method == "sequential" and
                                                        (options.loop_closure or bool(unordered)))
    positions = None
    if options.method == "spatial" or (options.gps_prior and needs_retrieval):
        start = time.perf_counter()
        positions = read_positions(image_dir, names, options.spatial_ignore_z)
        neighbours = spatial_neighbours(positions, options.spatial_max_neighbors, options.spatial_max_distance,
                                        options.spatial_min_neighbors)
        seconds["gps"] = time.perf_counter() - start
        details["images_with_gps"] = len(positions)
        if not positions:
            logger.warning("GPS: no image carries EXIF GPS; the spatial prior has no effect")

    if options.method == "exhaustive":
        start = time.perf_counter()
        result.add("exhaustive", exhaustive_pairs(names))
        seconds["exhaustive"] = time.perf_counter() - start
    elif options.method == "spatial":
        result.add("spatial", spatial_pairs(neighbours))
    elif options.method == "sequential":
        start = time.perf_counter()
        result.add("sequential", sequential_pairs(ordered, options.overlap, options.quadratic_overlap,
                                                  options.per_folder))
        seconds["sequential"] = time.perf_counter() - start

    if needs_retrieval:
        _add_retrieval(result, details, seconds, image_dir, names, ordered, unordered, options, descriptors_path,
                       positions, neighbours if positions is not None else None, device, executor)

    pairs_plan = PairPlan(options.method, names, result.pairs, result.sources, details, seconds)
    stats = pairs_plan.stats()
    logger.info("Pairs: %d for %d images (%s); per source: %s", len(result.pairs), len(names), options.method,
                ", ".join(f"{k} {v}" for k, v in result.sources.items()))
    if stats["images_without_pairs"]:
        logger.warning("Pairs: %d images are in no pair, e.g. %s", stats["images_without_pairs"],
                       stats["images_without_pairs_examples"][:3])
    return pairs_plan


def _add_retrieval(result: _Accumulator, details: dict, seconds: dict, image_dir, names: list[str],
                   ordered: list[str], unordered: list[str], options: PairOptions, descriptors_path,
                   positions, neighbours, device, executor=None) -> None:
    """Retrieval pairs (or, for sequences, loop closure and links between sequences) added to `result`."""
    if descriptors_path is None:
        raise ConfigError("retrieval needs a path for the global descriptors (global-feats.h5)")
    if options.method == "sequential":
        loops = loop_frames(ordered, options.loop_every, options.per_folder) if options.loop_closure else []
        queries, database = loops + unordered, names
    else:
        queries, database = options.query_list or names, options.database_list or names
    start = time.perf_counter()
    # Descriptors for the whole collection, not just the listed images: VLAD fits its codebook on the images
    # it is given, and descriptors from different codebooks in one file would not be comparable.
    extract_global_descriptors(image_dir, descriptors_path, options.retrieval, options.retrieval_conf, names,
                               device=device, executor=executor)
    seconds["global_descriptors"] = time.perf_counter() - start
    start = time.perf_counter()
    stored, descriptors = read_global_descriptors(descriptors_path)
    row = {name: i for i, name in enumerate(stored)}
    queries = [name for name in queries if name in row]  # unreadable images were reported and skipped
    database = [name for name in database if name in row]
    query_desc = descriptors[[row[name] for name in queries]]
    db_desc = descriptors[[row[name] for name in database]]
    # A positioned query sees its spatial neighbours and every image without GPS (position unknown).
    allowed = neighbours if positions else None
    without_gps = [name for name in names if positions is not None and name not in positions]
    scored = retrieve(queries, query_desc, database, db_desc, options.num_matched, options.min_similarity,
                      allowed, without_gps)
    capped = cap_per_image(scored, options.max_pairs_per_image)
    source = "loop_closure" if options.method == "sequential" else "retrieval"
    details[source] = {"queries": len(queries), "candidates": len(scored), "after_dedup_and_cap": len(capped),
                       "backend": options.retrieval}
    result.add(source, [(name0, name1) for name0, name1, _ in capped])
    if options.method == "sequential" and len(set(map(_folder, ordered))) + bool(unordered) > 1:
        between = _between_sequences(queries, query_desc, database, db_desc, options)
        details["between_sequences"] = {"queries": len(queries), "candidates": len(between)}
        result.add("between_sequences", [(name0, name1) for name0, name1, _ in between])
    seconds["retrieval"] = time.perf_counter() - start


def _folder(name: str) -> str:
    return name.rsplit("/", 1)[0] if "/" in name else ""


def _split_sequences(names: list[str], options: PairOptions) -> tuple[list[str], list[str]]:
    """(frames of the ordered sequences, the other images); everything is ordered without `sequence_folders`."""
    if options.sequence_folders is None or options.method != "sequential":
        return names, []
    folders = set(options.sequence_folders)
    ordered = [name for name in names if _folder(name) in folders]
    return ordered, [name for name in names if _folder(name) not in folders]


def _between_sequences(queries, query_desc, database, db_desc, options: PairOptions):
    """Each query's neighbours among the images outside its own folder (another video, or the photos)."""
    by_folder: dict[str, list[str]] = {}
    for name in database:
        by_folder.setdefault(_folder(name), []).append(name)
    allowed = {query: [n for f, group in by_folder.items() if f != _folder(query) for n in group] for query in queries}
    scored = retrieve(queries, query_desc, database, db_desc, options.num_matched, options.min_similarity, allowed)
    return cap_per_image(scored, options.max_pairs_per_image)


def _warn_unused(options: PairOptions) -> None:
    """Options the chosen method does not use are reported, not silently dropped ("auto" may pick exhaustive)."""
    retrieval = options.method == "retrieval"
    loop = options.method == "sequential" and options.loop_closure
    unused = {
        "query/database lists": (options.query_list or options.database_list) and not retrieval,
        "minimum similarity": options.min_similarity is not None and not (retrieval or loop),
        "per-image cap": options.max_pairs_per_image is not None and not (retrieval or loop),
        "GPS prior": options.gps_prior and not (retrieval or loop),
    }
    for what, ignored in unused.items():
        if ignored:
            logger.warning("Pairs: the %s does not apply to method '%s' and is ignored", what, options.method)


def _size(listed: Sequence[str] | None) -> int | None:
    return None if listed is None else len(listed)


def write_plan(pairs_plan: PairPlan, pairs_path: str | Path, stats_path: str | Path | None = None) -> Path:
    """Write the pairs file and, unless given elsewhere, `<stem>-stats.json` next to it (pairs-stats.json)."""
    pairs_path = write_pairs(pairs_path, pairs_plan.pairs)
    stats_path = Path(stats_path) if stats_path else pairs_path.with_name(f"{pairs_path.stem}-stats.json")
    stats_path.write_text(json.dumps(pairs_plan.stats(), indent=2, default=str))
    return pairs_path

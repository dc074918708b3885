"""Distributed execution benchmark: SIFT extraction and MNN matching, local against Ray with 1 and 2 workers.

On a generated scene (recon.synthetic.make_scene, --images frames, 640x480) with exhaustive pairs, each
configuration runs the extraction and matching stages from empty outputs and reports images/s and pairs/s (stage
wall time, Ray actors' start and model load included; Ray's own start-up is reported apart), and the rates after
the pool's first result (without the actors' start; Ray only). Each Ray worker has
one CPU and one torch/OpenMP thread; the local run is pinned to one thread too. Also measured: the round trip of
a no-op task through the pool (the scheduling overhead per task, hence per image and per pair at the stage's
task sizes), and the driver's write rate (features and matches written through feature_backends/store.py from
memory, which bounds any number of workers: HDF5 takes one writer).

    python scripts/bench_distributed.py --images 24 --markdown
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from feature_backends.store import FeatureReader, FeatureWriter, MatchWriter  # noqa: E402
from recon.executor import ExecutorOptions, RayPool, connect, result_hooks  # noqa: E402
from recon.extract import ExtractOptions, extract  # noqa: E402
from recon.match import MatchOptions, match  # noqa: E402
from recon.synthetic import SceneSpec, make_scene  # noqa: E402


class Echo:
    """A worker that does nothing: the pool's round trip per task."""

    def __call__(self, task):
        return task


class Steady:
    """Items done after the pool's first result, and when: the rate without the actors' start and model load."""

    def __init__(self):
        self.first = self.last = None
        self.items = 0

    def __call__(self, pool, done, result):
        count = len(result[1]) if isinstance(result, tuple) else len(result)  # (name0, matches) or [images]
        if self.first is None:
            self.first = time.perf_counter()
        else:
            self.items += count
        self.last = time.perf_counter()

    def rate(self) -> float:
        return self.items / (self.last - self.first) if self.items else float("nan")


def stage_rates(images: Path, pairs: Path, out: Path, executor: ExecutorOptions | None) -> dict[str, float]:
    out.mkdir(parents=True)
    steady_extract, steady_match = Steady(), Steady()
    names = sorted(p.name for p in images.iterdir())
    num_pairs = len(pairs.read_text().splitlines())
    start = time.perf_counter()
    result_hooks[:] = [steady_extract]
    extract(ExtractOptions(features="sift", max_keypoints=2048), images, out / "features.h5", executor=executor)
    middle = time.perf_counter()
    result_hooks[:] = [steady_match]
    match(MatchOptions(matcher="mnn"), pairs, out / "features.h5", out / "matches.h5", executor=executor)
    end = time.perf_counter()
    result_hooks.clear()
    return {"images/s": len(names) / (middle - start), "pairs/s": num_pairs / (end - middle),
            "extract s": middle - start, "match s": end - middle,
            "steady images/s": steady_extract.rate(), "steady pairs/s": steady_match.rate()}


def task_overhead(options: ExecutorOptions, count: int = 300) -> tuple[float, float]:
    """(seconds to start the pool and get a first result, seconds per no-op task after that)."""
    start = time.perf_counter()
    pool = RayPool(options, Echo, ())
    next(pool.map([0]))
    started = time.perf_counter()
    for _ in pool.map(range(count)):
        pass
    end = time.perf_counter()
    pool.close()
    return started - start, (end - started) / count


def write_rate(features: Path, pairs: Path, matches: Path, out: Path) -> tuple[float, float]:
    """Images/s and pairs/s the driver writes (arrays already in memory; publishing at the end included)."""
    with FeatureReader(features) as reader:
        data = {name: reader.read(name) for name in reader.names()}
    start = time.perf_counter()
    with FeatureWriter(out / "features.h5") as writer:
        for name, features_ in data.items():
            writer.write(name, features_)
    middle = time.perf_counter()
    pair_list = [line.split() for line in pairs.read_text().splitlines()]
    import h5py

    with h5py.File(matches) as file:
        group = next(iter(file.values()))
        result = {k: v[()] for k, v in next(iter(group.values())).items()}
    with MatchWriter(out / "matches.h5") as writer:
        for name0, name1 in pair_list:
            writer.write(name0, name1, result)
    end = time.perf_counter()
    return len(data) / (middle - start), len(pair_list) / (end - middle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = make_scene(tmp / "scene", SceneSpec(num_frames=args.images)) / "images"
        names = sorted(p.name for p in images.iterdir())
        pairs = tmp / "pairs.txt"
        pairs.write_text("".join(f"{a} {b}\n" for a, b in itertools.combinations(names, 2)))
        rows = {"local": stage_rates(images, pairs, tmp / "local", None)}
        start = time.perf_counter()
        connect(ExecutorOptions(executor="ray"))
        ray_start = time.perf_counter() - start
        for workers in (1, 2):
            options = ExecutorOptions(executor="ray", workers=workers)
            rows[f"ray, {workers} worker{'s' * (workers > 1)}"] = stage_rates(images, pairs, tmp / f"ray{workers}",
                                                                             options)
        pool_start, per_task = task_overhead(ExecutorOptions(executor="ray", workers=2))
        writes = write_rate(tmp / "local" / "features.h5", pairs, tmp / "local" / "matches.h5", tmp / "writes")
        num_pairs = len(pairs.read_text().splitlines())
    per_group = num_pairs / (len(names) - 1)
    print(f"{len(names)} images 640x480, {num_pairs} exhaustive pairs, SIFT 2048 + MNN, "
          f"{os.cpu_count()} CPUs")
    print("| executor | images/s | pairs/s | extract s | match s | images/s after 1st result | pairs/s after 1st "
          "result |\n|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['images/s']:.2f} | {row['pairs/s']:.1f} | {row['extract s']:.1f} | "
              f"{row['match s']:.1f} | {row['steady images/s']:.2f} | {row['steady pairs/s']:.1f} |")
    print(f"\nRay start-up (local instance): {ray_start:.1f} s; 2-worker pool start to first result: "
          f"{pool_start:.2f} s")
    print(f"Task round trip (no-op, 2 workers, 4 in flight): {per_task * 1e3:.2f} ms/task = "
          f"{per_task * 1e3 / 4:.2f} ms/image at 4 images per task, "
          f"{per_task * 1e3 / per_group:.3f} ms/pair at {per_group:.1f} pairs per task here")
    print(f"Driver write rate: {writes[0]:.0f} images/s (features), {writes[1]:.0f} pairs/s (matches)")


if __name__ == "__main__":
    main()

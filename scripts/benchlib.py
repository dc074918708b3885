"""What every benchmark script needs and none should write again: tables, medians of repeated runs, alternating
repeats, and peak memory.

Imported by the scripts next to it as `import benchlib` (Python looks first in a script's own folder);
recon itself never imports it.

- `table(rows, columns, markdown=...)`: plain text (aligned columns) or Markdown (README-ready, GitHub's `|---|`
  separator), from dicts or sequences; a column's cells are formatted by a format string or a function.
- `alternating(names, repeat, flip=...)` / `alternate(runs, repeat)`: on a shared 2-core machine the same run
  varies by ±5-20 %, so competing measurements take turns instead of running back to back.
- `median_run(values)`, `median_fields(results, keys)`: the median of repeats, and the run it came from (quality
  figures are reported from the run with the median time, not mixed from several runs).
- `peak_rss_mb()`, `run_child(argv)`, `PeakSampler`: peak resident memory of this process (the kernel's
  high-water mark, VmHWM), of a child process (a measurement alone in a fresh process, inheriting no caches;
  the child reports its own peak with `emit_result`), and over a window of this process (sampled every 10 ms,
  for a peak above a baseline). tracemalloc would not see torch's allocations.
- `alternate_children(argv, repeat)` and `comparison_table(rows)`: recon against a reference implementation, each
  measurement in a fresh process, the two sides taking turns; the table of rates, peak memory and both ratios
  (ours/reference) that bench_features and bench_dense print.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

Format = str | Callable[[Any], str]
RESULT_PREFIX = "RESULT "


# --- tables ------------------------------------------------------------------------------------------------------

def cell(value: Any, spec: Format | None = None) -> str:
    """One table cell: None → "-", a float with `spec` or 3 significant digits, anything else as str."""
    if value is None:
        return "-"
    if callable(spec):
        return spec(value)
    if spec is not None and not isinstance(value, str):
        return spec.format(value)
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def table(rows: Sequence[Mapping[str, Any] | Sequence[Any]], columns: Sequence[str | tuple[str, str]] | None = None,
          *, markdown: bool = False, formats: Mapping[str, Format] | None = None) -> str:
    """Rows as a plain-text or Markdown table.

    `columns` lists the keys shown, in order; an entry (key, title) shows `key` under another title. Default: the
    keys of the first row. Rows are mappings (missing keys print "-") or sequences in the order of `columns`.
    `formats` maps a key to a format string ("{:.2f}") or a function of the value.
    """
    if columns is None:
        columns = list(rows[0]) if rows else []
    keys = [c if isinstance(c, str) else c[0] for c in columns]
    titles = [c if isinstance(c, str) else c[1] for c in columns]
    formats = formats or {}
    cells = []
    for row in rows:
        values = [row.get(k) for k in keys] if isinstance(row, Mapping) else list(row)
        cells.append([cell(v, formats.get(k)) for k, v in zip(keys, values)])
    if markdown:
        lines = ["| " + " | ".join(titles) + " |", "|" + "|".join("---" for _ in titles) + "|"]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])
    widths = [max(len(t), *(len(c[i]) for c in cells)) for i, t in enumerate(titles)]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in [titles, *cells])


# --- repeats and medians -----------------------------------------------------------------------------------------

def alternating(names: Sequence[str], repeat: int, flip: bool = False) -> Iterator[tuple[int, str]]:
    """(attempt, name) for `repeat` rounds in which every name takes its turn; with `flip`, every other round runs
    in reverse order, so neither side always goes first (first-call effects, a neighbour's load)."""
    for attempt in range(repeat):
        order = list(names)[::-1] if flip and attempt % 2 else list(names)
        for name in order:
            yield attempt, name


def alternate(runs: Mapping[str, Callable[[], Any]], repeat: int, flip: bool = False) -> dict[str, list[Any]]:
    """Call each function `repeat` times, taking turns (see `alternating`); the results per name, in order."""
    results: dict[str, list[Any]] = {name: [] for name in runs}
    for _, name in alternating(list(runs), repeat, flip):
        results[name].append(runs[name]())
    return results


def median_run(values: Sequence[float]) -> int:
    """Index of the run with the median value (the lower one of an even count: an actual run, not a mean)."""
    return sorted(range(len(values)), key=values.__getitem__)[(len(values) - 1) // 2]


def median_fields(results: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> dict[str, Any]:
    """The first result with each of `keys` replaced by its median over all results ({} if the first is empty:
    a measurement that does not exist on that side)."""
    if not results or not results[0]:
        return {}
    return {**results[0], **{key: statistics.median(r[key] for r in results) for key in keys}}


# --- peak memory -------------------------------------------------------------------------------------------------

def peak_rss_mb() -> float:
    """Peak resident set of this process so far, MB: the kernel's high-water mark of its memory (VmHWM).

    Not ru_maxrss: Linux keeps a process's ru_maxrss across fork and exec, so a child's starts at its parent's
    resident set (a child started by a 1.1 GB parent reports at least 1.1 GB, whatever it uses itself); VmHWM
    belongs to the address space the child got at exec."""
    try:
        with open("/proc/self/status") as file:
            for line in file:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:  # not Linux
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def resident_bytes() -> int:
    """Resident set of this process now."""
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakSampler:
    """Highest resident set of this process within a `with` block, sampled every `interval` seconds."""

    def __init__(self, interval: float = 0.01):
        self.interval, self.peak, self._stop = interval, resident_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, resident_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, resident_bytes())


def emit_result(result: Mapping[str, Any]) -> None:
    """A child's answer to `run_child`: one line of JSON on stdout, with the child's peak memory so far."""
    print(RESULT_PREFIX + json.dumps({"result": result, "peak_mb": peak_rss_mb()}), flush=True)


def run_child(argv: Sequence[str], env: Mapping[str, str] | None = None) -> tuple[dict[str, Any], float]:
    """Run `python *argv` in a fresh process; return the dict it printed with `emit_result` and the child's own
    peak resident set in MB when it printed it. A failure raises with the tail of the child's stderr."""
    process = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True, check=False)
    lines = [line for line in process.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if process.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(argv[:3])} … failed (exit {process.returncode}):\n{process.stderr[-2000:]}")
    answer = json.loads(lines[-1][len(RESULT_PREFIX):])
    return answer["result"], answer["peak_mb"]


# --- ours against a reference --------------------------------------------------------------------------------------

SIDES = ("ours", "reference")


def measure_child(argv: Sequence[str], env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """`run_child` with the child's peak memory folded into its result as `peak_mb` ({} stays {}: nothing measured,
    e.g. a side with no installable implementation)."""
    result, peak_mb = run_child(argv, env)
    return {**result, "peak_mb": peak_mb} if result else {}


def alternate_children(argv: Callable[[str], Sequence[str]], repeat: int, env: Mapping[str, str] | None = None,
                       keys: Sequence[str] = ("rate", "peak_mb"), sides: Sequence[str] = SIDES
                       ) -> dict[str, dict[str, Any]]:
    """Each side's measurement (`argv(side)`, see `measure_child`) in a fresh process, the sides taking turns
    `repeat` times with the order flipped every other round; per side the first result with the medians of `keys`."""
    runs = alternate({side: functools.partial(measure_child, argv(side), env) for side in sides}, repeat, flip=True)
    return {side: median_fields(runs[side], keys) for side in sides}


COMPARISON_COLUMNS = ("backend", "setting", "unit", "ours", "reference", "ratio", "ours MB", "ref MB", "mem ratio")
COMPARISON_FORMATS = {"ours": "{:.3f}", "reference": "{:.3f}", "ratio": "{:.2f}", "ours MB": "{:.0f}",
                      "ref MB": "{:.0f}", "mem ratio": "{:.2f}"}


def comparison_table(rows: Sequence[tuple[str, str, str, Mapping[str, Any], Mapping[str, Any]]],
                     markdown: bool = False, extra: Sequence[str] = ()) -> str:
    """(label, setting, unit, ours, reference) rows, each side a result with `rate` (higher is better) and `peak_mb`
    → the table with ratio = ours/reference rate (target >= 1) and mem ratio = ours/reference peak (target <= 1).
    A reference result that is empty prints "none installable"; `extra` keys are shown as "ours/ref" pairs."""
    lines = []
    for label, setting, unit, ours, ref in rows:
        missing = "none installable"
        line = {"backend": label, "setting": setting, "unit": unit, "ours": ours["rate"],
                "reference": ref["rate"] if ref else missing, "ratio": ours["rate"] / ref["rate"] if ref else None,
                "ours MB": ours["peak_mb"], "ref MB": ref["peak_mb"] if ref else missing,
                "mem ratio": ours["peak_mb"] / ref["peak_mb"] if ref else None}
        for key in extra:
            line[key] = f"{cell(ours.get(key))}/{cell(ref.get(key)) if ref else '-'}"
        lines.append(line)
    return table(lines, [*COMPARISON_COLUMNS, *extra], markdown=markdown, formats=COMPARISON_FORMATS)

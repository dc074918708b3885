"""The benchmark scripts: every one imports (a broken import fails here, not months later in a benchmark run),
none edits sys.path, imports a test module or writes the global registry, and their shared helper
(scripts/benchlib.py) gives known tables, medians, turn orders and peak memory."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
BENCHMARKS = sorted(p.stem for p in SCRIPTS.glob("bench_*.py"))


@pytest.fixture(scope="module")
def scripts():
    """The scripts importable by name, as `python scripts/bench_x.py` sees them (its own folder on sys.path)."""
    sys.path.insert(0, str(SCRIPTS))
    try:
        yield {name: importlib.import_module(name) for name in ["benchlib", *BENCHMARKS]}
    finally:
        sys.path.remove(str(SCRIPTS))


def test_every_script_imports_and_has_a_main(scripts):
    assert {"bench_dense", "bench_features", "bench_pairs", "bench_sfm", "bench_splat"} <= set(BENCHMARKS)
    for name in BENCHMARKS:
        assert callable(scripts[name].main), name


@pytest.mark.parametrize("name", BENCHMARKS + ["benchlib"])
def test_no_script_edits_sys_path_imports_tests_or_writes_the_registry(name):
    source = (SCRIPTS / f"{name}.py").read_text()
    assert "sys.path" not in source
    assert not re.search(r"^\s*(from|import)\s+(tests\b|test_)", source, re.MULTILINE)
    assert not re.search(r"BACKENDS\[[^\]]*\]\s*(\[[^\]]*\]\s*)?=", source)


ROWS = [{"name": "sift", "rate": 1.23456, "count": 8192, "note": None},
        {"name": "dedode (extract)", "rate": 0.1, "count": 12, "note": "4096-D"}]


def test_table_plain_text(scripts):
    assert scripts["benchlib"].table(ROWS) == "\n".join([
        "name              rate  count  note",
        "sift              1.23  8192   -",
        "dedode (extract)  0.1   12     4096-D",
    ])


def test_table_markdown_with_titles_and_formats(scripts):
    text = scripts["benchlib"].table(ROWS, ["name", ("rate", "img/s"), "note"], markdown=True,
                                     formats={"rate": "{:.3f}", "note": lambda v: v.upper()})
    assert text == "\n".join([
        "| name | img/s | note |",
        "|---|---|---|",
        "| sift | 1.235 | - |",
        "| dedode (extract) | 0.100 | 4096-D |",
    ])


def test_table_of_sequences_keeps_strings_and_formats_numbers(scripts):
    rows = [["mnn", 10.71428, "none installable"], ["lightglue", 0.153, 0.0681]]
    assert scripts["benchlib"].table(rows, ["backend", "ours", "reference"], markdown=True,
                                     formats={"ours": "{:.3f}", "reference": "{:.3f}"}).splitlines()[2:] == [
        "| mnn | 10.714 | none installable |", "| lightglue | 0.153 | 0.068 |"]


def test_bench_pairs_cells(scripts):
    rows = [{"N": 50, "method": "retrieval (K=20)", "pairs": 515, "pairs_per_image": 10.3, "seconds": 0.00461},
            {"N": 1000, "method": "exhaustive", "pairs": 499500, "pairs_per_image": 499.5, "seconds": 12.5}]
    assert scripts["bench_pairs"].table(rows, ["N", "pairs", "pairs_per_image", "seconds"], True).splitlines()[2:] \
        == ["| 50 | 515 | 10.300 | 0.0046 |", "| 1000 | 499500 | 500 | 12.500 |"]


def test_medians_and_turns(scripts):
    bench = scripts["benchlib"]
    assert bench.median_run([30.0, 10.0, 20.0]) == 2
    assert bench.median_run([4.0, 1.0, 3.0, 2.0]) == 3  # the lower of the two middle runs: an actual run
    runs = [{"rate": 3.0, "peak_mb": 100.0, "resize_max": 1600}, {"rate": 1.0, "peak_mb": 300.0, "resize_max": 1600},
            {"rate": 2.0, "peak_mb": 200.0, "resize_max": 1600}]
    assert bench.median_fields(runs, ("rate", "peak_mb")) == {"rate": 2.0, "peak_mb": 200.0, "resize_max": 1600}
    assert bench.median_fields([{}, {}], ("rate",)) == {}
    assert list(bench.alternating(["a", "b"], 3)) == [(0, "a"), (0, "b"), (1, "a"), (1, "b"), (2, "a"), (2, "b")]
    assert list(bench.alternating(["a", "b"], 3, flip=True)) == [(0, "a"), (0, "b"), (1, "b"), (1, "a"), (2, "a"),
                                                                 (2, "b")]
    calls = []
    results = bench.alternate({"x": lambda: calls.append("x") or len(calls), "y": lambda: calls.append("y") or 0}, 2)
    assert calls == ["x", "y", "x", "y"] and results == {"x": [1, 3], "y": [0, 0]}


def test_run_child_returns_the_result_and_the_child_peak_memory(scripts, tmp_path):
    """A child that holds 300 MB reports about 300 MB, although this process (torch and pycolmap loaded, plus a
    400 MB block) is larger: the child's ru_maxrss would start at this process's size. A failing child raises
    with its error."""
    bench = scripts["benchlib"]
    child = tmp_path / "child.py"
    child.write_text(f"import sys; sys.path.insert(0, {str(SCRIPTS)!r}); import benchlib\n"
                     "block = bytearray(300 << 20)\n"
                     "for i in range(0, len(block), 4096): block[i] = 1  # written, so resident\n"
                     "print('noise'); benchlib.emit_result({'held': len(block) >> 20})\n")
    parent = bytearray(400 << 20)
    result, peak_mb = bench.run_child([str(child)])
    del parent
    assert result == {"held": 300}
    assert 300 <= peak_mb < 360, peak_mb
    (tmp_path / "bad.py").write_text("raise SystemExit('no weights here')\n")
    with pytest.raises(RuntimeError, match="no weights here"):
        bench.run_child([str(tmp_path / "bad.py")])


def test_peak_sampler_sees_a_short_allocation():
    """In a fresh process: a long test session's heap already holds freed pages that a new block reuses, which
    would leave resident memory flat."""
    code = textwrap.dedent("""
        import time, benchlib
        with benchlib.PeakSampler() as sampler:
            baseline = benchlib.resident_bytes()
            block = b"x" * (200 << 20)  # written, so resident
            time.sleep(0.05)  # several sampling intervals
            del block
        print(sampler.peak - baseline)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=SCRIPTS, capture_output=True, text=True, check=True)
    assert int(out.stdout.split()[-1]) > 150 << 20


def test_ours_against_a_reference_in_alternating_children(scripts, tmp_path):
    """Each side in its own process, turns flipped, medians per side with the child's peak memory; the comparison
    table's ratios, and a side with nothing measured printed as having no installable reference."""
    bench = scripts["benchlib"]
    log = tmp_path / "order.txt"
    child = tmp_path / "side.py"
    child.write_text(f"import sys; sys.path.insert(0, {str(SCRIPTS)!r}); import benchlib\n"
                     f"open({str(log)!r}, 'a').write(sys.argv[1] + ' ')\n"
                     "rate = {'ours': 4.0, 'reference': 2.0}[sys.argv[1]] + len(open(" + repr(str(log)) +
                     ").read().split()) / 100\n"
                     "benchlib.emit_result({'rate': rate, 'size': 7})\n")
    medians = bench.alternate_children(lambda side: [str(child), side], 3)
    assert log.read_text().split() == ["ours", "reference", "reference", "ours", "ours", "reference"]
    assert medians["ours"]["rate"] == pytest.approx(4.04) and medians["reference"]["rate"] == pytest.approx(2.03)
    assert medians["ours"]["size"] == 7 and 5 < medians["ours"]["peak_mb"] < 200
    rows = [("a", "s", "img/s", {"rate": 3.0, "peak_mb": 100.0, "n": 5}, {"rate": 2.0, "peak_mb": 400.0, "n": 6}),
            ("b", "s", "img/s", {"rate": 1.0, "peak_mb": 50.0}, {})]
    lines = bench.comparison_table(rows, markdown=True, extra=("n",)).splitlines()
    assert lines[2] == "| a | s | img/s | 3.000 | 2.000 | 1.50 | 100 | 400 | 0.25 | 5/6 |"
    assert lines[3] == "| b | s | img/s | 1.000 | none installable | - | 50 | none installable | - | -/- |"

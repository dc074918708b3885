"""kill -9 at seeded random points of every stage of `recon run`, then a rerun: the same features, matches and model
as an uninterrupted run (issue 11, fault injection for the writers).

Each killed run is a real `recon run` process (recon.cli.main) killed with SIGKILL together with its process
group (the SfM stage's fresh child included). The kill point is chosen by watching the run's `--progress-json`
file: when the target stage's `stage_start` appears, wait a seeded random fraction of that stage's duration in
the reference run, then kill. Several kills share one output folder (kill, rerun killed again, …, final rerun),
and after every kill the published files must still open (a `.partial` is never published half-written).

The tests after it simulate exactly what the random kills reach only by chance: every state a killed SfM stage
can leave behind, every way its fresh process can end (exception, SIGKILL, SIGSEGV, an exit without a reply) and
a kill -9 of the run alone, which must take the SfM process with it.

Why a fork server: a cold `python -m recon.cli` spends ~3 s importing torch and pycolmap, more than the whole
run on this scene; 20+ killed runs would take minutes. One helper process imports recon once and forks a fresh
child per run, which then does exactly what `recon run` does (argument parsing, locking, every stage).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

h5py = pytest.importorskip("h5py")
pycolmap = pytest.importorskip("pycolmap")

SEED = 11
ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable  # the real interpreter, whatever a test puts in sys.executable
EXPORTS = "colmap-txt,ply,3dgs,nerfstudio"

# Reads one JSON argv per line on stdin; forks a child per line (its own session, so the test can kill its whole
# process group); prints "pid PID" when started and "exit PID CODE" when it ends (CODE < 0: killed by signal).
# An exception escaping recon.cli.main is printed to the run's log, as the interpreter would: the first version
# ended the child with os._exit in a `finally`, which dropped the traceback, hence "exit 1 and no message".
FORK_SERVER = r"""
import json, os, sys, traceback
import recon.cli, recon.pipeline, recon.extract, recon.match, recon.dense, recon.sfm, recon.export, recon.oracles
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.setsid()
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1); os.dup2(log, 2)
        code = 1
        try:
            code = recon.cli.main(request["argv"])
        except BaseException:  # what `python -m recon.cli` would print; os._exit below would swallow it
            traceback.print_exc()
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code or 0)
    print("pid", pid, flush=True)
    _, status = os.waitpid(pid, 0)
    code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    print("exit", pid, code, flush=True)
"""


class ForkServer:
    def __init__(self, log_dir: Path):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        self.process = subprocess.Popen([sys.executable, "-c", FORK_SERVER], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env)
        self.log_dir = log_dir
        self.count = 0

    def start(self, argv: list[str]) -> int:
        self.count += 1
        log = self.log_dir / f"run{self.count}.log"
        self.process.stdin.write(json.dumps({"argv": argv, "log": str(log)}) + "\n")
        self.process.stdin.flush()
        word, pid = self.process.stdout.readline().split()
        assert word == "pid", word
        return int(pid)

    def wait(self, pid: int) -> int:
        word, done, code = self.process.stdout.readline().split()
        assert word == "exit" and int(done) == pid
        return int(code)

    def failure(self, code: int) -> str:
        """The last run's exit code and the end of its log, for an assertion message."""
        log = self.log_dir / f"run{self.count}.log"
        tail = log.read_text(errors="replace").splitlines()[-6:] if log.exists() else []
        return f"run {self.count} exited with {code}; {log} ends:\n" + "\n".join(tail)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


def _events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.endswith("}")]  # the last line may be half-written


def _argv(images: Path, out: Path, progress: Path, extra: list[str]) -> list[str]:
    return ["run", str(images), str(out), "--export", EXPORTS, "--no-report", "--progress-json", str(progress),
            *extra]


def _run_and_kill(server: ForkServer, argv: list[str], progress: Path, stage: str, delay: float) -> str | None:
    """Start a run, SIGKILL its process group `delay` s after `stage` starts; the stage it died in (None when
    it finished first)."""
    pid = server.start(argv)
    deadline = time.monotonic() + 60
    while not any(e["event"] == "stage_start" and e["stage"] == stage for e in _events(progress)):
        if any(e["event"] in ("run_end", "error") for e in _events(progress)) or time.monotonic() > deadline:
            break
        time.sleep(0.001)
    time.sleep(delay)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    code = server.wait(pid)
    if code != -signal.SIGKILL:
        assert code == 0, server.failure(code)
        return None
    started = [e["stage"] for e in _events(progress) if e["event"] == "stage_start"]
    return started[-1] if started else "start-up"


def _published_files_open(out: Path) -> None:
    """The real files (never a `.partial`) are whole HDF5 files after any kill."""
    for name in ("features.h5", "matches.h5"):
        if (out / name).exists():
            with h5py.File(out / name, "r") as handle:
                handle.visit(lambda key: None)


def _datasets(path: Path) -> dict[str, np.ndarray]:
    found = {}
    with h5py.File(path, "r") as handle:
        handle.visititems(lambda key, item: found.__setitem__(key, item[()])
                          if isinstance(item, h5py.Dataset) else None)
    return found


def _outputs(out: Path) -> dict:
    model = pycolmap.Reconstruction(out / "sparse" / "0")
    centres = {image.name: np.asarray(image.projection_center()) for image in model.images.values()}
    return {"features": _datasets(out / "features.h5") if (out / "features.h5").exists() else {},
            "matches": _datasets(out / "matches.h5"), "centres": centres, "points": model.num_points3D(),
            "exports": sorted(p.name for p in out.iterdir() if not p.name.startswith("."))}


def _assert_same(result: dict, reference: dict) -> None:
    for kind in ("features", "matches"):
        assert result[kind].keys() == reference[kind].keys(), kind
        for key, value in reference[kind].items():
            assert np.array_equal(result[kind][key], value), (kind, key)
    assert sorted(result["centres"]) == sorted(reference["centres"])
    assert result["points"] == reference["points"]
    for name, centre in reference["centres"].items():
        np.testing.assert_allclose(result["centres"][name], centre, atol=1e-6, rtol=0)
    assert result["exports"] == reference["exports"]


def _reference(server: ForkServer, images: Path, out: Path, extra: list[str]) -> tuple[dict, dict[str, float]]:
    progress = out.with_suffix(".jsonl")
    code = server.wait(server.start(_argv(images, out, progress, extra)))
    assert code == 0, server.failure(code)
    durations = {e["stage"]: e["seconds"] for e in _events(progress) if e["event"] == "stage_end"}
    return _outputs(out), durations


def _kill_series(server, images, out, extra, reference, durations, plan, rng) -> tuple[list[str], int]:
    """One output folder: a kill at each planned stage in turn, then a rerun to completion, compared. A run that
    finishes before its kill lands (a loaded machine) is compared too, its folder emptied and the kill retried.
    Returns the stages killed in and the number of completed runs compared with the reference."""
    died, compared, attempt = [], 0, 0
    for stage in plan:
        for _ in range(3):
            attempt += 1
            progress = out.parent / f"{out.name}-kill{attempt}.jsonl"
            delay = rng.uniform(0.0, 0.8 * max(durations.get(stage, 0.0), 0.002))
            where = _run_and_kill(server, _argv(images, out, progress, extra), progress, stage, delay)
            if where is not None:
                assert not (out / "run.json").exists()
                _published_files_open(out)
                died.append(where)
                break
            _assert_same(_outputs(out), reference)
            compared += 1
            shutil.rmtree(out)
    progress = out.parent / f"{out.name}-final.jsonl"
    code = server.wait(server.start(_argv(images, out, progress, extra)))
    assert code == 0, server.failure(code)
    assert not list(out.glob("*.partial"))
    _assert_same(_outputs(out), reference)
    return died, compared + 1


def test_kill_9_at_random_points_of_every_stage_then_rerun_gives_the_same_model(tmp_path, capsys):
    from recon.synthetic import SceneSpec, make_scene

    start = time.perf_counter()
    scene = make_scene(tmp_path / "scene", SceneSpec(num_frames=6))
    images = scene / "images"
    dense = ["--matcher", "recon.oracles:SceneOracle", "--matcher-conf", f"scene={scene}",
             "--matcher-conf", "num_matches=300"]
    rng = np.random.default_rng(SEED)
    server = ForkServer(tmp_path)
    try:
        sparse_ref, sparse_durations = _reference(server, images, tmp_path / "ref-sparse", [])
        dense_ref, dense_durations = _reference(server, images, tmp_path / "ref-dense", dense)
        assert len(sparse_ref["centres"]) == len(dense_ref["centres"]) == 6
        series = {  # (extra flags, reference, durations, the stages killed in turn in one folder)
            "sparse-a": ([], sparse_ref, sparse_durations, ["extract", "extract", "extract", "pairs", "match"]),
            "sparse-b": ([], sparse_ref, sparse_durations, ["match", "match", "sfm", "sfm", "sfm"]),
            "sparse-c": ([], sparse_ref, sparse_durations, ["sfm", "export", "export", "export", "export"]),
            "dense": (dense, dense_ref, dense_durations, ["match", "match", "match", "sfm", "export"]),
        }
        table: dict[str, int] = {}
        compared = 0
        for name, (extra, reference, durations, plan) in series.items():
            died, runs = _kill_series(server, images, tmp_path / name, extra, reference, durations, plan, rng)
            compared += runs
            for stage in died:
                key = ("dense " if name == "dense" else "") + stage
                table[key] = table.get(key, 0) + 1
    finally:
        server.close()
    with capsys.disabled():
        print(f"\nkill points per stage: {dict(sorted(table.items()))}; {compared} completed reruns identical to "
              f"the reference; {time.perf_counter() - start:.1f} s")
    assert sum(table.values()) >= 20, table
    # Every stage the issue names is hit. The pairs stage (a few ms on 6 images) stays in the plan, but a kill aimed
    # at it often lands in matching, so it is counted where it lands and not required.
    for stage in ("extract", "match", "sfm", "export", "dense match", "dense sfm", "dense export"):
        assert table.get(stage, 0) >= 1, (stage, table)


# --- The SfM stage's leftovers and its process's endings, each simulated exactly (the kill -9 test above hits them
# --- only by chance).

def _same_model(model_dir: Path, reference: pycolmap.Reconstruction) -> None:
    model = pycolmap.Reconstruction(model_dir)
    assert model.num_points3D() == reference.num_points3D()
    for image in reference.images.values():
        twin = model.find_image_with_name(image.name)
        np.testing.assert_allclose(twin.projection_center(), image.projection_center(), atol=1e-6, rtol=0)


def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


def test_a_rerun_maps_again_over_what_a_killed_sfm_stage_left(synthetic_scene, synthetic_run, tmp_path):
    """Each state a kill -9 (or an older recon's kill) can leave in OUT/sfm, OUT/sparse and OUT/exports.json; the
    rerun must give the uninterrupted model. Before: a cut stamp or exports.json ended in a JSONDecodeError
    traceback (exit 1, and no message at all under the kill test's fork server), a cut model file in IndexError."""
    from recon.export import export
    from recon.sfm import SfMOptions, reconstruct

    run = synthetic_run.out_dir
    inputs = (synthetic_scene / "images", run / "pairs.txt", run / "features.h5", run / "matches.h5")
    out = tmp_path / "out"
    options = SfMOptions(fresh_process=False)
    reconstruct(out, *inputs, options=options)
    export(out, ["colmap-txt", "ply"])
    shutil.copytree(out / "sparse" / "0", tmp_path / "reference")
    reference = pycolmap.Reconstruction(tmp_path / "reference")

    def left_by_kill_while_mapping() -> None:  # killed between write_models' rmtree and rename, mid-verification
        shutil.rmtree(out / "sparse")
        (out / "sparse.partial" / "0").mkdir(parents=True)
        shutil.copy(tmp_path / "reference" / "cameras.bin", out / "sparse.partial" / "0")
        (out / "sfm" / "models.partial").mkdir()
        _cut(out / "sfm" / "database.db")
        (out / "sfm" / "database.db-wal").write_bytes(os.urandom(4096))
        (out / "sfm" / "database.db-journal").write_bytes(os.urandom(512))

    states = {
        "cut stamp": lambda: _cut(out / "sfm" / "sfm_inputs.json"),
        "cut model file under a valid stamp": lambda: _cut(out / "sparse" / "0" / "images.bin"),
        "half-built model, database and journals": left_by_kill_while_mapping,
    }
    for name, leave in states.items():
        leave()
        result = reconstruct(out, *inputs, options=options)
        assert result.num_registered == reference.num_reg_images(), name
        _same_model(out / "sparse" / "0", reference)
        assert not (out / "sparse.partial").exists() and not (out / "sfm" / "models.partial").exists(), name
        assert not list((out / "sfm").glob("database.db-journal")), name
    _cut(out / "exports.json")
    assert set(export(out, ["colmap-txt", "ply"])) == {"colmap-txt", "ply"}
    assert json.loads((out / "exports.json").read_text()).keys() == {"colmap-txt", "ply"}


_FAKE_CHILD = r"""
import os, signal, sys
import recon.sfm, recon.sfm.process as process

mode = os.environ["RECON_TEST_SFM_CHILD"]

def fail(*args, **kwargs):
    if mode == "raise":
        raise RuntimeError("[database.cc:123] Check failed: something COLMAP did not expect\nsecond line")
    if mode == "exit":
        os._exit(3)
    if mode == "orphan":
        open(os.environ["RECON_TEST_CHILD_PID"], "w").write(str(os.getpid()))
        signal.pause()
    os.kill(os.getpid(), getattr(signal, mode))

recon.sfm.import_features = fail
process.child_main(*sys.argv[3:])
"""


@pytest.fixture
def fake_sfm_child(tmp_path, monkeypatch):
    """`sys.executable` for the SfM process: the real child, failing in the database import as
    $RECON_TEST_SFM_CHILD says (raise, exit, a signal name, or orphan: wait to be killed)."""
    script = tmp_path / "fake_child.py"
    script.write_text(_FAKE_CHILD)
    executable = tmp_path / "python"
    executable.write_text(f'#!/bin/sh\nexec "{PYTHON}" "{script}" "$@"\n')
    executable.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(executable))
    return monkeypatch


@pytest.mark.parametrize("mode, expected", [
    ("raise", r"^SfM failed during database import: RuntimeError: \[database.cc:123\] Check failed: something COLMAP "
              r"did not expect \(traceback in .*/sfm/error.txt\); run the same command again"),
    ("SIGKILL", r"^the SfM process was killed \(SIGKILL\) during database import, most often by the system's "
                r"out-of-memory killer \(see `dmesg`\); run the same command again to resume"),
    ("SIGSEGV", r"^the SfM process crashed \(SIGSEGV\) during database import, inside COLMAP; run the same command"),
    ("exit", r"^the SfM process exited with status 3 during database import without a reply"),
])
def test_every_ending_of_the_sfm_process_is_one_line_naming_the_step_and_a_fix(
        synthetic_scene, synthetic_run, tmp_path, fake_sfm_child, mode, expected):
    """Before: an exception other than recon's printed a traceback and then 'exited with status 1 (traceback
    above)'; a kill named neither the step nor what to do."""
    from feature_backends.errors import ReconError
    from recon.sfm import reconstruct

    fake_sfm_child.setenv("RECON_TEST_SFM_CHILD", mode)
    run = synthetic_run.out_dir
    with pytest.raises(ReconError) as caught:
        reconstruct(tmp_path / "out", synthetic_scene / "images", run / "pairs.txt", run / "features.h5",
                    run / "matches.h5")
    message = str(caught.value)
    assert "\n" not in message and re.match(expected, message), message
    assert type(caught.value) is ReconError and caught.value.exit_code == 1
    if mode == "raise":
        assert "Traceback" in (tmp_path / "out" / "sfm" / "error.txt").read_text()
    assert not (tmp_path / "out" / "sfm" / "sfm_inputs.json").exists()  # nothing vouches for a model


def test_the_sfm_process_dies_with_a_killed_run(synthetic_scene, synthetic_run, tmp_path, fake_sfm_child):
    """kill -9 of `recon run` alone (the PID its lock names) must not leave the SfM process writing OUT/sfm and
    OUT/sparse while a rerun holds the lock. Before: the orphan ran on."""
    fake_sfm_child.setenv("RECON_TEST_SFM_CHILD", "orphan")
    pid_file = tmp_path / "child.pid"
    fake_sfm_child.setenv("RECON_TEST_CHILD_PID", str(pid_file))
    run = synthetic_run.out_dir
    code = (f"import sys; sys.executable = {sys.executable!r}; from recon.sfm import reconstruct; "
            f"reconstruct({str(tmp_path / 'out')!r}, {str(synthetic_scene / 'images')!r}, "
            f"{str(run / 'pairs.txt')!r}, {str(run / 'features.h5')!r}, {str(run / 'matches.h5')!r})")
    parent = subprocess.Popen([PYTHON, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 60
    while not pid_file.is_file() or not pid_file.read_text():
        assert time.monotonic() < deadline and parent.poll() is None
        time.sleep(0.02)
    child = int(pid_file.read_text())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child}").exists() and "Z" not in _process_state(child):
        assert time.monotonic() < deadline, f"the SfM process {child} outlived its killed parent"
        time.sleep(0.02)


def _process_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return "Z"


def test_the_incremental_mapper_maps_on_one_thread_unless_told():
    """pycolmap's parallel initial-pair search picks a pair by thread timing (recon.sfm.mapping.mapping_threads):
    recon's default maps incrementally on one thread, so reruns give the same model; a number given is kept."""
    from recon.sfm.mapping import pipeline_options

    default = pipeline_options("auto", {}, 10, None, 0)
    assert default["incremental"].num_threads == 1 and default["global"].num_threads == -1
    assert pipeline_options("incremental", {}, 10, 4, 0)["incremental"].num_threads == 4
    assert pipeline_options("hierarchical", {}, 10, None, 0)["hierarchical"].num_threads == -1

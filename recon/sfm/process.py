"""The SfM stage in a fresh Python process (`SfMOptions.fresh_process`, on by default).

COLMAP's mapper is slower in a process that has just extracted and matched: temple_ring_full's database, mapped
in one process right after recon's matching stage, took 17.5 / 11.1 / 9.0 s in three runs, and 10.5 / 6.9 /
7.2 s when the same process handed it to a spawned one (alternating runs, spawning included). The mapper is
single-threaded there and page faults do not explain it (fewer after matching, not more); the state that slows
it (heap layout, caches) is not isolated, and a fresh process avoids it for ~0.4 s of start-up. A crash inside
COLMAP then also ends in an error message rather than taking the pipeline down.

The child gets one JSON request (the inputs record, the options, the stamp, the logging set-up) and answers
with the result or the error's class and message, which the parent raises again as the same class. Every other
ending becomes one ReconError line naming the step (database import, verification, mapping, …) and a fix: an
unexpected exception in the child (its traceback goes to OUT/sfm/error.txt), a crash inside COLMAP (SIGSEGV,
SIGABRT), a kill (SIGKILL: usually the kernel's out-of-memory killer), an exit without a reply.

On Linux the child dies with its parent (PR_SET_PDEATHSIG): a `recon run` killed with kill -9 takes its SfM
process with it, so no orphan keeps writing OUT/sfm and OUT/sparse once the folder's lock (recon.lock) is free
for a rerun.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import tempfile
import traceback
from dataclasses import asdict
from pathlib import Path

import pycolmap

from feature_backends import errors
from feature_backends.errors import ReconError

from ..records import read_record, write_record

logger = logging.getLogger(__name__)


def reconstruct_in_fresh_process(inputs, options, stamp: dict):
    """`recon.sfm.reconstruct_here` in a new interpreter; the child's log lines and progress bars go to stderr."""
    from . import SfMResult

    root = logging.getLogger()
    handler_format = next((h.formatter for h in root.handlers if h.formatter is not None), None)
    request = {
        "inputs": inputs.to_dict(), "options": asdict(options), "stamp": stamp, "parent_pid": os.getpid(),
        "log_level": logging.getLogger("recon").getEffectiveLevel(),
        "log_format": handler_format._fmt if handler_format else None,
        "log_datefmt": handler_format.datefmt if handler_format else None,
        "colmap_to_stderr": bool(pycolmap.logging.alsologtostderr),
    }
    with tempfile.TemporaryDirectory(prefix="recon-sfm-") as exchange:
        request_path, reply_path = Path(exchange, "request.json"), Path(exchange, "reply.json")
        step_path = Path(exchange, "step.txt")
        request["step_path"] = str(step_path)
        write_record(request_path, request)
        # The package root goes first on the child's path, so a checkout that is not installed imports the same code.
        package_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
        process = subprocess.run(
            [sys.executable, "-c", "import sys, recon.sfm.process as p; p.child_main(*sys.argv[1:])",
             str(request_path), str(reply_path)], env=env, check=False)
        reply = read_record(reply_path) or {}
        step = (step_path.read_text().strip() if step_path.is_file() else "") or "start-up"
    if "result" in reply:
        return SfMResult.from_dict(reply["result"])
    if "error" in reply:
        raise _error(reply["error"], inputs.work_dir)
    raise ReconError(exit_message(process.returncode, step, inputs.work_dir))


def _error(error: dict, work_dir: Path) -> ReconError:
    """The child's error: its own class when it is one of recon's, else a line naming the step and a fix."""
    error_class = getattr(errors, error["type"], None)
    if isinstance(error_class, type) and issubclass(error_class, ReconError):
        return error_class(error["message"])
    message = error["message"].strip().splitlines()[0] if error["message"].strip() else "(no message)"
    return ReconError(f"SfM failed during {error['step']}: {error['type']}: {message} (traceback in "
                      f"{work_dir}/error.txt); run the same command again, and if it fails the same way, delete "
                      f"{work_dir} and rerun, or report that traceback")


def exit_message(returncode: int, step: str, work_dir: Path) -> str:
    """One line for an SfM process that ended without a reply: what happened, in which step, and what to do."""
    log = f"COLMAP's log is in {work_dir}/colmap.log.*"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        if -returncode == signal.SIGKILL:
            return (f"the SfM process was killed (SIGKILL) during {step}, most often by the system's out-of-memory "
                    f"killer (see `dmesg`); run the same command again to resume from the matches, with fewer "
                    f"images or more memory if memory ran out; {log}")
        return (f"the SfM process crashed ({name}) during {step}, inside COLMAP; run the same command again to "
                f"resume from the matches, and if it crashes again, try --sfm.mapper global or another matcher; "
                f"{log}")
    return (f"the SfM process exited with status {returncode} during {step} without a reply (its output is "
            f"above); run the same command again to resume from the matches; {log}")


def _die_with_parent(parent_pid: int) -> None:
    """Linux: the kernel sends this process SIGKILL when the run that started it dies (see the module docstring);
    elsewhere an orphan runs to its end."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return
    prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


def child_main(request_path: str, reply_path: str) -> None:
    from . import SfMInputs, SfMOptions, current_step, on_step, reconstruct_here
    from ..progress import ProgressSink

    request = read_record(request_path)
    _die_with_parent(request["parent_pid"])
    logging.basicConfig(level=request["log_level"], format=request["log_format"] or logging.BASIC_FORMAT,
                        datefmt=request["log_datefmt"])
    pycolmap.logging.alsologtostderr = request["colmap_to_stderr"]
    on_step(lambda step: Path(request["step_path"]).write_text(step))
    inputs = SfMInputs.from_dict(request["inputs"])
    try:
        with ProgressSink.inherited():  # the child's warnings reach `recon run --progress-json` too
            result = reconstruct_here(inputs, SfMOptions(**request["options"]), request["stamp"])
    except ReconError as error:
        reply = {"error": {"type": type(error).__name__, "message": str(error), "step": current_step()}}
    except Exception as error:  # noqa: BLE001 (reported as one line by the parent, the traceback kept in a file)
        (inputs.work_dir / "error.txt").write_text(traceback.format_exc())
        reply = {"error": {"type": type(error).__name__, "message": str(error), "step": current_step()}}
    else:
        reply = {"result": result.to_dict()}
    write_record(reply_path, reply)

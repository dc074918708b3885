"""The SfM stage in a fresh Python process (`SfMOptions.fresh_process`, on by default).

COLMAP's mapper is slower in a process that has just extracted and matched: temple_ring_full's database, mapped
in one process right after recon's matching stage, took 17.5 / 11.1 / 9.0 s in three runs, and 10.5 / 6.9 /
7.2 s when the same process handed it to a spawned one (alternating runs, spawning included). The mapper is
single-threaded there and page faults do not explain it (fewer after matching, not more); the state that slows
it (heap layout, caches) is not isolated, and a fresh process avoids it for ~0.4 s of start-up. A crash inside
COLMAP then also ends in an error message rather than taking the pipeline down.

The child gets one JSON request (the inputs record, the options, the stamp, the logging set-up) and answers
with the result or the error's class and message, which the parent raises again as the same class.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import pycolmap

from feature_backends import errors
from feature_backends.errors import ReconError

logger = logging.getLogger(__name__)


def reconstruct_in_fresh_process(inputs, options, stamp: dict):
    """`recon.sfm.reconstruct_here` in a new interpreter; the child's log lines and progress bars go to stderr."""
    from . import SfMResult

    root = logging.getLogger()
    handler_format = next((h.formatter for h in root.handlers if h.formatter is not None), None)
    request = {
        "inputs": inputs.to_dict(), "options": asdict(options), "stamp": stamp,
        "log_level": logging.getLogger("recon").getEffectiveLevel(),
        "log_format": handler_format._fmt if handler_format else None,
        "log_datefmt": handler_format.datefmt if handler_format else None,
        "colmap_to_stderr": bool(pycolmap.logging.alsologtostderr),
    }
    with tempfile.TemporaryDirectory(prefix="recon-sfm-") as exchange:
        request_path, reply_path = Path(exchange, "request.json"), Path(exchange, "reply.json")
        request_path.write_text(json.dumps(request))
        # The package root goes first on the child's path, so a checkout that is not installed imports the same code.
        package_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
        process = subprocess.run(
            [sys.executable, "-c", "import sys, recon.sfm.process as p; p.child_main(*sys.argv[1:])",
             str(request_path), str(reply_path)], env=env, check=False)
        reply = json.loads(reply_path.read_text()) if reply_path.is_file() else {}
    if "result" in reply:
        return SfMResult.from_dict(reply["result"])
    if "error" in reply:
        error_class = getattr(errors, reply["error"]["type"], ReconError)
        raise error_class(reply["error"]["message"])
    if process.returncode < 0:
        reason = f"was killed by {signal.Signals(-process.returncode).name}"
    else:
        reason = f"exited with status {process.returncode} (traceback above)"
    raise ReconError(f"the SfM process {reason}; COLMAP's log is in {inputs.work_dir}/colmap.log.*")


def child_main(request_path: str, reply_path: str) -> None:
    from . import SfMInputs, SfMOptions, reconstruct_here
    from ..progress import ProgressSink

    request = json.loads(Path(request_path).read_text())
    logging.basicConfig(level=request["log_level"], format=request["log_format"] or logging.BASIC_FORMAT,
                        datefmt=request["log_datefmt"])
    pycolmap.logging.alsologtostderr = request["colmap_to_stderr"]
    try:
        with ProgressSink.inherited():  # the child's warnings reach `recon run --progress-json` too
            result = reconstruct_here(SfMInputs.from_dict(request["inputs"]), SfMOptions(**request["options"]),
                                      request["stamp"])
    except ReconError as error:
        reply = {"error": {"type": type(error).__name__, "message": str(error)}}
    else:
        reply = {"result": result.to_dict()}
    Path(reply_path).write_text(json.dumps(reply))

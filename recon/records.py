"""The small JSON records the stages keep next to their outputs (OUT/sfm/sfm_inputs.json, engine.json,
OUT/exports.json, run.json, frames.json), made safe against kill -9.

A record is written whole or not at all: to a temporary file in the same folder, then renamed over the old one
(`os.replace` is atomic on one file system), so a run killed while writing leaves the previous record or none,
never a truncated one. Reading treats a record that cannot be parsed (written by an older recon without the
rename and truncated, or damaged) as absent: every reader here is an up-to-date check, and "absent" makes the
stage redo its work instead of ending the run with a JSONDecodeError traceback.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def write_record(path: str | Path, record: Any, **dumps) -> Path:
    """`record` as JSON at `path`, replacing the old file in one rename (`dumps`: json.dumps keywords)."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")  # one writer per folder (recon.lock): a fixed name
    try:
        partial.write_text(json.dumps(record, **dumps))
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def read_record(path: str | Path) -> Any | None:
    """The JSON in `path`, or None when it is missing or cannot be parsed (logged: the caller redoes the work)."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        logger.warning("Ignoring unreadable record %s (%s: %s; an interrupted run?)", path, type(error).__name__,
                       error)
        return None

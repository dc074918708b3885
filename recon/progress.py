"""Progress for machines: `recon run --progress-json FILE` writes one JSON object per line as the run goes.

Events (every one has "event" and "time", seconds since the epoch):
    {"event": "run_start", "out_dir": ..., "num_images": N}
    {"event": "stage_start", "stage": "extract"}
    {"event": "items", "stage": "features", "done": 12, "total": 12}
    {"event": "stage_end", "stage": "extract", "seconds": 3.2}
    {"event": "warning", "logger": "recon.…", "message": "..."}   (every WARNING logged during the run)
    {"event": "run_end", "seconds": 41.0, "registered": 10, "num_images": 12}
    {"event": "error", "type": "ReconError", "message": "..."}   (instead of run_end when the run fails)
Lines are flushed as written, so a GUI or a scheduler can tail the file. While a sink is open its path is in
$RECON_PROGRESS_JSON, so the SfM stage's fresh process (recon.sfm.process) appends its warnings to the same file
(`ProgressSink.inherited()`; the parent writes nothing while it waits for the child). Item counts are reported where
they are known for free (at a stage's end: images extracted, pairs planned/matched, views registered), not per item.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

ENV = "RECON_PROGRESS_JSON"


class ProgressSink:
    """Writes events to a JSON-lines file; `ProgressSink(None)` is a sink that writes nothing."""

    def __init__(self, path: str | Path | None):
        self._file = None
        self._handler = None
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
            self._handler = _WarningHandler(self)
            logging.getLogger().addHandler(self._handler)
            self._previous_env = os.environ.get(ENV)
            os.environ[ENV] = str(Path(path).resolve())

    @classmethod
    def inherited(cls) -> ProgressSink:
        """The sink of the process that started this one (a sink writing nothing when there is none)."""
        return cls(os.environ.get(ENV) or None)

    def emit(self, event: str, **fields: Any) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps({"event": event, "time": round(time.time(), 3), **fields}, default=str) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._handler is not None:
            logging.getLogger().removeHandler(self._handler)
            self._handler = None
            if self._previous_env is None:
                os.environ.pop(ENV, None)
            else:
                os.environ[ENV] = self._previous_env
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> ProgressSink:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if error is not None:
            self.emit("error", type=kind.__name__, message=str(error))
        self.close()


class _WarningHandler(logging.Handler):
    def __init__(self, sink: ProgressSink):
        super().__init__(level=logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sink.emit("warning", logger=record.name, message=record.getMessage())
        except Exception:  # noqa: BLE001 (a progress file must never break the run)
            self.handleError(record)

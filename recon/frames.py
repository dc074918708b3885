"""The frames stage: videos (and photos beside them) in, OUT/frames/ out, one sub-folder (sequence, camera) per video.

`write_frames(inputs, out_dir, options)` decodes every video with OpenCV's FFmpeg backend (rotation metadata
applied: `CAP_PROP_ORIENTATION_AUTO`), picks keyframes, writes them once as JPEG at the original resolution to
`OUT/frames/<video path without suffix>/t<seconds>.jpg`, links the photos of a mixed folder under their own
relative names, and records every frame's decision in `OUT/frames.json` (the pipeline copies it into run.json).

Keyframe selection, in three rules a user can check against the record:
1. **Rate**: the video is cut into intervals of `1 / target_rate` seconds (or `duration / target_frames`); each
   interval gives at most one keyframe, its sharpest frame.
2. **Sharpness**: sharpness is the variance of the Laplacian of the grayscale frame (at `analysis_size`). A frame
   is *blurred* when its sharpness is below `blur_ratio` × the median of the frames within `blur_window` seconds
   around it: blur is judged against the neighbours, so a low-texture scene is not all rejected.
3. **Redundancy**: corners of the previous keyframe are tracked into the candidate (pyramidal Lucas-Kanade); if
   their median displacement is below `min_motion` × the image diagonal, the candidate adds no new view and is
   *redundant* (a duplicated frame moves 0 px; a camera standing still gives nothing new). Rotation counts as
   motion here: this is image motion, the measurable proxy for parallax between two frames.
Decisions per frame: `kept`, `blurred`, `redundant`, `not-sharpest` (another frame of its interval was sharper).

Resume: frames.json stores each video's size, mtime and the options; a rerun with the same ones decodes nothing,
and a run interrupted mid-video rewrites no JPEG already on disk (names depend only on the timestamp).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from feature_backends.errors import InputError
from feature_backends.images import IMAGE_EXTENSIONS

from .options import option, to_dict
from .records import read_record, write_record

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = frozenset({".mp4", ".mov", ".m4v", ".avi", ".mkv", ".webm", ".mts", ".3gp", ".mpg", ".mpeg"})
FRAMES_RECORD = "frames.json"


@dataclass
class FrameOptions:
    target_rate: float = option(2.0, help="keyframes per second of video (at most one per interval)")
    target_frames: int | None = option(None, help="keyframes per video (overrides --frames.target-rate)")
    blur_ratio: float = option(0.6, help="a frame is blurred below this fraction of its neighbours' median sharpness")
    blur_window: float = option(0.5, help="seconds on each side whose frames are a frame's neighbours")
    min_motion: float = option(0.005, help="a candidate whose tracked corners moved less than this fraction of the "
                                          "image diagonal since the previous keyframe is redundant")
    analysis_size: int = option(480, help="longer side (px) of the grayscale copy used for sharpness and tracking")
    jpeg_quality: int = option(95, help="JPEG quality of the written frames")

    def check(self) -> None:
        if self.target_rate <= 0 or (self.target_frames is not None and self.target_frames < 1):
            raise InputError("--frames.target-rate must be > 0 and --frames.target-frames >= 1")
        if not 0 <= self.blur_ratio < 1 or self.blur_window < 0 or self.min_motion < 0:
            raise InputError("--frames.blur-ratio must be in [0, 1), blur-window and min-motion >= 0")


def is_video(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def find_inputs(inputs: Sequence[str | Path]) -> tuple[list[tuple[Path, str]], list[tuple[Path, str]]]:
    """(videos, photos) as (path, name) pairs: a video's name is its sequence folder (relative path without the
    suffix), a photo's name its path relative to the folder given. Files given directly count by their stem."""
    videos, photos = [], []
    for given in map(Path, inputs):
        if given.is_file():
            if not is_video(given):
                raise InputError(f"'{given}' is neither a video ({', '.join(sorted(VIDEO_EXTENSIONS))}) nor a folder")
            videos.append((given, given.stem))
            continue
        if not given.is_dir():
            raise InputError(f"input '{given}' does not exist")
        for root, dirs, files in os.walk(given, followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for file in sorted(files):
                path = Path(root) / file
                relative = path.relative_to(given).as_posix()
                if file.startswith("."):
                    continue
                if is_video(path):
                    videos.append((path, relative.rsplit(".", 1)[0]))
                elif path.suffix.lower() in IMAGE_EXTENSIONS:
                    photos.append((path, relative))
    names = [name for _, name in videos]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InputError(f"several videos would write frames to the same folder '{duplicates[0]}'; rename one")
    clash = sorted({p.split("/")[0] for _, p in photos} & {n.split("/")[0] for n in names if "/" not in n})
    if clash:
        raise InputError(f"photo folder '{clash[0]}' has the name of a video's frame folder; rename the video")
    return videos, photos


def has_video(inputs: Sequence[str | Path]) -> bool:
    """Whether `recon run` must extract frames first: a video given, or a folder holding one."""
    for given in map(Path, inputs):
        if given.is_file() and is_video(given):
            return True
        if given.is_dir() and any(is_video(p) for p in given.rglob("*") if not p.name.startswith(".")):
            return True
    return False


def frame_name(sequence: str, seconds: float) -> str:
    return f"{sequence}/t{seconds:010.3f}.jpg"


@dataclass
class _Frame:
    index: int
    t: float
    sharpness: float
    gray: np.ndarray
    image: np.ndarray | None  # BGR at full resolution


def _analysis_copy(frame: np.ndarray, size: int) -> np.ndarray:
    gray = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
    scale = size / max(gray.shape)
    if scale < 1:
        gray = cv2.resize(gray, (round(gray.shape[1] * scale), round(gray.shape[0] * scale)),
                          interpolation=cv2.INTER_AREA)
    return gray


def sharpness(gray: np.ndarray) -> float:
    """Variance of the Laplacian (Pech-Pacheco et al. 2000): high for crisp edges, low for blur."""
    return float(cv2.Laplacian(gray, cv2.CV_64F).var())


class _MotionTracker:
    """Median displacement of the previous keyframe's corners tracked into a candidate (pyramidal LK)."""

    def __init__(self):
        self.reference: np.ndarray | None = None
        self.corners: np.ndarray | None = None

    def set_reference(self, gray: np.ndarray) -> None:
        self.reference = gray
        self.corners = cv2.goodFeaturesToTrack(gray, maxCorners=400, qualityLevel=0.01, minDistance=7)

    def motion(self, gray: np.ndarray) -> float:
        """Pixels of the analysis copy; inf when there is no reference or too few corners survive tracking."""
        if self.reference is None or self.corners is None or len(self.corners) < 8:
            return math.inf
        tracked, status, _ = cv2.calcOpticalFlowPyrLK(self.reference, gray, self.corners, None, winSize=(21, 21),
                                                      maxLevel=4)
        ok = status.ravel() == 1
        if ok.sum() < max(8, 0.2 * len(self.corners)):
            return math.inf  # the view changed too much to track: certainly not redundant
        return float(np.median(np.linalg.norm((tracked - self.corners).reshape(-1, 2)[ok], axis=1)))


def _timestamp(capture: cv2.VideoCapture, index: int, fps: float, previous: float | None) -> float:
    milliseconds = capture.get(cv2.CAP_PROP_POS_MSEC)
    seconds = milliseconds / 1000.0 if milliseconds > 0 or index == 0 else index / fps
    if previous is not None and seconds <= previous:  # containers without usable timestamps
        seconds = index / fps
    return round(seconds, 3)


def _open(path: Path) -> tuple[cv2.VideoCapture, float, int]:
    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    if not capture.isOpened():
        raise InputError(f"cannot open video '{path}' (OpenCV's FFmpeg backend could not read it)")
    capture.set(cv2.CAP_PROP_ORIENTATION_AUTO, 1)
    fps = capture.get(cv2.CAP_PROP_FPS) or 30.0
    return capture, fps, int(capture.get(cv2.CAP_PROP_FRAME_COUNT))


class _Selector:
    """Streams frames in: blur is decided once the frames `blur_window` after a frame are known, then each
    interval's sharpest non-blurred frame is checked for redundancy and written."""

    def __init__(self, options: FrameOptions, interval: float, sequence: str, frames_dir: Path):
        self.options, self.interval, self.sequence, self.frames_dir = options, interval, sequence, frames_dir
        self.records: list[dict] = []
        self.sharpness: list[tuple[float, float]] = []  # (t, sharpness) of every frame so far
        self.pending: deque[_Frame] = deque()
        self.best: _Frame | None = None
        self.bin: int | None = None
        self.tracker = _MotionTracker()
        self.kept: list[str] = []
        self.diagonal = 0.0

    def add(self, frame: _Frame) -> None:
        self.records.append({"index": frame.index, "t": frame.t, "sharpness": round(frame.sharpness, 2)})
        self.sharpness.append((frame.t, frame.sharpness))
        self.pending.append(frame)
        while self.pending and frame.t - self.pending[0].t >= self.options.blur_window:
            self._judge_blur(self.pending.popleft())

    def finish(self) -> None:
        while self.pending:
            self._judge_blur(self.pending.popleft())
        self._close_interval()

    def _judge_blur(self, frame: _Frame) -> None:
        window = self.options.blur_window
        # Neighbours only: the frame's own sharpness must not pull the median it is compared with.
        neighbours = [s for t, s in self.sharpness if abs(t - frame.t) <= window and t != frame.t]
        median = float(np.median(neighbours)) if neighbours else frame.sharpness
        record = self.records[frame.index]
        record["local_median"] = round(median, 2)
        if frame.sharpness < self.options.blur_ratio * median:
            record["status"] = "blurred"
            return
        interval = int(frame.t // self.interval)
        if interval != self.bin:
            self._close_interval()
            self.bin = interval
        if self.best is None or frame.sharpness > self.best.sharpness:
            if self.best is not None:
                self.records[self.best.index]["status"] = "not-sharpest"
            self.best = frame
        else:
            record["status"] = "not-sharpest"
            frame.image = None

    def _close_interval(self) -> None:
        frame, self.best = self.best, None
        if frame is None:
            return
        record = self.records[frame.index]
        self.diagonal = float(np.hypot(*frame.gray.shape))
        motion = self.tracker.motion(frame.gray)
        record["motion"] = None if math.isinf(motion) else round(motion / self.diagonal, 5)
        if motion < self.options.min_motion * self.diagonal:
            record["status"] = "redundant"
            return
        name = frame_name(self.sequence, frame.t)
        path = self.frames_dir / name
        if not path.is_file():  # written once: a resumed run keeps what is there
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(".partial.jpg")
            if not cv2.imwrite(str(partial), frame.image, [cv2.IMWRITE_JPEG_QUALITY, self.options.jpeg_quality]):
                raise InputError(f"cannot write frame '{partial}'")
            partial.replace(path)
        record.update(status="kept", file=name)
        self.kept.append(name)
        self.tracker.set_reference(frame.gray)
        frame.image = None


def select_keyframes(video: Path, sequence: str, frames_dir: Path, options: FrameOptions) -> dict:
    """Decode `video`, write its keyframes under frames_dir/sequence/, return its record (see module doc)."""
    capture, fps, count = _open(video)
    duration = count / fps if count > 0 else 0.0
    interval = duration / options.target_frames if options.target_frames and duration > 0 else 1.0 / options.target_rate
    selector = _Selector(options, interval, sequence, frames_dir)
    index, previous, size = 0, None, None
    try:
        while True:
            ok, image = capture.read()
            if not ok:
                break
            t = _timestamp(capture, index, fps, previous)
            gray = _analysis_copy(image, options.analysis_size)
            size = image.shape[1], image.shape[0]
            selector.add(_Frame(index, t, sharpness(gray), gray, image))
            previous, index = t, index + 1
        selector.finish()
    finally:
        rotation = capture.get(cv2.CAP_PROP_ORIENTATION_META)
        capture.release()
    if index == 0:
        raise InputError(f"no frame could be decoded from '{video}'")
    counts = {}
    for record in selector.records:
        counts[record.get("status")] = counts.get(record.get("status"), 0) + 1
    logger.info("Frames of %s: %d decoded, %d kept, %d blurred, %d redundant, %d not the sharpest of their interval",
                video.name, index, counts.get("kept", 0), counts.get("blurred", 0), counts.get("redundant", 0),
                counts.get("not-sharpest", 0))
    for record in selector.records:
        logger.debug("%s frame %d t=%.3f: %s", sequence, record["index"], record["t"], record.get("status"))
    return {"video": str(video.resolve()), "sequence": sequence, "fps": fps, "num_decoded": index,
            "size": list(size), "rotation_metadata": rotation, "interval": interval,
            "counts": counts, "kept": selector.kept, "frames": selector.records}


def _fingerprint(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def write_frames(inputs: Sequence[str | Path], out_dir: str | Path, options: FrameOptions | None = None) -> Path:
    """OUT/frames with every video's keyframes and every photo linked; OUT/frames.json; returns OUT/frames."""
    options = options or FrameOptions()
    options.check()
    out_dir = Path(out_dir)
    frames_dir = out_dir / "frames"
    frames_dir.mkdir(parents=True, exist_ok=True)
    videos, photos = find_inputs(inputs)
    record_path = out_dir / FRAMES_RECORD
    old = read_record(record_path) or {}
    settings = to_dict(options)
    record = {"options": settings, "videos": {}, "photos": [name for _, name in photos]}
    for path, sequence in videos:
        previous = old.get("videos", {}).get(sequence)
        if (previous and old.get("options") == settings and previous.get("fingerprint") == _fingerprint(path)
                and all((frames_dir / name).is_file() for name in previous["kept"])):
            logger.info("Frames of %s are up to date (%d keyframes)", path.name, len(previous["kept"]))
            record["videos"][sequence] = previous
            continue
        record["videos"][sequence] = {**select_keyframes(path, sequence, frames_dir, options),
                                      "fingerprint": _fingerprint(path)}
        write_record(record_path, record, indent=1)
    for path, name in photos:
        link = frames_dir / name
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(path.resolve(), link)
    write_record(record_path, record, indent=1)
    return frames_dir


def frame_names(out_dir: str | Path) -> list[str]:
    """The image names the frames stage produced (keyframes of every video, then the photos)."""
    record = json.loads((Path(out_dir) / FRAMES_RECORD).read_text())
    return [name for video in record["videos"].values() for name in video["kept"]] + record["photos"]


def sequence_folders(out_dir: str | Path) -> list[str]:
    record = json.loads((Path(out_dir) / FRAMES_RECORD).read_text())
    return sorted(record["videos"])

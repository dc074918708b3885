"""The only module that touches HDF5: hloc's features.h5, matches.h5 and global-feats.h5.

Layout (identical to hloc, so files move both ways):
- features.h5: one group per image, named by its path relative to the image folder ('/' makes nested groups);
  datasets `keypoints` (N,2) (hloc convention: pixel centres at integer coordinates), `descriptors` (D,N),
  `scores` (N,), `image_size` (2,) = (width, height); attribute `uncertainty` on keypoints.
  Keypoints stay float32 even when descriptors are stored as float16 (hloc's `as_half` also halves keypoints,
  which snaps coordinates above 2048 px to 2-px steps).
- matches.h5: group `names_to_pair(name0, name1)` with `matches0` (N0,) int32 (-1 = unmatched) and
  `matching_scores0` (N0,). Readers also find the reversed pair and hloc's legacy '_' separator, and read hloc's
  int16 matches and float16 keypoints.
- global-feats.h5: `/<name>/global_descriptor` (D,).

Keypoints added after detection (the anchored dense stage's propagation, `FeatureWriter.append_keypoints`) are
appended after the detected ones, which keep their indices; `keypoints.attrs['detected']` counts the detected
ones. An added keypoint was not detected: its descriptor is zeros, its score 0 and any further per-keypoint
dataset (SIFT's scales, orientations) 0. Its datasets are then chunked and resizable, which hloc reads as any other.

Crash safety: writers work on `<file>.partial` and publish it with an atomic rename at checkpoints (every
`checkpoint_seconds`, adaptively longer for big files) and on exit, including on exceptions and Ctrl-C. The
published file is therefore always a complete, closed HDF5 file; a run killed with SIGKILL loses at most the last
checkpoint interval, and the next run resumes from the published file. HDF5 itself offers no such guarantee
(SWMR forbids creating groups), hence this journal.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .errors import ConfigError, InputError, OutputError, ReconError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_CONF_ATTR = "recon_conf"
# matches.h5: per image, the fingerprint of the features the matches index (a dataset of JSON bytes, since
# attributes are limited to 64 kB; the leading '.' keeps it apart from pair keys, as no image name starts so).
_FINGERPRINTS = ".recon-features"


def names_to_pair(name0: str, name1: str, separator: str = "/") -> str:
    return separator.join((name0.replace("/", "-"), name1.replace("/", "-")))


def names_to_pair_legacy(name0: str, name1: str) -> str:
    return names_to_pair(name0, name1, separator="_")


def _open_for_reading(path: str | Path) -> h5py.File:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"HDF5 file '{path}' does not exist")
    try:
        return h5py.File(path, "r", locking=False)
    except OSError as error:
        raise ReconError(f"'{path}' is not a readable HDF5 file ({error}); delete it to recompute") from error


def _output_error(path: Path, error: OSError) -> ReconError:
    full = error.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(error)
    what = "the disk is full" if full else f"writing failed ({error})"
    kept = f"'{path}' still holds what it held before" if path.exists() else f"'{path}' was not written"
    return OutputError(f"{what} while writing '{path}'; {kept}; free space and run again to resume")


def _read_fingerprints(file: h5py.File) -> dict[str, str] | None:
    if _FINGERPRINTS not in file:
        return None
    return json.loads(file[_FINGERPRINTS][()].tobytes().decode())


def _walk_datasets_parent(group: h5py.Group, marker: str, prefix: str = "") -> Iterator[str]:
    """Names of groups below `group` that hold a dataset called `marker` (image names may be nested)."""
    for key, item in group.items():
        if isinstance(item, h5py.Group):
            name = f"{prefix}{key}"
            if marker in item and isinstance(item[marker], h5py.Dataset):
                yield name
            else:
                yield from _walk_datasets_parent(item, marker, name + "/")


class _Journal:
    """An HDF5 file opened for appending through a `.partial` copy, published atomically."""

    def __init__(self, path: str | Path, conf: Mapping[str, Any] | None, checkpoint_seconds: float,
                 before_publish: Callable[[], None] | None = None):
        self.path = Path(path)
        self.before_publish = before_publish
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.checkpoint_seconds = checkpoint_seconds
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.partial.exists():
            logger.info("Discarding %s left by an interrupted run; resuming from %s", self.partial, self.path)
            self.partial.unlink()
        if self.path.exists():
            _open_for_reading(self.path).close()  # a corrupt file is reported, never silently overwritten
            try:
                shutil.copyfile(self.path, self.partial)
            except OSError as error:
                self.partial.unlink(missing_ok=True)
                raise _output_error(self.path, error) from error
        self.file = h5py.File(self.partial, "a", locking=False)
        self._check_conf(conf)
        self._last_checkpoint = time.monotonic()
        self._copy_seconds = 0.0
        self.dirty = False

    def _check_conf(self, conf: Mapping[str, Any] | None) -> None:
        self._conf_changed = False
        if conf is None:
            return
        text = json.dumps(conf, sort_keys=True, default=str)
        stored = self.file.attrs.get(_CONF_ATTR)
        self._conf_changed = stored != text
        if stored is not None and stored != text and len(self.file.keys()) > 0:
            self.file.close()
            self.partial.unlink()
            raise ConfigError(
                f"'{self.path}' was written with a different configuration:\n  stored: {stored}\n  now:    {text}\n"
                "Write to a new file, or delete this one to recompute."
            )
        self.file.attrs[_CONF_ATTR] = text
        self.file.attrs["recon_format_version"] = FORMAT_VERSION

    def maybe_checkpoint(self) -> None:
        interval = max(self.checkpoint_seconds, 20 * self._copy_seconds)
        if self.dirty and time.monotonic() - self._last_checkpoint > interval:
            self.publish(reopen=True)

    def publish(self, reopen: bool) -> None:
        try:
            self._publish(reopen)
        except OSError as error:
            self.discard()
            raise _output_error(self.path, error) from error

    def discard(self) -> None:
        """Drop the journal (after a failed write): the published file keeps what it held."""
        try:
            if self.file.id.valid:
                self.file.close()
        except OSError:
            pass
        self.partial.unlink(missing_ok=True)

    def _publish(self, reopen: bool) -> None:
        if self.before_publish is not None:  # e.g. publish the keypoints these matches refer to first
            self.before_publish()
        self.file.flush()
        self.file.close()
        os.replace(self.partial, self.path)
        if reopen:
            start = time.monotonic()
            shutil.copyfile(self.path, self.partial)
            self._copy_seconds = time.monotonic() - start
            self.file = h5py.File(self.partial, "a", locking=False)
        self._last_checkpoint = time.monotonic()
        self.dirty = False

    def close(self) -> None:
        if not self.file.id.valid:
            return
        if self.dirty or not self.path.exists() or self._conf_changed:
            self.publish(reopen=False)
        else:  # nothing new: leave the published file (and its mtime) untouched
            self.file.close()
            self.partial.unlink()


class _Closing:
    """`with`-support for the readers and writers: leaving the block closes (and, for writers, publishes)."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class _Writer(_Closing):
    def __init__(self, path: str | Path, conf: Mapping[str, Any] | None = None, checkpoint_seconds: float = 30.0,
                 before_publish: Callable[[], None] | None = None):
        self._journal = _Journal(path, conf, checkpoint_seconds, before_publish)
        self.path = self._journal.path

    @property
    def _file(self) -> h5py.File:
        return self._journal.file

    def _committed(self) -> None:
        self._journal.dirty = True
        self._journal.maybe_checkpoint()

    def close(self) -> None:
        self._journal.close()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and issubclass(exc_type, OSError):
            # A failed write (a full disk, an I/O error) may have left the journal half-written: never publish it.
            self._journal.discard()
            raise _output_error(self.path, exc) from exc
        self.close()

    def publish(self) -> None:
        """Publish what was written so far now (a checkpoint out of turn); nothing if nothing was written."""
        if self._journal.dirty:
            self._journal.publish(reopen=True)


def _per_keypoint_axes(group: h5py.Group, count: int) -> dict[str, int]:
    """The datasets of an image's features group that hold one entry per keypoint, and along which axis."""
    axes = {}
    for key, item in group.items():
        if key == "image_size" or not isinstance(item, h5py.Dataset) or item.ndim == 0:
            continue
        if key == "descriptors" and item.ndim == 2 and item.shape[1] == count:
            axes[key] = 1
        elif key != "descriptors" and item.shape[0] == count:
            axes[key] = 0
    return axes


def _resizable(group: h5py.Group, key: str, axis: int) -> h5py.Dataset:
    """The dataset, recreated chunked and resizable along `axis` if it was written with a fixed size."""
    dataset = group[key]
    if dataset.maxshape[axis] is None:
        return dataset
    data, attrs = dataset[()], dict(dataset.attrs)
    del group[key]
    maxshape = list(data.shape)
    maxshape[axis] = None
    chunks = list(data.shape)
    chunks[axis] = 1024
    dataset = group.create_dataset(key, data=data, maxshape=tuple(maxshape), chunks=tuple(max(1, c) for c in chunks))
    dataset.attrs.update(attrs)
    return dataset


class FeatureWriter(_Writer):
    """Append images to a features.h5; `names` are those already stored (skip them to resume)."""

    def __init__(self, path, conf=None, as_half: bool = False, checkpoint_seconds: float = 30.0):
        super().__init__(path, conf, checkpoint_seconds)
        self.as_half = as_half
        self.names = set(_walk_datasets_parent(self._file, "keypoints"))

    def write(self, name: str, features: Mapping[str, np.ndarray], uncertainty: float | None = None) -> None:
        if name in self._file:
            del self._file[name]
        group = self._file.create_group(name)
        for key, value in features.items():
            value = np.asarray(value)
            if self.as_half and key != "keypoints" and value.dtype == np.float32:
                value = value.astype(np.float16)
            group.create_dataset(key, data=value)
        if uncertainty is not None:
            group["keypoints"].attrs["uncertainty"] = uncertainty
        self.names.add(name)
        self._committed()

    def append_keypoints(self, name: str, keypoints: np.ndarray) -> None:
        """Append keypoints that were not detected (see the module docstring) to an image's features."""
        keypoints = np.asarray(keypoints, np.float32).reshape(-1, 2)
        if len(keypoints) == 0:
            return
        group = self._file[name]
        count = len(group["keypoints"])
        if "detected" not in group["keypoints"].attrs:
            group["keypoints"].attrs["detected"] = count
        for key, axis in _per_keypoint_axes(group, count).items():
            dataset = _resizable(group, key, axis)
            shape = list(dataset.shape)
            shape[axis] = count + len(keypoints)
            dataset.resize(tuple(shape))
            index = (slice(None),) * axis + (slice(count, None),)
            dataset[index] = keypoints if key == "keypoints" else 0
        self._committed()

    def truncate_keypoints(self, name: str, count: int) -> None:
        """Drop appended keypoints from index `count` on (never detected ones)."""
        group = self._file[name]
        total, detected = len(group["keypoints"]), int(group["keypoints"].attrs.get("detected", len(group["keypoints"])))
        if count < detected:
            raise ValueError(f"'{name}': cannot drop detected keypoints ({count} < {detected})")
        if count >= total:
            return
        for key, axis in _per_keypoint_axes(group, total).items():
            shape = list(group[key].shape)
            shape[axis] = count
            group[key].resize(tuple(shape))
        self._committed()


class MatchWriter(_Writer):
    """Append pairs to a matches.h5 under hloc's pair key. `before_publish` runs before every publication (for
    the dense stage: publish the keypoints that the matches refer to first)."""

    def __init__(self, path, conf=None, checkpoint_seconds: float = 30.0,
                 before_publish: Callable[[], None] | None = None):
        super().__init__(path, conf, checkpoint_seconds, before_publish)

    def has(self, name0: str, name1: str) -> bool:
        return _find_pair(self._file, name0, name1) is not None

    def adopt_features(self, current: Mapping[str, str]) -> set[str]:
        """Record the fingerprints of the features the matches are made from (`feature_fingerprint`); return
        the images whose stored pairs were made from other features and were therefore dropped. A file without
        a record (hloc's, or an older recon's) is trusted as before."""
        stored = _read_fingerprints(self._file)
        stale = set() if stored is None else {n for n, f in current.items() if stored.get(n, f) != f}
        if stale:
            flat = {name.replace("/", "-") for name in stale}
            for key0 in list(self._file.keys()):
                item = self._file[key0]
                if not isinstance(item, h5py.Group):
                    continue
                if key0 in flat:
                    del self._file[key0]
                    continue
                for key1 in [k for k in item.keys() if k in flat]:
                    del item[key1]
        merged = {**(stored or {}), **current}
        if merged != stored:
            if _FINGERPRINTS in self._file:
                del self._file[_FINGERPRINTS]
            self._file.create_dataset(_FINGERPRINTS, data=np.frombuffer(json.dumps(merged).encode(), np.uint8))
            self._committed()
        return stale

    def read_raw(self, name0: str, name1: str) -> tuple[dict[str, np.ndarray], bool]:
        """What `MatchReader.read_raw` returns, from the file being written."""
        key, reversed_ = _find_pair(self._file, name0, name1)
        return {k: v[()] for k, v in self._file[key].items()}, reversed_

    def write(self, name0: str, name1: str, data: Mapping[str, np.ndarray]) -> None:
        key = names_to_pair(name0, name1)
        if key in self._file:
            del self._file[key]
        group = self._file.create_group(key)
        for name, value in data.items():
            value = np.asarray(value)
            if name == "matches0":
                value = value.astype(np.int32)
            group.create_dataset(name, data=value)
        self._committed()


class GlobalWriter(_Writer):
    """Append global descriptors to a global-feats.h5."""

    def __init__(self, path, conf=None, checkpoint_seconds: float = 30.0):
        super().__init__(path, conf, checkpoint_seconds)
        self.names = set(_walk_datasets_parent(self._file, "global_descriptor"))

    def write(self, name: str, descriptor: np.ndarray) -> None:
        if name in self._file:
            del self._file[name]
        self._file.create_group(name).create_dataset("global_descriptor", data=np.asarray(descriptor))
        self.names.add(name)
        self._committed()


def _find_pair(file: h5py.File, name0: str, name1: str) -> tuple[str, bool] | None:
    """The stored key for (name0, name1) and whether it is stored reversed, as hloc's find_pair."""
    for key, reversed_ in (
        (names_to_pair(name0, name1), False),
        (names_to_pair(name1, name0), True),
        (names_to_pair_legacy(name0, name1), False),
        (names_to_pair_legacy(name1, name0), True),
    ):
        if key in file and isinstance(file[key], h5py.Group):
            return key, reversed_
    return None


class _Reader(_Closing):
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file = _open_for_reading(self.path)

    def close(self) -> None:
        self._file.close()


class FeatureReader(_Reader):
    """Read a features.h5 (ours or hloc's) with the file kept open."""

    def names(self) -> list[str]:
        return sorted(_walk_datasets_parent(self._file, "keypoints"))

    def __contains__(self, name: str) -> bool:
        return name in self._file and "keypoints" in self._file[name]

    def read(self, name: str, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        if name not in self:
            raise InputError(f"image '{name}' has no features in '{self.path}'")
        group = self._file[name]
        out = {key: group[key][()] for key in (keys or group.keys()) if key in group}
        if "keypoints" in out:
            out["keypoints"] = out["keypoints"].astype(np.float32)
        if "descriptors" in out and out["descriptors"].dtype == np.float16:
            out["descriptors"] = out["descriptors"].astype(np.float32)
        return out

    def read_keypoints(self, name: str) -> np.ndarray:
        return self.read(name, ["keypoints"])["keypoints"]

    def keypoint_counts(self, name: str) -> tuple[int, int]:
        """(keypoints stored, of which detected): see `FeatureWriter.append_keypoints`."""
        keypoints = self._file[name]["keypoints"]
        return len(keypoints), int(keypoints.attrs.get("detected", len(keypoints)))

    def fingerprint(self, name: str) -> str:
        """'<keypoint count>:<hash of the keypoints>': what a matches file must have been made from."""
        keypoints = np.ascontiguousarray(self._file[name]["keypoints"][()], dtype=np.float32)
        return f"{len(keypoints)}:{hashlib.blake2b(keypoints.tobytes(), digest_size=8).hexdigest()}"

    def uncertainty(self, name: str) -> float | None:
        value = self._file[name]["keypoints"].attrs.get("uncertainty")
        return None if value is None else float(value)



class MatchReader(_Reader):
    """Read a matches.h5 (ours or hloc's), finding reversed and legacy pair keys."""

    def feature_fingerprints(self) -> dict[str, str] | None:
        """Per image, the fingerprint of the features these matches were made from (None: not recorded)."""
        return _read_fingerprints(self._file)

    def has(self, name0: str, name1: str) -> bool:
        return _find_pair(self._file, name0, name1) is not None

    def read(self, name0: str, name1: str) -> tuple[np.ndarray, np.ndarray]:
        """Matches as (M,2) indices into (name0, name1) keypoints, and their scores (M,)."""
        found = _find_pair(self._file, name0, name1)
        if found is None:
            raise InputError(f"pair ({name0}, {name1}) is not in '{self.path}'")
        key, reversed_ = found
        group = self._file[key]
        matches0 = group["matches0"][()].astype(np.int64)
        valid = np.flatnonzero(matches0 >= 0)
        matches = np.stack([valid, matches0[valid]], axis=-1)
        if "matching_scores0" in group:
            scores = group["matching_scores0"][()].astype(np.float32)[valid]
        else:
            scores = np.ones(len(valid), np.float32)
        if reversed_:
            matches = matches[:, ::-1].copy()
        return matches, scores

    def read_raw(self, name0: str, name1: str) -> tuple[dict[str, np.ndarray], bool]:
        """All datasets of the pair's group, and whether they are stored in the reversed direction."""
        found = _find_pair(self._file, name0, name1)
        if found is None:
            raise InputError(f"pair ({name0}, {name1}) is not in '{self.path}'")
        key, reversed_ = found
        return {k: v[()] for k, v in self._file[key].items()}, reversed_



def read_global_descriptors(path: str | Path, names: Iterable[str] | None = None) -> tuple[list[str], np.ndarray]:
    """Names and stacked (N,D) float32 descriptors of a global-feats.h5 (all names when `names` is None)."""
    with _open_for_reading(path) as file:
        available = sorted(_walk_datasets_parent(file, "global_descriptor"))
        wanted = available if names is None else list(names)
        missing = sorted(set(wanted) - set(available))
        if missing:
            raise InputError(f"{len(missing)} images have no global descriptor in '{path}', e.g. {missing[:3]}")
        if not wanted:
            return [], np.zeros((0, 0), np.float32)
        descriptors = np.stack([file[name]["global_descriptor"][()] for name in wanted]).astype(np.float32)
    return wanted, descriptors


def list_feature_names(path: str | Path) -> list[str]:
    with FeatureReader(path) as reader:
        return reader.names()


def keypoint_counts(path: str | Path, names: Iterable[str]) -> dict[str, int]:
    """Keypoints stored per image, for those of `names` that are in the features file."""
    with FeatureReader(path) as reader:
        return {name: reader.keypoint_counts(name)[0] for name in names if name in reader}


def read_stored_conf(path: str | Path) -> dict[str, Any] | None:
    """The configuration a recon writer recorded in the file, or None (e.g. for hloc's files)."""
    with _open_for_reading(path) as file:
        text = file.attrs.get(_CONF_ATTR)
    return None if text is None else json.loads(text)

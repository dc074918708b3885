"""`recon weights list|check`: every registered backend's weight files, where they are, and their checksums."""

from __future__ import annotations

from feature_backends import registry
from feature_backends.errors import ReconError
from feature_backends.weights import WeightFile, find_weights, sha256_of


def _weight_table() -> list[tuple[str, str, str, WeightFile | None, str]]:
    """(kind, backend, variant, file, problem) for every registered backend."""
    rows = []
    for kind in registry.KINDS:
        for name in registry.names(kind):
            try:
                cls, preset = registry.resolve(kind, name)
            except ReconError as error:
                rows.append((kind, name, "-", None, f"unavailable: {error}"))
                continue
            if not cls.weight_files:
                rows.append((kind, name, "-", None, "no weights needed"))
            variants = cls.weight_files
            if preset.get("variant") in variants:  # a preset such as minima-roma needs only its own files
                variants = {preset["variant"]: variants[preset["variant"]]}
            for variant, files in variants.items():
                for weight in files:
                    rows.append((kind, name, variant, weight, ""))
    return rows


def list_weights() -> int:
    print(f"{'kind':<9} {'backend':<16} {'variant':<22} {'file':<36} {'status':<8} {'size':>10}  location / url")
    seen = set()
    for kind, name, variant, weight, problem in _weight_table():
        if weight is None:
            print(f"{kind:<9} {name:<16} {variant:<22} {'-':<36} {problem}")
            continue
        path = find_weights(weight)
        status = "present" if path else "missing"
        size = f"{path.stat().st_size / 1e6:.1f} MB" if path else (f"{weight.size / 1e6:.1f} MB" if weight.size else "?")
        where = str(path) if path else weight.url
        print(f"{kind:<9} {name:<16} {variant:<22} {weight.filename:<36} {status:<8} {size:>10}  {where}")
        seen.add(weight.filename)
    return 0


def check_weights() -> int:
    """Verify every present file; exit 1 on a mismatch. Unpinned files are reported with their hash."""
    failures = 0
    checked = set()
    for kind, name, variant, weight, _ in _weight_table():
        if weight is None or weight.filename in checked:
            continue
        checked.add(weight.filename)
        path = find_weights(weight)
        if path is None:
            print(f"missing   {weight.filename}  ({weight.url})")
            continue
        actual = sha256_of(path)
        if weight.sha256 is None:
            print(f"unpinned  {weight.filename}  sha256={actual}  {path}")
        elif actual == weight.sha256:
            print(f"ok        {weight.filename}  {path}")
        else:
            failures += 1
            print(f"MISMATCH  {weight.filename}  expected {weight.sha256}, got {actual}  {path}")
    return 1 if failures else 0

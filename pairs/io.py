"""pairs.txt, as hloc writes it: one `name0 name1` per line.

Image names may contain spaces in the wild (`IMG 0001.JPG`), which hloc's whitespace split cannot represent.
recon writes such a name in shell quoting (`'IMG 0001.JPG' IMG_0002.JPG`, Python's shlex) and reads quoted lines
back the same way; every other line is plain hloc. A pairs file with quoted names is recon's, not hloc's: hloc
would read the quotes as part of the name (README, "Resume and bad input").
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable
from pathlib import Path

from feature_backends.errors import InputError


def read_pairs(path: str | Path) -> list[tuple[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"pairs file '{path}' does not exist")
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            parts = shlex.split(line, posix=True) if ("'" in line or '"' in line) else line.split()
        except ValueError as error:
            raise InputError(f"{path}:{number}: {error} in '{line}'") from error
        if len(parts) < 2:
            raise InputError(f"{path}:{number}: expected 'name0 name1', got '{line}'")
        pairs.append((parts[0], parts[1]))
    return pairs


def write_pairs(path: str | Path, pairs: Iterable[tuple[str, str]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for name0, name1 in pairs:
        lines.append(f"{quote_name(name0)} {quote_name(name1)}\n")
    content = "".join(lines)
    if path.is_file() and path.read_text(encoding="utf-8") == content:
        return path  # unchanged: keep the mtime so later stages see up-to-date inputs
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(content, encoding="utf-8")
    tmp.replace(path)
    return path


def quote_name(name: str) -> str:
    """`name` as written in a pairs file: as is, or shell-quoted when it holds white space or a quote."""
    needs = any(char.isspace() for char in name) or "'" in name or '"' in name or name.startswith("#")
    return shlex.quote(name) if needs else name


def pair_key(name0: str, name1: str) -> tuple[str, str]:
    """The same key for a pair in either direction (names in sorted order): a pair is unordered."""
    return (name0, name1) if name0 <= name1 else (name1, name0)


def deduplicate(pairs: Iterable[tuple[str, str]], seen: set[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    """Drop self-pairs and repeated pairs in either direction, keeping first occurrences in order. `seen`
    (updated in place) carries the pairs already taken across calls."""
    seen = set() if seen is None else seen
    unique = []
    for name0, name1 in pairs:
        key = pair_key(name0, name1)
        if name0 != name1 and key not in seen:
            seen.add(key)
            unique.append((name0, name1))
    return unique


def check_names(pairs: Iterable[tuple[str, str]], known: Iterable[str], source: str) -> None:
    """A pairs file that names an image we do not have is an error, reported with examples."""
    known = set(known)
    unknown = sorted({name for pair in pairs for name in pair if name not in known})
    if unknown:
        raise InputError(f"{source} names {len(unknown)} unknown images, e.g. {unknown[:3]}")


def read_name_list(path: str | Path) -> list[str]:
    """A file of image names, one per line (blank lines and '#' comments skipped), as hloc's image lists."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image list '{path}' does not exist")
    names = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            names.append(line)
    if not names:
        raise InputError(f"image list '{path}' names no images")
    return names

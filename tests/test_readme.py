"""The README's Python code runs as written (in a folder holding a generated `images/`)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_python_blocks_run_as_written(synthetic_scene, tmp_path, monkeypatch):
    import shutil

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has a Python section"
    shutil.copytree(synthetic_scene / "images", tmp_path / "images")
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
    assert (tmp_path / "out" / "sparse" / "0" / "cameras.bin").is_file()
    assert (tmp_path / "out-sequential" / "sparse" / "0" / "cameras.bin").is_file()

"""Shared pytest fixtures."""

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The benchmark scenes in ../shared/data (relative to the repo root); tests using it skip when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def synthetic_scene(tmp_path_factory) -> Path:
    """A generated 12-frame scene with known poses: <dir>/images/*.png and the ground truth <dir>/gt/.

    Session-scoped and read-only: tests that write must write elsewhere (tmp_path).
    """
    from recon.synthetic import make_scene

    return make_scene(tmp_path_factory.mktemp("scene"))


@pytest.fixture(scope="session")
def synthetic_run(synthetic_scene, tmp_path_factory):
    """`recon run` with the defaults on the synthetic scene (shared by tests that only read its outputs)."""
    from recon.pipeline import run

    out = tmp_path_factory.mktemp("run")
    return run(synthetic_scene / "images", out)

from __future__ import annotations

from pathlib import Path

import pytest

from tests.acp.harness import WIRE_APIS


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    root = tmp_path / "workspace"
    root.mkdir()
    return root


@pytest.fixture
def xdg(tmp_path: Path) -> dict[str, str]:
    """Config and data dirs of the agent process, private to the test."""
    return {
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "XDG_DATA_HOME": str(tmp_path / "data"),
        "HELEXA_ACP_LOG": "INFO",
    }


@pytest.fixture(params=WIRE_APIS)
def wire_api(request: pytest.FixtureRequest) -> str:
    """Each wire API in turn: a test that takes ``wire_api`` runs once per wire."""
    return str(request.param)

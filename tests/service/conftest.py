"""Fixtures of the service tests: one CPU runtime on the session's tiny bundle."""

from __future__ import annotations

from pathlib import Path

import pytest

from vaegan.service.runtime import Runtime


@pytest.fixture(scope="session")
def runtime(tiny_bundle: Path) -> Runtime:
    return Runtime.load(tiny_bundle, providers="cpu")

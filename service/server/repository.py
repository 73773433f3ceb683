"""The models a server serves: one bundle (``--model``) or a model repository
(``--model-repository DIR``, Triton's layout ``DIR/<model name>/<version>/`` with a bundle in each
version folder; versions are positive integers).

:class:`ModelSet` holds the loaded versions and answers which one a request gets; the server
(:mod:`service.server.app`) loads and unloads them. A version is only added once its bundle is
verified and warmed up, so a request never meets a half-loaded model. A retired version stops
taking new requests at once and is closed only when the requests using it have finished.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from vaegan.service.runtime import InvalidInput, ModelNotReady
from vaegan.service.runtime.bundle import MANIFEST
from vaegan.service.runtime.errors import NotFound

if TYPE_CHECKING:
    from vaegan.service.runtime import Runtime
    from vaegan.service.server.batcher import DynamicBatcher
    from vaegan.service.server.pipeline import ScoredBatch

__all__ = ["LoadedModel", "ModelSet", "VersionPolicy", "current_model", "scan_repository"]

# (name, version) of the model the running call resolved, for the per-call metrics ("" before)
current_model: contextvars.ContextVar[tuple[str, str]] = contextvars.ContextVar("vaegan_model", default=("", ""))


@dataclass(eq=False)
class LoadedModel:
    """A warm runtime, the batcher that feeds it, and its place in the repository."""

    runtime: Runtime
    batcher: DynamicBatcher[ScoredBatch]
    name: str = ""
    version: str = ""
    active: int = 0  # requests using it now
    retired: bool = False  # no new requests; closed once active is 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.name = self.name or self.runtime.bundle.name
        self.version = self.version or self.runtime.bundle.version


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions of a model to serve, as Triton's version_policy: the newest ``n``
    (``latest:N``, default ``latest:1``), ``all``, or ``specific:1,3``."""

    kind: str = "latest"
    n: int = 1
    versions: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> VersionPolicy:
        kind, _, arg = text.strip().partition(":")
        if kind == "latest":
            n = int(arg) if arg.strip().isdigit() else (1 if not arg.strip() else 0)
            if n < 1:
                raise ValueError(f"version policy {text!r}: latest:N needs N >= 1")
            return cls("latest", n)
        if kind == "all" and not arg:
            return cls("all")
        if kind == "specific":
            versions = tuple(v.strip() for v in arg.split(",") if v.strip())
            if not versions or not all(v.isdigit() for v in versions):
                raise ValueError(f"version policy {text!r}: specific needs version numbers, e.g. specific:1,3")
            return cls("specific", versions=versions)
        raise ValueError(f"version policy {text!r}: use latest[:N], all or specific:V1,V2")

    def select(self, versions: list[str]) -> list[str]:
        """The versions to serve among ``versions`` (sorted oldest to newest)."""
        if self.kind == "latest":
            return versions[-self.n :]
        if self.kind == "all":
            return list(versions)
        return [v for v in versions if v in self.versions]


def scan_repository(root: Path) -> dict[str, list[str]]:
    """``{model name: [versions with a manifest, oldest to newest]}`` found under ``root``."""
    out: dict[str, list[str]] = {}
    for model_dir in sorted(p for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith(".")):
        versions = [v.name for v in model_dir.iterdir() if v.is_dir() and v.name.isdigit() and (v / MANIFEST).is_file()]
        if versions:
            out[model_dir.name] = sorted(versions, key=int)
    return out


class ModelSet:
    """The loaded model versions, plus the state of every version the server tried."""

    def __init__(self) -> None:
        self.models: dict[str, dict[str, LoadedModel]] = {}
        self.failed: dict[tuple[str, str], str] = {}  # (name, version) -> why it did not load
        self.loading: set[tuple[str, str]] = set()

    def __bool__(self) -> bool:
        return any(self.models.values())

    def all(self) -> list[LoadedModel]:
        return [m for versions in self.models.values() for m in versions.values()]

    def add(self, model: LoadedModel) -> None:
        self.models.setdefault(model.name, {})[model.version] = model
        self.failed.pop((model.name, model.version), None)

    def retire(self, name: str, version: str) -> LoadedModel | None:
        """Take a version out of service (new requests no longer get it); returns it, so that
        the caller can close it once :attr:`LoadedModel.idle`."""
        versions = self.models.get(name, {})
        model = versions.pop(version, None)
        if not versions:
            self.models.pop(name, None)
        if model is not None:
            model.retired = True
            if model.active == 0:
                model.idle.set()
        return model

    def resolve(self, name: str = "", version: str = "") -> LoadedModel:
        """The model version a request names (empty: the only model; its newest version)."""
        if not self:
            raise ModelNotReady("the model is not loaded yet; retry shortly")
        if not name:
            if len(self.models) > 1:
                raise InvalidInput(
                    f"this server serves several models ({', '.join(sorted(self.models))}): name one (model_name)"
                )
            name = next(iter(self.models))
        versions = self.models.get(name)
        if not versions:
            known = ", ".join(sorted(self.models))
            raise NotFound(f"model {name!r} is not served here (served: {known})")
        if not version:
            version = max(versions, key=_version_key)
        model = versions.get(version)
        if model is None:
            reason = self.failed.get((name, version))
            why = f" (it failed to load: {reason})" if reason else ""
            raise NotFound(f"model {name!r} has no version {version!r} here{why} (served: {', '.join(sorted(versions, key=_version_key))})")
        current_model.set((model.name, model.version))
        return model

    @contextmanager
    def use(self, name: str = "", version: str = "") -> Iterator[LoadedModel]:
        """Hold a version for one request: it is not closed while any request holds it."""
        model = self.resolve(name, version)
        model.active += 1
        try:
            yield model
        finally:
            model.active -= 1
            if model.retired and model.active == 0:
                model.idle.set()

    def states(self) -> list[tuple[str, str, str, str]]:
        """(name, version, state, reason) of every version loaded, loading or failed."""
        rows = [(m.name, m.version, "READY", "") for m in self.all()]
        rows += [(n, v, "LOADING", "") for n, v in self.loading]
        rows += [(n, v, "UNAVAILABLE", r) for (n, v), r in self.failed.items()]
        return sorted(rows, key=lambda r: (r[0], _version_key(r[1])))


def _version_key(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (-1, version)

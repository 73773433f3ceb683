"""The model bundle: manifest.json + three ONNX graphs (docs/scoring.md, "The bundle").

:func:`load_bundle` verifies the format version, every file's sha256 and the declared shapes
before anything runs; a failed check raises :class:`BundleError` naming the file and the check.
A model repository (``repo/<name>/<version>/``) resolves to its highest version.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vaegan.service.runtime.errors import BundleError
from vaegan.service.runtime.preprocess import ImageSpec
from vaegan.service.runtime.scoring import Calibration

__all__ = [
    "FORMAT_VERSION",
    "GRAPHS",
    "PIPELINE",
    "Bundle",
    "bundle_files",
    "calibration_digest",
    "graph_signatures",
    "load_bundle",
    "manifest_num_classes",
    "resolve_bundle_dir",
    "sha256_file",
    "write_manifest",
]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CALIBRATION_KEY = "calibration"  # files[...] entry: sha256 of the manifest's calibration block
# graph name -> file name; the input/output names are fixed by graph_signatures()
GRAPHS = {
    "encoder": "encoder.onnx",
    "generator": "generator.onnx",
    "discriminator": "discriminator.onnx",
}
# optional: the three graphs composed into one at export (service.runtime.compose); bundles
# without it are composed at load time
PIPELINE = "pipeline.onnx"


def bundle_files(bundle_dir: Path) -> list[str]:
    """The graph files of a bundle directory: the three graphs, and the composed pipeline when
    it is there."""
    return [*GRAPHS.values(), *([PIPELINE] if (Path(bundle_dir) / PIPELINE).is_file() else [])]


def graph_signatures(
    spec: ImageSpec, latent_dim: int, feature_dim: int, patch_head: bool = False, num_classes: int = 0
) -> dict[str, Any]:
    """Names and shapes of each graph's inputs and outputs; None is the dynamic batch axis.

    ``patch_head``: the discriminator also outputs per-pixel logits ``patch`` (N, 1, H, W)
    (bundles from this version on; older ones have only ``logit`` and ``features``).
    ``num_classes`` > 0 (a conditional model): every graph also takes ``label``, int64 (N,),
    each image's class id in 0..num_classes-1 (one-hot inside the graph).
    """
    img = [None, spec.channels, spec.height, spec.width]
    label: dict[str, Any] = {"label": [None]} if num_classes > 0 else {}
    d_out: dict[str, Any] = {"logit": [None, 1], "features": [None, feature_dim]}
    if patch_head:
        d_out["patch"] = [None, 1, spec.height, spec.width]
    return {
        "encoder": {
            "inputs": {"x": img, **label},
            "outputs": {"mu": [None, latent_dim], "logvar": [None, latent_dim]},
        },
        "generator": {"inputs": {"z": [None, latent_dim], **label}, "outputs": {"x_hat": img}},
        "discriminator": {"inputs": {"x": img, **label}, "outputs": d_out},
    }


def manifest_num_classes(manifest: dict[str, Any]) -> int:
    """``model_config.num_classes`` of a manifest: the classes of a conditional bundle, 0 for an
    unconditional one (and for every manifest written before the field existed)."""
    return int((manifest.get("model_config") or {}).get("num_classes", 0) or 0)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def calibration_digest(calibration: dict[str, Any] | None) -> str:
    """sha256 of the calibration block's canonical JSON (it lives inside manifest.json)."""
    return hashlib.sha256(json.dumps(calibration, sort_keys=True).encode()).hexdigest()


def write_manifest(bundle_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Fill ``files`` with the sha256 of every graph (and of the calibration block) and write
    manifest.json. Returns it."""
    bundle_dir = Path(bundle_dir)
    manifest = dict(manifest)
    manifest["files"] = {f: sha256_file(bundle_dir / f) for f in bundle_files(bundle_dir)}
    manifest["files"][CALIBRATION_KEY] = calibration_digest(manifest.get("calibration"))
    tmp = bundle_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    tmp.replace(bundle_dir / MANIFEST)
    return manifest


def _version_key(p: Path) -> tuple[int, str]:
    return (int(p.name), "") if p.name.isdigit() else (-1, p.name)


def resolve_bundle_dir(path: str | Path) -> Path:
    """A bundle dir, ``repo/<name>`` (highest numeric version) or ``repo`` with one model."""
    p = Path(path)
    if not p.exists():
        raise BundleError(f"{p}: no such bundle directory")
    if (p / MANIFEST).is_file():
        return p
    versions = [d for d in p.iterdir() if d.is_dir() and d.name.isdigit() and (d / MANIFEST).is_file()]
    if versions:
        return max(versions, key=_version_key)
    models = [d for d in p.iterdir() if d.is_dir()]
    if len(models) == 1:
        return resolve_bundle_dir(models[0])
    raise BundleError(f"{p}: no {MANIFEST} here and no single model with numeric versions below")


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk."""

    path: Path
    manifest: dict[str, Any]
    spec: ImageSpec
    latent_dim: int
    feature_dim: int
    calibration: Calibration | None

    @property
    def name(self) -> str:
        return str(self.manifest.get("name", "model"))

    @property
    def version(self) -> str:
        return str(self.manifest.get("version", "1"))

    @property
    def patch_head(self) -> bool:
        """Whether the discriminator has the per-pixel head (output ``patch``)."""
        return bool((self.manifest.get("model_config") or {}).get("patch_head", False))

    @property
    def num_classes(self) -> int:
        """The classes a conditional bundle (``vaegan train --conditional``) scores against; 0
        for an unconditional one (every bundle written before the field existed)."""
        return manifest_num_classes(self.manifest)

    @property
    def trained_with_holes(self) -> bool:
        """Whether training filled holes (``train_config.mask_prob`` > 0 in the manifest)."""
        train_config = (self.manifest.get("training") or {}).get("train_config") or {}
        return float(train_config.get("mask_prob", 0.0) or 0.0) > 0.0

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    @property
    def class_names(self) -> list[str]:
        """The name of each class id of a conditional bundle (the manifest's ``classes``; the
        ids as text where it has none); [] for an unconditional one."""
        names = [str(n) for n in (self.manifest.get("classes") or [])]
        return names if len(names) == self.num_classes else [str(i) for i in range(self.num_classes)]

    def signatures(self) -> dict[str, Any]:
        """:func:`graph_signatures` of this bundle."""
        return graph_signatures(self.spec, self.latent_dim, self.feature_dim, self.patch_head, self.num_classes)

    def graph_path(self, graph: str) -> Path:
        return self.path / GRAPHS[graph]

    @property
    def pipeline_path(self) -> Path | None:
        """The composed pipeline graph written at export (verified like the others), or None
        for a bundle without one (composed at load time)."""
        return self.path / PIPELINE if PIPELINE in self.manifest.get("files", {}) else None


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Read and verify a bundle; :class:`BundleError` names the file and the failed check."""
    root = resolve_bundle_dir(path)
    mpath = root / MANIFEST
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BundleError(f"{mpath}: unreadable manifest ({e})") from e
    if not isinstance(manifest, dict):
        raise BundleError(f"{mpath}: the manifest must be a JSON object, got a {type(manifest).__name__}")
    fv = manifest.get("format_version")
    if fv != FORMAT_VERSION:
        raise BundleError(f"{mpath}: format_version {fv!r} is not supported (expected {FORMAT_VERSION})")
    try:
        spec = ImageSpec.from_dict(manifest["image"])
        latent_dim = int(manifest["latent_dim"])
        feature_dim = int(manifest["feature_dim"])
        files = dict(manifest["files"])
        num_classes = manifest_num_classes(manifest)
        if num_classes < 0 or num_classes == 1:
            raise ValueError(f"model_config.num_classes must be 0 or >= 2, got {num_classes}")
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{mpath}: missing or invalid field ({e})") from e
    for fname in [*GRAPHS.values(), *([PIPELINE] if PIPELINE in files else [])]:
        f = root / fname
        if fname not in files:
            raise BundleError(f"{mpath}: no sha256 entry for {fname}")
        if not f.is_file():
            raise BundleError(f"{f}: file missing from the bundle")
        if verify:
            digest = sha256_file(f)
            if digest != files[fname]:
                raise BundleError(
                    f"{f}: sha256 mismatch (manifest {files[fname][:12]}..., file {digest[:12]}...)"
                )
    if verify and CALIBRATION_KEY in files and files[CALIBRATION_KEY] != calibration_digest(manifest.get("calibration")):
        raise BundleError(f"{mpath}: sha256 mismatch of the calibration block (edited by hand?)")
    calibration = None
    if manifest.get("calibration"):
        try:
            calibration = Calibration.from_dict(manifest["calibration"])
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"{mpath}: invalid calibration ({e})") from e
    return Bundle(root, manifest, spec, latent_dim, feature_dim, calibration)

"""Checkpoints: the configs travel inside, and ``torch.load(weights_only=True)`` reads them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from models import VAEGAN, ModelConfig

__all__ = ["load_checkpoint", "model_from_checkpoint", "save_checkpoint"]


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Atomically write ``payload`` (tensors, dicts, lists, numbers, strings only)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    return torch.load(path, map_location=map_location, weights_only=True)


def model_from_checkpoint(ckpt: dict[str, Any]) -> VAEGAN:
    """Rebuild the network from the config stored in the checkpoint and load its weights."""
    model = VAEGAN(ModelConfig.from_dict(ckpt["model_config"]))
    model.encoder.load_state_dict(ckpt["state"]["encoder"])
    model.generator.load_state_dict(ckpt["state"]["generator"])
    model.discriminator.load_state_dict(ckpt["state"]["discriminator"])
    return model.eval()

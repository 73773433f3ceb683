"""Checkpoints: the configs travel inside, and ``torch.load(weights_only=True)`` reads them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vaegan.models import VAEGAN, ModelConfig

__all__ = ["load_checkpoint", "model_from_checkpoint", "network_states", "save_checkpoint"]

NETWORKS = ("encoder", "generator", "discriminator")


def network_states(model: VAEGAN) -> dict[str, dict[str, torch.Tensor]]:
    """The three networks' state dicts, as checkpoints store them (``state``, ``ema_state``)."""
    return {k: getattr(model, k).state_dict() for k in NETWORKS}


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


def model_from_checkpoint(ckpt: dict[str, Any], weights: str = "scoring") -> VAEGAN:
    """Rebuild the network from the config stored in the checkpoint and load its weights.

    ``weights="scoring"``: the weights to score and export with, i.e. the exponential moving
    average when training kept one (``--ema-decay``), else the trained weights;
    ``"training"``: the trained weights (what ``--resume`` continues from).
    """
    if weights not in ("scoring", "training"):
        raise ValueError(f"weights must be scoring or training, got {weights!r}")
    state = ckpt["state"]
    if weights == "scoring" and ckpt.get("ema_state") is not None:
        state = ckpt["ema_state"]
    model = VAEGAN(ModelConfig.from_dict(ckpt["model_config"]))
    for k in NETWORKS:
        getattr(model, k).load_state_dict(state[k])
    return model.eval()

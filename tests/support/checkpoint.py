"""Checkpoint dicts laid out like ``nnUNetTrainer.save_checkpoint`` writes them."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

CONFIGURATION = "3d_fullres"
TRAINER_NAME = "nnUNetTrainer"
# A fixed start of the fake training log, so that equal seeds give byte-identical files.
_LOG_START = 1_700_000_000.0


def _fake_logging(epochs: int, num_classes: int, rng: np.random.Generator) -> dict[str, list]:
    """Training log in the shape of nnU-Net's ``LocalLogger`` (numpy float64 scalars)."""
    start = _LOG_START
    dice = [
        [np.float64(v) for v in rng.uniform(0.5, 0.99, num_classes - 1)] for _ in range(epochs)
    ]
    mean_dice = [np.float64(np.mean(d)) for d in dice]
    return {
        "mean_fg_dice": mean_dice,
        "ema_fg_dice": [np.float64(v) for v in np.cumsum(mean_dice) / np.arange(1, epochs + 1)],
        "dice_per_class_or_region": dice,
        "train_losses": [np.float64(v) for v in -rng.uniform(0.5, 0.9, epochs)],
        "val_losses": [np.float64(v) for v in -rng.uniform(0.5, 0.9, epochs)],
        "lrs": [0.01 * (1 - e / 1000) ** 0.9 for e in range(epochs)],
        "epoch_start_timestamps": [start + 3600.0 * e for e in range(epochs)],
        "epoch_end_timestamps": [start + 3600.0 * e + 3500.0 for e in range(epochs)],
    }


def _fake_optimizer_state(network: nn.Module, generator: torch.Generator) -> dict[str, Any]:
    """An SGD (Nesterov, momentum 0.99) state dict with one momentum buffer per parameter."""
    params = list(network.parameters())
    return {
        "state": {
            i: {"momentum_buffer": 1e-4 * torch.randn(p.shape, generator=generator)}
            for i, p in enumerate(params)
        },
        "param_groups": [
            {
                "lr": 1.8e-05,
                "momentum": 0.99,
                "dampening": 0,
                "weight_decay": 3e-05,
                "nesterov": True,
                "maximize": False,
                "foreach": None,
                "differentiable": False,
                "fused": None,
                "initial_lr": 0.01,
                "params": list(range(len(params))),
            }
        ],
    }


def make_checkpoint(
    network: nn.Module,
    *,
    plans: dict,
    dataset_json: dict,
    fold: int,
    seed: int,
    with_optimizer_state: bool = True,
    log_epochs: int = 5,
) -> dict[str, Any]:
    """A checkpoint dict laid out like ``nnUNetTrainer.save_checkpoint`` writes it.

    Parameters
    ----------
    network
        The network whose ``state_dict`` becomes ``network_weights``.
    plans, dataset_json
        Stored in ``init_args`` as the trainer does.
    fold, seed
        Fold number (``init_args``) and the seed of the random log / momentum buffers.
    with_optimizer_state
        Include SGD momentum buffers (doubles the file size, as in the real checkpoints).
    log_epochs
        Number of epochs in ``logging`` (the real checkpoints hold 1000).

    Returns
    -------
    dict
        Ready for ``torch.save``.
    """
    rng = np.random.default_rng(seed + fold)
    generator = torch.Generator().manual_seed(seed + fold)
    num_classes = len(dataset_json["labels"])
    log = _fake_logging(log_epochs, num_classes, rng)
    return {
        "network_weights": network.state_dict(),
        "optimizer_state": _fake_optimizer_state(network, generator)
        if with_optimizer_state
        else {},
        "grad_scaler_state": {
            "scale": 65536.0,
            "growth_factor": 2.0,
            "backoff_factor": 0.5,
            "growth_interval": 2000,
            "_growth_tracker": 1234,
        },
        "logging": log,
        "_best_ema": max(log["ema_fg_dice"]),
        "current_epoch": 1000,
        "init_args": {
            "plans": plans,
            "configuration": CONFIGURATION,
            "fold": fold,
            "dataset_json": dataset_json,
            "device": torch.device("cuda"),
        },
        "trainer_name": TRAINER_NAME,
        "inference_allowed_mirroring_axes": (0, 1, 2),
    }

"""Build nnU-Net v2 trained-model folders from the official plans with seeded random weights.

The official DLICV and DLMUSE weights cannot be fetched here, so tests use model folders that
keep the real ``plans.json`` / ``dataset.json`` (patch size, spacing, normalisation, resampling,
stages) and put a seeded random :class:`PlainConvUNet` behind them, saved in the same checkpoint
layout as nnU-Net's ``nnUNetTrainer.save_checkpoint``.  Only the network width is changed
(``UNet_base_num_features`` / ``unet_max_num_features``) so that CI stays fast;
``base_features=32, max_features=320`` gives the real full-width architecture.
"""

from __future__ import annotations

import copy
import json
import pydoc
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from torch import nn

from .checkpoint import CONFIGURATION, make_checkpoint
from .guidance import add_intensity_guidance
from .paths import (
    DLICV_DATASET,
    DLICV_PLANS_SOURCE,
    DLMUSE_DATASET,
    DLMUSE_PLANS_SOURCE,
    TRAINED_MODEL_SUBDIR,
)

# Keys of a legacy configuration that nnU-Net replaces by the ``architecture`` dict.
_LEGACY_KEYS = (
    "UNet_class_name",
    "UNet_base_num_features",
    "n_conv_per_stage_encoder",
    "n_conv_per_stage_decoder",
    "num_pool_per_axis",
    "pool_op_kernel_sizes",
    "conv_kernel_sizes",
    "unet_max_num_features",
)

# Size of the seeded perturbations that make every parameter differ between folds.
NORM_WEIGHT_JITTER = 0.1
NORM_BIAS_JITTER = 0.1
CONV_BIAS_JITTER = 0.01


def load_plans_source(plans_source: Path) -> tuple[dict, dict]:
    """Read ``plans.json`` and ``dataset.json`` of an official model.

    Parameters
    ----------
    plans_source
        Folder holding the real ``plans.json`` and ``dataset.json``.

    Returns
    -------
    tuple of dict
        The plans and the dataset description.
    """
    plans = json.loads((plans_source / "plans.json").read_text())
    dataset_json = json.loads((plans_source / "dataset.json").read_text())
    return plans, dataset_json


def legacy_to_architecture(configuration: dict) -> dict:
    """Convert a legacy plans configuration into the current ``architecture`` form.

    Reproduces nnunetv2 2.8.1 ``ConfigurationManager.__init__``'s backwards-compatibility branch
    (PlainConvUNet only): the legacy keys are removed and an ``architecture`` dict is added.

    Parameters
    ----------
    configuration
        One entry of ``plans["configurations"]`` with ``UNet_class_name``.

    Returns
    -------
    dict
        A new configuration dict; the input is not modified.
    """
    cfg = copy.deepcopy(configuration)
    if cfg["UNet_class_name"] != "PlainConvUNet":
        raise ValueError(f"only PlainConvUNet plans are supported, got {cfg['UNet_class_name']}")
    n_stages = len(cfg["n_conv_per_stage_encoder"])
    dim = len(cfg["patch_size"])
    cfg["architecture"] = {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": n_stages,
            "features_per_stage": [
                min(cfg["UNet_base_num_features"] * 2**i, cfg["unet_max_num_features"])
                for i in range(n_stages)
            ],
            "conv_op": f"torch.nn.modules.conv.Conv{dim}d",
            "kernel_sizes": copy.deepcopy(cfg["conv_kernel_sizes"]),
            "strides": copy.deepcopy(cfg["pool_op_kernel_sizes"]),
            "n_conv_per_stage": copy.deepcopy(cfg["n_conv_per_stage_encoder"]),
            "n_conv_per_stage_decoder": copy.deepcopy(cfg["n_conv_per_stage_decoder"]),
            "conv_bias": True,
            "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }
    for key in _LEGACY_KEYS:
        del cfg[key]
    return cfg


def make_plans(
    plans: dict, *, base_features: int, max_features: int, legacy_plans: bool = True
) -> dict:
    """Return the official plans with a different network width, in legacy or current form.

    Only the ``3d_fullres`` configuration (the one the checkpoints belong to) changes width;
    every other field is kept as it is in the official file.

    Parameters
    ----------
    plans
        The official plans (legacy form).
    base_features, max_features
        ``UNet_base_num_features`` and ``unet_max_num_features`` of ``3d_fullres``.
    legacy_plans
        Keep the legacy form; if False, every legacy configuration is converted with
        :func:`legacy_to_architecture`.

    Returns
    -------
    dict
        New plans.
    """
    out = copy.deepcopy(plans)
    fullres = out["configurations"][CONFIGURATION]
    fullres["UNet_base_num_features"] = base_features
    fullres["unet_max_num_features"] = max_features
    if not legacy_plans:
        for name, cfg in out["configurations"].items():
            if "UNet_class_name" in cfg:
                out["configurations"][name] = legacy_to_architecture(cfg)
    return out


def architecture_of(configuration: dict) -> dict:
    """The ``architecture`` dict of a configuration in either plans form."""
    if "architecture" in configuration:
        return configuration["architecture"]
    return legacy_to_architecture(configuration)["architecture"]


def build_network(configuration: dict, num_input_channels: int, num_classes: int) -> PlainConvUNet:
    """Build the inference network exactly as nnunetv2's ``get_network_from_plans`` does.

    Parameters
    ----------
    configuration
        A plans configuration, legacy or current form.
    num_input_channels, num_classes
        Network input channels and segmentation heads.

    Returns
    -------
    PlainConvUNet
        Network with ``deep_supervision=False`` and nnU-Net's He initialisation applied with the
        current torch RNG state.
    """
    arch = architecture_of(configuration)
    kwargs = dict(arch["arch_kwargs"])
    for key in arch["_kw_requires_import"]:
        if kwargs[key] is not None:
            kwargs[key] = pydoc.locate(kwargs[key])
    network_class = pydoc.locate(arch["network_class_name"])
    if network_class is not PlainConvUNet:
        raise ValueError(f"unsupported network class {arch['network_class_name']}")
    network = network_class(
        input_channels=num_input_channels,
        num_classes=num_classes,
        deep_supervision=False,
        **kwargs,
    )
    network.apply(InitWeights_He(1e-2))
    return network


def count_parameters(network: nn.Module) -> int:
    """Number of scalar parameters of a network."""
    return sum(p.numel() for p in network.parameters())


@torch.no_grad()
def perturb_norms_and_biases(network: nn.Module) -> None:
    """Give InstanceNorm affine parameters and conv biases small random values (torch RNG).

    He initialisation leaves norms at (1, 0) and conv biases at 0 in every fold; a loader that
    dropped them would go unnoticed.  After this every parameter differs between seeds.
    """
    for module in network.modules():
        if isinstance(module, nn.modules.instancenorm._InstanceNorm) and module.affine:
            module.weight.add_(NORM_WEIGHT_JITTER * torch.randn_like(module.weight))
            module.bias.add_(NORM_BIAS_JITTER * torch.randn_like(module.bias))
        elif isinstance(module, nn.modules.conv._ConvNd) and module.bias is not None:
            module.bias.add_(CONV_BIAS_JITTER * torch.randn_like(module.bias))


def build_model_folder(
    dest: Path,
    plans_source: Path,
    *,
    base_features: int = 4,
    max_features: int = 16,
    folds: Iterable[int] = (0,),
    seed: int = 0,
    legacy_plans: bool = True,
    guided: bool = False,
    with_optimizer_state: bool = True,
    log_epochs: int = 5,
) -> Path:
    """Write an nnU-Net v2 trained-model folder with seeded random weights.

    Parameters
    ----------
    dest
        Parent folder; the model goes to
        ``dest/<dataset name>/nnUNetTrainer__nnUNetPlans__3d_fullres``.
    plans_source
        Folder with an official ``plans.json`` and ``dataset.json``
        (``../shared/models/Dataset901_Task901_dlicv`` or ``.../Dataset903_Task903_DLMUSEV2``).
    base_features, max_features
        Network width; 32 and 320 reproduce the official architecture.
    folds
        Folds to write, each as ``fold_K/checkpoint_final.pth`` seeded with ``seed + K``.
    seed
        Base seed.
    legacy_plans
        Write the plans in the official legacy form (True) or nnU-Net's current
        ``architecture`` form (False).
    guided
        Add :func:`~.guidance.add_intensity_guidance` (meant for the 2-class DLICV model): on a
        real head the foreground becomes a smooth blob over the bright brain core whose largest
        component is far above DLICV's 200,000-voxel threshold.
    with_optimizer_state
        Store SGD momentum buffers like the official checkpoints.
    log_epochs
        Epochs of fake training log (numpy float64 scalars); the official ones hold 1000.

    Returns
    -------
    Path
        The trained-model folder.
    """
    plans_src, dataset_json = load_plans_source(plans_source)
    plans = make_plans(
        plans_src,
        base_features=base_features,
        max_features=max_features,
        legacy_plans=legacy_plans,
    )
    model_dir = Path(dest) / plans["dataset_name"] / TRAINED_MODEL_SUBDIR
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "plans.json").write_text(json.dumps(plans, indent=4))
    (model_dir / "dataset.json").write_text(json.dumps(dataset_json, indent=4))

    configuration = plans["configurations"][CONFIGURATION]
    num_inputs = len(dataset_json["channel_names"])
    num_classes = len(dataset_json["labels"])
    for fold in folds:
        torch.manual_seed(seed + fold)
        network = build_network(configuration, num_inputs, num_classes)
        perturb_norms_and_biases(network)
        if guided:
            add_intensity_guidance(network)
        checkpoint = make_checkpoint(
            network,
            plans=plans,
            dataset_json=dataset_json,
            fold=fold,
            seed=seed,
            with_optimizer_state=with_optimizer_state,
            log_epochs=log_epochs,
        )
        fold_dir = model_dir / f"fold_{fold}"
        fold_dir.mkdir(exist_ok=True)
        torch.save(checkpoint, fold_dir / "checkpoint_final.pth")
    return model_dir


def build_models_dir(
    dest: Path,
    *,
    dlicv_source: Path = DLICV_PLANS_SOURCE,
    dlmuse_source: Path = DLMUSE_PLANS_SOURCE,
    guided_dlicv: bool = True,
    **kwargs: Any,
) -> Path:
    """Write both models under their official names in one directory.

    Parameters
    ----------
    dest
        Target; gets ``Dataset901_Task901_dlicv/nnUNetTrainer__nnUNetPlans__3d_fullres`` and
        ``Dataset903_Task903_DLMUSEV2/nnUNetTrainer__nnUNetPlans__3d_fullres``.
    dlicv_source, dlmuse_source
        Folders with the official plans (default: ``../shared/models``).
    guided_dlicv
        Build DLICV with ``guided=True``.
    **kwargs
        Passed to :func:`build_model_folder` for both models (``guided`` is not accepted).

    Returns
    -------
    Path
        ``dest``.
    """
    if "guided" in kwargs:
        raise TypeError("use guided_dlicv; DLMUSE is never guided")
    dest = Path(dest)
    dlicv = build_model_folder(dest, dlicv_source, guided=guided_dlicv, **kwargs)
    dlmuse = build_model_folder(dest, dlmuse_source, **kwargs)
    assert dlicv.parent.name == DLICV_DATASET and dlmuse.parent.name == DLMUSE_DATASET
    return dest

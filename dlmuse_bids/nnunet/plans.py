"""Read nnU-Net v2 ``plans.json`` / ``dataset.json`` into one immutable configuration.

Both plans forms are accepted: the legacy one (``UNet_class_name``, ``UNet_base_num_features``...)
that the official DLICV/DLMUSE models use, and the current one with an ``architecture`` block.
The legacy form is converted exactly as nnU-Net v2's ``ConfigurationManager`` does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Plans readers whose array axis order we reproduce (see :attr:`ModelConfig.axes_reversed`).
SUPPORTED_READERS = ("SimpleITKIO", "NibabelIO")
#: nnU-Net's threshold above which data are resampled with a separate (nearest) rule along z.
ANISO_THRESHOLD = 3.0


class PlansError(ValueError):
    """A plans/dataset file describes something this engine cannot run."""


@dataclass(frozen=True)
class ResamplingSpec:
    """Interpolation orders of one nnU-Net resampling function."""

    order: int
    order_z: int = 0
    force_separate_z: bool | None = None


@dataclass(frozen=True)
class ArchitectureSpec:
    """Keyword arguments of the network, in the current plans' ``arch_kwargs`` vocabulary."""

    class_name: str  # "PlainConvUNet" or "ResidualEncoderUNet"
    n_stages: int
    features_per_stage: tuple[int, ...]
    kernel_sizes: tuple[tuple[int, ...], ...]
    strides: tuple[tuple[int, ...], ...]
    n_conv_per_stage: tuple[int, ...]
    n_conv_per_stage_decoder: tuple[int, ...]
    conv_bias: bool = True
    norm_eps: float = 1e-5
    norm_affine: bool = True
    nonlin_negative_slope: float = 1e-2


@dataclass(frozen=True)
class ModelConfig:
    """Everything inference needs from a trained-model folder's plans and dataset files."""

    dataset_name: str
    configuration: str
    patch_size: tuple[int, ...]
    spacing: tuple[float, ...]
    transpose_forward: tuple[int, ...]
    transpose_backward: tuple[int, ...]
    normalization_schemes: tuple[str, ...]
    use_mask_for_norm: tuple[bool, ...]
    reader: str
    resampling_data: ResamplingSpec
    resampling_probabilities: ResamplingSpec
    architecture: ArchitectureSpec
    num_input_channels: int
    labels: dict[str, int] = field(hash=False)

    @property
    def num_classes(self) -> int:
        """Number of output channels (background included)."""
        return len(self.labels)

    @property
    def axes_reversed(self) -> bool:
        """Whether the reader stores voxel axes reversed with respect to NIfTI (SimpleITK does)."""
        return self.reader == "SimpleITKIO"


def _tuple2(values: Any) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(int(v) for v in row) for row in values)


def _legacy_architecture(cfg: dict) -> ArchitectureSpec:
    name = cfg["UNet_class_name"]
    if name not in ("PlainConvUNet", "ResidualEncoderUNet"):
        raise PlansError(
            f"unsupported network {name!r}: only PlainConvUNet and "
            "ResidualEncoderUNet plans can be run"
        )
    n_stages = len(cfg["n_conv_per_stage_encoder"])
    base, top = int(cfg["UNet_base_num_features"]), int(cfg["unet_max_num_features"])
    return ArchitectureSpec(
        class_name=name,
        n_stages=n_stages,
        features_per_stage=tuple(min(base * 2**i, top) for i in range(n_stages)),
        kernel_sizes=_tuple2(cfg["conv_kernel_sizes"]),
        strides=_tuple2(cfg["pool_op_kernel_sizes"]),
        n_conv_per_stage=tuple(int(v) for v in cfg["n_conv_per_stage_encoder"]),
        n_conv_per_stage_decoder=tuple(int(v) for v in cfg["n_conv_per_stage_decoder"]),
    )


def _expand(value: Any, n: int, dim: int | None = None) -> list:
    """nnU-Net allows scalars where lists are expected; expand them."""
    if isinstance(value, int | float):
        value = [value] * n
    if dim is not None:
        value = [[v] * dim if isinstance(v, int | float) else v for v in value]
    return list(value)


def _current_architecture(arch: dict, dim: int) -> ArchitectureSpec:
    class_name = arch["network_class_name"].rsplit(".", 1)[-1]
    if class_name not in ("PlainConvUNet", "ResidualEncoderUNet"):
        raise PlansError(
            f"unsupported network {arch['network_class_name']!r}: only PlainConvUNet "
            "and ResidualEncoderUNet plans can be run"
        )
    kw = arch["arch_kwargs"]
    n = int(kw["n_stages"])
    for key, wanted in (("conv_op", "Conv"), ("norm_op", "InstanceNorm"), ("nonlin", "LeakyReLU")):
        if wanted not in str(kw.get(key)):
            raise PlansError(f"unsupported {key} {kw.get(key)!r} (expected {wanted})")
    if kw.get("dropout_op") not in (None, "None"):
        raise PlansError(f"unsupported dropout_op {kw['dropout_op']!r}")
    convs_key = "n_conv_per_stage" if class_name == "PlainConvUNet" else "n_blocks_per_stage"
    norm_kw = kw.get("norm_op_kwargs") or {}
    nonlin_kw = kw.get("nonlin_kwargs") or {}
    return ArchitectureSpec(
        class_name=class_name,
        n_stages=n,
        features_per_stage=tuple(int(v) for v in _expand(kw["features_per_stage"], n)),
        kernel_sizes=_tuple2(_expand(kw["kernel_sizes"], n, dim)),
        strides=_tuple2(_expand(kw["strides"], n, dim)),
        n_conv_per_stage=tuple(int(v) for v in _expand(kw[convs_key], n)),
        n_conv_per_stage_decoder=tuple(
            int(v) for v in _expand(kw["n_conv_per_stage_decoder"], n - 1)
        ),
        conv_bias=bool(kw.get("conv_bias", False)),
        norm_eps=float(norm_kw.get("eps", 1e-5)),
        norm_affine=bool(norm_kw.get("affine", True)),
        nonlin_negative_slope=float(nonlin_kw.get("negative_slope", 1e-2)),
    )


def _resolve(configurations: dict, name: str, seen: tuple[str, ...] = ()) -> dict:
    """Resolve ``inherits_from`` the way nnU-Net does (child keys override the parent's)."""
    if name not in configurations:
        raise PlansError(
            f"configuration {name!r} not in plans (available: {', '.join(configurations)})"
        )
    cfg = dict(configurations[name])
    parent = cfg.pop("inherits_from", None)
    if parent is None:
        return cfg
    if parent in seen:
        raise PlansError(f"circular 'inherits_from' in plans: {' -> '.join((*seen, name))}")
    return {**_resolve(configurations, parent, (*seen, name)), **cfg}


def _resampling(cfg: dict, key: str, default_order: int) -> ResamplingSpec:
    fn = cfg.get(f"resampling_fn_{key}", "resample_data_or_seg_to_shape")
    if fn not in ("resample_data_or_seg_to_shape", "resample_data_or_seg_to_spacing"):
        raise PlansError(f"unsupported resampling function {fn!r}")
    kw = cfg.get(f"resampling_fn_{key}_kwargs") or {}
    return ResamplingSpec(
        order=int(kw.get("order", default_order)),
        order_z=int(kw.get("order_z", 0)),
        force_separate_z=kw.get("force_separate_z"),
    )


def parse_plans(plans: dict, dataset: dict, configuration: str = "3d_fullres") -> ModelConfig:
    """Build a :class:`ModelConfig` from the parsed ``plans.json`` and ``dataset.json``.

    Parameters
    ----------
    plans, dataset
        The JSON documents of an nnU-Net v2 trained-model folder.
    configuration
        The configuration to run (the official models are ``3d_fullres``).
    """
    cfg = _resolve(plans["configurations"], configuration)
    patch = tuple(int(v) for v in cfg["patch_size"])
    if len(patch) != 3:
        raise PlansError(
            f"configuration {configuration!r} is {len(patch)}-D; only 3-D is supported"
        )
    reader = plans.get("image_reader_writer", "SimpleITKIO")
    if reader not in SUPPORTED_READERS:
        raise PlansError(
            f"unsupported image reader {reader!r} (supported: {', '.join(SUPPORTED_READERS)})"
        )
    schemes = tuple(cfg["normalization_schemes"])
    for scheme in schemes:
        if scheme not in ("ZScoreNormalization", "NoNormalization"):
            raise PlansError(f"unsupported normalization {scheme!r}")
    if "architecture" in cfg:
        arch = _current_architecture(cfg["architecture"], len(patch))
    elif "UNet_class_name" in cfg:
        arch = _legacy_architecture(cfg)
    else:
        raise PlansError("plans have neither 'architecture' nor legacy 'UNet_class_name'")
    if dataset.get("regions_class_order") is not None:
        raise PlansError("region-based models are not supported")
    labels = {str(k): int(v) for k, v in dataset["labels"].items()}
    if sorted(labels.values()) != list(range(len(labels))):
        raise PlansError("dataset.json labels must be consecutive integers from 0")
    return ModelConfig(
        dataset_name=plans.get("dataset_name", "unknown"),
        configuration=configuration,
        patch_size=patch,
        spacing=tuple(float(v) for v in cfg["spacing"]),
        transpose_forward=tuple(int(v) for v in plans["transpose_forward"]),
        transpose_backward=tuple(int(v) for v in plans["transpose_backward"]),
        normalization_schemes=schemes,
        use_mask_for_norm=tuple(bool(v) for v in cfg["use_mask_for_norm"]),
        reader=reader,
        resampling_data=_resampling(cfg, "data", 3),
        resampling_probabilities=_resampling(cfg, "probabilities", 1),
        architecture=arch,
        num_input_channels=len(dataset["channel_names"])
        if "channel_names" in dataset
        else len(dataset["modality"]),
        labels=labels,
    )


def load_model_config(folder: Path, configuration: str = "3d_fullres") -> ModelConfig:
    """Read ``plans.json`` and ``dataset.json`` of a trained-model folder."""
    folder = Path(folder)
    try:
        plans = json.loads((folder / "plans.json").read_text())
        dataset = json.loads((folder / "dataset.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PlansError(f"{folder}: cannot read plans.json/dataset.json ({exc})") from exc
    try:
        return parse_plans(plans, dataset, configuration)
    except KeyError as exc:
        raise PlansError(f"{folder}: plans.json lacks the key {exc}") from exc

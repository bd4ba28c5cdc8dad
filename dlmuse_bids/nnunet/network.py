"""The U-Nets nnU-Net v2 trains, rebuilt so that its checkpoints load unchanged.

Module names and nesting mirror ``dynamic_network_architectures`` (``PlainConvUNet`` and
``ResidualEncoderUNet`` with ``BasicBlockD``), so an nnU-Net ``network_weights`` state dict
loads with ``strict=True``. Only what inference needs is here: 3-D convolutions, instance norm,
leaky ReLU, no dropout, no deep supervision.
"""

from __future__ import annotations

import torch
from torch import nn

from .plans import ArchitectureSpec


class InstanceNorm3d(nn.InstanceNorm3d):
    """``nn.InstanceNorm3d`` that keeps the channels-last layout of a single-image batch.

    For one image, instance norm is batch norm with batch statistics: the same kernel that
    ``instance_norm`` calls after reshaping to (1, N*C, ...), so a contiguous input gives a
    bit-identical result. The reshape copies a channels-last tensor (about a third of a bf16
    forward pass on a CPU); the direct call uses the channels-last kernel instead (the same
    maths, summed in another order). Parameters and state-dict keys are ``nn.InstanceNorm3d``'s.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or x.shape[0] != 1 or self.track_running_stats:
            return super().forward(x)
        return nn.functional.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)


class ConvNormAct(nn.Module):
    """Convolution, instance norm, optional leaky ReLU (nnU-Net's ``ConvDropoutNormReLU``)."""

    def __init__(
        self,
        spec: ArchitectureSpec,
        c_in: int,
        c_out: int,
        kernel: tuple[int, ...],
        stride: tuple[int, ...],
        *,
        bias: bool,
        act: bool = True,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv3d(
            c_in, c_out, kernel, stride, padding=[(k - 1) // 2 for k in kernel], bias=bias
        )
        self.norm = InstanceNorm3d(c_out, eps=spec.norm_eps, affine=spec.norm_affine)
        ops: list[nn.Module] = [self.conv, self.norm]
        if act:
            self.nonlin = nn.LeakyReLU(spec.nonlin_negative_slope, inplace=True)
            ops.append(self.nonlin)
        self.all_modules = nn.Sequential(*ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.all_modules(x)


class StackedConvBlocks(nn.Module):
    """``n`` :class:`ConvNormAct` in a row; only the first one is strided."""

    def __init__(
        self,
        spec: ArchitectureSpec,
        n: int,
        c_in: int,
        c_out: int,
        kernel: tuple[int, ...],
        stride: tuple[int, ...],
    ) -> None:
        super().__init__()
        ones = (1,) * len(kernel)
        self.convs = nn.Sequential(
            *[
                ConvNormAct(
                    spec,
                    c_in if i == 0 else c_out,
                    c_out,
                    kernel,
                    stride if i == 0 else ones,
                    bias=spec.conv_bias,
                )
                for i in range(n)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)


class BasicBlockD(nn.Module):
    """ResNet-D basic block (average-pool + 1x1 conv projection on the skip)."""

    def __init__(
        self,
        spec: ArchitectureSpec,
        c_in: int,
        c_out: int,
        kernel: tuple[int, ...],
        stride: tuple[int, ...],
    ) -> None:
        super().__init__()
        ones = (1,) * len(kernel)
        self.conv1 = ConvNormAct(spec, c_in, c_out, kernel, stride, bias=spec.conv_bias)
        self.conv2 = ConvNormAct(spec, c_out, c_out, kernel, ones, bias=spec.conv_bias, act=False)
        self.nonlin2 = nn.LeakyReLU(spec.nonlin_negative_slope, inplace=True)
        ops: list[nn.Module] = []
        if any(s != 1 for s in stride):
            ops.append(nn.AvgPool3d(stride, stride))
        if c_in != c_out:
            ops.append(ConvNormAct(spec, c_in, c_out, ones, ones, bias=False, act=False))
        self.skip = nn.Sequential(*ops) if ops else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.conv1(x))
        out += self.skip(x)
        return self.nonlin2(out)


class StackedResidualBlocks(nn.Module):
    """``n`` :class:`BasicBlockD`; only the first one is strided."""

    def __init__(
        self,
        spec: ArchitectureSpec,
        n: int,
        c_in: int,
        c_out: int,
        kernel: tuple[int, ...],
        stride: tuple[int, ...],
    ) -> None:
        super().__init__()
        ones = (1,) * len(kernel)
        self.blocks = nn.Sequential(
            *[
                BasicBlockD(
                    spec, c_in if i == 0 else c_out, c_out, kernel, stride if i == 0 else ones
                )
                for i in range(n)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class Encoder(nn.Module):
    """Plain (``PlainConvEncoder``) or residual (``ResidualEncoder``) encoder returning skips."""

    def __init__(self, spec: ArchitectureSpec, in_channels: int) -> None:
        super().__init__()
        feats = spec.features_per_stage
        residual = spec.class_name == "ResidualEncoderUNet"
        if residual:
            self.stem = StackedConvBlocks(
                spec,
                1,
                in_channels,
                feats[0],
                spec.kernel_sizes[0],
                (1,) * len(spec.kernel_sizes[0]),
            )
            in_channels = feats[0]
        stages = []
        for s in range(spec.n_stages):
            if residual:
                stage: nn.Module = StackedResidualBlocks(
                    spec,
                    spec.n_conv_per_stage[s],
                    in_channels,
                    feats[s],
                    spec.kernel_sizes[s],
                    spec.strides[s],
                )
            else:
                stage = nn.Sequential(
                    StackedConvBlocks(
                        spec,
                        spec.n_conv_per_stage[s],
                        in_channels,
                        feats[s],
                        spec.kernel_sizes[s],
                        spec.strides[s],
                    )
                )
            stages.append(stage)
            in_channels = feats[s]
        self.stages = nn.Sequential(*stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if hasattr(self, "stem"):
            x = self.stem(x)
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


class Decoder(nn.Module):
    """nnU-Net's ``UNetDecoder`` without deep supervision (only the last head is evaluated)."""

    def __init__(self, spec: ArchitectureSpec, encoder: Encoder, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder  # registered like nnU-Net does, so the state dict keys match
        feats = spec.features_per_stage
        stages, transpconvs, seg_layers = [], [], []
        for s in range(1, spec.n_stages):
            below, skip = feats[-s], feats[-(s + 1)]
            stride = spec.strides[-s]
            transpconvs.append(
                nn.ConvTranspose3d(below, skip, stride, stride, bias=spec.conv_bias)
            )
            stages.append(
                StackedConvBlocks(
                    spec,
                    spec.n_conv_per_stage_decoder[s - 1],
                    2 * skip,
                    skip,
                    spec.kernel_sizes[-(s + 1)],
                    (1,) * len(stride),
                )
            )
            seg_layers.append(nn.Conv3d(skip, num_classes, 1, 1, 0, bias=True))
        self.stages = nn.ModuleList(stages)
        self.transpconvs = nn.ModuleList(transpconvs)
        self.seg_layers = nn.ModuleList(seg_layers)

    def features(self, skips: list[torch.Tensor]) -> torch.Tensor:
        """The last stage's features (the input of the segmentation head).

        The list is consumed: each skip is freed as soon as it has been concatenated.
        """
        x = skips.pop()
        for up, stage in zip(self.transpconvs, self.stages, strict=True):
            x = stage(torch.cat((up(x), skips.pop()), 1))
        return x

    def forward(self, skips: list[torch.Tensor]) -> torch.Tensor:
        return self.seg_layers[-1](self.features(skips))


class UNet(nn.Module):
    """``PlainConvUNet`` or ``ResidualEncoderUNet``, as an :class:`ArchitectureSpec` says."""

    def __init__(self, spec: ArchitectureSpec, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.spec = spec
        self.encoder = Encoder(spec, in_channels)
        self.decoder = Decoder(spec, self.encoder, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Everything but the segmentation head: ``forward(x) == head(features(x))``."""
        return self.decoder.features(self.encoder(x))

    @property
    def head(self) -> nn.Conv3d:
        """The segmentation head, a 1x1x1 convolution to the class logits."""
        return self.decoder.seg_layers[-1]


def build_network(spec: ArchitectureSpec, in_channels: int, num_classes: int) -> UNet:
    """Build the network of a model's plans, in evaluation mode."""
    return UNet(spec, in_channels, num_classes).eval()

"""The U-Nets nnU-Net v2 trains, rebuilt so that its checkpoints load unchanged.

Module names and nesting mirror ``dynamic_network_architectures`` (``PlainConvUNet`` and
``ResidualEncoderUNet`` with ``BasicBlockD``), so an nnU-Net ``network_weights`` state dict
loads with ``strict=True``. Only what inference needs is here: 3-D convolutions, instance norm,
leaky ReLU, no dropout, no deep supervision.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from .plans import ArchitectureSpec

#: The most bytes of input (or output) channels a stride-1 convolution is given at once. A
#: bigger tensor is convolved a slab of planes (along the first spatial axis) at a time, which
#: bounds oneDNN's blocked copies of the input and output to a slab: whole, they were the largest
#: transients of a DLMUSE tile (0.5 GB in its last decoder stage, 0.7 GB in its head).
SLAB_BYTES = 16 * 2**20
#: torch gives a float32 CPU convolution to oneDNN only when its input's C * D * H exceeds 20480
#: (ATen's ``ConvParams::use_mkldnn``); its other kernel sums in another order, so a slab's input
#: is kept well above that wherever the whole convolution's is.
_ONEDNN_MIN_CDH = 4 * 20480

#: ``planes(lo, hi)``: a convolution's input planes ``lo`` to ``hi - 1`` (first spatial axis).
PlaneSource = Callable[[int, int], torch.Tensor]


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    """``channels_last_3d`` for a 5-D tensor laid out so (and not also contiguous)."""
    cl = t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d)
    return torch.channels_last_3d if cl and not t.is_contiguous() else torch.contiguous_format


def empty_or(
    reuse: torch.Tensor | None,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    memory_format: torch.memory_format,
) -> torch.Tensor:
    """``reuse`` where its shape, dtype, device and layout are these (its values are to be
    written over), else a new empty tensor of them."""
    if (
        reuse is not None
        and reuse.shape == shape
        and reuse.dtype == dtype
        and reuse.device == device
        and reuse.is_contiguous(memory_format=memory_format)
    ):
        return reuse
    return torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)


def onednn_min_planes(channels: int, rows: int) -> int:
    """The fewest planes of a (channels, planes, rows, ...) input that torch gives oneDNN."""
    return -(-_ONEDNN_MIN_CDH // (channels * rows))


def conv_slabs(
    conv: nn.Conv3d,
    planes: PlaneSource,
    like: torch.Tensor,
    min_planes: int = 1,
    *,
    carry: bool = False,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """``conv(planes(0, depth))`` a slab of output planes at a time: ``(planes, output)`` pairs.

    ``like`` has the input's spatial shape and dtype; slabs have at least ``min_planes``
    planes (what ``planes`` needs to compute its own in one piece). Each slab's input is the
    planes its outputs read, zero-padded at the volume's faces as the convolution pads there, so
    every output element is the same sum of the same products as in the whole convolution
    (tested bit for bit against it on full tiles). Inputs within :data:`SLAB_BYTES`, inputs not
    on the CPU (cuDNN picks its algorithm by shape), and convolutions that are strided, dilated
    or not centred come whole, in one slab. Each slab must be let go before the next is asked
    for.

    With ``carry``, the consumer may write each slab's output over the input's planes it
    covers before it asks for the next slab: the input planes a later slab still reads below
    its own (its lower face, ``padding`` planes) are copied from the slab before, and
    ``planes`` is only ever asked for planes that no output has been written over yet.
    """
    depth, rows, cols = like.shape[2:]
    per_slab = max(
        SLAB_BYTES
        // (max(conv.in_channels, conv.out_channels) * rows * cols * like.element_size()),
        onednn_min_planes(conv.in_channels, rows),
        min_planes,
    )
    n = -(-depth // per_slab)
    pad = conv.padding[0]
    centred = conv.kernel_size[0] == 2 * pad + 1 and conv.dilation[0] == 1
    if n == 1 or not centred or any(s != 1 for s in conv.stride) or like.device.type != "cpu":
        yield slice(None), conv(planes(0, depth))
        return
    fill = getattr(planes, "fill", None)  # writes planes(lo, hi) into a given tensor
    bounds = [round(depth * i / n) for i in range(n + 1)]
    carried = None  # planes first..lo of this slab, copied before they were written over
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        first, last = max(lo - pad, 0), min(hi + pad, depth)
        start = first if carried is None else lo
        slab = torch.empty(
            (like.shape[0], conv.in_channels, hi - lo + 2 * pad, rows, cols),
            dtype=like.dtype,
            device=like.device,
            memory_format=memory_format_of(like),
        )
        at = first - (lo - pad)
        slab[:, :, :at] = 0
        slab[:, :, at + last - first :] = 0
        if carried is not None:
            slab[:, :, at : at + start - first] = carried
        if fill is not None:
            fill(start, last, slab[:, :, at + start - first : at + last - first])
        else:
            slab[:, :, at + start - first : at + last - first] = planes(start, last)
        if carry:  # the next slab's planes below its own, before this one's output lands there
            below = max(hi - pad, 0)
            carried = slab[:, :, at + below - first : at + hi - first].clone()
        out = nn.functional.conv3d(
            slab, conv.weight, conv.bias, 1, (0, *conv.padding[1:]), conv.dilation, conv.groups
        )
        del slab
        yield slice(lo, hi), out
        del out


def conv_in_slabs(
    conv: nn.Conv3d,
    planes: PlaneSource,
    like: torch.Tensor,
    min_planes: int = 1,
    *,
    into: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`conv_slabs` put together: ``conv(planes(0, depth))``.

    ``into``, a tensor the caller gives up (``planes`` may read it: it is written a slab at a
    time, with ``carry``), receives the output when its shape, dtype and layout are the output's
    and the convolution runs in slabs: the block needs no second feature map of that size.
    """
    out = None
    for where, y in conv_slabs(conv, planes, like, min_planes, carry=into is not None):
        if where == slice(None):
            return y
        if out is None:
            shape = (y.shape[0], y.shape[1], like.shape[2], *y.shape[3:])
            out = empty_or(into, shape, y.dtype, y.device, memory_format_of(y))
        out[:, :, where] = y
        del y
    return out


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

    def normalize_(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` written into ``x`` itself, bit for bit: no second copy of a feature map
        (176 MB for DLMUSE's first stage in fp32), nor the fresh pages it would fault in.

        The batch-norm kernel computes every channel's statistics before it writes any output,
        then transforms each element where it reads it, so its ``out`` may be its input.
        Without autograd only (an in-place op would break a backward pass).
        """
        if x.dim() != 5 or x.shape[0] != 1 or self.track_running_stats or x.requires_grad:
            return self(x)
        # the kernel's statistics dtype: the parameters' (fp32 ones for a bf16 map), else the map's
        acc = x.dtype if self.weight is None else self.weight.dtype
        stats = x.new_empty(0, dtype=acc), x.new_empty(0, dtype=acc)
        torch.ops.aten.native_batch_norm.out(
            x,
            self.weight,
            self.bias,
            None,
            None,
            True,
            0.0,
            self.eps,
            out=x,
            save_mean=stats[0],
            save_invstd=stats[1],
        )
        return x


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
        self.all_modules = nn.Sequential(*ops)  # nnU-Net's module tree, for the state dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.from_planes(lambda lo, hi: x[:, :, lo:hi], x)

    def over(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward`, its output written over ``x`` where it fits (``x`` is given up)."""
        return self.from_planes(lambda lo, hi: x[:, :, lo:hi], x, into=x)

    def from_planes(
        self,
        planes: PlaneSource,
        like: torch.Tensor,
        min_planes: int = 1,
        *,
        into: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The block on the input ``planes`` gives (:func:`conv_in_slabs`)."""
        x = self.norm.normalize_(conv_in_slabs(self.conv, planes, like, min_planes, into=into))
        return self.nonlin(x) if hasattr(self, "nonlin") else x


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
        first, *rest = self.convs
        x = first(x)
        for block in rest:  # each written over the last one's output, which nothing else holds
            x = block.over(x)
        return x


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

        The list is consumed: each skip is given up as soon as it has been used. Each stage's
        first convolution reads ``cat(up(x), skip)`` a slab at a time (:func:`conv_in_slabs`),
        so the whole upsampled and concatenated input is never held, and writes its output over
        the skip, the blocks after it over their input: a stage holds one feature map of its
        size, not two.
        """
        x = skips.pop()
        for up, stage in zip(self.transpconvs, self.stages, strict=True):
            skip = skips.pop()
            first, *rest = stage.convs
            # a slab's upsampling is itself one oneDNN convolution (torch's other kernel sums
            # in another order)
            min_planes = up.stride[0] * onednn_min_planes(up.in_channels, x.shape[3])
            x = first.from_planes(_UpsampledWithSkip(up, x, skip), skip, min_planes, into=skip)
            del skip
            for block in rest:
                x = block.over(x)
        return x

    def forward(self, skips: list[torch.Tensor]) -> torch.Tensor:
        return self.seg_layers[-1](self.features(skips))


class _UpsampledWithSkip:
    """Planes of ``cat(up(below), skip)``, each computed from the planes of ``below`` under it.

    nnU-Net's transposed convolutions have kernel = stride, so an output plane depends on one
    input plane only. :meth:`fill` writes the planes straight into a convolution's slab, with
    no concatenated copy to write and read again (132 MB a slab at DLMUSE's full resolution).
    """

    def __init__(self, up: nn.ConvTranspose3d, below: torch.Tensor, skip: torch.Tensor) -> None:
        self.up, self.below, self.skip = up, below, skip

    def _upsampled(self, lo: int, hi: int) -> torch.Tensor:
        step = self.up.stride[0]
        first = lo // step
        upsampled = self.up(self.below[:, :, first : -(-hi // step)])
        at = lo - first * step
        return upsampled[:, :, at : at + hi - lo]

    def __call__(self, lo: int, hi: int) -> torch.Tensor:
        return torch.cat((self._upsampled(lo, hi), self.skip[:, :, lo:hi]), 1)

    def fill(self, lo: int, hi: int, out: torch.Tensor) -> None:
        """``out[:] = self(lo, hi)``."""
        upsampled = self._upsampled(lo, hi)
        n = upsampled.shape[1]
        out[:, :n] = upsampled
        del upsampled
        out[:, n:] = self.skip[:, :, lo:hi]


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

"""A deterministic path through a random PlainConvUNet so its 2-class output looks like a mask.

Random weights alone make DLICV's "ICV mask" random texture; the pipeline downstream (largest
component, crop, DLMUSE on the masked image) then sees nothing like a head.  See
:func:`add_intensity_guidance`.
"""

from __future__ import annotations

import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn

# Calibrated on the real scans in ../shared/data with nnunetv2's predictor.
GUIDE_SHIFT = 3.0
GUIDE_LEVEL = 3
GUIDE_GAIN = 4.0
GUIDE_CORE_THRESHOLD = 0.5
GUIDE_THRESHOLD = 1.25


@torch.no_grad()
def _route(block: nn.Module, routes: dict[int, int], *, box: bool = False) -> None:
    """Make output channels of a conv-norm-nonlin block shifted copies of input channels.

    ``routes`` maps output channel to input channel.  The conv row gets a centre tap of 1
    (``box=False``) or a uniform kernel that averages over the kernel (``box=True``, strided
    convs then average-pool); instance norm gets weight 1 and bias ``GUIDE_SHIFT``, which keeps
    (almost) every standardised value positive so that the LeakyReLU is linear on the channel.
    """
    conv, norm = block.conv, block.norm
    centre = tuple(k // 2 for k in conv.kernel_size)
    for out_channel, in_channel in routes.items():
        conv.weight[out_channel] = 0.0
        if box:
            conv.weight[out_channel, in_channel] = 1.0 / conv.weight[0, 0].numel()
        else:
            conv.weight[(out_channel, in_channel, *centre)] = 1.0
        conv.bias[out_channel] = 0.0
        norm.weight[out_channel] = 1.0
        norm.bias[out_channel] = GUIDE_SHIFT


@torch.no_grad()
def add_intensity_guidance(
    network: PlainConvUNet,
    *,
    level: int = GUIDE_LEVEL,
    gain: float = GUIDE_GAIN,
    core_threshold: float = GUIDE_CORE_THRESHOLD,
    threshold: float = GUIDE_THRESHOLD,
    foreground_class: int = 1,
) -> None:
    """Add a deterministic path that makes the foreground a smooth blob over the bright brain.

    Channel 0 carries the image down and up the U-Net; every other channel and weight stays
    random:

    1. encoder stage 0: both convs copy the input (centre tap 1);
    2. encoder stages ``1..level``: every conv averages channel 0 with a uniform kernel (the
       strided convs average-pool), i.e. the image smoothed over ~1 cm at ``level=3``;
    3. the last norm of stage ``level`` gets bias ``-core_threshold`` instead of the shift, so
       its LeakyReLU keeps (almost) only where the smoothed, patch-standardised intensity
       exceeds ``core_threshold``: the large bright core of the brain survives, thin bright
       structures (scalp, vessels, the neck) fade (an erosion);
    4. that skip enters its decoder stage; on the way up each transposed conv copies channel 0
       to all its stride positions (nearest upsampling) and each decoder conv box-filters it
       again (a dilation and smoothing);
    5. the last segmentation layer adds ``±gain/2 * (c - SHIFT - threshold)`` to the
       foreground/background logits, ``c`` being channel 0, so
       ``logit[fg] - logit[0] = gain * (c - SHIFT - threshold) + random part``.

    Instance norm standardises every conv output over the sliding-window patch; with the norm
    bias ``GUIDE_SHIFT`` the values stay positive and the LeakyReLUs linear, except at step 3.
    The random part (all other He-initialised channels) is small against ``gain``.

    The defaults were calibrated with nnunetv2's predictor on the real scans in
    ``../shared/data``: the mask is a blob over the central white matter and deep grey matter,
    its largest 6-connected component holds 0.37-1.5 l (far above DLICV's 200,000-voxel
    threshold at 1 mm) and, unlike a plain intensity threshold (which connects scalp, face and
    neck), its bounding box stays brain-sized, which keeps NiChart's ICV crop and thus DLMUSE's
    152-class export small enough for a 24 GB machine.

    Parameters
    ----------
    network
        A freshly initialised network with more than ``level + 1`` stages (modified in place).
    level
        Encoder stage (>= 1) whose skip carries the smoothed intensity.
    gain
        Slope of the logit difference per unit of channel 0.
    core_threshold
        Patch z-score of the smoothed intensity kept at step 3.
    threshold
        Level of channel 0 (above the shift) where the logit difference is zero.
    foreground_class
        The class that gets the positive logit.
    """
    encoder, decoder = network.encoder, network.decoder
    n_stages = len(encoder.output_channels)
    if not 1 <= level <= n_stages - 2:
        raise ValueError(f"cannot guide a {n_stages}-stage network through stage {level}")

    def encoder_blocks(stage: int) -> list[nn.Module]:
        return list(encoder.stages[stage][-1].convs)

    def decoder_blocks(stage: int) -> list[nn.Module]:
        return list(decoder.stages[n_stages - 2 - stage].convs)

    for block in encoder_blocks(0):
        _route(block, {0: 0})
    for stage in range(1, level + 1):
        for block in encoder_blocks(stage):
            _route(block, {0: 0}, box=True)
    encoder_blocks(level)[-1].norm.bias[0] = -core_threshold
    for stage in range(level, -1, -1):
        first, *rest = decoder_blocks(stage)
        if stage == level:
            # Decoder stages see cat(transposed-conv output, skip): the skip comes second.
            source = encoder.output_channels[stage]
        else:
            transp = decoder.transpconvs[n_stages - 2 - stage]
            transp.weight[:, 0] = 0.0
            transp.weight[0, 0] = 1.0
            transp.bias[0] = 0.0
            source = 0
        _route(first, {0: source}, box=True)
        for block in rest:
            _route(block, {0: 0}, box=True)
    seg = decoder.seg_layers[-1]
    offset = GUIDE_SHIFT + threshold
    for cls, sign in ((foreground_class, 0.5), (0, -0.5)):
        seg.weight[cls, 0] = sign * gain
        seg.bias[cls] = -sign * gain * offset

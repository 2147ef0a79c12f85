"""Exact rewrites of the reference network applied before compiling: same modules, same weights, same outputs.

``BlockBufferDenseNet`` runs torchvision's DenseNet with one buffer per dense block. torchvision's
forward concatenates every earlier feature map for each layer (``torch.cat`` in ``_DenseLayer``),
which the compiler turns into copy kernels: 105 of the 376 kernels of a batch-1 call of the
AOTInductor package on the H100 (``benchmarks/trace_summary.py --calls``). Here each layer reads a
view of the channels written so far and writes its new channels once, into their place. Under
stock ``torch.compile`` on the H100 that took batch 1 from 1.010 to 0.862 ms and batch 128 from
15,285 to 16,832 img/s (``benchmarks/blockbuf_bench.py``, record ``...-blockbuf-s10.json``).
With ``fused`` (the Triton layer kernel of ``optimize/kernels.py``) and ``pool_first``, its
AOTInductor package ran batch 128 at 1.45-1.47x stock ``torch.compile`` (``...-issue4-fused-s11.json``);
with ``fused_conv`` too (and split-K at small batches), 1.513x at batch 128 and 0.798x stock's
batch-1 latency in one run (``...-issue4-fusedconv-split-s12-b.json``); with every channels-last
tensor allocated without inductor's NaN fill (``kernels.empty_channels_last``) and one bottleneck
tensor per block (``shared_bottleneck``), 1.86x at batch 128 and 0.73x at batch 1
(``...-issue4-nofill-mids-s13.json``).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from optimize import kernels

log = logging.getLogger(__name__)


class BlockBufferDenseNet(nn.Module):
    """torchvision's DenseNet (its modules and weights, shared, under ``net``) with a block-wide feature buffer.

    ``fused``: each layer's batch norm + ReLU + 1x1 convolution + batch norm + ReLU runs as one
    kernel (``optimize.kernels.bn_relu_conv1x1``: Triton on a CUDA device, PyTorch ops on a CPU)
    that reads the block buffer once; its per-channel scales and shifts are computed here, once,
    from the modules' eval-mode statistics (so build it after the weights and dtype are final).
    ``pool_first``: each transition averages 2x2 pixels *before* its 1x1 convolution instead of
    after (both are linear, so the result is the same up to rounding): the convolution runs on a
    quarter of the pixels and the normalised full-size tensor is never written.
    ``fused_conv`` (with ``fused``): each layer's 3x3 convolution by a Triton kernel too
    (``optimize.kernels.conv3x3_into``) that writes the layer's new channels straight into the
    buffer, instead of cuDNN's convolution into a new tensor and a copy into the buffer.
    ``shared_bottleneck`` (with ``fused``): every layer of a block writes its bottleneck (the fused
    kernel's output, the 3x3 convolution's input) into one tensor of the block instead of a new one
    (H100 package, batch 128: 28,402 against 25,738 img/s; record ``issue4-nofill-mids-s13``).
    Every channels-last tensor here is allocated by ``kernels.empty_channels_last``: inductor
    stored NaN over ``torch.empty(memory_format=channels_last)`` before the kernels wrote it.
    """

    def __init__(
        self, densenet: nn.Module, *, fused: bool = False, pool_first: bool = False, fused_conv: bool = False,
        shared_bottleneck: bool = False,
        configs: tuple[kernels.Config, ...] = kernels.BLOCK_CONFIGS,
        conv_configs: tuple[kernels.Config, ...] = kernels.CONV_CONFIGS,
    ) -> None:  # fmt: skip
        super().__init__()
        self.net = densenet
        self.fused = fused
        self.pool_first = pool_first
        self.configs = configs  # the fused kernel's tiles per dense block (``kernels.BLOCK_CONFIGS``)
        if fused_conv and not fused:
            raise ValueError("fused_conv=True needs fused=True (the 3x3 kernel reads the fused kernel's output)")
        self.fused_conv = fused_conv
        if shared_bottleneck and not fused:
            raise ValueError("shared_bottleneck=True needs fused=True (it is the fused kernel's output)")
        self.shared_bottleneck = shared_bottleneck
        self.conv_configs = conv_configs  # the 3x3 kernel's tiles per dense block (``kernels.CONV_CONFIGS``)
        self.split_target = kernels.split_target(configs + conv_configs)
        self.layers = 0
        if fused:
            net: Any = densenet
            for name, block in net.features.named_children():
                if not name.startswith("denseblock"):
                    continue
                for layer in block.values():
                    w1 = layer.conv1.weight.detach()
                    w = w1.reshape(w1.shape[0], w1.shape[1]).t().contiguous()  # [K, N]: output channels contiguous
                    # Not persistent: derived from the weights, not saved with them.
                    parts = [w, *kernels.bn_affine(layer.norm1), *kernels.bn_affine(layer.norm2)]
                    if self.fused_conv:
                        parts.append(kernels.conv3x3_weight(layer.conv2.weight))
                    for part, t in zip(("w", "s1", "b1", "s2", "b2", "w2"), parts, strict=False):
                        self.register_buffer(f"fused{self.layers}_{part}", t, persistent=False)
                    self.layers += 1
            odd = unaligned_channels(densenet)
            if odd:
                log.warning(
                    "fused kernels on %d channel counts not divisible by 16 (%s): Triton cannot assume "
                    "aligned rows for them, and such a pruned package ran 0.54x its unpruned base on an H100 "
                    "(record issue4-pruned-fused-pairs-s14); prune in multiples of 16 (round_to=16)",
                    len(odd),
                    ", ".join(odd[:6]) + (", ..." if len(odd) > 6 else ""),
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net: Any = self.net  # torchvision's DenseNet: its submodules by name
        f = net.features
        x = f.pool0(f.relu0(f.norm0(f.conv0(x))))
        blocks = len([name for name in f._modules if name.startswith("denseblock")])
        # Shared by every layer's kernels in turn (split-K at small batches); None off the GPU.
        ws = kernels.split_workspace(x.device, self.split_target) if self.fused else None
        j = 0
        for i in range(1, blocks + 1):
            layers = list(getattr(f, f"denseblock{i}").values())
            c = x.shape[1]
            # Each layer's own growth: a channel-pruned network may have pruned layers differently.
            total = c + sum(layer.conv2.out_channels for layer in layers)
            n, _, h, w = x.shape
            if self.fused or _layout(x) == torch.channels_last:
                buf = kernels.empty_channels_last(n, total, h, w, dtype=x.dtype, device=x.device)
            else:
                buf = torch.empty((n, total, h, w), dtype=x.dtype, device=x.device)
            mids: torch.Tensor | None = None
            if self.fused:
                # Every write into the buffer through the one mutating op: a slice assignment here
                # made the compiler copy the whole buffer before the first op write (~0.2 ms a
                # block at batch 128 on the H100).
                kernels.write_channels(buf, x, 0)
                if self.shared_bottleneck:
                    width = max(layer.conv1.out_channels for layer in layers)
                    mids = kernels.empty_channels_last(n, width, h, w, dtype=x.dtype, device=x.device)
            else:
                buf[:, :c] = x
            for layer in layers:
                # _DenseLayer's own forward, on a view instead of a concatenation (drop_rate is 0 in eval).
                growth = layer.conv2.out_channels
                if self.fused:
                    w, s1, b1, s2, b2 = (getattr(self, f"fused{j}_{part}") for part in ("w", "s1", "b1", "s2", "b2"))
                    config = self.configs[min(i, len(self.configs)) - 1]
                    into = None if mids is None else mids[:, : w.shape[1]]
                    mid = kernels.bn_relu_conv1x1(buf, c, w, s1, b1, s2, b2, config, ws, into)
                    if self.fused_conv:
                        w2 = getattr(self, f"fused{j}_w2")
                        conv_config = self.conv_configs[min(i, len(self.conv_configs)) - 1]
                        kernels.conv3x3_into(buf, mid, w2, c, conv_config, ws)
                    else:
                        kernels.write_channels(buf, layer.conv2(mid), c)
                    j += 1
                else:
                    mid = layer.conv1(layer.relu1(layer.norm1(buf[:, :c])))
                    buf[:, c : c + growth] = layer.conv2(layer.relu2(layer.norm2(mid)))
                c += growth
            if i == blocks:
                x = buf
            elif self.pool_first:
                t = getattr(f, f"transition{i}")
                x = t.conv(t.pool(t.relu(t.norm(buf))))
            else:
                x = getattr(f, f"transition{i}")(buf)
        x = torch.relu(f.norm5(x))
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        logits: torch.Tensor = net.classifier(x)
        return logits


def unaligned_channels(densenet: nn.Module) -> list[str]:
    """The channel counts the fused kernels index by that are not multiples of 16, as
    ``module.attribute=value``: each layer's input width (the block buffer's slice it reads), its
    bottleneck and its growth, and each block buffer's width (its rows' stride: the last layer's
    input and growth together)."""
    net: Any = densenet
    odd: list[str] = []
    for name, block in net.features.named_children():
        if not name.startswith("denseblock"):
            continue
        layers = list(block.values())
        total = layers[-1].conv1.in_channels + layers[-1].conv2.out_channels
        if total % 16:
            odd.append(f"{name}.buffer={total}")
        for i, layer in enumerate(layers, 1):
            for attr, value in (("in", layer.conv1.in_channels), ("bottleneck", layer.conv1.out_channels),
                                ("growth", layer.conv2.out_channels)):  # fmt: skip
                if value % 16:
                    odd.append(f"{name}.denselayer{i}.{attr}={value}")
    return odd


def _layout(x: torch.Tensor) -> torch.memory_format:
    """Channels-last when ``x`` is (and is not also plainly contiguous, as 1x1 maps are): the buffer follows it."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format

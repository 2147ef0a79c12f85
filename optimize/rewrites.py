"""Exact rewrites of the reference network applied before compiling: same modules, same weights, same outputs.

``BlockBufferDenseNet`` runs torchvision's DenseNet with one buffer per dense block. torchvision's
forward concatenates every earlier feature map for each layer (``torch.cat`` in ``_DenseLayer``),
which the compiler turns into copy kernels: 105 of the 376 kernels of a batch-1 call of the
AOTInductor package on the H100 (``benchmarks/trace_summary.py --calls``). Here each layer reads a
view of the channels written so far and writes its new channels once, into their place. Under
stock ``torch.compile`` on the H100 that took batch 1 from 1.010 to 0.862 ms and batch 128 from
15,285 to 16,832 img/s (``benchmarks/blockbuf_bench.py``, record ``...-blockbuf-s10.json``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class BlockBufferDenseNet(nn.Module):
    """torchvision's DenseNet (its modules and weights, shared, under ``net``) with a block-wide feature buffer."""

    def __init__(self, densenet: nn.Module) -> None:
        super().__init__()
        self.net = densenet

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net: Any = self.net  # torchvision's DenseNet: its submodules by name
        f = net.features
        x = f.pool0(f.relu0(f.norm0(f.conv0(x))))
        blocks = len([name for name in f._modules if name.startswith("denseblock")])
        for i in range(1, blocks + 1):
            layers = list(getattr(f, f"denseblock{i}").values())
            c = x.shape[1]
            # Each layer's own growth: a channel-pruned network may have pruned layers differently.
            total = c + sum(layer.conv2.out_channels for layer in layers)
            buf = torch.empty((x.shape[0], total, x.shape[2], x.shape[3]), dtype=x.dtype, device=x.device,
                              memory_format=_layout(x))  # fmt: skip
            buf[:, :c] = x
            for layer in layers:
                # _DenseLayer's own forward, on a view instead of a concatenation (drop_rate is 0 in eval).
                mid = layer.conv1(layer.relu1(layer.norm1(buf[:, :c])))
                growth = layer.conv2.out_channels
                buf[:, c : c + growth] = layer.conv2(layer.relu2(layer.norm2(mid)))
                c += growth
            x = getattr(f, f"transition{i}")(buf) if i < blocks else buf
        x = torch.relu(f.norm5(x))
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        logits: torch.Tensor = net.classifier(x)
        return logits


def _layout(x: torch.Tensor) -> torch.memory_format:
    """Channels-last when ``x`` is (and is not also plainly contiguous, as 1x1 maps are): the buffer follows it."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format

"""CIFAR-10 ResNets of depth 6n+2 with "option A" (parameter-free) shortcuts.

The architecture of akamaster/pytorch_resnet_cifar10, described here in our own code so the
checkpoints in ``../shared/data`` load with their original module names.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CIFAR_RESNET_DEPTHS = (20, 32, 44, 56, 110)


class PadShortcut(nn.Module):
    """Option-A shortcut: stride-2 subsample, then route input channels to output channels.

    ``out[:, j] = x[:, gather_index[j], ::2, ::2] * keep_mask[j]``. Unpruned, output channel
    ``C_in/2 + i`` carries input channel ``i`` and the rest are zero padding, exactly as
    ``F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, C_in // 2, C_in // 2))``. Holding the routing in
    two buffers (not parameters) lets compression narrow either side and keeps the shortcut
    weight-free: it exports to ONNX as Slice + Gather + Mul.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        pad = (out_channels - in_channels) // 2
        gather = torch.zeros(out_channels, dtype=torch.long)
        mask = torch.zeros(out_channels)
        gather[pad:pad + in_channels] = torch.arange(in_channels)
        mask[pad:pad + in_channels] = 1.0
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.register_buffer("gather_index", gather)
        self.register_buffer("keep_mask", mask)
        # Trained checkpoints predate these buffers: their defaults come from the architecture.
        self.register_load_state_dict_post_hook(_routing_may_be_missing)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::2, ::2]
        return x.index_select(1, self.gather_index) * self.keep_mask.view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, passes={int(self.keep_mask.sum())}"

    def spec_widths(self) -> dict:
        """The widths a saved compressed model's spec records for this layer (``models/saved.py``)."""
        return {"kind": "pad_shortcut", "in_channels": self.in_channels, "out_channels": self.out_channels}

    @classmethod
    def from_spec_widths(cls, widths: dict) -> "PadShortcut":
        """A shortcut at recorded widths; its routing comes from the saved weights."""
        return cls(widths["in_channels"], widths["out_channels"])


def _routing_may_be_missing(module: PadShortcut, incompatible) -> None:
    for key in [k for k in incompatible.missing_keys if k.endswith(("gather_index", "keep_mask"))]:
        incompatible.missing_keys.remove(key)


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, inner_planes: int | None = None, stride: int = 1):
        super().__init__()
        inner = inner_planes or planes
        self.conv1 = nn.Conv2d(in_planes, inner, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = PadShortcut(in_planes, planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: stem, three stages of n blocks (16/32/64), linear head."""

    def __init__(self, depth: int = 20, num_classes: int = 10, widths: tuple[int, int, int] = (16, 32, 64)):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        stages = []
        for stage, planes in enumerate(widths):
            blocks = []
            for i in range(n):
                stride = 2 if (stage > 0 and i == 0) else 1
                blocks.append(BasicBlock(in_planes, planes, stride=stride))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(widths[2], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def cifar_resnet18(num_classes: int = 10) -> nn.Module:
    """torchvision's resnet18 in its CIFAR form (3x3 stem conv, no max-pool), as in the folding papers."""
    import torchvision

    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model

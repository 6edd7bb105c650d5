"""A grouped (not depthwise) convolution as a consumer: each of its filters reads only its own group's
input channels, so summing the columns of two input channels from different groups has no place to
go; the group it reads is left whole by fold and prune alike, and its own outputs fold as usual."""
import torch
from torch import nn

from foldship.compress import channel_groups, compress_model


class GroupedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.grouped(torch.relu(self.stem(x)))).mean((2, 3)))


def test_the_group_a_grouped_conv_reads_is_kept_whole_with_its_reason():
    torch.manual_seed(0)
    model, x = GroupedNet().eval(), torch.randn(2, 3, 8, 8)
    reason = "grouped convolution grouped (groups=2) as a consumer"
    assert {g.name: g.foldable for g in channel_groups(model, x)} == {"stem": f"no: {reason}", "grouped": "yes"}
    for method in ("fold", "prune-l1"):
        result = compress_model(model, x, method, 0.5, device="cpu")
        assert {g.name: g.action for g in result.groups}["stem"] == f"kept: {reason}"
        compressed = result.model
        # stem keeps 8 channels, in 2 groups of 4; the grouped conv's outputs take int(8 * 0.5) = 4
        assert (compressed.stem.out_channels, compressed.grouped.in_channels, compressed.grouped.groups) == (8, 8, 2)
        assert (compressed.grouped.out_channels, compressed.head.in_features) == (4, 4)
        with torch.no_grad():
            assert compressed(x).shape == (2, 3)

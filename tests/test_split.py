"""A split (``torch.split`` of one layer's output, each part read by its own layer): the split layer's
group maps each part onto part of its channels, so fold and prune leave it whole; the layers after
the split are ordinary groups and take the paper's width."""
import torch
from torch import nn

from foldship.compress import channel_groups, compress_model


class SplitNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.left, self.right = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        a, b = torch.split(torch.relu(self.stem(x)), [4, 4], 1)
        return self.head(torch.cat([torch.relu(self.left(a)), torch.relu(self.right(b))], 1).mean((2, 3)))


def duplicated_split_net() -> SplitNet:
    """left's and right's channels 2, 3 copy channels 0, 1 (the head reads each pair's mean): a model
    whose branches are really 2 wide."""
    torch.manual_seed(0)
    model = SplitNet().eval()
    with torch.no_grad():
        for branch, offset in ((model.left, 0), (model.right, 4)):
            branch.weight[2:] = branch.weight[:2]
            branch.bias[2:] = branch.bias[:2]
            columns = model.head.weight[:, offset:offset + 4]
            mean = (columns[:, :2] + columns[:, 2:]) / 2
            columns[:, :2], columns[:, 2:] = mean, mean
    return model


def test_the_split_layer_is_reported_and_kept_whole_and_its_readers_fold_exactly():
    model, x = duplicated_split_net(), torch.randn(2, 3, 8, 8)
    foldable = {g.name: g.foldable for g in channel_groups(model, x)}
    assert foldable == {"stem": "no: uneven channel mapping (partial split)", "left": "yes", "right": "yes"}
    result = compress_model(model, x, "fold", 0.5, device="cpu")
    folded = result.model
    # the split layer keeps all 8 channels; each branch keeps int(4 * 0.5) = 2, as the paper's width rule says
    assert (folded.stem.out_channels, folded.left.out_channels, folded.right.out_channels) == (8, 2, 2)
    assert folded.head.in_features == 4
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-6)  # the duplicated branches fold back exactly
    pruned = compress_model(model, x, "prune-l2", 0.5, device="cpu").model
    assert [p.shape for p in pruned.parameters()] == [p.shape for p in folded.parameters()]

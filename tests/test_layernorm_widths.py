"""LayerNorm-bound widths: a LayerNorm normalises over every channel of the residual width it reads,
so merging or removing any of them changes every output's statistics; that width is reported and
kept whole, while the MLP's hidden width inside the block folds to the paper's width."""
import torch
from torch import nn

from foldship.compress import channel_groups, compress_model


class PreNormBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.norm = nn.Linear(6, 8), nn.LayerNorm(8)
        self.up, self.down, self.head = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.down(torch.relu(self.up(self.norm(h))))
        return self.head(h.mean(1))


def test_the_layernorm_width_is_reported_and_kept_whole_and_the_mlp_width_folds():
    torch.manual_seed(0)
    model, x = PreNormBlock().eval(), torch.randn(2, 5, 6)
    reason = "LayerNorm norm: merging channels would change its statistics"
    groups = {g.name: g for g in channel_groups(model, x)}
    assert (groups["embed"].kind, groups["embed"].foldable) == ("stream", f"no: {reason}")
    assert groups["up"].foldable == "yes"
    for method in ("fold", "prune-l2"):
        compressed = compress_model(model, x, method, 0.5, device="cpu").model
        assert compressed.norm.normalized_shape == (8,) and compressed.embed.out_features == 8
        assert (compressed.up.out_features, compressed.down.in_features) == (8, 8)  # int(16 * 0.5)
        with torch.no_grad():
            assert compressed(x).shape == (2, 3)

"""Transformers: MLP channel groups (traced) and attention-head groups (found by structure).

Hugging Face BERT (the real all-MiniLM-L6-v2 weights), a LLaMA-style decoder with grouped-query
attention, and torchvision's VisionTransformer after the exact nn.MultiheadAttention rewrite.
Each folds a model whose channels and heads were duplicated back to the original outputs.
"""
import copy

import pytest
import torch
from torch import nn

from foldship.compress import channel_groups, compress_model
from foldship.models.head_attention import HeadAttention, rewrite_attention
from foldship.models import load_model

from .conftest import duplicate_channels

pytest.importorskip("transformers")
MINILM = "hf:sentence-transformers/all-MiniLM-L6-v2"


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).abs().max() / ref.abs().max())


def fold_duplicated(model: nn.Module, x: torch.Tensor) -> tuple[float, list]:
    """Duplicate every channel and head, fold at ratio 0.5: relative error against the duplicated model."""
    duplicated = duplicate_channels(copy.deepcopy(model), x)
    with torch.no_grad():
        ref = duplicated(x)
        # One k-means++ restart finds exact duplicates (it never seeds a row twice); fewer restarts keep this fast.
        result = compress_model(duplicated, x, "fold", 0.5, restarts=1)
        return relative_error(result.model(x), ref), result.groups


def members_of(groups, kind: str) -> list[set]:
    return [set(g.members) for g in groups if g.kind == kind]


@pytest.fixture(scope="module")
def minilm():
    loaded = load_model(MINILM)
    return loaded.model, loaded.example_inputs(2)


def test_minilm_groups_are_mlp_intermediates_and_heads(minilm):
    model, x = minilm
    groups = channel_groups(model, x)
    heads = [g for g in groups if g.kind == "heads"]
    assert [(g.name, g.size) for g in heads] == [(f"hf.encoder.layer.{i}.attention", 12) for i in range(6)]
    layer = "hf.encoder.layer.2"
    assert {(f"{layer}.attention.self.{p}", "out") for p in ("query", "key", "value")} | \
        {(f"{layer}.attention.output.dense", "in")} in members_of(groups, "heads")
    mlp = {g.name: g for g in groups if g.name.endswith("intermediate.dense")}
    assert len(mlp) == 6 and all(g.size == 1536 for g in mlp.values())
    assert set(mlp[f"{layer}.intermediate.dense"].members) == {(f"{layer}.intermediate.dense", "out"),
                                                              (f"{layer}.output.dense", "in")}


def test_minilm_folds_duplicated_channels_and_heads_losslessly(minilm):
    model, x = minilm
    error, groups = fold_duplicated(model, x)
    assert error < 1e-4
    assert {g.name: g.kept for g in groups if g.action == "folded"} == {
        **{f"hf.encoder.layer.{i}.intermediate.dense": 768 for i in range(6)},
        **{f"hf.encoder.layer.{i}.attention": 6 for i in range(6)}}


def test_minilm_head_counts_are_patched_and_padding_still_works(minilm):
    model, x = minilm
    small = compress_model(model, x, "prune-l2", 0.5).model
    attention = small.hf.encoder.layer[0].attention.self
    assert (attention.num_attention_heads, attention.all_head_size, attention.query.out_features) == (6, 192, 192)
    assert small.hf.config.num_attention_heads == 6 and model.hf.config.num_attention_heads == 12
    mask = torch.ones_like(x)
    mask[1, 10:] = 0  # padded tokens must not change the others
    with torch.no_grad():
        padded = small(x, mask)[1, :10]
        short = small(x[1:, :10], mask[1:, :10])[0]
    assert relative_error(padded, short) < 1e-5


def llama(heads: int, kv_heads: int):
    from foldship.models.hf import llama_decoder

    model = llama_decoder(hidden_size=64, num_attention_heads=heads, num_key_value_heads=kv_heads,
                          intermediate_size=172, num_hidden_layers=2)
    return model, model.example_inputs(2)


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4)])
def test_llama_groups_keep_query_heads_with_their_kv_head(heads, kv_heads):
    """heads / KV heads = 2 is the ratio where Torch-Pruning's own attention grouping hangs."""
    model, x = llama(heads, kv_heads)
    groups = channel_groups(model, x)
    attention = "hf.model.layers.1.self_attn"
    assert [(g.name, g.size) for g in groups if g.kind == "heads"] == [
        ("hf.model.layers.0.self_attn", kv_heads), (attention, kv_heads)]
    assert {(f"{attention}.{p}_proj", "out") for p in "qkv"} | {(f"{attention}.o_proj", "in")} \
        in members_of(groups, "heads")
    mlp = next(g for g in groups if g.name == "hf.model.layers.1.mlp.gate_proj")
    assert mlp.size == 172 and set(mlp.members) == {("hf.model.layers.1.mlp.gate_proj", "out"),
                                                    ("hf.model.layers.1.mlp.up_proj", "out"),
                                                    ("hf.model.layers.1.mlp.down_proj", "in")}


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4)])
def test_llama_folds_duplicated_channels_and_kv_groups_losslessly(heads, kv_heads):
    model, x = llama(heads, kv_heads)
    error, groups = fold_duplicated(model, x)
    assert error < 1e-4
    assert [g.kept for g in groups if g.kind == "heads"] == [kv_heads // 2] * 2


def test_llama_fold_and_prune_give_the_same_patched_architecture():
    model, x = llama(4, 2)
    shapes = {}
    for method in ("fold", "prune-l2"):
        small = compress_model(model, x, method, 0.5, restarts=1).model
        attention = small.hf.model.layers[0].self_attn
        config = small.hf.config
        assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (2, 1, 16)
        assert attention.num_key_value_groups == 2  # two query heads still read each KV head
        shapes[method] = {k: tuple(v.shape) for k, v in small.state_dict().items()}
        with torch.no_grad():
            assert small(x).shape == (2, 16, 256)
    assert shapes["fold"] == shapes["prune-l2"]
    assert shapes["fold"]["hf.model.layers.0.self_attn.q_proj.weight"] == (32, 64)
    assert shapes["fold"]["hf.model.layers.0.self_attn.k_proj.weight"] == (16, 64)
    assert shapes["fold"]["hf.model.layers.0.mlp.down_proj.weight"] == (64, 86)
    assert model.hf.config.num_attention_heads == 4  # the input model is unchanged


def small_vit() -> tuple[nn.Module, torch.Tensor]:
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128,
                              num_classes=10).eval()
    nn.init.normal_(model.heads.head.weight)  # torchvision starts the classifier at zero
    return model, torch.randn(2, 3, 32, 32)


def test_multihead_attention_rewrite_is_exact():
    model, x = small_vit()
    rewritten = copy.deepcopy(model)
    assert rewrite_attention(rewritten) == 2
    assert not any(isinstance(m, nn.MultiheadAttention) for m in rewritten.modules())
    with torch.no_grad():
        assert relative_error(rewritten(x), model(x)) < 1e-6


@pytest.mark.parametrize("need_weights", [True, False])
def test_head_attention_matches_torch_with_masks(need_weights):
    torch.manual_seed(0)
    torch_attention = nn.MultiheadAttention(16, 4, kdim=12, vdim=8).eval()  # sequence-first, separate k/v widths
    ours = HeadAttention.from_torch(torch_attention).eval()
    query, key, value = torch.randn(5, 3, 16), torch.randn(7, 3, 12), torch.randn(7, 3, 8)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[0, 4:] = True
    causal = torch.triu(torch.ones(5, 7, dtype=torch.bool), 1)
    with torch.no_grad():
        expected, expected_weights = torch_attention(query, key, value, key_padding_mask=padding, attn_mask=causal,
                                                     need_weights=need_weights)
        got, weights = ours(query, key, value, key_padding_mask=padding, attn_mask=causal, need_weights=need_weights)
    assert relative_error(got, expected) < 1e-6
    if need_weights:
        assert relative_error(weights, expected_weights) < 1e-6


def test_vit_heads_and_mlp_fold_duplicates_losslessly():
    model, x = small_vit()
    rewrite_attention(model)
    groups = channel_groups(model, x)
    block = "encoder.layers.encoder_layer_1"
    assert [(g.name, g.size) for g in groups if g.kind == "heads"] == [
        ("encoder.layers.encoder_layer_0.self_attention", 4), (f"{block}.self_attention", 4)]
    mlp = next(g for g in groups if g.name == f"{block}.mlp.0")
    assert set(mlp.members) == {(f"{block}.mlp.0", "out"), (f"{block}.mlp.3", "in")}
    error, folded = fold_duplicated(model, x)
    assert error < 1e-4
    assert {g.name: g.kept for g in folded if g.action == "folded"} == {
        "encoder.layers.encoder_layer_0.mlp.0": 64, f"{block}.mlp.0": 64,
        "encoder.layers.encoder_layer_0.self_attention": 2, f"{block}.self_attention": 2}


def test_vit_head_counts_are_patched():
    model, x = small_vit()
    rewrite_attention(model)
    small = compress_model(model, x, "prune-l1", 0.5).model
    block = small.encoder.layers[0]
    assert (block.num_heads, block.self_attention.num_heads, block.self_attention.q.out_features) == (2, 2, 32)
    with torch.no_grad():
        assert small(x).shape == (2, 10)


def test_heads_fold_without_a_manual_rewrite():
    """compress and channel_groups rewrite their own copy; the caller's attention stays torch's."""
    model, x = small_vit()
    groups = channel_groups(model, x)
    assert [g.size for g in groups if g.kind == "heads"] == [4, 4]
    # a Linear with bias traces as AddmmBackward: the MLP hidden channels are not a residual stream
    assert {g.kind for g in groups if g.name.endswith("mlp.0")} == {"inner"}
    small = compress_model(model, x, "fold", 0.5).model
    assert isinstance(model.encoder.layers[0].self_attention, nn.MultiheadAttention)
    assert small.encoder.layers[0].self_attention.num_heads == 2
    with torch.no_grad():
        assert small(x).shape == (2, 10)

"""Layer-wise reconstruction (--repair reconstruct): each layer re-solved by ridge least squares so
its outputs on calibration images match the uncompressed model's. Expected weights come from
torch.linalg.lstsq on the same data (the ridge as extra rows), computed here, not by the code."""
from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from torch import nn

from foldship.compress import compress, compress_model
from foldship.compress.reconstruct import RIDGE, reconstruct
from foldship.compress.repairs import canonical_repair, repair_steps
from foldship.data import calibration_images
from foldship.errors import BadInput
from foldship.pipeline.config import load_config
from foldship.pipeline.report import reconstruction_lines
from foldship.validators import evaluate_torch

from .conftest import CIFAR_JPEG, duplicate_channels


def ridge_lstsq(inputs: torch.Tensor, targets: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """argmin ||inputs w - targets||^2 + lam ||w - start||^2, lam = RIDGE x mean diag(inputs^T inputs),
    by lstsq on the stacked system [inputs; sqrt(lam) I] w = [targets; sqrt(lam) start]. Inputs
    that are all zero (a channel the ReLU silences) leave the start as it is."""
    inputs, targets, start = (t.to(torch.float64) for t in (inputs, targets, start))
    lam = RIDGE * (inputs * inputs).sum(0).mean()
    if lam == 0:
        return start
    eye = torch.eye(inputs.shape[1], dtype=torch.float64)
    return torch.linalg.lstsq(torch.cat([inputs, lam.sqrt() * eye]),
                              torch.cat([targets, lam.sqrt() * start])).solution


def with_ones(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)


def captured(model: nn.Module, module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``module``'s input and output when ``model`` runs on ``x``."""
    seen = {}
    hook = module.register_forward_hook(lambda m, i, o: seen.update(input=i[0], output=o))
    with torch.no_grad():
        model(x)
    hook.remove()
    return seen["input"], seen["output"]


def top1(model, images) -> float:
    return 100.0 * evaluate_torch(model, images.x).correct(images.y) / len(images)


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_linear_pair_matches_ridge_least_squares_computed_independently():
    torch.manual_seed(0)
    model, x = TwoLayer().eval(), torch.randn(200, 6)
    result = compress_model(model, x[:2], "prune-l2", 0.5, repair="reconstruct", calibration=x, device="cpu")
    kept = torch.topk(model.fc2.weight.norm(dim=0), 4).indices.sort().values  # prune-l2 on a Linear group: largest consumer columns
    with torch.no_grad():
        hidden = torch.relu(x @ model.fc1.weight[kept].T + model.fc1.bias[kept]).double()
        target = model(x).double()
    start = torch.cat([model.fc2.weight[:, kept].T, model.fc2.bias[None]])  # (5, 3): kept columns, then the bias
    expected = ridge_lstsq(with_ones(hidden), target, start)
    fc1, fc2 = result.model.fc1, result.model.fc2
    assert torch.equal(fc1.weight, model.fc1.weight[kept])  # exact inputs and rows: left as they were
    assert torch.allclose(fc2.weight.double(), expected[:4].T, atol=1e-5)
    assert torch.allclose(fc2.bias.double(), expected[4], atol=1e-5)
    records = {r.name: r for r in result.reconstruction.layers}
    assert records["fc1"].action == "kept: exact already"
    assert records["fc2"].action == "reconstructed"
    assert (records["fc2"].unknowns, records["fc2"].positions) == (5, 200)
    residual = ((with_ones(hidden) @ expected - target) ** 2).sum() / (target ** 2).sum()
    assert records["fc2"].error_after == pytest.approx(float(residual.detach()), rel=1e-4)


def test_duplicated_channels_fold_exactly_and_reconstruction_leaves_them(zoo):
    # Folding a model whose channels come in identical pairs is lossless, so every layer's target
    # (the cluster mean of its outputs) is met already: reconstruction must not move a weight.
    model, x = zoo["cifar_resnet20"]
    wide = duplicate_channels(copy.deepcopy(model), x)
    images = torch.randn(40, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # the classifier solves 33
    plain = compress_model(wide, x, "fold", 0.5, device="cpu").model
    result = compress_model(wide, x, "fold", 0.5, repair="reconstruct", calibration=images, device="cpu")
    assert {r.action for r in result.reconstruction.layers} == {"kept: exact already"}
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), result.model.state_dict().values()))


def test_fold_ar_targets_carry_the_bn_std_it_divides_by(zoo):
    # Fold-AR merges each cluster's rows divided by their BN's std (random here, 0.7 to 1.2), so a
    # producer whose inputs are exact meets its target (the map's 1/(|c| s_i) weights) exactly only
    # if the map carries the divisors; its consumer, reading merged channels, is re-solved.
    model, x = zoo["cifar_resnet20"]
    images = torch.randn(66, 3, 32, 32, generator=torch.Generator().manual_seed(7))  # the classifier needs 65
    result = compress_model(model, x, "fold", 0.5, groups="inner", repair="fold-ar+reconstruct", calibration=images,
                            device="cpu")
    records = {r.name: r for r in result.reconstruction.layers}
    assert records["layer1.0.conv1"].action == "kept: exact already"
    assert records["layer1.0.conv2"].action == "reconstructed"
    assert result.summary()["repair"] == "fold-ar+reconstruct"


def test_pruned_channels_that_are_combinations_of_kept_ones_are_restored_exactly():
    # fc1's outputs 4..7 are fixed small combinations A of outputs 0..3 (bias included), which
    # pruning keeps (fc2 reads them through larger columns: a Linear group is scored by its
    # consumer's columns). With nothing between the layers, fc2 reading the kept
    # outputs reproduces the model exactly with columns W2[:, :4] + W2[:, 4:] A: the least-squares
    # answer without a ridge.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 3)).eval()
    mix = 0.1 * torch.randn(4, 4)
    with torch.no_grad():
        model[0].weight[4:] = mix @ model[0].weight[:4]
        model[0].bias[4:] = mix @ model[0].bias[:4]
        model[1].weight[:, :4] *= 3.0
    images = torch.randn(50, 6)
    result = compress_model(model, images[:2], "prune-l2", 0.5, device="cpu")
    with torch.no_grad():
        reference = model(images)
        before = (result.model(images) - reference).norm() / reference.norm()
        reconstruct(result.model, model, images, result.channel_maps, ridge=0.0)
        after = (result.model(images) - reference).norm() / reference.norm()
    exact = model[1].weight[:, :4] + model[1].weight[:, 4:] @ mix
    assert torch.equal(result.model[0].weight, model[0].weight[:4])
    assert before > 0.01
    assert torch.allclose(result.model[1].weight, exact, atol=1e-4)
    assert torch.allclose(result.model[1].bias, model[1].bias, atol=1e-4)
    assert after < 1e-5


class DepthwiseNet(nn.Module):
    """conv -> BN -> ReLU -> expand 1x1 -> BN -> ReLU -> depthwise -> BN -> ReLU -> project -> pool -> linear."""

    def __init__(self, kernel: int):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.expand, self.bn1 = nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.depthwise = nn.Conv2d(16, 16, kernel, padding=kernel // 2, groups=16, bias=False)
        self.bn2, self.project, self.head = nn.BatchNorm2d(16), nn.Conv2d(16, 8, 1), nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.relu(self.bn2(self.depthwise(torch.relu(self.bn1(self.expand(x))))))
        return self.head(self.project(x).mean((2, 3)))


@pytest.mark.parametrize("kernel", [3, 1])
def test_depthwise_consumer_is_solved_channel_by_channel(kernel):
    from .conftest import randomise_bn

    torch.manual_seed(0)
    model = randomise_bn(DepthwiseNet(kernel))
    images = torch.randn(48, 3, 5, 5, generator=torch.Generator().manual_seed(3))  # 25 positions: all sampled
    result = compress_model(model, images[:2], "prune-l2", 0.5, repair="reconstruct", calibration=images, device="cpu")
    # prune-l2, group by group: the stem keeps its 4 largest filters, then the expansion group its 8
    # largest rows over the stem channels left
    stem_kept = torch.topk(model.stem.weight.flatten(1).norm(dim=1), 4).indices.sort().values
    kept = torch.topk(model.expand.weight[:, stem_kept].flatten(1).norm(dim=1), 8).indices.sort().values
    folded = result.model
    record = {r.name: r for r in result.reconstruction.layers}["depthwise"]
    assert (record.kind, record.action, record.unknowns) == ("depthwise conv", "reconstructed", kernel * kernel)
    x, _ = captured(folded, folded.depthwise, images)  # the input the solve saw: upstream is final
    _, y = captured(model, model.depthwise, images)
    patches = nn.functional.unfold(x, kernel, padding=kernel // 2)  # (N, 8 k k, 25)
    for c in range(8):
        inputs = patches[:, c * kernel * kernel:(c + 1) * kernel * kernel].transpose(1, 2).reshape(-1, kernel * kernel)
        target = y[:, kept[c]].reshape(-1, 1)
        start = model.depthwise.weight[kept[c]].detach().reshape(-1, 1)
        if kernel == 1:  # a per-channel scale: <x, y> + lam w0 over <x, x> + lam, lam = RIDGE <x, x>
            xx, xy = float((inputs.double() ** 2).sum()), float((inputs.double() * target.double()).sum())
            scale = (xy + RIDGE * xx * float(start)) / (xx * (1 + RIDGE)) if xx > 0 else float(start)
            expected = torch.tensor([[scale]], dtype=torch.float64)
        else:
            expected = ridge_lstsq(inputs, target, start)
        assert torch.allclose(folded.depthwise.weight[c].reshape(-1, 1).double(), expected, atol=1e-5), c


class GroupedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.mid = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.grouped, self.head = nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.mid(torch.relu(self.stem(x))))
        return self.head(torch.relu(self.grouped(x)).mean((2, 3)))


def test_grouped_conv_is_solved_per_convolution_group():
    # The stem is folded; mid reads it, and the grouped conv reads mid's (whole but changed) outputs.
    torch.manual_seed(0)
    model = GroupedNet().eval()
    images = torch.randn(40, 3, 5, 5, generator=torch.Generator().manual_seed(4))
    result = compress_model(model, images[:2], "fold", 0.5, protected=["grouped", "head"], repair="reconstruct",
                            calibration=images, device="cpu")
    folded = result.model
    assert (folded.stem.out_channels, folded.grouped.in_channels) == (4, 8)
    record = {r.name: r for r in result.reconstruction.layers}["grouped"]
    assert (record.kind, record.action, record.unknowns) == ("grouped conv", "reconstructed", 4 * 9 + 1)
    x, _ = captured(folded, folded.grouped, images)
    _, y = captured(model, model.grouped, images)
    patches = nn.functional.unfold(x, 3, padding=1)  # (N, 72, 25)
    for g in range(2):
        inputs = with_ones(patches[:, g * 36:(g + 1) * 36].transpose(1, 2).reshape(-1, 36))
        target = y[:, g * 4:(g + 1) * 4].permute(0, 2, 3, 1).reshape(-1, 4)
        start = torch.cat([model.grouped.weight[g * 4:(g + 1) * 4].reshape(4, -1).T,
                           model.grouped.bias[None, g * 4:(g + 1) * 4]])
        expected = ridge_lstsq(inputs, target, start)
        got = torch.cat([folded.grouped.weight[g * 4:(g + 1) * 4].reshape(4, -1).T,
                         folded.grouped.bias[None, g * 4:(g + 1) * 4]]).double()
        assert torch.allclose(got, expected, atol=1e-5), g


class AttentionNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return self.head(x.mean(1))


def test_attention_output_projection_reads_the_folded_heads():
    torch.manual_seed(0)
    model = AttentionNet().eval()
    tokens = torch.randn(60, 5, 16, generator=torch.Generator().manual_seed(5))
    result = compress_model(model, tokens[:2], "fold", 0.5, groups="inner", repair="reconstruct", calibration=tokens,
                            device="cpu")
    folded = result.model
    assert (folded.attn.num_heads, folded.attn.out.in_features) == (2, 8)
    records = {r.name: r for r in result.reconstruction.layers}
    # q/k/v read the exact inputs and hold the mean of each folded head's rows: their targets, when
    # the recorded head maps are right, are met already
    assert [records[f"attn.{p}"].action for p in "qkv"] == ["kept: exact already"] * 3
    assert records["attn.out"].action == "reconstructed"
    assert (records["attn.out"].unknowns, records["attn.out"].positions) == (9, 300)  # 2 heads x 4 dims + bias
    heads, _ = captured(folded, folded.attn.out, tokens)
    reference = copy.deepcopy(model)
    from foldship.compress.groups import apply_rewrites
    apply_rewrites(reference)  # the same exact HeadAttention rewrite compression applies
    _, y = captured(reference, reference.attn.out, tokens)
    plain = compress(model, tokens[:2], method="fold", ratio=0.5, groups="inner")  # the same heads, not re-solved
    start = torch.cat([plain.attn.out.weight.T, plain.attn.out.bias[None]])
    expected = ridge_lstsq(with_ones(heads.reshape(-1, 8)), y.reshape(-1, 16), start)
    assert torch.allclose(folded.attn.out.weight.T.double(), expected[:8], atol=1e-5)
    assert torch.allclose(folded.attn.out.bias.double(), expected[8], atol=1e-5)
    with torch.no_grad():
        target = model(tokens)
        assert (folded(tokens) - target).norm() < 0.5 * (plain(tokens) - target).norm()


# --- repair names, order and bad input -----------------------------------------------------------

def test_repair_names_parse_in_one_order():
    assert repair_steps("none") == ()
    assert repair_steps("reconstruct+bn-recalibrate") == ("reconstruct", "bn-recalibrate")
    assert canonical_repair("fold-ar + reconstruct") == "fold-ar+reconstruct"
    for bad, words in (("bn-recalibrate+reconstruct", "in the order fold-ar+reconstruct+bn-recalibrate"),
                       ("reconstruct+reconstruct", "give each step once"),
                       ("reconstruct+magic", "unknown repair step 'magic'"),
                       ("none+reconstruct", "unknown repair step 'none'"),
                       ("fold-ar+bn-recalibrate", "use one of them")):
        with pytest.raises(BadInput, match=re.escape(words)):
            repair_steps(bad)


def test_config_refuses_reconstruct_without_calibration_data_and_misordered_steps():
    with pytest.raises(BadInput, match="repair reconstruct needs unlabelled calibration images: pass --calibration-data"):
        load_config(None, repair="reconstruct")
    with pytest.raises(BadInput, match="in the order"):
        load_config(None, repair="bn-recalibrate+reconstruct", calibration_data=str(CIFAR_JPEG))
    assert load_config(None, repair="reconstruct + bn-recalibrate",
                       calibration_data=str(CIFAR_JPEG)).repair == "reconstruct+bn-recalibrate"


def test_reconstruct_without_images_or_with_too_few_is_refused(zoo):
    model, x = zoo["cifar_resnet20"]
    with pytest.raises(BadInput, match="pass --calibration-data"):
        compress_model(model, x, "fold", 0.3, groups="inner", repair="reconstruct", device="cpu")
    # The classifier solves 64 weights + a bias per output from one pooled position per image.
    with pytest.raises(BadInput, match=r"needs at least 65 calibration images .*linear solves 65 weights per output "
                                       r"from 1 position\(s\) per image\); got 64"):
        compress_model(model, x, "fold", 0.3, groups="inner", repair="reconstruct",
                       calibration=torch.randn(64, 3, 32, 32), device="cpu")


def test_same_inputs_and_seed_give_identical_bytes(zoo):
    model, x = zoo["residual_concat"]
    images = torch.randn(40, 3, 12, 12, generator=torch.Generator().manual_seed(6))  # 144 positions: sampled
    first, second = (compress_model(model, x, "fold", 0.5, repair="reconstruct+bn-recalibrate", calibration=images,
                                    device="cpu").model.state_dict() for _ in range(2))
    assert list(first) == list(second)
    assert all(torch.equal(first[k], second[k]) for k in first)


# --- the real ResNet-20 ----------------------------------------------------------------------------

CALIBRATION_COUNT = 128  # from the JPEG test images, near-copies of the evaluation images dropped


@pytest.fixture(scope="module")
def folded_r20(resnet20, cifar_eval):
    """ResNet-20 folded at ratio 0.3 (--groups inner), with each repair, on 128 calibration images."""
    calibration = calibration_images(CIFAR_JPEG, resnet20.preprocessing, cifar_eval, CALIBRATION_COUNT).x
    x = resnet20.example_inputs(2)
    results = {repair: compress_model(resnet20.model, x, "fold", 0.3, groups="inner", repair=repair,
                                      calibration=calibration, device="cpu")
               for repair in ("none", "bn-recalibrate", "reconstruct", "reconstruct+bn-recalibrate")}
    return results, calibration


def test_reconstruction_recovers_the_folded_resnet20(folded_r20, cifar_eval):
    results, _ = folded_r20
    scores = {repair: top1(r.model, cifar_eval) for repair, r in results.items()}
    assert scores["reconstruct"] >= scores["none"] + 15.0, scores
    assert scores["reconstruct"] >= scores["bn-recalibrate"] + 3.0, scores


def test_no_layer_ends_with_a_larger_calibration_error(folded_r20, resnet20):
    results, calibration = folded_r20
    result = results["reconstruct"]
    layers = result.reconstruction.layers
    assert len(layers) == 20 and sum(r.action == "reconstructed" for r in layers) == 18  # stem, first conv1 exact
    for r in layers:
        assert r.error_after is None or r.error_after < r.error_before, r
    # The classifier's recorded errors, recomputed from the models' logits (one position per image, all used):
    # after = the reconstructed model's; before = the same features through the unchanged classifier.
    features, logits = captured(result.model, result.model.linear, calibration)
    with torch.no_grad():
        target = resnet20.model(calibration).double()
        unchanged = resnet20.model.linear(features).double()
    record = layers[-1]
    assert record.name == "linear"
    assert record.error_after == pytest.approx(float(((logits.double() - target) ** 2).sum() / (target ** 2).sum()),
                                               rel=1e-4)
    assert record.error_before == pytest.approx(float(((unchanged - target) ** 2).sum() / (target ** 2).sum()),
                                                rel=1e-4)
    summary = json.loads(json.dumps(result.summary()))["reconstruction"]  # report.json's compression.reconstruction
    assert summary["images"] == CALIBRATION_COUNT and summary["layers_reconstructed"] == 18
    lines = reconstruction_lines(summary)  # report.md
    assert lines[2].startswith(f"18 of 20 layers re-solved on {CALIBRATION_COUNT} calibration images")
    assert lines[-2].startswith(f"| linear | linear | 65 | {CALIBRATION_COUNT} | ") and lines[-2].endswith("| reconstructed |")


def test_bn_statistics_are_measured_on_the_reconstructed_layers(folded_r20, resnet20):
    """reconstruct+bn-recalibrate moves each BN's statistics once the layers before it are re-solved
    (and before the layers after it are), by the change in its input as deployed: a stream BN that
    compression left whole gets stored + (its input's mean in the final model - in the uncompressed one)."""
    results, calibration = folded_r20
    both = results["reconstruct+bn-recalibrate"].model
    original = resnet20.model.layer1[0].bn2  # in a residual stream, which --groups inner keeps whole
    final_input, _ = captured(both, both.layer1[0].bn2, calibration)  # eval mode, one batch of 128
    original_input, _ = captured(resnet20.model, original, calibration)
    expected = original.running_mean + final_input.mean((0, 2, 3)) - original_input.mean((0, 2, 3))
    assert torch.allclose(both.layer1[0].bn2.running_mean, expected, atol=1e-5)
    ratio = final_input.var((0, 2, 3)) / original_input.var((0, 2, 3))
    assert torch.allclose(both.layer1[0].bn2.running_var, original.running_var * ratio, rtol=1e-4)
    assert not torch.allclose(original.running_mean, expected, atol=1e-3)
    assert torch.equal(results["reconstruct"].model.layer1[0].bn2.running_mean, original.running_mean)

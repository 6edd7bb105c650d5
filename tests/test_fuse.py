"""BatchNorm fusion before export: every valid pair fused, nothing else touched, outputs unchanged."""
import pytest
import torch
from torch import nn

from foldship.exporters import fuse_batchnorm

from .conftest import randomise_bn


class SharedConvOutput(nn.Module):
    """conv_a's output feeds its BN and the residual sum: fusing would change the sum."""

    def __init__(self):
        super().__init__()
        self.conv_a, self.bn_a = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv_b, self.bn_b = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        a = self.conv_a(x)
        y = torch.relu(self.bn_a(a)) + a
        return self.head(torch.relu(self.bn_b(self.conv_b(y))).mean((2, 3)))


class LinearBatchNorm(nn.Module):
    """Linear+BN1d on (N, F) features fuses; on (N, C, L) sequences BN normalises another axis."""

    def __init__(self):
        super().__init__()
        self.flat, self.flat_bn = nn.Linear(12, 6), nn.BatchNorm1d(6)
        self.seq, self.seq_bn = nn.Linear(4, 3), nn.BatchNorm1d(3)

    def forward(self, x):  # x: (N, 3, 4)
        sequence = self.seq_bn(self.seq(x))  # (N, 3, 3): BN over dim 1, the Linear writes dim 2
        return self.flat_bn(self.flat(x.flatten(1))) + sequence.flatten(1).sum(1, keepdim=True)


def _randomise_bn1d(model):
    generator = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=generator))
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
    return model.eval()


def test_every_conv_bn_pair_of_the_trained_resnet20_fuses_exactly(resnet20, cifar_eval):
    result = fuse_batchnorm(resnet20.model, cifar_eval.x[:16])
    assert len(result.pairs) == 19 and result.unfused_batchnorms == 0 and result.note == ""
    assert not any(isinstance(m, nn.BatchNorm2d) for m in result.model.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in resnet20.model.modules())  # the input is left alone
    with torch.no_grad():
        before, after = resnet20.model(cifar_eval.x[:200]), result.model(cifar_eval.x[:200])
    assert (before - after).abs().max() < 1e-4 and (before.argmax(1) == after.argmax(1)).all()


@pytest.mark.parametrize("name", ["residual_concat", "cifar_resnet18"])
def test_zoo_models_fuse_with_random_statistics(zoo, name):
    model, example = zoo[name]
    result = fuse_batchnorm(model, example)
    assert result.pairs and result.unfused_batchnorms == 0
    assert result.max_abs_error <= result.tolerance


def test_shared_producer_output_is_not_fused():
    torch.manual_seed(0)
    model = randomise_bn(SharedConvOutput())
    x = torch.randn(4, 3, 8, 8)
    result = fuse_batchnorm(model, x)
    assert result.pairs == [("conv_b", "bn_b")] and result.unfused_batchnorms == 1
    with torch.no_grad():
        assert (model(x) - result.model(x)).abs().max() <= result.tolerance


def test_linear_bn_fuses_only_on_feature_axis():
    torch.manual_seed(0)
    model = _randomise_bn1d(LinearBatchNorm())
    x = torch.randn(5, 3, 4)
    result = fuse_batchnorm(model, x)
    assert result.pairs == [("flat", "flat_bn")] and result.unfused_batchnorms == 1
    with torch.no_grad():
        assert (model(x) - result.model(x)).abs().max() <= result.tolerance


def test_model_without_batchnorm_is_returned_as_is():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2)).eval()
    result = fuse_batchnorm(model, torch.randn(2, 3, 4))
    assert result.model is model and result.pairs == []

"""Channel-group discovery: the paper's groupings, found automatically."""
import torch

from foldship.compress import channel_groups


def test_cifar_resnet18_has_the_papers_12_groups(zoo):
    model, x = zoo["cifar_resnet18"]
    groups = channel_groups(model, x)
    assert sorted(g.size for g in groups) == sorted([64, 64, 64, 128, 128, 128, 256, 256, 256, 512, 512, 512])
    assert [g.kind for g in groups].count("stream") == 4
    stream1 = next(g for g in groups if g.name == "conv1")
    members = set(stream1.members)
    assert {("conv1", "out"), ("bn1", "out"), ("layer1.0.conv1", "in"), ("layer1.0.conv2", "out"),
            ("layer1.1.conv2", "out"), ("layer2.0.conv1", "in"), ("layer2.0.downsample.0", "in")} <= members
    stream4 = next(g for g in groups if g.name == "layer4.0.conv2")
    assert ("fc", "in") in stream4.members and ("layer4.0.downsample.0", "out") in stream4.members
    assert not any(("fc", "out") in g.members for g in groups)  # classifier outputs stay whole


def test_option_a_streams_are_separate_groups(zoo):
    """Torch-Pruning alone fuses ResNet20's 16/32/64 streams into one group; our shortcut module keeps them apart."""
    model, x = zoo["cifar_resnet20"]
    groups = channel_groups(model, x)
    assert len(groups) == 12
    streams = {g.name: g.size for g in groups if g.kind == "stream"}
    assert streams == {"conv1": 16, "layer2.0.conv2": 32, "layer3.0.conv2": 64}
    stream2 = next(g for g in groups if g.name == "layer2.0.conv2")
    assert ("layer2.0.shortcut", "out") in stream2.members
    stream1 = next(g for g in groups if g.name == "conv1")
    assert ("layer2.0.shortcut", "in") in stream1.members


def test_concat_segments_are_their_own_groups(zoo):
    model, x = zoo["residual_concat"]
    groups = {g.name: g for g in channel_groups(model, x)}
    assert groups["left"].size == 8 and groups["right"].size == 4
    assert ("mix", "in") in groups["left"].members and ("mix", "in") in groups["right"].members
    assert groups["stem"].kind == "stream" and groups["a"].kind == "inner"


def test_discovery_leaves_the_model_unchanged(zoo):
    model, x = zoo["residual_concat"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    channel_groups(model, x)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

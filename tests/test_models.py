"""Model registry: every model builds, runs forward/backward, has the published size, rejects bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scalelab.config import ModelConfig
from scalelab.errors import ConfigError
from scalelab.models import MODELS, BasicBlock, Bottleneck, build_model, count_parameters
from scalelab.recipe.norm import BatchNorm, set_emulated_workers

# name -> (width, input shape): small enough to keep the forward passes fast on a 2-core CPU.
CASES = {
    "mlp": (16, (1, 8, 8)),
    "cnn1d": (16, (1, 40)),
    "cnn2d": (8, (3, 16, 16)),
    "resnet20": (8, (3, 32, 32)),
    "resnet56": (4, (3, 32, 32)),
    "resnet18": (8, (3, 32, 32)),
    "resnet50": (8, (3, 32, 32)),
}


def test_every_registry_model_is_covered():
    assert set(CASES) == set(MODELS)


@pytest.mark.parametrize("norm", ["bn", "ghost", "none"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_build_forward_backward(name, norm):
    width, shape = CASES[name]
    cfg = ModelConfig(name=name, width=width, depth=4, norm=norm, ghost_batch=2)
    torch.manual_seed(0)
    model = build_model(cfg, shape, 7)
    x = torch.randn(4, *shape)
    out = model(x)
    assert out.shape == (4, 7)
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    has_bn = any(isinstance(m, BatchNorm) for m in model.modules())
    assert has_bn == (norm != "none")
    if norm == "ghost":
        assert all(m.ghost_batch == 2 for m in model.modules() if isinstance(m, BatchNorm))
    model.eval()
    with torch.no_grad():
        assert model(x[:3]).shape == (3, 7)


def test_emulated_workers_reach_model_norm_layers():
    model = build_model(ModelConfig(name="resnet20", width=4), (3, 8, 8), 10)
    set_emulated_workers(model, 2)
    assert all(m.splits == 2 for m in model.modules() if isinstance(m, BatchNorm))
    assert model(torch.randn(4, 3, 8, 8)).shape == (4, 10)


@pytest.mark.parametrize("name, width, shape, classes, published", [
    ("resnet20", 16, (3, 32, 32), 10, 0.27e6),     # He et al. 2016, Table 6
    ("resnet56", 16, (3, 32, 32), 10, 0.85e6),     # He et al. 2016, Table 6
    ("resnet18", 64, (3, 224, 224), 1000, 11.7e6),  # 11,689,512 in the reference implementations
    ("resnet50", 64, (3, 224, 224), 1000, 25.6e6),  # 25,557,032
])
def test_parameter_counts_match_published(name, width, shape, classes, published):
    # Only counts parameters: no 224x224 forward pass.
    n = count_parameters(build_model(ModelConfig(name=name, width=width), shape, classes))
    assert abs(n - published) / published < 0.01, n


def test_exact_imagenet_parameter_counts():
    for name, n in [("resnet18", 11_689_512), ("resnet50", 25_557_032)]:
        assert count_parameters(build_model(ModelConfig(name=name, width=64), (3, 224, 224), 1000)) == n


def test_width_scales_channels():
    small = count_parameters(build_model(ModelConfig(name="resnet20", width=16), (3, 32, 32), 10))
    wide = count_parameters(build_model(ModelConfig(name="resnet20", width=32), (3, 32, 32), 10))
    assert 3.8 < wide / small < 4.1  # conv parameters grow with width^2


@pytest.mark.parametrize("name", ["resnet20", "resnet18", "resnet50"])
@pytest.mark.parametrize("zero", [True, False])
def test_zero_init_residual_zeroes_exactly_the_last_bn_of_each_block(name, zero):
    model = build_model(ModelConfig(name=name, width=8, zero_init_residual=zero), (3, 32, 32), 10)
    blocks = [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    last = {id(b.norm3 if isinstance(b, Bottleneck) else b.norm2) for b in blocks}
    assert len(last) == {"resnet20": 9, "resnet18": 8, "resnet50": 16}[name]
    for m in model.modules():
        if isinstance(m, BatchNorm):
            expected = 0.0 if zero and id(m) in last else 1.0
            assert torch.all(m.weight == expected)
            assert torch.all(m.bias == 0)


def test_zero_init_residual_without_bn_changes_nothing():
    models = []
    for zero in (True, False):
        torch.manual_seed(0)
        cfg = ModelConfig(name="resnet20", width=4, norm="none", zero_init_residual=zero)
        models.append(build_model(cfg, (3, 8, 8), 2))
    a, b = models
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_initialisation():
    model = build_model(ModelConfig(name="cnn2d", width=8, depth=2), (3, 8, 8), 10)
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert conv.bias is None  # followed by BN
    fan_out = conv.out_channels * 9
    assert abs(conv.weight.std().item() - (2 / fan_out) ** 0.5) < 0.3 * (2 / fan_out) ** 0.5
    assert torch.all(model.classifier.bias == 0)
    plain = build_model(ModelConfig(name="cnn2d", width=8, depth=2, norm="none"), (3, 8, 8), 10)
    conv = next(m for m in plain.modules() if isinstance(m, nn.Conv2d))
    assert conv.bias is not None and torch.all(conv.bias == 0)


def test_cnn1d_has_no_global_pooling_and_strides_every_second_block():
    model = build_model(ModelConfig(name="cnn1d", width=8, depth=5), (1, 40), 10)
    strides = [m.stride[0] for m in model.modules() if isinstance(m, nn.Conv1d)]
    assert strides == [1, 2, 1, 2, 1]
    assert not any(isinstance(m, (nn.AdaptiveAvgPool1d, nn.AvgPool1d)) for m in model.modules())
    assert model.classifier[1].in_features == 8 * 10


def test_cnn2d_pools_only_while_spatial_size_allows():
    model = build_model(ModelConfig(name="cnn2d", width=4, depth=8), (1, 4, 4), 10)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 2  # 4 -> 2 -> 1, then no more
    assert model.classifier.in_features == 16
    assert model(torch.randn(2, 1, 4, 4)).shape == (2, 10)


@pytest.mark.parametrize("name, shape, layout", [
    ("cnn1d", (1, 28, 28), "(C, L)"),
    ("cnn2d", (1, 40), "(C, H, W)"),
    ("resnet20", (40,), "(C, H, W)"),
    ("resnet50", (1, 2, 3, 4), "(C, H, W)"),
])
def test_incompatible_input_shape(name, shape, layout):
    with pytest.raises(ConfigError) as err:
        build_model(ModelConfig(name=name), shape, 10)
    assert str(err.value) == f"model {name} needs inputs of shape {layout}; dataset gives {shape}"


def test_mlp_accepts_any_shape():
    for shape in [(12,), (1, 40), (3, 4, 4)]:
        model = build_model(ModelConfig(name="mlp", width=8, depth=2), shape, 3)
        assert model(torch.randn(2, *shape)).shape == (2, 3)


def test_unknown_name():
    with pytest.raises(ConfigError, match="unknown model 'vgg16'; known: cnn1d, cnn2d, mlp, resnet18"):
        build_model(ModelConfig(name="vgg16"), (3, 32, 32), 10)


def test_zero_width_and_depth_mean_the_model_default():
    from scalelab.models.registry import DEFAULT_DIMS

    r20 = count_parameters(build_model(ModelConfig(name="resnet20"), (3, 32, 32), 10))
    assert r20 == count_parameters(build_model(ModelConfig(name="resnet20", width=16), (3, 32, 32), 10))
    width, depth = DEFAULT_DIMS["cnn1d"]
    a = build_model(ModelConfig(name="cnn1d"), (1, 40), 10)
    b = build_model(ModelConfig(name="cnn1d", width=width, depth=depth), (1, 40), 10)
    assert count_parameters(a) == count_parameters(b)

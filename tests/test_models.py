"""Tests of gce.models: shapes, parameter counts, normalisation inside the model, checkpoints, errors."""

from __future__ import annotations

import io

import pytest
import torch

from gce.models import MODELS, Classifier, build_model

MNIST, CIFAR = (1, 28, 28), (3, 32, 32)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
# small variants keep the tests fast; the full WRN-28-10 is only counted, never run
FAST_KWARGS = {"wide_resnet": {"depth": 10, "widen_factor": 1}}


def make(name: str, input_shape=CIFAR, num_classes: int = 10, seed: int = 0, **kwargs) -> Classifier:
    torch.manual_seed(seed)
    return build_model(
        name, input_shape=input_shape, num_classes=num_classes, **FAST_KWARGS.get(name, {}), **kwargs
    )


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_names():
    expected = {"lenet5", "resnet20", "resnet32", "resnet56", "preact_resnet18", "wide_resnet", "mlp"}
    assert set(MODELS) == expected


@pytest.mark.parametrize("input_shape", [MNIST, CIFAR], ids=["mnist", "cifar"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_output_and_feature_shapes(name, input_shape):
    model = make(name, input_shape, num_classes=7).eval()
    x = torch.rand(3, *input_shape)
    logits, feats = model(x), model.features(x)
    assert isinstance(model, Classifier)
    assert model.num_classes == 7 and model.input_shape == input_shape
    assert logits.shape == (3, 7)
    assert feats.shape == (3, model.head.in_features)
    assert model.head is list(model.modules())[-1] and model.head.out_features == 7
    assert torch.isfinite(logits).all()
    # the head on the features is the forward pass
    torch.testing.assert_close(model.head(feats), logits)


@pytest.mark.parametrize(
    ("name", "input_shape", "expected", "rel"),
    [
        ("lenet5", MNIST, 61_706, 0.0),  # exact: the authors' LeNet-5 on MNIST
        ("resnet20", CIFAR, 270_000, 0.02),  # He et al. 2016, Table 6
        ("resnet32", CIFAR, 460_000, 0.02),
        ("resnet56", CIFAR, 850_000, 0.02),
        ("preact_resnet18", CIFAR, 11_170_000, 0.002),
    ],
)
def test_parameter_counts(name, input_shape, expected, rel):
    count = n_params(build_model(name, input_shape=input_shape, num_classes=10))
    assert count == pytest.approx(expected, rel=rel)


def test_wrn_28_10_parameter_count():
    model = build_model("wide_resnet", input_shape=CIFAR, num_classes=10)  # defaults: depth 28, widen 10
    assert n_params(model) == pytest.approx(36_500_000, rel=0.002)


def test_option_a_shortcuts_add_no_parameters():
    # resnet depth 6n+2: each extra block pair of a stage adds exactly its two convs and two BNs
    per_n = sum(9 * c * c + 9 * c * c + 4 * c for c in (16, 32, 64))
    assert n_params(make("resnet32")) - n_params(make("resnet20")) == 2 * per_n


@pytest.mark.parametrize("name", sorted(MODELS))
def test_normalisation_is_inside_the_model(name):
    normed = make(name, mean=CIFAR_MEAN, std=CIFAR_STD).eval()
    plain = make(name).eval()  # same seed -> same weights, identity normalisation
    x = torch.rand(2, *CIFAR)
    mean, std = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        assert not torch.allclose(normed(x), plain(x))
        torch.testing.assert_close(normed(x), plain((x - mean) / std))
        torch.testing.assert_close(normed.head(normed.features(x)), normed(x))


def test_identity_normalisation_has_no_buffers():
    assert not any("normalize" in k for k in make("mlp").state_dict())
    keys = make("mlp", mean=CIFAR_MEAN, std=CIFAR_STD).state_dict()
    assert "normalize.mean" in keys and keys["normalize.mean"].shape == (1, 3, 1, 1)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_state_dict_round_trip(name):
    model = make(name, mean=CIFAR_MEAN, std=CIFAR_STD, seed=1)
    model.train()
    with torch.no_grad():
        model(torch.rand(4, *CIFAR))  # move BN running statistics away from their init
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    restored = make(name, seed=2, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.rand(2, *CIFAR)
    model.eval(), restored.eval()
    with torch.no_grad():
        assert torch.equal(model(x), restored(x))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_input_gradient_channels_last_and_bf16(name):
    model = make(name).eval()
    x = torch.rand(2, *CIFAR, requires_grad=True)
    model(x).logsumexp(1).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0  # attacks need a usable input gradient

    reference = model(x.detach())
    model_cl = model.to(memory_format=torch.channels_last)
    out_cl = model_cl(x.detach().to(memory_format=torch.channels_last))
    torch.testing.assert_close(out_cl, reference, rtol=1e-4, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_bf16 = model_cl(x.detach().to(memory_format=torch.channels_last))
    assert out_bf16.shape == (2, 10) and torch.isfinite(out_bf16.float()).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", sorted(MODELS))
def test_runs_on_cuda_from_input_device(name):
    model = make(name, mean=CIFAR_MEAN, std=CIFAR_STD).cuda().to(memory_format=torch.channels_last)
    x = torch.rand(4, *CIFAR, device="cuda").to(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x)
    assert out.device.type == "cuda" and out.shape == (4, 10) and torch.isfinite(out.float()).all()


def test_unknown_name_lists_known_models():
    with pytest.raises(ValueError, match="model") as info:
        build_model("resnet9000", input_shape=CIFAR, num_classes=10)
    assert str(sorted(MODELS)) in str(info.value)


@pytest.mark.parametrize(
    ("name", "kwargs", "field"),
    [
        ("wide_resnet", {"depth": 27}, "depth"),
        ("wide_resnet", {"widen_factor": 0}, "widen_factor"),
        ("wide_resnet", {"dropout": 1.0}, "dropout"),
        ("mlp", {"num_classes": 1}, "num_classes"),
        ("mlp", {"num_classes": 2.5}, "num_classes"),
        ("mlp", {"input_shape": (28, 28)}, "input_shape"),
        ("mlp", {"input_shape": (1, 28, 0)}, "input_shape"),
        ("mlp", {"hidden": 0}, "hidden"),
        ("lenet5", {"input_shape": (1, 8, 8)}, "input_shape"),
        ("resnet20", {"mean": (0.5,), "std": (0.5, 0.5, 0.5)}, "mean"),
        ("resnet20", {"mean": (0.5,) * 3, "std": (0.5, 0.0, 0.5)}, "std"),
        ("resnet20", {"mean": (0.5,) * 3}, "std"),
        ("resnet20", {"depth": 32}, "depth"),  # depth is fixed by the name; not an option of resnet20
        ("mlp", {"widen_factor": 2}, "widen_factor"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_field(name, kwargs, field):
    args = {"input_shape": CIFAR, "num_classes": 10, **kwargs}
    with pytest.raises(ValueError, match=field):
        build_model(name, **args)


def test_resnet_depth_must_be_6n_plus_2():
    from gce.models import CifarResNet

    with pytest.raises(ValueError, match="depth"):
        CifarResNet(input_shape=CIFAR, num_classes=10, depth=21)
    assert n_params(CifarResNet(input_shape=CIFAR, num_classes=10, depth=56)) == n_params(make("resnet56"))

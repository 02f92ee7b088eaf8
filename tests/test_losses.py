import math

import pytest
import torch

from gce.losses import (
    LOSSES,
    complement_entropy,
    cross_entropy,
    get_loss,
    guided_complement_entropy,
    label_smoothing,
    logit_squeezing,
    loss_options,
)


def reference_gce(logits, target, alpha, normalization):
    """Eq. 2 of the paper written literally in float64: softmax, divide, log."""
    p = torch.softmax(logits.double(), dim=1)
    n, k = p.shape
    total = torch.zeros(n, dtype=torch.float64)
    for i in range(n):
        g = target[i]
        yg = p[i, g]
        s = 0.0
        for j in range(k):
            if j != g:
                q = p[i, j] / (1 - yg)
                s = s + q * torch.log(q)
        total[i] = yg**alpha * s
    norm = math.log(k - 1) if normalization == "paper" else math.log(k)
    return (total / norm).mean()


def authors_code_gce(logits, target, alpha, classes):
    """The released GCE.py computation (with its epsilons), on the CPU, for a direct comparison."""
    y_hat = torch.softmax(logits, dim=1)
    yg = torch.gather(y_hat, 1, target[:, None])
    px = y_hat / ((1 - yg) + 1e-7)
    zerohot = torch.ones(len(target), classes).scatter_(1, target[:, None], 0)
    out = (px * torch.log(px + 1e-10) * zerohot).sum(1) * (yg + 1e-7).squeeze(1) ** alpha
    return out.sum() / len(target) / math.log(classes)


@pytest.mark.parametrize("normalization", ["paper", "code"])
@pytest.mark.parametrize("alpha", [0.0, 0.1, 1 / 3, 1.0, 2.0])
@pytest.mark.parametrize("k", [3, 10, 100])
def test_gce_matches_float64_equation(normalization, alpha, k):
    g = torch.Generator().manual_seed(k)
    logits = torch.randn(16, k, generator=g, dtype=torch.float64) * 3
    target = torch.randint(0, k, (16,), generator=g)
    ours = guided_complement_entropy(logits, target, alpha=alpha, normalization=normalization)
    ref = reference_gce(logits, target, alpha, normalization)
    assert ours.dtype == torch.float32
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)


def test_gce_matches_authors_code_normalization():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 10, generator=g)
    target = torch.randint(0, 10, (64,), generator=g)
    ours = guided_complement_entropy(logits, target, alpha=0.333, normalization="code")
    assert ours.item() == pytest.approx(authors_code_gce(logits, target, 0.333, 10).item(), abs=1e-5)


def test_paper_normalised_values_lie_in_minus_one_zero():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(512, 10, generator=g) * torch.logspace(-2, 2, 512)[:, None]
    target = torch.randint(0, 10, (512,), generator=g)
    per_sample = guided_complement_entropy(logits, target, reduction="none")
    assert per_sample.shape == (512,)
    assert (per_sample <= 1e-6).all() and (per_sample >= -1 - 1e-6).all()
    # A perfectly flat complement with a certain prediction reaches -1 exactly.
    flat = torch.zeros(1, 10)
    flat[0, 3] = 50.0
    assert guided_complement_entropy(flat, torch.tensor([3])).item() == pytest.approx(-1.0, abs=1e-5)


def test_cot_code_normalisation_divides_by_the_class_count():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(16, 10, generator=g)
    target = torch.randint(0, 10, (16,), generator=g)
    classes = complement_entropy(logits, target, normalization="classes")
    paper = complement_entropy(logits, target, normalization="paper")
    assert classes.item() == pytest.approx(paper.item() * math.log(9) / 10, rel=1e-6)


def test_alpha_zero_is_normalised_complement_entropy():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(32, 7, generator=g)
    target = torch.randint(0, 7, (32,), generator=g)
    for norm in ("paper", "code"):
        a = guided_complement_entropy(logits, target, alpha=0.0, normalization=norm)
        b = complement_entropy(logits, target, normalization=norm)
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("scale", [100.0, 1e4])
@pytest.mark.parametrize("name", ["ce", "cot", "gce", "label_smoothing", "logit_squeezing"])
def test_saturated_logits_finite_in_fp32_and_bf16(name, scale):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(64, 10, generator=g)
    target = torch.randint(0, 10, (64,), generator=g)
    # Extremes: the target far above, far below, and ties among the complement.
    base[0] = 0
    base[0, target[0]] = 1
    base[1] = -1
    base[1, target[1]] = 1
    loss_fn = get_loss(name)
    for dtype in (torch.float32, torch.bfloat16):
        logits = (base * scale).to(dtype).requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = loss_fn(logits, target)
        loss.backward()
        assert torch.isfinite(loss), (name, scale, dtype)
        assert torch.isfinite(logits.grad).all(), (name, scale, dtype)


def test_gce_sgd_raises_true_class_and_flattens_complement():
    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(32, 10, generator=g) * 2).requires_grad_(True)
    target = torch.randint(0, 10, (32,), generator=g)

    def stats(z):
        p = torch.softmax(z.detach(), 1)
        yg = p.gather(1, target[:, None]).squeeze(1)
        mask = torch.nn.functional.one_hot(target, 10).bool()
        q = p.masked_fill(mask, 0) / (1 - yg[:, None])
        entropy = -(q * torch.log(q.clamp_min(1e-30))).sum(1)
        return yg.mean().item(), entropy.mean().item()

    yg0, h0 = stats(logits)
    opt = torch.optim.SGD([logits], lr=5.0)
    for _ in range(200):
        opt.zero_grad()
        guided_complement_entropy(logits, target).backward()
        opt.step()
    yg1, h1 = stats(logits)
    assert yg1 > yg0 + 0.3
    assert h1 > h0 + 0.3  # the complement distribution moves towards flat (max log 9)


def test_losses_follow_the_device_and_class_count():
    logits = torch.randn(4, 5, dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 4])
    for fn in (cross_entropy, complement_entropy, guided_complement_entropy):
        out = fn(logits, target)
        assert out.shape == () and out.device == logits.device
    assert guided_complement_entropy(logits, target, reduction="none").shape == (4,)
    assert guided_complement_entropy(logits, target, reduction="sum").item() == pytest.approx(
        4 * guided_complement_entropy(logits, target).item(), rel=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gce_on_cuda_matches_cpu():
    logits = torch.randn(8, 10)
    target = torch.randint(0, 10, (8,))
    cpu = guided_complement_entropy(logits, target)
    gpu = guided_complement_entropy(logits.cuda(), target.cuda())
    assert gpu.device.type == "cuda"
    assert gpu.item() == pytest.approx(cpu.item(), abs=1e-6)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: guided_complement_entropy(torch.randn(4, 2), torch.zeros(4, dtype=torch.long)), "at least 3"),
        (lambda: complement_entropy(torch.randn(4, 2), torch.zeros(4, dtype=torch.long)), "at least 3"),
        (lambda: guided_complement_entropy(torch.randn(4, 5), torch.zeros(3, dtype=torch.long)), "target"),
        (lambda: guided_complement_entropy(torch.randn(4, 5, 2), torch.zeros(4, dtype=torch.long)), "logits"),
        (lambda: guided_complement_entropy(torch.randn(4, 5), torch.zeros(4, dtype=torch.long), alpha=-0.1),
         "alpha"),
        (lambda: guided_complement_entropy(torch.randn(4, 5), torch.zeros(4, dtype=torch.long),
                                           normalization="x"), "normalization"),
        (lambda: cross_entropy(torch.randn(4, 5), torch.zeros(4, dtype=torch.long), reduction="avg"),
         "reduction"),
        (lambda: get_loss("focal"), "known losses"),
        (lambda: get_loss("ce", alpha=0.5), "alpha applies only"),
    ],
)
def test_bad_input_names_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_registry():
    assert set(LOSSES) == {"ce", "cot", "gce", "label_smoothing", "logit_squeezing"}
    assert loss_options("label_smoothing") == {"smoothing": 0.1} and loss_options("gce") == {}
    assert get_loss("gce").keywords["alpha"] == pytest.approx(1 / 3)


def test_label_smoothing_is_cross_entropy_against_smoothed_targets():
    g = torch.Generator().manual_seed(5)
    logits, target = torch.randn(32, 10, generator=g, dtype=torch.float64), torch.randint(0, 10, (32,), generator=g)
    eps = 0.2
    smoothed = torch.full((32, 10), eps / 10, dtype=torch.float64)
    smoothed[torch.arange(32), target] += 1 - eps
    expected = -(smoothed * torch.log_softmax(logits, 1)).sum(1).mean()
    torch.testing.assert_close(label_smoothing(logits, target, smoothing=eps).double(), expected, rtol=1e-5,
                               atol=1e-6)
    torch.testing.assert_close(label_smoothing(logits, target, smoothing=0.0), cross_entropy(logits, target))
    # Its minimiser is not a one-hot: the optimal true-class probability is 1 − ε + ε/K, the rest flat.
    z = torch.zeros(1, 10, requires_grad=True)
    opt = torch.optim.SGD([z], lr=1.0)
    for _ in range(500):
        opt.zero_grad()
        label_smoothing(z, torch.tensor([3]), smoothing=eps).backward()
        opt.step()
    p = torch.softmax(z.detach(), 1)[0]
    assert p[3].item() == pytest.approx(1 - eps + eps / 10, abs=1e-3)
    assert (p[torch.arange(10) != 3] - eps / 10).abs().max() < 1e-3


def test_logit_squeezing_adds_the_squared_logit_norm():
    g = torch.Generator().manual_seed(6)
    logits, target = torch.randn(16, 10, generator=g) * 3, torch.randint(0, 10, (16,), generator=g)
    penalty = logits.pow(2).sum(1)
    per_sample = logit_squeezing(logits, target, weight=0.1, reduction="none")
    torch.testing.assert_close(per_sample, cross_entropy(logits, target, reduction="none") + 0.1 * penalty)
    torch.testing.assert_close(logit_squeezing(logits, target, weight=0.0), cross_entropy(logits, target))


def test_loss_kwargs_are_bound_and_checked():
    fn = get_loss("label_smoothing", kwargs={"smoothing": 0.3})
    logits, target = torch.randn(8, 10), torch.randint(0, 10, (8,))
    torch.testing.assert_close(fn(logits, target), label_smoothing(logits, target, smoothing=0.3))
    assert fn(logits, target, reduction="none").shape == (8,)  # what 'train'-loss attacks call
    with pytest.raises(ValueError, match=r"no option\(s\) \['eps'\]; its options: \['smoothing'\]"):
        get_loss("label_smoothing", kwargs={"eps": 0.3})
    with pytest.raises(ValueError, match="smoothing must be in"):
        label_smoothing(logits, target, smoothing=1.0)
    with pytest.raises(ValueError, match="weight must be a finite number >= 0"):
        logit_squeezing(logits, target, weight=-1.0)


def test_loss_kwargs_in_the_train_config_name_the_field():
    from gce.config import ConfigError, TrainConfig

    cfg = TrainConfig.from_dict({"loss": {"name": "label_smoothing", "kwargs": {"smoothing": 0.2}}})
    assert cfg.to_flat()["loss.kwargs.smoothing"] == 0.2
    assert TrainConfig.from_flat(cfg.to_flat()).loss.kwargs == {"smoothing": 0.2}
    with pytest.raises(ConfigError, match="loss.kwargs.smoothing: must be an option of loss 'ce'"):
        TrainConfig.from_dict({"loss": {"name": "ce", "kwargs": {"smoothing": 0.2}}})
    with pytest.raises(ConfigError, match=r"loss.kwargs: smoothing must be in \[0, 1\)"):
        TrainConfig.from_dict({"loss": {"name": "label_smoothing", "kwargs": {"smoothing": 1.5}}})

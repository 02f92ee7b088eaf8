"""The evaluation engine against the reference code, on the same models, points and threat model, in one run.

(a) AutoAttack standard: ours (``gce.evaluate`` with ``autoattack``) vs the original code (``pyautoattack``'s
    ``run_standard_evaluation``);
(b) the ``masking_check`` spec's attack list (FGSM, PGD-40 with the training loss and CE, APGD-50 with CE
    and DLR, at ε 0.1/0.2/0.3) through our engine vs the same attacks through torchattacks, each attack at
    each ε on every clean-correct point with per-example worst-case bookkeeping.

Models (trained here, MNIST-5k, seconds each): LeNet-5 with CE, with GCE (α = 1/3), with PGD adversarial
training (CE, ε = 0.1: fewer points fall early), and a ResNet-20 (50 points: it costs ~30x LeNet-5 per point).
Each row prints time, images/s, robust accuracy of both sides and the speed ratio; "stronger or equal" says
whether our robust accuracy is at most the reference's plus sampling slack (1.96 binomial standard errors).

    python -m benchmarks.evaluation [--points 1000] [--eps 0.1] [--models lenet5-ce,...] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
import types
from pathlib import Path

import torch

from benchmarks.common import report
from gce.attacks import AttackConfig
from gce.evaluate import evaluate_robustness, predict
from gce.seeding import seeded
from gce.train import resolve_device

MODELS = {  # name -> (model, training loss, adversarial training eps or None, epochs, points scale)
    "lenet5-ce": ("lenet5", "ce", None, 10, 1.0),
    "lenet5-gce": ("lenet5", "gce", None, 10, 1.0),
    "lenet5-at": ("lenet5", "ce", 0.1, 5, 1.0),
    "resnet20-ce": ("resnet20", "ce", None, 1, 0.05),
}
MASKING_EPS = (0.1, 0.2, 0.3)


def train(name: str, device: str, seed: int = 0):
    """A model trained on MNIST-5k as the sweeps train it; returns (model, training loss, test split)."""
    from gce.config import TrainConfig
    from gce.train import fit

    arch, loss, at_eps, epochs, _ = MODELS[name]
    raw = {"data": {"dataset": "mnist5k"}, "model": {"name": arch}, "loss": {"name": loss},
           "optim": {"name": "adam", "lr": 1e-3}, "epochs": epochs, "batch_size": 64, "seed": seed, "device": device}
    if at_eps is not None:
        raw["adversarial"] = {"name": "pgd", "eps": at_eps, "steps": 10, "step_size": at_eps / 4}
    result = fit(TrainConfig.from_dict(raw))
    model = result.trainer.model.eval()
    return model, result.trainer.loss_fn, result.data.test


def points(split, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = split.images[:n], split.labels[:n]
    return (x.float() / 255.0 if x.dtype == torch.uint8 else x.float()), y


def ours_autoattack(model, x, y, eps: float, seed: int = 0) -> tuple[float, float, dict]:
    start = time.perf_counter()
    result = evaluate_robustness(model, (x, y), [AttackConfig(name="autoattack", eps=eps)], batch_size=len(y),
                                 seed=seed)
    members = {label.split(".", 1)[1]: by_eps[eps] for label, by_eps in result.chain.items()}
    return time.perf_counter() - start, result.accuracy["autoattack"][eps], members


def reference_autoattack(model, x, y, eps: float, seed: int = 0) -> tuple[float, float]:
    from pyautoattack import AutoAttack

    start = time.perf_counter()
    adversary = AutoAttack(model, norm="Linf", eps=eps, version="standard", seed=seed, device=x.device)
    with contextlib.redirect_stdout(None):
        x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=500)
    seconds = time.perf_counter() - start
    return seconds, (predict(model, x_adv) == y).float().mean().item()


def masking_list() -> list[AttackConfig]:
    out = []
    for eps in MASKING_EPS:
        out += [AttackConfig("fgsm", eps=eps, loss="train"), AttackConfig("fgsm", eps=eps),
                AttackConfig("pgd", eps=eps, steps=40, step_size=0.01, loss="train"),
                AttackConfig("pgd", eps=eps, steps=40, step_size=0.01),
                AttackConfig("apgd", eps=eps, steps=50), AttackConfig("apgd", eps=eps, steps=50, loss="dlr")]
    return out


def ours_masking(model, loss_fn, x, y, seed: int = 0) -> tuple[float, float]:
    start = time.perf_counter()
    result = evaluate_robustness(model, (x, y), masking_list(), train_loss=loss_fn, batch_size=len(y), seed=seed,
                                 primary_eps=max(MASKING_EPS))
    return time.perf_counter() - start, result.worst_case[("linf", max(MASKING_EPS))]


@contextlib.contextmanager
def _loss_in(module, loss_fn):
    """torchattacks' FGSM and PGD build ``nn.CrossEntropyLoss()`` inside ``forward``; for the training-loss
    attacks of a GCE model that name is pointed at the training loss while the call runs."""
    original = module.nn
    module.nn = types.SimpleNamespace(CrossEntropyLoss=lambda: (lambda logits, y: loss_fn(logits, y)))
    try:
        yield
    finally:
        module.nn = original


def reference_masking(model, loss_fn, x, y, seed: int = 0) -> tuple[float, float]:
    """torchattacks as a researcher scripts it: each attack at each ε on every clean-correct point, a point
    robust at ε when it survives every attack there (and, the balls being nested, at every smaller ε)."""
    import torchattacks
    from torchattacks.attacks import fgsm, pgd

    start = time.perf_counter()
    with seeded(seed, x.device):
        correct = predict(model, x) == y
        todo = correct.nonzero().squeeze(1)
        xs, ys = x[todo], y[todo]
        alive = torch.ones(len(todo), dtype=torch.bool, device=x.device)
        for eps in MASKING_EPS:
            attacks = [(torchattacks.FGSM(model, eps=eps), fgsm, True),
                       (torchattacks.FGSM(model, eps=eps), None, False),
                       (torchattacks.PGD(model, eps=eps, alpha=0.01, steps=40, random_start=True), pgd, True),
                       (torchattacks.PGD(model, eps=eps, alpha=0.01, steps=40, random_start=True), None, False),
                       (torchattacks.APGD(model, eps=eps, steps=50, loss="ce"), None, False),
                       (torchattacks.APGD(model, eps=eps, steps=50, loss="dlr"), None, False)]
            for attack, module, train_loss in attacks:
                scope = _loss_in(module, loss_fn) if train_loss else contextlib.nullcontext()
                with scope:
                    alive &= predict(model, attack(xs, ys)) == ys
        robust = torch.zeros_like(correct)
        robust[todo] = alive
    return time.perf_counter() - start, robust.float().mean().item()


def _row(model: str, comparison: str, n: int, ours: tuple, ref: tuple) -> dict:
    (t_ours, acc_ours), (t_ref, acc_ref) = ours[:2], ref[:2]
    slack = 1.96 * math.sqrt(max(acc_ref * (1 - acc_ref), 1 / n) / n)
    return {"model": model, "comparison": comparison, "points": n, "ours_s": t_ours, "reference_s": t_ref,
            "ours_images_per_s": n / t_ours, "reference_images_per_s": n / t_ref, "ours_robust": acc_ours,
            "reference_robust": acc_ref, "ratio": t_ref / t_ours,
            "stronger_or_equal": "yes" if acc_ours <= acc_ref + slack else "NO",
            "target_3x": "met" if t_ref / t_ours >= 3 else "missed"}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=1000, help="points per model (ResNet-20: 5%% on the CPU)")
    parser.add_argument("--eps", default="0.1,0.3", help="AutoAttack's L∞ radii, one row each (MNIST's standard: 0.3)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {list(MODELS)}")
    parser.add_argument("--skip", default="", help="'autoattack' or 'masking' to leave a comparison out")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    rows = []
    for name in args.models.split(","):
        if name not in MODELS:
            raise SystemExit(f"--models: unknown {name!r}; allowed values: {list(MODELS)}")
        model, loss_fn, test = train(name, str(device))
        n = max(int(args.points * (MODELS[name][4] if device.type == "cpu" else 1.0)), 10)
        x, y = (t.to(device) for t in points(test, n))
        for eps in ([] if "autoattack" in args.skip else [float(e) for e in args.eps.split(",")]):
            ours = ours_autoattack(model, x, y, eps)
            ref = reference_autoattack(model, x, y, eps)
            rows.append(_row(name, f"AutoAttack standard eps={eps:g}", n, ours, ref))
            print(f"{name} eps={eps:g}: chain members (ours, cumulative robust): {ours[2]}", flush=True)
            print(rows[-1], flush=True)
        if "masking" not in args.skip:
            rows.append(_row(name, "masking_check list, worst case eps=0.3", n,
                             ours_masking(model, loss_fn, x, y), reference_masking(model, loss_fn, x, y)))
            print(rows[-1], flush=True)
    return report("evaluation", rows, device, args.out,
                  title="Evaluation engine vs the reference code (same models, points, threat model)")


if __name__ == "__main__":
    main()

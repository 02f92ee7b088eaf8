"""Why COT (and GCE) models fall under CE attacks: logit scale, margins, CE-gradient saturation and the
first-order L∞ distance to the boundary of CE, COT and GCE LeNet-5s, beside their PGD-CE and PGD-CW accuracy.

The reproduction study's training (sweeps/specs/reproduction_mnist5k.yaml: MNIST-5k, LeNet-5, Adam 1e-3
(0.9, 0.99), batch 64, 20 epochs, GCE α = 1/3) per loss and seed; then, on the same 1,000 test images the
study's tables report, ``gce.margins.margin_profile`` and robust accuracy under PGD (40 steps of 0.01, random
start) with the CE loss and with the CW margin loss. Prints a table per loss (mean ± std over seeds), writes
the numbers to <out>/margins.json and the distributions to <out>/logit_margins.png.

    python -m benchmarks.margins [--epochs 20] [--seeds 0 1 2] [--eps 0.1] [--out docs/margins]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from benchmarks.common import environment
from gce.attacks import AttackConfig, build_attack
from gce.config import TrainConfig
from gce.data import load_dataset
from gce.evaluate import predict
from gce.margins import margin_profile, summarize_margins
from gce.train import fit, resolve_device

LOSSES = {"ce": "CE", "cot": "COT", "gce": "GCE α=1/3"}
COLORS = {"ce": "tab:blue", "cot": "tab:red", "gce": "tab:green"}
OUT = Path("docs/margins")

#: Table column -> key of a seed's result row (``_measure``).
COLUMNS = {
    "clean": "clean_acc",
    "PGD-CE": "acc/pgd_ce",
    "PGD-CW": "acc/pgd_cw",
    "‖z‖₂": "median/logit_norm",
    "margin m": "median/margin",
    "zero ∇CE": "frac/ce_grad_zero",
    "p_y=1": "frac/p_true_one",
    "‖∇CE‖₁": "median/ce_grad_l1",
    "‖∇m‖₁": "median/margin_grad_l1",
    "d": "median/distance",
    "d<ε": "frac/distance<eps",
    "CE-step eff.": "median/ce_step_efficiency",
}


def train(loss: str, seed: int, epochs: int, device: torch.device) -> torch.nn.Module:
    """One model with the study's settings (the spec's ``base``; GCE at its default α = 1/3)."""
    config = TrainConfig.from_dict({
        "data": {"dataset": "mnist5k"}, "model": {"name": "lenet5"}, "loss": {"name": loss},
        "optim": {"name": "adam", "lr": 1e-3, "betas": [0.9, 0.99]}, "epochs": epochs, "batch_size": 64,
        "seed": seed, "device": str(device)})
    return fit(config, data=load_dataset("mnist5k", seed=seed)).model.eval()


def robust_flags(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str, eps: float,
                 seed: int) -> torch.Tensor:
    """Per example: still correct after PGD-40 (step 0.01, random start) with attack loss ``loss``."""
    attack = build_attack(AttackConfig(name="pgd", eps=eps, steps=40, step_size=0.01, loss=loss))
    torch.manual_seed(seed)  # the random start
    flags = [predict(model, attack(model, x[i:i + 500], y[i:i + 500])).eq(y[i:i + 500])
             for i in range(0, len(y), 500)]
    return torch.cat(flags).cpu()


def _auc(score: torch.Tensor, positive: torch.Tensor) -> float:
    """P(score of a positive > score of a negative), ties count half: how well ``score`` ranks ``positive``."""
    pos, neg = score[positive].double(), score[~positive].double()
    if len(pos) == 0 or len(neg) == 0:
        return math.nan
    greater = (pos[:, None] > neg[None, :]).double().mean() + 0.5 * (pos[:, None] == neg[None, :]).double().mean()
    return greater.item()


def _measure(model, x, y, eps: float, seed: int) -> tuple[dict[str, float], dict[str, list[float]]]:
    profile = margin_profile(model, x, y)
    row = summarize_margins(profile, eps=(eps, 0.2, 0.3))
    row["frac/distance<eps"] = row[f"frac/distance<{eps:g}"]
    ce, cw = robust_flags(model, x, y, "ce", eps, seed), robust_flags(model, x, y, "cw", eps, seed)
    row["acc/pgd_ce"], row["acc/pgd_cw"] = ce.float().mean().item(), cw.float().mean().item()
    correct = profile["correct"]
    # Does the first-order distance say *which* points survive? AUC of d for "survives PGD-CW", clean-correct only.
    row["auc/distance_vs_pgd_cw"] = _auc(profile["distance"][correct], cw[correct])
    row["auc/distance_any_vs_pgd_cw"] = _auc(profile["distance_any"][correct], cw[correct])
    # Of the points that fall to the margin attack, how many did PGD-CE miss (its stall or its wrong direction)?
    row["frac/cw_fooled_ce_missed"] = (correct & ~cw & ce).float().sum().item() / max(int((correct & ~cw).sum()), 1)
    keep = ("margin", "margin_grad_l1", "distance", "ce_grad_l1", "logit_norm", "ce_step_efficiency")
    dists = {k: profile[k][correct].tolist() for k in keep}
    return row, dists


def _fmt(values: list[float], key: str) -> str:
    t = torch.tensor(values, dtype=torch.float64)
    mean, std = t.mean().item(), (t.std().item() if len(t) > 1 else 0.0)
    if key.startswith(("clean", "acc/", "frac/")):
        return f"{100 * mean:.1f} ± {100 * std:.1f}"
    return f"{mean:.3g} ± {std:.2g}"


def table(results: dict[str, list[dict[str, float]]]) -> str:
    """Markdown table: one row per loss, mean ± std over seeds; accuracies and fractions in %."""
    head = "| loss | " + " | ".join(COLUMNS) + " |"
    lines = [head, "|:---|" + "---:|" * len(COLUMNS)]
    for loss, rows in results.items():
        cells = [_fmt([r[key] for r in rows], key) for key in COLUMNS.values()]
        lines.append(f"| {LOSSES[loss]} (n={len(rows)}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(dists: dict[str, list[dict[str, list[float]]]], eps: float, path: Path) -> None:
    """Empirical CDFs over clean-correct test points, one thin line per seed, a colour per loss."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    panels = [("margin", "logit margin m = z_y − max_{j≠y} z_j", True),
              ("margin_grad_l1", "‖∇ₓ m‖₁ (how fast x moves m)", True),
              ("distance", "first-order L∞ distance d = m / ‖∇ₓ m‖₁", True),
              ("logit_norm", "logit scale ‖z‖₂", True),
              ("ce_grad_l1", "‖∇ₓ CE‖₁ (exact 0 → left edge)", True),
              ("ce_step_efficiency", "CE sign step's efficiency on m (1 = best)", False)]
    fig = Figure(figsize=(13, 7.5), layout="constrained")
    axes = fig.subplots(2, 3).ravel()
    for ax, (key, title, log) in zip(axes, panels, strict=True):
        floor = min(min((v for v in d[key] if v > 0), default=1.0) for ds in dists.values() for d in ds)
        for loss, per_seed in dists.items():
            for i, d in enumerate(per_seed):
                v = torch.tensor(d[key], dtype=torch.float64)
                v = (v.clamp_min(floor / 10) if log else v).sort().values
                cdf = torch.arange(1, len(v) + 1, dtype=torch.float64) / len(v)
                ax.plot(v.numpy(), cdf.numpy(), color=COLORS[loss], lw=1.2, alpha=0.8,
                        label=LOSSES[loss] if i == 0 else None)
        if log:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks overlap on short log ranges
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both", lw=0.5)
        if key == "distance":
            ax.axvline(eps, color="k", ls="--", lw=1)
            ax.text(eps, 0.02, f" ε = {eps:g}", fontsize=9)
    for ax in axes[::3]:
        ax.set_ylabel("fraction of clean-correct points")
    axes[0].legend(fontsize=9, loc="upper left")
    fig.suptitle("LeNet-5 on MNIST-5k, 1,000 test images: CDFs over clean-correct points (a line per seed)",
                 fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=list(LOSSES))
    parser.add_argument("--eps", type=float, default=0.1, help="the attacks' L∞ budget")
    parser.add_argument("--examples", type=int, default=1000, help="test images measured (the split has 1,000)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    test = load_dataset("mnist5k", seed=0).test  # the test split does not depend on the seed
    x = (test.images[:args.examples].float() / 255).to(device)
    y = test.labels[:args.examples].to(device)

    results: dict[str, list[dict[str, float]]] = {}
    dists: dict[str, list[dict[str, list[float]]]] = {}
    for loss in args.losses:
        for seed in args.seeds:
            start = time.perf_counter()
            model = train(loss, seed, args.epochs, device)
            trained = time.perf_counter()
            row, d = _measure(model, x, y, args.eps, seed)
            row |= {"seed": seed, "train_s": trained - start, "measure_s": time.perf_counter() - trained}
            results.setdefault(loss, []).append(row)
            dists.setdefault(loss, []).append(d)
            print(f"{LOSSES[loss]} seed {seed}: clean {row['clean_acc']:.3f}  PGD-CE {row['acc/pgd_ce']:.3f}  "
                  f"PGD-CW {row['acc/pgd_cw']:.3f}  median d {row['median/distance']:.3g}  "
                  f"({row['train_s']:.0f} s train, {row['measure_s']:.0f} s measure)", flush=True)

    text = table(results)
    print(f"\nε = {args.eps:g}, {len(y)} test images, {args.epochs} epochs; medians over clean-correct points\n")
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    figure(dists, args.eps, args.out / "logit_margins.png")
    payload = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "environment": environment(device), "table": text, "results": results}
    (args.out / "margins.json").write_text(json.dumps(payload, indent=2))
    print(f"written: {args.out / 'margins.json'}, {args.out / 'logit_margins.png'}")
    return payload


if __name__ == "__main__":
    main()

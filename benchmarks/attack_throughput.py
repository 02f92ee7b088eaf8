"""PGD-40 images/s for LeNet-5 (MNIST-shaped) and ResNet-20 (CIFAR-shaped), against torchattacks' PGD.

Both attacks run in the same process on the same model, batch and budget (L∞, 40 steps, random start), so
the ratio says what our shared iterative loop costs relative to a widely used implementation.

    python -m benchmarks.attack_throughput [--device auto] [--out DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.common import report, timed
from gce.attacks import AttackConfig, build_attack
from gce.models import build_model
from gce.train import resolve_device

CASES = [  # model, input shape, eps, step size, images (sized for ~seconds on 2 CPU cores)
    ("lenet5", (1, 28, 28), 0.3, 0.01, 1000),
    ("resnet20", (3, 32, 32), 8 / 255, 2 / 255, 128),
]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the number of images (GPU: 20)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    try:
        import torchattacks
    except ImportError:  # test-only dependency: the table then has no baseline column
        torchattacks = None

    rows = []
    for name, shape, eps, step, n in CASES:
        n = int(n * args.scale)
        torch.manual_seed(0)
        model = build_model(name, input_shape=shape, num_classes=10).to(device).eval()
        x = torch.rand(n, *shape, device=device)
        y = torch.randint(0, 10, (n,), device=device)
        ours = build_attack(AttackConfig("pgd", eps=eps, steps=args.steps, step_size=step))
        fast = timed(lambda ours=ours, model=model, x=x, y=y: len(ours(model, x, y)), device, repeats=2)
        row = {"model": name, "images": n, "attack": f"PGD-{args.steps} Linf eps={eps:.4g}",
               "images_per_s": fast}
        if torchattacks is not None:
            ref = torchattacks.PGD(model, eps=eps, alpha=step, steps=args.steps, random_start=True)
            base = timed(lambda ref=ref, x=x, y=y: len(ref(x, y)), device, repeats=2)
            row.update(torchattacks_images_per_s=base, ratio=fast / base)
        rows.append(row)
    return report("attack_throughput", rows, device, args.out,
                  title=f"PGD-{args.steps} throughput, device {device}")


if __name__ == "__main__":
    main()

import subprocess
import sys

SUBMODULES = ["gce", "gce.losses", "gce.models", "gce.data", "gce.config", "gce.train", "gce.attacks",
              "gce.evaluate", "gce.latent", "gce.checks"]


def test_importing_gce_pulls_in_neither_ray_nor_mlflow():
    code = (
        "import importlib, sys\n"
        f"for m in {SUBMODULES!r}: importlib.import_module(m)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'ray', 'mlflow', 'optuna', 'pydantic'})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"gce imported: {out.stdout.strip()}"


def test_cli_help_is_fast_and_does_not_import_torch():
    code = "import sys; import sweeps.cli; print('torch' in sys.modules, 'ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]

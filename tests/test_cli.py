import torch
from typer.testing import CliRunner

from sweeps.cli import app

runner = CliRunner()


def test_train_command_runs_and_writes_a_checkpoint(tmp_path):
    ckpt = tmp_path / "model.pt"
    result = runner.invoke(app, ["train", "--dataset", "digits", "--epochs", "1", "--device", "cpu",
                                 "--checkpoint", str(ckpt)])
    assert result.exit_code == 0, result.output
    assert "test/clean_acc" in result.output
    assert torch.load(ckpt, weights_only=True)["config"]["data"]["dataset"] == "digits"


def test_bad_option_names_the_field_and_the_allowed_values():
    result = runner.invoke(app, ["train", "--loss", "focal"])
    assert result.exit_code == 2
    assert "loss.name" in result.output and "gce" in result.output
    result = runner.invoke(app, ["train", "--loss", "ce", "--alpha", "0.5"])
    assert result.exit_code == 2 and "loss.alpha" in result.output

"""Plugins: each kind registered and used by the code that looks it up, wrong plugins refused by name, entry points,
specs that name a plugin, and a real sweep whose Ray workers import a plugin from a file outside the repo."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gce.plugins as plugins
from gce.attacks import ATTACKS, Attack, AttackConfig, build_attack
from gce.attacks.base import project
from gce.config import ConfigError, DataConfig, LossConfig, TrainConfig
from gce.data import DATASETS, DatasetInfo, DatasetSpec, Split, load_dataset
from gce.losses import LOSSES, cross_entropy, get_loss, loss_options, reduce_per_sample
from gce.models import MODELS, Classifier, build_model
from gce.plugins import (
    PluginError,
    load_entry_points,
    load_plugins,
    register_attack,
    register_dataset,
    register_loss,
    register_model,
)
from sweeps.loading import load_spec
from sweeps.spec import SpecError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def registries(monkeypatch):
    """Every test starts from the built-in registries and leaves them so; plugin modules are forgotten."""
    saved = [(r, dict(r)) for r in (LOSSES, MODELS, DATASETS, ATTACKS)]
    modules = set(sys.modules)
    monkeypatch.setattr(plugins, "_entry_points_loaded", True)  # the session's installed entry points: none here
    yield
    for registry, content in saved:
        registry.clear()
        registry.update(content)
    for name in set(sys.modules) - modules:
        if name.startswith(("plug_", "my_losses", "fake_gce")):
            del sys.modules[name]


# --- plugins of each kind ------------------------------------------------------------------------------------
def focal(logits, target, gamma=2.0, reduction="mean"):
    """Focal loss (Lin et al. 2017, arXiv 1708.02002): cross-entropy down-weighted where the target is likely."""
    logp = F.log_softmax(logits.float(), dim=1).gather(1, target[:, None]).squeeze(1)
    return reduce_per_sample(-((1 - logp.exp()) ** gamma) * logp, reduction)


class TinyNet(Classifier):
    def __init__(self, *, width: int = 4, **common):
        super().__init__(**common)
        c, h, w = self.input_shape
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, width), nn.ReLU())
        self.head = nn.Linear(width, self.num_classes)

    def embed(self, x):
        return self.body(x)


def tiny_factory(*, width: int = 4, **common):
    return TinyNet(width=width, **common)


def tiny_blobs(root, download):
    """Two classes of 4x4 images, dark and bright, in memory."""
    labels = torch.arange(40) % 2
    noise = torch.randint(0, 50, (40, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    images = (labels.view(-1, 1, 1, 1) * 200 + noise).to(torch.uint8)
    return Split(images[:32], labels[:32], "memory"), Split(images[32:], labels[32:], "memory")


BLOBS = DatasetInfo("tiny_blobs", 2, (1, 4, 4), (0.5,), (0.3,), "none")


class Noise(Attack):
    """A random sign step of size ε (a stand-in attack)."""

    name = "noise"
    norms = ("linf",)
    default_loss = None

    def __init__(self, eps: float, *, targeted: bool = False, restarts: int = 1):
        super().__init__(eps, targeted=targeted, restarts=restarts)

    def perturb(self, model, x, y):
        return project(x + self.eps * torch.randn_like(x).sign(), x, self.eps, self.norm)


def test_a_plugin_loss_is_looked_up_by_get_loss_and_validated_by_the_config():
    register_loss("focal", focal)
    logits, target = torch.randn(8, 5, generator=torch.Generator().manual_seed(0)), torch.arange(8) % 5
    assert loss_options("focal") == {"gamma": 2.0}
    assert torch.allclose(get_loss("focal", kwargs={"gamma": 0.0})(logits, target), cross_entropy(logits, target))
    assert get_loss("focal")(logits, target) < cross_entropy(logits, target)  # easy examples count less
    assert get_loss("focal")(logits, target, reduction="none").shape == (8,)
    config = TrainConfig.from_dict({"loss": {"name": "focal", "kwargs": {"gamma": 1.0}}})
    assert config.to_flat()["loss.kwargs.gamma"] == 1.0
    with pytest.raises(ConfigError, match=r"loss.kwargs.beta.*its options: \['gamma'\]"):
        LossConfig(name="focal", kwargs={"beta": 1.0})
    with pytest.raises(ConfigError, match="loss.alpha"):
        LossConfig(name="focal", alpha=0.5)


def test_a_plugin_loss_drives_an_attack_with_the_training_loss():
    register_loss("focal", focal)
    model = TinyNet(input_shape=(1, 4, 4), num_classes=3)
    x, y = torch.rand(6, 1, 4, 4), torch.arange(6) % 3
    attack = build_attack(AttackConfig(name="pgd", eps=0.1, steps=2, loss="train"), train_loss=get_loss("focal"))
    x_adv = attack(model, x, y)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and not torch.equal(x_adv, x)


@pytest.mark.parametrize("factory", [TinyNet, tiny_factory])
def test_a_plugin_model_is_built_by_build_model(factory):
    register_model("tiny", factory)
    model = build_model("tiny", input_shape=(1, 4, 4), num_classes=3, mean=(0.5,), std=(0.3,), width=5)
    x = torch.rand(2, 1, 4, 4)
    assert isinstance(model, TinyNet) and model(x).shape == (2, 3) and model.features(x).shape == (2, 5)
    with pytest.raises(ValueError, match=r"model 'tiny' takes options \['width'\]"):
        build_model("tiny", input_shape=(1, 4, 4), num_classes=3, depth=2)


@pytest.mark.parametrize("how", ["loader", "spec"])
def test_a_plugin_dataset_is_loaded_by_load_dataset(how):
    if how == "loader":
        register_dataset("tiny_blobs", tiny_blobs, info=BLOBS)
    else:
        register_dataset("tiny_blobs", DatasetSpec(BLOBS, tiny_blobs))
    bundle = load_dataset("tiny_blobs", val_size=4, seed=1)
    assert bundle.info == BLOBS
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (28, 4, 8)
    assert sorted(bundle.val.labels.tolist()) == [0, 0, 1, 1]  # stratified like a built-in's
    assert DataConfig(dataset="tiny_blobs").dataset == "tiny_blobs"


def test_a_plugin_attack_is_built_from_its_config():
    register_attack("noise", Noise)
    cfg = AttackConfig(name="noise", eps=0.05)
    assert cfg.label() == "noise"
    model = TinyNet(input_shape=(1, 4, 4), num_classes=3)
    x, y = torch.rand(4, 1, 4, 4), torch.arange(4) % 3
    x_adv = build_attack(cfg)(model, x, y)
    assert 0 < (x_adv - x).abs().max() <= 0.05 + 1e-6
    with pytest.raises(ValueError, match="step_size does not apply to attack 'noise'"):
        AttackConfig(name="noise", eps=0.05, step_size=0.01)


# --- wrong plugins: refused, naming the plugin and what is expected -------------------------------------------
def no_reduction(logits, target):
    return cross_entropy(logits, target)


def required_option(logits, target, gamma, reduction="mean"):
    return cross_entropy(logits, target, reduction)


def var_keywords(logits, target, reduction="mean", **options):
    return cross_entropy(logits, target, reduction)


def one_input(logits, reduction="mean"):
    return logits.sum()


def reserved_alpha(logits, target, alpha=0.5, reduction="mean"):
    return cross_entropy(logits, target, reduction)


class NotAModule:
    pass


class NoFeatures(nn.Module):
    def __init__(self, **common):
        super().__init__()


def no_num_classes(*, input_shape, mean=None, std=None):
    return None


def required_depth(*, depth, **common):
    return None


def one_argument_loader(root):
    return None


class NoPerturb(Attack):
    pass


class NeedsBudget(Noise):
    def __init__(self, eps, *, budget):
        super().__init__(eps)


BAD_INFO = DatasetInfo("bad", 2, (1, 4, 4), (0.5,), (0.3,), "none")

BAD = [
    (register_loss, no_reduction, "`reduction` keyword"),
    (register_loss, required_option, r"options \['gamma'\] need defaults"),
    (register_loss, var_keywords, "must be named parameters"),
    (register_loss, one_input, r"\(logits, target\) as its first two positional"),
    (register_loss, reserved_alpha, r"\['alpha'\] are reserved"),
    (register_loss, 3, "must be a function loss"),
    (register_loss, TinyNet, "got the class TinyNet"),
    (register_model, NotAModule, "must subclass torch.nn.Module"),
    (register_model, NoFeatures, "must have features"),
    (register_model, no_num_classes, r"does not accept \['num_classes'\]"),
    (register_model, required_depth, r"options \['depth'\] need defaults"),
    (register_dataset, tiny_blobs, "a loader needs info=DatasetInfo"),
    (register_dataset, DatasetSpec(BLOBS, tiny_blobs), "info.name is 'tiny_blobs', not 'bad'"),
    (register_dataset, DatasetSpec(replace(BAD_INFO, augment="jitter"), tiny_blobs), "info.augment must be one of"),
    (register_dataset, DatasetSpec(replace(BAD_INFO, input_shape=(3, 4, 4)), tiny_blobs), "one value per channel"),
    (register_dataset, DatasetSpec(BAD_INFO, one_argument_loader), r"loader\(root: Path, download: bool\)"),
    (register_attack, focal, "subclasses gce.attacks.Attack"),
    (register_attack, NoPerturb, "must implement perturb"),
    (register_attack, NeedsBudget, r"parameters \['budget'\] have no default and are no AttackConfig field"),
]


@pytest.mark.parametrize(("register", "obj", "expected"), BAD, ids=[f"{r.__name__}-{i}" for i, (r, _, _) in
                                                                     enumerate(BAD)])
def test_a_wrong_plugin_is_refused_naming_it(register, obj, expected):
    before = [dict(r) for r in (LOSSES, MODELS, DATASETS, ATTACKS)]
    with pytest.raises(PluginError, match=expected) as err:
        register("bad", obj)
    assert str(err.value).split(" ", 2)[1] == "'bad':"  # "<kind> 'bad': …": the plugin is named first
    assert [dict(r) for r in (LOSSES, MODELS, DATASETS, ATTACKS)] == before  # nothing half-registered


def test_names_of_built_ins_and_other_plugins_are_refused_the_same_plugin_again_is_not():
    with pytest.raises(PluginError, match=r"loss 'ce': the name of a built-in loss"):
        register_loss("ce", focal)
    with pytest.raises(PluginError, match=r"attack 'pgd': the name of a built-in attack"):
        register_attack("pgd", Noise)
    with pytest.raises(PluginError, match="lowercase letters"):
        register_loss("Focal-Loss", focal)
    register_loss("focal", focal)
    register_loss("focal", focal)  # a worker importing the module twice
    assert LOSSES["focal"] is focal
    with pytest.raises(PluginError, match=r"loss 'focal': already registered to .*test_plugins.focal"):
        register_loss("focal", var_keywords)
    register_dataset("tiny_blobs", tiny_blobs, info=BLOBS)
    register_dataset("tiny_blobs", tiny_blobs, info=BLOBS)  # an equal spec built again
    assert DATASETS["tiny_blobs"] == DatasetSpec(BLOBS, tiny_blobs)


# --- load_plugins: modules and module:object entries ---------------------------------------------------------
PLUGIN_MODULE = """
import torch
import torch.nn.functional as F
from torch import nn

from gce.attacks import Attack
from gce.attacks.base import project
from gce.data import DatasetInfo, DatasetSpec, Split
from gce.losses import reduce_per_sample
from gce.models import Classifier
from gce.plugins import register_loss


def focal(logits, target, gamma=2.0, reduction="mean"):
    logp = F.log_softmax(logits.float(), dim=1).gather(1, target[:, None]).squeeze(1)
    return reduce_per_sample(-((1 - logp.exp()) ** gamma) * logp, reduction)


class TinyNet(Classifier):
    def __init__(self, *, width=4, **common):
        super().__init__(**common)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(16, width), nn.ReLU())
        self.head = nn.Linear(width, self.num_classes)

    def embed(self, x):
        return self.body(x)


def tiny_factory(*, width=4, **common):
    return TinyNet(width=width, **common)


class Noise(Attack):
    name = "noise"
    norms = ("linf",)
    default_loss = None

    def __init__(self, eps, *, targeted=False, restarts=1):
        super().__init__(eps, targeted=targeted, restarts=restarts)

    def perturb(self, model, x, y):
        return project(x + self.eps * torch.randn_like(x).sign(), x, self.eps, self.norm)


def tiny_blobs(root, download):
    labels = torch.arange(40) % 2
    images = (labels.view(-1, 1, 1, 1) * 200).to(torch.uint8).expand(40, 1, 4, 4).contiguous()
    return Split(images[:32], labels[:32]), Split(images[32:], labels[32:])


BLOB_SPEC = DatasetSpec(DatasetInfo("tiny_blobs", 2, (1, 4, 4), (0.5,), (0.3,), "none"), tiny_blobs)
{registration}
"""


def write_plugin(folder: Path, module: str, registration: str = "") -> Path:
    path = folder / f"{module}.py"
    path.write_text(PLUGIN_MODULE.format(registration=textwrap.dedent(registration)))
    return path


def test_load_plugins_imports_modules_and_registers_objects_by_their_type(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    write_plugin(tmp_path, "plug_self", 'register_loss("self_focal", focal)')
    write_plugin(tmp_path, "plug_objects")
    modules = load_plugins(["plug_self", "plug_objects:focal", "noise = plug_objects:Noise",
                            "tiny = plug_objects:TinyNet", "tiny_blobs = plug_objects:BLOB_SPEC",
                            "focal_too = plug_objects:focal"])
    objects = sys.modules["plug_objects"]
    assert [m.__name__ for m in modules] == ["plug_self", *["plug_objects"] * 5]
    assert LOSSES["self_focal"].__module__ == "plug_self"  # the module registered itself on import
    assert LOSSES["focal"] is LOSSES["focal_too"] is objects.focal  # a function is a loss
    assert ATTACKS["noise"] is objects.Noise and MODELS["tiny"] is objects.TinyNet  # by their base classes
    assert DATASETS["tiny_blobs"] is objects.BLOB_SPEC  # a DatasetSpec is a dataset
    assert build_model("tiny", input_shape=(1, 4, 4), num_classes=2).features(torch.rand(1, 1, 4, 4)).shape == (1, 4)
    load_plugins(["plug_self", "plug_objects:focal", "noise = plug_objects:Noise"])  # again: a no-op


def test_load_plugins_names_every_failing_entry_by_its_index(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    write_plugin(tmp_path, "plug_ok")
    (tmp_path / "plug_broken.py").write_text("raise RuntimeError('no GPU here')\n")
    entries = ["no_such_plugin_mod", "plug_ok:missing", "plug_ok:Noise", "plug_ok:tiny_factory", "plug_broken",
               "plug_ok:focal", "a b c"]
    with pytest.raises(PluginError) as err:
        load_plugins(entries)
    problems = err.value.problems
    assert problems[0] == "plugins[0]: cannot import 'no_such_plugin_mod': No module named 'no_such_plugin_mod'"
    assert problems[1] == "plugins[1]: module 'plug_ok' has no attribute 'missing'"
    assert problems[2].startswith("plugins[2]: 'plug_ok:Noise': attack 'Noise': a name is lowercase letters")
    assert problems[3].startswith("plugins[3]: 'plug_ok:tiny_factory': loss 'tiny_factory':")
    assert "register_model" in problems[3]  # a function is taken as a loss, and the message says how else
    assert problems[4] == "plugins[4]: importing 'plug_broken' failed: RuntimeError: no GPU here"
    assert problems[5].startswith("plugins[6]: 'a b c' is not 'module'")
    assert len(problems) == 6 and "focal" in LOSSES  # the good entry still registered


# --- entry points of installed packages ----------------------------------------------------------------------
def fake_distribution(folder: Path, entry_points: str) -> None:
    """An installed distribution as importlib.metadata sees one: a dist-info folder on sys.path."""
    info = folder / "fake_gce_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-gce-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    write_plugin(folder, "fake_gce_plugin_mod")


def test_entry_points_register_each_group_once(tmp_path, monkeypatch):
    fake_distribution(tmp_path, """
        [gce_sweeps.losses]
        ep_focal = fake_gce_plugin_mod:focal
        [gce_sweeps.models]
        ep_tiny = fake_gce_plugin_mod:tiny_factory
        [gce_sweeps.datasets]
        tiny_blobs = fake_gce_plugin_mod:BLOB_SPEC
        [gce_sweeps.attacks]
        ep_noise = fake_gce_plugin_mod:Noise
        """)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(plugins, "_entry_points_loaded", False)
    load_entry_points()
    mod = sys.modules["fake_gce_plugin_mod"]
    assert LOSSES["ep_focal"] is mod.focal and ATTACKS["ep_noise"] is mod.Noise
    assert MODELS["ep_tiny"] is mod.tiny_factory  # a function is fine here: the group says it is a model
    assert DATASETS["tiny_blobs"].info == BLOBS
    del LOSSES["ep_focal"]
    load_entry_points()  # once per process: not scanned again
    assert "ep_focal" not in LOSSES


def test_a_broken_entry_point_is_named_with_its_distribution(tmp_path, monkeypatch):
    fake_distribution(tmp_path, """
        [gce_sweeps.losses]
        ep_gone = fake_gce_plugin_mod:nothing_here
        ep_model = fake_gce_plugin_mod:TinyNet
        """)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(plugins, "_entry_points_loaded", False)
    with pytest.raises(PluginError) as err:
        load_entry_points()
    gone, model = err.value.problems
    assert gone.startswith("entry point 'ep_gone' = 'fake_gce_plugin_mod:nothing_here' (group gce_sweeps.losses, "
                           "distribution fake-gce-plugin 0.1): cannot load: AttributeError")
    assert "entry point 'ep_model'" in model and "loss 'ep_model': must be a function" in model
    assert not plugins._entry_points_loaded  # tried again next time, and refused again


# --- specs --------------------------------------------------------------------------------------------------
def spec_with(plugins_: list, **base) -> dict:
    return {"name": "plug", "experiment": "plug", "plugins": plugins_,
            "base": {"data": {"dataset": "mnist5k", "limit": 64}, "model": {"name": "mlp"}, **base},
            "space": {"loss.name": ["ce", "plugin_focal"],
                      "loss.kwargs.gamma": {"grid": [1.0, 2.0], "when": {"loss.name": "plugin_focal"}}}}


def test_a_spec_naming_a_plugin_loss_validates_like_a_built_in(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    write_plugin(tmp_path, "plug_spec", 'register_loss("plugin_focal", focal)')
    spec = load_spec(spec_with(["plug_spec"]))
    assert spec.plugins == ["plug_spec"] and spec.trial_count() == 3
    configs = [spec.trial_config(p, 0) for p in spec.grid_points()]
    assert [(c.loss.name, c.loss.kwargs) for c in configs] == [
        ("ce", {}), ("plugin_focal", {"gamma": 1.0}), ("plugin_focal", {"gamma": 2.0})]
    bad = spec_with(["plug_spec"])
    bad["space"]["loss.kwargs.beta"] = {"grid": [1.0], "when": {"loss.name": "plugin_focal"}}
    with pytest.raises(SpecError, match=r"loss.kwargs.beta.*an option of loss 'plugin_focal' \(its options: "
                                        r"\['gamma'\]\)"):
        load_spec(bad)


def test_a_spec_with_an_unimportable_plugin_names_the_field(tmp_path):
    with pytest.raises(SpecError) as err:
        load_spec(spec_with(["gce.losses", "no_such_plugin_mod"]))
    lines = str(err.value).splitlines()
    assert lines[0] == "<mapping>: invalid spec"
    assert "  - plugins[1]: cannot import 'no_such_plugin_mod': No module named 'no_such_plugin_mod'" in lines
    assert not any("loss.name" in line for line in lines)  # not followed by what the missing plugin would define


def test_a_plugin_beside_the_spec_file_is_found(tmp_path, monkeypatch):
    import yaml

    monkeypatch.setattr(sys, "path", list(sys.path))  # load_spec appends the spec's folder: undone afterwards
    write_plugin(tmp_path, "plug_beside", 'register_loss("plugin_focal", focal)')
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec_with(["plug_beside"])))
    assert load_spec(tmp_path / "spec.yaml").plugins == ["plug_beside"]


def test_the_plugin_code_is_staged_beside_the_sweep_and_installed_packages_are_not(tmp_path, monkeypatch):
    from sweeps.record import SweepRecord
    from sweeps.runtime import PLUGINS_DIR, stage_plugins

    code = tmp_path / "code"
    code.mkdir()
    monkeypatch.syspath_prepend(str(code))
    write_plugin(code, "plug_staged", 'register_loss("plugin_focal", focal)')
    package = code / "plug_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "losses.py").write_text(MY_LOSSES)  # registers "focal" on import, then again as the object
    spec = {"name": "s", "experiment": "s", "plugins": ["plug_staged", "plug_pkg.losses:focal", "gce.losses"]}
    record = SweepRecord("sw", "", "http://x", "s", str(tmp_path / "results"), spec)
    staged = stage_plugins(record)
    folder = record.folder / PLUGINS_DIR
    assert staged == [folder / "plug_staged.py", folder / "plug_pkg"]  # gce is installed: not shipped
    assert (folder / "plug_pkg" / "losses.py").read_text() == (package / "losses.py").read_text()


def test_a_resumed_driver_falls_back_to_the_staged_code(tmp_path, monkeypatch):
    from sweeps.record import SweepRecord
    from sweeps.runtime import PLUGINS_DIR, stage_plugins

    monkeypatch.setattr(sys, "path", list(sys.path))  # stage_plugins appends the staged folder: undone afterwards
    spec = {"name": "s", "experiment": "s", "plugins": ["my_losses_staged"]}
    record = SweepRecord("sw", "", "http://x", "s", str(tmp_path), spec)
    with pytest.raises(SpecError, match=r"plugins\[0\]: cannot import 'my_losses_staged'"):
        stage_plugins(record)  # nowhere to be found: a one-line error for the CLI
    (record.folder / PLUGINS_DIR).mkdir(parents=True)
    staged = record.folder / PLUGINS_DIR / "my_losses_staged.py"
    staged.write_text(MY_LOSSES)  # what the launch copied; the user's file is not on this driver's path
    assert stage_plugins(record) == [staged] and staged.read_text() == MY_LOSSES
    assert sys.modules["my_losses_staged"].__file__ == str(staged) and "focal" in LOSSES


# --- Ray workers ---------------------------------------------------------------------------------------------
RAY_SCRIPT = """
import sys
sys.path.insert(0, {code!r})
import ray
from sweeps.record import SweepRecord
from sweeps.runtime import init_ray

record = SweepRecord("sw", "", "http://x", "s", {results!r}, {{"name": "s", "experiment": "s",
                     "plugins": ["my_losses"]}})
init_ray(record, {{"GCE_PLUGIN_TEST": "1"}})

@ray.remote(runtime_env={{"env_vars": {{"PL_DISABLE_FORK": "1"}}}})  # as Tune creates its trial actors
class Probe:
    def check(self):
        import os
        import my_losses
        from gce.losses import LOSSES
        return my_losses.__file__, "focal" in LOSSES, os.environ.get("GCE_PLUGIN_TEST"), {code!r} in sys.path

print("RESULT", ray.get(Probe.remote().check.remote()))
ray.shutdown()
"""


@pytest.mark.slow
def test_a_ray_started_by_the_sweep_ships_the_plugin_to_its_actors(tmp_path):
    """py_modules: the worker imports a module that is neither installed, nor on its path, nor in its directory."""
    code, elsewhere = tmp_path / "code", tmp_path / "elsewhere"
    code.mkdir()
    elsewhere.mkdir()
    (code / "my_losses.py").write_text(MY_LOSSES)
    script = RAY_SCRIPT.format(code=str(code), results=str(tmp_path / "results"))
    env = {"RAY_AUTH_MODE": "disabled", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=300)
    result = [line for line in done.stdout.splitlines() if line.startswith("RESULT")]
    assert result, done.stdout[-2000:] + done.stderr[-4000:]
    file, registered, env_var, on_path = eval(result[0].removeprefix("RESULT "))
    assert registered and env_var == "1" and not on_path
    assert not file.startswith(str(code)) and "my_losses.py" in file  # Ray's copy, not the driver's file


MY_LOSSES = '''
"""A user's loss in a file outside the repo, registered on import."""
import torch.nn.functional as F

from gce.losses import reduce_per_sample
from gce.plugins import register_loss


def focal(logits, target, gamma=2.0, reduction="mean"):
    """Focal loss (Lin et al. 2017, arXiv 1708.02002)."""
    logp = F.log_softmax(logits.float(), dim=1).gather(1, target[:, None]).squeeze(1)
    return reduce_per_sample(-((1 - logp.exp()) ** gamma) * logp, reduction)


register_loss("focal", focal)
'''


@pytest.mark.slow
def test_a_sweep_over_ce_and_a_plugin_loss_runs_on_ray_and_logs_to_mlflow(ray_local, mlflow_server, tmp_path,
                                                                          monkeypatch):
    from mlflow import MlflowClient

    from sweeps.launcher import run_sweep
    from tracking.logger import ROLE_TAG, SWEEP_TAG

    code = tmp_path / "code"
    code.mkdir()
    (code / "my_losses.py").write_text(MY_LOSSES)
    monkeypatch.syspath_prepend(str(code))  # the driver's path only: Ray's workers were started before
    spec = load_spec({
        "name": "plugin", "experiment": "test-plugin", "plugins": ["my_losses"],
        "base": {"data": {"dataset": "mnist5k", "limit": 256}, "model": {"name": "mlp", "kwargs": {"hidden": 16}},
                 "epochs": 1, "batch_size": 64, "max_batches": 2},
        "space": {"loss.name": ["ce", "focal"], "loss.kwargs.gamma": {"grid": [1.5], "when": {"loss.name": "focal"}}},
        "evaluation": {"max_examples": 32, "plots": False, "checks": False,
                       "attacks": [{"name": "pgd", "eps": [0.1], "steps": 2, "loss": "train"}]},
        "resources": {"cpu": 1}, "system_metrics": {"enabled": False}})
    result = run_sweep(spec, tracking_uri=mlflow_server.url, storage=tmp_path / "results")
    assert result.trials == 2 and result.errors == 0
    client = MlflowClient(mlflow_server.url)
    exp = client.get_experiment_by_name(result.experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.`{SWEEP_TAG}` = '{result.sweep_id}'")
    trials = {r.data.params["loss.name"]: r for r in runs if r.data.tags.get(ROLE_TAG) == "trial"}
    assert set(trials) == {"ce", "focal"}
    assert trials["focal"].data.params["loss.kwargs.gamma"] == "1.5"
    assert "loss.kwargs.gamma" not in trials["ce"].data.params
    for run in trials.values():
        assert run.info.status == "FINISHED"
        m = run.data.metrics
        assert m["train/loss"] > 0 and 0 <= m["val/robust_acc/worst_case"] <= m["val/clean_acc"] <= 1
    # The code that produced the focal run is kept beside the sweep's results.
    assert (tmp_path / "results" / result.sweep_id / "gce_plugins" / "my_losses.py").read_text() == MY_LOSSES


def test_the_train_command_names_a_plugin_it_cannot_import():
    from typer.testing import CliRunner

    from sweeps.cli import app

    out = CliRunner().invoke(app, ["train", "--plugin", "no_such_plugin_mod", "--loss", "focal"])
    assert out.exit_code == 2
    assert "plugins[0]: cannot import 'no_such_plugin_mod'" in " ".join(out.output.replace("│", " ").split())

"""Plugins: losses, models, datasets and attacks from outside the package, registered by name.

The registries (``gce.losses.LOSSES``, ``gce.models.MODELS``, ``gce.data.DATASETS``, ``gce.attacks.ATTACKS``) are
plain dicts; the functions here are the way in from outside. Each checks the plugin against what its callers do
with it and refuses it with a message that names it and says what is expected, so a wrong signature fails when
the plugin is imported, not in the middle of a sweep. A name a built-in holds is refused; registering the same
object again under the same name (a module imported twice, or reloaded) is a no-op.

Three ways in, all idempotent:

- a module that registers on import: ``plugins: [my_losses]`` in a spec, or ``load_plugins(["my_losses"])``;
- an object: ``"my_losses:focal"`` (registered as ``focal``) or ``"focal2 = my_losses:focal"`` (as ``focal2``).
  Its kind comes from its type: an ``Attack`` subclass is an attack, a ``DatasetSpec`` a dataset, an
  ``nn.Module`` subclass a model, any other callable a loss. A model factory that is a plain function, or a bare
  dataset loader, cannot be told from a loss: register those from their module (``register_model``,
  ``register_dataset``) or by entry point;
- an installed package's entry points, in the groups ``gce_sweeps.losses``, ``gce_sweeps.models``,
  ``gce_sweeps.datasets`` and ``gce_sweeps.attacks`` (the entry's name is the registry name; its object is
  checked as that group's kind; an entry that names a module only imports it). ``load_entry_points()`` loads
  them once per process; ``load_plugins`` calls it first.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Iterable
from dataclasses import fields
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any

from torch import nn

from gce.attacks import ATTACK_LOSSES, ATTACKS, Attack, AttackConfig
from gce.attacks.config import _taken
from gce.data import AUGMENTATIONS, DATASETS, DatasetInfo, DatasetSpec
from gce.losses import LOSSES
from gce.models import MODELS

__all__ = [
    "ENTRY_POINT_GROUPS",
    "PluginError",
    "load_entry_points",
    "load_plugin",
    "load_plugins",
    "register_attack",
    "register_dataset",
    "register_loss",
    "register_model",
]

#: Entry-point group -> the kind of object its entries name.
ENTRY_POINT_GROUPS = {"gce_sweeps.losses": "loss", "gce_sweeps.models": "model",
                      "gce_sweeps.datasets": "dataset", "gce_sweeps.attacks": "attack"}

_REGISTRIES: dict[str, dict[str, Any]] = {"loss": LOSSES, "model": MODELS, "dataset": DATASETS, "attack": ATTACKS}
_BUILTIN = {kind: frozenset(registry) for kind, registry in _REGISTRIES.items()}  # before any plugin
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")  # names appear in specs, MLflow params and metric keys
_MODEL_COMMON = ("input_shape", "num_classes", "mean", "std")  # what gce.models.build_model passes every factory
_LOSS_RESERVED = ("alpha", "normalization")  # LossConfig fields that reach gce/cot only, never another loss
_P = inspect.Parameter
_entry_points_loaded = False


class PluginError(ValueError):
    """A plugin that cannot be used; the message names it and says what is expected. ``problems`` holds one line
    per failing plugin when several were loaded at once."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or [message]


# --- registering ---------------------------------------------------------------------------------------------
def register_loss(name: str, fn: Callable[..., Any]) -> None:
    """Register ``fn(logits, target, *, <options>=default, reduction="mean")`` as loss ``name``.

    ``reduction`` ("mean" | "sum" | "none") is required because attacks with the training loss (``loss: train``,
    and PGD adversarial training) call it with ``reduction="none"`` for per-sample losses of shape (batch,). Its
    other parameters are the loss's options, set by ``loss.kwargs`` in a spec and checked by name against this
    signature: they need defaults. ``alpha`` and ``normalization`` are reserved (they reach gce and cot only).
    """
    _register("loss", name, fn, _check_loss)


def register_model(name: str, factory: Callable[..., nn.Module]) -> None:
    """Register a model class or factory as ``name``.

    ``gce.models.build_model`` calls it as ``factory(input_shape=(C, H, W), num_classes=K, mean=…, std=…,
    **model.kwargs)``: it must accept those four keywords (or ``**common``, passed on to ``Classifier``), and its
    options need defaults. It should return a ``gce.models.Classifier`` (images in [0, 1] -> logits, with
    ``features(x)``, which the latent-cluster metrics read); a class is checked for that here, a function when
    it is first called.
    """
    _register("model", name, factory, _check_model)


def register_dataset(name: str, spec_or_loader: DatasetSpec | Callable[..., Any], info: DatasetInfo | None = None
                     ) -> None:
    """Register a dataset as ``name``: a ``DatasetSpec(info, loader)``, or a loader with ``info=DatasetInfo(…)``.

    A loader is ``loader(root: Path, download: bool) -> (train Split, test Split)`` of uint8 images (N, C, H, W)
    and int64 labels; ``load_dataset`` carves the validation split from train. ``info.name`` must be ``name``.
    """
    _register("dataset", name, _dataset_spec(name, spec_or_loader, info), _check_dataset)


def register_attack(name: str, cls: type[Attack]) -> None:
    """Register an attack class (a subclass of ``gce.attacks.Attack`` implementing ``perturb``) as ``name``.

    ``build_attack`` constructs it from an ``AttackConfig``: it passes the config fields named like constructor
    parameters (or mapped to one by the class's ``aliases``) and builds ``loss_fn`` when the constructor takes
    one; every other constructor parameter needs a default.
    """
    _register("attack", name, cls, _check_attack)


_REGISTER = {"loss": register_loss, "model": register_model, "dataset": register_dataset, "attack": register_attack}


def _register(kind: str, name: str, obj: Any, check: Callable[[str, Any], None]) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise PluginError(f"{kind} {name!r}: a name is lowercase letters, digits and underscores, starting with a "
                          "letter (it appears in specs, MLflow params and metric keys)")
    registry = _REGISTRIES[kind]
    existing = registry.get(name)
    if existing is not None and _same(existing, obj):
        registry[name] = obj  # the same plugin again (imported twice, or reloaded): the newest object is kept
        return
    if name in _BUILTIN[kind]:
        raise PluginError(f"{kind} {name!r}: the name of a built-in {kind}; choose another "
                          f"(built-in: {sorted(_BUILTIN[kind])})")
    if existing is not None:
        raise PluginError(f"{kind} {name!r}: already registered to {_origin(existing)}; choose another name")
    check(name, obj)
    registry[name] = obj


def _identity(obj: Any) -> Any:
    """What makes two registrations the same plugin: the object, or where it is defined (a reload makes a new
    object of the same definition)."""
    if isinstance(obj, DatasetSpec):
        return obj.info, _identity(obj.load)
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if module and qualname and "<" not in qualname:  # <locals>, <lambda>: only the object itself is the same
        return module, qualname
    return id(obj)


def _same(a: Any, b: Any) -> bool:
    return a is b or _identity(a) == _identity(b)


def _origin(obj: Any) -> str:
    target = obj.load if isinstance(obj, DatasetSpec) else obj
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', type(target).__name__)}"


# --- checks: what each caller does with a plugin -------------------------------------------------------------
def _signature(kind: str, name: str, obj: Any, expected: str) -> inspect.Signature:
    if not callable(obj):
        raise PluginError(f"{kind} {name!r}: must be {expected}; got {obj!r}")
    try:
        return inspect.signature(obj)
    except (TypeError, ValueError) as err:
        raise PluginError(f"{kind} {name!r}: its signature cannot be read ({err}); it must be {expected}") from None


def _check_loss(name: str, fn: Any) -> None:
    expected = "a function loss(logits, target, *, <options>=default, reduction='mean')"
    if isinstance(fn, type):
        raise PluginError(f"loss {name!r}: must be {expected}; got the class {fn.__name__}")
    params = list(_signature("loss", name, fn, expected).parameters.values())
    var = [p.name for p in params if p.kind in (_P.VAR_POSITIONAL, _P.VAR_KEYWORD)]
    if var:
        raise PluginError(f"loss {name!r}: takes {var}; its options must be named parameters with defaults "
                          "(they are loss.kwargs, checked by name against the signature)")
    if len(params) < 2 or any(p.kind not in (_P.POSITIONAL_ONLY, _P.POSITIONAL_OR_KEYWORD) or p.name == "reduction"
                              for p in params[:2]):
        raise PluginError(f"loss {name!r}: must take (logits, target) as its first two positional parameters; "
                          f"got {inspect.signature(fn)}")
    reduction = next((p for p in params[2:] if p.name == "reduction"), None)
    if reduction is None or reduction.default is _P.empty or reduction.kind is _P.POSITIONAL_ONLY:
        raise PluginError(f"loss {name!r}: must accept a `reduction` keyword with a default ('mean'): attacks with "
                          "the training loss call it with reduction='none' and need per-sample losses of shape "
                          "(batch,)")
    reserved = [p.name for p in params[2:] if p.name in _LOSS_RESERVED]
    if reserved:
        raise PluginError(f"loss {name!r}: {reserved} are reserved (loss.alpha and loss.normalization reach gce "
                          "and cot only, never another loss); give the option another name")
    options = [p for p in params[2:] if p.name != "reduction"]
    bad = [p.name for p in options if p.default is _P.empty or p.kind is _P.POSITIONAL_ONLY]
    if bad:
        raise PluginError(f"loss {name!r}: its options {bad} need defaults and must be passable by name: they are "
                          "loss.kwargs, which a spec may leave out")


def _check_model(name: str, factory: Any) -> None:
    expected = "a model class or factory(*, input_shape, num_classes, mean, std, <options>=default)"
    if isinstance(factory, type):
        if not issubclass(factory, nn.Module):
            raise PluginError(f"model {name!r}: a class must subclass torch.nn.Module (best gce.models.Classifier); "
                              f"got {factory.__name__}")
        if not callable(getattr(factory, "features", None)):
            raise PluginError(f"model {name!r}: must have features(x), the penultimate representation the "
                              "latent-cluster metrics read: subclass gce.models.Classifier")
    params = _signature("model", name, factory, expected).parameters
    has_var_kw = any(p.kind is _P.VAR_KEYWORD for p in params.values())
    missing = [c for c in _MODEL_COMMON
               if not has_var_kw and (c not in params or params[c].kind is _P.POSITIONAL_ONLY)]
    if missing:
        raise PluginError(f"model {name!r}: build_model calls it as factory(input_shape=(C, H, W), num_classes=K, "
                          f"mean=..., std=..., **model.kwargs); it does not accept {missing} (name them, or take "
                          "**common and pass them on to gce.models.Classifier)")
    options = [p for n, p in params.items() if n not in _MODEL_COMMON and p.kind not in (_P.VAR_KEYWORD,
                                                                                         _P.VAR_POSITIONAL)]
    bad = [p.name for p in options if p.default is _P.empty or p.kind is _P.POSITIONAL_ONLY]
    if bad:
        raise PluginError(f"model {name!r}: its options {bad} need defaults and must be passable by name: they "
                          "are model.kwargs, which a spec may leave out")


def _dataset_spec(name: str, spec_or_loader: Any, info: DatasetInfo | None) -> Any:
    if isinstance(spec_or_loader, DatasetSpec):
        if info is not None and info != spec_or_loader.info:
            raise PluginError(f"dataset {name!r}: info= is for a bare loader; a DatasetSpec carries its own")
        return spec_or_loader
    if not callable(spec_or_loader):
        raise PluginError(f"dataset {name!r}: must be a gce.data.DatasetSpec(info, loader), or a loader with "
                          f"info=DatasetInfo(...); got {spec_or_loader!r}")
    if not isinstance(info, DatasetInfo):
        raise PluginError(f"dataset {name!r}: a loader needs info=DatasetInfo(name, num_classes, input_shape, mean, "
                          f"std, augment), what models and trainers read without loading it; got info={info!r}")
    return DatasetSpec(info, spec_or_loader)


def _check_dataset(name: str, spec: DatasetSpec) -> None:
    info = spec.info
    problems = []
    if info.name != name:
        problems.append(f"info.name is {info.name!r}, not {name!r}")
    if isinstance(info.num_classes, bool) or not isinstance(info.num_classes, int) or info.num_classes < 2:
        problems.append(f"info.num_classes must be an int >= 2; got {info.num_classes!r}")
    shape = tuple(info.input_shape) if isinstance(info.input_shape, (tuple, list)) else ()
    if len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape):
        problems.append(f"info.input_shape must be (C, H, W), 3 positive ints; got {info.input_shape!r}")
    elif not all(isinstance(v, (tuple, list)) and len(v) == shape[0] for v in (info.mean, info.std)) \
            or not all(isinstance(s, (int, float)) and s > 0 for s in info.std):
        problems.append(f"info.mean and info.std need one value per channel ({shape[0]}), std > 0; "
                        f"got {info.mean!r}, {info.std!r}")
    if info.augment not in AUGMENTATIONS:
        problems.append(f"info.augment must be one of {sorted(AUGMENTATIONS)}; got {info.augment!r}")
    if problems:
        raise PluginError(f"dataset {name!r}: " + "; ".join(problems))
    sig = _signature("dataset", name, spec.load, "a loader(root: Path, download: bool) -> (train, test)")
    try:
        sig.bind("root", False)
    except TypeError:
        raise PluginError(f"dataset {name!r}: load_dataset calls its loader as loader(root: Path, download: bool) "
                          f"-> (train Split, test Split); got {spec.load.__name__}{sig}") from None


def _check_attack(name: str, cls: Any) -> None:
    if not (isinstance(cls, type) and issubclass(cls, Attack)) or cls is Attack:
        raise PluginError(f"attack {name!r}: must be a class that subclasses gce.attacks.Attack and implements "
                          f"perturb(model, x, y) (build_attack constructs it from an AttackConfig); got {cls!r}")
    if cls.perturb is Attack.perturb:
        raise PluginError(f"attack {name!r}: {cls.__name__} must implement perturb(model, x, y) -> x_adv")
    config_fields = [f.name for f in fields(AttackConfig)]
    bad_aliases = {p: f for p, f in cls.aliases.items() if f not in config_fields}
    if bad_aliases:
        raise PluginError(f"attack {name!r}: aliases {bad_aliases} name no AttackConfig field ({config_fields})")
    if cls.default_loss is not None and cls.default_loss not in ATTACK_LOSSES:
        raise PluginError(f"attack {name!r}: default_loss must be None or one of {sorted(ATTACK_LOSSES)}; "
                          f"got {cls.default_loss!r}")
    fed = set(_taken(cls).values())
    params = _signature("attack", name, cls, "an Attack subclass").parameters.values()
    unfed = [p.name for p in params
             if p.default is _P.empty and p.kind not in (_P.VAR_POSITIONAL, _P.VAR_KEYWORD) and p.name not in fed]
    if unfed:
        raise PluginError(f"attack {name!r}: constructor parameters {unfed} have no default and are no AttackConfig "
                          f"field ({config_fields}): build_attack passes only those; give defaults, rename them, "
                          "or map them with the class's `aliases`")


# --- loading ------------------------------------------------------------------------------------------------
def load_plugins(entries: Iterable[str]) -> list[ModuleType]:
    """Import every plugin entry (``module``, ``module:object`` or ``name = module:object``), after the installed
    packages' entry points; returns the modules imported. All failures are raised at once, as one PluginError
    whose ``problems`` name each entry by its index (``plugins[0]: cannot import 'x': …``)."""
    load_entry_points()
    modules, problems = [], []
    for i, entry in enumerate(entries):
        try:
            modules.append(load_plugin(entry))
        except PluginError as err:
            problems.append(f"plugins[{i}]: {err}")
    if problems:
        raise PluginError("\n".join(problems), problems)
    return modules


def load_plugin(entry: str) -> ModuleType:
    """Import one plugin entry and register its object, if it names one (module docstring: the kind rule)."""
    if not isinstance(entry, str):
        raise PluginError(f"must be a string 'module', 'module:object' or 'name = module:object'; got {entry!r}")
    name, sep, target = entry.partition("=")
    name, target = (name.strip(), target.strip()) if sep else (None, entry.strip())
    module_name, colon, attr = (part.strip() for part in target.partition(":"))
    dotted = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
    if not dotted.match(module_name) or (colon and not dotted.match(attr)) or (sep and not colon):
        raise PluginError(f"{entry!r} is not 'module', 'module:object' or 'name = module:object'")
    module = _import(module_name)
    if not colon:
        return module
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise PluginError(f"module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    kind = _kind(obj, entry)
    try:
        _REGISTER[kind](name or attr.rpartition(".")[2], obj)
    except PluginError as err:
        hint = (" (in 'module:object' a plain function is taken as a loss: register a model factory or a dataset "
                "loader from its module with register_model / register_dataset)") if kind == "loss" else ""
        raise PluginError(f"{entry!r}: {err}{hint}") from None
    return module


def _import(module_name: str) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except ImportError as err:
        raise PluginError(f"cannot import {module_name!r}: {err}") from None
    except PluginError as err:  # the module registered something the checks refuse
        raise PluginError(f"importing {module_name!r}: {err}") from None
    except Exception as err:  # a plugin's own code failed: say where, not a bare traceback
        raise PluginError(f"importing {module_name!r} failed: {type(err).__name__}: {err}") from None


def _kind(obj: Any, entry: str) -> str:
    if isinstance(obj, type) and issubclass(obj, Attack):
        return "attack"
    if isinstance(obj, DatasetSpec):
        return "dataset"
    if isinstance(obj, type) and issubclass(obj, nn.Module):
        return "model"
    if callable(obj) and not isinstance(obj, type):
        return "loss"
    raise PluginError(f"{entry!r}: {obj!r} is no plugin: expected a loss function, an nn.Module class (model), a "
                      "DatasetSpec or an Attack subclass")


def load_entry_points() -> None:
    """Register what installed packages declare in the ``gce_sweeps.*`` entry-point groups; once per process
    (cheap afterwards). A broken entry point is an error naming it and its distribution."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    problems = []
    every = entry_points()
    for group, kind in ENTRY_POINT_GROUPS.items():
        for ep in every.select(group=group):
            where = f"entry point {ep.name!r} = {ep.value!r} (group {group}, distribution {_dist(ep)})"
            try:
                obj = ep.load()
                if not isinstance(obj, ModuleType):  # a module registers on import
                    _REGISTER[kind](ep.name, obj)
            except PluginError as err:
                problems.append(f"{where}: {err}")
            except Exception as err:
                problems.append(f"{where}: cannot load: {type(err).__name__}: {err}")
    if problems:
        raise PluginError("\n".join(problems), problems)
    _entry_points_loaded = True


def _dist(ep: Any) -> str:
    dist = getattr(ep, "dist", None)
    return f"{dist.name} {dist.version}" if dist is not None else "?"

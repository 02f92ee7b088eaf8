"""Reading a spec: a YAML file or a shipped spec's name, ``--set`` overrides, then the schema and the semantic
checks, every problem reported at once with its YAML path and nothing started."""

from __future__ import annotations

import json
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from gce.config import set_path
from sweeps.spec import SpecError, SweepSpec
from sweeps.validate import check_semantics

__all__ = ["apply_overrides", "load_spec", "shipped_specs"]


def shipped_specs() -> dict[str, Path]:
    """Specs shipped in the package, by name."""
    folder = resources.files("sweeps") / "specs"
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")}


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``["base.epochs=5", "space.loss.name=[ce, gce]"]``: set dotted paths, values parsed as YAML."""
    raw = json.loads(json.dumps(raw))
    for item in overrides:
        path, sep, text = item.partition("=")
        if not sep or not path:
            raise SpecError(f"--set {item!r}: expected PATH=VALUE, e.g. base.epochs=5")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise SpecError(f"--set {item!r}: the value is not valid YAML: {err}") from None
        section, _, key = path.partition(".")
        if section == "space" and key:  # keys of `space` are themselves dotted paths: one level only
            if not isinstance(raw.get("space"), dict):
                raw["space"] = {}
            raw["space"][key] = value
        else:
            set_path(raw, path, value)
    return raw


def load_spec(source: str | Path | dict[str, Any], overrides: list[str] | None = None) -> SweepSpec:
    """Parse and fully validate a spec (a path, a shipped name or a mapping), with ``--set`` overrides applied;
    raise SpecError naming every bad field."""
    if isinstance(source, dict):
        raw, where = source, "<mapping>"
    else:
        path = Path(source)
        if not path.exists():
            shipped = shipped_specs()
            if str(source) not in shipped:
                raise SpecError(f"spec {str(source)!r}: no such file, and not a shipped spec "
                                f"(shipped: {sorted(shipped)})")
            path = shipped[str(source)]
        where = str(path)
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise SpecError(f"{where}: not valid YAML: {err}") from None
    if isinstance(raw, dict) and overrides:
        raw = apply_overrides(raw, overrides)
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: a spec must be a mapping of fields (name, experiment, base, …); "
                        f"got {type(raw).__name__}")
    _import_plugins(raw, where, None if isinstance(source, dict) else Path(where).parent)
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as err:
        raise SpecError(f"{where}: invalid spec\n" + _format(err)) from None
    problems = check_semantics(spec)
    if problems:
        raise SpecError(f"{where}: invalid spec\n" + "\n".join(f"  - {p}" for p in problems))
    return spec


def _import_plugins(raw: dict[str, Any], where: str, folder: Path | None) -> None:
    """The spec's plugins (and installed packages' entry points) registered before anything else is validated, so
    that a plugin's loss, model, dataset or attack validates like a built-in one. A plugin module is looked up on
    the path, then beside the spec file, then in the working directory (``gce-sweep``, a console script, does not
    put it on the path as ``python`` does). A ``plugins`` that is not a list is left to the schema to report."""
    from gce.plugins import PluginError, load_plugins

    entries = raw.get("plugins")
    if isinstance(entries, list) and entries:
        for extra in (folder, Path.cwd()):
            if extra is not None and str(extra.absolute()) not in sys.path:
                sys.path.append(str(extra.absolute()))  # appended: never shadows an installed package
    try:
        load_plugins(entries if isinstance(entries, list) else [])
    except PluginError as err:  # the rest of the spec may name what failed to register: its errors would mislead
        raise SpecError(f"{where}: invalid spec\n" + "\n".join(f"  - {p}" for p in err.problems)) from None


def _format(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        if e["type"] == "literal_error" and "expected" in e.get("ctx", {}):
            msg = f"must be one of {e['ctx']['expected']}"
        if not path:  # a check across fields: its message names them
            lines.append(f"  - {msg}")
        else:
            lines.append(f"  - {path}: {msg} (got {e.get('input')!r})")
    return "\n".join(lines)

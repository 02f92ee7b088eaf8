"""One dimension of a sweep's search space, as written in YAML.

    loss.name:  {grid: [ce, cot, gce]}                  # or simply [ce, cot, gce]
    loss.alpha: {grid: [0.1, 0.333, 1.0], when: {loss.name: gce}}
    optim.lr:   {loguniform: [1.0e-4, 1.0e-2]}
    batch_size: {choice: [32, 64, 128]}
    model.kwargs.hidden: {int: [16, 256]}

``when`` makes a dimension conditional (α only for GCE): it is set only in trials whose other values match,
so no trial ever records a parameter that had no effect. Grid and choice values are also what Optuna's
categorical suggestions draw from; uniform/loguniform/int become Optuna's float/log-float/int suggestions.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

__all__ = ["KINDS", "Dimension"]

KINDS = ("grid", "choice", "uniform", "loguniform", "int")


class Dimension(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: str
    values: list[Any]
    when: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, raw: Any) -> Any:
        if isinstance(raw, list):
            raw = {"grid": raw}
        if not isinstance(raw, dict):
            raise ValueError(f"a dimension is a list (a grid) or a mapping with one of {list(KINDS)}; got {raw!r}")
        if "kind" in raw:
            return raw
        raw = dict(raw)
        when = raw.pop("when", None)
        kinds = [k for k in raw if k in KINDS]
        unknown = [k for k in raw if k not in KINDS]
        if unknown:
            raise ValueError(f"unknown key(s) {unknown}; a dimension has one of {list(KINDS)} and optionally 'when'")
        if len(kinds) != 1:
            raise ValueError(f"a dimension needs exactly one of {list(KINDS)}; got {kinds or 'none'}")
        kind = kinds[0]
        values = raw[kind]
        if not isinstance(values, list):
            raise ValueError(f"{kind}: must be a list; got {values!r}")
        return {"kind": kind, "values": values, "when": when}

    @model_validator(mode="after")
    def _check(self) -> Dimension:
        if self.kind in ("grid", "choice"):
            if not self.values:
                raise ValueError(f"{self.kind}: must list at least one value (an empty {self.kind} runs nothing)")
        else:
            if len(self.values) != 2 or not all(_is_number(v) for v in self.values):
                raise ValueError(f"{self.kind}: must be [low, high] numbers; got {self.values!r}")
            low, high = self.values
            if not low < high:
                raise ValueError(f"{self.kind}: low must be below high; got {self.values!r}")
            if self.kind == "loguniform" and low <= 0:
                raise ValueError(f"loguniform: low must be > 0; got {low!r}")
            if self.kind == "int" and not all(isinstance(v, int) for v in self.values):
                raise ValueError(f"int: low and high must be integers; got {self.values!r}")
        if self.when is not None and not self.when:
            raise ValueError("when: must name at least one field and its value(s)")
        return self

    @property
    def is_grid(self) -> bool:
        return self.kind == "grid"

    @property
    def grid(self) -> list[Any]:
        return list(self.values)

    def applies(self, assignment: dict[str, Any]) -> bool:
        """Whether this conditional dimension is active for the other values of a trial."""
        if self.when is None:
            return True
        for key, wanted in self.when.items():
            allowed = wanted if isinstance(wanted, list) else [wanted]
            if assignment.get(key) not in allowed:
                return False
        return True

    def endpoints(self) -> list[Any]:
        """Values to validate the dimension with: every grid/choice value, or both bounds."""
        return list(self.values)

    def suggest(self, trial: Any, name: str) -> Any:
        """Draw a value through an Optuna trial (define-by-run, so conditional dimensions work)."""
        low_high = self.values
        if self.kind in ("grid", "choice"):
            return trial.suggest_categorical(name, self.values)
        if self.kind == "uniform":
            return trial.suggest_float(name, *low_high)
        if self.kind == "loguniform":
            return trial.suggest_float(name, *low_high, log=True)
        return trial.suggest_int(name, *low_high)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)

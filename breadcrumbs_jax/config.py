"""The YAML merge configuration of ``breadcrumbs-jax merge``, validated with pydantic.

    base_model: path/to/pretrained          # Orbax folder, safetensors file/folder, or .msgpack
    models:
      - path: path/to/finetuned_a
        name: math                          # optional label for reports and errors
        weight: 1.0                         # optional per-model weight w_t
        params: {density: 0.1, gamma_top: 0.01}   # optional per-model band / drop overrides
      - path: path/to/finetuned_b
    method: breadcrumbs                     # linear | task_arithmetic | ties | dare | breadcrumbs | breadcrumbs_ties
    params: {alpha: 0.5, beta: 0.85, gamma: 0.993, granularity: tensor}
    rules:                                  # first matching pattern wins
      - {pattern: "*embed*", action: base}
      - {pattern: "re:.*norm.*", method: task_arithmetic, params: {alpha: 0.5}}
      - {pattern: "*attn*", out_axis: 0}
    layout: torch                           # flax [in, out] | torch [out, in]; default: by base format
    dtype: bfloat16                         # output dtype of float leaves; default: unchanged
    vocab: shared                           # on a vocabulary-size mismatch: error (default) | shared
    include: ["params/*"]                   # merge and write only these leaves (default: all)
    output: {format: safetensors, shard_size: 5GB}

Unknown keys are errors naming their location. Relative paths are relative to the config
file. Per-model `params` take `beta`, `gamma`, `density`, `gamma_top` (band) and `p` (DARE);
a model without its own value uses `params`', else the method's default. mergekit's
per-model `density`, `gamma` and `weight` are our `density`, `gamma_top` and `weight`.
"""

from __future__ import annotations

import inspect
import os
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import MergeError
from .methods import METHODS, Method
from .plan import LeafRule

PER_TASK = ("beta", "gamma", "density", "gamma_top", "p")
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TaskParams(_Strict):
    """Method parameters a model may set for itself."""

    beta: float | None = None
    gamma: float | None = None
    density: float | None = None
    gamma_top: float | None = None
    p: float | None = None


class MethodParams(TaskParams):
    """Method parameters of the run (or of a rule)."""

    alpha: float | None = None
    seed: int | None = None
    normalize: bool | None = None
    granularity: Literal["tensor", "row", "global"] | None = None


class ModelSpec(_Strict):
    path: str
    name: str | None = None
    weight: float | None = None
    params: TaskParams = TaskParams()


class RuleSpec(_Strict):
    pattern: str
    action: Literal["merge", "base"] = "merge"
    method: str | None = None
    params: MethodParams = MethodParams()
    out_axis: int | None = None


class OutputSpec(_Strict):
    format: Literal["orbax", "safetensors", "msgpack"] | None = None
    shard_size: int | str | None = None

    @field_validator("shard_size")
    @classmethod
    def _size(cls, v):
        if v is None or isinstance(v, int):
            if v is not None and v <= 0:
                raise ValueError("must be positive")
            return v
        m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", v)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"not a size like '5GB' or '500MiB': {v!r}")
        return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


class MergeConfig(_Strict):
    base_model: str
    models: list[ModelSpec] = Field(min_length=1)
    method: str = "breadcrumbs"
    params: MethodParams = MethodParams()
    rules: list[RuleSpec] = []
    layout: Literal["flax", "torch"] | None = None
    dtype: Literal["float32", "bfloat16", "float16", "float64"] | None = None
    vocab: Literal["error", "shared"] = "error"
    include: list[str] = []
    output: OutputSpec = OutputSpec()

    def build_method(self, name: str, params: MethodParams, where: str) -> Method:
        """The method `name` with `params`, per-model overrides and model weights applied."""
        factory = METHODS.get(name)
        if factory is None:
            raise MergeError(f"{where}method: unknown method {name!r}; known: {', '.join(METHODS)}")
        sig = inspect.signature(factory).parameters
        kwargs = params.model_dump(exclude_none=True)
        for key in kwargs:
            if key not in sig:
                raise MergeError(f"{where}params.{key}: method {name!r} has no parameter {key!r} "
                                 f"(it takes: {', '.join(k for k in sig if k != 'weights')})")
        for key in PER_TASK:
            values = [getattr(m.params, key) for m in self.models]
            if all(v is None for v in values):
                continue
            if key not in sig:
                if where:  # a rule's method that has no such parameter: the override does not apply
                    continue
                t = next(i for i, v in enumerate(values) if v is not None)
                raise MergeError(f"models.{t}.params.{key}: method {name!r} has no parameter {key!r}")
            fallback = kwargs.get(key, sig[key].default)
            kwargs[key] = tuple(fallback if v is None else v for v in values)
        if "weights" in sig and any(m.weight is not None for m in self.models):
            kwargs["weights"] = tuple(1.0 if m.weight is None else m.weight for m in self.models)
        try:
            return factory(**kwargs)
        except MergeError as e:
            raise MergeError(f"{where.rstrip('.') or 'params'}: {e}") from None

    def method_obj(self) -> Method:
        return self.build_method(self.method, self.params, "")

    def leaf_rules(self) -> list[LeafRule]:
        rules = []
        for i, r in enumerate(self.rules):
            method = None
            if r.action == "merge" and (r.method is not None or r.params.model_dump(exclude_none=True)):
                name = r.method or self.method
                base = self.params.model_dump(exclude_none=True) if name == self.method else {}
                params = MethodParams(**{**base, **r.params.model_dump(exclude_none=True)})
                method = self.build_method(name, params, f"rules.{i}.")
            rules.append(LeafRule(r.pattern, method, r.action, r.out_axis))
        return rules


def _model_in(tp) -> type[BaseModel] | None:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    for arg in typing.get_args(tp):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _allowed_keys(loc: tuple) -> list[str]:
    cls: type[BaseModel] | None = MergeConfig
    for part in loc[:-1]:
        if isinstance(part, int) or cls is None:
            continue
        field = cls.model_fields.get(part)
        cls = _model_in(field.annotation) if field is not None else None
    return list(cls.model_fields) if cls is not None else []


def _describe(err: ValidationError, source: str) -> MergeError:
    errors = err.errors()
    e = errors[0]
    loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
    if e["type"] == "extra_forbidden":
        msg = f"unknown key (allowed here: {', '.join(_allowed_keys(e['loc']))})"
    elif e["type"] == "missing":
        msg = "required key missing"
    else:
        msg = e["msg"]
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return MergeError(f"{loc}: {msg}{more}", source=source)


def parse_config(data: Any, source: str = "config", root: str | os.PathLike | None = None) -> MergeConfig:
    """Validate a config mapping; relative model paths are taken relative to `root`."""
    if not isinstance(data, dict):
        raise MergeError("the config must be a mapping of keys (base_model, models, method, ...)", source=source)
    try:
        cfg = MergeConfig.model_validate(data)
    except ValidationError as e:
        raise _describe(e, source) from None
    if root is not None:
        resolve = lambda p: str(Path(root, p)) if not os.path.isabs(p) else p  # noqa: E731
        cfg = cfg.model_copy(update={
            "base_model": resolve(cfg.base_model),
            "models": [m.model_copy(update={"path": resolve(m.path)}) for m in cfg.models],
        })
    try:  # method parameters are checked now, before any checkpoint is opened
        cfg.method_obj()
        cfg.leaf_rules()
    except MergeError as e:
        raise MergeError(str(e), source=source) from None
    return cfg


def load_config(path: str | os.PathLike) -> MergeConfig:
    """Read and validate a YAML config file."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as e:
        raise MergeError(f"cannot read the config: {e.strerror}", source=str(path)) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise MergeError(f"invalid YAML{where}: {getattr(e, 'problem', e)}", source=str(path)) from None
    return parse_config(data, str(path), p.parent)

"""Recipes: YAML lists of passes with their configs, validated before anything runs."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from modelpress.errors import ModelpressError
from modelpress.passes import KINDS, Pass, registered_passes


class ExportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    optimize: str = Field("auto", pattern="^(auto|none|ort|transformer|onnxslim)$")
    opset: int = Field(17, ge=13, le=21)


class RecipeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    description: str = ""
    passes: list[dict[str, Any]] = Field(default_factory=list)
    export: ExportConfig = Field(default_factory=ExportConfig)


class Recipe:
    """A validated recipe: passes (instantiated, configs checked) and export settings."""

    def __init__(self, spec: RecipeSpec, passes: list[Pass], origin: str) -> None:
        self.spec = spec
        self.passes = passes
        self.origin = origin

    @property
    def name(self) -> str:
        return self.spec.name

    def to_dict(self) -> dict:
        return {
            "name": self.spec.name,
            "description": self.spec.description,
            "passes": [{"pass": p.name, **p.config.model_dump(mode="json")} for p in self.passes],
            "export": self.spec.export.model_dump(),
        }

    @classmethod
    def from_dict(cls, data: Any, origin: str = "<dict>") -> Recipe:
        passes_by_name = registered_passes()
        if not isinstance(data, dict):
            raise ModelpressError(f"recipe {origin} is not a mapping", "a recipe has keys name, passes, export")
        try:
            spec = RecipeSpec(**data)
        except ValidationError as exc:
            raise ModelpressError(f"recipe {origin}: {_explain(exc)}", "fix the recipe (see `modelpress recipes`)") from exc
        passes: list[Pass] = []
        for i, entry in enumerate(spec.passes):
            entry = dict(entry)
            name = entry.pop("pass", None)
            if name not in passes_by_name:
                raise ModelpressError(
                    f"recipe {origin}: passes[{i}] names unknown pass {name!r}",
                    f"known passes: {', '.join(sorted(passes_by_name))}",
                )
            cls_ = passes_by_name[name]
            try:
                passes.append(cls_(cls_.Config(**entry)))
            except ValidationError as exc:
                known = ", ".join(cls_.Config.model_fields)
                raise ModelpressError(
                    f"recipe {origin}: passes[{i}] ({name}): {_explain(exc)}", f"keys of {name}: {known}"
                ) from exc
        _check_order(passes, origin)
        return cls(spec, passes, origin)


_LABEL = {"merge": "merge", "graph": "graph", "onnx": "ONNX"}


def _check_order(passes: list[Pass], origin: str) -> None:
    """Merge passes first (at most one: it turns the N input models into one), then graph passes, then
    ONNX passes (they work on the exported file)."""
    ranks = [KINDS.index(p.kind) for p in passes]
    for i in range(1, len(passes)):
        if ranks[i] < ranks[i - 1]:
            raise ModelpressError(
                f"recipe {origin}: {passes[i].kind} pass {passes[i].name!r} comes after an "
                f"{_LABEL[passes[i - 1].kind]}-stage pass ({passes[i - 1].name!r})",
                "order passes merge (first, at most one), then graph (pruning, fake-quant), then ONNX quantizers",
            )
    if sum(p.kind == "merge" for p in passes) > 1:
        raise ModelpressError(f"recipe {origin}: more than one merge pass", "a recipe merges its input models once")


def _explain(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"])
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key {loc!r}")
        else:
            parts.append(f"{loc}: {err['msg']} (got {err.get('input')!r})")
    return "; ".join(parts)


def builtin_recipes() -> dict[str, Path]:
    """Names and files of the recipes that ship with the package."""
    folder = resources.files("modelpress") / "recipes"
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".yaml")}


def load_recipe(name_or_path: str | Path | None) -> Recipe:
    """A built-in recipe by name, or a YAML file."""
    name_or_path = name_or_path or "default"
    builtins = builtin_recipes()
    text = str(name_or_path)
    if text in builtins:
        path = builtins[text]
    else:
        path = Path(text)
        if not path.exists():
            if path.suffix in (".yaml", ".yml") or "/" in text:
                raise ModelpressError(f"recipe file not found: {text}", "check the path")
            raise ModelpressError(f"unknown recipe {text!r}", f"built-in recipes: {', '.join(sorted(builtins))}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ModelpressError(f"recipe {path} is not valid YAML: {str(exc).splitlines()[0]}", "fix the YAML") from exc
    return Recipe.from_dict(data, origin=str(path.name if text in builtins else path))

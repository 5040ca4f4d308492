"""Passes, recipes, the pipeline that runs them, and the context they share."""

from modelpress.compress.context import Context
from modelpress.compress.passes import PASSES, Pass, PassConfig, PassResult, register
from modelpress.compress.pipeline import Pipeline, PipelineResult
from modelpress.compress.recipe import Recipe, builtin_recipes, load_recipe
from modelpress.compress.reporter import QUIET, Reporter

__all__ = [
    "PASSES", "QUIET", "Context", "Pass", "PassConfig", "PassResult", "Pipeline", "PipelineResult", "Recipe",
    "Reporter", "builtin_recipes", "load_recipe", "register",
]

"""Recipes, the pipeline that runs them, and the report; the Pass kinds and Context live in modelpress.passes."""

from modelpress.compress.pipeline import Pipeline, PipelineResult
from modelpress.compress.recipe import Recipe, builtin_recipes, load_recipe
from modelpress.passes import PASSES, Context, Pass, PassConfig, PassResult, register
from modelpress.progress import QUIET, Reporter

__all__ = [
    "PASSES", "QUIET", "Context", "Pass", "PassConfig", "PassResult", "Pipeline", "PipelineResult", "Recipe",
    "Reporter", "builtin_recipes", "load_recipe", "register",
]

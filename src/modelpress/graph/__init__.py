"""The model graph: tracing, groups of coupled dimensions, and edits that keep the module consistent."""

from modelpress.graph.groups import Group
from modelpress.graph.inputs import InputSpec, PrimaryOutput, primary_output
from modelpress.graph.model_graph import Block, ModelGraph

__all__ = ["Block", "Group", "InputSpec", "ModelGraph", "PrimaryOutput", "primary_output"]

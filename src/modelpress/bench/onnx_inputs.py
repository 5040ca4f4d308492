"""Read an ONNX file's inputs back into an InputSpec, so `modelpress bench MODEL.onnx` needs no checkpoint."""

from __future__ import annotations

from pathlib import Path

from modelpress.errors import ModelpressError
from modelpress.graph.inputs import InputSpec

TEXT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


def input_spec_from_onnx(path: str | Path, vocab_size: int | None = None) -> InputSpec:
    """Text models are recognised by integer inputs named like tokenizer outputs; others need a static
    per-sample shape (everything after the batch axis)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ModelpressError(f"cannot read {path} as ONNX: {exc}", "check that the file is a complete ONNX model") from exc
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    names = [i.name for i in inputs]
    if names and all(n in TEXT_NAMES for n in names):
        vocab = vocab_size or _guess_vocab(model) or 30522
        return InputSpec("text", names, vocab_size=vocab)
    if len(inputs) != 1:
        raise ModelpressError(f"{path} has inputs {names}", "bench a checkpoint instead, so modelpress knows its inputs")
    dims = inputs[0].type.tensor_type.shape.dim[1:]
    if any(not d.HasField("dim_value") for d in dims):
        raise ModelpressError(f"{path} has a dynamic per-sample input shape", "bench the checkpoint instead")
    return InputSpec("image" if len(dims) == 3 else "tensor", names, shape=tuple(d.dim_value for d in dims))


def _guess_vocab(model) -> int | None:  # noqa: ANN001
    """The row count of the word-embedding table (the Gather on input_ids), if there is one."""
    inits = {i.name: i for i in model.graph.initializer}
    reshaped = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Reshape" and n.input[0] in inits}
    for node in model.graph.node:
        table = reshaped.get(node.input[0], node.input[0]) if node.input else None
        if (node.op_type in ("Gather", "GatherBlockQuantized") and len(node.input) >= 2
                and node.input[1] == "input_ids" and table in inits):
            return int(inits[table].dims[0])  # a packed table's rows too (GatherBlockQuantized)
    return None

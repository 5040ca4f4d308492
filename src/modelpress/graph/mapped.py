"""Weights mapped from a checkpoint file, dropped from the resident set once a step has read them."""

from __future__ import annotations

from torch import nn

from modelpress.system import drop_file_pages, file_mappings_frozen

__all__ = ["drop_mapped_weights", "file_mappings_frozen"]


def drop_mapped_weights(module: nn.Module) -> int:
    """Let this process's resident set drop ``module``'s weights that are mapped from a file (Hugging Face's
    ``from_pretrained`` maps model.safetensors): they read the same afterwards (the next read faults them back
    in from the file, usually still in the page cache). Tensors written in place since loading (a version
    above 0) are skipped. Returns the bytes dropped: 0 for weights in ordinary memory.

    A run that has read every weight (a trace, a forward over calibration data) otherwise keeps a full copy of
    them resident under its next steps' ONNX Runtime sessions and child processes."""
    spans = {}
    for t in (*module.parameters(), *module.buffers()):
        if t._version == 0 and t.numel():
            storage = t.untyped_storage()
            spans[storage.data_ptr()] = storage.nbytes()
    return drop_file_pages(spans.items())

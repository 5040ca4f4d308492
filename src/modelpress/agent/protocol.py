"""What the agent accepts: content-addressed file names, safe relative names for external data, and the
check that an upload is an ONNX ModelProto (read at the protobuf wire level, so the device needs neither the
onnx package nor torch; nothing uploaded is ever unpickled or executed)."""

from __future__ import annotations

import mmap
import re
from pathlib import Path, PurePosixPath

API = "v1"
SHA256 = re.compile(r"^[0-9a-f]{64}$")
KINDS = ("model", "data", "inputs")

# ModelProto's fields (onnx.proto) and their wire types: 0 varint, 2 length-delimited
_MODEL_FIELDS = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 25: 2, 26: 2}
# GraphProto's fields: all length-delimited
_GRAPH_FIELDS = {1, 2, 5, 10, 11, 12, 13, 14, 15, 16}


class NotOnnx(ValueError):
    """The upload is not an ONNX model."""


def _varint(buf: mmap.mmap | bytes, pos: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= end or shift > 63:
            raise NotOnnx("truncated or malformed protobuf")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _fields(buf: mmap.mmap | bytes, pos: int, end: int, allowed: dict[int, int]) -> dict[int, tuple[int, int]]:
    """Walk the fields between ``pos`` and ``end``; each must be one of ``allowed`` with its wire type.
    Returns the last (start, end) of every length-delimited field seen."""
    seen: dict[int, tuple[int, int]] = {}
    while pos < end:
        tag, pos = _varint(buf, pos, end)
        field, wire = tag >> 3, tag & 7
        if allowed.get(field) != wire:
            raise NotOnnx(f"field {field} (wire type {wire}) is not part of an ONNX model")
        if wire == 0:
            _, pos = _varint(buf, pos, end)
            seen[field] = (pos, pos)
        else:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise NotOnnx("truncated protobuf")
            seen[field] = (pos, pos + length)
            pos += length
    return seen


def check_onnx_model(path: Path) -> None:
    """Raise NotOnnx unless ``path`` parses as an ONNX ModelProto with an IR version and a graph (external
    data stays in its own files, which are raw tensor bytes and are not read here)."""
    with open(path, "rb") as fh:
        try:
            buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file cannot be mapped
            raise NotOnnx("the file is empty") from None
        with buf:
            top = _fields(buf, 0, len(buf), _MODEL_FIELDS)
            if 1 not in top or 7 not in top:
                raise NotOnnx("no IR version or no graph")
            start, end = top[7]
            _fields(buf, start, end, dict.fromkeys(_GRAPH_FIELDS, 2))


def safe_relative_name(name: str) -> PurePosixPath:
    """An external-data file name as the model refers to it, refused when it could leave the model's folder."""
    p = PurePosixPath(name)
    if (not name or len(name) > 255 or "\\" in name or "\x00" in name or p.is_absolute()
            or any(part in ("", ".", "..") for part in p.parts) or name != str(p)):
        raise ValueError(f"external data name {name!r} is not a plain relative file name")
    return p

"""Files of an ONNX model: its size with external data, and atomic moves of a model with its data."""

from __future__ import annotations

import os
from pathlib import Path


def external_data_files(path: os.PathLike | str) -> list[Path]:
    """The external-data files an ONNX model refers to (empty for a self-contained model)."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    found: dict[str, Path] = {}
    for tensor in _get_all_tensors(model):
        if uses_external_data(tensor):
            for entry in tensor.external_data:
                if entry.key == "location":
                    found.setdefault(entry.value, path.parent / entry.value)
    return list(found.values())


def remove_onnx(path: os.PathLike | str) -> None:
    """Delete an ONNX model and the external data files it refers to (nothing if it is not there)."""
    path = Path(path)
    if not path.exists():
        return
    for data in external_data_files(path):
        data.unlink(missing_ok=True)
    path.unlink(missing_ok=True)


def onnx_file_size(path: os.PathLike | str) -> int:
    """Bytes on disk of an ONNX model, external data files included."""
    path = Path(path)
    total = path.stat().st_size
    for data in external_data_files(path):
        if data.exists():
            total += data.stat().st_size
    return total


def move_onnx(src: os.PathLike | str, dst: os.PathLike | str) -> Path:
    """Move an ONNX model to ``dst`` (same file system), rewriting external data next to it if any.

    The model file itself is moved last with ``os.replace``, so ``dst`` is either the old file or the
    complete new one, never a partial write.
    """
    import onnx

    src, dst = Path(src), Path(dst)
    old_data = external_data_files(src)
    if not old_data:
        os.replace(src, dst)
        return dst
    if len(old_data) == 1:  # one data file: moved as it is, and the model's references renamed (no tensor loaded)
        model = onnx.load(str(src), load_external_data=False)
        data_name = dst.name + ".data"
        for tensor in _external_tensors(model):
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = data_name
        staged = src.parent / (".staged-" + dst.name)
        onnx.save_model(model, str(staged))
        os.replace(old_data[0], dst.parent / data_name)
        os.replace(staged, dst)
        if src.resolve() != dst.resolve():
            src.unlink(missing_ok=True)
        return dst
    # Re-save with one data file named after the destination, into the source folder, then move.
    model = onnx.load(str(src), load_external_data=True)
    data_name = dst.name + ".data"
    staged = src.parent / (".staged-" + dst.name)
    onnx.save_model(
        model,
        str(staged),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data_name,
        size_threshold=1024,
    )
    os.replace(src.parent / data_name, dst.parent / data_name)
    os.replace(staged, dst)
    for data in old_data:
        if data.resolve() != (dst.parent / data_name).resolve():
            data.unlink(missing_ok=True)
    src.unlink(missing_ok=True)
    return dst


def copy_onnx(src: os.PathLike | str, dst: os.PathLike | str) -> Path:
    """Copy an ONNX model to ``dst`` with its external data (one data file named after ``dst``), loading no
    tensor; ``src`` stays as it was."""
    import shutil

    import onnx

    src, dst = Path(src), Path(dst)
    old_data = external_data_files(src)
    if not old_data:
        shutil.copyfile(src, dst)
        return dst
    if len(old_data) > 1:  # several data files: one, named after the destination (loads the tensors)
        model = onnx.load(str(src), load_external_data=True)
        onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=dst.name + ".data", size_threshold=1024)
        return dst
    model = onnx.load(str(src), load_external_data=False)
    for tensor in _external_tensors(model):
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = dst.name + ".data"
    shutil.copyfile(old_data[0], dst.parent / (dst.name + ".data"))
    onnx.save_model(model, str(dst))
    return dst


def _external_tensors(model: object) -> list:
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    return [t for t in _get_all_tensors(model) if uses_external_data(t)]

"""The agent's files: uploads streamed into a content-addressed cache (so a model is sent once), checked
while they arrive (size limit, SHA-256), and per-measurement work folders that are removed afterwards."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path

import numpy as np

from modelpress.agent.protocol import KINDS, SHA256, NotOnnx, check_onnx_model, safe_relative_name

# after the limit is passed, the rest of a body is read and dropped up to this much more, so the client
# gets its 413 instead of a reset connection; a longer body is cut off
DRAIN_BYTES = 16 * 2**20


class UploadError(Exception):
    """An upload refused: ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Store:
    """Uploaded files under ``root`` by SHA-256: at most ``max_upload`` bytes each, ``max_cache`` bytes in
    all (the least recently used go first). Models are checked to be ONNX when they arrive, inputs to be
    plain numpy arrays (no pickles)."""

    def __init__(self, root: Path, max_upload: int, max_cache: int) -> None:
        self.root = Path(root)
        self.files = self.root / "files"
        self.incoming = self.root / "incoming"
        self.work = self.root / "work"
        for d in (self.files, self.incoming, self.work):
            d.mkdir(parents=True, exist_ok=True)
        self.max_upload = int(max_upload)
        self.max_cache = int(max_cache)
        self.kinds: dict[str, str] = {}
        self.uploads = 0  # files received and stored

    def path(self, sha: str) -> Path | None:
        """The stored file with this digest, or None."""
        if not SHA256.match(sha):
            return None
        p = self.files / sha
        return p if p.is_file() else None

    def missing(self, digests: Mapping[str, str]) -> list[str]:
        """The digests (values of ``digests``: what -> sha) not stored, or stored as another kind."""
        out = []
        for sha, kind in digests.items():
            if self.path(sha) is None or self.kinds.get(sha) != kind:
                out.append(sha)
        return sorted(set(out))

    async def receive(self, sha: str, kind: str, declared: int | None, chunks: AsyncIterator[bytes]) -> None:
        """Stream one upload into the cache (``declared``: its Content-Length, when given); raises UploadError."""
        if not SHA256.match(sha):
            raise UploadError(400, "files are named by their SHA-256 (64 lowercase hex digits)")
        if kind not in KINDS:
            raise UploadError(400, f"unknown file kind {kind!r} (one of {', '.join(KINDS)})")
        if declared is not None and declared > self.max_upload:
            raise UploadError(413, f"upload of {declared} bytes is over this agent's limit of {self.max_upload} bytes")
        fd, tmp = tempfile.mkstemp(dir=self.incoming, prefix="upload-")
        h, size, over = hashlib.sha256(), 0, False
        try:
            with os.fdopen(fd, "wb") as fh:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > self.max_upload:
                        over = True
                        if size > self.max_upload + DRAIN_BYTES:
                            break
                        continue
                    h.update(chunk)
                    fh.write(chunk)
            if over:
                raise UploadError(413, f"upload is over this agent's limit of {self.max_upload} bytes")
            if h.hexdigest() != sha:
                raise UploadError(400, "the upload's SHA-256 does not match its name (truncated or corrupted)")
            _check_kind(Path(tmp), kind)
            dst = self.files / sha
            os.replace(tmp, dst)
            self.kinds[sha] = kind
            self.uploads += 1
            self._evict(keep=dst)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def _evict(self, keep: Path) -> None:
        files = sorted((p for p in self.files.iterdir() if p.is_file()), key=lambda p: p.stat().st_atime)
        total = sum(p.stat().st_size for p in files)
        for p in files:
            if total <= self.max_cache:
                break
            if p != keep:
                total -= p.stat().st_size
                p.unlink(missing_ok=True)
                self.kinds.pop(p.name, None)

    @contextlib.contextmanager
    def workspace(self, variants: Mapping[str, Mapping[str, object]]) -> Iterator[dict[str, Path]]:
        """A fresh folder per measurement holding each variant's model (``NAME/model.onnx``) and its
        external data under the names the model uses; removed when the block ends."""
        folder = Path(tempfile.mkdtemp(dir=self.work, prefix="measure-"))
        try:
            paths: dict[str, Path] = {}
            for i, (name, spec) in enumerate(variants.items()):
                vdir = folder / f"v{i}"
                vdir.mkdir()
                model = vdir / "model.onnx"
                _link(self.files / str(spec["model"]), model)
                for rel, sha in dict(spec.get("data") or {}).items():  # type: ignore[arg-type]
                    dst = vdir / safe_relative_name(rel)
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    _link(self.files / str(sha), dst)
                paths[name] = model
            yield paths
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def load_inputs(self, sha: str) -> dict[str, np.ndarray]:
        """The arrays of an uploaded inputs file (``.npz``, no pickled objects)."""
        with np.load(self.files / sha, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}


def _link(src: Path, dst: Path) -> None:
    os.utime(src)  # recently used: evicted last
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _check_kind(path: Path, kind: str) -> None:
    if kind == "model":
        try:
            check_onnx_model(path)
        except NotOnnx as exc:
            raise UploadError(415, f"not an ONNX model: {exc}") from None
    elif kind == "inputs":
        try:
            with np.load(path, allow_pickle=False) as data:
                for k in data.files:
                    if data[k].dtype.hasobject:
                        raise ValueError("object arrays")
        except Exception as exc:  # numpy raises many kinds for a bad archive
            raise UploadError(415, f"inputs must be a .npz of plain arrays: {exc}") from None

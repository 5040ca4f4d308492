"""`modelpress search` bad input: short errors, exit code 2, nothing written; the checkpoint argument defaults
to the default model like every other command's, and `search extract RUN_DIR` still parses."""

from __future__ import annotations

import socket
import time

import pytest

from modelpress.cli import main
from modelpress.errors import ModelpressError


@pytest.fixture
def loads(monkeypatch) -> list:  # noqa: ANN001
    """The checkpoints the search command asks to load (loading stops there with a short error)."""
    asked: list = []

    def fake_load(ckpt, *_args, **_kw):  # noqa: ANN001, ANN202
        asked.append(ckpt)
        raise ModelpressError("stopped before loading", "test")

    monkeypatch.setattr("modelpress.cli.search.load_graph", fake_load)
    return asked


def _run(args: list[str], capsys) -> str:  # noqa: ANN001
    """Run the CLI, expect exit code 2, return stderr."""
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "Traceback" not in err
    return err


def test_unknown_objective_and_missing_run_dir(loads, tmp_path, capsys) -> None:  # noqa: ANN001
    err = _run(["search", "default", "--objectives", "quality,speed", "-o", str(tmp_path / "run")], capsys)
    assert "unknown objective 'speed'" in err
    assert loads == [] and not (tmp_path / "run").exists()
    err = _run(["search", "extract", str(tmp_path / "nothing"), "--point", "0", "-o", str(tmp_path / "out")], capsys)
    assert "no finished search" in err
    assert not (tmp_path / "out").exists()


def test_unknown_latency_mode_and_stray_arguments(loads, tmp_path, capsys) -> None:  # noqa: ANN001
    run = tmp_path / "run"
    assert "unknown latency mode 'fast'" in _run(["search", "--latency", "fast", "-o", str(run)], capsys)
    assert "unexpected argument 'extra'" in _run(["search", "model.pt", "extra", "-o", str(run)], capsys)
    assert "--ray-address is for the Ray executor" in _run(
        ["search", "--ray-address", "127.0.0.1:1", "-o", str(run)], capsys)
    assert loads == [] and not run.exists()


def test_checkpoint_defaults_to_the_default_model(loads, tmp_path, capsys) -> None:  # noqa: ANN001
    """`modelpress search -o RUN` loads the default model (None: all-MiniLM-L6-v2), like `compress`."""
    assert "stopped before loading" in _run(["search", "-o", str(tmp_path / "a"), "--objectives", "quality,size"], capsys)
    _run(["search", "default", "-o", str(tmp_path / "b"), "--objectives", "quality,size"], capsys)
    _run(["search", "hf:some/folder", "-o", str(tmp_path / "c"), "--objectives", "quality,size"], capsys)
    assert loads == [None, None, "hf:some/folder"]


def test_extract_still_parses_with_the_default_checkpoint(loads, tmp_path, capsys) -> None:  # noqa: ANN001
    err = _run(["search", "extract", str(tmp_path / "run"), "--max-latency", "5", "-o", str(tmp_path / "out")], capsys)
    assert "no finished search" in err and loads == []  # extraction, not a search of a checkpoint "extract"
    assert "extract needs the run folder and -o" in _run(["search", "extract", "-o", str(tmp_path / "out")], capsys)
    assert not (tmp_path / "out").exists()


def test_extract_refuses_an_existing_output_before_any_work(loads, tmp_path, capsys) -> None:  # noqa: ANN001
    out = tmp_path / "out"
    out.mkdir()
    (out / "theirs.txt").write_text("kept")
    err = _run(["search", "extract", str(tmp_path / "run"), "--point", "0", "-o", str(out)], capsys)
    assert f"output {out} already exists" in err and "--overwrite" in err
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]


def _closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_ray_address_fails_in_seconds(loads, tmp_path, capsys) -> None:  # noqa: ANN001
    """Nothing listening at --ray-address: one line before any work (no model loaded, no run folder),
    not minutes of Ray retries."""
    pytest.importorskip("ray", reason="the Ray executor needs the ray extra")
    run = tmp_path / "run"
    t0 = time.monotonic()
    for address in (f"127.0.0.1:{_closed_port()}", f"ray://127.0.0.1:{_closed_port()}"):
        err = _run(["search", "--executor", "ray", "--ray-address", address, "-o", str(run)], capsys)
        assert f"no Ray cluster answers at {address}" in err and "--executor local" in err
        assert len(err.strip().splitlines()) == 2  # the problem and the hint
    assert "is not HOST:PORT" in _run(["search", "--executor", "ray", "--ray-address", "host:port", "-o", str(run)],
                                      capsys)
    assert time.monotonic() - t0 < 15
    assert loads == [] and not run.exists()


@pytest.mark.parametrize(("address", "endpoint"), [
    ("10.0.0.5:6380", ("10.0.0.5", 6380)),
    ("ray://head.example:10002", ("head.example", 10002)),
    ("ray://head.example", ("head.example", 10001)),
    ("head.example", ("head.example", 6379)),
    ("[::1]:7000", ("::1", 7000)),
])
def test_ray_addresses_name_a_host_and_port(address: str, endpoint: tuple[str, int]) -> None:
    from modelpress.search.executors import ray_endpoint

    assert ray_endpoint(address) == endpoint


def test_run_search_checks_the_ray_address_before_any_work(tmp_path) -> None:  # noqa: ANN001
    """The Python API refuses a dead address too, before it looks at the model or writes anything."""
    pytest.importorskip("ray", reason="the Ray executor needs the ray extra")
    from modelpress.passes import Context
    from modelpress.search.run import SearchSpec, run_search

    address = f"127.0.0.1:{_closed_port()}"
    spec = SearchSpec(objectives=("quality", "size"), budget=2, batch_size=2, executor="ray", ray_address=address)
    with pytest.raises(ModelpressError, match=f"no Ray cluster answers at {address}"):
        run_search(None, Context(workdir=tmp_path / "w"), tmp_path / "run", spec)  # type: ignore[arg-type]
    assert not (tmp_path / "run").exists()


@pytest.fixture
def not_ray(monkeypatch):  # noqa: ANN001, ANN201
    """An address where something answers TCP but no Ray cluster does (ray.init fails, as after its retries)."""
    ray = pytest.importorskip("ray", reason="the Ray executor needs the ray extra")

    def refuse(*_a, **_kw):  # noqa: ANN002, ANN003, ANN202
        raise ConnectionError("Failed to connect to Ray cluster")

    monkeypatch.setattr(ray, "init", refuse)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield f"127.0.0.1:{server.getsockname()[1]}"


def test_an_address_that_is_no_ray_cluster_fails_before_loading(not_ray, loads, tmp_path, capsys) -> None:  # noqa: ANN001
    run = tmp_path / "run"
    err = _run(["search", "--executor", "ray", "--ray-address", not_ray, "-o", str(run)], capsys)
    assert f"cannot reach the Ray cluster {not_ray}" in err
    assert loads == [] and not run.exists()


def test_run_search_connects_before_writing_anything(not_ray, vit_graph, vit_data, tmp_path) -> None:  # noqa: ANN001
    from modelpress.data.tasks import ClassificationTask
    from modelpress.passes import Context
    from modelpress.search.run import SearchSpec, run_search

    ctx = Context(workdir=tmp_path / "w", task=ClassificationTask(), data=vit_data, reference=vit_graph, seed=0)
    spec = SearchSpec(objectives=("quality", "size"), budget=2, batch_size=2, executor="ray", ray_address=not_ray)
    with pytest.raises(ModelpressError, match="cannot reach the Ray cluster"):
        run_search(vit_graph, ctx, tmp_path / "run", spec)
    assert not (tmp_path / "run").exists()

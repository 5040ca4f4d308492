"""The agent serves TLS when given a certificate, and its command line refuses bad options in one line."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from modelpress.bench import get_target, measure
from modelpress.errors import ModelpressError
from tests.agent.conftest import FAST


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a certificate")
def test_tls_with_a_self_signed_certificate(fresh_agent, mlp_files, tmp_path, monkeypatch):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    agent = fresh_agent(1, "--certfile", str(cert), "--keyfile", str(key))
    files, spec = mlp_files
    target = get_target(f"remote:https://127.0.0.1:{agent.port}")
    with pytest.raises(ModelpressError, match="TLS with the device"):  # its certificate is not trusted yet
        measure({"narrow": files["narrow"]}, spec, target, batch_sizes=[1], **FAST)
    monkeypatch.setenv("MODELPRESS_AGENT_CA", str(cert))
    report = measure({"narrow": files["narrow"]}, spec, target, batch_sizes=[1], **FAST)
    assert report.stats("narrow", 1).median_ms > 0 and report.target["address"].startswith("https://")


@pytest.mark.parametrize("args, message", [
    (["--port", "70000"], "is not a port number"),
    (["--providers", "NoSuchExecutionProvider"], "does not offer NoSuchExecutionProvider"),
    (["--certfile", "missing.pem", "--keyfile", "missing.pem"], "TLS file not found"),
    (["--token-file", "no-such-token-file"], "cannot read the token file"),
])
def test_bad_agent_options_are_one_error_line(args, message, capsys):
    from modelpress.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["agent", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("error: ") and message in err[0]


def test_short_token_file_is_refused(tmp_path, capsys):
    from modelpress.agent.__main__ import main

    (tmp_path / "t").write_text("short")
    with pytest.raises(SystemExit) as exit_info:
        main(["--token-file", str(tmp_path / "t")])
    assert exit_info.value.code == 2 and "too short" in capsys.readouterr().err

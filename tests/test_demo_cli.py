"""``minfm demo``: the apps plugin (entry point ``apps``) adds the command without importing
gradio; the real command serves."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, stop_process
from engine_helpers import tiny
from minfm_core.cli.main import main
from minfm_core.errors import MinfmError
from ports import free_port


def test_plugin_module_imports_nothing_heavy():
    code = ("import sys, minfm_apps.plugin; heavy = [m for m in ('gradio', 'torch', 'gradio_client') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_demo_command_is_added_with_its_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("SRC", "--host", "--port", "--share", "--queue-limit", "--max-batch", "--batch-window-ms", "--no-ema"):
        assert flag in text
    assert "default: loopback only" in text


@pytest.mark.parametrize("kwargs, message", [
    ({"max_batch": 0}, "--max-batch: expected a positive integer, got 0"),
    ({"max_batch": 2**21}, "--max-batch: expected at most 1048576, got 2097152"),
    ({"queue_limit": 0}, "--queue-limit: expected a positive integer, got 0"),
    ({"queue_limit": 2.5}, "--queue-limit: expected an integer, got '2.5'"),
    ({"window_ms": -5.0}, "--batch-window-ms: expected a number >= 0.0, got -5.0"),
    ({"window_ms": float("nan")}, "--batch-window-ms: expected a finite number, got nan"),
    ({"max_steps": 10**5}, "--max-steps: expected at most 10000, got 100000"),
    ({"port": 70000}, "--port: expected at most 65535, got 70000"),
])
def test_serve_checks_its_numbers_before_loading(kwargs, message, tmp_path):
    """The Python entry point checks what the CLI's flags check as they are parsed (test_cli_numbers.py)."""
    pytest.importorskip("gradio")
    from minfm_apps.demo import serve

    with pytest.raises(MinfmError, match=re.escape(message)):
        serve(str(tmp_path / "never-opened"), **kwargs)


def test_missing_source_exits_2(capsys, tmp_path):
    pytest.importorskip("gradio")
    rc = main(["demo", str(tmp_path / "nope")])
    assert rc == 2
    assert "nope: no such file or directory" in capsys.readouterr().err


@pytest.mark.slow
def test_minfm_demo_serves_the_api_on_loopback(tmp_path):
    pytest.importorskip("gradio")
    from gradio_client import Client

    from minfm_core.engine.train import train

    train(tiny(tmp_path / "run", "train.max_steps=2"))
    port = free_port()
    # Gradio's default cache is the machine's shared <tmp>/gradio, every file of which it serves
    tmp = tmp_path / "tmp"
    other = tmp / "gradio" / "other_app" / "private.txt"
    other.parent.mkdir(parents=True)
    other.write_text("another program's file")
    env = {k: v for k, v in os.environ.items() if k != "GRADIO_TEMP_DIR"}
    proc = subprocess.Popen([sys.executable, "-m", "minfm_core.cli.main", "demo", str(tmp_path / "run"), "--port", str(port),
                             "--allowed-host", "proxy.example"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**env, "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp)})
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if f"http://127.0.0.1:{port}" in line:
                break
        assert any(f"http://127.0.0.1:{port}" in x for x in lines), "".join(lines)
        assert any("EMA weights at step 2, on cpu" in x for x in lines), "".join(lines)
        # Keep draining the child's output: a full pipe would block it (and its shutdown).
        drain = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
        drain.start()
        images, seed = Client(f"http://127.0.0.1:{port}/", verbose=False).predict(
            prompt="a red circle", negative_prompt="", size="16x16", steps=2, cfg_scale=2.0, ep_cfg=True,
            sampler="heun", seed=3, random_seed=False, num_images=1, api_name="/generate")
        assert seed == 3 and len(images) == 1
        deadline = time.monotonic() + 10  # docs/demo.md: each sampler call is logged
        while not any("sampler call 1: 1 requests, 1 images" in x for x in lines) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert any(x.startswith("minfm demo: sampler call 1: 1 requests, 1 images in ") for x in lines), "".join(lines)
        # on loopback: another Host name is refused (DNS rebinding) unless --allowed-host names it
        import urllib.error
        import urllib.request

        def status(host: str) -> int:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/", headers={"Host": host})
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    return r.status
            except urllib.error.HTTPError as exc:
                return exc.code

        assert (status("evil.example"), status("proxy.example:443"), status(f"localhost:{port}")) == (403, 200, 200)
        own = [p for p in tmp.iterdir() if p.name.startswith("minfm-demo-")]  # the server's own cache, 0700
        assert len(own) == 1 and (own[0].stat().st_mode & 0o777) == 0o700 and any(own[0].rglob("*.*"))
        served = urllib.request.Request(f"http://127.0.0.1:{port}/gradio_api/file={other}", headers={"Host": "localhost"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(served, timeout=30)
        assert refused.value.code == 403
    finally:
        stop_process(proc)
    assert not [p for p in tmp.iterdir() if p.name.startswith("minfm-demo-")]  # removed when it stopped
    assert proc.returncode == 130 and any("minfm: interrupted" in x for x in lines), "".join(lines)
    # our flag is --share; gradio's banner advised "set `share=True` in `launch()`"
    assert any("(--share opens a public link too)" in x for x in lines), "".join(lines)
    assert not any("share=True" in x for x in lines), "".join(lines)


def test_a_busy_port_is_one_line_before_the_model_loads(tmp_path, capsys):
    import socket

    pytest.importorskip("gradio")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # the source does not exist: a port check after loading would report that instead
        assert main(["demo", str(tmp_path / "no_model"), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"minfm: error: --host 127.0.0.1 --port {port}: cannot listen there (Address already in use)", err


@pytest.mark.slow
def test_any_loopback_address_is_private_and_sigterm_twice_exits_143(tmp_path):
    """--host 127.0.0.2 was warned about as public and served without the Host check; the
    server exited 0 on SIGINT and SIGTERM, and a second signal during its shutdown aborted it
    (SIGABRT, 134)."""
    pytest.importorskip("gradio")
    import signal
    import urllib.error
    import urllib.request

    from minfm_core.engine.train import train

    train(tiny(tmp_path / "run", "train.max_steps=1"))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "minfm_core.cli.main", "demo", str(tmp_path / "run"), "--host",
                             "127.0.0.2", "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(f"http://127.0.0.2:{port}" in x for x in lines):
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
        while time.monotonic() < deadline and not any("Ctrl-C stops it" in x for x in lines):
            lines.append(proc.stdout.readline())  # said once the signal handlers are set
        assert any("Ctrl-C stops it" in x for x in lines), "".join(lines)
        req = urllib.request.Request(f"http://127.0.0.2:{port}/", headers={"Host": "evil.example"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=30)
        assert refused.value.code == 403
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        lines.extend(proc.stdout)
        proc.wait(timeout=60)
    finally:
        stop_process(proc)
    out = "".join(lines)
    assert proc.returncode == 143 and "minfm: terminated (SIGTERM)" in out, (proc.returncode, out)
    assert "other machines can reach this server" not in out and "Traceback" not in out, out

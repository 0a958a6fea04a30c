"""acrn-dm's command line as ACRN's generated launch scripts write it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from devicemodel.guestkit.qemu import accepts
from tests.support.paths import ROOT


def typical_line(images) -> list[str]:
    """acrn-facts §4.3: the line ACRN's sample launch_user_vm_id1.sh runs, paths replaced."""
    return [
        "--windows", "--cpu_affinity", "0,2", "-m", "4096M",
        "--ovmf", images["ovmf"],
        "-s", "1:0,lpc", "-s", "0:0,hostbridge",
        "-s", "3,virtio-console,@stdio:stdio_port",
        "-s", "4,virtio-net,tap=WaaG,mac_seed=00:11:22:33:44:55-POST_STD_VM1",
        "-s", f"5,virtio-blk,{images['disk']}",
        "-s", "2,passthru,0/2/0",
        "--logger_setting", "console,level=4;kmsg,level=3;disk,level=5",
        "POST_STD_VM1",
    ]


def run_main(args: list[str]) -> tuple[int, str, str]:
    """``acrn-pydm <args>`` in this process: (exit status, stdout, stderr).

    SystemExit counts as an exit with its code; any other exception propagates, so a
    traceback the user would see fails the test. The root logger's handlers are put back
    afterwards (a launch installs its own, writing to the captured stderr).
    """
    import contextlib
    import io
    import logging

    from devicemodel.cli import main

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(list(args))
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
                h.close()
        for h in handlers:
            if h not in root.handlers:
                root.addHandler(h)
        root.setLevel(level)
    return rc, out.getvalue(), err.getvalue()


def one_error_line(rc: int, err: str) -> str:
    """The single stderr line of a refused command (asserts there is exactly one)."""
    lines = err.splitlines()
    assert rc != 0 and len(lines) == 1, (rc, err)
    return lines[0]


def start_listening(args: list[str], sock: Path, timeout: float = 15.0) -> subprocess.Popen[bytes]:
    """``python -m devicemodel <args>`` in a child of this checkout, returned once ``sock``
    accepts a connection (the file appears at bind(), before listen(): only a connect
    proves it serves). A child that exits or never listens fails the test with its stderr."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "devicemodel", *args], cwd=ROOT, env=env,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while not accepts(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{' '.join(args[:2])} did not start listening on "
                                 f"{sock}: {proc.communicate()[1]!r}")
        time.sleep(0.02)
    return proc

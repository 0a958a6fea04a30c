"""The quick benches still run end to end (tiny sizes; the figures are not checked here:
benchmarks are benchmarks, not timed tests). The guest benches (vhost_blk, ahci_blk,
vfio_user_blk) need a QEMU guest for minutes and are run by hand."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from devicemodel.hsm.kvm import kvm_usable

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _run(*args: str, timeout: float = 240) -> str:
    env = dict(os.environ, PYTHONPATH=str(BENCH.parent))
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_virtio_blk_bench(tmp_path: Path) -> None:
    out = _run(str(BENCH / "virtio_blk.py"), "--image", str(tmp_path / "img"),
               "--size", str(64 << 20), "--seq-requests", "256", "--rand-requests", "512",
               "--rounds", "1")
    assert "sequential 128 KiB" in out and "random 4 KiB" in out and "ratio" in out
    assert "per 4 KiB request: device-model CPU" in out


def test_ioreq_bench_on_the_fake_acrn_hsm() -> None:
    out = _run(str(BENCH / "ioreq.py"), "--backend", "acrn-fake", "--requests", "300",
               "--rounds", "1")
    assert "server's added cost" in out


@pytest.mark.skipif(kvm_usable() is not None, reason="needs /dev/kvm")
def test_exit_roundtrip_bench() -> None:
    out = _run(str(BENCH / "exit_roundtrip.py"), "--exits", "200", "--rounds", "1")
    assert out.count("ratio path/bare") == 2


def test_vhost_dataplane_bench() -> None:
    out = _run(str(BENCH / "vhost_dataplane.py"), "--requests", "200", "--reps", "1")
    assert "4 KiB read" in out and "1 MiB read" in out and "wall ours" in out


def test_a_silent_guest_is_killed_with_what_the_back_ends_were_doing(monkeypatch) -> None:
    """The guest benches' watchdog: a guest that prints nothing gets QEMU killed in
    bounded time, and the reason lists every thread of each back end (name, state, wait
    channel), so a stall seen once can be told apart (waiting for a kick, blocked in a
    write) without reproducing it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("vhost_blk_bench", BENCH / "vhost_blk.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # (its dataclasses look it up)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "SILENCE_SECONDS", 1)
    guest = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                             stdout=subprocess.PIPE)
    backend = subprocess.Popen([sys.executable, "-c", "import threading, time; "
                                "threading.Thread(target=time.sleep, args=(60,)).start(); "
                                "time.sleep(60)"])
    try:
        run = bench.follow_guest(guest, {"vda": backend.pid}, 60)
        assert guest.poll() is not None, "the silent guest was not killed"
        assert "printed nothing for 1 s" in run.stalled
        assert f"vda (pid {backend.pid}):" in run.stalled
        threads = [ln for ln in run.stalled.splitlines() if ln.startswith("  ")
                   and ln.split()[0].isdigit()]
        assert len(threads) >= 2 and all(ln.split()[2] == "S" for ln in threads), run.stalled
    finally:
        backend.kill()
        backend.wait()
        guest.kill()
        guest.wait()

"""The adversarial guest suite on KVM: a real guest program attacks our virtio devices.

devicemodel/guestkit/programs/adversarial.c runs inside a KVM guest, with virtio-blk (legacy and
modern), virtio-rnd (modern) and virtio-console (legacy) on bus 0. It breaks the driver
"MUST"s of the virtio spec one at a time and prints one line per case on COM1,
``case <device>/<case> <verdict> [code]``. This side boots it, parses those lines into
the same verdict table as adversarial.py (the sim-guest suite), and adds what only
the host can see: no handler raised (IoreqServer ``handler_error``), no device worker
crashed, the VM stopped through the guest's own debugexit (not a timeout or a crash),
the disk images are untouched (the guest only reads), and the console port received
exactly the writes the guest saw completed, none of the refused ones.

``python -m tests.support.adversarial_kvm`` prints the table; tests/guest/
test_adversarial_kvm.py runs
it under pytest.
"""

from __future__ import annotations

import logging
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

from devicemodel.guestkit.kvm_programs import (
    VERDICT_PASS,
    GuestRun,
    build,
    kvm_skip_reason,
    run_guest,
)
from tests.support.adversarial import FAIL, PASS, REJECT, WEDGED, Result, device_name, table

SECTOR = 512
SECTORS = 64
HOST_SECTOR = 2

# the guest's device names -> PCI slot (the guest program hard-codes the same plan)
DEVICES = {"blk-legacy": 4, "rnd-modern": 5, "console-legacy": 6, "blk-modern": 7}
MODERN = ("rnd-modern", "blk-modern")
BLK = ("blk-legacy", "blk-modern")
ALL = tuple(DEVICES)

# (guest case name, what it does, devices it runs on): the guest's cases[] in order
CASES: list[tuple[str, str, tuple[str, ...]]] = [
    ("avail_idx_jump", "avail.idx jumps size + 5 ahead", ALL),
    ("head_index_oob", "head index >= queue size", ALL),
    ("descriptor_loop", "descriptor chain loops back to its head", ALL),
    ("chain_wraps_queue", "direct chain longer than the queue (next wraps)", ALL),
    ("indirect_oversized", "indirect table of 1025 descriptors", ALL),
    ("nested_indirect", "indirect descriptor inside an indirect table", ALL),
    ("indirect_not_negotiated", "indirect descriptor without INDIRECT_DESC", ALL),
    ("readable_after_writable", "readable descriptor after a writable one", ALL),
    ("buffer_outside_ram", "buffer address outside guest RAM", ALL),
    ("buffer_in_pci_hole", "buffer address on the LAPIC in the PCI hole", ALL),
    ("buffer_wraps_2^64", "buffer that wraps around 2^64", ALL),
    ("rings_outside_ram", "ring addresses outside guest RAM", ALL),
    ("readonly_config_write", "write to read-only device config", ALL),
    ("features_written_late", "features written after FEATURES_OK / DRIVER_OK", ALL),
    ("features_not_offered", "features the device did not offer", MODERN),
    ("driver_ok_without_features_ok", "DRIVER_OK without FEATURES_OK", MODERN),
    ("notify_disabled_queue", "notify of queues that are not enabled", ALL),
    ("notify_bad_queue_index", "notify of out-of-range queue indices", ALL),
    ("msix_vector_out_of_range", "MSI-X vector out of range for queue and config", ALL),
    ("msix_table_garbage", "MSI-X table entries of garbage, then I/O", ALL),
    ("status_isr_garbage", "status and ISR written with garbage", ALL),
    ("queue_select_out_of_range", "queue_select 0xffff, then queue registers", ALL),
    ("queue_rewritten_while_enabled", "queue registers rewritten while enabled", ALL),
    ("blk_beyond_disk", "blk: read beyond the end of the disk", BLK),
    ("blk_no_status_byte", "blk: request without a status byte", BLK),
]
DESCRIPTION = {name: text for name, text, _ in CASES}
EXPECTED = [(dev, name) for name, _, devs in CASES for dev in ALL if dev in devs]

CASE_LINE = re.compile(r"^case ([\w-]+)/(\S+) (PASS|REJECT|WEDGED|FAIL)(?: 0x([0-9a-f]+))?$",
                       re.MULTILINE)
CONSOLE_LINES = re.compile(r"^console lines ([0-9a-f]{8})$", re.MULTILINE)


def explain(code: int) -> str:
    """The guest's detail code in words (programs/adversarial.c sets them)."""
    if code & 0x80:
        other = list(DEVICES)[(code >> 4) & 7]
        return f"{other} stopped working ({explain(0x30 | code & 0xF)})"
    words = {0x20: "reset never drained", 0x21: "bad queue size", 0x22: "no VERSION_1",
             0x23: "FEATURES_OK refused", 0x24: "DRIVER_OK not kept",
             0x2F: "stopped working in an earlier case", 0x30: "no queue set up",
             0x31: "request not completed, NEEDS_RESET", 0x32: "request not completed",
             0x33: "bad used length or status", 0x34: "wrong sector data",
             0x35: "bad rnd length", 0x40: "a malformed chain was completed",
             0x41: "rings outside RAM accepted", 0x42: "read-only config changed",
             0x43: "features changed after FEATURES_OK",
             0x44: "features changed after DRIVER_OK", 0x45: "unoffered features kept",
             0x46: "DRIVER_OK accepted without FEATURES_OK",
             0x47: "out-of-range vector kept", 0x48: "queue 0xffff has a size",
             0x49: "queue setup failed after queue_select 0xffff",
             0x4A: "request neither done nor refused", 0x4B: "read beyond the disk not IOERR"}
    return words.get(code, f"code {code:#x}")


@dataclass
class KvmSuite:
    """One boot of the adversarial guest and everything the host checked around it."""

    results: list[Result]
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    serial: str = ""


def parse(text: str, names: dict[str, str] | None = None) -> tuple[list[Result], list[str]]:
    """The guest's case lines as table rows, and what is wrong with the set: a missing,
    unexpected or repeated case is a problem (a crash mid-run shows up as missing)."""
    names = names or {}
    results: list[Result] = []
    problems: list[str] = []
    seen: set[tuple[str, str]] = set()
    for m in CASE_LINE.finditer(text):
        dev, name, verdict, code = m.groups()
        key = (dev, name)
        if key in seen:
            problems.append(f"case {dev}/{name} reported twice")
        seen.add(key)
        if key not in EXPECTED:
            problems.append(f"unexpected case {dev}/{name}")
        detail = explain(int(code, 16)) if code else ""
        results.append(Result(DESCRIPTION.get(name, name), DEVICES.get(dev, -1),
                              names.get(dev, dev), verdict, detail))
    for r in results:
        if r.verdict in (WEDGED, FAIL):
            problems.append(f"{r.case} / {r.device}: {r.verdict} {r.detail}")
    for dev, name in EXPECTED:
        if (dev, name) not in seen:
            problems.append(f"case {dev}/{name} missing from the guest's output")
    return results, problems


def make_disk(path: Path) -> bytes:
    data = bytearray(b"\xee" * (SECTOR * SECTORS))
    data[HOST_SECTOR * SECTOR:(HOST_SECTOR + 1) * SECTOR] = bytes(
        (i * 7 + HOST_SECTOR) & 0xFF for i in range(SECTOR))
    path.write_bytes(data)
    return bytes(data)


def slots(directory: Path) -> tuple[str, ...]:
    d = directory
    return ("0:0,hostbridge",
            f"{DEVICES['blk-legacy']}:0,virtio-blk,{d / 'legacy.img'}",
            f"{DEVICES['rnd-modern']}:0,virtio-rnd,modern",
            f"{DEVICES['console-legacy']}:0,virtio-console,@file:con0={d / 'console.out'}",
            f"{DEVICES['blk-modern']}:0,virtio-blk,modern,{d / 'modern.img'}")


class Watch(logging.Handler):
    """Everything the run logged at ERROR or above, and every reason a device stopped:
    a worker that raised is turned into NEEDS_RESET with an "internal error" reason,
    which the next reset wipes, so it is recorded as it happens."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.errors: list[str] = []
        self.failures: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.errors.append(f"{record.name}: {record.getMessage()}")

    def attach(self, run: GuestRun) -> None:
        assert run.vm.pci is not None
        for slot in DEVICES.values():
            dev = run.vm.pci.get(0, slot, 0).device
            fail = dev._fail

            def record(s, reason: str, fail=fail) -> None:  # type: ignore[no-untyped-def]
                self.failures.append(reason)
                fail(s, reason)

            dev._fail = record


def host_checks(run: GuestRun, watch: Watch, directory: Path,
                images: dict[str, bytes]) -> list[str]:
    """What the host sees after the guest stopped."""
    problems: list[str] = []
    text = run.uart.text
    if run.verdict is None:
        problems.append(f"the guest did not finish (stop reason {run.exit_reason!r}); "
                        f"last output: {text[-300:]!r}")
    elif run.verdict != VERDICT_PASS:
        problems.append(f"the guest's verdict is {run.verdict:#x}")
    problems += [f"a device worker crashed: {f}" for f in watch.failures
                 if f.startswith("internal error")]
    problems += [f"error logged: {e}" for e in watch.errors]
    server = run.vm.server
    errors = server.stats["handler_error"] if server is not None else 0
    if errors:
        problems.append(f"{errors} request handler(s) raised (see the log)")
    for name, before in images.items():
        if (directory / name).read_bytes() != before:
            problems.append(f"{name} changed: the guest only reads")
    m = CONSOLE_LINES.search(text)
    lines = (directory / "console.out").read_bytes().splitlines()
    if m is None:
        problems.append("the guest printed no console count")
    elif len(lines) != int(m.group(1), 16):
        problems.append(f"console port got {len(lines)} lines, the guest completed "
                        f"{int(m.group(1), 16)}")
    markers = [int(x[4:], 16) if re.fullmatch(rb"adv [0-9a-f]{8}", x) else -1 for x in lines]
    if any(x < 0 for x in markers) or markers != sorted(set(markers)):
        problems.append("console port got lines the guest did not write in order")
    return problems


async def run_kvm_suite(directory: Path, *, timeout: float = 60.0) -> KvmSuite:
    """Build and boot the guest, serve it until it is done, check everything."""
    _, image = build("adversarial", directory / "build")
    images = {name: make_disk(directory / name) for name in ("legacy.img", "modern.img")}
    watch = Watch()
    top = logging.getLogger("devicemodel")
    top.addHandler(watch)
    start = time.monotonic()
    try:
        run = await run_guest(image, slots=slots(directory), setup=watch.attach,
                              timeout=timeout)
    finally:
        top.removeHandler(watch)
    seconds = time.monotonic() - start
    assert run.vm.pci is not None
    names = {dev: device_name(run.vm, slot) for dev, slot in DEVICES.items()}
    results, problems = parse(run.uart.text, names)
    problems += host_checks(run, watch, directory, images)
    return KvmSuite(results, problems, seconds, run.uart.text)


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.support.adversarial_kvm``: the verdict table, then any problem."""
    logging.basicConfig(level=logging.ERROR)
    why = kvm_skip_reason()
    if why:
        print(f"no usable KVM: {why}")
        return 77
    with tempfile.TemporaryDirectory(prefix="acrn-adversarial-kvm-") as d:
        suite = trio.run(run_kvm_suite, Path(d))
    if suite.results:
        print(table(suite.results))
    print(f"guest ran {suite.seconds:.1f} s")
    for p in suite.problems:
        print("PROBLEM:", p)
    return 1 if suite.problems else 0


__all__ = ["CASES", "EXPECTED", "FAIL", "PASS", "REJECT", "WEDGED", "KvmSuite", "main",
           "parse", "run_kvm_suite"]

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

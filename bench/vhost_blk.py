"""vhost-user-blk: acrn-pydm's back end against qemu-storage-daemon's, in one Linux guest.

    python bench/vhost_blk.py [--reps 5] [--seconds 2]

Both back ends serve the same 512 MiB raw image (page-cached: qemu-storage-daemon with
``cache.direct=off``, ours in writeback mode), as /dev/vda (ours) and /dev/vdb (qemu's)
of one QEMU TCG guest (-smp 1, stock Debian cloud kernel). Inside the guest a small
static C program, built here with gcc, runs every measurement with O_DIRECT: 1 MiB
sequential reads and writes over the whole disk, 4 KiB random reads with 1 and with 8
threads. Tests alternate between the two disks, repetition after repetition, so both
see the same machine noise; we print medians, ratios (ours / qemu's) and each back
end's CPU time per request, read from /proc/PID/stat around every test.

Every wait is bounded: a guest (or QEMU, or a back end) that stalls, printing nothing for
two minutes, or a run over its time budget, ends the run with an error line naming the
test it was in, instead of leaving the bench silent.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from devicemodel.guestkit import qemu as g  # noqa: E402
from devicemodel.guestkit import trixie  # noqa: E402

IMAGE_SIZE = 512 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")
TESTS = ("seqread", "seqwrite", "rand1", "rand8")

VBENCH_C = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <linux/fs.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}
static const char *dev; static uint64_t size; static double seconds;
static volatile int stop;

static void *randread(void *arg) {
    long *count = arg; int fd = open(dev, O_RDONLY | O_DIRECT); void *buf;
    if (fd < 0 || posix_memalign(&buf, 4096, 4096)) { perror("open"); exit(1); }
    uint64_t x = 88172645463325252ULL ^ (uint64_t)(uintptr_t)arg;
    uint64_t blocks = size / 4096;
    while (!stop) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        if (pread(fd, buf, 4096, (off_t)(x % blocks) * 4096) != 4096) { perror("pread"); exit(1); }
        (*count)++;
    }
    close(fd); return NULL;
}

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: vbench seqread|seqwrite|randN DEV [S]\n"); return 2; }
    dev = argv[2]; seconds = argc > 3 ? atof(argv[3]) : 2.0;
    int fd = open(dev, O_RDWR | O_DIRECT);
    if (fd < 0 || ioctl(fd, BLKGETSIZE64, &size)) { perror(dev); return 1; }
    if (!strncmp(argv[1], "seq", 3)) {
        int wr = !strcmp(argv[1], "seqwrite"); void *buf; long n = 0; double t0 = now();
        if (posix_memalign(&buf, 4096, 1 << 20)) return 1;
        memset(buf, 0x5a, 1 << 20);
        do {  /* whole-disk passes until `seconds` have elapsed */
            for (uint64_t off = 0; off + (1 << 20) <= size; off += 1 << 20, n++) {
                ssize_t r = wr ? pwrite(fd, buf, 1 << 20, off) : pread(fd, buf, 1 << 20, off);
                if (r != 1 << 20) { perror("io"); return 1; }
            }
        } while (now() - t0 < seconds);
        double t = now() - t0;
        printf("VBENCH %s %.1f MB/s %ld requests %.3f s\n", argv[1], n * 1.048576 / t, n, t);
        return 0;
    }
    int threads = atoi(argv[1] + 4); if (threads < 1) threads = 1;
    pthread_t th[64]; long counts[64] = {0};
    double t0 = now();
    for (int i = 0; i < threads; i++) pthread_create(&th[i], NULL, randread, &counts[i]);
    while (now() - t0 < seconds) usleep(10000);
    stop = 1;
    long n = 0;
    for (int i = 0; i < threads; i++) { pthread_join(th[i], NULL); n += counts[i]; }
    double t = now() - t0;
    printf("VBENCH %s %.0f IOPS %ld requests %.3f s\n", argv[1], n / t, n, t);
    return 0;
}
"""


def build_vbench(work: Path) -> Path:
    src, exe = work / "vbench.c", work / "vbench"
    src.write_text(VBENCH_C)
    subprocess.run(["gcc", "-O2", "-static", "-pthread", "-o", str(exe), str(src)], check=True)
    return exe


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process (all its threads), in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


#: the guest's block-queue limits printed with the results: they decide how Linux splits
#: a 1 MiB O_DIRECT request (max_segments 254 × 1 MiB: often one virtio request; 126 × 4 KiB,
#: ours and qemu-storage-daemon's: three)
QUEUE_LIMITS = ("max_segments", "max_segment_size", "max_sectors_kb")


def guest_script(reps: int, seconds: float, tests: tuple[str, ...] = TESTS) -> str:
    lines = ["echo 1 > /proc/sys/vm/drop_caches"]
    for dev in ("vda", "vdb"):
        vals = " ".join(f"$(cat /sys/block/{dev}/queue/{k})" for k in QUEUE_LIMITS)
        lines.append(f"info limits {dev} {vals}")
    # warm-up: one pass of each test on each disk, not measured
    for dev in ("vda", "vdb"):
        lines.append(f"/vbench seqread /dev/{dev} 0.5 >/dev/null")
    for r in range(reps):
        for test in tests:
            for dev in ("vda", "vdb") if r % 2 == 0 else ("vdb", "vda"):
                tag = f"{dev} {test} {r}"
                lines += [f"info begin {tag}", f"/vbench {test} /dev/{dev} {seconds}",
                          f"info end {tag}"]
    lines.append("pass bench")
    return "\n".join(lines) + "\n"


#: the guest's boot and warm-up, and the longest silence a running test may keep (each
#: test prints a line at its start and end, every few seconds)
BOOT_SECONDS = 180
SILENCE_SECONDS = 120


def thread_report(name: str, pid: int) -> str:
    """Every thread of back end ``pid``: its name, state and kernel wait channel, then
    py-spy's Python stacks when py-spy is installed: what a stalled run needs to say
    whether the back end was waiting for a kick, blocked in a write, or spinning. Ours is
    also asked (SIGUSR2) to log its rings' indices, which its log then shows."""
    lines = [f"{name} (pid {pid}):"]
    try:
        tids = sorted(os.listdir(f"/proc/{pid}/task"), key=int)
        if b"devicemodel" in Path(f"/proc/{pid}/cmdline").read_bytes():
            os.kill(pid, signal.SIGUSR2)  # ours: its log gets every ring's indices
            time.sleep(0.5)
    except OSError as e:
        return f"{name} (pid {pid}): gone ({e.strerror})"
    for tid in tids:
        try:
            comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            state = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            wchan = Path(f"/proc/{pid}/task/{tid}/wchan").read_text().strip() or "-"
        except OSError:
            continue  # the thread ended meanwhile
        lines.append(f"  {tid:>7} {comm:<16} {state} {wchan}")
    if shutil.which("py-spy"):
        try:
            dump = subprocess.run(["py-spy", "dump", "--pid", str(pid)], capture_output=True,
                                  text=True, timeout=30)
            lines.append(dump.stdout.strip() or dump.stderr.strip())
        except (OSError, subprocess.TimeoutExpired) as e:
            lines.append(f"  py-spy dump failed: {e}")
    return "\n".join(lines)


class Watchdog:
    """Kills QEMU when the guest stalls (no output for ``silence`` s) or the run exceeds
    ``budget`` s, and says which: the bench's waits are bounded, a stall is an error.
    ``diagnose`` (on a stall, before the kill) returns what the back ends were doing."""

    def __init__(self, proc: subprocess.Popen[bytes], budget: float, silence: float,
                 where, diagnose=None) -> None:
        self.reason = ""
        self._diagnose = diagnose
        self._proc = proc
        self._deadline = time.monotonic() + budget
        self._budget = budget
        self._silence = silence
        self._where = where
        self._last = time.monotonic()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def heard(self) -> None:
        self._last = time.monotonic()

    def stop(self) -> None:
        self._done.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._done.wait(1.0) and self._proc.poll() is None:
            now = time.monotonic()
            doing = " ".join(self._where()) or "booting"
            if now - self._last > self._silence:
                self.reason = (f"the guest printed nothing for {self._silence:.0f} s "
                               f"(during: {doing})")
                if self._diagnose is not None:
                    self.reason += "; the back ends then:\n" + self._diagnose()
            elif now > self._deadline:
                self.reason = f"the run exceeded its {self._budget:.0f} s budget (at: {doing})"
            if self.reason:
                self._proc.kill()
                return


@dataclass
class GuestRun:
    """What the benchmark guest printed: its lines, each device's CPU ticks at every
    (edge, device, test, rep) mark, each (device, test, rep)'s (rate, requests), and why
    the watchdog killed QEMU ("" when it did not)."""
    log: list[str]
    marks: dict[tuple[str, str, str, int], int]
    results: dict[tuple[str, str, int], tuple[float, int]]
    stalled: str
    limits: dict[str, list[str]]

    def failed(self, bench: str, backend_log: str) -> bool:
        """Say on stderr why the guest did not finish (QEMU killed by the watchdog, or
        the benchmark not completed), with the guest's last lines and our back end's log."""
        if self.stalled:
            why = f"{self.stalled}; QEMU was killed"
        elif f"{g.MARK} PASS bench" not in "\n".join(self.log):
            why = "the guest did not finish the benchmark"
        else:
            return False
        print("\n".join(self.log[-60:]), file=sys.stderr)
        print(f"{bench}: {why}. Our back end's log:\n{backend_log[-3000:]}", file=sys.stderr)
        return True


def follow_guest(proc: subprocess.Popen[bytes], pids: dict[str, int],
                 budget: float) -> GuestRun:
    """Read QEMU's console until it exits, sampling the back ends' CPU at the guest's
    begin/end marks; every wait is bounded by a Watchdog (silence or ``budget``)."""
    run = GuestRun([], {}, {}, "", {})
    current: list[str] = []
    assert proc.stdout is not None
    watchdog = Watchdog(proc, budget, SILENCE_SECONDS, lambda: current,
                        lambda: "\n".join(thread_report(d, p) for d, p in pids.items()))
    try:
        for raw in iter(proc.stdout.readline, b""):
            watchdog.heard()
            line = raw.decode(errors="replace").strip()
            run.log.append(line)
            if f"{g.MARK} INFO limits " in line:
                dev, *vals = line.partition(" INFO limits ")[2].split()
                run.limits[dev] = vals
            elif f"{g.MARK} INFO begin " in line or f"{g.MARK} INFO end " in line:
                _, _, rest = line.partition(" INFO ")
                edge, dev, test, rep = rest.split()
                run.marks[(edge, dev, test, int(rep))] = cpu_ticks(pids[dev])
                current[:] = [dev, test, rep]
            elif line.startswith("VBENCH ") and current:
                parts = line.split()
                run.results[(current[0], current[1], int(current[2]))] = (float(parts[2]),
                                                                        int(parts[4]))
        proc.wait()
    finally:
        watchdog.stop()
    run.stalled = watchdog.reason
    return run


def start_qsd(image: Path, sock: Path) -> subprocess.Popen[bytes]:
    cmd = ["qemu-storage-daemon",
           "--blockdev", f"driver=file,node-name=file0,filename={image},cache.direct=off",
           "--blockdev", "driver=raw,node-name=disk0,file=file0",
           "--export", f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
                       f"addr.path={sock},writable=on,num-queues=1"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("qemu-storage-daemon did not start")
        time.sleep(0.02)
    return proc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=2.0, help="length of each test")
    ap.add_argument("--tests", default=",".join(TESTS),
                    help=f"comma-separated subset of {','.join(TESTS)}")
    args = ap.parse_args()
    tests = tuple(t for t in args.tests.split(",") if t)
    if not tests or set(tests) - set(TESTS):
        print(f"vhost_blk: --tests takes a comma-separated subset of {','.join(TESTS)}",
              file=sys.stderr)
        return 2
    for tool in ("gcc", "qemu-storage-daemon", "qemu-system-x86_64"):
        if shutil.which(tool) is None:
            print(f"vhost_blk: {tool} is not installed", file=sys.stderr)
            return 2
    kernel = g.fetch_kernel()
    with tempfile.TemporaryDirectory(prefix="vhost-blk-bench-") as d:
        work = Path(d)
        exe = build_vbench(work)
        initrd = g.build_initramfs(kernel, guest_script(args.reps, args.seconds, tests),
                                   work / "initrd.gz", files={"/vbench": exe})
        image = work / "disk.img"
        with open(image, "wb") as f:  # real data, so reads come from cached pages
            block = os.urandom(1 << 20)
            for _ in range(IMAGE_SIZE >> 20):
                f.write(block)
        ours = g.start_backend(f"virtio-blk,{image},writeback", work / "ours.sock")
        qsd = start_qsd(image, work / "qsd.sock")
        pids = {"vda": ours.proc.pid, "vdb": qsd.pid}
        try:
            devices = (g.vhost_device_args("ours", "blk", ours.socket)
                       + g.vhost_device_args("qsd", "blk", work / "qsd.sock"))
            cmd = g.qemu_command(kernel, initrd, devices)
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT)
            budget = BOOT_SECONDS + args.reps * len(tests) * 2 * (args.seconds + 3)
            run = follow_guest(proc, pids, budget)
            log, marks, results = run.log, run.marks, run.results
            backend_log = ours.log()
            if run.failed("vhost_blk", backend_log):
                return 1
            missing = [(d, t, r) for r in range(args.reps) for t in tests for d in ("vda", "vdb")
                       if (d, t, r) not in results]
            if missing:  # a failed test must not pass silently as a missing median
                print("\n".join(ln for ln in log if "VBENCH" not in ln)[-4000:], file=sys.stderr)
                print(f"vhost_blk: no result for {missing}; our back end's log:\n"
                      f"{ours.log()[-4000:]}", file=sys.stderr)
        finally:
            g.stop_backend(ours)
            qsd.terminate()
            qsd.wait(10)
    report(results, marks, args.reps, tests)
    for dev, who in (("vda", "ours"), ("vdb", "qsd")):
        vals = run.limits.get(dev, ["?"] * len(QUEUE_LIMITS))
        print(f"guest queue limits, {who}: " + ", ".join(
            f"{k} {v}" for k, v in zip(QUEUE_LIMITS, vals, strict=False)))
    warned = [ln for ln in backend_log.splitlines() if "WARNING" in ln]
    if warned:  # e.g. a kick or interrupt the guest lost, recovered after a pause
        print("our back end warned:\n  " + "\n  ".join(warned[-10:]))
    return 0


def guest_bench_args(name: str, doc: str, default_tests: str
                     ) -> tuple[argparse.Namespace, tuple[str, ...]] | None:
    """The command line the guest benches over vfio-user share (--reps, --seconds,
    --tests), checked, and whether guests can run here; None after one error line."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--tests", default=default_tests)
    args = ap.parse_args()
    tests = tuple(t for t in args.tests.split(",") if t)
    if not tests or set(tests) - set(TESTS):
        print(f"{name}: --tests takes a subset of {','.join(TESTS)}", file=sys.stderr)
        return None
    why = g.can_run_guests() or trixie.why_not()
    if why:
        print(f"{name}: {why}", file=sys.stderr)
        return None
    return args, tests


def medians(results: dict[tuple[str, str, int], tuple[float, int]],
            marks: dict[tuple[str, str, str, int], int], reps: int, dev: str,
            test: str) -> tuple[float, float]:
    """One disk's median figure for ``test`` and its back end's median CPU µs per
    request (from the CPU ticks sampled around each repetition); NaN when none ran."""
    vals = [results[(dev, test, r)][0] for r in range(reps) if (dev, test, r) in results]
    per_req = []
    for r in range(reps):
        if (dev, test, r) in results and ("end", dev, test, r) in marks:
            ticks = marks[("end", dev, test, r)] - marks[("begin", dev, test, r)]
            per_req.append(ticks * 1e6 / CLK_TCK / max(1, results[(dev, test, r)][1]))
    return (statistics.median(vals) if vals else float("nan"),
            statistics.median(per_req) if per_req else float("nan"))


def report(results: dict[tuple[str, str, int], tuple[float, int]],
           marks: dict[tuple[str, str, str, int], int], reps: int,
           tests: tuple[str, ...] = TESTS) -> None:
    names = {"seqread": ("1 MiB O_DIRECT sequential read", "MB/s", "MiB"),
             "seqwrite": ("1 MiB O_DIRECT sequential write", "MB/s", "MiB"),
             "rand1": ("4 KiB O_DIRECT random read, 1 thread", "IOPS", "4 KiB req"),
             "rand8": ("4 KiB O_DIRECT random read, 8 threads", "IOPS", "4 KiB req")}
    print(f"vhost-user-blk in one QEMU TCG guest (-smp 1), {reps} interleaved repetitions, "
          "medians; ours = acrn-pydm, qsd = qemu-storage-daemon")
    print(f"{'test':40} {'ours':>10} {'qsd':>10} {'ratio':>6}   {'CPU µs/req ours':>15} "
          f"{'qsd':>8} {'ratio':>6}")
    for test in tests:
        med: dict[str, float] = {}
        cpu: dict[str, float] = {}
        for dev in ("vda", "vdb"):
            med[dev], cpu[dev] = medians(results, marks, reps, dev, test)
        title, unit, req = names[test]
        ratio = med["vda"] / med["vdb"] if med["vdb"] else float("nan")
        cpu_ratio = cpu["vda"] / cpu["vdb"] if cpu["vdb"] else float("nan")
        print(f"{title + ' (' + unit + ')':40} {med['vda']:10.0f} {med['vdb']:10.0f} "
              f"{ratio:6.2f}   {cpu['vda']:15.1f} {cpu['vdb']:8.1f} {cpu_ratio:6.2f}"
              f"  (per {req})")


if __name__ == "__main__":
    raise SystemExit(main())

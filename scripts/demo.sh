#!/usr/bin/env bash
# The main job, on any Debian machine (no ACRN needed): boot a real, unmodified Linux guest
# in QEMU (TCG) whose disk, network, console and entropy devices are acrn-pydm's own virtio
# devices, served to QEMU over vhost-user. Sets up what it needs first (Debian packages, a
# Debian kernel unpacked into ~/.cache/acrn-pydm, pip install -e ., and once a Debian 13
# root with QEMU 11.1 from trixie-backports, whose generic vhost-user device can present a
# console: devicemodel/guestkit/trixie.py), shows the guest's serial console and its
# virtio-console, then a summary of what the guest found, and cleans up after itself.
# Needs root (apt, debootstrap, chroot, tap, network namespace). Without that QEMU (e.g. no
# network on the first run) it runs on the host's QEMU 7.2, and the console is QEMU's
# serial port only.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    exec sudo -E "$0" "$@"
fi

APT_PACKAGES=(qemu-system-x86 busybox-static cpio kmod e2fsprogs iproute2 python3-pip
              debootstrap)
missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "demo: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
python3 -m pip install -q --disable-pip-version-check -e . 2>&1 | grep -v '^WARNING' || true

exec python3 - "$@" <<'PYTHON'
"""Start acrn-pydm's vhost-user back ends, boot the guest on them, report what it saw."""
import re
import secrets
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from devicemodel.guestkit import qemu as g
from devicemodel.guestkit import trixie

NETNS, TAP = "acrnpydm-demo", "pydmdemo0"
HOST_IP, GUEST_IP = "10.213.78.1", "10.213.78.2"  # exist only inside NETNS
HVC = "hvc0 | "  # marks the lines that came through acrn-pydm's virtio-console
SENT = "hvc0 < "  # and the line the host sent back through it
ASK = "waiting for a line from the host"
HOST_LINE = f"hello guest, this is the host ({secrets.token_hex(4)})"
END = "=== end of the guest's report ==="

# With the console, the report goes to /dev/hvc0 (so through acrn-pydm); the serial port
# keeps the kernel's messages and our /init's start and end markers.
CONSOLE = f"""
i=0
while [ ! -e /dev/hvc0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
if [ -e /dev/hvc0 ] && exec 3<>/dev/hvc0; then
  stty raw -echo <&3
  echo "=== the guest's report continues on /dev/hvc0, acrn-pydm's virtio-console ==="
  exec >&3 2>&3
  pass console-out
  name=$(cat /sys/class/virtio-ports/vport*p0/name 2>/dev/null)
  echo "=== console /dev/hvc0 (acrn-pydm virtio-console, port [$name]) ==="
  [ "$name" = con0 ] && pass console-name || fail console-name "port name is [$name]"
  echo "  guest -> host: every line marked {HVC.strip()}; host -> guest: {ASK}"
  line=""
  read -t 30 line <&3
  echo "  the guest read from hvc0: $line"
  [ "$line" = "{HOST_LINE}" ] && pass console-in || fail console-in "read [$line]"
else
  fail console "no /dev/hvc0"
fi
"""

REPORT = f"""
echo "=== the guest: $(uname -sr), $(grep -c ^processor /proc/cpuinfo) vCPU ==="
echo "=== PCI functions: slot vendor:device class driver ==="
for d in /sys/bus/pci/devices/*; do
  drv=$(basename "$(readlink $d/driver)" 2>/dev/null)
  id="$(cat $d/vendor):$(cat $d/device)"
  case $id in
    0x1af4:0x1001) what="virtio-blk     <- acrn-pydm over vhost-user";;
    0x1af4:0x1000) what="virtio-net     <- acrn-pydm over vhost-user";;
    0x1af4:0x1044) what="virtio-rng     <- acrn-pydm over vhost-user";;
    0x1af4:0x1043|0x1af4:0x1003) what="virtio-console <- acrn-pydm over vhost-user";;
    *) what="";;
  esac
  echo "  $(basename $d) $id $(cat $d/class) ${{drv:--}} $what"
done
echo "=== disk /dev/vda (acrn-pydm virtio-blk) ==="
echo "  $(($(cat /sys/block/vda/size) / 2048)) MiB"
if mke2fs -q /dev/vda >/dev/null && mount /dev/vda /mnt \\
   && echo "written by the guest" > /mnt/hello && sync && df -h /mnt | tail -1 \\
   && cat /mnt/hello && umount /mnt
then pass disk; else fail disk "mkfs/mount/write failed"; fi
echo "=== network eth0 (acrn-pydm virtio-net on tap {TAP}) ==="
ip link set eth0 up && ip addr add {GUEST_IP}/30 dev eth0
ip addr show eth0 | grep -E "link/|inet "
if ping -c 3 -W 3 {HOST_IP}; then pass network; else fail network "no reply from {HOST_IP}"; fi
echo "=== entropy /dev/hwrng ($(cat /sys/class/misc/hw_random/rng_current)) ==="
if dd if=/dev/hwrng bs=32 count=1 2>/dev/null | od -An -tx1; then pass entropy
else fail entropy "no bytes"; fi
echo "{END}"
"""


class NoTerminalCodes:
    """stdout without the firmware's terminal resets and screen clears (they would wipe the
    lines above them in a terminal)."""

    RESET = re.compile(r"(?<=[^\n])\x1bc")  # a reset mid-line also ended that line
    CODES = re.compile(r"\x1b(\[[0-9;?]*[ -/]*[@-~]|[@-Z\\-_]|[a-z])")

    def __init__(self, out):
        self.out = out

    def write(self, text: str) -> int:
        return self.out.write(self.CODES.sub("", self.RESET.sub("\n", text)))

    def flush(self) -> None:
        self.out.flush()


class ConsolePort:
    """The host end of the guest's hvc0: shows each line as it comes, answers the guest."""

    def __init__(self, path: Path) -> None:
        deadline = time.monotonic() + 10
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.lines: list[str] = []
        self.ended = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        buf = b""
        try:
            while chunk := self.sock.recv(4096):
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    self._line(line.decode(errors="replace").replace("\r", ""))
        except OSError:
            pass
        finally:
            self.ended.set()

    def _line(self, text: str) -> None:
        self.lines.append(text)
        sys.stdout.write(f"{HVC}{text}\n")
        if text.endswith(ASK):
            self.sock.sendall(HOST_LINE.encode() + b"\n")
            sys.stdout.write(f"{SENT}{HOST_LINE}\n")
        sys.stdout.flush()
        if text == END:
            self.ended.set()

    def close(self) -> str:
        self.ended.wait(5)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.thread.join(5)
        return "\n".join(self.lines)


def find_qemu() -> tuple[trixie.Qemu, str | None]:
    """QEMU 11.1 (its generic vhost-user device presents our console), else the host's."""
    why = trixie.why_not()
    if why is None:
        log = g.cache_dir() / f"{trixie.ROOT_NAME}.build.log"
        if trixie.needs_build():
            print("demo: building a Debian 13 root with QEMU 11.1 from trixie-backports for "
                  "the vhost-user console (once, about a minute; cached in ~/.cache/acrn-pydm)",
                  flush=True)
        try:
            return trixie.ensure_qemu(), None
        except Exception as e:  # no network, no mirror, ...: the demo still runs
            lines = str(e).splitlines() or [type(e).__name__]
            errors = [line for line in lines if line.startswith("E:")]  # apt's, debootstrap's
            why = f"{(errors or lines)[-1 if errors else 0][:120]} (log: {log})"
    host = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True,
                          check=False).stdout.splitlines()
    return trixie.Qemu(Path("/"), host[0] if host else "qemu-system-x86_64"), why


t0 = time.monotonic()
print("demo: fetching a Debian kernel (cached in ~/.cache/acrn-pydm)", flush=True)
kernel = g.fetch_kernel()
print(f"demo: kernel {kernel.release}", flush=True)
qemu, no_console = find_qemu()
console = no_console is None
if console:
    where = f" (chroot {qemu.root})" if qemu.chrooted else ""
    print(f"demo: {qemu.version}{where}", flush=True)
else:
    print(f"demo: the guest's console is QEMU's serial port only (the host's {qemu.version} "
          f"has no vhost-user console device, and QEMU 11.1 could not be set up: {no_console})",
          flush=True)
with qemu.workdir() as work:
    initrd = g.build_initramfs(kernel, (CONSOLE if console else "") + REPORT,
                               work / "initrd.gz")
    image = work / "disk.img"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    specs = {"blk": f"virtio-blk,{image}", "net": f"virtio-net,tap={TAP}",
             "rnd": "virtio-rnd"}
    if console:
        specs["con"] = f"virtio-console,@socket:con0={work / 'con0.sock'}:server"
    with g.netns(NETNS), g.backends(specs, work, netns={"net": NETNS}) as be:
        for b in be.values():
            print(f"demo: acrn-pydm vhost-user {b.spec} (pid {b.proc.pid}) on {b.socket}")
        subprocess.run(["ip", "-n", NETNS, "addr", "add", f"{HOST_IP}/30", "dev", TAP],
                       check=True)
        subprocess.run(["ip", "-n", NETNS, "link", "set", TAP, "up"], check=True)
        args = []
        for name in ("blk", "net", "rnd"):
            args += g.vhost_device_args(name, name, qemu.inner(be[name].socket))
        if console:
            args += trixie.console_device_args("con", qemu.inner(be["con"].socket))
        cmd = qemu.command(g.qemu_command(qemu.stage_kernel(kernel, work),
                                          qemu.inner(initrd), args, append="edd=off"))
        print("demo: " + " ".join(cmd), flush=True)
        port = ConsolePort(work / "con0.sock") if console else None
        print("demo: ---------------- guest serial console (QEMU's ttyS0) ----------------")
        if console:
            print(f"demo: '{HVC}' lines: what the guest wrote to /dev/hvc0, acrn-pydm's "
                  f"virtio-console; '{SENT}': what the host wrote back")
        sys.stdout.flush()
        sys.stdout = NoTerminalCodes(sys.stdout)
        try:
            run = g.run_qemu(cmd, timeout=100, echo=True)
        finally:
            sys.stdout = sys.stdout.out
            hvc = g.GuestRun.parse(port.close() if port else "", None, False)
        print("demo: ---------------- end of guest output ----------------")
        logs = {name: b.log() for name, b in be.items()}
print(f"\ndemo: the guest {'powered off' if run.done else 'did NOT finish'} "
      f"after {time.monotonic() - t0:.1f} s in all")
passed, failed = run.passed | hvc.passed, {**run.failed, **hvc.failed}
ok = run.done
if console:
    # console-out is only ever printed on hvc0: seeing it here means it crossed the port
    problems = [f"{n} {failed.get(n, 'no result')}"
                for n, seen in (("console-out", hvc.passed), ("console-name", passed),
                                ("console-in", passed)) if n not in seen]
    if "console" in failed:
        problems.insert(0, failed["console"])
    if problems:
        ok = False
        print(f"  console  FAILED {'; '.join(problems)}")
    else:
        print(f"  console  ok       {len(hvc.log.splitlines())} lines guest -> host on hvc0, "
              "1 line host -> guest")
else:
    print("  console  (not acrn-pydm's: QEMU's serial port, see above)")
for step in ("disk", "network", "entropy"):
    if step in passed:
        print(f"  {step:8} ok")
    else:
        ok = False
        print(f"  {step:8} FAILED {failed.get(step, '(no result)')}")
if not ok:
    for name, text in logs.items():
        print(f"--- {name} back end log ---\n{text}")
sys.exit(0 if ok else 1)
PYTHON

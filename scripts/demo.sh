#!/usr/bin/env bash
# The main job, on any Debian machine (no ACRN needed): boot a real, unmodified Linux guest
# in QEMU (TCG) whose disk, network, console and entropy devices are acrn-pydm's own virtio
# devices, served to QEMU over vhost-user. Sets up what it needs first (Debian packages, a
# Debian kernel unpacked into ~/.cache/acrn-pydm, pip install -e ., and once a Debian 13
# root with QEMU 11.1 from trixie-backports, whose generic vhost-user device can present a
# console: devicemodel/guestkit/trixie.py), shows the guest's serial console and its
# virtio-console, then a summary of what the guest found, and cleans up after itself.
# With QEMU 11.1 a second guest boots at the same time on whole PCI functions of ours
# (config space, BARs, MSI-X: acrn-pydm's own PciDevice objects) served over vfio-user.
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
    """The host end of the guest's hvc0: shows each line as it comes (unless ``echo`` is
    off), answers the guest."""

    def __init__(self, path: Path, echo: bool = True) -> None:
        self.echo = echo
        self.sock = g.connect_unix(path, 10)
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
        if self.echo:
            sys.stdout.write(f"{HVC}{text}\n")
        if text.endswith(ASK):
            self.sock.sendall(HOST_LINE.encode() + b"\n")
            if self.echo:
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


VFU_NETNS, VFU_TAP = "acrnpydm-demo-vfu", "pydmdemo1"
VFU_HOST_IP, VFU_GUEST_IP = "10.213.80.1", "10.213.80.2"
VFU_SLOTS = {"blk": 3, "net": 4, "rnd": 5, "con": 6}
VFU_REPORT = f"""
echo "=== PCI functions: slot vendor:device class driver ==="
for d in /sys/bus/pci/devices/*; do
  drv=$(basename "$(readlink $d/driver)" 2>/dev/null)
  id="$(cat $d/vendor):$(cat $d/device)"
  case $id in 0x1af4:*) what="<- acrn-pydm's whole PCI function over vfio-user";; *) what="";; esac
  echo "  $(basename $d) $id $(cat $d/class) ${{drv:--}} $what"
done
echo "=== disk /dev/vda ==="
if mke2fs -q /dev/vda >/dev/null && mount /dev/vda /mnt \\
   && echo "written by the guest" > /mnt/hello && sync && df -h /mnt | tail -1 | sed 's/^/  /' \\
   && sed 's/^/  /' /mnt/hello && umount /mnt
then pass disk; else fail disk "mkfs/mount/write failed"; fi
echo "=== network eth0 (tap {VFU_TAP}) ==="
ip link set eth0 up && ip addr add {VFU_GUEST_IP}/30 dev eth0
if ping -c 2 -W 3 {VFU_HOST_IP} > /tmp/ping; then pass network; else fail network "no reply"; fi
tail -2 /tmp/ping | sed 's/^/  /'
echo "=== entropy /dev/hwrng ==="
if dd if=/dev/hwrng bs=16 count=1 2>/dev/null | od -An -tx1; then pass entropy
else fail entropy "no bytes"; fi
echo "=== console /dev/hvc0 ==="
if [ -e /dev/hvc0 ] && exec 3<>/dev/hvc0; then
  stty raw -echo <&3
  echo "hello from the vfio-user guest, {ASK}" >&3
  line=""; read -t 30 line <&3; exec 3<&-
  echo "  read from hvc0: $line"
  [ "$line" = "{HOST_LINE}" ] && pass console || fail console "read [$line]"
else
  fail console "no /dev/hvc0"
fi
echo "=== interrupts: our MSI-X vectors as the guest counts them ==="
grep -a virtio /proc/interrupts | tr -s ' ' | sed 's/^/ /'
"""


class VfioUserLeg:
    """The second guest: acrn-pydm vfio-user servers for blk, net, rnd and console, and a
    QEMU on them, all on a thread (set-up included) while the first guest boots; what it
    would print is kept for the summary."""

    def __init__(self, qemu, kernel, work: Path) -> None:
        self.qemu, self.kernel, self.work = qemu, kernel, work / "vfio-user"
        self.notes: list[str] = []
        self.run = None
        self.logs: dict[str, str] = {}
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.thread.start()

    def _main(self) -> None:
        import contextlib
        try:
            with contextlib.ExitStack() as stack:
                self._boot(stack)
        except BaseException as e:  # reported in the summary, the first guest goes on
            self.error = e

    def _boot(self, stack) -> None:
        qemu, kernel, work = self.qemu, self.kernel, self.work
        work.mkdir()
        initrd = g.build_initramfs(kernel, VFU_REPORT, work / "initrd.gz")
        image = work / "disk.img"
        with open(image, "wb") as f:
            f.truncate(64 << 20)
        specs = {"blk": f"virtio-blk,{image},modern", "net": f"virtio-net,tap={VFU_TAP}",
                 "rnd": "virtio-rnd",
                 "con": f"virtio-console,@socket:con0={work / 'con0.sock'}:server"}
        stack.enter_context(g.netns(VFU_NETNS))
        be = stack.enter_context(
            g.backends(specs, work, netns={"net": VFU_NETNS}, command="vfio-user"))
        for b in be.values():
            self.notes.append(f"acrn-pydm vfio-user {b.spec} (pid {b.proc.pid}) on {b.socket}")
        subprocess.run(["ip", "-n", VFU_NETNS, "addr", "add", f"{VFU_HOST_IP}/30", "dev",
                        VFU_TAP], check=True)
        subprocess.run(["ip", "-n", VFU_NETNS, "link", "set", VFU_TAP, "up"], check=True)
        args = []
        for name, slot in VFU_SLOTS.items():
            args += g.vfio_user_device_args(qemu.inner(be[name].socket), addr=slot)
        cmd = qemu.command(g.qemu_command(qemu.stage_kernel(kernel, work),
                                          qemu.inner(initrd), args, append="edd=off"))
        self.notes.append(" ".join(cmd))
        port = ConsolePort(work / "con0.sock", echo=False)
        try:
            self.run = g.run_qemu(cmd, timeout=100)
        finally:
            port.close()
            self.logs = {name: b.log() for name, b in be.items()}

    def finish(self):
        self.thread.join(150)
        return self.run, self.logs


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
        leg2 = VfioUserLeg(qemu, kernel, work) if console else None
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
        run2, logs2 = leg2.finish() if leg2 else (None, {})
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
if leg2 is not None and run2 is None:
    ok = False
    print(f"  vfio-user leg FAILED: {leg2.error!r}")
if run2 is not None:
    print("\ndemo: ---- the second guest, on whole PCI functions of acrn-pydm over vfio-user "
          "(QEMU's vfio-user-pci), booted alongside ----")
    for note in leg2.notes:
        print(f"demo: {note}")
    for line in run2.log.splitlines():
        if line.startswith(("===", "  ", " ")) and g.MARK not in line:
            print(f"vfio | {line}")
    print(f"demo: the vfio-user guest {'powered off' if run2.done else 'did NOT finish'} "
          f"(both guests: {time.monotonic() - t0:.1f} s in all)")
    for step in ("disk", "network", "entropy", "console"):
        if step in run2.passed:
            print(f"  {step:8} ok       (vfio-user)")
        else:
            ok = False
            print(f"  {step:8} FAILED   (vfio-user) {run2.failed.get(step, '(no result)')}")
    logs.update({f"vfio-user {n}": t for n, t in logs2.items()})
elif leg2 is None:
    print("  (no vfio-user leg: it needs QEMU 11.1's vfio-user-pci)")
if not ok:
    for name, text in logs.items():
        print(f"--- {name} back end log ---\n{text}")
sys.exit(0 if ok else 1)
PYTHON

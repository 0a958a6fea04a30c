#!/usr/bin/env bash
# The main job, on any Debian machine (no ACRN needed): boot a real, unmodified Linux guest
# in QEMU (TCG) whose disk, network and entropy devices are acrn-pydm's own virtio devices,
# served to QEMU over vhost-user. Sets up what it needs first (Debian packages, a Debian
# kernel unpacked into ~/.cache/acrn-pydm, pip install -e .), shows the guest's console and
# a summary of what the guest found, and cleans up after itself. Needs root (apt, tap,
# network namespace).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    exec sudo -E "$0" "$@"
fi

APT_PACKAGES=(qemu-system-x86 busybox-static cpio kmod e2fsprogs iproute2 python3-pip)
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
"""Start three acrn-pydm vhost-user back ends, boot the guest, report what it saw."""
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests import guest_harness as g

NETNS, TAP = "acrnpydm-demo", "pydmdemo0"
HOST_IP, GUEST_IP = "10.213.78.1", "10.213.78.2"  # exist only inside NETNS

GUEST = f"""
echo; echo "=== the guest: $(uname -sr), $(grep -c ^processor /proc/cpuinfo) vCPU ==="
echo "=== PCI functions: slot vendor:device class driver ==="
for d in /sys/bus/pci/devices/*; do
  drv=$(basename "$(readlink $d/driver)" 2>/dev/null)
  id="$(cat $d/vendor):$(cat $d/device)"
  case $id in
    0x1af4:0x1001) what="virtio-blk   <- acrn-pydm over vhost-user";;
    0x1af4:0x1000) what="virtio-net   <- acrn-pydm over vhost-user";;
    0x1af4:0x1044) what="virtio-rng   <- acrn-pydm over vhost-user";;
    *) what="";;
  esac
  echo "  $(basename $d) $id $(cat $d/class) ${{drv:--}} $what"
done
echo "=== disk /dev/vda (acrn-pydm virtio-blk) ==="
echo "  $(($(cat /sys/block/vda/size) / 2048)) MiB"
if mke2fs -q /dev/vda >/dev/null && mount /dev/vda /mnt && echo "written by the guest" > /mnt/hello \\
   && sync && df -h /mnt | tail -1 && cat /mnt/hello && umount /mnt
then pass disk; else fail disk "mkfs/mount/write failed"; fi
echo "=== network eth0 (acrn-pydm virtio-net on tap {TAP}) ==="
ip link set eth0 up && ip addr add {GUEST_IP}/30 dev eth0
ip addr show eth0 | grep -E "link/|inet "
if ping -c 3 -W 3 {HOST_IP}; then pass network; else fail network "no reply from {HOST_IP}"; fi
echo "=== entropy /dev/hwrng ($(cat /sys/class/misc/hw_random/rng_current)) ==="
if dd if=/dev/hwrng bs=32 count=1 2>/dev/null | od -An -tx1; then pass entropy
else fail entropy "no bytes"; fi
"""

t0 = time.monotonic()
print("demo: fetching a Debian kernel (cached in ~/.cache/acrn-pydm)", flush=True)
kernel = g.fetch_kernel()
print(f"demo: kernel {kernel.release}", flush=True)
with tempfile.TemporaryDirectory(prefix="acrn-pydm-demo-") as d:
    work = Path(d)
    initrd = g.build_initramfs(kernel, GUEST, work / "initrd.gz")
    image = work / "disk.img"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    specs = {"blk": f"virtio-blk,{image}", "net": f"virtio-net,tap={TAP}",
             "rnd": "virtio-rnd"}
    with g.netns(NETNS), g.backends(specs, work, netns={"net": NETNS}) as be:
        for name, b in be.items():
            print(f"demo: acrn-pydm vhost-user {b.spec} (pid {b.proc.pid}) on {b.socket}")
        subprocess.run(["ip", "-n", NETNS, "addr", "add", f"{HOST_IP}/30", "dev", TAP],
                       check=True)
        subprocess.run(["ip", "-n", NETNS, "link", "set", TAP, "up"], check=True)
        args = []
        for name in ("blk", "net", "rnd"):
            args += g.vhost_device_args(name, name, be[name].socket)
        cmd = g.qemu_command(kernel, initrd, args)
        print("demo: " + " ".join(cmd), flush=True)
        print("demo: ---------------- guest serial console ----------------", flush=True)
        run = g.run_qemu(cmd, timeout=100, echo=True)
        print("demo: ---------------- end of guest console ----------------")
    print(f"\ndemo: the guest {'powered off' if run.done else 'did NOT finish'} "
          f"after {time.monotonic() - t0:.1f} s in all")
    print("  console  the guest's console above is QEMU's serial port: QEMU 7.2 has no\n"
          "           vhost-user console device (acrn-pydm's virtio-console over vhost-user\n"
          "           is tested with our own front end: tests/test_vhost_console.py)")
    ok = True
    for step in ("disk", "network", "entropy"):
        if step in run.passed:
            print(f"  {step:8} ok")
        else:
            ok = False
            print(f"  {step:8} FAILED {run.failed.get(step, '(no result)')}")
    if not ok or not run.done:
        for name, b in be.items():
            print(f"--- {name} back end log ---\n{b.log()}")
    sys.exit(0 if ok and run.done else 1)
PYTHON

"""An unmodified Debian kernel in QEMU (TCG) uses our virtio devices, served over vhost-user.

One boot checks every device QEMU 7.2 can attach over vhost-user (blk, net, rng): the
guest script reports each step on the serial console, the tests below read the verdicts,
and the host checks what the guest left behind (the disk image, the bytes that crossed
the tap). A failing step fails its test with the guest's whole serial log.

virtio-console: QEMU 7.2 has no vhost-user console device (its vhost-user devices are blk,
scsi, fs, gpu, input, rng, gpio, i2c, vsock and -netdev vhost-user); a Linux guest drives
our console over vhost-user under QEMU 11.1 in tests/integration/test_integration_vhost_qemu11.py.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from devicemodel.guestkit import qemu as g

pytestmark = pytest.mark.integration

NETNS = "acrnpydm-it"
TAP = "pydmtap0"
HOST_IP, GUEST_IP = "10.213.77.1", "10.213.77.2"  # a /30 that exists only inside NETNS
TCP_PORT = 5555
PATTERN_OFFSET = 48 << 20  # the raw pattern lives past the 32 MiB ext2 filesystem
PATTERN = (b"ACRN-PYDM-PATTERN-" * 60000)[: 1 << 20]
DISK_SIZE = 64 << 20

SCRIPT = f"""
# -- virtio-rng ------------------------------------------------------------------------
cat /sys/class/misc/hw_random/rng_current
if dd if=/dev/hwrng of=/tmp/rnd bs=64 count=1 2>/dev/null && [ "$(wc -c < /tmp/rnd)" = 64 ]
then info rng $(od -An -tx1 /tmp/rnd | tr -d ' \\n'); pass rng
else fail rng "could not read 64 bytes from /dev/hwrng"; fi

# -- virtio-blk: a raw pattern ----------------------------------------------------------
yes ACRN-PYDM-PATTERN- | tr -d '\\n' | head -c 1048576 > /tmp/pat
dd if=/tmp/pat of=/dev/vda bs=65536 seek={PATTERN_OFFSET // 65536} conv=fsync 2>/dev/null
sync; blockdev --flushbufs /dev/vda; echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda of=/tmp/back bs=65536 skip={PATTERN_OFFSET // 65536} count=16 iflag=direct \\
   2>/dev/null
if cmp /tmp/pat /tmp/back; then pass blk-pattern; else fail blk-pattern "read back differs"; fi

# -- virtio-blk: ext2 -------------------------------------------------------------------
if mke2fs -q -b 1024 /dev/vda 32768 && mount -t ext2 /dev/vda /mnt \\
   && cp /tmp/pat /mnt/pat && echo hello-from-the-guest > /mnt/hello && umount /mnt \\
   && mount -t ext2 -o ro /dev/vda /mnt && cmp /tmp/pat /mnt/pat && umount /mnt
then pass blk-ext2; else fail blk-ext2 "mkfs/mount/write/umount failed"; fi

# -- virtio-net -------------------------------------------------------------------------
if [ -e /sys/class/net/eth0 ]; then
  ip link set eth0 up && ip addr add {GUEST_IP}/30 dev eth0
  if ping -c 3 -W 3 {HOST_IP}; then pass net-ping; else fail net-ping "no reply"; fi
  if nc {HOST_IP} {TCP_PORT} < /tmp/pat; then pass net-tcp-send
  else fail net-tcp-send "nc failed"; fi
  if nc {HOST_IP} {TCP_PORT + 1} > /tmp/rx && cmp /tmp/rx /tmp/pat; then pass net-tcp-recv
  else fail net-tcp-recv "received file differs"; fi
else
  fail net-ping "no eth0"
fi
"""


def _ns(*cmd: str) -> list[str]:
    return ["ip", "netns", "exec", NETNS, *cmd]


TCP_PEER = f"""
import socket, sys
data = open(sys.argv[1], 'rb').read()
def listener(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(('{HOST_IP}', port)); s.listen(1); s.settimeout(90); return s
a, b = listener({TCP_PORT}), listener({TCP_PORT + 1})
c, _ = a.accept(); got = b''
while True:
    chunk = c.recv(65536)
    if not chunk: break
    got += chunk
c.close(); open(sys.argv[2], 'wb').write(got)
c, _ = b.accept(); c.sendall(data); c.close()
"""


@dataclass
class Boot:
    run: g.GuestRun
    image: Path
    received: bytes | None
    backend_logs: str


def _setup_tap() -> None:
    """The back end created the tap inside the namespace; give it the host end's address."""
    subprocess.run(["ip", "-n", NETNS, "addr", "add", f"{HOST_IP}/30", "dev", TAP], check=True)
    subprocess.run(["ip", "-n", NETNS, "link", "set", TAP, "up"], check=True)


@pytest.fixture(scope="module")
def boot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Boot]:
    why = g.can_run_guests() or (None if os.geteuid() == 0 else
                                 "needs root (a network namespace and a tap)")
    if why:
        pytest.skip(why)
    work = tmp_path_factory.mktemp("vhost-guest")
    kernel = g.fetch_kernel()
    initrd = g.build_initramfs(kernel, SCRIPT, work / "initrd.gz")
    image = work / "disk.img"
    with open(image, "wb") as f:
        f.truncate(DISK_SIZE)
    (work / "pattern").write_bytes(PATTERN)
    received = work / "received"
    # two request queues (MQ): the guest (1 vCPU) drives one, QEMU starts what it sets up
    specs = {"blk": f"virtio-blk,mq=2,{image}", "rnd": "virtio-rnd",
             "net": f"virtio-net,tap={TAP}"}
    with g.netns(NETNS), g.backends(specs, work, netns={"net": NETNS}) as be:
        _setup_tap()
        peer = subprocess.Popen(_ns(sys.executable, "-c", TCP_PEER, str(work / "pattern"),
                                    str(received)), stderr=subprocess.PIPE)
        args = []
        for name in ("blk", "rnd", "net"):
            args += g.vhost_device_args(name, name, be[name].socket, 2 if name == "blk" else 1)
        try:
            run = g.run_qemu(g.qemu_command(kernel, initrd, args), timeout=150)
        finally:
            g.reap(peer)
        logs = g.backend_logs(be)
    yield Boot(run, image, received.read_bytes() if received.exists() else None, logs)


def _check(boot: Boot, *steps: str) -> None:
    try:
        boot.run.check(*steps)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{boot.backend_logs}") from None


def test_guest_boots_and_powers_off(boot: Boot) -> None:
    assert not boot.run.timed_out and boot.run.done, boot.run.report()


def test_rng_bytes_from_hwrng(boot: Boot) -> None:
    _check(boot, "rng")
    assert "virtio_rng" in boot.run.log, boot.run.report()
    hexes = [i.split()[1] for i in boot.run.info if i.startswith("rng ")]
    assert hexes and len(bytes.fromhex(hexes[0])) == 64 and len(set(hexes[0])) > 4


def test_blk_pattern_written_read_back_and_on_the_host_image(boot: Boot) -> None:
    _check(boot, "blk-pattern")
    with open(boot.image, "rb") as f:
        f.seek(PATTERN_OFFSET)
        assert f.read(len(PATTERN)) == PATTERN


def test_blk_ext2_filesystem_is_clean(boot: Boot) -> None:
    _check(boot, "blk-ext2")
    e2fsck = shutil.which("e2fsck") or "/sbin/e2fsck"
    fsck = subprocess.run([e2fsck, "-fn", str(boot.image)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    listing = subprocess.run(["debugfs", "-R", "cat /hello", str(boot.image)],
                             capture_output=True, text=True)
    assert "hello-from-the-guest" in listing.stdout


def test_net_ping_and_tcp_both_ways_through_our_tap(boot: Boot) -> None:
    _check(boot, "net-ping", "net-tcp-send", "net-tcp-recv")
    assert boot.received is not None
    assert hashlib.sha256(boot.received).digest() == hashlib.sha256(PATTERN).digest()


"""What QEMU 7.2 cannot show: a Linux guest on our virtio-console, and virtio-net with MSI-X.

Both over vhost-user, in one boot of the same guest as test_integration_vhost.py, but
under trixie-backports' QEMU 11.1 (devicemodel/guestkit/trixie.py builds and caches a
Debian 13 root for it on a Debian 12 host):

- virtio-console: QEMU's generic ``vhost-user-test-device-pci`` with virtio-id 3 presents
  our console unchanged; its config space (max_nr_ports) comes from the back end through
  GET_CONFIG. The guest's ``virtio_console`` driver names the port from our control queue,
  writes a line to /dev/hvc0 that the host reads from the port's socket, and reads the
  line the host sends back.
- virtio-net with MSI-X: QEMU 7.2 segfaults when the guest enables MSI-X on a vhost-user
  virtio-net (so the 7.2 test runs with ``vectors=0``); here the guest uses MSI-X, pings
  the host and sends a file over TCP through our tap.
"""

from __future__ import annotations

import os
import secrets
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from devicemodel.guestkit import qemu as g
from devicemodel.guestkit import trixie
from devicemodel.vhost_user import protocol as p
from devicemodel.vhost_user.frontend import Frontend
from tests.support.console_peer import ConsolePeer

NETNS = "acrnpydm-q11"
TAP = "pydmtap11"
HOST_IP, GUEST_IP = "10.213.78.1", "10.213.78.2"  # a /30 that exists only inside NETNS
TCP_PORT = 5557
PORTS = 1  # console ports: QEMU needs the queue count (2 per port + 2 control queues)
CONSOLE_CONFIG_SIZE = 12  # cols, rows, max_nr_ports, emerg_wr (virtio 1.2 §5.3.4)
TOKEN = secrets.token_hex(8)
GUEST_LINE = f"guest-to-host-{TOKEN}"
HOST_LINE = f"host-to-guest-{TOKEN}"

SCRIPT = f"""
# -- virtio-console through vhost-user-test-device-pci ------------------------------------
for d in /sys/bus/virtio/devices/*; do
  [ "$(cat $d/device)" = 0x0003 ] && info "console $(basename $d) features $(cat $d/features)"
done
name=$(cat /sys/class/virtio-ports/vport*p0/name 2>/dev/null)
[ "$name" = con0 ] && pass con-port-name || fail con-port-name "port name is [$name]"
if [ -e /sys/class/tty/hvc0 ] && exec 3<>/dev/hvc0; then
  stty raw -echo <&3
  echo {GUEST_LINE} >&3
  line=""
  read -t 60 line <&3
  [ "$line" = {HOST_LINE} ] && pass con-in || fail con-in "read [$line]"
  exec 3<&-
else
  fail con-in "no /dev/hvc0"
fi

# -- virtio-net with MSI-X --------------------------------------------------------------
if [ -e /sys/class/net/eth0 ]; then
  ip link set eth0 up && ip addr add {GUEST_IP}/30 dev eth0
  if ping -c 3 -W 3 {HOST_IP}; then pass net-ping; else fail net-ping "no reply"; fi
  yes ACRN-PYDM-MSIX- | tr -d '\\n' | head -c 1048576 > /tmp/pat
  if nc {HOST_IP} {TCP_PORT} < /tmp/pat; then pass net-tcp-send
  else fail net-tcp-send "nc failed"; fi
  irq=$(grep -E 'virtio[0-9]+-input[.]0' /proc/interrupts)
  info "net-irq $irq"
  n=$(echo "$irq" | awk '{{print $2}}')
  case "$irq" in
    *PCI-MSI*) [ "${{n:-0}}" -gt 0 ] && pass net-msix || fail net-msix "no interrupts";;
    *) fail net-msix "rx queue not on an MSI-X vector: [$irq]";;
  esac
else
  fail net-ping "no eth0"
fi
"""

TCP_PEER = f"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('{HOST_IP}', {TCP_PORT})); s.listen(1); s.settimeout(90)
c, _ = s.accept(); got = b''
while True:
    chunk = c.recv(65536)
    if not chunk: break
    got += chunk
open(sys.argv[1], 'wb').write(got)
"""


@dataclass
class Boot:
    run: g.GuestRun
    qemu: trixie.Qemu
    host_got: bytes
    tcp_received: bytes | None
    backend_logs: str
    prepare_s: float
    boot_s: float

    def check(self, *steps: str) -> None:
        try:
            self.run.check(*steps)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.qemu.version}\n{self.backend_logs}") from None


def _console_device(name: str, sock: Path) -> list[str]:
    return ["-chardev", f"socket,id={name},path={sock}",
            "-device", f"{trixie.DEVICE},chardev={name},virtio-id=3,"
                       f"num_vqs={2 * PORTS + 2},config_size={CONSOLE_CONFIG_SIZE}"]


def _net_device(name: str, sock: Path) -> list[str]:
    # no vectors=0: the point is MSI-X
    return ["-chardev", f"socket,id={name},path={sock}",
            "-netdev", f"vhost-user,id={name}n,chardev={name}",
            "-device", f"virtio-net-pci,netdev={name}n,mac=52:54:00:12:34:57,romfile="]


@pytest.fixture(scope="module")
def boot() -> Iterator[Boot]:
    why = (g.can_run_guests() or trixie.why_not()
           or (None if os.geteuid() == 0 else "needs root (a network namespace and a tap)"))
    if why:
        pytest.skip(why)
    t0 = time.monotonic()
    qemu = trixie.ensure_qemu()
    kernel = g.fetch_kernel()
    with qemu.workdir() as work:
        g.build_initramfs(kernel, SCRIPT, work / "initrd.gz")
        shutil.copy2(kernel.vmlinuz, work / "vmlinuz")
        inner_kernel = g.Kernel(kernel.release, qemu.inner(work / "vmlinuz"), kernel.modules)
        port = work / "con0.sock"
        received = work / "received"
        specs = {"con": f"virtio-console,@socket:con0={port}:server",
                 "net": f"virtio-net,tap={TAP}"}
        with g.netns(NETNS), g.backends(specs, work, netns={"net": NETNS}) as be:
            subprocess.run(["ip", "-n", NETNS, "addr", "add", f"{HOST_IP}/30", "dev", TAP],
                           check=True)
            subprocess.run(["ip", "-n", NETNS, "link", "set", TAP, "up"], check=True)
            tcp = subprocess.Popen(["ip", "netns", "exec", NETNS, sys.executable, "-c",
                                    TCP_PEER, str(received)], stderr=subprocess.PIPE)
            peer = ConsolePeer(port, HOST_LINE, timeout=120)
            args = [*_console_device("con", qemu.inner(be["con"].socket)),
                    *_net_device("net", qemu.inner(be["net"].socket))]
            cmd = g.qemu_command(inner_kernel, qemu.inner(work / "initrd.gz"), args)
            t1 = time.monotonic()
            try:
                run = g.run_qemu(qemu.command(cmd), timeout=150)
            finally:
                boot_s = time.monotonic() - t1
                host_got = peer.close()
                g.reap(tcp)
            logs = g.backend_logs(be)
        tcp_received = received.read_bytes() if received.exists() else None
        yield Boot(run, qemu, host_got, tcp_received, logs, t1 - t0, boot_s)


@pytest.mark.integration
def test_guest_boots_and_powers_off_under_qemu_11(boot: Boot) -> None:
    assert not boot.run.timed_out and boot.run.done, boot.run.report()
    assert "QEMU emulator version" in boot.qemu.version


@pytest.mark.integration
def test_console_port_is_named_through_our_control_queue(boot: Boot) -> None:
    boot.check("con-port-name")
    assert any(i.startswith("console ") for i in boot.run.info), boot.run.report()


@pytest.mark.integration
def test_console_line_guest_to_host(boot: Boot) -> None:
    assert boot.host_got == GUEST_LINE.encode() + b"\n", boot.run.report()


@pytest.mark.integration
def test_console_line_host_to_guest(boot: Boot) -> None:
    boot.check("con-in")


@pytest.mark.integration
def test_net_with_msix_ping_and_tcp(boot: Boot) -> None:
    boot.check("net-ping", "net-tcp-send", "net-msix")
    expected = (b"ACRN-PYDM-MSIX-" * 70000)[: 1 << 20]
    assert boot.tcp_received == expected


async def test_console_backend_offers_config_and_answers_get_config(tmp_path: Path) -> None:
    """What the generic QEMU device needs: PROTOCOL_F_CONFIG and max_nr_ports via GET_CONFIG."""
    vu_sock = tmp_path / "con.sock"
    spec = f"virtio-console,socket:a={tmp_path / 'a.sock'},socket:b={tmp_path / 'b.sock'}"
    proc = subprocess.Popen([sys.executable, "-m", "devicemodel", "vhost-user", spec,
                             "--socket-path", str(vu_sock)], cwd=g.REPO,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        with trio.fail_after(15):
            while not vu_sock.exists():
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                await trio.sleep(0.02)
        fe = await Frontend.connect(str(vu_sock))
        try:
            await fe.negotiate()
            proto = await fe.call_u64(p.Req.GET_PROTOCOL_FEATURES)
            assert proto & 1 << p.PROTOCOL_F_CONFIG
            cols, rows, max_nr_ports, emerg_wr = struct.unpack(
                "<HHII", await fe.get_config(0, CONSOLE_CONFIG_SIZE))
            assert (cols, rows, max_nr_ports, emerg_wr) == (0, 0, 2, 0)
            # the guest cannot rewrite it (emerg_wr is not offered): SET_CONFIG is ignored
            config = p.CONFIG_HEADER.pack(0, CONSOLE_CONFIG_SIZE, 0) + b"\xff" * 12
            assert await fe.ack(p.Req.SET_CONFIG, config) == 0
            assert await fe.get_config(0, CONSOLE_CONFIG_SIZE) == struct.pack("<HHII",
                                                                              0, 0, 2, 0)
        finally:
            fe.close()
    finally:
        proc.terminate()
        assert proc.wait(10) == 0

"""Our devices driven over vfio-user the way QEMU's client drives them: virtio with MSI-X
vectors as eventfds, INTx with its automask/unmask dance, MSI, the vMSI-X-on-MSI
passthrough device, reset, DMA remaps under live rings, and clients that come and go.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from devicemodel.pci import caps as pcaps
from devicemodel.vfio_user import protocol as p
from devicemodel.vfio_user.cli import main as cli_main
from devicemodel.vfio_user.device import ServedDevice
from devicemodel.vfio_user.server import serve
from devicemodel.virtio.device import STATUS_DEVICE_NEEDS_RESET
from tests.support.fds import open_fds
from tests.support.paths import REPO
from tests.support.vfio_user import (
    Client,
    ClientRam,
    ModernVirtio,
    connected,
    eventfd,
    eventfd_count,
    wait_eventfd,
)

TRIGGER_FDS = p.SET_DATA_EVENTFD | p.SET_ACTION_TRIGGER
RING = 0x1_0000


@pytest.fixture
def served(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ServedDevice]:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    dev = ServedDevice(getattr(request, "param", "virtio-rnd,modern").format(img=img))
    try:
        yield dev
    finally:
        dev.close()


async def _rnd_request(drv: ModernVirtio, q: object, n: int = 32) -> bytes:
    head = q.add_chain(writable=[n])  # type: ignore[attr-defined]
    await drv.kick(0)
    with trio.fail_after(5):
        while not (used := q.get_used()):  # type: ignore[attr-defined]
            await trio.sleep(0.001)
    assert used[0][0] == head
    return q.written(head, used[0][1])  # type: ignore[attr-defined]


async def test_virtio_rnd_modern_with_msix_vectors(served: ServedDevice) -> None:
    ram = ClientRam()
    async with connected(served) as (c, _):
        await ram.map_to(c)
        drv = ModernVirtio(c, ram)
        await drv.probe()
        await drv.init(nvectors=2)
        await drv.common_write(16, 2, 0)  # config changes -> vector 0
        q = await drv.setup_queue(0, RING, 16, vector=1)
        await drv.driver_ok()
        data = await _rnd_request(drv, q)
        assert len(data) == 32 and data != b"\xa5" * 32
        assert await wait_eventfd(drv.vectors[1]) >= 1  # the queue's vector
        assert eventfd_count(drv.vectors[0]) == 0  # not the config vector
        # de-assign vector 1 (QEMU: a masked vector it takes back): no more signals there
        await c.set_irqs(p.MSIX_IRQ, TRIGGER_FDS, 1, 1)
        await _rnd_request(drv, q)
        await trio.sleep(0.05)
        assert eventfd_count(drv.vectors[1]) == 0
        assert served.vectors[p.MSIX_IRQ].dropped >= 1  # raised, but no eventfd for it
        # and back
        await c.set_irqs(p.MSIX_IRQ, TRIGGER_FDS, 1, 1, [os.dup(drv.vectors[1])])
        await _rnd_request(drv, q)
        assert await wait_eventfd(drv.vectors[1]) >= 1
        drv.close()
    ram.close()


async def test_set_irqs_rules(served: ServedDevice) -> None:
    async with connected(served) as (c, _):
        fds = [eventfd() for _ in range(3)]
        try:
            with pytest.raises(Exception, match="error 22"):  # more fds than vectors
                await c.set_irqs(p.MSIX_IRQ, TRIGGER_FDS, 0, 2, [os.dup(f) for f in fds])
            with pytest.raises(Exception, match="error 22"):  # beyond the index
                await c.set_irqs(p.MSIX_IRQ, TRIGGER_FDS, 1, 2, [os.dup(f) for f in fds[:2]])
            with pytest.raises(Exception, match="error 22"):  # MSI-X masks are the client's
                await c.set_irqs(p.MSIX_IRQ, p.SET_DATA_NONE | p.SET_ACTION_MASK, 0, 1)
            with pytest.raises(Exception, match="error 22"):  # two actions
                await c.set_irqs(p.MSIX_IRQ, p.SET_DATA_NONE | p.SET_ACTION_MASK
                                 | p.SET_ACTION_TRIGGER, 0, 1)
            with pytest.raises(Exception, match="error 22"):  # no such index
                await c.set_irqs(7, TRIGGER_FDS, 0, 1, [os.dup(fds[0])])
            with pytest.raises(Exception, match="error 22"):  # fds without DATA_EVENTFD
                await c.set_irqs(p.MSIX_IRQ, p.SET_DATA_NONE | p.SET_ACTION_TRIGGER, 0, 1,
                                 [os.dup(fds[0])])
            with pytest.raises(Exception, match="error 22"):  # too few booleans
                await c.set_irqs(p.MSIX_IRQ, p.SET_DATA_BOOL | p.SET_ACTION_TRIGGER, 0, 2,
                                 data=b"\1")
            await c.set_irqs(p.MSIX_IRQ, TRIGGER_FDS, 0, 2, [os.dup(f) for f in fds[:2]])
            # loopback triggers: DATA_NONE signals all named, DATA_BOOL the true ones
            await c.set_irqs(p.MSIX_IRQ, p.SET_DATA_NONE | p.SET_ACTION_TRIGGER, 0, 2)
            assert [eventfd_count(f) for f in fds[:2]] == [1, 1]
            await c.set_irqs(p.MSIX_IRQ, p.SET_DATA_BOOL | p.SET_ACTION_TRIGGER, 0, 2,
                             data=b"\0\1")
            assert [eventfd_count(f) for f in fds[:2]] == [0, 1]
            # count 0 disables the index: the fds we held are closed
            before = open_fds()
            await c.set_irqs(p.MSIX_IRQ, p.SET_DATA_NONE | p.SET_ACTION_TRIGGER, 0, 0)
            assert len(before - open_fds()) == 2
            await c.set_irqs(p.MSIX_IRQ, p.SET_DATA_NONE | p.SET_ACTION_TRIGGER, 0, 2)
            assert [eventfd_count(f) for f in fds[:2]] == [0, 0]
        finally:
            for fd in fds:
                os.close(fd)


@pytest.mark.parametrize("served", ["dummy,intx"], indirect=True)
async def test_intx_is_level_triggered_over_an_edge_eventfd(served: ServedDevice) -> None:
    """dummy,intx: a non-zero byte at I/O offset 7 asserts the line, zero deasserts it."""
    async with connected(served) as (c, _):
        trig, unmask = eventfd(), eventfd()
        try:
            await c.set_irqs(p.INTX_IRQ, TRIGGER_FDS, 0, 1, [os.dup(trig)])
            await c.write(0, 7, b"\1")
            assert eventfd_count(trig) == 1  # signalled, and now automasked
            await c.write(0, 7, b"\0")
            await c.write(0, 7, b"\1")
            assert eventfd_count(trig) == 0  # masked until the client unmasks
            await c.set_irqs(p.INTX_IRQ, p.SET_DATA_NONE | p.SET_ACTION_UNMASK, 0, 1)
            assert eventfd_count(trig) == 1  # the line is still up: signalled again
            await c.write(0, 7, b"\0")
            await c.set_irqs(p.INTX_IRQ, p.SET_DATA_NONE | p.SET_ACTION_UNMASK, 0, 1)
            assert eventfd_count(trig) == 0  # down now: nothing
            # the client masks: a rising line waits for the unmask
            await c.set_irqs(p.INTX_IRQ, p.SET_DATA_NONE | p.SET_ACTION_MASK, 0, 1)
            await c.write(0, 7, b"\1")
            assert eventfd_count(trig) == 0
            # unmask through an eventfd (what KVM's resamplefd does on EOI)
            await c.set_irqs(p.INTX_IRQ, p.SET_DATA_EVENTFD | p.SET_ACTION_UNMASK, 0, 1,
                             [os.dup(unmask)])
            os.eventfd_write(unmask, 1)
            assert await wait_eventfd(trig) == 1
            # INTxDIS in the command register holds the line back, as on the ACRN path
            await c.write(0, 7, b"\0")
            os.eventfd_write(unmask, 1)
            await trio.sleep(0.01)
            await c.cfg_write(4, 2, await c.cfg_read(4, 2) | 0x400)
            await c.write(0, 7, b"\1")
            assert eventfd_count(trig) == 0
            await c.cfg_write(4, 2, await c.cfg_read(4, 2) & ~0x400)
            assert eventfd_count(trig) == 1
            with pytest.raises(Exception, match="error 22"):
                await c.set_irqs(p.INTX_IRQ, TRIGGER_FDS, 0, 2, [os.dup(trig), os.dup(trig)])
        finally:
            os.close(trig)
            os.close(unmask)


@pytest.mark.parametrize("served", ["dummy"], indirect=True)
async def test_msi_vector_is_the_message_number(served: ServedDevice) -> None:
    """dummy: 4 MSI messages; a 4-byte write of k at I/O offset 4 raises message k."""
    async with connected(served) as (c, _):
        cap = pcaps.find(await c.read(p.CONFIG_REGION, 0, 256), pcaps.CAP_ID_MSI)
        assert cap is not None
        # the guest's address/data reach us through QEMU's forwarded config writes
        await c.cfg_write(cap.offset + 4, 4, 0xFEE0_0000)
        await c.cfg_write(cap.offset + 12, 2, 0x4440)
        await c.cfg_write(cap.offset + 2, 2, pcaps.MSI_CTRL_ENABLE | 2 << 4)  # MME: 4
        fds = [eventfd() for _ in range(4)]
        try:
            await c.set_irqs(p.MSI_IRQ, TRIGGER_FDS, 0, 4, [os.dup(f) for f in fds])
            for k in (2, 0, 3, 1):
                await c.write_int(0, 4, 4, k)
                assert [eventfd_count(f) for f in fds] == [int(i == k) for i in range(4)]
            await c.cfg_write(cap.offset + 2, 2, 0)  # MSI off: nothing goes out
            await c.write_int(0, 4, 4, 1)
            assert [eventfd_count(f) for f in fds] == [0, 0, 0, 0]
        finally:
            for fd in fds:
                os.close(fd)


@pytest.mark.parametrize("served", ["passthru,sim:8,vmsix_on_msi"], indirect=True)
async def test_vmsix_on_msi_vectors_reach_their_eventfds(served: ServedDevice) -> None:
    """QEMU's order: bus master, MSI-X on in config, eventfds per vector; then the
    synthetic device's doorbell (BAR0 offset 0: write k) raises physical MSI message k,
    which our vMSI-X routes to client vector k."""
    async with connected(served) as (c, _):
        cfg = await c.read(p.CONFIG_REGION, 0, 256)
        assert pcaps.find(cfg, pcaps.CAP_ID_MSI) is None
        cap = pcaps.find(cfg, pcaps.CAP_ID_MSIX)
        assert cap is not None and (cfg[cap.offset + 2] & 0x7FF) + 1 == 8
        await c.cfg_write(4, 2, 0x6)  # memory + bus master
        await c.cfg_write(cap.offset + 2, 2, pcaps.MSIX_CTRL_ENABLE)
        fds = [eventfd() for _ in range(8)]
        try:
            await c.set_irqs(p.MSIX_IRQ, TRIGGER_FDS, 0, 8, [os.dup(f) for f in fds])
            for k in (5, 0, 7, 3):
                await c.write_int(0, 0, 4, k)
                assert await wait_eventfd(fds[k]) == 1
                await trio.sleep(0.01)
                assert sum(eventfd_count(f) for f in fds) == 0
            # function mask holds messages (our PBA shows them), unmask delivers them
            await c.cfg_write(cap.offset + 2, 2, pcaps.MSIX_CTRL_ENABLE | pcaps.MSIX_CTRL_FMASK)
            await c.write_int(0, 0, 4, 6)
            await trio.sleep(0.05)
            assert eventfd_count(fds[6]) == 0
            assert await c.read_int(1, 0x800, 8) == 1 << 6
            await c.cfg_write(cap.offset + 2, 2, pcaps.MSIX_CTRL_ENABLE)
            assert await wait_eventfd(fds[6]) == 1
            # after DEVICE_RESET the client's order again: the vectors work as before
            await c.reset()
            await c.cfg_write(4, 2, 0x6)
            await c.cfg_write(cap.offset + 2, 2, pcaps.MSIX_CTRL_ENABLE)
            await c.write_int(0, 0, 4, 2)
            assert await wait_eventfd(fds[2]) == 1
        finally:
            for fd in fds:
                os.close(fd)


@pytest.mark.parametrize("served", ["passthru,sim:4"], indirect=True)
async def test_passthrough_msi_messages_reach_their_vectors(served: ServedDevice) -> None:
    """Plain MSI passthrough: physical message k goes through our remapper to client
    MSI vector k (the guest's address/data arrive through forwarded config)."""
    async with connected(served) as (c, _):
        cap = pcaps.find(await c.read(p.CONFIG_REGION, 0, 256), pcaps.CAP_ID_MSI)
        assert cap is not None
        await c.cfg_write(4, 2, 0x6)
        await c.cfg_write(cap.offset + 4, 4, 0xFEE0_1000)
        await c.cfg_write(cap.offset + 8, 4, 0)
        await c.cfg_write(cap.offset + 12, 2, 0x4460)
        await c.cfg_write(cap.offset + 2, 2, pcaps.MSI_CTRL_ENABLE | 2 << 4)
        fds = [eventfd() for _ in range(4)]
        try:
            await c.set_irqs(p.MSI_IRQ, TRIGGER_FDS, 0, 4, [os.dup(f) for f in fds])
            for k in (3, 1, 0, 2):
                await c.write_int(0, 0, 4, k)
                assert await wait_eventfd(fds[k]) == 1
                await trio.sleep(0.01)
                assert sum(eventfd_count(f) for f in fds) == 0
        finally:
            for fd in fds:
                os.close(fd)


@pytest.mark.parametrize("served", ["passthru,sim:8,vmsix_on_msi"], indirect=True)
async def test_power_state_reads_back_as_written(served: ServedDevice) -> None:
    """QEMU 10+ turns BARs off in D3hot and reads PowerState back before writing D0."""
    async with connected(served) as (c, _):
        cap = pcaps.find(await c.read(p.CONFIG_REGION, 0, 256), pcaps.CAP_ID_PM)
        assert cap is not None
        pmcsr = cap.offset + 4
        await c.cfg_write(pmcsr, 2, 0x0003)
        assert await c.cfg_read(pmcsr, 2) & 3 == 3
        await c.cfg_write(pmcsr, 2, 0x0001)  # D1 is not supported: ignored
        assert await c.cfg_read(pmcsr, 2) & 3 == 3
        await c.cfg_write(pmcsr, 2, 0)
        assert await c.cfg_read(pmcsr, 2) & 3 == 0


@pytest.mark.parametrize("served", ["dummy,msix=4"], indirect=True)
async def test_reset_restores_power_on_state(served: ServedDevice) -> None:
    """DEVICE_RESET: power-on config space; the vectors still go to the client's eventfds."""
    async with connected(served) as (c, _):
        power_on = await c.read(p.CONFIG_REGION, 0, 256)
        cap = pcaps.find(power_on, pcaps.CAP_ID_MSIX)
        assert cap is not None
        await c.cfg_write(4, 2, 0)
        await c.cfg_write(0x3C, 1, 5)
        await c.cfg_write(cap.offset + 2, 2, pcaps.MSIX_CTRL_ENABLE)
        fds = [eventfd() for _ in range(4)]
        try:
            await c.set_irqs(p.MSIX_IRQ, TRIGGER_FDS, 0, 4, [os.dup(f) for f in fds])
            await c.reset()
            assert await c.read(p.CONFIG_REGION, 0, 256) == power_on
            await c.write_int(0, 4, 4, 2)  # MSI-X is off after the reset: nothing
            assert [eventfd_count(f) for f in fds] == [0, 0, 0, 0]
            await c.cfg_write(cap.offset + 2, 2, pcaps.MSIX_CTRL_ENABLE)
            await c.write_int(0, 4, 4, 2)
            assert [eventfd_count(f) for f in fds] == [0, 0, 1, 0]
        finally:
            for fd in fds:
                os.close(fd)


@pytest.mark.parametrize("served", ["virtio-blk,{img},modern", "virtio-rnd,modern"],
                         indirect=True)
async def test_status_reads_zero_right_after_a_reset(served: ServedDevice) -> None:
    """A legacy driver writes status 0 and reads it back once (it does not poll): the
    reset has completed by the client's next command, workers of the device included."""
    ram = ClientRam()
    async with connected(served) as (c, _):
        drv, _ = await ModernVirtio.one_queue(c, ram, RING)
        assert served.pci.active  # type: ignore[attr-defined]
        await drv.common_write(20, 1, 0)
        assert await drv.common_read(20, 1) == 0
        drv.close()
    ram.close()


async def test_rings_survive_the_same_pages_mapped_again(served: ServedDevice) -> None:
    """SeaBIOS' PAM changes: QEMU unmaps all of low RAM and maps it again in pieces from
    the same memfd; the live queue keeps working. Pages that do not come back reset the
    function (DEVICE_NEEDS_RESET) before the next non-DMA command touches it."""
    ram = ClientRam(1 << 20)
    async with connected(served) as (c, _):
        drv, q = await ModernVirtio.one_queue(c, ram, RING)
        await _rnd_request(drv, q)
        await c.dma_unmap(0, 1 << 20)
        await c.dma_map(0, 0xC0000, os.dup(ram.fd))
        await c.dma_map(0xC0000, 0x40000, os.dup(ram.fd), offset=0xC0000)
        assert len(await _rnd_request(drv, q)) == 32
        status = await drv.common_read(20, 1)
        assert not status & STATUS_DEVICE_NEEDS_RESET
        # now the rings' pages go and come back from another file
        other = ClientRam(1 << 20)
        await c.dma_unmap(0, 0xC0000)
        await c.dma_map(0, 0xC0000, os.dup(other.fd))
        with trio.fail_after(5):  # reads the old status until in-flight work drained
            while not await drv.common_read(20, 1) & STATUS_DEVICE_NEEDS_RESET:
                await trio.sleep(0.001)
        assert not served.pci.active  # type: ignore[attr-defined]
        drv.close()
        other.close()
    ram.close()


async def test_disconnect_keeps_the_device_and_drops_the_clients_resources(
        served: ServedDevice, tmp_path: Path) -> None:
    """Over a real socket: the client goes, its maps and eventfds go, the device state
    stays, and the next client is served."""
    sock = tmp_path / "dev.sock"
    before = open_fds()
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: serve(served, socket_path=str(sock),
                                                      task_status=task_status))
        ram = ClientRam(1 << 20)
        for round_ in range(2):
            s = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            await s.connect(str(sock))
            c = Client(s)
            await c.version()
            await ram.map_to(c)
            fds = [eventfd() for _ in range(2)]
            await c.set_irqs(p.MSIX_IRQ, TRIGGER_FDS, 0, 2, [os.dup(f) for f in fds])
            if round_ == 0:
                await c.cfg_write(0x3C, 1, 0x42)  # device state to survive the client
            else:
                assert await c.cfg_read(0x3C, 1) == 0x42
            c.close()
            for fd in fds:
                os.close(fd)
            with trio.fail_after(5):
                while served.memory.maps or served.lines.irqs is not None:
                    await trio.sleep(0.001)
        ram.close()
        nursery.cancel_scope.cancel()
    assert not sock.exists()
    assert open_fds() - before == set()


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        code = cli_main(list(args))
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    for args, words in ((["dummy"], "--socket-path"),
                        (["--socket-path", "x"], "device spec"),
                        (["hostbridge", "--socket-path", "x"], "host bridge"),
                        (["passthru,0/1f/6", "--socket-path", "x"], "synthetic"),
                        (["nosuch", "--socket-path", "x"], "unknown emulation"),
                        (["virtio-blk", "--socket-path", "x"], "virtio-blk"),
                        (["dummy", "--slot", "40", "--socket-path", "x"], "slot")):
        r = run(*args)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("acrn-pydm vfio-user: error:"), r.stderr
        assert words in lines[0], (words, r.stderr)
    assert not (tmp_path / "x").exists()
    assert "vfio-user-pci" in run("--help").stdout
    # and the real entry point says the same
    r = subprocess.run([sys.executable, "-m", "devicemodel", "vfio-user", "lpc", "--socket-path",
                        str(tmp_path / "x")], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "LPC bridge" in r.stderr and len(r.stderr.splitlines()) == 1


def test_cli_serves_an_inherited_socket_until_sigterm(tmp_path: Path) -> None:
    """--fd N: a listening socket handed over (as a management tool would); SIGTERM ends
    the server with status 0."""
    path = tmp_path / "s.sock"
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(str(path))
    lsock.listen(1)
    proc = subprocess.Popen([sys.executable, "-m", "devicemodel", "vfio-user", "virtio-rnd",
                             "--fd", str(lsock.fileno())], cwd=REPO, pass_fds=[lsock.fileno()],
                            stderr=subprocess.PIPE, text=True)
    lsock.close()
    try:
        async def talk() -> tuple[int, int, int]:
            s = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            await s.connect(str(path))
            c = Client(s)
            await c.version()
            info = await c.device_info()
            c.close()
            return info

        assert trio.run(talk)[1:] == (9, 5)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "client connected" in err

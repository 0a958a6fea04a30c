"""vfio-user, message by message, from an in-process client (what QEMU's vfio-user-pci sends).

Each test drives one of our devices through a socketpair: negotiation, device/region/IRQ
info that must match the PciDevice the -s form builds, region access, DMA mappings, and
what a client that lies gets back (an error reply; the session goes on).
"""

from __future__ import annotations

import errno
import json
import os
import struct
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

from devicemodel.pci import caps as pcaps
from devicemodel.pci.device import BarKind
from devicemodel.vfio_user import protocol as p
from devicemodel.vfio_user.device import ServedDevice
from tests.support.fds import open_fds
from tests.support.vfio_user import (
    QEMU_CAPS,
    RW,
    Client,
    ClientRam,
    VfioUserError,
    connected,
    eventfd,
    eventfd_count,
)


@pytest.fixture
def blk_image(tmp_path: Path) -> Path:
    img = tmp_path / "disk.img"
    img.write_bytes(b"\0" * (1 << 20))
    return img


@pytest.fixture
def served(request: pytest.FixtureRequest) -> Iterator[ServedDevice]:
    dev = ServedDevice(getattr(request, "param", "dummy,msix=8,intx"))
    try:
        yield dev
    finally:
        dev.close()


@pytest.fixture
async def client(served: ServedDevice) -> AsyncIterator[Client]:
    async with connected(served) as (c, _):
        yield c


async def expect_error(err: int, coro: object) -> None:
    with pytest.raises(VfioUserError) as info:
        await coro  # type: ignore[misc]
    assert info.value.errno == err, info.value


# --- negotiation -----------------------------------------------------------------------
async def test_version_reply_is_a_subset_of_what_qemu_proposes(served: ServedDevice) -> None:
    async with connected(served, negotiate=False) as (c, _):
        v = await c.version()
    assert (v.major, v.minor) == (0, 0)
    assert set(v.capabilities) <= set(QEMU_CAPS)
    assert "migration" not in v.capabilities
    assert v.capabilities["max_msg_fds"] == p.MAX_MSG_FDS
    assert v.capabilities["max_data_xfer_size"] == p.MAX_DATA_XFER
    assert v.capabilities["pgsizes"] == 4096
    assert v.capabilities["write_multiple"] is True


async def test_version_offers_only_what_was_proposed(served: ServedDevice) -> None:
    async with connected(served, negotiate=False) as (c, _):
        v = await c.version({"max_msg_fds": 4})
        assert v.capabilities == {"max_msg_fds": p.MAX_MSG_FDS}
        # write_multiple was not negotiated: REGION_WRITE_MULTI is refused
        await expect_error(errno.EINVAL, c.call(p.Cmd.REGION_WRITE_MULTI,
                                                p.write_multi_payload([(0, 1, b"\1")])))


async def test_commands_before_version_are_refused(served: ServedDevice) -> None:
    async with connected(served, negotiate=False) as (c, _):
        await expect_error(errno.EINVAL, c.device_info())
        await expect_error(errno.ENOTSUP, c.call(p.Cmd.VERSION, struct.pack("<HH", 1, 0)))
        await expect_error(errno.EINVAL, c.call(p.Cmd.VERSION, struct.pack("<HH", 0, 0)
                                                 + b"{not json\0"))
        await expect_error(errno.EINVAL, c.call(p.Cmd.VERSION, b"\0"))
        await c.version()  # still possible after the refusals
        await expect_error(errno.EINVAL, c.version())  # but only once
        assert (await c.device_info())[1] == p.NUM_REGIONS


# --- device, regions, IRQs ---------------------------------------------------------------
@pytest.mark.parametrize("served", ["dummy,msix=8,intx", "virtio-rnd",
                                    "virtio-rnd,transitional", "virtio-rnd,modern",
                                    "passthru,sim:8,vmsix_on_msi"], indirect=True)
async def test_regions_are_our_bars_and_config_space(served: ServedDevice,
                                                     client: Client) -> None:
    flags, regions, irqs = await client.device_info()
    assert flags == p.DEVICE_FLAGS_PCI | p.DEVICE_FLAGS_RESET
    assert (regions, irqs) == (9, 5)
    dev = served.pci
    for index in range(6):
        bar = dev.bar(index)
        rflags, size = await client.region_info(index)
        if bar is None:
            assert (rflags, size) == (0, 0), index
        else:
            assert (rflags, size) == (p.REGION_READ | p.REGION_WRITE, bar.size), index
    assert await client.region_info(p.ROM_REGION) == (0, 0)
    assert await client.region_info(p.VGA_REGION) == (0, 0)
    rflags, size = await client.region_info(p.CONFIG_REGION)
    assert rflags == p.REGION_READ | p.REGION_WRITE
    assert size == (4096 if dev.cfg.extended else 256)
    await expect_error(errno.EINVAL, client.region_info(9))
    # the config space the client reads is the one the -s form shows (acrn-pydm lspci)
    seen = await client.read(p.CONFIG_REGION, 0, size)
    assert seen == b"".join(served.bus.cfg_read(0, 3, 0, off, 4).to_bytes(4, "little")
                            for off in range(0, size, 4))


async def test_io_bars_are_regions_too(served: ServedDevice, client: Client) -> None:
    bar0 = served.pci.bar(0)
    assert bar0 is not None and bar0.kind is BarKind.IO
    assert await client.region_info(0) == (p.REGION_READ | p.REGION_WRITE, 8)
    await client.write(0, 0, b"\x11\x22")
    assert await client.read(0, 0, 2) == b"\x11\x22"


@pytest.mark.parametrize("served", ["dummy,msix=8,intx", "virtio-rnd,modern",
                                    "passthru,sim:8,vmsix_on_msi", "passthru,sim:4"],
                         indirect=True)
async def test_irq_info_counts(served: ServedDevice, client: Client) -> None:
    counts = {}
    for index in range(p.NUM_IRQS):
        flags, count = await client.irq_info(index)
        assert flags & p.IRQ_INFO_EVENTFD
        counts[index] = count
    cfg = served.pci.cfg
    assert counts[p.INTX_IRQ] == (1 if cfg.get8(0x3D) else 0)
    assert counts[p.ERR_IRQ] == counts[p.REQ_IRQ] == 1
    assert (await client.irq_info(p.INTX_IRQ))[0] == (
        p.IRQ_INFO_EVENTFD | p.IRQ_INFO_MASKABLE | p.IRQ_INFO_AUTOMASKED)
    if served.spec.startswith("dummy"):
        assert (counts[p.MSI_IRQ], counts[p.MSIX_IRQ]) == (4, 8)
    elif served.spec.startswith("virtio"):
        assert (counts[p.MSI_IRQ], counts[p.MSIX_IRQ]) == (1, 2)  # one queue + config
    elif "vmsix_on_msi" in served.spec:
        assert (counts[p.MSI_IRQ], counts[p.MSIX_IRQ]) == (0, 8)  # MSI replaced by MSI-X
    else:
        assert (counts[p.MSI_IRQ], counts[p.MSIX_IRQ]) == (4, 0)
    await expect_error(errno.EINVAL, client.irq_info(5))


# --- region access ------------------------------------------------------------------------
async def test_bar_access_and_bounds(client: Client) -> None:
    await client.write(1, 0x10, b"abcdefgh")  # 8 bytes, naturally aligned
    await client.write(1, 0x21, b"xyz")  # odd size and offset: split
    assert await client.read(1, 0x10, 8) == b"abcdefgh"
    assert await client.read(1, 0x20, 5) == b"\0xyz\0"
    assert await client.read(1, 4096 - 4, 4) == b"\0\0\0\0"
    for region, offset, count in ((1, 4096 - 2, 4), (1, 4096, 1), (1, 0, 0), (4, 0, 4),
                                  (6, 0, 4), (7, 255, 2), (12, 0, 4), (1, 2**63, 4)):
        await expect_error(errno.EINVAL, client.read(region, offset, count))
    await expect_error(errno.EINVAL, client.write(1, 4094, b"1234"))
    await expect_error(errno.E2BIG, client.read(1, 0, p.MAX_DATA_XFER + 1))
    # a write whose count does not match its data
    await expect_error(errno.EINVAL, client.call(
        p.Cmd.REGION_WRITE, p.region_access_payload(0, 1, 8, b"1234")))


async def test_posted_writes_are_applied_in_order_without_replies(client: Client) -> None:
    for i in range(10):
        await client.write(1, 0x100, bytes([i]) * 4, posted=True)
    assert await client.read(1, 0x100, 4) == b"\x09" * 4  # the reply to this read comes next


async def test_write_multi(client: Client) -> None:
    reply = await client.call(p.Cmd.REGION_WRITE_MULTI, p.write_multi_payload(
        [(0x200, 1, b"\1\2\3\4"), (0x204, 1, b"\5\6\7\x08"), (0x300, 2, b"\xee")]))
    assert struct.unpack("<Q", reply) == (3,)
    assert await client.read(1, 0x200, 8) == bytes(range(1, 9))
    assert await client.read(2, 0x300, 1) == b"\xee"
    await expect_error(errno.EINVAL, client.call(p.Cmd.REGION_WRITE_MULTI,
                                                 struct.pack("<Q", 2) + bytes(24)))


async def test_config_writes_go_through_our_masks(served: ServedDevice, client: Client) -> None:
    await client.cfg_write(0, 4, 0xFFFF_FFFF)  # vendor/device are read-only
    assert await client.cfg_read(0, 4) == 0x0001_10DD
    await client.cfg_write(0x10, 4, 0xFFFF_FFFF)  # BAR sizing works like on a bus
    assert await client.cfg_read(0x10, 4) == 0xFFF9  # 8-byte I/O BAR, 16-bit decode
    await client.cfg_write(0x3C, 1, 0x0B)
    assert await client.cfg_read(0x3C, 1) == 0x0B


async def test_msix_table_belongs_to_the_client(served: ServedDevice, client: Client) -> None:
    """QEMU emulates the table itself: whatever reaches our copy of it (here: every entry
    masked, with junk messages) does not decide anything; vector k raises eventfd k."""
    for k in range(8):
        await client.write(3, 16 * k, b"\xff" * 16)
    assert served.pci.msix is not None and served.pci.msix.masked(5)
    cap = pcaps.find(await client.read(p.CONFIG_REGION, 0, 256), pcaps.CAP_ID_MSIX)
    assert cap is not None
    await client.cfg_write(cap.offset + 2, 2, pcaps.MSIX_CTRL_ENABLE)
    fds = [eventfd() for _ in range(8)]
    try:
        await client.set_irqs(p.MSIX_IRQ, p.SET_DATA_EVENTFD | p.SET_ACTION_TRIGGER, 0, 8,
                              [os.dup(f) for f in fds])
        for k in (5, 0, 7):
            await client.write_int(0, 4, 4, k)  # dummy: raise MSI-X entry k
            assert [eventfd_count(f) for f in fds] == [int(i == k) for i in range(8)]
    finally:
        for fd in fds:
            os.close(fd)


# --- DMA -----------------------------------------------------------------------------------
async def test_dma_map_unmap(served: ServedDevice, client: Client) -> None:
    ram = ClientRam(1 << 20, gpa=0x10_0000)
    try:
        await ram.map_to(client)
        ram.mm[0x1000:0x1004] = b"ping"
        assert served.memory.read(0x10_1000, 4) == b"ping"
        served.memory.write(0x10_2000, b"pong")
        assert ram.mm[0x2000:0x2004] == b"pong"
        # an overlapping map is refused with EEXIST, even without an fd
        await expect_error(errno.EEXIST, client.dma_map(0x18_0000, 0x10_0000))
        # unmap replies with the request's entry
        reply = await client.dma_unmap(0x10_0000, 1 << 20)
        assert reply == p.dma_unmap_payload(24, 0, 0x10_0000, 1 << 20)
        assert not served.memory.contains(0x10_1000, 4)
        assert served.memory.maps == []
    finally:
        ram.close()


async def test_dma_maps_a_client_cannot_make(client: Client, served: ServedDevice) -> None:
    ram = ClientRam(1 << 20)
    try:
        fd = lambda: os.dup(ram.fd)  # noqa: E731
        # past the end of the file (would SIGBUS us on the first touch)
        await expect_error(errno.EINVAL, client.dma_map(0, 2 << 20, fd()))
        await expect_error(errno.EINVAL, client.dma_map(0, 0x1000, fd(), offset=1 << 20))
        # not page aligned, empty, wrapping, unknown flags
        await expect_error(errno.EINVAL, client.dma_map(0x800, 0x1000, fd()))
        await expect_error(errno.EINVAL, client.dma_map(0, 0x800, fd()))
        await expect_error(errno.EINVAL, client.dma_map(0, 0, fd()))
        await expect_error(errno.EINVAL, client.dma_map(2**64 - 0x1000, 0x2000, fd()))
        await expect_error(errno.EINVAL, client.dma_map(0, 0x1000, fd(), flags=0x10))
        # an fd that is no memory (an eventfd), and two fds
        efd = os.eventfd(0)
        await expect_error(errno.EINVAL, client.dma_map(0, 0x1000, efd))
        await expect_error(errno.EINVAL, client.call(
            p.Cmd.DMA_MAP, p.dma_map_payload(RW, 0, 0, 0x1000), [fd(), fd()]))
        # argsz below the structure
        await expect_error(errno.EINVAL, client.call(
            p.Cmd.DMA_MAP, struct.pack("<IIQQQ", 8, RW, 0, 0, 0x1000), [fd()]))
        await expect_error(errno.EINVAL, client.call(p.Cmd.DMA_MAP, b"\0" * 8))
        assert served.memory.maps == []
        # the unmap rules: a range with nothing in it is fine, one that splits is not
        await client.dma_map(0x10_0000, 0x10_0000, fd())
        assert await client.dma_unmap(0, 0x1000)
        await expect_error(errno.EINVAL, client.dma_unmap(0x10_0000, 0x1000))
        await expect_error(errno.EINVAL, client.dma_unmap(0, 0))
        await expect_error(errno.ENOTSUP, client.dma_unmap(0x10_0000, 0x10_0000, flags=1))
        assert len(served.memory.maps) == 1
        await client.dma_unmap(0, 0x1000_0000)  # whole mappings inside the range go
        assert served.memory.maps == []
    finally:
        ram.close()


async def test_regions_without_fd_or_write_access_are_not_used(served: ServedDevice,
                                                               client: Client) -> None:
    ram = ClientRam(0x10000)
    try:
        await client.dma_map(0xC0000, 0x20000)  # QEMU's ROMs come without an fd
        await client.dma_map(0, 0x10000, os.dup(ram.fd), flags=p.DMA_READ_FLAG)
        assert [m.address for m in served.memory.maps] == [0, 0xC0000]
        assert not served.memory.contains(0xC0000, 1)
        assert not served.memory.contains(0, 1)
        await client.dma_unmap(0, 0x10000)
        await client.dma_unmap(0xC0000, 0x20000)
        assert served.memory.maps == []
    finally:
        ram.close()


async def test_unmap_all(served: ServedDevice, client: Client) -> None:
    ram = ClientRam(0x20000)
    try:
        await client.dma_map(0, 0x10000, os.dup(ram.fd))
        await client.dma_map(0x10000, 0x10000, os.dup(ram.fd), offset=0x10000)
        await client.dma_map(0xC0000, 0x10000)
        await client.dma_unmap(0, 0, flags=2)
        assert served.memory.maps == []
    finally:
        ram.close()


# --- malformed messages: an error reply, and the session goes on -----------------------------
async def test_unknown_and_wrong_direction_commands(client: Client) -> None:
    await expect_error(errno.ENOSYS, client.call(14))
    await expect_error(errno.ENOSYS, client.call(0xFFFF))
    await expect_error(errno.EINVAL, client.call(p.Cmd.DMA_READ, bytes(16)))
    await expect_error(errno.ENOTTY, client.call(p.Cmd.DEVICE_FEATURE, bytes(8)))
    await expect_error(errno.EINVAL, client.call(p.Cmd.DEVICE_RESET, b"x"))
    await expect_error(errno.EINVAL, client.call(p.Cmd.DEVICE_GET_INFO, bytes(16),
                                                 flags=0x40))
    await expect_error(errno.EINVAL, client.call(p.Cmd.DEVICE_GET_INFO, b"\x10\0\0\0"))
    await expect_error(errno.EINVAL, client.call(p.Cmd.DEVICE_GET_INFO, bytes(16)))  # argsz 0
    assert (await client.device_info())[1] == 9


async def test_fds_where_none_belong_are_closed(client: Client) -> None:
    before = open_fds()
    fds = [os.eventfd(0) for _ in range(3)]  # (the client closes what it sent)
    await expect_error(errno.EINVAL, client.call(p.Cmd.DEVICE_GET_INFO,
                                                 p.device_info_payload(0, 0, 0), fds))
    fds = [os.eventfd(0) for _ in range(20)]  # more than any message may carry
    await expect_error(errno.EINVAL, client.call(p.Cmd.DEVICE_GET_INFO,
                                                 p.device_info_payload(0, 0, 0), fds))
    assert open_fds() - before == set()


async def test_oversized_message_is_skipped(client: Client) -> None:
    big = b"\0" * (p.MAX_MESSAGE + 100)
    await expect_error(errno.E2BIG, client.call(p.Cmd.REGION_WRITE, big))
    assert (await client.device_info())[1] == 9


async def test_no_reply_means_no_reply_even_for_errors(client: Client) -> None:
    await client.send(0x777, flags=p.NO_REPLY)
    await client.send(p.Cmd.REGION_READ, b"short", flags=p.NO_REPLY)
    # a reply-typed message answers nothing: ignored
    await client.channel.send(p.reply(p.Header(1, p.Cmd.VERSION, 16, 1, 0)))
    r_id = await client.send(p.Cmd.DEVICE_GET_INFO, p.device_info_payload(0, 0, 0))
    r = await client.reply()
    assert r.header.id == r_id and not r.header.flags & p.ERROR


async def test_unframeable_header_gets_an_error_then_the_close(served: ServedDevice) -> None:
    async with connected(served) as (c, ended):
        await c.channel.send(p.HEADER.pack(7, p.Cmd.DEVICE_GET_INFO, 8, 0, 0))
        r = await c.reply()
        assert (r.header.id, r.header.flags & p.ERROR) == (7, p.ERROR)
        with trio.fail_after(5):
            while not ended:
                await trio.sleep(0.001)
    # a message cut short by EOF ends that session too, without an error
    async with connected(served) as (c, ended):
        await c.channel.send(p.HEADER.pack(1, p.Cmd.REGION_READ, 32, 0, 0) + b"\0" * 4)
    assert ended


async def test_version_json_is_bounded(served: ServedDevice) -> None:
    async with connected(served, negotiate=False) as (c, _):
        blob = json.dumps({"capabilities": {"x": "a" * p.MAX_VERSION_JSON}}).encode()
        await expect_error(errno.E2BIG, c.call(p.Cmd.VERSION, struct.pack("<HH", 0, 0) + blob))
        await expect_error(errno.EINVAL, c.call(p.Cmd.VERSION, struct.pack("<HH", 0, 0)
                                                 + b'{"capabilities": 5}\0'))
        await expect_error(errno.ENOTSUP, c.version({"pgsizes": 8192}))
        await c.version()

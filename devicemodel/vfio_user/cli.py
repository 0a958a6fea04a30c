"""``acrn-pydm vfio-user <device spec> (--socket-path PATH | --fd N)``

Serves one of our PCI functions, whole (config space, BARs, interrupts), to QEMU's
``vfio-user-pci`` or any vfio-user client. The spec is an ``-s`` value without the slot.
"""

from __future__ import annotations

import argparse
import logging
import sys

import trio

from ..errors import ConfigError
from ..peer_args import OneLineParser, add_socket_args, check_socket_args

USAGE = """\
usage: acrn-pydm vfio-user <device spec> (--socket-path PATH | --fd N) [--slot N] [-v]

device spec: the -s emulation with its options, without the slot, e.g.
  virtio-blk,/path/disk.img[,modern|transitional]    virtio-net,tap=tap0    virtio-rnd
  virtio-console,@socket:con0=/path/con0.sock:server  dummy[,msix=8][,intx]
  ahci,hd:/path/disk.img[,cd:/path/disc.iso]  passthru,sim:8,vmsix_on_msi
--fd N: a listening (or connected) UNIX socket handed over by the caller
--slot N: the slot the -s form would use (default 3); it only changes a virtio-net MAC

QEMU 10.1 or later attaches it with
  -device '{"driver":"vfio-user-pci","socket":{"type":"unix","path":"PATH"}}'
and guest RAM it can share (-object memory-backend-memfd,share=on).
"""


def _parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="acrn-pydm vfio-user", usage=USAGE, add_help=False)
    ap.add_argument("spec", nargs="?")
    add_socket_args(ap)
    ap.add_argument("--slot", type=int, default=3)
    ap.add_argument("-h", "--help", action="store_true")
    ap.add_argument("--verbose", "-v", action="store_true")
    return ap


def main(argv: list[str]) -> int:
    try:
        args = _parser().parse_args(argv)
        if args.help:
            print(USAGE, end="")
            return 0
        if not args.spec:
            raise ConfigError("give a device spec, e.g. virtio-blk,/path/disk.img")
        check_socket_args(args, "the listening or connected UNIX socket handed to this process",
                          "/run/vfio-user-blk.sock")
        if not 0 <= args.slot <= 31:
            raise ConfigError(f"--slot {args.slot}: a slot is 0..31")
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
            format="%(relativeCreated)d acrn-pydm[vfio-user] %(levelname)s: %(message)s",
        )
        from .device import ServedDevice
        from .server import serve

        served = ServedDevice(args.spec, slot=args.slot)
        trio.run(lambda: serve(served, socket_path=args.socket_path, fd=args.fd))
    except ConfigError as e:
        print(f"acrn-pydm vfio-user: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"acrn-pydm vfio-user: error: {e}", file=sys.stderr)
        return 1
    return 0

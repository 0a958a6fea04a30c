"""``acrn-pydm vhost-user <device spec> (--socket-path PATH | --fd N) | --print-capabilities``

Serves one of our virtio devices to QEMU (or any vhost-user front end). Options follow the
back-end conventions of QEMU's vhost-user.rst, so management tools can start it like any
other back end.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import trio

from ..errors import ConfigError
from ..peer_args import OneLineParser, add_socket_args, check_socket_args

USAGE = """\
usage: acrn-pydm vhost-user <device spec> (--socket-path PATH | --fd N)
       acrn-pydm vhost-user <device spec> --print-capabilities

device spec: the -s emulation with its options, without the slot, e.g.
  virtio-blk,/path/disk.img    virtio-rnd    virtio-net,<tap name>    virtio-console,...
"""


def _parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="acrn-pydm vhost-user", usage=USAGE, add_help=False)
    ap.add_argument("spec", nargs="?")
    add_socket_args(ap)
    ap.add_argument("--print-capabilities", action="store_true")
    ap.add_argument("-h", "--help", action="store_true")
    ap.add_argument("--verbose", "-v", action="store_true")
    return ap


def capabilities(spec: str) -> dict[str, object]:
    from ..registry import vhost_kind

    _, kind, _ = vhost_kind(spec)
    return {"type": kind.vhost_type, "features": []}


def main(argv: list[str]) -> int:
    try:
        args = _parser().parse_args(argv)
        if args.help:
            print(USAGE, end="")
            return 0
        if args.print_capabilities:
            if not args.spec:
                raise ConfigError("--print-capabilities: give the device spec it is about")
            print(json.dumps(capabilities(args.spec), indent=2))
            return 0
        if not args.spec:
            raise ConfigError("give a device spec, e.g. virtio-blk,/path/disk.img")
        check_socket_args(args, "the connected socket the front end passed us",
                          "/run/vhost-blk.sock")
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
            format="acrn-pydm[vhost-user] %(levelname)s: %(message)s",
        )
        from ..registry import make_vhost_device
        from .server import serve

        device = make_vhost_device(args.spec)
        trio.run(lambda: serve(device, socket_path=args.socket_path, fd=args.fd))
    except ConfigError as e:
        print(f"acrn-pydm vhost-user: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"acrn-pydm vhost-user: error: {e}", file=sys.stderr)
        return 1
    return 0

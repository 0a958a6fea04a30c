"""``acrn-pydm vhost-user <device spec> (--socket-path PATH | --fd N) | --print-capabilities``

Serves one of our virtio devices to QEMU (or any vhost-user front end). Options follow the
back-end conventions of QEMU's vhost-user.rst, so management tools can start it like any
other back end.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import stat
import sys

import trio

from ..errors import ConfigError

USAGE = """\
usage: acrn-pydm vhost-user <device spec> (--socket-path PATH | --fd N)
       acrn-pydm vhost-user <device spec> --print-capabilities

device spec: the -s emulation with its options, without the slot, e.g.
  virtio-blk,/path/disk.img    virtio-rnd    virtio-net,<tap name>    virtio-console,...
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like the main command
        raise ConfigError(message)


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="acrn-pydm vhost-user", usage=USAGE, add_help=False)
    ap.add_argument("spec", nargs="?")
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--socket-path")
    where.add_argument("--fd")
    ap.add_argument("--print-capabilities", action="store_true")
    ap.add_argument("-h", "--help", action="store_true")
    ap.add_argument("--verbose", "-v", action="store_true")
    return ap


#: the largest fd number Linux hands out (fs.nr_open's ceiling is below 2^31)
FD_MAX = 2**31 - 1


def _fd_number(text: str) -> int:
    """``--fd``: a decimal fd number, range-checked before anything uses it."""
    if not (text.isascii() and text.isdigit()) or len(text) > 10 or int(text) > FD_MAX:
        raise ConfigError(f"--fd {text}: not a file descriptor number; give the number of "
                          "the connected socket the front end passed us, e.g. --fd 3")
    return int(text)


def check_socket_fd(fd: int) -> None:
    """The inherited fd must be open and a socket (served as a UNIX stream socket)."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        raise ConfigError(f"--fd {fd}: not an open file descriptor; pass the socket to this "
                          "process as that fd, or use --socket-path") from None
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"--fd {fd}: not a socket; give the fd of the front end's "
                          "connected UNIX socket")


def check_socket_path(path: str) -> None:
    if not path or "\0" in path:
        raise ConfigError(f"--socket-path {path!r}: not a usable path; give e.g. "
                          "--socket-path /run/vhost-blk.sock")


def capabilities(spec: str) -> dict[str, object]:
    from .devices import kind_of

    _, kind, _ = kind_of(spec)
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
        if args.socket_path is None and args.fd is None:
            raise ConfigError("give --socket-path PATH or --fd N")
        if args.fd is not None:
            args.fd = _fd_number(args.fd)
            check_socket_fd(args.fd)
        else:
            check_socket_path(args.socket_path)
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
            format="acrn-pydm[vhost-user] %(levelname)s: %(message)s",
        )
        from .devices import make_device
        from .server import serve

        device = make_device(args.spec)
        trio.run(lambda: serve(device, socket_path=args.socket_path, fd=args.fd))
    except ConfigError as e:
        print(f"acrn-pydm vhost-user: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"acrn-pydm vhost-user: error: {e}", file=sys.stderr)
        return 1
    return 0

"""The command-line pieces the peer-serving subcommands (vhost-user, vfio-user) share:
one-line argument errors and the ``--socket-path PATH | --fd N`` pair, checked before
anything opens or adopts a descriptor (a bad number is one line, never a traceback)."""

from __future__ import annotations

import argparse
import os
import stat

from .errors import ConfigError

#: the largest fd number Linux hands out (fs.nr_open's ceiling is below 2^31)
FD_MAX = 2**31 - 1


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like the main command
        raise ConfigError(message)


def add_socket_args(ap: argparse.ArgumentParser) -> None:
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--socket-path")
    where.add_argument("--fd")


def check_socket_args(args: argparse.Namespace, wanted: str, example_path: str) -> None:
    """Exactly one of --socket-path and --fd, usable; ``args.fd`` becomes an int.
    ``wanted`` names the socket --fd must be (the one line says so when it is not)."""
    if args.socket_path is None and args.fd is None:
        raise ConfigError("give --socket-path PATH or --fd N")
    if args.fd is not None:
        args.fd = fd_number(args.fd, wanted)
        check_socket_fd(args.fd, wanted)
    elif not args.socket_path or "\0" in args.socket_path:
        raise ConfigError(f"--socket-path {args.socket_path!r}: not a usable path; give e.g. "
                          f"--socket-path {example_path}")


def fd_number(text: str, wanted: str) -> int:
    """``--fd``: a decimal fd number, range-checked before anything uses it."""
    if not (text.isascii() and text.isdigit()) or len(text) > 10 or int(text) > FD_MAX:
        raise ConfigError(f"--fd {text}: not a file descriptor number; give the number of "
                          f"{wanted}, e.g. --fd 3")
    return int(text)


def check_socket_fd(fd: int, wanted: str) -> None:
    """The inherited fd must be open and a socket (served as a UNIX stream socket)."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        raise ConfigError(f"--fd {fd}: not an open file descriptor; pass the socket to this "
                          "process as that fd, or use --socket-path") from None
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"--fd {fd}: not a socket; give the number of {wanted}")

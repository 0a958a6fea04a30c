"""Guest-side probe run as the program of a copy of acrn-pydm@.service: each line says what
the unit's sandbox let this process do ("NAME ok" or "NAME ERRNO-NAME")."""

import ctypes
import errno
import os
import socket

libc = ctypes.CDLL(None, use_errno=True)


def report(name: str, fn) -> None:
    try:
        fn()
    except OSError as e:
        print(f"{name} {errno.errorcode.get(e.errno, e.errno)}", flush=True)
    else:
        print(f"{name} ok", flush=True)


def _libc(call: str, *args: object) -> None:
    if getattr(libc, call)(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _open(path: str, flags: int) -> None:
    os.close(os.open(path, flags))


def _write(path: str) -> None:
    with open(path, "w") as f:
        f.write("probe\n")


def _socket(family: int, kind: int) -> None:
    socket.socket(family, kind).close()


with open("/proc/self/status") as f:
    for line in f:
        if line.startswith(("Seccomp:", "NoNewPrivs:", "CapEff:", "CapBnd:")):
            print(" ".join(line.split()), flush=True)
os.makedirs("/tmp/probe-mnt", exist_ok=True)
# CAP_SYS_ADMIN is in the bounding set: only the seccomp filter (~@mount) stops this
report("mount", lambda: _libc("mount", b"none", b"/tmp/probe-mnt", b"tmpfs", 0, None))
# root may chown a file it owns to root without any capability: only ~@privileged stops it
_write("/tmp/acrn-pydm-probe")
report("chown", lambda: os.chown("/tmp/acrn-pydm-probe", 0, 0))
report("af_packet", lambda: _socket(socket.AF_PACKET, socket.SOCK_RAW))
report("af_unix", lambda: _socket(socket.AF_UNIX, socket.SOCK_STREAM))
report("af_inet", lambda: _socket(socket.AF_INET, socket.SOCK_DGRAM))
report("dev_net_tun", lambda: _open("/dev/net/tun", os.O_RDWR))
report("dev_kmsg_write", lambda: _open("/dev/kmsg", os.O_WRONLY))
report("dev_kmsg_read", lambda: _open("/dev/kmsg", os.O_RDONLY))
report("dev_vda", lambda: _open("/dev/vda", os.O_RDONLY))
report("dev_mem", lambda: _open("/dev/mem", os.O_RDONLY))
report("dev_ptmx", lambda: _open("/dev/ptmx", os.O_RDWR))
report("write_etc", lambda: _write("/etc/acrn-pydm/probe"))
report("write_usr", lambda: _write("/usr/probe"))
report("write_var_lib", lambda: _write("/var/lib/acrn-pydm/probe"))
report("write_run", lambda: _write("/run/acrn-pydm/probe"))
report("write_root_home", lambda: _write("/root/probe"))
report("write_tmp", lambda: _write("/tmp/probe"))
report("memfd", lambda: os.close(os.memfd_create("probe")))
report("read_vm_file", lambda: open("/etc/acrn-pydm/vm1.toml").close())

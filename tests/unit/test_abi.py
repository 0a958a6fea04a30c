"""The HSM ABI judged by the system header: gcc compiles a program against <linux/acrn.h>
and prints every sizeof, every field offset and size, every ioctl number and every constant;
each must equal what devicemodel/hsm/abi.py says.

The list of what to check is read from the header itself (a small parser for the subset of C
it uses), so a field or constant added to the header fails this test until abi.py has it.
"""

from __future__ import annotations

import itertools
import re
import shutil
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from construct import Array, Renamed, Struct

from devicemodel.hsm import abi

HEADER = Path("/usr/include/linux/acrn.h")

pytestmark = [
    pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed (apt: gcc)"),
    pytest.mark.skipif(
        not HEADER.exists(), reason=f"{HEADER} is missing (apt: linux-libc-dev)"
    ),
]

# --- a parser for the C subset of linux/acrn.h ---------------------------------------------


@dataclass
class CField:
    name: str | None  # None: an anonymous struct/union whose members belong to the parent
    dims: tuple[str, ...] = ()
    ref: str | None = None  # "struct NAME" member
    children: list[CField] | None = None  # inline struct/union body


@dataclass
class Header:
    structs: dict[str, list[CField]] = field(default_factory=dict)
    defines: dict[str, str] = field(default_factory=dict)
    enums: list[str] = field(default_factory=list)


_TOKEN = re.compile(r"\w+|[{}\[\];,()]|\S")


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


class _Parser:
    def __init__(self, tokens: list[str]) -> None:
        self.t = tokens
        self.i = 0

    def peek(self, k: int = 0) -> str:
        return self.t[self.i + k] if self.i + k < len(self.t) else ""

    def take(self, want: str | None = None) -> str:
        tok = self.t[self.i]
        if want is not None and tok != want:
            raise ValueError(f"header parse: expected {want!r}, got {tok!r} at token {self.i}")
        self.i += 1
        return tok

    def skip_attributes(self) -> None:
        while self.peek() == "__attribute__":
            self.take()
            depth = 0
            while True:
                tok = self.take()
                depth += tok == "("
                depth -= tok == ")"
                if depth == 0:
                    break

    def dims(self) -> tuple[str, ...]:
        out = []
        while self.peek() == "[":
            self.take("[")
            expr = []
            while self.peek() != "]":
                expr.append(self.take())
            self.take("]")
            out.append(" ".join(expr))
        return tuple(out)

    def body(self) -> list[CField]:
        self.take("{")
        members: list[CField] = []
        while self.peek() != "}":
            members.append(self.member())
        self.take("}")
        return members

    def member(self) -> CField:
        self.skip_attributes()
        if self.peek() in ("struct", "union"):
            self.take()
            tag = None
            if self.peek() != "{":
                tag = self.take()
            if self.peek() == "{":
                children = self.body()
                self.skip_attributes()
                name = None
                if self.peek() != ";":
                    name = self.take()
                f = CField(name, self.dims(), children=children)
            else:
                f = CField(self.take(), ref=tag)
                f.dims = self.dims()
        else:
            words = []
            while self.peek() not in (";", "["):
                words.append(self.take())
            f = CField(words[-1], self.dims())
        self.skip_attributes()
        self.take(";")
        return f


def parse_header(text: str) -> Header:
    text = _strip_comments(text).replace("\\\n", " ")
    hdr = Header()
    code_lines = []
    for line in text.splitlines():
        m = re.match(r"\s*#\s*define\s+(\w+)(\(?)\s*(.*)$", line)
        if m:
            name, paren, value = m.groups()
            if not paren and value.strip():  # object-like macros with a value
                hdr.defines[name] = value.strip()
            continue
        if re.match(r"\s*#", line):
            continue
        code_lines.append(line)
    p = _Parser(_TOKEN.findall("\n".join(code_lines)))
    while p.i < len(p.t):
        tok = p.take()
        if tok == "struct" and p.peek(1) == "{":
            name = p.take()
            hdr.structs[name] = p.body()
            p.skip_attributes()
            p.take(";")
        elif tok == "enum" and p.peek(1) == "{":
            p.take()
            p.take("{")
            while p.peek() != "}":
                member = p.take()
                if member != ",":
                    hdr.enums.append(member)
                    while p.peek() not in (",", "}"):
                        p.take()
            p.take("}")
    return hdr


def _dim_value(expr: str, hdr: Header) -> int:
    expr = hdr.defines.get(expr, expr)
    return int(expr.rstrip("uUlL"), 0)


def field_paths(hdr: Header, fields: list[CField], prefix: str = "") -> list[str]:
    """Every C member designator, nested ones included (arrays of structs per element)."""
    out: list[str] = []
    for f in fields:
        children = f.children if f.children is not None else hdr.structs.get(f.ref or "")
        if f.name is None:
            out += field_paths(hdr, children or [], prefix)
            continue
        path = prefix + f.name
        out.append(path)
        if not children:
            continue
        if f.dims:
            counts = [range(_dim_value(d, hdr)) for d in f.dims]
            for idx in itertools.product(*counts):
                elem = path + "".join(f"[{i}]" for i in idx)
                out.append(elem)
                out += field_paths(hdr, children, elem + ".")
        else:
            out += field_paths(hdr, children, path + ".")
    return out


# --- the C program -----------------------------------------------------------------------

# Fork-only ioctls (acrn-dm's hsm_ioctl_defs.h), computed with the kernel's own _IOW.
FORK_ONLY_C = {
    "SETUP_ASYNCIO": "_IOW(ACRN_IOCTL_TYPE, 0x90, __u64)",
    "SETUP_VM_EVENT_RING": "_IOW(ACRN_IOCTL_TYPE, 0xA0, __u64)",
    "SETUP_VM_EVENT_FD": "_IOW(ACRN_IOCTL_TYPE, 0xA1, int)",
}


def _c_program(hdr: Header) -> str:
    lines = [
        "#include <stddef.h>",
        "#include <stdio.h>",
        "#include <linux/ioctl.h>",
        "#include <linux/acrn.h>",
        "int main(void) {",
    ]
    for s, fields in hdr.structs.items():
        lines.append(
            f'printf("S {s} %zu %zu\\n", sizeof(struct {s}), _Alignof(struct {s}));'
        )
        for path in field_paths(hdr, fields):
            lines.append(
                f'printf("F {s} {path} %zu %zu\\n", offsetof(struct {s}, {path}), '
                f"sizeof(((struct {s} *)0)->{path}));"
            )
    for name in list(hdr.defines) + hdr.enums:
        lines.append(f'printf("D {name} %llu\\n", (unsigned long long)({name}));')
    for name, expr in FORK_ONLY_C.items():
        lines.append(f'printf("K {name} %llu\\n", (unsigned long long)({expr}));')
        lines.append(f'#ifdef ACRN_IOCTL_{name}\nprintf("U {name}\\n");\n#endif')
    lines += ["return 0;", "}"]
    return "\n".join(lines) + "\n"


@dataclass
class Measured:
    header: Header
    sizes: dict[str, tuple[int, int]]  # struct -> (sizeof, alignof)
    fields: dict[str, dict[str, tuple[int, int]]]  # struct -> path -> (offset, size)
    values: dict[str, int]  # every #define and enum member
    fork_only: dict[str, int]
    fork_only_in_header: set[str]


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> Measured:
    hdr = parse_header(HEADER.read_text())
    work = tmp_path_factory.mktemp("abi")
    src, exe = work / "abi.c", work / "abi"
    src.write_text(_c_program(hdr))
    subprocess.run(
        ["gcc", "-std=gnu11", "-Wall", "-Werror", "-o", str(exe), str(src)],
        check=True, capture_output=True, text=True,
    )
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    m = Measured(hdr, {}, {}, {}, {}, set())
    for line in out.splitlines():
        kind, *rest = line.split()
        if kind == "S":
            m.sizes[rest[0]] = (int(rest[1]), int(rest[2]))
        elif kind == "F":
            m.fields.setdefault(rest[0], {})[rest[1]] = (int(rest[2]), int(rest[3]))
        elif kind == "D":
            m.values[rest[0]] = int(rest[1])
        elif kind == "K":
            m.fork_only[rest[0]] = int(rest[1])
        elif kind == "U":
            m.fork_only_in_header.add(rest[0])
    return m


# --- construct layouts -------------------------------------------------------------------

# C unions whose members our construct definitions keep as separate structs: the member
# views are laid over the storage field (construct has no fixed-size union).
UNION_VIEWS = {
    id(abi.acrn_io_request): (
        "reqs",
        {
            "pio_request": abi.acrn_pio_request,
            "pci_request": abi.acrn_pci_request,
            "mmio_request": abi.acrn_mmio_request,
        },
    ),
}

# Header member → our name, where we name the same storage differently (union members,
# and the 16-byte field the hypervisor reads as the VM name).
ALIASES: dict[str, dict[str, str]] = {
    "acrn_vm_creation": {"uuid": "name"},
    "acrn_vm_memmap": {"service_vm_pa": "vma_base"},
    "acrn_vdev": {"id.value": "id", "id.fields": "id"},
    "acrn_io_request_buffer": {"reserved": "req_slot"},
}


def construct_layout(
    con: object, prefix: str = "", base: int = 0, out: dict | None = None
) -> dict[str, tuple[int, int]]:
    """path -> (offset, size) for every named field of a construct Struct, nested included."""
    out = {} if out is None else out
    assert isinstance(con, Struct), con
    off = base
    for sub in con.subcons:
        size = sub.sizeof()
        if isinstance(sub, Renamed) and sub.name:
            path = prefix + sub.name
            out[path] = (off, size)
            inner = sub.subcon
            if isinstance(inner, Struct):
                construct_layout(inner, path + ".", off, out)
            elif isinstance(inner, Array) and isinstance(inner.subcon, Struct):
                esize = inner.subcon.sizeof()
                for i in range(inner.count):
                    out[f"{path}[{i}]"] = (off + i * esize, esize)
                    construct_layout(inner.subcon, f"{path}[{i}].", off + i * esize, out)
        off += size
    view = UNION_VIEWS.get(id(con))
    if view is not None:
        storage, members = view
        soff, ssize = out[prefix + storage]
        for mname, mcon in members.items():
            assert mcon.sizeof() <= ssize
            out[f"{prefix}{storage}.{mname}"] = (soff, mcon.sizeof())
            construct_layout(mcon, f"{prefix}{storage}.{mname}.", soff, out)
    return out


def _alias(struct_name: str, path: str) -> str:
    for c_name, ours in ALIASES.get(struct_name, {}).items():
        if path == c_name or path.startswith(c_name + "."):
            return ours + path[len(c_name):]
    return path


def _construct_for(name: str):
    con = getattr(abi, name, None)
    assert con is not None, f"abi.py has no construct for struct {name} of the header"
    return con


# --- the tests ---------------------------------------------------------------------------


def test_parser_found_the_whole_header(measured: Measured) -> None:
    """Guards the parser itself: the header has these, and the C compiler agreed."""
    for s in ("acrn_io_request", "acrn_vm_creation", "acrn_regs", "acrn_vdev", "acrn_irqfd"):
        assert s in measured.sizes
    assert len(measured.sizes) == 22  # every top-level struct of the header
    assert "reqs.pci_request.reg" in measured.fields["acrn_io_request"]
    assert "vcpu_regs.gprs.r15" in measured.fields["acrn_vcpu_regs"]
    assert "res[2].mem_type" in measured.fields["acrn_mmiodev"]
    assert "ACRN_IOCTL_IRQFD" in measured.values
    assert "ACRN_PMCMD_GET_CX_DATA" in measured.values


def test_every_struct_size(measured: Measured) -> None:
    for name, (size, _align) in measured.sizes.items():
        assert _construct_for(name).sizeof() == size, f"sizeof(struct {name})"


def test_every_field_offset_and_size(measured: Measured) -> None:
    checked = 0
    for name, c_fields in measured.fields.items():
        ours = construct_layout(_construct_for(name))
        hit = set()
        for path, (off, size) in c_fields.items():
            mine = _alias(name, path)
            assert mine in ours, f"{name}.{path}: abi.py has no field {mine!r}"
            assert ours[mine] == (off, size), f"{name}.{path}: (offset, size)"
            hit.add(mine)
            checked += 1
        extra = {p for p in ours if p not in hit and not _is_view(name, p)}
        assert not extra, f"{name}: abi.py fields the header does not have: {sorted(extra)}"
    assert checked > 700  # includes the 16 request slots of acrn_io_request_buffer


def _is_view(struct_name: str, path: str) -> bool:
    return any(f".{m}" in path for m in ("pio_request", "pci_request", "mmio_request"))


def test_every_ioctl_number(measured: Measured) -> None:
    header_ioctls = {
        n: v for n, v in measured.values.items()
        if n.startswith("ACRN_IOCTL_") and n != "ACRN_IOCTL_TYPE"
    }
    assert len(header_ioctls) == 27
    for name, value in header_ioctls.items():
        assert getattr(abi, name) == value, f"{name}: ours {getattr(abi, name):#x}, C {value:#x}"
    fork_only = set(abi.FORK_ONLY_IOCTLS.values())
    ours = {
        n for n in dir(abi)
        if n.startswith("ACRN_IOCTL_") and n != "ACRN_IOCTL_TYPE"
        and getattr(abi, n) not in fork_only
    }
    assert ours == set(header_ioctls), "abi.py ioctls that the header does not define"


def test_fork_only_ioctls_encoded_as_the_kernel_macros_do(measured: Measured) -> None:
    assert measured.fork_only_in_header == set(), "no longer fork-only: the header has them"
    assert measured.fork_only == abi.FORK_ONLY_IOCTLS
    for name, value in measured.fork_only.items():
        assert getattr(abi, f"ACRN_IOCTL_{name}") == value


def test_every_constant(measured: Measured) -> None:
    hdr = measured.header
    names = [n for n in hdr.defines if not n.startswith("ACRN_IOCTL_")] + hdr.enums
    names.append("ACRN_IOCTL_TYPE")
    assert len(names) >= 35
    for name in names:
        ours = name if hasattr(abi, name) else name.removeprefix("ACRN_")
        assert hasattr(abi, ours), f"abi.py lacks {name} (as {name} or {ours})"
        assert getattr(abi, ours) == measured.values[name], name


# --- the hot-path slot views -------------------------------------------------------------


def struct_items(s: struct.Struct) -> list[tuple[int, int]]:
    """(offset, size) of each non-padding item of a struct.Struct format."""
    fmt = s.format
    order, body = fmt[0], fmt[1:]
    assert order in "<=", "slot views must use standard little-endian sizes"
    items = []
    prefix = order
    for count, code in re.findall(r"(\d*)([a-zA-Z?])", body):
        n = int(count or 1)
        if code == "x":
            prefix += f"{n}x"
            continue
        if code == "s":
            items.append((struct.calcsize(prefix), n))
            prefix += f"{n}s"
            continue
        for _ in range(n):
            items.append((struct.calcsize(prefix), struct.calcsize(order + code)))
            prefix += code
    assert struct.calcsize(prefix) == s.size
    return items


def _at(view: struct.Struct, base: int) -> list[tuple[int, int]]:
    return [(base + off, size) for off, size in struct_items(view)]


def test_slot_constants(measured: Measured) -> None:
    f = measured.fields["acrn_io_request"]
    size, align = measured.sizes["acrn_io_request"]
    assert (size, size) == (abi.IOREQ_SLOT_SIZE, abi.ACRN_IO_REQUEST_SIZE)
    assert align == abi.IOREQ_SLOT_SIZE
    buf_size, _ = measured.sizes["acrn_io_request_buffer"]
    assert abi.IOREQ_PAGE_SIZE == abi.ACRN_IO_REQUEST_BUFFER_SIZE == buf_size
    buf = measured.fields["acrn_io_request_buffer"]
    for v in range(abi.ACRN_IO_REQUEST_MAX):
        assert abi.slot_offset(v) == buf[f"req_slot[{v}]"][0]

    def off(path: str) -> int:
        return f[path][0]

    assert off("type") == abi.SLOT_TYPE_OFF
    assert off("completion_polling") == abi.SLOT_POLLING_OFF
    assert off("reqs") == abi.SLOT_REQS_OFF
    assert off("kernel_handled") == abi.SLOT_KERNEL_HANDLED_OFF
    assert off("processed") == abi.SLOT_PROCESSED_OFF
    for kind in ("pio_request", "mmio_request", "pci_request"):
        assert off(f"reqs.{kind}.direction") == abi.SLOT_DIRECTION_OFF
        assert off(f"reqs.{kind}.size") == abi.SLOT_SIZE_OFF
        assert off(f"reqs.{kind}.value") == abi.SLOT_VALUE_OFF
    for kind in ("pio_request", "mmio_request"):
        assert off(f"reqs.{kind}.address") == abi.SLOT_ADDRESS_OFF
    assert off("reqs.pci_request.bus") == abi.SLOT_PCI_BDFR_OFF
    bdfr = [off(f"reqs.pci_request.{n}") for n in ("bus", "dev", "func", "reg")]
    assert bdfr == [abi.SLOT_PCI_BDFR_OFF + 4 * i for i in range(4)]


def test_slot_struct_views(measured: Measured) -> None:
    f = measured.fields["acrn_io_request"]
    assert _at(abi.SLOT_TYPE, abi.SLOT_TYPE_OFF) == [f["type"]]
    assert _at(abi.SLOT_STATE, abi.SLOT_KERNEL_HANDLED_OFF) == [
        f["kernel_handled"], f["processed"]
    ]
    assert _at(abi.SLOT_U32, abi.SLOT_PROCESSED_OFF) == [f["processed"]]
    for kind in ("pio_request", "mmio_request"):
        want = [f[f"reqs.{kind}.{n}"] for n in ("direction", "reserved", "address", "size")]
        assert _at(abi.SLOT_ADDR_REQ, abi.SLOT_REQS_OFF) == want, kind
    want = [f[f"reqs.pci_request.{n}"] for n in abi.PCI_REQ_FIELDS]
    assert _at(abi.SLOT_PCI_REQ, abi.SLOT_REQS_OFF) == want
    # value widths: u32 for PIO and PCICFG, u64 for MMIO
    assert _at(abi.SLOT_U32, abi.SLOT_VALUE_OFF) == [f["reqs.pio_request.value"]]
    assert _at(abi.SLOT_U32, abi.SLOT_VALUE_OFF) == [f["reqs.pci_request.value"]]
    assert _at(abi.SLOT_U64, abi.SLOT_VALUE_OFF) == [f["reqs.mmio_request.value"]]


def test_struct_items_helper_sees_padding() -> None:
    assert struct_items(struct.Struct("<I12xQI")) == [(0, 4), (16, 8), (24, 4)]
    assert struct_items(struct.Struct("<2HQ")) == [(0, 2), (2, 2), (4, 8)]


def test_construct_layout_helper_nests() -> None:
    lay = construct_layout(abi.acrn_vcpu_regs)
    assert lay["vcpu_regs"] == (8, 288)
    assert lay["vcpu_regs.gdt.base"] == (8 + 130, 8)
    lay = construct_layout(abi.acrn_mmiodev)
    assert lay["res[1].size"] == (8 + 32 + 16, 8)


def test_header_parser_on_a_sample() -> None:
    hdr = parse_header(
        "#define N 2\n#define F(x) x\nstruct a { __u32 x; union { __u8 b[4]; __u32 c; };"
        " struct { __u16 p; } q[N]; } __attribute__((packed));\n"
        "enum e { E0, E1 = 5, };\n"
    )
    assert hdr.defines == {"N": "2"}
    assert hdr.enums == ["E0", "E1"]
    assert field_paths(hdr, hdr.structs["a"]) == [
        "x", "b", "c", "q", "q[0]", "q[0].p", "q[1]", "q[1].p"
    ]

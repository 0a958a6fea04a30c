"""Bytes as gcc lays them out: a C program including <linux/acrn.h> fills structs with
the values a test gives (designated field assignments) and prints their bytes, so a test
compares what the device model sent with what C code against the real header would send."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

HEADER = Path("/usr/include/linux/acrn.h")

needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None or not HEADER.exists(),
                               reason="gcc and linux/acrn.h (linux-libc-dev) are needed")


def gcc_struct_bytes(workdir: Path, items: dict[str, tuple[str, list[str]]]) -> dict[str, bytes]:
    """``{label: (struct name, ["field = value", ...])}`` → the bytes of each struct,
    zeroed first and then assigned field by field, as C code against the header does (a
    statement naming ``V.`` is used as it is, with ``V`` the struct)."""
    lines = ["#include <stdio.h>", "#include <string.h>", "#include <linux/acrn.h>",
             "static void dump(const char *label, const void *p, size_t n) {",
             "  const unsigned char *b = p; printf(\"%s \", label);",
             "  for (size_t i = 0; i < n; i++) { printf(\"%02x\", b[i]); }",
             "  printf(\"\\n\"); }",
             "int main(void) {"]
    for n, (label, (struct, assignments)) in enumerate(items.items()):
        lines.append(f"  {{ struct {struct} v{n}; memset(&v{n}, 0, sizeof v{n});")
        lines += [f"    {a.replace('V.', f'v{n}.')};" if "V." in a else f"    v{n}.{a};"
                  for a in assignments]
        lines.append(f"    dump(\"{label}\", &v{n}, sizeof v{n}); }}")
    lines += ["  return 0;", "}"]
    src, exe = workdir / "layout.c", workdir / "layout"
    src.write_text("\n".join(lines) + "\n")
    subprocess.run(["gcc", "-std=gnu11", "-Wall", "-Werror", "-o", str(exe), str(src)],
                   check=True, capture_output=True, text=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {label: bytes.fromhex(hexed) for label, hexed in
            (line.split(" ", 1) for line in out.splitlines())}


def gcc_values(workdir: Path, exprs: dict[str, str]) -> dict[str, int]:
    """``{label: C expression}`` evaluated against the header, as unsigned 64-bit."""
    lines = ["#include <stdio.h>", "#include <linux/ioctl.h>", "#include <linux/acrn.h>",
             "int main(void) {"]
    lines += [f"  printf(\"{k} %llu\\n\", (unsigned long long)({v}));" for k, v in exprs.items()]
    lines += ["  return 0;", "}"]
    src, exe = workdir / "values.c", workdir / "values"
    src.write_text("\n".join(lines) + "\n")
    subprocess.run(["gcc", "-std=gnu11", "-Wall", "-Werror", "-o", str(exe), str(src)],
                   check=True, capture_output=True, text=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}

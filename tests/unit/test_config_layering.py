"""The VM description sits low in the stack: config/ imports only the bottom modules, so no
device, platform, backend or logging module can pull it into an import cycle."""

from __future__ import annotations

import ast
import pathlib

from tests.support.paths import ROOT

PACKAGE = pathlib.Path(ROOT) / "devicemodel"
#: what config/ may import from devicemodel, besides its own modules
BELOW_CONFIG = {"devicemodel.errors", "devicemodel.slot", "devicemodel.memory",
                "devicemodel.hostinfo"}
#: the bottom modules themselves import nothing from devicemodel
BOTTOM = ["errors.py", "slot.py", "memory.py", "hostinfo.py"]


def _imports(path: pathlib.Path) -> set[str]:
    """Every devicemodel module a file imports, lazy and TYPE_CHECKING imports included."""
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    package = package.removesuffix(".__init__")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.add(name)
    return {n for n in found if n.startswith("devicemodel")}


def test_config_imports_only_the_bottom_of_the_stack():
    for path in sorted((PACKAGE / "config").glob("*.py")):
        outside = {n for n in _imports(path) if not n.startswith("devicemodel.config")}
        assert outside <= BELOW_CONFIG, (path.name, outside - BELOW_CONFIG)


def test_the_bottom_imports_nothing_of_ours():
    for name in BOTTOM:
        assert _imports(PACKAGE / name) == set(), name


def test_logsetup_takes_only_the_setting_parser_from_config():
    assert _imports(PACKAGE / "logsetup.py") == {"devicemodel.config.logger_setting"}


def test_modules_of_the_description_and_its_front_ends_stay_small():
    for path in [*(PACKAGE / "config").glob("*.py"), PACKAGE / "cli.py", PACKAGE / "vmcheck.py",
                 PACKAGE / "lspci.py", PACKAGE / "logsetup.py", PACKAGE / "hostinfo.py"]:
        assert len(path.read_text().splitlines()) <= 600, path

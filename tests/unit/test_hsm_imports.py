"""The hypervisor boundary's imports, read from the source: hsm/ takes part in no import
cycle (TYPE_CHECKING and function-level imports included), and the KVM backend's package
imports nothing outside hsm/."""

from __future__ import annotations

from tests.support.import_graph import cycles, import_graph
from tests.support.paths import REPO

GRAPH = import_graph(REPO, "devicemodel")


def test_the_walker_sees_relative_lazy_and_type_checking_imports(tmp_path):
    pkg = tmp_path / "p"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("def f():\n    from .a import x\n")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\n"
                              "if TYPE_CHECKING:\n    from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("from .. import a\nimport p\n")
    graph = import_graph(tmp_path, "p")
    assert graph == {"p": {"p.a"}, "p.a": {"p.sub.b"}, "p.sub": set(),
                     "p.sub.b": {"p.a", "p"}}
    assert cycles(graph) == [["p", "p.a", "p.sub.b"]]


def test_no_import_cycle_goes_through_hsm():
    through_hsm = [c for c in cycles(GRAPH) if any(m.startswith("devicemodel.hsm") for m in c)]
    assert through_hsm == []


def test_the_kvm_backend_imports_only_the_hypervisor_boundary():
    kvm = {m: deps for m, deps in GRAPH.items() if m.startswith("devicemodel.hsm.kvm")}
    assert "devicemodel.hsm.kvm.hypervisor" in kvm
    outside = {(m, d) for m, deps in kvm.items() for d in deps
               if not d.startswith("devicemodel.hsm")}
    assert outside == set()

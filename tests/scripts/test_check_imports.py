"""scripts/check_imports.py: the floors come from the package tree, and a private name used across
modules, an upward import or a cycle fails the check (and the real tree passes it)."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("check_imports", ROOT / "scripts" / "check_imports.py")
ci = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ci)


def _tree(tmp_path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = tmp_path / "src" / "repnet" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path


def test_the_package_passes():
    graph, private = ci.scan()
    cycles, upward = ci.violations(graph)
    assert (cycles, upward, private) == ([], [], [])
    assert ci.main() == 0


def test_a_private_name_imported_across_modules_fails(tmp_path):
    root = _tree(tmp_path, {"__init__.py": "", "errors.py": "def _hidden(): pass\n",
                            "api.py": "from repnet.errors import _hidden\n",
                            "training/__init__.py": "", "training/loop.py": "from ..errors import _hidden as h\n",
                            "training/run.py": "from repnet import errors\nerrors._hidden()\n"})
    (root / "tests").mkdir()
    (root / "tests" / "test_x.py").write_text("from repnet.errors import _hidden\n")
    graph, private = ci.scan(root / "src", ("tests",), root)
    assert sorted(p.split(" ", 1)[0] for p in private) == ["src/repnet/api.py:1", "src/repnet/training/loop.py:1",
                                                             "src/repnet/training/run.py:2", "tests/test_x.py:1"]
    # a module's own private names and dunders are fine
    root2 = _tree(tmp_path / "b", {"__init__.py": "", "errors.py": "def _own(): pass\n_own()\n__all__ = []\n",
                                   "api.py": "from repnet.errors import __doc__\n"})
    assert ci.scan(root2 / "src", (), root2)[1] == []


def test_an_upward_import_and_a_cycle_fail_and_files_inside_a_package_need_no_floor(tmp_path):
    root = _tree(tmp_path, {"__init__.py": "", "errors.py": "from repnet.training import loop\n",
                            "training/__init__.py": "", "training/loop.py": "", "training/new_file.py": "import repnet.training.loop\n",
                            "memory/__init__.py": "", "memory/a.py": "from repnet.memory import b\n",
                            "memory/b.py": "from repnet.memory import a\n"})
    cycles, upward = ci.violations(ci.scan(root / "src", (), root)[0])
    assert ("repnet.errors", "repnet.training.loop") in upward and {m for m, _ in upward} == {"repnet.errors"}
    assert [c[0] for c in cycles] == ["repnet.memory.a"]
    root2 = _tree(tmp_path / "c", {"__init__.py": "", "newpkg/__init__.py": ""})
    with pytest.raises(SystemExit, match="newpkg has no floor"):
        ci.violations(ci.scan(root2 / "src", (), root2)[0])

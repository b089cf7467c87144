"""The import structure of both packages: no circle anywhere (every sub-package walked), the kernel of
gimlens loads without its token-attribution apps, and the top-level names still resolve lazily."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gimlens", "circuits")
#: the apps of gimlens: circuits and the kernel must load without them
APPS = ("gimlens.attribution", "gimlens.layerwise", "gimlens.evaluate", "gimlens.plot")
KERNEL = ("errors", "runtime", "validation", "distributed", "quadrature", "heads", "rules", "gim", "models",
          "memory")


def _modules() -> dict[str, Path]:
    """Every module of both packages (sub-packages included) -> its file."""
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that module `name` imports anywhere in it (inside functions and
    `TYPE_CHECKING` blocks too: a circle hidden there is still a circle)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{a.name}" for a in node.names] + [module]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for t in targets:
            if t in known:  # `from pkg import submodule` names the submodule, else the module itself
                out.add(t)
                break
    return out - {name}


def _circle(deps: dict[str, set[str]]) -> list[str] | None:
    done, visiting = set(), []

    def visit(m):
        if m in visiting:
            return visiting[visiting.index(m):] + [m]
        if m in done:
            return None
        visiting.append(m)
        for d in sorted(deps[m]):
            if found := visit(d):
                return found
        visiting.pop()
        done.add(m)
        return None

    for m in sorted(deps):
        if found := visit(m):
            return found
    return None


def test_no_module_of_either_package_is_in_an_import_circle():
    modules = _modules()
    assert {"circuits._engine.scoring", "circuits.tasks.ioi", "gimlens.attribution.methods"} <= set(modules)
    deps = {name: _imports(name, path, set(modules)) for name, path in modules.items()}
    assert "gimlens.errors" in deps["circuits.graph"]  # imports across packages are seen
    # the graph is the data type; its views and the selection build on it, not the reverse
    assert not {"circuits.export", "circuits.render"} & deps["circuits.graph"]
    assert "circuits.graph" not in deps["circuits.prune"]
    circle = _circle(deps)
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_the_circle_finder_finds_a_circle_in_a_sub_package():
    # the finder itself: a circle two levels down is reported, a chain is not
    assert _circle({"a.b.c": {"a.b.d"}, "a.b.d": {"a.b.c"}}) == ["a.b.c", "a.b.d", "a.b.c"]
    assert _circle({"a.b.c": {"a.b.d"}, "a.b.d": set()}) is None


def test_relative_imports_resolve_to_the_module_they_name(tmp_path):
    known = {"p", "p.q", "p.q.r", "p.s"}
    f = tmp_path / "r.py"
    f.write_text("from . import __name__\nfrom ..s import x\nfrom p.q import r\n")
    assert _imports("p.q.r", f, known) == {"p.q", "p.s"}  # `from p.q import r` is itself


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys\n{statement}\nprint(' '.join(sorted(sys.modules)))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    return set(run.stdout.split())


@pytest.mark.parametrize("statement", [
    "import circuits",
    "from gimlens.errors import GimlensError",
    "import gimlens",
    "import " + ", ".join(f"gimlens.{m}" for m in KERNEL),
])
def test_circuits_and_the_kernel_load_without_the_apps(statement):
    loaded = _loaded_after(statement)
    assert "gimlens" in loaded
    assert not loaded & set(APPS), f"{statement!r} loaded {sorted(loaded & set(APPS))}"
    assert not any(m.startswith("gimlens.attribution.") for m in loaded)


def test_every_top_level_name_resolves_on_first_use():
    loaded = _loaded_after("import gimlens\nfor n in gimlens.__all__: getattr(gimlens, n)")
    assert set(APPS[:3]) <= loaded
    import gimlens
    import gimlens.attribution
    import gimlens.layerwise

    assert gimlens.explain is gimlens.attribution.explain
    assert gimlens.LayerwiseResult is gimlens.layerwise.LayerwiseResult
    assert gimlens.evaluate is sys.modules["gimlens.evaluate"]
    assert set(gimlens.__all__) <= set(dir(gimlens))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        gimlens.nope  # noqa: B018
    from gimlens import GIMConfig, load_model  # noqa: F401

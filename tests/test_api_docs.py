"""Every public module and every public name of both packages is on an API reference page.

Public modules are found by walking `gimlens` and `circuits` (no path part starting with `_`); a module's public
names are its `__all__` (or, without one, the public classes and functions it defines). A name counts as documented
where mkdocstrings renders it: a `::: module` directive on a `docs/api/*.md` page renders the module's members
(its `__all__`, re-exports included) unless it says `members: false` (or names other members), and `::: a.b.c` renders
that object. A re-exported name (`gimlens.GIM`) is documented where the object is defined (`gimlens.gim.GIM`).
A new module or export fails here until a page lists it.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
API = ROOT / "docs" / "api"
PACKAGES = ("gimlens", "circuits")


def _public_modules() -> list[str]:
    names = []
    for package in PACKAGES:
        pkg = importlib.import_module(package)
        names.append(package)
        names += [i.name for i in pkgutil.walk_packages(pkg.__path__, prefix=package + ".")]
    return sorted(n for n in set(names) if not any(p.startswith("_") for p in n.split(".")))


def _public_names(module_name: str) -> list[str]:
    module = importlib.import_module(module_name)
    if hasattr(module, "__all__"):
        return list(module.__all__)
    return [n for n, obj in vars(module).items() if not n.startswith("_")
            and (inspect.isclass(obj) or inspect.isfunction(obj)) and obj.__module__ == module_name]


def _directives() -> dict[str, set[str] | None]:
    """`::: path` directives of the API pages -> the members they render (None: all of them)."""
    found: dict[str, set[str] | None] = {}
    for page in sorted(API.glob("*.md")):
        text = page.read_text()
        for m in re.finditer(r"^::: *([\w.]+)[^\n]*\n((?:[ \t]+[^\n]*\n?)*)", text, re.M):
            path, options = m.group(1), m.group(2)
            members = re.search(r"^\s*members:\s*(.*)$", options, re.M)
            if members is None:
                rendered = None
            elif members.group(1).strip().lower() in ("false", "[]", "no"):
                rendered = set()
            else:
                rendered = set(re.findall(r"[\w]+", members.group(1)))
            old = found.get(path, set())
            found[path] = None if rendered is None or old is None else old | rendered
    return found


def _renders(directives, module: str, name: str) -> bool:
    if f"{module}.{name}" in directives:
        return True
    if module not in directives:
        return False
    members = directives[module]
    return members is None or name in members


def _canonical_module(module: str, name: str) -> str | None:
    obj = getattr(importlib.import_module(module), name, None)
    home = getattr(obj, "__module__", None) if (inspect.isclass(obj) or inspect.isfunction(obj)) else None
    return home if home and home != module else None


def test_every_public_module_has_a_directive_on_an_api_page():
    directives = _directives()
    missing = [m for m in _public_modules() if m not in directives]
    assert not missing, f"public modules on no docs/api/*.md page (add '::: <module>'): {missing}"


def test_every_public_name_is_rendered_on_an_api_page():
    directives = _directives()
    missing = []
    for module in _public_modules():
        for name in _public_names(module):
            obj = getattr(importlib.import_module(module), name, None)
            if inspect.ismodule(obj):  # a re-exported submodule: it needs its own directive
                if obj.__name__ not in directives:
                    missing.append(f"{module}.{name}")
                continue
            home = _canonical_module(module, name)
            if _renders(directives, module, name) or (home and _renders(directives, home, name)):
                continue
            missing.append(f"{module}.{name}")
    assert not missing, f"public names rendered on no docs/api/*.md page: {missing}"


def test_directives_name_importable_objects():
    bad = []
    for path in _directives():
        module, _, attr = path.rpartition(".")
        try:
            importlib.import_module(path)
        except ImportError:
            if not module or not hasattr(importlib.import_module(module), attr):
                bad.append(path)
    assert not bad, f"docs/api directives that name nothing importable: {bad}"


def test_the_gimlens_page_lists_every_top_level_export():
    import gimlens

    intro = (API / "gimlens.md").read_text().split(":::", 1)[0]
    missing = [name for name in gimlens.__all__ if f"`{name}`" not in intro]
    assert not missing, f"docs/api/gimlens.md's introduction misses {missing}"


def test_the_check_sees_a_missing_module(monkeypatch):
    real = _directives()
    monkeypatch.setattr(f"{__name__}._directives", lambda: {k: v for k, v in real.items() if k != "gimlens.heads"})
    with pytest.raises(AssertionError, match="gimlens.heads"):
        test_every_public_module_has_a_directive_on_an_api_page()
    with pytest.raises(AssertionError, match="gimlens.heads.head_outputs"):
        test_every_public_name_is_rendered_on_an_api_page()

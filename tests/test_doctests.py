"""Every docstring example of every module in ``gimlens`` and ``circuits`` runs as a doctest.

Modules are discovered by walking the two packages, so a new module is covered without editing
this file. A module that fails to import fails its test too.
"""

from __future__ import annotations

import doctest
import importlib
import io
import pkgutil
import types
import warnings

import matplotlib
import pytest

matplotlib.use("Agg")

PACKAGES = ("gimlens", "circuits")
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _module_names() -> list[str]:
    names = []
    for package in PACKAGES:
        pkg = importlib.import_module(package)
        names.append(package)
        for info in pkgutil.walk_packages(pkg.__path__, prefix=package + ".", onerror=lambda n: None):
            names.append(info.name)
    names.append("gimlens_cli")  # the console script's dispatch, above both packages
    return sorted(set(names))


def run_doctests(module: types.ModuleType) -> tuple[int, int, str]:
    """Run the docstring examples of ``module`` (not of what it imports).

    Returns ``(failed, attempted, report)``; ``report`` holds doctest's failure output.
    """
    finder = doctest.DocTestFinder(exclude_empty=True)
    out = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    for test in finder.find(module, module.__name__):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            runner.run(test, out=out.write)
    return runner.failures, runner.tries, out.getvalue()


@pytest.mark.parametrize("name", _module_names())
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    failed, attempted, report = run_doctests(module)
    assert failed == 0, f"{failed} of {attempted} docstring examples of {name} failed:\n{report}"


def test_doctest_runner_reports_a_wrong_example():
    module = types.ModuleType("fake_module")
    exec(
        'def f():\n'
        '    """Doubles.\n\n'
        '    >>> 1 + 1\n'
        '    3\n'
        '    >>> "a" * 2\n'
        "    'aa'\n"
        '    """\n',
        module.__dict__,
    )
    module.f.__module__ = "fake_module"
    failed, attempted, report = run_doctests(module)
    assert (failed, attempted) == (1, 2)
    assert "Expected:\n    3\nGot:\n    2" in report


def test_every_module_of_both_packages_is_collected():
    names = _module_names()
    assert {"gimlens", "gimlens.gim", "gimlens.rules", "circuits", "circuits.graph"} <= set(names)
    assert any(n.startswith("circuits.tasks.") for n in names)

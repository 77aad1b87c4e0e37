"""Every docstring example (``>>>``) of the three packages runs and prints what it shows, as a
reader who copies it would see. Examples that need data or a loader are marked ``+SKIP`` where
they stand; the rest run here (about 10 s)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

PACKAGES = ("recon_aux", "adapters", "benchmarks")


def module_names() -> list[str]:
    names = []
    for package in PACKAGES:
        names.append(package)
        path = importlib.import_module(package).__path__
        names += [info.name for info in pkgutil.walk_packages(path, f"{package}.")]
    return sorted(names)


def test_every_module_with_examples_is_found():
    finder = doctest.DocTestFinder()
    with_examples = {name for name in module_names()
                     if any(t.examples for t in finder.find(importlib.import_module(name)))}
    assert {"recon_aux.objective", "recon_aux.perceptual", "adapters.data.augment",
            "adapters.backbones.nin"} <= with_examples


@pytest.mark.parametrize("name", module_names())
def test_docstring_examples_run(name, capsys):
    module = importlib.import_module(name)
    failed, _ = doctest.testmod(module, report=False)
    assert failed == 0, f"{name}: {failed} docstring example(s) failed:\n{capsys.readouterr().out}"

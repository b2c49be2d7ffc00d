"""Static checks over the whole tree: names that would fail at run time.

pyflakes finds, without running anything, a name used before it is bound
(`UndefinedLocal`: a later local assignment shadows a module of the same
name, as `experiments/best_of_n.py` once did with `rewards`, so its
no-reward-model path died with UnboundLocalError), an undefined name, and
the like. Style findings (unused imports and variables) are not failures.
"""
import pathlib

import pytest

pyflakes_api = pytest.importorskip("pyflakes.api")
from pyflakes import messages, reporter  # noqa: E402

from tests.conftest import ROOT  # noqa: E402

FAILURES = (messages.UndefinedName, messages.UndefinedLocal, messages.UndefinedExport,
            messages.DuplicateArgument, messages.ReturnOutsideFunction,
            messages.YieldOutsideFunction, messages.TwoStarredExpressions,
            messages.StringDotFormatMissingArgument, messages.PercentFormatMissingArgument,
            messages.MultiValueRepeatedKeyLiteral, messages.IsLiteral)


class _Collect(reporter.Reporter):
    def __init__(self):
        self.found = []

    def flake(self, message):
        if isinstance(message, FAILURES):
            self.found.append(str(message))

    def syntaxError(self, filename, msg, lineno, offset, text):
        self.found.append(f"{filename}:{lineno}: syntax error: {msg}")

    def unexpectedError(self, filename, msg):
        self.found.append(f"{filename}: {msg}")


def test_no_name_errors_anywhere_in_the_tree():
    root = pathlib.Path(ROOT)
    files = [p for d in ("jaxreward", "experiments", "configs", "benchmarks", "tests")
             for p in sorted((root / d).rglob("*.py"))]
    assert len(files) > 50
    out = _Collect()
    for path in files:
        pyflakes_api.checkPath(str(path), out)
    assert not out.found, "\n".join(out.found)

"""``hdrq --help`` and argument errors answer without importing torch, Brevitas or onnxruntime
(issue 22: every call spent 4–8 s importing first). A test of the cause, not of a timing: the
command runs in a fresh interpreter, which reports the heavy modules it loaded."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import warnings

import pytest

HEAVY = ("torch", "brevitas", "onnxruntime", "onnx", "numpy")

_PROBE = """
import json, sys
{preload}
from hdrq_plugin.cli import main
try:
    code = main({argv!r})
except SystemExit as stop:
    code = stop.code
print(json.dumps({{"code": code, "heavy": sorted(m for m in {heavy!r} if m in sys.modules)}}))
"""


def heavy_modules_after(argv: list[str], preload: str = "") -> tuple[int, list[str]]:
    """Exit code of ``hdrq ARGV`` in a fresh interpreter and the heavy modules it had imported."""
    done = subprocess.run([sys.executable, "-c", _PROBE.format(argv=argv, heavy=HEAVY, preload=preload)],
                          capture_output=True, text=True, timeout=120, check=True)
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    return answer["code"], answer["heavy"]


@pytest.mark.parametrize("argv, code", [
    (["--help"], 0),
    (["quantize-targets", "--help"], 0),
    (["demo", "--seed", "-1"], 2),                      # a bound, checked after parsing
    (["merge", "a.pt", "b.pt", "--out", "m.pt", "--trials", "0"], 2),
    (["export", "m.pt", "--out", "m.onnx", "--weights", "int2"], 2),   # a choice
    (["no-such-command"], 2),
])
def test_help_and_argument_errors_import_no_heavy_library(argv, code):
    assert heavy_modules_after(argv) == (code, [])


def test_the_probe_sees_a_heavy_import():
    """The check above can fail: a command that imports torch is reported."""
    assert "torch" in heavy_modules_after(["--help"], preload="import torch")[1]


def test_importing_the_package_imports_no_heavy_library():
    done = subprocess.run([sys.executable, "-c", f"import sys, hdrq_plugin; print([m for m in {HEAVY!r} "
                           "if m in sys.modules])"], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"


def test_every_public_name_is_the_object_of_its_module():
    import hdrq_plugin

    for name in hdrq_plugin.__all__:
        module = importlib.import_module(f"hdrq_plugin.{hdrq_plugin._PUBLIC_NAMES[name]}")
        assert getattr(hdrq_plugin, name) is getattr(module, name), name
    namespace: dict = {}
    exec("from hdrq_plugin import *", namespace)
    assert set(hdrq_plugin.__all__) <= set(namespace)


def test_an_unknown_name_is_still_an_attribute_error():
    import hdrq_plugin

    with pytest.raises(AttributeError, match="no_such_name"):
        hdrq_plugin.no_such_name  # noqa: B018


def test_old_names_still_import_with_a_warning():
    import hdrq_plugin
    from hdrq_plugin import cli, cli_commands, quant

    with pytest.warns(DeprecationWarning, match="integer_weight"):
        assert hdrq_plugin.integer_weight is quant.integer_weight
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from hdrq_plugin.quantizers import HDRQQuantizer  # a 0.1 module path
    assert HDRQQuantizer is quant.HDRQQuantizer
    assert cli.load_inputs is cli_commands.load_inputs  # a 0.1 name of the CLI module


def test_subpackages_are_attributes_of_the_package_as_before():
    done = subprocess.run([sys.executable, "-c", "import hdrq_plugin; print(hdrq_plugin.export.validate.__name__, "
                           "hdrq_plugin.run.checkpoint.__name__)"], capture_output=True, text=True, timeout=300,
                          check=True)
    assert done.stdout.split() == ["validate", "hdrq_plugin.run.checkpoint"]


def test_every_listed_subpackage_exists():
    import hdrq_plugin

    for name in hdrq_plugin._SUBPACKAGES:
        assert getattr(hdrq_plugin, name) is importlib.import_module(f"hdrq_plugin.{name}")

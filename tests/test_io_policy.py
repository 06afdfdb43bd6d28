"""One overwrite policy, atomic writes, no leftovers, reproducible bytes, inputs checked early (issue 20)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
from tiny_models import tiny_resnet

from hdrq_plugin import _io
from hdrq_plugin._io import (
    STALE_TEMP_SECONDS,
    atomic_write_path,
    check_outputs,
    remove_stale_temp_files,
    save_torch_atomic,
)
from hdrq_plugin.cli import EXIT_BAD_INPUT, main
from hdrq_plugin.errors import InputError, OutputExistsError
from hdrq_plugin.run.checkpoint import ModelRecipe, save_float_model, save_quantized
from hdrq_plugin.run.inputs import check_ray_address, check_seed, parse_input_shape

RECIPE = ModelRecipe("tiny_models:tiny_resnet", {"width": 4, "seed": 0})


# --- check_outputs ------------------------------------------------------------------------------

def test_an_output_that_is_an_input_is_refused_even_with_overwrite(tmp_path):
    source = tmp_path / "m.pt"
    source.write_bytes(b"model")
    os.symlink(source, tmp_path / "link.pt")
    for alias in (source, tmp_path / "sub" / ".." / "m.pt", tmp_path / "link.pt"):
        with pytest.raises(OutputExistsError, match="is an input"):
            check_outputs([source], [alias], overwrite=True)


def test_an_existing_output_needs_overwrite(tmp_path):
    out = tmp_path / "o.pt"
    check_outputs([], [out])
    out.write_bytes(b"old")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        check_outputs([], [out])
    check_outputs([], [out], overwrite=True)


def test_a_directory_is_never_an_output(tmp_path):
    with pytest.raises(OutputExistsError, match="directory"):
        check_outputs([], [tmp_path], overwrite=True)


# --- temp files -----------------------------------------------------------------------------------

def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_killed_writers_temp_file_is_removed_by_the_next_writer(tmp_path):
    dead = tmp_path / f".m.pt.{_io._HOST}-{_dead_pid()}.0123abcd{_io.TEMP_SUFFIX}"
    alive = tmp_path / f".m.pt.{_io._HOST}-{os.getpid()}.89abcdef{_io.TEMP_SUFFIX}"
    other_host_old = tmp_path / f".m.pt.elsewhere-1.00000000{_io.TEMP_SUFFIX}"
    other_host_new = tmp_path / f".m.pt.elsewhere-2.00000000{_io.TEMP_SUFFIX}"
    foreign = tmp_path / ".m.pt.abcdefgh.tmp"  # not our pattern: never touched
    for path in (dead, alive, other_host_old, other_host_new, foreign):
        path.write_bytes(b"half")
    old = time.time() - STALE_TEMP_SECONDS - 10
    os.utime(other_host_old, (old, old))
    os.utime(foreign, (old, old))
    save_torch_atomic(tmp_path / "x.pt", {"a": torch.zeros(1)})
    assert not dead.exists() and not other_host_old.exists()
    assert alive.exists() and other_host_new.exists() and foreign.exists()
    assert remove_stale_temp_files(tmp_path) == []


def test_a_failed_write_leaves_no_temp_file_and_keeps_the_old_file(tmp_path):
    out = tmp_path / "o.txt"
    out.write_text("old")
    with pytest.raises(ZeroDivisionError), atomic_write_path(out) as tmp:
        tmp.write_text("half")
        raise ZeroDivisionError("mid-write")
    assert out.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["o.txt"]


def test_checkpoints_are_byte_reproducible(tmp_path):
    model = RECIPE.build()
    save_float_model(tmp_path / "a.pt", model, RECIPE)
    save_float_model(tmp_path / "b.pt", model, RECIPE)
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
    save_quantized(tmp_path / "qa.pt", model, recipe=RECIPE, bits="w4a4")
    save_quantized(tmp_path / "qb.pt", model, recipe=RECIPE, bits="w4a4")
    assert (tmp_path / "qa.pt").read_bytes() == (tmp_path / "qb.pt").read_bytes()


# --- inputs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ("abc", "comma-separated integers"), ("1,3,x,32", "comma-separated integers"), ("0,3,32,32", ">= 1"),
    ("3", "N,C"), ("100000,3,16,16", "batch axis is dynamic"), ("1,3,100000,100000", "GiB"),
])
def test_a_bad_input_shape_is_one_clear_line(text, message):
    with pytest.raises(InputError, match=message):
        parse_input_shape(text)


def test_a_good_input_shape_parses():
    assert parse_input_shape("1, 3,32,32") == (1, 3, 32, 32)


@pytest.mark.parametrize("seed", [-1, 2**32, 2**70])
def test_a_seed_out_of_range_is_refused(seed):
    with pytest.raises(InputError, match="out of range"):
        check_seed(seed)


def test_a_ray_address_that_does_not_answer_is_refused_quickly():
    start = time.perf_counter()
    with pytest.raises(InputError, match="does not answer"):
        check_ray_address("127.0.0.1:1", timeout=1.0)
    assert time.perf_counter() - start < 5
    with pytest.raises(InputError, match="host:port"):
        check_ray_address("127.0.0.1")


# --- the CLI ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    folder = tmp_path_factory.mktemp("io")
    save_float_model(folder / "float.pt", RECIPE.build(), RECIPE)
    torch.save({"inputs": torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(0))}, folder / "c.pt")
    assert main(["quantize", str(folder / "float.pt"), "--calibration", str(folder / "c.pt"), "--method", "rtn",
                 "--bits", "w4a8", "--out", str(folder / "q.pt")]) == 0
    return folder


def test_export_infers_the_input_shape_recorded_by_quantize(quantized, tmp_path):
    assert main(["export", str(quantized / "q.pt"), "--out", str(tmp_path / "q.onnx")]) == 0


def test_export_ort_writes_onnx_and_ort_as_one_unit_and_again_with_overwrite(quantized, tmp_path, capsys):
    out = tmp_path / "q.onnx"
    argv = ["export", str(quantized / "q.pt"), "--out", str(out), "--ort"]
    assert main(argv) == 0
    first = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert set(first) == {"q.onnx", "q.ort", "q.required_operators.config"}
    assert main(argv) == EXIT_BAD_INPUT and "--overwrite" in capsys.readouterr().err
    time.sleep(0.01)
    assert main([*argv, "--overwrite"]) == 0
    second = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert set(second) == set(first) and all(second[n] > first[n] for n in first)


def test_a_failing_ort_conversion_leaves_neither_file(quantized, tmp_path, capsys):
    code = main(["export", str(quantized / "q.pt"), "--out", str(tmp_path / "q.onnx"), "--weights", "int4", "--ort"])
    err = capsys.readouterr().err
    assert code in (2, 3) and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


def test_an_unexpected_error_is_one_line_with_the_traceback_file(monkeypatch, capsys, quantized, tmp_path):
    from hdrq_plugin import cli_commands

    def broken(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setitem(cli_commands.COMMANDS, "export", broken)
    assert main(["export", str(quantized / "q.pt"), "--out", str(tmp_path / "x.onnx")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ZeroDivisionError" in err and "--debug" in err
    where = err.split("traceback in ")[1].split(",")[0]
    assert "Traceback" in open(where).read()
    os.unlink(where)
    with pytest.raises(ZeroDivisionError):
        main(["--debug", "export", str(quantized / "q.pt"), "--out", str(tmp_path / "x.onnx")])


def test_quantize_takes_a_plain_state_dict_with_arch(tmp_path, quantized, capsys):
    torch.save(tiny_resnet(seed=2).state_dict(), tmp_path / "weights.pt")
    base = ["quantize", str(tmp_path / "weights.pt"), "--calibration", str(quantized / "c.pt"), "--method", "rtn",
            "--out", str(tmp_path / "q.pt")]
    assert main(base) == EXIT_BAD_INPUT and "--arch" in capsys.readouterr().err
    assert main([*base, "--arch", "tiny_models:tiny_resnet"]) == 0

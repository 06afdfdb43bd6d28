"""Every CLI command × a bad file in each input slot × bad numbers (issue 20, table-driven).

Each case runs the CLI in-process (``main(argv)``; a subprocess costs seconds of imports) and
must end with an exit code in {0, 2, 3, 4}, exactly one line on stderr when it fails, no
traceback, every input byte-for-byte unchanged, and no temp file left behind.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_resnet

from hdrq_plugin.cli import main
from hdrq_plugin.run.checkpoint import (
    FLOAT_FORMAT,
    FORMAT,
    ModelRecipe,
    load_quantized,
    save_float_model,
    save_quantized,
)

RECIPE = ModelRecipe("tiny_models:tiny_resnet", {"width": 4, "seed": 0})
ALLOWED = {0, 2, 3, 4}
TEMP_MARKERS = (".hdrq-tmp", ".staging", "hdrq-ort-format")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Good inputs of every kind (tiny model, 16×16 images)."""
    folder = tmp_path_factory.mktemp("fuzz")
    gen = torch.Generator().manual_seed(0)
    save_float_model(folder / "float.pt", RECIPE.build(), RECIPE)
    torch.save({"inputs": torch.randn(32, 3, 16, 16, generator=gen)}, folder / "calib.pt")
    inputs = torch.randn(16, 3, 16, 16, generator=gen)
    torch.save({"inputs": inputs, "labels": tiny_resnet(width=4)(inputs).argmax(1)}, folder / "test.pt")
    assert main(["quantize", str(folder / "float.pt"), "--calibration", str(folder / "calib.pt"), "--method",
                 "rtn", "--bits", "w4a8", "--out", str(folder / "q.pt"), "--seed", "0"]) == 0
    shutil.copyfile(folder / "q.pt", folder / "q2.pt")  # a second good quantized model for merge and barrier
    assert main(["export", str(folder / "q.pt"), "--out", str(folder / "q.onnx")]) == 0
    model, info = load_quantized(folder / "q.pt")
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.endswith("weight")).view(-1)[0] = float("nan")
    save_quantized(folder / "nan.pt", model, recipe=info["recipe"], bits=info["bits"], family=info["family"])
    return folder


def _bad_file(kind: str, slot_kind: str, ws: Path, case: Path) -> Path:
    """A file of ``kind`` for a slot that takes a ``slot_kind`` (model / quantized / data / labelled / onnx)."""
    path = case / f"bad-{kind}.{'onnx' if slot_kind == 'onnx' else 'pt'}"
    good = {"model": "float.pt", "quantized": "q.pt", "data": "calib.pt", "labelled": "test.pt",
            "onnx": "q.onnx"}[slot_kind]
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        blob = (ws / good).read_bytes()
        path.write_bytes(blob[: len(blob) // 2])
    elif kind == "garbage":
        path.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(1)).tolist()))
    elif kind == "text":
        path.write_text("this is not a model\n")
    elif kind == "hostile":
        fmt = FORMAT if slot_kind == "quantized" else FLOAT_FORMAT
        marker = case / "marker"
        torch.save({"format": fmt, "recipe": {"builder": "os:system", "kwargs": {"command": f"touch {marker}"}},
                    "bits": "w4a4", "family": "rtn", "state_dict": {}, "metadata": {}}, path)
    elif kind == "pickled-module":
        torch.save(torch.nn.Linear(2, 2), path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "missing":
        pass
    elif kind == "wrong-kind":  # a file of another slot
        other = {"model": "calib.pt", "quantized": "test.pt", "data": "float.pt", "labelled": "calib.pt",
                 "onnx": "q.pt"}[slot_kind]
        shutil.copyfile(ws / other, path)
    elif kind == "nan-weights":
        shutil.copyfile(ws / "nan.pt", path)
    elif kind == "wrong-channels":
        torch.save({"inputs": torch.randn(32, 5, 16, 16), "labels": torch.zeros(32, dtype=torch.long)}, path)
    elif kind == "length-mismatch":
        torch.save({"inputs": torch.randn(16, 3, 16, 16), "labels": torch.zeros(7, dtype=torch.long)}, path)
    elif kind == "int-tensor":
        torch.save({"inputs": torch.zeros(32, 3, 16, 16, dtype=torch.int64),
                    "labels": torch.zeros(32, dtype=torch.long)}, path)
    else:
        raise AssertionError(kind)
    return path


COMMON = ("empty", "truncated", "garbage", "text", "hostile", "pickled-module", "directory", "missing", "wrong-kind")
KINDS = {"model": (*COMMON, "nan-weights"), "quantized": (*COMMON, "nan-weights"),
         "data": (*COMMON, "wrong-channels", "int-tensor"),
         "labelled": (*COMMON, "wrong-channels", "length-mismatch", "int-tensor"),
         "onnx": COMMON}

#: command, slot, slot kind, argv builder (ws folder, the bad file, the case folder)
SLOTS = [
    ("quantize", "MODEL", "model", lambda w, b, c: ["quantize", b, "--calibration", w / "calib.pt", "--method", "rtn",
                                                    "--out", c / "o.pt"]),
    ("quantize", "--calibration", "data", lambda w, b, c: ["quantize", w / "float.pt", "--calibration", b,
                                                            "--method", "rtn", "--out", c / "o.pt"]),
    ("quantize", "--source", "model", lambda w, b, c: ["quantize", w / "float.pt", "--calibration", w / "calib.pt",
                                                        "--source", b, "--method", "rtn", "--out", c / "o.pt"]),
    ("merge", "MODELS", "quantized", lambda w, b, c: ["merge", w / "q.pt", b, "--trials", "2", "--out", c / "m.pt"]),
    ("export", "MODEL", "quantized", lambda w, b, c: ["export", b, "--out", c / "o.onnx",
                                                      "--input-shape", "1,3,16,16"]),
    ("validate", "ONNX", "onnx", lambda w, b, c: ["validate", b, "--model", w / "q.pt", "--data", w / "test.pt"]),
    ("validate", "--model", "quantized", lambda w, b, c: ["validate", w / "q.onnx", "--model", b,
                                                          "--data", w / "test.pt"]),
    ("validate", "--data", "labelled", lambda w, b, c: ["validate", w / "q.onnx", "--model", w / "q.pt",
                                                        "--data", b]),
    ("barrier", "MODEL_B", "quantized", lambda w, b, c: ["barrier", w / "q.pt", b, "--data", w / "test.pt",
                                                         "--steps", "2", "--out", c / "b.png"]),
    ("barrier", "--data", "labelled", lambda w, b, c: ["barrier", w / "q.pt", w / "q2.pt", "--data", b,
                                                       "--steps", "2", "--out", c / "b.png"]),
    ("quantize-targets", "MODEL", "model", lambda w, b, c: ["quantize-targets", "--target", "a", b, w / "calib.pt",
                                                            "--target", "b", w / "float.pt", w / "calib.pt",
                                                            "--method", "rtn", "--out", c / "run"]),
    ("quantize-targets", "CALIBRATION", "data", lambda w, b, c: ["quantize-targets", "--target", "a", w / "float.pt",
                                                                 b, "--target", "b", w / "float.pt", w / "calib.pt",
                                                                 "--method", "rtn", "--out", c / "run"]),
    ("quantize-targets", "--test", "labelled", lambda w, b, c: ["quantize-targets", "--target", "a", w / "float.pt",
                                                                w / "calib.pt", "--target", "b", w / "float.pt",
                                                                w / "calib.pt", "--test", "a", b, "--method", "rtn",
                                                                "--out", c / "run"]),
]
FILE_CASES = [(command, slot, slot_kind, kind, build) for command, slot, slot_kind, build in SLOTS
              for kind in KINDS[slot_kind]]

Q = "{ws}/q.pt"
#: bad numbers and argument strings: (case id, argv with {ws} and {case} placeholders)
NUMERIC_CASES = [
    ("seed negative", ["merge", Q, "{ws}/q2.pt", "--seed", "-1", "--out", "{case}/m.pt"]),
    ("seed 2**70", ["merge", Q, "{ws}/q2.pt", "--seed", str(2**70), "--out", "{case}/m.pt"]),
    ("seed not a number", ["merge", Q, "{ws}/q2.pt", "--seed", "x", "--out", "{case}/m.pt"]),
    ("trials 0", ["merge", Q, "{ws}/q2.pt", "--trials", "0", "--out", "{case}/m.pt"]),
    ("trials 1e9", ["merge", Q, "{ws}/q2.pt", "--trials", "1000000000", "--out", "{case}/m.pt"]),
    ("coefficients nan", ["merge", Q, "{ws}/q2.pt", "--coefficients", "nan", "nan", "--out", "{case}/m.pt"]),
    ("coefficients count", ["merge", Q, "{ws}/q2.pt", "--coefficients", "1", "--out", "{case}/m.pt"]),
    ("iterations negative", ["quantize", "{ws}/float.pt", "--calibration", "{ws}/calib.pt", "--iterations", "-5",
                             "--out", "{case}/o.pt"]),
    ("iterations huge", ["quantize", "{ws}/float.pt", "--calibration", "{ws}/calib.pt", "--iterations",
                         "99999999999", "--out", "{case}/o.pt"]),
    ("bits malformed", ["quantize", "{ws}/float.pt", "--calibration", "{ws}/calib.pt", "--bits", "w99",
                        "--out", "{case}/o.pt"]),
    ("target-bits 0", ["quantize", "{ws}/float.pt", "--calibration", "{ws}/calib.pt", "--method", "nipq",
                       "--target-bits", "0", "--out", "{case}/o.pt"]),
    ("epochs 0", ["quantize", "{ws}/float.pt", "--calibration", "{ws}/calib.pt", "--method", "nipq",
                  "--epochs", "0", "--out", "{case}/o.pt"]),
    ("input-shape abc", ["export", Q, "--out", "{case}/o.onnx", "--input-shape", "abc"]),
    ("input-shape batch 100000", ["export", Q, "--out", "{case}/o.onnx", "--input-shape", "100000,3,16,16"]),
    ("input-shape 1,3,1e5,1e5", ["export", Q, "--out", "{case}/o.onnx", "--input-shape", "1,3,100000,100000"]),
    ("input-shape channels", ["export", Q, "--out", "{case}/o.onnx", "--input-shape", "1,5,16,16"]),
    ("input-shape zero", ["export", Q, "--out", "{case}/o.onnx", "--input-shape", "0,3,16,16"]),
    ("export out not .onnx", ["export", Q, "--out", "{case}/o.txt", "--input-shape", "1,3,16,16"]),
    ("steps 0", ["barrier", Q, "{ws}/q2.pt", "--data", "{ws}/test.pt", "--steps", "0", "--out", "{case}/b.png"]),
    ("cpus-per-task 0", ["quantize-targets", "--target", "a", "{ws}/float.pt", "{ws}/calib.pt", "--target", "b",
                         "{ws}/float.pt", "{ws}/calib.pt", "--cpus-per-task", "0", "--out", "{case}/run"]),
    ("ray address dead", ["quantize-targets", "--target", "a", "{ws}/float.pt", "{ws}/calib.pt", "--target", "b",
                          "{ws}/float.pt", "{ws}/calib.pt", "--ray", "--address", "127.0.0.1:1",
                          "--out", "{case}/run"]),
    ("arch not importable", ["export", Q, "--out", "{case}/o.onnx", "--arch", "no_such_pkg:build"]),
    ("arch malformed", ["export", Q, "--out", "{case}/o.onnx", "--arch", "nocolon"]),
    ("output is input (merge)", ["merge", Q, "{ws}/q2.pt", "--out", Q]),
    ("output is input (quantize)", ["quantize", "{ws}/float.pt", "--calibration", "{ws}/calib.pt", "--out",
                                    "{ws}/calib.pt", "--overwrite"]),
    ("output is input (validate)", ["validate", "{ws}/q.onnx", "--model", Q, "--data", "{ws}/test.pt",
                                    "--json", Q, "--overwrite"]),
    ("output exists", ["export", Q, "--out", "{ws}/q.onnx"]),
    ("unknown command", ["frobnicate"]),
]


def _checksums(*folders: Path) -> dict[str, str]:
    sums = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                sums[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return sums


def _run(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as done:  # argparse: usage errors
        code = done.code
    return code, capsys.readouterr().err


def _check(code: int, err: str, before: dict, folders: tuple[Path, ...], case: Path) -> None:
    assert code in ALLOWED, f"exit {code}: {err}"
    assert "Traceback" not in err, err
    if code != 0:
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1, f"{len(lines)} lines on stderr:\n{err}"
    now = _checksums(*folders, case)
    changed = [path for path, digest in before.items() if now.get(path) != digest]
    assert not changed, f"inputs changed or removed: {changed}"
    left = [p for folder in (*folders, case) for p in folder.rglob("*") if any(m in p.name for m in TEMP_MARKERS)]
    assert not left, f"temp files left: {left}"
    assert not (case / "marker").exists()


@pytest.mark.parametrize("command, slot, slot_kind, kind, build", FILE_CASES,
                         ids=[f"{c}-{s}-{k}" for c, s, _, k, _ in FILE_CASES])
def test_a_bad_file_in_any_slot_is_one_line_and_an_exit_code(ws, tmp_path, capsys, command, slot, slot_kind,
                                                             kind, build):
    bad = _bad_file(kind, slot_kind, ws, tmp_path)
    argv = [str(a) for a in build(ws, bad, tmp_path)]
    before = _checksums(ws, tmp_path)
    code, err = _run(argv, capsys)
    _check(code, err, before, (ws,), tmp_path)
    assert code != 0 or kind in ("wrong-kind",), f"{kind} in {command} {slot} was accepted"


@pytest.mark.parametrize("name, argv", NUMERIC_CASES, ids=[n for n, _ in NUMERIC_CASES])
def test_bad_arguments_are_one_line_and_an_exit_code(ws, tmp_path, capsys, name, argv):
    argv = [a.format(ws=ws, case=tmp_path) for a in argv]
    before = _checksums(ws)
    code, err = _run(argv, capsys)
    _check(code, err, before, (ws,), tmp_path)
    assert code == 2, f"{name}: exit {code}: {err}"


def test_the_fuzz_table_covers_every_command_that_reads_files():
    from hdrq_plugin.cli_commands import COMMANDS

    assert {c for c, *_ in SLOTS} | {"demo"} == set(COMMANDS)
    assert len(FILE_CASES) + len(NUMERIC_CASES) >= 150

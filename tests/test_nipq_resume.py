"""NIPQ through the CLI survives SIGKILL at any checkpoint and checks what it resumes (issue 20)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hdrq_plugin.cli import EXIT_BAD_INPUT, main
from hdrq_plugin.run.checkpoint import ModelRecipe, save_float_model

TESTS = Path(__file__).resolve().parent
RECIPE = ModelRecipe("tiny_models:tiny_resnet", {"width": 8, "seed": 0})
CHECKPOINT = "nipq_last.pt"


def _workspace(folder: Path, samples: int) -> tuple[Path, Path]:
    save_float_model(folder / "float.pt", RECIPE.build(), RECIPE)
    torch.save({"inputs": torch.randn(samples, 3, 16, 16, generator=torch.Generator().manual_seed(0))},
               folder / "data.pt")
    return folder / "float.pt", folder / "data.pt"


def _argv(model, data, ckpt, out, epochs, seed=0):
    return ["quantize", str(model), "--calibration", str(data), "--method", "nipq", "--bits", "w4a4",
            "--epochs", str(epochs), "--checkpoint-dir", str(ckpt), "--out", str(out), "--seed", str(seed)]


def _tensor_digests(path: Path) -> dict[str, str]:
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return {k: hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest() for k, v in state.items()}


def _saved_epoch(ckpt: Path) -> int:
    try:
        return int(torch.load(ckpt / CHECKPOINT, map_location="cpu", weights_only=True)["epoch"])
    except Exception:  # not written yet
        return 0


def test_a_seed_or_setting_other_than_the_checkpoint_folders_is_refused(tmp_path, capsys):
    model, data = _workspace(tmp_path, 64)
    assert main(_argv(model, data, tmp_path / "ckpt", tmp_path / "a.pt", 1)) == 0
    capsys.readouterr()
    assert main(_argv(model, data, tmp_path / "ckpt", tmp_path / "b.pt", 1, seed=1)) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "config.seed" in err
    assert not (tmp_path / "b.pt").exists()


def test_rerunning_a_finished_command_is_a_no_op_with_a_message(tmp_path, capsys):
    model, data = _workspace(tmp_path, 64)
    argv = _argv(model, data, tmp_path / "ckpt", tmp_path / "a.pt", 1)
    assert main(argv) == 0
    first = (tmp_path / "a.pt").read_bytes()
    capsys.readouterr()
    assert main(argv) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert (tmp_path / "a.pt").read_bytes() == first


@pytest.mark.slow
def test_sigkill_after_checkpoints_1_2_3_ends_with_the_uninterrupted_tensors(tmp_path):
    """Real SIGKILLs (no cleanup runs): killed after checkpoint 1, resumed and killed after 2, then
    after 3, then finished; every tensor's SHA-256 equals an uninterrupted run's."""
    model, data = _workspace(tmp_path, 768)
    epochs = 3  # + the preset's hard epoch: 4 checkpoints
    straight = tmp_path / "straight.pt"
    assert main(_argv(model, data, tmp_path / "straight-ckpt", straight, epochs)) == 0

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    ckpt, out = tmp_path / "ckpt", tmp_path / "resumed.pt"
    command = [sys.executable, "-m", "hdrq_plugin.cli", *_argv(model, data, ckpt, out, epochs),
               "--arch", "tiny_models:tiny_resnet"]
    killed_at = []
    for kill_after in (1, 2, 3):
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while _saved_epoch(ckpt) < kill_after and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_at.append(_saved_epoch(ckpt))
        assert not out.exists(), "the run finished before it was killed: give it more data"
    assert killed_at == [1, 2, 3], killed_at
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert _tensor_digests(out) == _tensor_digests(straight)
    assert not [p for p in ckpt.iterdir() if p.name.endswith(".hdrq-tmp")]

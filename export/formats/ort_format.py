"""ORT-format files for onnxruntime's mobile/edge builds, written by onnxruntime's own tool.

``python -m onnxruntime.tools.convert_onnx_models_to_ort`` optimizes the graph, serializes it
as ``.ort`` and lists the operators it needs (``.required_operators.config``, the input of a
reduced-operator build: ``build.sh --include_ops_by_config``). It runs as a subprocess because
it is a command-line tool that prints its progress; we keep its output for error messages.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort

from hdrq_plugin._io import atomic_write_path

from ..errors import ExportError
from ..metadata import read_metadata

ORT_TOOL = "onnxruntime.tools.convert_onnx_models_to_ort"
CONFIG_SUFFIX = ".required_operators.config"
TARGET_PLATFORMS = (None, "arm", "amd64")  # the tool's --target_platform choices (None: portable)


def _require_loadable(ort_file: Path, weights: str | None) -> None:
    """The tool can write files onnxruntime then refuses (1.32: INT4 initializers); catch that here."""
    try:
        ort.InferenceSession(str(ort_file), providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own pybind exception types
        hint = " (the ORT format stores no INT4 tensors: convert the int8 file)" if weights == "int4" else ""
        raise ExportError(f"onnxruntime cannot load the ORT-format file it wrote{hint}: {err}") from err


def convert_to_ort_format(onnx_path: str | os.PathLike, ort_path: str | os.PathLike | None = None, *,
                          target_platform: str | None = None, overwrite: bool = False) -> Path:
    """Write ``onnx_path`` as an ORT-format file (default: same name, ``.ort``) and return it.

    The operator config for a reduced build is written beside it (``<name>.required_operators.config``).
    The result is loaded once before it is written. Both files appear complete or not at all;
    existing files need ``overwrite``.
    """
    source = Path(onnx_path)
    if not source.is_file():
        raise FileNotFoundError(f"no ONNX file at {source}")
    if target_platform not in TARGET_PLATFORMS:
        raise ValueError(f"target_platform must be one of {TARGET_PLATFORMS}, got {target_platform!r}")
    weights = read_metadata(onnx.load(source, load_external_data=False), str(source)).get("weights")
    target = Path(ort_path) if ort_path is not None else source.with_suffix(".ort")
    if target.suffix != ".ort":
        raise ValueError(f"ORT-format files end in .ort, got {target}")
    config_target = target.with_name(target.stem + CONFIG_SUFFIX)
    for existing in (target, config_target):
        if existing.exists() and not overwrite:
            raise FileExistsError(f"{existing} exists; pass overwrite=True to replace it")

    with tempfile.TemporaryDirectory(prefix="hdrq-ort-format-") as folder:
        staged = Path(folder) / "model.onnx"  # the tool names its outputs after the input file
        shutil.copyfile(source, staged)
        command = [sys.executable, "-m", ORT_TOOL, str(staged), "--output_dir", str(Path(folder) / "out"),
                   "--optimization_style", "Fixed"]
        if target_platform is not None:
            command += ["--target_platform", target_platform]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        produced = Path(folder) / "out" / "model.ort"
        produced_config = Path(folder) / "out" / ("model" + CONFIG_SUFFIX)
        if done.returncode != 0 or not produced.is_file() or not produced_config.is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
            raise ExportError(f"{ORT_TOOL} failed (exit {done.returncode}): " + " | ".join(tail))
        _require_loadable(produced, weights)
        config_text = produced_config.read_text().replace(str(produced), target.name)
        with atomic_write_path(target, overwrite=overwrite) as tmp:
            shutil.copyfile(produced, tmp)
            with atomic_write_path(config_target, overwrite=overwrite) as tmp_config:
                tmp_config.write_text(config_text)
    return target

"""Checks on a command's inputs before any work starts: one clear line instead of a late raw
error, a hang, or running out of memory (issue 20: ``--trials 1000000000`` ran for minutes,
``--input-shape 1,3,100000,100000`` exhausted memory, a dead Ray address retried for minutes).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import InputError, one_line
from ..options import (  # noqa: F401 (bounds of the options; torch-free for the CLI)
    MAX_BARRIER_STEPS,
    MAX_EPOCHS,
    MAX_ITERATIONS,
    MAX_SEED,
    MAX_TRIALS,
    check_count,
    check_seed,
)

#: The export's example input only fixes the traced shapes (the batch axis is dynamic).
MAX_EXAMPLE_BATCH = 256
#: Rough bytes a forward pass keeps per input byte (activations of a small CNN, float32).
ACTIVATION_BYTES_PER_INPUT_BYTE = 64
RAY_CONNECT_TIMEOUT_S = 3.0


def parse_input_shape(text: str) -> tuple[int, ...]:
    """``"N,C,H,W"`` (comma-separated positive integers, e.g. ``1,3,32,32``) → a tuple."""
    parts = [part.strip() for part in str(text).split(",")]
    try:
        shape = tuple(int(part) for part in parts)
    except ValueError:
        raise InputError(f"--input-shape {text!r} is not comma-separated integers, e.g. 1,3,32,32") from None
    if len(shape) < 2 or any(size < 1 for size in shape):
        raise InputError(f"--input-shape {text!r}: give N,C,... with every size >= 1, e.g. 1,3,32,32")
    if shape[0] > MAX_EXAMPLE_BATCH:
        raise InputError(f"--input-shape batch {shape[0]} is larger than needed: the exported batch axis is "
                         f"dynamic; give 1..{MAX_EXAMPLE_BATCH}")
    check_fits_in_memory(shape, "--input-shape")
    return shape


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else free physical pages."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    with contextlib.suppress(ValueError, OSError, AttributeError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return 2**63


def check_fits_in_memory(shape: Sequence[int], what: str) -> None:
    elements = 1
    for size in shape:
        elements *= int(size)
    needed = elements * 4 * ACTIVATION_BYTES_PER_INPUT_BYTE
    available = available_memory_bytes()
    if needed > available:
        raise InputError(f"{what} {','.join(map(str, shape))}: a forward pass needs about "
                         f"{needed / 2**30:.1f} GiB, {available / 2**30:.1f} GiB is available")


def check_model_accepts(model: nn.Module, sample: torch.Tensor, what: str) -> None:
    """One forward pass on one sample before the real work: a wrong channel count or rank is
    reported here with the file's name, not 50 lines deep in calibration or export."""
    if not isinstance(sample, torch.Tensor) or not sample.is_floating_point():
        raise InputError(f"{what} must hold a float tensor, not {getattr(sample, 'dtype', type(sample).__name__)}")
    if not torch.isfinite(sample).all():
        raise InputError(f"{what} holds NaN or infinite values")
    check_fits_in_memory(sample.shape, what)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(sample)
    except Exception as err:  # any failure of the user's forward means the input does not fit
        raise InputError(f"the model cannot take {what} of shape {tuple(sample.shape)}: {one_line(err, 200)}") from err
    finally:
        model.train(was_training)


def check_ray_address(address: str | None, timeout: float = RAY_CONNECT_TIMEOUT_S) -> None:
    """A ``host:port`` (or ``ray://host:port``) Ray address must accept a TCP connection within
    ``timeout`` seconds; Ray itself retries for minutes. ``auto``/``local`` are left to Ray."""
    if not address or address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"--address {address!r} is not host:port (or ray://host:port, auto)")
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout):
            pass
    except OSError as err:
        raise InputError(f"Ray address {address} does not answer within {timeout:g} s "
                         f"({err.strerror or err}); is the cluster running?") from None

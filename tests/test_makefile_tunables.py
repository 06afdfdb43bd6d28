"""The allocator settings `make` exports (Makefile, issue 22): glibc must recognise every one.

glibc ignores an unknown tunable name, or an mmap threshold above its 64-bit maximum (32 MiB),
without a word, which would silently bring back the page faults the setting removes. The loader
(`ld.so --list-tunables`, glibc ≥ 2.33) prints the values it parsed, so each is checked there.
"""

import glob
import os
import subprocess
from pathlib import Path

import pytest

MAKEFILE = Path(__file__).resolve().parents[1] / "Makefile"
GLIBC_MAX_MMAP_THRESHOLD = 32 * 1024 * 1024  # HEAP_MAX_SIZE / 2 on 64-bit glibc (malloc/arena.c)


def _exported_tunables() -> str:
    lines = [line for line in MAKEFILE.read_text().splitlines() if line.startswith("export GLIBC_TUNABLES ?= ")]
    assert len(lines) == 1, lines
    return lines[0].split("?=", 1)[1].strip()


def _parsed(tunables: str) -> dict[str, int]:
    """The values glibc's loader reports for ``tunables`` (name -> int)."""
    loaders = sorted(glob.glob("/lib64/ld-linux-*.so.*") + glob.glob("/lib/ld-linux-*.so.*"))
    if not loaders:
        pytest.skip("no glibc loader found (not a glibc system)")
    listing = subprocess.run([loaders[0], "--list-tunables"], capture_output=True, text=True, check=True,
                             env={**os.environ, "GLIBC_TUNABLES": tunables}).stdout
    parsed = {}
    for line in listing.splitlines():
        name, _, rest = line.partition(":")
        if rest.strip():
            parsed[name.strip()] = int(rest.split()[0], 0)
    return parsed


def _requested(tunables: str) -> dict[str, int]:
    return {name: int(value) for name, value in (item.split("=") for item in tunables.split(":"))}


def test_glibc_recognises_every_exported_malloc_tunable():
    tunables = _exported_tunables()
    requested = _requested(tunables)
    assert set(requested) == {"glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold", "glibc.malloc.top_pad"}
    parsed = _parsed(tunables)
    assert {name: parsed.get(name) for name in requested} == requested
    assert requested["glibc.malloc.mmap_threshold"] <= GLIBC_MAX_MMAP_THRESHOLD


def test_a_misspelt_tunable_is_caught():
    tunables = _exported_tunables().replace("glibc.malloc.top_pad", "glibc.malloc.top_padding")
    parsed = _parsed(tunables)
    requested = _requested(tunables)
    assert {name: parsed.get(name) for name in requested} != requested

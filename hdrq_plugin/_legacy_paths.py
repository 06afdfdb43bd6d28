"""Old import paths, kept for one release: ``hdrq_plugin.quantizers`` → ``hdrq_plugin.quant.quantizers``, ...

Version 0.1 had one flat package; 0.2 groups it by concept (docs/architecture.md). A meta-path
finder maps each old module name to its new module (the same module object, so ``isinstance``
and monkeypatching behave) and warns once with ``DeprecationWarning``. Only the names below are
mapped; nothing is computed from user input.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

#: old module (0.1) → new module (0.2)
MOVED_MODULES: dict[str, str] = {
    "hdrq_plugin.quantizers": "hdrq_plugin.quant.quantizers",
    "hdrq_plugin.noise": "hdrq_plugin.quant.noise",
    "hdrq_plugin.step_size": "hdrq_plugin.quant.step_size",
    "hdrq_plugin.learned_round": "hdrq_plugin.quant.learned_round",
    "hdrq_plugin.quant_control": "hdrq_plugin.quant.control",
    "hdrq_plugin.op_policy": "hdrq_plugin.convert.op_policy",
    "hdrq_plugin.units": "hdrq_plugin.ptq.units",
    "hdrq_plugin.calibrate": "hdrq_plugin.ptq.calibrate",
    "hdrq_plugin.gptq": "hdrq_plugin.ptq.gptq",
    "hdrq_plugin.reconstruction": "hdrq_plugin.ptq",
    "hdrq_plugin.reconstruction.cache": "hdrq_plugin.ptq.cache",
    "hdrq_plugin.reconstruction.config": "hdrq_plugin.ptq.config",
    "hdrq_plugin.reconstruction.engine": "hdrq_plugin.ptq.engine",
    "hdrq_plugin.reconstruction.objective": "hdrq_plugin.ptq.objective",
    "hdrq_plugin.reconstruction.source": "hdrq_plugin.ptq.source",
    "hdrq_plugin.nipq_quantizers": "hdrq_plugin.nipq.quantizers",
    "hdrq_plugin.nipq_cost": "hdrq_plugin.nipq.cost",
    "hdrq_plugin.nipq_budget": "hdrq_plugin.nipq.budget",
    "hdrq_plugin.nipq_passes": "hdrq_plugin.nipq.passes",
    "hdrq_plugin.nipq_merge": "hdrq_plugin.nipq.widths",
    "hdrq_plugin.merge_rules": "hdrq_plugin.merge.rules",
    "hdrq_plugin.float_merge": "hdrq_plugin.merge.float_merge",
    "hdrq_plugin.barrier": "hdrq_plugin.merge.barrier",
    "hdrq_plugin.hot_backward": "hdrq_plugin.hot.backward",
    "hdrq_plugin.hadamard": "hdrq_plugin.hot.hadamard",
    "hdrq_plugin.checkpoint": "hdrq_plugin.run.checkpoint",
    "hdrq_plugin.distributed": "hdrq_plugin.run.distributed",
    "hdrq_plugin.pipeline": "hdrq_plugin.run.pipeline",
    "hdrq_plugin.report": "hdrq_plugin.run.report",
    "hdrq_plugin.export.qdq": "hdrq_plugin.export.formats.qdq",
    "hdrq_plugin.export.float_export": "hdrq_plugin.export.formats.float_export",
    "hdrq_plugin.export.ort_format": "hdrq_plugin.export.formats.ort_format",
    "hdrq_plugin.export.int4": "hdrq_plugin.export.rewrites.int4",
    "hdrq_plugin.export.integer_path": "hdrq_plugin.export.rewrites.integer_path",
    "hdrq_plugin.export.unsigned_grids": "hdrq_plugin.export.rewrites.unsigned_grids",
    "hdrq_plugin.export.validate": "hdrq_plugin.export.validation.validate",
    "hdrq_plugin.export.parity": "hdrq_plugin.export.validation.parity",
    "hdrq_plugin.export.activation_codes": "hdrq_plugin.export.validation.activation_codes",
    "hdrq_plugin.export.ort_runtime": "hdrq_plugin.export.validation.ort_runtime",
}


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec):
        return importlib.import_module(self.target)

    def exec_module(self, module) -> None:  # the target module is already executed
        pass


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        new = MOVED_MODULES.get(fullname)
        if new is None:
            return None
        warnings.warn(f"{fullname} moved to {new}; the old path goes in the next release",
                      DeprecationWarning, stacklevel=3)
        return importlib.util.spec_from_loader(fullname, _Alias(new))


def install() -> None:
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())

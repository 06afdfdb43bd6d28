"""Gradients a HOT backward may overwrite: the ones another HOT backward just created.

A backward that receives a gradient cannot in general write into it (AddBackward hands one
tensor to both branches of a residual block). But a gradient that one of HOT's own backward
functions allocated and returned (ReLU's masked gradient, max-pool's scattered one, BatchNorm's,
a conv's input gradient) is held by the autograd engine alone when the next function gets it,
so that function can work in place instead of allocating another map of the same size — at the
stem of a ResNet-18 at 224², three such maps were the peak of the whole step. The engine sums
the gradients of a tensor with several consumers into a new tensor, which is not marked here.
Tensor hooks see the gradient before its consumer: a hook that keeps a reference to it (rather
than a copy, as ``retain_grad`` does) would see it change.
"""

from __future__ import annotations

import weakref

import torch

_OWNED: dict[int, weakref.ref] = {}


def release(gradient: torch.Tensor) -> torch.Tensor:
    """Marks a gradient that the calling backward allocated and returns; returns it."""
    if len(_OWNED) > 256:  # entries whose gradient was consumed elsewhere or freed
        for key in [key for key, ref in _OWNED.items() if ref() is None]:
            del _OWNED[key]
    _OWNED[id(gradient)] = weakref.ref(gradient)
    return gradient


def take(gradient: torch.Tensor) -> bool:
    """True when ``gradient`` is one :func:`release` marked, contiguous float32: it may be overwritten."""
    ref = _OWNED.pop(id(gradient), None)
    return (ref is not None and ref() is gradient and gradient.is_contiguous()
            and gradient.dtype == torch.float32)

"""One way to define a kernel op: a torch.library op for graphs, a direct call in eager mode.

`define(name, impl, fake)` registers `impl` as the op `name` (schema from its annotations) with its
fake, and returns a caller: while torch.compile / torch.export trace (or autograd needs the op's
formula) it calls the op, so graphs hold one named node; in eager inference it calls `impl` itself,
skipping the custom-op dispatch (about 10 us a call, measured; a decode step makes hundreds).
Inside `inline_kernels()` (what the compile backend hands inductor) a trace of an op defined with
`inline=True` goes through `impl` too, so inductor sees the aten ops it is made of, fuses the casts
around them and calls the library kernel directly instead of a Python custom op per call. Only
kernels whose every tensor is an argument may inline (the linears: their layouts are buffers); one
that builds and caches tables (the Hadamard) would cache fake tensors while tracing.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager

import torch

_INLINE = threading.local()


@contextmanager
def inline_kernels():
    """While inside, tracing a kernel op records the aten ops of its implementation, not the op."""
    before = getattr(_INLINE, "on", False)
    _INLINE.on = True
    try:
        yield
    finally:
        _INLINE.on = before


def define(name: str, impl, fake, *, inline: bool = False):
    op = torch.library.custom_op(name, impl, mutates_args=())
    op.register_fake(fake)

    def call(*args):
        traced = torch.compiler.is_compiling() and not (inline and getattr(_INLINE, "on", False))
        if traced or (torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)):
            return op(*args)
        return impl(*args)

    call.op = op
    call.__name__ = call.__qualname__ = name.split("::")[-1]
    call.__doc__ = impl.__doc__
    return call

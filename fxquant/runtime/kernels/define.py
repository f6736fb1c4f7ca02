"""One way to define a kernel op: a torch.library op for graphs, a direct call in eager mode.

`define(name, impl, fake)` registers `impl` as the op `name` (schema from its annotations) with its
fake, and returns a caller: while torch.compile / torch.export trace (or autograd needs the op's
formula) it calls the op, so graphs hold one named node; in eager inference it calls `impl` itself,
skipping the custom-op dispatch (about 10 us a call, measured; a decode step makes hundreds).
"""
from __future__ import annotations

import torch


def define(name: str, impl, fake):
    op = torch.library.custom_op(name, impl, mutates_args=())
    op.register_fake(fake)

    def call(*args):
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(
                isinstance(a, torch.Tensor) and a.requires_grad for a in args)):
            return op(*args)
        return impl(*args)

    call.op = op
    call.__name__ = call.__qualname__ = name.split("::")[-1]
    call.__doc__ = impl.__doc__
    return call

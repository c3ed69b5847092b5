"""Double backward of the kernel ops, by differentiating the reference.

The kernels' backward ops compute first-order gradients with no graph of their own. Left alone,
``create_graph=True`` would leave the second derivative unset, in silence. So when autograd runs
a registered backward with grad mode on, it differentiates the reference op (``reference.py``,
which autograd differentiates to any order) instead, and says so once per op. Forward-mode AD
and ``torch.func``'s transforms are routed to the reference before the forward
(``_backend.autodiff_error``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from gvsl_fast.ops import _backend

DOUBLE_BACKWARD = ("double backward (create_graph=True) differentiates the PyTorch reference: "
                   "the kernels' gradients are first-order only")


def reference_grads(op: str, forward: Callable[..., torch.Tensor],
                    inputs: Sequence[torch.Tensor], needs: Sequence[bool],
                    grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """Gradients of ``forward(*inputs)`` (the reference op) for the inputs in ``needs``, given
    the output gradient ``grad``, with a graph so that they can be differentiated again. The
    registered backwards call this when autograd runs them with grad mode on
    (``create_graph=True``)."""
    _backend.announce(op, DOUBLE_BACKWARD)
    wanted = [i for i, n in enumerate(needs) if n]
    with torch.enable_grad():
        out = forward(*inputs)
    found = torch.autograd.grad(out, [inputs[i] for i in wanted], grad, create_graph=True,
                                allow_unused=True)
    result: list[torch.Tensor | None] = [None] * len(inputs)
    for i, g in zip(wanted, found, strict=True):
        result[i] = g
    return tuple(result)

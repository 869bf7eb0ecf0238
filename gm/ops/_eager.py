"""Plain eager calls of gm's ops skip the torch.library dispatch.

A custom op's call, its autograd wrapper and its backward op cost tens of microseconds of Python per call (on the
dev machine: ~85 us forward+backward per masked_linear layer through the custom op, ~25 us through an
autograd.Function), as much as the kernels themselves at the benchmark's sizes, and on a GPU that time is the
GPU's idle time. In plain eager mode each op therefore runs the very functions it registers with torch.library
(its implementation, setup_context and backward, and the backward op's implementation) through a
torch.autograd.Function. Under torch.compile/export, fake tensors, tensor subclasses, dispatch or function modes,
functorch transforms and autocast it calls the registered op, so tracing, opcheck and those modes see gm::<op>.
Results are identical either way (tests/test_eager.py).
"""

from __future__ import annotations

import threading

import torch
from torch.autograd.function import once_differentiable

# False: every call goes through the registered custom op.
EAGER_FAST_PATH = True


_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def eager_ok(*tensors) -> bool:
    """Whether a call on `tensors` (None allowed) may bypass the custom op (see the module docstring)."""
    if not EAGER_FAST_PATH or torch.compiler.is_compiling():
        return False
    try:  # private torch state: a torch release that moves any of it just loses the fast path
        if (
            torch._C._len_torch_dispatch_stack()
            or torch._C._is_torch_function_mode_enabled()
            or torch._C._functorch.peek_interpreter_stack() is not None
        ):
            return False
        checked = None  # autocast is asked once per device type (a call's tensors share one device)
        for t in tensors:
            if t is None:
                continue
            if type(t) not in _PLAIN_TYPES:
                return False
            kind = t.device.type
            if kind != checked:
                if torch.is_autocast_enabled(kind):
                    return False
                checked = kind
    except (AttributeError, TypeError, RuntimeError):
        return False
    return True


def needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


_CALL = threading.local()


def backward_expected() -> bool:
    """Inside an op's implementation: whether the eager call running it records a backward (grad mode on and an
    input that requires grad), so the implementation may skip what only the backward reads. True outside an eager
    call (the registered custom op under torch.compile and the modes cannot tell, and assumes it)."""
    return getattr(_CALL, "backward", True)


class EagerOp:
    """`EagerOp(op, impl, setup_context, backward)(*inputs)`: the registered custom op `op`, or in plain eager mode
    an autograd.Function running `impl` (the op's undecorated implementation), then `setup_context(ctx, inputs,
    output)` and, for the gradients, `backward(ctx, *grads)`: the functions given to op.register_autograd."""

    def __init__(self, op, impl, setup_context, backward):
        self.op = op

        def forward(ctx, *inputs):
            out = impl(*inputs)
            ctx.gm_eager = True  # backward_call() runs the backward op's implementation directly
            setup_context(ctx, inputs, out)
            return out

        @once_differentiable
        def grads(ctx, *grad_outputs):
            return backward(ctx, *grad_outputs)

        # Named after the op, so autograd graphs read gm_<op>_eagerBackward.
        name = f"{str(getattr(op, '_qualname', 'gm::op')).replace('::', '_')}_eager"
        self.function = type(name, (torch.autograd.Function,),
                             {"forward": staticmethod(forward), "backward": staticmethod(grads)})  # fmt: skip

    def __call__(self, *inputs):
        if eager_ok(*(t for t in inputs if t is None or isinstance(t, torch.Tensor))):
            _CALL.backward = torch.is_grad_enabled() and any(
                isinstance(t, torch.Tensor) and t.requires_grad for t in inputs
            )
            try:
                return self.function.apply(*inputs)
            finally:
                _CALL.backward = True
        return self.op(*inputs)


def backward_call(ctx, op, impl, *args):
    """In a registered backward: the backward custom op `op`, or its implementation `impl` when the forward ran
    through EagerOp's autograd.Function."""
    return impl(*args) if getattr(ctx, "gm_eager", False) else op(*args)


_ZEROS: dict = {}


def zero_scalar(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A cached 0-dim zero on `device`, the `other` of torch.where(mask, w, 0) where an out= is needed (a Python
    scalar is not accepted there; a fresh tensor is an allocation and a fill launch per call). Read-only."""
    key = (str(device), dtype)
    z = _ZEROS.get(key)
    if z is None:
        z = torch.zeros((), dtype=dtype, device=device)
        if type(z) is torch.Tensor:  # not a fake or subclass tensor made under some mode
            _ZEROS[key] = z
    return z

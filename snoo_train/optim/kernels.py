"""Which AdamW kernel a list of parameters gets (`optim.implementation`, torchtitan's
`optimizer.implementation`): auto | fused | foreach | forloop.

* fused: one kernel per (device, dtype) group for the whole AdamW update (`torch._fused_adamw_`),
  on every device torch has fused kernels for (CUDA, and CPU among others), DTensor parameters
  included. The step counters then live on the parameter's device (float32), as torch's AdamW
  keeps them when fused: the kernel reads them there, and nothing is read on the host.
* foreach: torch's multi-tensor implementation (`torch._foreach_*` ops, op by op).
* forloop: one parameter at a time.
* auto: fused where every parameter is on an accelerator torch has a fused kernel for; elsewhere
  the optimizer's own default (torch's AdamW: foreach on accelerators, the per-parameter loop on
  CPU, where torch has no foreach kernels; Muon's AdamW part: foreach). So CPU runs, and the
  golden losses recorded on CPU, train exactly as before.

`fused` on parameters torch cannot fuse is refused at build time (`KernelUnavailable`), never
turned into another kernel without a word.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

IMPLEMENTATIONS = ("auto", "fused", "foreach", "forloop")


class KernelUnavailable(ValueError):
    """optim.implementation=fused on parameters torch has no fused kernel for."""


def _fusable(p: torch.Tensor) -> bool:
    # torch's own test (torch.optim.optimizer._device_dtype_check_for_fused); a DTensor reports
    # its local tensor's device.
    return p.device.type in _get_fused_kernels_supported_devices() and torch.is_floating_point(p)


def kernel_flags(
    params: Iterable[torch.Tensor], implementation: str, *, default_foreach: bool | None = None
) -> dict[str, bool | None]:
    """torch AdamW's `fused` and `foreach` arguments for `implementation`.

    `default_foreach` is what auto gives where it does not fuse: None leaves the choice to torch
    (`torch.optim.AdamW`'s default), True is Muon's AdamW part. Raises KernelUnavailable for
    `fused` on a parameter torch cannot fuse, and ValueError for an unknown implementation."""
    params = list(params)
    if implementation == "fused":
        for p in params:
            if not _fusable(p):
                raise KernelUnavailable(
                    f"optim.implementation=fused: torch has no fused AdamW kernel for {p.dtype} parameters "
                    f"on {p.device.type} (fused kernels exist for floating-point parameters on "
                    f"{', '.join(_get_fused_kernels_supported_devices())}); use optim.implementation=auto or foreach"
                )
        return {"fused": True, "foreach": False}
    if implementation == "foreach":
        return {"fused": False, "foreach": True}
    if implementation == "forloop":
        return {"fused": False, "foreach": False}
    if implementation != "auto":
        raise ValueError(f"optim.implementation={implementation!r}: choose one of {', '.join(IMPLEMENTATIONS)}")
    if params and all(_fusable(p) and p.device.type != "cpu" for p in params):
        return {"fused": True, "foreach": False}
    # fused=None, not False: torch's AdamW reads foreach=None as "its default" only then.
    return {"fused": None, "foreach": default_foreach}


def place_step(step: torch.Tensor, param: torch.Tensor, fused: bool) -> torch.Tensor:
    """An AdamW step counter where its kernel reads it: on the parameter's device as float32
    when fused (torch's layout), a CPU float32 tensor otherwise (read there with no device
    sync). A counter already in place is returned as it is; a moved one is a copy, made once,
    after a checkpoint written with another kernel is loaded."""
    device = param.device if fused else torch.device("cpu")
    if step.device == device and step.dtype == torch.float32:
        return step
    return step.detach().to(device=device, dtype=torch.float32)


def keep_kernel_after_load(optimizer: torch.optim.Optimizer, flags: dict[str, bool | None]) -> None:
    """Make `flags` survive `optimizer.load_state_dict`: loading replaces the param groups with
    the checkpoint's, whose `fused`/`foreach` are those of the run that wrote it (another
    device, another optim.implementation). After every load the groups get `flags` back and the
    step counters move to where that kernel reads them."""

    def restore(opt: torch.optim.Optimizer) -> None:
        for group in opt.param_groups:
            group.update(flags)
            for p in group["params"]:
                state = opt.state.get(p)
                if state and torch.is_tensor(state.get("step")):
                    state["step"] = place_step(state["step"], p, bool(flags.get("fused")))

    optimizer.register_load_state_dict_post_hook(restore)

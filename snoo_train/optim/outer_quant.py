"""Quantized averaging of DiLoCo pseudo-gradients over the replicas, with error feedback.

`start_average(values, codec, group, ...)` quantizes this replica's pseudo-gradients, issues
ONE all_gather of the encoded bytes over `group` (async_op-capable) and returns a
`PendingAverage` whose `wait()` gives the averaged tensors and the agreed finite flag.

Wire format (one uint8 message per replica): [fp32 scales | codes | 1 flag byte].
  * every tensor is flattened and cut into blocks of BLOCK elements (its tail zero-padded): one
    absmax scale per block. Blocks, not rows: a sharded local tensor (FSDP dim-0, TP columns)
    has no stable rows, 1-D tensors have one; a block bounds an outlier's reach to 128
    elements for 4 bytes of scale (3% of an int8 payload, 6% of int4).
  * codes: bf16 (2 bytes, no scale), fp8 = torch.float8_e4m3fn (|x| / scale <= 448), int8
    (round-to-nearest, [-127, 127]), int4 ([-7, 7] stored as q + 8, two per byte, the even
    element in the low nibble).
  * the flag byte is 1 when this replica's step must be dropped: its guard flag is False or a
    scale is not finite (absmax propagates NaN and inf, so a non-finite block is always seen;
    int8(NaN) would otherwise be a silent 0). Every replica reads every flag: all or none apply.

Bit-for-bit agreement: every replica decodes all R messages and sums them in replica order
0..R-1 in fp32, then divides by R: the same operations on the same bytes on every replica.
Bytes received per rank and outer step: (R - 1) x (codes + scales) against the fp32 ring
all-reduce's 2 (R - 1) / R x 4 bytes per element: int8 moves R / 8 of it (less for R < 8),
int4 R / 16, bf16 R / 4 (docs/parallelism.md has the table).

Error feedback (`residuals`): x = s + e is sent, and e <- x - deQ(Q(x)) is committed in
`wait()` only where the step is applied: a dropped outer step leaves e bitwise as it was.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

BLOCK = 128
# torch 2.13 renamed all_gather_into_tensor (gloo wants the flat output either way).
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
# name -> (largest code magnitude, code bits); bf16 has no scale (qmax 0).
CODECS: dict[str, tuple[float, int]] = {"bf16": (0.0, 16), "fp8": (448.0, 8), "int8": (127.0, 8), "int4": (7.0, 4)}


def padded(numel: int) -> int:
    """Elements a tensor of `numel` takes on the wire: whole blocks."""
    return -(-numel // BLOCK) * BLOCK


def _scale_bytes(codec: str, numel: int) -> int:
    return 0 if CODECS[codec][0] == 0.0 else 4 * (numel // BLOCK)


def message_bytes(codec: str, numel: int) -> int:
    """Bytes of one replica's message for `numel` padded elements (a multiple of BLOCK): scales,
    codes and the flag byte, rounded up to 4 so that every gathered row's scales stay aligned."""
    raw = _scale_bytes(codec, numel) + numel * CODECS[codec][1] // 8 + 1
    return -(-raw // 4) * 4


def encode(codec: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Write the scales and codes of flat fp32 `x` (numel a multiple of BLOCK) at the start of
    the uint8 message `out`. Returns the local finite flag (a device bool)."""
    qmax, _ = CODECS[codec]
    if qmax == 0.0:
        out[: 2 * x.numel()].view(torch.bfloat16).copy_(x)
        return torch.isfinite(x).all()
    blocks = x.view(-1, BLOCK)
    nb = blocks.shape[0]
    scales = out[: 4 * nb].view(torch.float32)
    torch.amax(blocks.abs(), dim=1, out=scales)
    scales.div_(qmax)
    # A zero block keeps scale 0 (it decodes to 0); dividing by 1 there avoids 0 / 0.
    y = blocks / torch.where(scales == 0, torch.ones_like(scales), scales).unsqueeze(1)
    codes = out[4 * nb : 4 * nb + x.numel() * CODECS[codec][1] // 8]
    if codec == "fp8":
        codes.view(torch.float8_e4m3fn).copy_(y.view(-1))
    elif codec == "int8":
        codes.view(torch.int8).copy_(y.round_().clamp_(-qmax, qmax).view(-1))
    else:  # int4: two codes per byte
        q = (y.round_().clamp_(-qmax, qmax) + 8).to(torch.uint8).view(-1, 2)
        torch.bitwise_or(q[:, 0], torch.bitwise_left_shift(q[:, 1], 4), out=codes)
    return torch.isfinite(scales).all()


def decode(codec: str, message: torch.Tensor, numel: int) -> torch.Tensor:
    """The fp32 values (flat, `numel`) a message's codes and scales stand for."""
    qmax, _ = CODECS[codec]
    if qmax == 0.0:
        return message[: 2 * numel].view(torch.bfloat16).float()
    nb = numel // BLOCK
    scales = message[: 4 * nb].view(torch.float32)
    codes = message[4 * nb : 4 * nb + numel * CODECS[codec][1] // 8]
    if codec == "fp8":
        q = codes.view(torch.float8_e4m3fn).float()
    elif codec == "int8":
        q = codes.view(torch.int8).float()
    else:
        low = torch.bitwise_and(codes, 15)
        high = torch.bitwise_right_shift(codes, 4)
        q = torch.stack([low, high], dim=1).view(-1).float() - 8
    return (q.view(nb, BLOCK) * scales.unsqueeze(1)).view(-1)


@dataclass
class PendingAverage:
    """An issued all_gather; `wait()` finishes the average (call it once, on every rank)."""

    codec: str
    work: object | None  # the collective's Work with async_op, else None
    gathered: torch.Tensor  # (R, message bytes) uint8
    shapes: list[tuple[torch.Tensor, int, int]]  # (like, offset, numel) into the padded flat buffer
    numel: int
    residuals: list[torch.Tensor] | None
    new_residuals: list[torch.Tensor] | None

    def wait(self) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(the averaged tensors, shaped and typed like the values given to start_average, on
        their device; the device bool "every replica finite": the step is applied). Commits the
        error-feedback residuals where that flag is True."""
        if self.work is not None:
            self.work.wait()
        ok = (self.gathered[:, -1] == 0).all()
        acc = decode(self.codec, self.gathered[0], self.numel)
        for r in range(1, self.gathered.shape[0]):  # replica order: the same bits everywhere
            acc += decode(self.codec, self.gathered[r], self.numel)
        acc /= float(self.gathered.shape[0])
        out = [
            acc[offset : offset + n].view(like.shape).to(device=like.device, dtype=like.dtype)
            for like, offset, n in self.shapes
        ]
        if self.residuals is not None:
            for e, new in zip(self.residuals, self.new_residuals):
                e.copy_(torch.where(ok.to(e.device), new, e))
        return out, ok


def start_average(
    values: list[torch.Tensor],
    codec: str,
    group: dist.ProcessGroup,
    *,
    finite: torch.Tensor | None = None,
    residuals: list[torch.Tensor] | None = None,
    device: torch.device | None = None,
    async_op: bool = False,
) -> PendingAverage:
    """Quantize `values` (this replica's local pseudo-gradients, plus `residuals` when error
    feedback is on: the residuals are updated by wait()) and issue the all_gather over `group`.
    `finite`: this replica's guard flag (a device bool) or None. `device`: where the message is
    built and sent (the backend's device: NCCL's is the GPU); default, the values' device."""
    if codec not in CODECS:
        raise ValueError(f"codec must be one of {sorted(CODECS)}, got {codec!r}")
    device = values[0].device if device is None else device
    sent = values if residuals is None else torch._foreach_add(values, residuals)
    shapes, offset = [], 0
    for v in sent:
        shapes.append((v, offset, v.numel()))
        offset += padded(v.numel())
    flat = torch.zeros(offset, dtype=torch.float32, device=device)
    for v, start, n in shapes:
        flat[start : start + n].copy_(v.reshape(-1))
    size = message_bytes(codec, offset)
    message = torch.zeros(size, dtype=torch.uint8, device=device)
    local_ok = encode(codec, flat, message)
    if finite is not None:
        local_ok = local_ok & finite.to(device)
    message[-1:].copy_((~local_ok).to(torch.uint8).reshape(1))
    new_residuals = None
    if residuals is not None:  # e = x - deQ(Q(x)), from this replica's own bytes
        own = decode(codec, message, offset)
        new_residuals = [v - own[start : start + n].view(v.shape).to(v.device, v.dtype) for v, start, n in shapes]
    gathered = torch.empty(dist.get_world_size(group) * size, dtype=torch.uint8, device=device)
    work = _all_gather(gathered, message, group=group, async_op=async_op)
    gathered = gathered.view(-1, size)  # row r: replica r's message
    shapes = [(like, start, n) for (_, start, n), like in zip(shapes, values)]
    return PendingAverage(codec, work if async_op else None, gathered, shapes, offset, residuals, new_residuals)

"""A fused CNN3 forward in Triton: all three 3x3 convolutions per tile, intermediates kept on chip.

Three separate convolutions move every 16-channel intermediate through DRAM (~2 GB for a
4096^2 micrograph). Here each persistent program owns a small scratch slot that stays in
L1/L2 and walks over output tiles:

1. ``h1 = relu(conv1(x))`` on the tile plus a 2-pixel halo, written to the slot (fp16/bf16,
   channels last); positions outside the image are stored as 0, exactly the zero padding
   the whole-image forward applies to ``h1`` before ``conv2``.
2. ``h2 = relu(conv2(h1))`` as 9 tensor-core dots ``[P,16] x [16,16]`` over shifted views of the
   slot (a shift is a pointer offset), zeroed outside the image, then immediately projected
   by ``conv3``'s weights: ``z[q, t] = sum_c w3[c, t] h2[q, c]`` (one more dot).
3. ``y[p] = b3 + sum_t z[p + d_t, t]``: nine scalar loads per output pixel.

The tile grid is 64 columns wide (60 valid output columns: 2 halo columns each side) and
``ROWS + 4`` rows tall. Accumulation is fp32 throughout; inputs and outputs are fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["fused_cnn3_forward", "pack_weights"]

_COLS = 64  # grid width in pixels (power of two)
_VALID_COLS = _COLS - 4


def pack_weights(
    module: torch.nn.Module, dtype: torch.dtype, device: torch.device
) -> dict[str, torch.Tensor]:
    """CNN3 weights in the kernel's layouts: w1 [9,16] fp32, w2 [9,16(in),16(out)], w3 [16(in),16(tap)]."""
    from cryodeploy.models.cnn3 import CNN3

    if not isinstance(module, CNN3):
        raise ValueError(f"fused kernel needs a CNN3 module, found {type(module).__name__}")
    conv1, conv2, conv3 = module.conv1, module.conv2, module.conv3
    c = conv1.weight.shape[0]
    if c != 16:
        raise ValueError(f"fused kernel needs 16 hidden channels, found {c}")
    w1 = conv1.weight.detach().float().reshape(16, 9).t().contiguous()  # [tap, cout]
    w2 = conv2.weight.detach().float().permute(2, 3, 1, 0).reshape(9, 16, 16).contiguous()  # [tap, cin, cout]
    biases = [conv.bias for conv in (conv1, conv2, conv3)]
    if any(b is None for b in biases):
        raise ValueError("fused kernel needs biased convolutions")
    b1, b2, b3 = (b.detach().float().to(device) for b in biases if b is not None)
    w3 = torch.zeros(16, 16)
    w3[:, :9] = conv3.weight.detach().float().reshape(16, 9)  # [cin, tap]
    return {
        "w1": w1.to(device),
        "b1": b1,
        "w2": w2.to(device=device, dtype=dtype),
        "b2": b2,
        "w3": w3.to(device=device, dtype=dtype),
        "b3": b3,
    }


@triton.jit
def _cnn3_kernel(
    x_ptr,
    y_ptr,
    s1_ptr,
    s2_ptr,
    w1_ptr,
    b1_ptr,
    w2_ptr,
    b2_ptr,
    w3_ptr,
    b3_ptr,
    H,
    W,
    n_tiles_c,
    n_tiles_r,
    total,
    n_programs,
    iters,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
    CHUNK: tl.constexpr,
    DT: tl.constexpr,
):
    pid = tl.program_id(0)
    R1: tl.constexpr = ROWS + 4  # h1 rows in the slot
    P: tl.constexpr = CHUNK * COLS  # pixels per chunk
    SLOT = (R1 + CHUNK + 2) * COLS * 16  # guard rows: one above, CHUNK + 1 below (chunked shifted reads)
    s1 = s1_ptr + pid * SLOT + COLS * 16
    s2 = s2_ptr + pid * SLOT + COLS * 16
    ch = tl.arange(0, 16)
    p = tl.arange(0, P)
    pi = p // COLS
    pj = p % COLS
    b1 = tl.load(b1_ptr + ch)
    b2 = tl.load(b2_ptr + ch)
    b3 = tl.load(b3_ptr)
    w3 = tl.load(w3_ptr + ch[:, None] * 16 + ch[None, :])
    tap = tl.arange(0, 16)
    for it in range(0, iters):
        t = pid + it * n_programs
        live = t < total  # programs past the last tile compute nothing they store
        n = t // (n_tiles_c * n_tiles_r)
        rem = t % (n_tiles_c * n_tiles_r)
        r0 = (rem // n_tiles_c) * ROWS - 2  # image row of slot row 0
        c0 = (rem % n_tiles_c) * (COLS - 4) - 2  # image column of slot column 0
        xb = x_ptr + n * H * W
        # 1. h1 on the whole slot (ROWS+4 rows), zero outside the image
        for k in range(0, R1, CHUNK):
            ri = r0 + k + pi
            cj = c0 + pj
            acc = tl.zeros((P, 16), dtype=tl.float32) + b1[None, :]
            for dy in tl.static_range(3):
                for dx in tl.static_range(3):
                    yy = ri + dy - 1
                    xx = cj + dx - 1
                    m = (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W) & live
                    v = tl.load(xb + yy * W + xx, mask=m, other=0.0)
                    w = tl.load(w1_ptr + (dy * 3 + dx) * 16 + ch)
                    acc += v[:, None] * w[None, :]
            inside = (ri >= 0) & (ri < H) & (cj >= 0) & (cj < W) & (k + pi < R1)
            h1 = tl.where(inside[:, None], tl.maximum(acc, 0.0), 0.0)
            tl.store(
                s1 + ((k + pi) * COLS + pj)[:, None] * 16 + ch[None, :],
                h1.to(DT),
                mask=(k + pi < R1)[:, None],
            )
        tl.debug_barrier()
        # 2. h2 = relu(conv2(h1)) on slot rows 1..R1-2, projected by conv3 into z[:, tap]
        for k in range(1, R1 - 1, CHUNK):
            acc2 = tl.zeros((P, 16), dtype=tl.float32) + b2[None, :]
            for dy in tl.static_range(3):
                for dx in tl.static_range(3):
                    q = (k + pi + dy - 1) * COLS + pj + dx - 1
                    a = tl.load(s1 + q[:, None] * 16 + ch[None, :])
                    w2 = tl.load(w2_ptr + (dy * 3 + dx) * 256 + ch[:, None] * 16 + ch[None, :])
                    acc2 = tl.dot(a, w2, acc2)
            ri = r0 + k + pi
            cj = c0 + pj
            inside = (ri >= 0) & (ri < H) & (cj >= 0) & (cj < W)
            h2 = tl.where(inside[:, None], tl.maximum(acc2, 0.0), 0.0)
            z = tl.dot(h2.to(DT), w3)
            rows_ok = (k + pi) < (R1 - 1)
            tl.store(
                s2 + ((k + pi) * COLS + pj)[:, None] * 16 + tap[None, :],
                z,
                mask=rows_ok[:, None] & (tap < 9)[None, :],
            )
        tl.debug_barrier()
        # 3. y = b3 + sum_t z[p + d_t, t] on slot rows 2..R1-3, columns 2..COLS-3
        for k in range(2, R1 - 2, CHUNK):
            out = tl.zeros((P,), dtype=tl.float32) + b3
            for dy in tl.static_range(3):
                for dx in tl.static_range(3):
                    q = (k + pi + dy - 1) * COLS + pj + dx - 1
                    out += tl.load(s2 + q * 16 + (dy * 3 + dx))
            ri = r0 + k + pi
            cj = c0 + pj
            ok = (
                live
                & (ri >= 0)
                & (ri < H)
                & (cj >= 0)
                & (cj < W)
                & (pj >= 2)
                & (pj < COLS - 2)
                & (k + pi < R1 - 2)
            )
            tl.store(y_ptr + n * H * W + ri * W + cj, out, mask=ok)
        tl.debug_barrier()


def fused_cnn3_forward(
    x: torch.Tensor,
    weights: dict[str, torch.Tensor],
    rows: int = 28,
    chunk: int = 1,
    programs: int | None = None,
    num_warps: int = 2,
) -> torch.Tensor:
    """CNN3 forward of ``x`` [N,1,H,W] float32 (contiguous, on the kernel's device) -> [N,1,H,W] float32.

    ``rows`` output rows per tile (rows + 4 must be a multiple of ``chunk``), ``programs`` the
    number of persistent programs (default: 8 per SM), ``num_warps`` warps per program.
    """
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"expected [N,1,H,W], found {tuple(x.shape)}")
    if (rows + 4) % chunk:
        raise ValueError(f"rows + 4 ({rows + 4}) must be a multiple of chunk ({chunk})")
    x = x.float().contiguous()
    n, _, h, w = x.shape
    y = torch.empty_like(x)
    n_tiles_c = triton.cdiv(w, _VALID_COLS)
    n_tiles_r = triton.cdiv(h, rows)
    total = n * n_tiles_c * n_tiles_r
    if programs is None:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
        programs = 8 * sms
    programs = max(1, min(programs, total))
    dt = weights["w2"].dtype
    slot = (rows + 4 + chunk + 2) * _COLS * 16
    s1 = torch.zeros(programs * slot, device=x.device, dtype=dt)
    s2 = torch.zeros(programs * slot, device=x.device, dtype=torch.float32)
    _cnn3_kernel[(programs,)](
        x,
        y,
        s1,
        s2,
        weights["w1"],
        weights["b1"],
        weights["w2"],
        weights["b2"],
        weights["w3"],
        weights["b3"],
        h,
        w,
        n_tiles_c,
        n_tiles_r,
        total,
        programs,
        triton.cdiv(total, programs),
        ROWS=rows,
        COLS=_COLS,
        CHUNK=chunk,
        DT=tl.float16 if dt == torch.float16 else tl.bfloat16,
        num_warps=num_warps,
        num_stages=1,
    )
    return y

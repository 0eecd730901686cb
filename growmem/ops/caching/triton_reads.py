"""Memory Caching's reads of cached matrix memories as Triton kernels (flash-style).

The same reads as ``reads.py`` (``mixed_read``, ``sparse_read``), forward and backward, for
``MatrixBackend`` with ``reads="triton"``:

- the dense read (grm, soup): y_t = Σ_{i < n(t)} W[t, i] S_i^T q_t. A program owns a tile of
  ``BT`` tokens × ``BV`` value columns of one (batch row, head) and loops over the cached states
  its tokens see, one [BT, Dk] @ [Dk, BV] product each, accumulated in fp32: no [T, N, Dk]
  tensor and no per-token copy of a state. The backward is split as flash attention's: a
  token-parallel kernel for dQ and dW (a tile of tokens loops over the states), and a
  segment-parallel one for dSt (a state loops over the tokens that see it, from the first).
- the routed read (ssc): y_t = Σ_j w[t, j] S_{idx[t, j]}^T q_t over the valid slots j. The
  forward and dQ, dw are token-parallel: a tile of tokens gathers the k states its tokens
  selected (each token its own, so a product of broadcasts, summed: O(T·k·Dk·Dv), only the
  selected states are read). dSt is state-parallel over the (token, slot) pairs sorted by
  state (as mixture-of-experts dispatch; a sort and a searchsorted on the device, no host
  sync): each state sums w q^T dO over its own pairs with one matmul per block of pairs.

Which caches a token sees comes as a [T] int32 tensor of counts (``span_counts`` builds it,
and the first token that sees each cache, once from the spans). Every size may be odd: the
blocks are powers of two of at least 16 (``tl.dot``'s minimum), masked at the edges. Inputs
may be float32, float16 or bfloat16 (the products accumulate in float32); float32 products
use TF32 only when torch allows it for matmuls (``torch.backends.cuda.matmul.allow_tf32``).

Importing this module imports triton (``growmem[triton]``); growmem imports it only when
asked for these kernels. Under ``TRITON_INTERPRET=1`` (set before this module is first
imported) the kernels run on CPU tensors in the Triton interpreter (tests/ops/
test_triton_reads.py); float32 only there, as the interpreter's bf16 ``tl.dot`` is wrong.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

# The kernels below were defined for the interpreter (CPU tensors) rather than the GPU.
INTERPRETED = bool(triton.knobs.runtime.interpret)


# The kernels call triton.language's builtins only (tl.full, tl.reduce, ...), none of its @jit
# library functions (tl.sum, tl.zeros, tl.max, tl.cdiv): those fail in interpreted kernels when
# triton was first imported outside the interpreter, as torch.compile imports it.


@triton.jit
def _sum(x, axis: tl.constexpr):
    """tl.sum of float32 x, by the combine function tl.sum reduces with (which the interpreter
    sums with numpy)."""
    return tl.reduce(x, axis, tl.standard._sum_combine)


# ---- the dense read ----------------------------------------------------------------------------


@triton.jit
def _dense_fwd(
    Q, S, W, NT, TILE_N, O,
    sq_b, sq_h, sq_t, sq_k,
    ss_b, ss_h, ss_n, ss_k, ss_v,
    sw_b, sw_h, sw_t, sw_n,
    so_b, so_h, so_t, so_v,
    H, T, DK, DV,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """O[tile] = Σ_i W[:, i] ⊙ (Q[tile] @ S_i[:, cols]); grid (T / BT, Dv / BV, B·H).

    NT [T]: caches each token sees; TILE_N [T / BT]: the most a token of each tile sees."""
    pid_t, pid_v, pid_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)
    offs_t = pid_t * BT + tl.arange(0, BT)
    offs_k = tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    mt, mk, mv = offs_t < T, offs_k < DK, offs_v < DV
    q = tl.load(
        Q + b * sq_b + h * sq_h + offs_t[:, None] * sq_t + offs_k[None, :] * sq_k,
        mask=mt[:, None] & mk[None, :],
        other=0.0,
    )  # [BT, BK]
    n_t = tl.load(NT + offs_t, mask=mt, other=0)  # [BT] caches each token sees
    s_ptr = S + b * ss_b + h * ss_h + offs_k[:, None] * ss_k + offs_v[None, :] * ss_v
    w_ptr = W + b * sw_b + h * sw_h + offs_t * sw_t
    acc = tl.full([BT, BV], 0.0, tl.float32)
    for i in range(0, tl.load(TILE_N + pid_t)):
        s = tl.load(s_ptr + i * ss_n, mask=mk[:, None] & mv[None, :], other=0.0)  # [BK, BV]
        w = tl.load(w_ptr + i * sw_n, mask=mt & (i < n_t), other=0.0).to(tl.float32)
        acc += w[:, None] * tl.dot(q, s, input_precision=PREC)
    tl.store(
        O + b * so_b + h * so_h + offs_t[:, None] * so_t + offs_v[None, :] * so_v,
        acc.to(O.dtype.element_ty),
        mask=mt[:, None] & mv[None, :],
    )


@triton.jit
def _dense_bwd_dq_dw(
    Q, S, W, NT, TILE_N, DO, DQ, DW,
    sq_b, sq_h, sq_t, sq_k,
    ss_b, ss_h, ss_n, ss_k, ss_v,
    sw_b, sw_h, sw_t, sw_n,
    H, T, DK, DV,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Token-parallel backward, grid (T / BT, B·H): with dP_i = dO @ S_i^T [BT, Dk],
    dQ = Σ_i W[:, i] ⊙ dP_i and dW[:, i] = rowsum(dP_i ⊙ Q) for i < n(t).

    Q, DQ share strides (sq_*), as do W and DW (sw_*); DO is [B, H, T, Dv] contiguous."""
    pid_t, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)
    offs_t = pid_t * BT + tl.arange(0, BT)
    offs_k = tl.arange(0, BK)
    offs_v = tl.arange(0, BV)
    mt, mk, mv = offs_t < T, offs_k < DK, offs_v < DV
    q_off = b * sq_b + h * sq_h + offs_t[:, None] * sq_t + offs_k[None, :] * sq_k
    q = tl.load(Q + q_off, mask=mt[:, None] & mk[None, :], other=0.0)  # [BT, BK]
    do = tl.load(
        DO + pid_bh.to(tl.int64) * T * DV + offs_t[:, None] * DV + offs_v[None, :],
        mask=mt[:, None] & mv[None, :],
        other=0.0,
    ).to(q.dtype)  # [BT, BV]
    n_t = tl.load(NT + offs_t, mask=mt, other=0)
    s_ptr = S + b * ss_b + h * ss_h + offs_k[None, :] * ss_k + offs_v[:, None] * ss_v  # S_i^T
    w_off = b * sw_b + h * sw_h + offs_t * sw_t
    dq = tl.full([BT, BK], 0.0, tl.float32)
    for i in range(0, tl.load(TILE_N + pid_t)):
        st = tl.load(s_ptr + i * ss_n, mask=mv[:, None] & mk[None, :], other=0.0)  # [BV, BK]
        seen = mt & (i < n_t)
        w = tl.load(W + w_off + i * sw_n, mask=seen, other=0.0).to(tl.float32)
        dp = tl.dot(do, st, input_precision=PREC)  # [BT, BK]
        dq += w[:, None] * dp
        dw = _sum(dp * q.to(tl.float32), 1)
        tl.store(DW + w_off + i * sw_n, dw.to(DW.dtype.element_ty), mask=seen)
    tl.store(DQ + q_off, dq.to(DQ.dtype.element_ty), mask=mt[:, None] & mk[None, :])


@triton.jit
def _dense_bwd_ds(
    Q, W, NT, FIRST, DO, DS,
    sq_b, sq_h, sq_t, sq_k,
    sw_b, sw_h, sw_t, sw_n,
    H, T, N, DK, DV,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Segment-parallel backward, grid (N, Dk / BK · Dv / BV, B·H): dS_i[block] =
    Σ_{t: n(t) > i} W[t, i] q_t^T dO_t over the token tiles from the first token that sees
    cache i. DS: [B, H, N, Dk, Dv] contiguous."""
    i, pid_kv, pid_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)
    n_v = (DV + BV - 1) // BV
    offs_k = (pid_kv // n_v) * BK + tl.arange(0, BK)
    offs_v = (pid_kv % n_v) * BV + tl.arange(0, BV)
    mk, mv = offs_k < DK, offs_v < DV
    acc = tl.full([BK, BV], 0.0, tl.float32)
    for t0 in range(tl.load(FIRST + i), T, BT):
        offs_t = t0 + tl.arange(0, BT)
        mt = offs_t < T
        n_t = tl.load(NT + offs_t, mask=mt, other=0)
        w = tl.load(
            W + b * sw_b + h * sw_h + offs_t * sw_t + i * sw_n, mask=mt & (i < n_t), other=0.0
        )
        q = tl.load(
            Q + b * sq_b + h * sq_h + offs_t[:, None] * sq_t + offs_k[None, :] * sq_k,
            mask=mt[:, None] & mk[None, :],
            other=0.0,
        )
        do = tl.load(
            DO + pid_bh.to(tl.int64) * T * DV + offs_t[:, None] * DV + offs_v[None, :],
            mask=mt[:, None] & mv[None, :],
            other=0.0,
        )
        qw = (q.to(tl.float32) * w.to(tl.float32)[:, None]).to(q.dtype)  # [BT, BK]
        acc += tl.dot(tl.trans(qw), do.to(q.dtype), input_precision=PREC)
    ds = DS + (pid_bh.to(tl.int64) * N + i) * DK * DV
    tl.store(
        ds + offs_k[:, None] * DV + offs_v[None, :],
        acc.to(DS.dtype.element_ty),
        mask=mk[:, None] & mv[None, :],
    )


# ---- the routed read ---------------------------------------------------------------------------


@triton.jit
def _routed_fwd(
    Q, S, IDX, WR, O,
    sq_b, sq_h, sq_t, sq_k,
    ss_b, ss_h, ss_n, ss_k, ss_v,
    H, T, DK, DV, KSEL,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):  # fmt: skip
    """O[tile] = Σ_j WR[:, j] ⊙ (q_t @ S_{IDX[t, j]}) per token, grid (T / BT, Dv / BV, B·H).

    IDX, WR: [B, H, T, KSEL] contiguous, WR zero on the invalid slots (IDX there: any cache
    in range); O: [B, H, T, Dv] contiguous."""
    pid_t, pid_v, pid_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)
    bh = pid_bh.to(tl.int64)
    offs_t = pid_t * BT + tl.arange(0, BT)
    offs_v = pid_v * BV + tl.arange(0, BV)
    mt, mv = offs_t < T, offs_v < DV
    acc = tl.full([BT, BV], 0.0, tl.float32)
    for j in range(0, KSEL):
        slot = bh * T * KSEL + offs_t * KSEL + j
        c = tl.load(IDX + slot, mask=mt, other=0).to(tl.int64)  # [BT] selected cache
        w = tl.load(WR + slot, mask=mt, other=0.0).to(tl.float32)
        s_row = S + b * ss_b + h * ss_h + c * ss_n  # [BT]
        for k0 in range(0, DK, BK):
            offs_k = k0 + tl.arange(0, BK)
            mk = offs_k < DK
            q = tl.load(
                Q + b * sq_b + h * sq_h + offs_t[:, None] * sq_t + offs_k[None, :] * sq_k,
                mask=mt[:, None] & mk[None, :],
                other=0.0,
            ).to(tl.float32)  # [BT, BK]
            s = tl.load(
                s_row[:, None, None] + offs_k[None, :, None] * ss_k + offs_v[None, None, :] * ss_v,
                mask=(mt[:, None] & mk[None, :])[:, :, None] & mv[None, None, :],
                other=0.0,
            ).to(tl.float32)  # [BT, BK, BV]: each token's own selected state
            acc += w[:, None] * _sum(q[:, :, None] * s, 1)
    tl.store(
        O + bh * T * DV + offs_t[:, None] * DV + offs_v[None, :],
        acc.to(O.dtype.element_ty),
        mask=mt[:, None] & mv[None, :],
    )


@triton.jit
def _routed_bwd_dq_dw(
    Q, S, IDX, WR, DO, DQ, DW,
    sq_b, sq_h, sq_t, sq_k,
    ss_b, ss_h, ss_n, ss_k, ss_v,
    H, T, DK, DV, KSEL,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BJ: tl.constexpr,
):  # fmt: skip
    """Token-parallel backward, grid (T / BT, B·H): with r_j = S_{IDX[t, j]} dO_t [Dk],
    dq_t = Σ_j WR[t, j] r_j and dw[t, j] = q_t · r_j. DQ, DO: [B, H, T, D] contiguous; DW:
    [B, H, T, KSEL] contiguous (zero on the invalid slots, as WR)."""
    pid_t, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)
    bh = pid_bh.to(tl.int64)
    offs_t = pid_t * BT + tl.arange(0, BT)
    offs_j = tl.arange(0, BJ)
    mt = offs_t < T
    dw = tl.full([BT, BJ], 0.0, tl.float32)
    for k0 in range(0, DK, BK):
        offs_k = k0 + tl.arange(0, BK)
        mk = offs_k < DK
        q = tl.load(
            Q + b * sq_b + h * sq_h + offs_t[:, None] * sq_t + offs_k[None, :] * sq_k,
            mask=mt[:, None] & mk[None, :],
            other=0.0,
        ).to(tl.float32)  # [BT, BK]
        dq = tl.full([BT, BK], 0.0, tl.float32)
        for j in range(0, KSEL):
            slot = bh * T * KSEL + offs_t * KSEL + j
            c = tl.load(IDX + slot, mask=mt, other=0).to(tl.int64)
            w = tl.load(WR + slot, mask=mt, other=0.0).to(tl.float32)
            s_row = S + b * ss_b + h * ss_h + c * ss_n
            r = tl.full([BT, BK], 0.0, tl.float32)
            for v0 in range(0, DV, BV):
                offs_v = v0 + tl.arange(0, BV)
                mv = offs_v < DV
                do = tl.load(
                    DO + bh * T * DV + offs_t[:, None] * DV + offs_v[None, :],
                    mask=mt[:, None] & mv[None, :],
                    other=0.0,
                ).to(tl.float32)  # [BT, BV]
                s = tl.load(
                    s_row[:, None, None]
                    + offs_k[None, :, None] * ss_k
                    + offs_v[None, None, :] * ss_v,
                    mask=(mt[:, None] & mk[None, :])[:, :, None] & mv[None, None, :],
                    other=0.0,
                ).to(tl.float32)  # [BT, BK, BV]
                r += _sum(s * do[:, None, :], 2)
            dq += w[:, None] * r
            dw += tl.where(offs_j[None, :] == j, _sum(q * r, 1)[:, None], 0.0)
        tl.store(
            DQ + bh * T * DK + offs_t[:, None] * DK + offs_k[None, :],
            dq.to(DQ.dtype.element_ty),
            mask=mt[:, None] & mk[None, :],
        )
    tl.store(
        DW + bh * T * KSEL + offs_t[:, None] * KSEL + offs_j[None, :],
        dw.to(DW.dtype.element_ty),
        mask=mt[:, None] & (offs_j[None, :] < KSEL),
    )


@triton.jit
def _routed_bwd_ds(
    Q, WR, ORDER, OFFS, DO, DS,
    sq_b, sq_h, sq_t, sq_k,
    H, T, DK, DV, KSEL,
    BM: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """State-parallel backward, grid (B·H·N, Dk / BK · Dv / BV): dS_g[block] = Σ w q^T dO over
    the pairs of state g, ORDER[OFFS[g]:OFFS[g + 1]] (flat slots into [B, H, T, KSEL]).
    WR: [B, H, T, KSEL] and DO: [B, H, T, Dv] contiguous; DS: [B, H, N, Dk, Dv] contiguous."""
    g, pid_kv = tl.program_id(0).to(tl.int64), tl.program_id(1)
    n_v = (DV + BV - 1) // BV
    offs_k = (pid_kv // n_v) * BK + tl.arange(0, BK)
    offs_v = (pid_kv % n_v) * BV + tl.arange(0, BV)
    mk, mv = offs_k < DK, offs_v < DV
    end = tl.load(OFFS + g + 1)
    acc = tl.full([BK, BV], 0.0, tl.float32)
    for m0 in range(tl.load(OFFS + g), end, BM):
        offs_m = m0 + tl.arange(0, BM)
        mm = offs_m < end
        slot = tl.load(ORDER + offs_m, mask=mm, other=0).to(tl.int64)
        w = tl.load(WR + slot, mask=mm, other=0.0).to(tl.float32)  # [BM]
        row = slot // KSEL  # the token in [B·H·T]
        bh, t = row // T, row % T
        q_row = (bh // H) * sq_b + (bh % H) * sq_h + t * sq_t  # [BM]
        q = tl.load(
            Q + q_row[:, None] + offs_k[None, :] * sq_k,
            mask=mm[:, None] & mk[None, :],
            other=0.0,
        )  # [BM, BK]
        do = tl.load(
            DO + row[:, None] * DV + offs_v[None, :], mask=mm[:, None] & mv[None, :], other=0.0
        )  # [BM, BV]
        qw = (q.to(tl.float32) * w[:, None]).to(q.dtype)
        acc += tl.dot(tl.trans(qw), do.to(q.dtype), input_precision=PREC)
    tl.store(
        DS + g * DK * DV + offs_k[:, None] * DV + offs_v[None, :],
        acc.to(DS.dtype.element_ty),
        mask=mk[:, None] & mv[None, :],
    )


# ---- the launches ------------------------------------------------------------------------------


def _block(d: int, cap: int | None = None) -> int:
    """A power of two ≥ d and ≥ 16 (tl.dot's minimum), at most ``cap`` when given."""
    b = max(16, triton.next_power_of_2(d))
    return b if cap is None else min(b, cap)


def _precision(x: torch.Tensor) -> str:
    """tl.dot's input precision: float32 products in TF32 only where torch's matmuls use it
    (16-bit inputs take tl.dot's default, their own tensor-core products)."""
    exact = x.dtype == torch.float32 and not (x.is_cuda and torch.backends.cuda.matmul.allow_tf32)
    return "ieee" if exact else "tf32"


def _warps(*blocks: int) -> int:
    """Warps of a program whose largest block is max(blocks): 8 for heads of 128 and more."""
    return 8 if max(blocks) >= 128 else 4


def _token_tile(BK: int, BV: int) -> int:
    """Tokens per tile of the dense kernels: fewer for wide heads (registers)."""
    return 64 if max(BK, BV) <= 64 else 32 if max(BK, BV) <= 128 else 16


def _tile_max(counts: torch.Tensor, BT: int) -> torch.Tensor:
    """The most caches a token of each tile of BT tokens sees: [T / BT] int32."""
    pad = -counts.shape[0] % BT
    return torch.nn.functional.pad(counts, (0, pad)).view(-1, BT).amax(1)


def span_counts(spans, T: int, N: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The spans (a, b, n) as tensors, once per call: counts [T] int32 (caches token t sees,
    0 outside the spans) and first [N] int32 (the first token that sees cache i; T if
    none)."""
    counts = torch.zeros(T, dtype=torch.int32)
    first = torch.full((N,), T, dtype=torch.int32)
    for a, b, n in spans:
        counts[a:b] = n
        if b > a:
            first[:n] = first[:n].clamp(max=a)
    return counts.to(device), first.to(device)


class TritonMixedRead(torch.autograd.Function):
    """``reads.MixedRead`` as Triton kernels: Q [B, H, T, Dk], St [B, H, N, Dk, Dv], W [B, H,
    T, N], counts [T] int32, first [N] int32 (``span_counts``) -> [B, H, T, Dv]."""

    @staticmethod
    def forward(ctx, Q, St, W, counts, first):
        B, H, T, Dk = Q.shape
        Dv = St.shape[-1]
        out = Q.new_empty(B, H, T, Dv)
        ctx.save_for_backward(Q, St, W, counts, first)
        if out.numel() == 0:
            return out
        BK, BV = _block(Dk), _block(Dv, 64)
        BT = _token_tile(BK, BV)
        grid = (triton.cdiv(T, BT), triton.cdiv(Dv, BV), B * H)
        _dense_fwd[grid](
            Q, St, W, counts, _tile_max(counts, BT), out,
            *Q.stride(), *St.stride(), *W.stride(), *out.stride(),
            H, T, Dk, Dv, BT=BT, BK=BK, BV=BV, PREC=_precision(Q), num_warps=_warps(BK, BV),
        )  # fmt: skip
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        Q, St, W, counts, first = ctx.saved_tensors
        # (contiguous: dQ and dW are written with the strides of Q and W)
        Q, W = Q.contiguous(), W.contiguous()
        B, H, T, Dk = Q.shape
        N, Dv = St.shape[2], St.shape[-1]
        dQ, dSt, dW = torch.empty_like(Q), St.new_empty(B, H, N, Dk, Dv), torch.zeros_like(W)
        if dQ.numel() == 0 or dSt.numel() == 0:
            return dQ.zero_(), dSt.zero_(), dW, None, None
        dout = dout.to(Q.dtype).contiguous()
        prec = _precision(Q)
        BK, BV = _block(Dk), _block(Dv)
        BT = _token_tile(BK, BV)
        _dense_bwd_dq_dw[(triton.cdiv(T, BT), B * H)](
            Q, St, W, counts, _tile_max(counts, BT), dout, dQ, dW,
            *Q.stride(), *St.stride(), *W.stride(), H, T, Dk, Dv, BT=BT, BK=BK, BV=BV, PREC=prec,
            num_warps=_warps(BK, BV),
        )  # fmt: skip
        BK, BV = _block(Dk, 64), _block(Dv, 64)
        grid = (N, triton.cdiv(Dk, BK) * triton.cdiv(Dv, BV), B * H)
        _dense_bwd_ds[grid](
            Q, W, counts, first, dout, dSt, *Q.stride(), *W.stride(),
            H, T, N, Dk, Dv, BT=64, BK=BK, BV=BV, PREC=prec,
        )  # fmt: skip
        return dQ, dSt, dW, None, None


def triton_mixed_read(Q, St, W, spans) -> torch.Tensor:
    """``reads.mixed_read`` by the Triton kernels: y_t = Σ_{i<n} W[t, i] St_i^T q_t per span
    (a, b, n). Q [B, H, T, Dk], St [B, H, N, Dk, Dv], W [B, H, T, N] -> [B, H, T, Dv]."""
    counts, first = span_counts(spans, Q.shape[2], St.shape[2], Q.device)
    return TritonMixedRead.apply(Q, St, W, counts, first)


class TritonRoutedRead(torch.autograd.Function):
    """``reads.sparse_read`` as Triton kernels: Q [B, H, T, Dk], St [B, H, N, Dk, Dv], idx
    [B, H, T, k] int64, w [B, H, T, k] (zero on the invalid slots), live [B, H, T, k] bool
    or None (all valid) -> [B, H, T, Dv]."""

    @staticmethod
    def forward(ctx, Q, St, idx, w, live):
        B, H, T, Dk = Q.shape
        N, Dv, k = St.shape[2], St.shape[-1], idx.shape[-1]
        idx, w = idx.contiguous(), w.contiguous()
        out = Q.new_empty(B, H, T, Dv)
        ctx.save_for_backward(Q, St, idx, w, live)
        if out.numel() == 0:
            return out
        if N == 0 or k == 0:
            return out.zero_()
        BV = _block(Dv, 32)
        grid = (triton.cdiv(T, 16), triton.cdiv(Dv, BV), B * H)
        _routed_fwd[grid](
            Q, St, idx, w, out, *Q.stride(), *St.stride(),
            H, T, Dk, Dv, k, BT=16, BK=16, BV=BV,
        )  # fmt: skip
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        Q, St, idx, w, live = ctx.saved_tensors
        B, H, T, Dk = Q.shape
        N, Dv, k = St.shape[2], St.shape[-1], idx.shape[-1]
        dQ, dw = Q.new_empty(B, H, T, Dk), torch.zeros_like(w)
        dSt = St.new_zeros(B, H, N, Dk, Dv)
        if dQ.numel() == 0 or N == 0 or k == 0:
            return dQ.zero_(), dSt, None, dw, None
        dout = dout.to(Q.dtype).contiguous()
        _routed_bwd_dq_dw[(triton.cdiv(T, 16), B * H)](
            Q, St, idx, w, dout, dQ, dw, *Q.stride(), *St.stride(),
            H, T, Dk, Dv, k, BT=16, BK=16, BV=_block(Dv, 32), BJ=_block(k),
        )  # fmt: skip
        # the (token, slot) pairs by state, invalid ones last (state B·H·N): each state's are
        # ORDER[offsets[g]:offsets[g + 1]]
        G = B * H * N
        bh = torch.arange(B * H, device=idx.device).view(B, H, 1, 1)
        state = bh * N + idx
        if live is not None:
            state = torch.where(live, state, G)
        state, order = state.reshape(-1).sort(stable=True)
        offsets = torch.searchsorted(state, torch.arange(G + 1, device=idx.device))
        BK, BV = _block(Dk, 64), _block(Dv, 64)
        grid = (G, triton.cdiv(Dk, BK) * triton.cdiv(Dv, BV))
        _routed_bwd_ds[grid](
            Q, w, order, offsets, dout, dSt, *Q.stride(),
            H, T, Dk, Dv, k, BM=32, BK=BK, BV=BV, PREC=_precision(Q),
        )  # fmt: skip
        return dQ, dSt, None, dw, None


def triton_routed_read(Q, St, idx, w, valid) -> torch.Tensor:
    """``reads.sparse_read`` by the Triton kernels: y[b, h, t] = Σ_j w[b, h, t, j]
    S_{idx[b, h, t, j]} q[b, h, t] over the valid slots j (valid [B, H, T, k] bool, or None:
    all valid). Q [B, H, T, Dk], St [B, H, N, Dk, Dv], idx, w [B, H, T, k] -> [B, H, T, Dv]."""
    if valid is not None:
        # an invalid slot reads nothing; its index may point anywhere, so it reads cache 0
        w, idx = torch.where(valid, w, 0.0), torch.where(valid, idx, 0)
    return TritonRoutedRead.apply(Q, St, idx, w, valid)

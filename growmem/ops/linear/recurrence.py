"""The chunk-to-chunk state recurrences of the chunkwise scans, with hand-written backwards.

These are the only sequential parts of the chunkwise form. Autograd over a Python loop of
small ops spends most of its time in per-op overhead and in stacking per-chunk results, so
both directions here write into preallocated [NC, ...] buffers and keep the loop body to
the ops that are truly sequential; everything else is batched over chunks outside.
Layout: chunks first, batch and heads flattened: [NC, BH, ...].
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


class DeltaRecurrence(torch.autograd.Function):
    """Pseudo-values and chunk-entry states of the delta rules.

    For each chunk c, with S_c the state entering it:
        U_c = U0_c - W_c S_c^T                  [C, Dv]
        S_{c+1} = γ_c S_c + U_c^T Kd_c           [Dv, Dk]

    Inputs: U0 [NC, BH, C, Dv], W [NC, BH, C, Dk], Kd [NC, BH, C, Dk], gamma_end [NC, BH],
    S0 [BH, Dv, Dk]. Outputs: U [NC, BH, C, Dv], starts [NC, BH, Dv, Dk] (S_c), final S_NC.
    """

    @staticmethod
    def forward(ctx, U0, W, Kd, gamma_end, S0):
        # Per-chunk results go to lists stacked once. (baddbmm, in place or not, copies its
        # input matrix by matrix on CPU: bmm then add is faster.)
        pseudo, starts = [], []
        S = S0
        for U0_c, W_c, Kd_c, ge_c in zip(U0, W, Kd, gamma_end, strict=True):
            starts.append(S)
            U_c = U0_c - torch.bmm(W_c, S.transpose(1, 2))
            pseudo.append(U_c)
            S = S * ge_c[:, None, None] + torch.bmm(U_c.transpose(1, 2), Kd_c)
        U, starts = torch.stack(pseudo), torch.stack(starts)
        ctx.save_for_backward(W, Kd, gamma_end, U, starts)
        return U, starts, S

    @staticmethod
    @once_differentiable
    def backward(ctx, dU_out, dstarts, dS_final):
        W, Kd, gamma_end, U, starts = ctx.saved_tensors
        NC = U.shape[0]
        dS = torch.zeros_like(starts[0]) if dS_final is None else dS_final
        dpseudo, dnext = [None] * NC, [None] * NC  # dnext: gradient of the state leaving chunk c
        for c in reversed(range(NC)):
            dnext[c] = dS
            dU_c = torch.bmm(Kd[c], dS.transpose(1, 2))  # through S_{c+1} = ... + U_c^T Kd_c
            if dU_out is not None:
                dU_c = dU_c + dU_out[c]
            dpseudo[c] = dU_c
            # through γ_c S_c and U_c = U0_c - W_c S_c^T
            dS = dS * gamma_end[c, :, None, None] - torch.bmm(dU_c.transpose(1, 2), W[c])
            if dstarts is not None:
                dS = dS + dstarts[c]
        dU, dnext = torch.stack(dpseudo), torch.stack(dnext)
        dW = -(dU @ starts)
        dKd = U @ dnext
        dgamma = (dnext * starts).sum((-1, -2))
        return dU, dW, dKd, dgamma, dS

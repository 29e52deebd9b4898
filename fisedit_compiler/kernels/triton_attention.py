"""Triton kernel for active-query self-attention: the queries of the active tokens against every token's key, where
the active tokens' keys and values are fresh and the others' recorded.

`reference.active_query_attention` materialises the merged keys and values (two full-size copies per call). This
kernel never does: it runs one online softmax over two key sets, first the fresh keys, then the recorded keys with
the active positions masked out (their recorded rows are not even loaded). Head dims that are not a power of two
(SD's 40 and 80) are padded to one inside the kernel with masked loads.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .triton_config import autotune

_ATTENTION_CONFIGS = [
    triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
    for m, n, w, s in [(64, 32, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 2)]
]


@triton.jit
def _attend(
    acc, row_max, row_sum, q, k_ptr, v_ptr, k_stride_n, k_stride_d, v_stride_n, v_stride_d,
    num_keys, active_ptr, dims, dim_ok, qk_scale,
    SKIP_ACTIVE: tl.constexpr, BLOCK_N: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Fold `num_keys` keys/values into the online softmax state (acc, row_max, row_sum), base-2 exponentials.
    With SKIP_ACTIVE, keys whose `active` flag is set are masked out."""
    for start in range(0, num_keys, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_ok = keys < num_keys
        if SKIP_ACTIVE:
            key_ok = key_ok & (tl.load(active_ptr + keys, mask=key_ok, other=1) == 0)
        load_mask = key_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_ptr + keys[:, None] * k_stride_n + dims[None, :] * k_stride_d, mask=load_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=INPUT_PRECISION) * qk_scale
        scores = tl.where(key_ok[None, :], scores, float("-inf"))
        # row_max starts finite (see the kernel), so a fully masked tile gives exp2(-inf) = 0 rather than NaN.
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        correction = tl.exp2(row_max - new_max)
        p = tl.exp2(scores - new_max[:, None])
        row_sum = row_sum * correction + tl.sum(p, axis=1)
        v = tl.load(v_ptr + keys[:, None] * v_stride_n + dims[None, :] * v_stride_d, mask=load_mask, other=0.0)
        acc = acc * correction[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=INPUT_PRECISION)
        row_max = new_max
    return acc, row_max, row_sum


@autotune(_ATTENTION_CONFIGS, triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}), key=["num_tokens", "head_dim"])
@triton.jit
def _active_query_attention_kernel(
    out_ptr, q_ptr, kf_ptr, vf_ptr, kr_ptr, vr_ptr, active_ptr,
    num_heads, num_queries, num_fresh, num_tokens, head_dim, qk_scale,
    q_sb, q_sh, q_sn, q_sd,
    kf_sb, kf_sh, kf_sn, kf_sd,
    vf_sb, vf_sh, vf_sn, vf_sd,
    kr_sb, kr_sh, kr_sn, kr_sd,
    vr_sb, vr_sh, vr_sn, vr_sd,
    o_sb, o_sh, o_sn, o_sd,
    INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """BLOCK_M queries of one (batch item, head) against all fresh keys, then all inactive recorded keys."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    batch_head = tl.program_id(1).to(tl.int64)  # 64-bit offsets: large key sets may pass 2**31 elements
    batch = batch_head // num_heads
    head = batch_head % num_heads
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    row_ok = rows < num_queries
    q = tl.load(
        q_ptr + batch * q_sb + head * q_sh + rows[:, None] * q_sn + dims[None, :] * q_sd,
        mask=row_ok[:, None] & dim_ok[None, :], other=0.0,
    )
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    # Finite, below any real score: exp2(row_max - new_max) is then 1 or 0, never exp2(-inf + inf) = NaN.
    row_max = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc, row_max, row_sum = _attend(
        acc, row_max, row_sum, q, kf_ptr + batch * kf_sb + head * kf_sh, vf_ptr + batch * vf_sb + head * vf_sh,
        kf_sn, kf_sd, vf_sn, vf_sd, num_fresh, active_ptr, dims, dim_ok, qk_scale,
        SKIP_ACTIVE=False, BLOCK_N=BLOCK_N, INPUT_PRECISION=INPUT_PRECISION,
    )
    acc, row_max, row_sum = _attend(
        acc, row_max, row_sum, q, kr_ptr + batch * kr_sb + head * kr_sh, vr_ptr + batch * vr_sb + head * vr_sh,
        kr_sn, kr_sd, vr_sn, vr_sd, num_tokens, active_ptr, dims, dim_ok, qk_scale,
        SKIP_ACTIVE=True, BLOCK_N=BLOCK_N, INPUT_PRECISION=INPUT_PRECISION,
    )
    out = acc / row_sum[:, None]
    tl.store(
        out_ptr + batch * o_sb + head * o_sh + rows[:, None] * o_sn + dims[None, :] * o_sd,
        out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :],
    )


def active_query_attention(
    query: torch.Tensor,
    key_fresh: torch.Tensor,
    value_fresh: torch.Tensor,
    key_recorded: torch.Tensor,
    value_recorded: torch.Tensor,
    positions: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Active queries against fresh keys/values at `positions` and recorded ones elsewhere, layout
    ``(B, heads, tokens, head_dim)``; see `reference.active_query_attention`."""
    batch, heads, num_queries, head_dim = query.shape
    num_tokens = key_recorded.shape[-2]
    out = torch.empty_like(query)
    if out.numel() == 0:
        return out
    active = torch.zeros(num_tokens, dtype=torch.bool, device=query.device)
    active[positions] = True
    scale = head_dim**-0.5 if scale is None else scale
    # float32 matmuls follow PyTorch's TF32 setting, as the reference's do; half-precision ones need no choice.
    input_precision = None
    if query.dtype == torch.float32:
        input_precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"

    def grid(meta):
        return (triton.cdiv(num_queries, meta["BLOCK_M"]), batch * heads)

    _active_query_attention_kernel[grid](
        out, query, key_fresh, value_fresh, key_recorded, value_recorded, active,
        heads, num_queries, key_fresh.shape[-2], num_tokens, head_dim, scale * math.log2(math.e),
        *query.stride(), *key_fresh.stride(), *value_fresh.stride(), *key_recorded.stride(),
        *value_recorded.stride(), *out.stride(),
        INPUT_PRECISION=input_precision, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
    )
    return out

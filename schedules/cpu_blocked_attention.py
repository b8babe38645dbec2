"""CPU prefill attention of a chunk over its own keys, blocked: tiles of queries x keys.

``schedules/cpu_attention.py``'s ragged kernel gives each (query, head) its own pass over every
visible key: a 4,096-token prompt streams the keys 4,096 times per head, one dot product at a time
with a horizontal sum per key. This kernel (same signature and results as TVM's
``batch_prefill_ragged_kv``: output in the cache's dtype, lse in log2 units) makes a task of
``QB`` queries of one head. Per tile of ``KB`` keys it

* transposes the keys once into [head_dim, KB], so scores are broadcast-FMAs vectorized over keys
  (a small GEMM: the tile is reused by all ``QB`` queries from L1);
* masks the causal diagonal, then does one online-softmax update per query (exp2 vectorized over
  the tile, ``fast_exp2``);
* accumulates values as broadcast-FMAs vectorized over head_dim, each value row reused by the
  ``QB`` queries.

Tasks are numbered head-major, so with a static split of the parallel loop every thread gets whole
heads: the causal triangle's short and long query blocks are shared out evenly.
"""

from __future__ import annotations

import math

from tvm.script import tirx as T

from .cpu_decode_attention import EMPTY_MAX, fast_exp2

QB = 8  # queries per task (of each of the group's heads)
KB = 64  # keys per tile (_tree below reduces exactly 64)
LOG2E = math.log2(math.e)


def blocked_ragged_prefill_kernel(kv_heads: int, q_heads: int, head_dim: int, vector: int, dtype: str = "float32"):
    """Causal attention of a chunk's queries over the chunk's own keys (TVM's batch_prefill_ragged_kv)."""
    group = q_heads // kv_heads
    HKV = T.int32(kv_heads)
    R = group * QB

    @T.prim_func(private=True)
    def batch_prefill_ragged_kv(
        var_q: T.handle,  # [total_len, h_q, d]
        var_q_indptr: T.handle,  # [batch_size + 1]
        var_k: T.handle,  # [total_len, h_kv, d]
        var_v: T.handle,  # [total_len, h_kv, d]
        var_kv_indptr: T.handle,  # [batch_size + 1]
        var_q_rope_position: T.handle,  # [total_q_len]
        var_k_rope_pos_offset: T.handle,  # [b]
        var_output: T.handle,  # [total_len, h_q, d]
        var_lse: T.handle,  # [total_len, h_q]
        causal: T.int32,
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        T.func_attr({"tirx.noalias": True})
        batch_size = T.int32()
        qo_len = T.int32()
        kv_len = T.int32()
        q_indptr_elem_offset = T.int32()
        kv_indptr_elem_offset = T.int32()
        q_rope_position_elem_offset = T.int32()
        k_rope_pos_offset_elem_offset = T.int32()
        q = T.match_buffer(var_q, (qo_len, q_heads, head_dim), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_elem_offset)
        k = T.match_buffer(var_k, (kv_len, kv_heads, head_dim), dtype)
        v = T.match_buffer(var_v, (kv_len, kv_heads, head_dim), dtype)
        kv_indptr = T.match_buffer(var_kv_indptr, (batch_size + 1,), "int32", elem_offset=kv_indptr_elem_offset)
        T.match_buffer(var_q_rope_position, (qo_len,), "int32", elem_offset=q_rope_position_elem_offset)
        T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=k_rope_pos_offset_elem_offset)
        output = T.match_buffer(var_output, (qo_len, q_heads, head_dim), dtype)
        lse = T.match_buffer(var_lse, (qo_len, q_heads), "float32")
        assert rotary_mode == 0, "qwen2c's prefill attention expects q and k rotated before attention"
        for b in range(batch_size):
            for task in T.parallel(HKV * ((q_indptr[b + 1] - q_indptr[b] + QB - 1) // QB)):
                qs = T.alloc_buffer((R, head_dim), "float32")
                acc = T.alloc_buffer((R, head_dim), "float32")
                kt = T.alloc_buffer((head_dim, KB), "float32")
                s = T.alloc_buffer((KB,), "float32")
                red = T.alloc_buffer((KB,), "float32")
                md = T.alloc_buffer((R, 2), "float32")  # max, denominator
                st = T.alloc_buffer((2,), "float32")  # tile max, rescale
                # queries in block, first query, keys the block's last query sees, keys before the chunk
                n = T.alloc_buffer((4,), "int32")
                kvh = task // ((q_indptr[b + 1] - q_indptr[b] + QB - 1) // QB)
                n[1] = task % ((q_indptr[b + 1] - q_indptr[b] + QB - 1) // QB) * QB
                n[0] = T.min(QB, q_indptr[b + 1] - q_indptr[b] - n[1])
                n[3] = T.if_then_else(causal > 0, kv_indptr[b + 1] - kv_indptr[b] - (q_indptr[b + 1] - q_indptr[b]), 0)
                n[2] = T.if_then_else(causal > 0, n[3] + n[1] + n[0], kv_indptr[b + 1] - kv_indptr[b])
                # Row r is query n[1] + r % QB of head kvh * group + r // QB.
                for r in range(R):
                    for d in T.vectorized(head_dim):
                        qs[r, d] = T.if_then_else(
                            r % QB < n[0],
                            T.Cast("float32", q[q_indptr[b] + T.min(n[1] + r % QB, q_indptr[b + 1] - q_indptr[b] - 1),
                                                kvh * group + r // QB, d]),
                            T.float32(0)) * sm_scale * T.float32(LOG2E)
                        acc[r, d] = T.float32(0)
                    md[r, 0] = T.float32(EMPTY_MAX)
                    md[r, 1] = T.float32(0)
                for tile in range((T.max(n[2], 0) + KB - 1) // KB):
                    # The tile's keys transposed once, for every row of every head of the group.
                    for j in range(KB):
                        for d in range(head_dim):
                            kt[d, j] = T.if_then_else(
                                tile * KB + j < n[2],
                                T.Cast("float32", k[kv_indptr[b] + T.min(tile * KB + j, T.max(n[2] - 1, 0)), kvh, d]),
                                T.float32(0))
                    for r in range(R):
                        for j in T.vectorized(KB):
                            s[j] = T.float32(0)
                        for d in range(head_dim):
                            for j in T.vectorized(KB):
                                s[j] = s[j] + qs[r, d] * kt[d, j]
                        # Causal mask (and the tile's end): key index < keys this query sees.
                        for j in T.vectorized(KB):
                            s[j] = T.if_then_else(
                                tile * KB + j < T.if_then_else(causal > 0, n[3] + n[1] + r % QB + 1, n[2]),
                                s[j], T.float32(-3.0e38))
                            red[j] = s[j]
                        _tree(red, T.max)
                        st[0] = T.max(md[r, 0], red[0])
                        st[1] = fast_exp2(md[r, 0] - st[0])
                        md[r, 0] = st[0]
                        for j in T.vectorized(KB):
                            s[j] = T.if_then_else(s[j] > T.float32(-1.0e38), fast_exp2(s[j] - st[0]), T.float32(0))
                            red[j] = s[j]
                        _tree(red, _add)
                        md[r, 1] = md[r, 1] * st[1] + red[0]
                        for d in T.vectorized(head_dim):
                            acc[r, d] = acc[r, d] * st[1]
                        for j in range(T.min(KB, n[2] - tile * KB)):
                            for d in T.vectorized(head_dim):
                                acc[r, d] = acc[r, d] + s[j] * T.Cast("float32", v[kv_indptr[b] + tile * KB + j, kvh, d])
                for r in range(R):
                    if r % QB < n[0]:
                        st[1] = T.if_then_else(md[r, 1] > T.float32(0), md[r, 1], T.float32(1))
                        for d in T.vectorized(head_dim):
                            output[q_indptr[b] + n[1] + r % QB, kvh * group + r // QB, d] = T.Cast(dtype, acc[r, d] / st[1])
                        lse[q_indptr[b] + n[1] + r % QB, kvh * group + r // QB] = T.if_then_else(
                            md[r, 1] > T.float32(0), md[r, 0] + T.log2(md[r, 1]), T.float32(EMPTY_MAX))

    return batch_prefill_ragged_kv



def _add(a, b):
    return a + b


@T.macro
def _tree(buf, op):
    """``buf[0] = op(buf[0], ..., buf[KB - 1])`` by halving: log2(KB) vector steps, not KB scalar ones."""
    for j in T.vectorized(32):
        buf[j] = op(buf[j], buf[j + 32])
    for j in T.vectorized(16):
        buf[j] = op(buf[j], buf[j + 16])
    for j in T.vectorized(8):
        buf[j] = op(buf[j], buf[j + 8])
    for j in T.vectorized(4):
        buf[j] = op(buf[j], buf[j + 4])
    buf[0] = op(op(buf[0], buf[2]), op(buf[1], buf[3]))

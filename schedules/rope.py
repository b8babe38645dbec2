"""The KV cache's RoPE kernel: split fused q/k/v and rotate q and k exactly as transformers does.

TVM's paged KV cache rotates q and k with a kernel it is given (``tir_split_rotary``) before it
appends k and attends. TVM's own computes the angle as ``position / theta^(2i/d)`` and knows YaRN
without its attention factor, so it is not transformers' RoPE: at long positions a 1-ulp
difference in a frequency moves the angle by position x ulp. This one reads the model's own
frequencies from a table the cache holds (passed as the cache's "RoPE extension factors", which
the cache hands to this kernel and nothing else): ``table[:d/2]`` is transformers' ``inv_freq``
(float32; any scaling type already in it) and ``table[d/2]`` the factor cos and sin are multiplied
by (YaRN's mscale; 1 otherwise). Per element, as transformers:

    angle = float32(position) * inv_freq[i mod d/2]
    cos, sin = cast(cos(angle) * factor), cast(sin(angle) * factor)       (cast: to the dtype)
    out = cast(x * cos) + cast(rotate_half(x) * sin)                      (each product rounded)

The loop nest is plain s_tir blocks: the GPU pipeline schedules it with DLight's fallback rule;
on CPUs its tokens run in parallel (``cpu=True``).
"""

from __future__ import annotations

from tvm.script import tirx as T

# The global symbol of the TVM kernel this replaces (TVM's llama_rope_with_position_map, which the
# cache's creation adds and passes as its "tir_split_rotary" function).
SPLIT_ROTARY = "fused_rope"


def split_rotary_kernel(q_heads: int, kv_heads: int, head_dim: int, dtype: str, cpu: bool = False):
    """``(qkv [n, q+2kv, d], positions [n], q, k, v, table [d/2 + 1]) -> q, k rotated; v copied``."""
    fused_heads = q_heads + 2 * kv_heads
    half = head_dim // 2

    def rotated(qkv, table, s, h, d, position):
        angle = T.Cast("float32", position) * table[d % half]
        cos = T.Cast(dtype, T.cos(angle) * table[half])
        sin = T.Cast(dtype, T.sin(angle) * table[half])
        other = T.if_then_else(d < half, -qkv[s, h, d + half], qkv[s, h, d - half])
        return T.Cast(dtype, T.Cast(dtype, qkv[s, h, d] * cos) + T.Cast(dtype, other * sin))

    @T.prim_func(private=True, s_tir=True)
    def split_rotary(
        var_qkv: T.handle,
        var_position_map: T.handle,
        var_q: T.handle,
        var_k: T.handle,
        var_v: T.handle,
        var_table: T.handle,
    ):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True})
        seq_len = T.int32()
        position_map_elem_offset = T.int32()
        table_elem_offset = T.int32()
        qkv = T.match_buffer(var_qkv, (seq_len, fused_heads, head_dim), dtype)
        q = T.match_buffer(var_q, (seq_len, q_heads, head_dim), dtype)
        k = T.match_buffer(var_k, (seq_len, kv_heads, head_dim), dtype)
        v = T.match_buffer(var_v, (seq_len, kv_heads, head_dim), dtype)
        position_map = T.match_buffer(var_position_map, (seq_len,), "int32", elem_offset=position_map_elem_offset)
        table = T.match_buffer(var_table, (half + 1,), "float32", elem_offset=table_elem_offset)
        for s_, h_, d_ in T.grid(seq_len, fused_heads, head_dim):
            with T.sblock("split_rotary"):
                s, h, d = T.axis.remap("SSS", [s_, h_, d_])
                if h < q_heads:
                    q[s, h, d] = rotated(qkv, table, s, h, d, position_map[s])
                elif h < q_heads + kv_heads:
                    k[s, h - q_heads, d] = rotated(qkv, table, s, h, d, position_map[s])
                else:
                    v[s, h - q_heads - kv_heads, d] = qkv[s, h, d]

    if not cpu:
        return split_rotary
    from tvm import s_tir

    sch = s_tir.Schedule(split_rotary)
    sch.parallel(sch.get_loops(sch.get_sblock("split_rotary"))[0])
    return sch.mod["main"]

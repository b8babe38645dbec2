"""CPU prefill attention for the KV cache: parallel, vectorized replacements of TVM's CPU kernels.

TVM's paged KV cache attends a prefill chunk's queries with two kernels: over the cache's pages
("paged", which on CPU also holds the chunk itself once appended) and over the chunk's own keys
("ragged"); partial results are merged by their log-sum-exp. TVM 0.27's CPU versions are serial,
scalar loop nests, and the paged one visits every slot of the cache's capacity for every query
(max_context x queries x heads): measured 5.9 ms per layer for 128 tokens of qwen2-0.5b, a fifth
of its prefill. (It also indexes a one-element rescale buffer by the head dimension.)

These have the same signatures and results (output, and lse in log2 units; q, k, v and output in
the cache's dtype, everything inside in float32), computed with an
online softmax: one task per (query, head), keeping only its running max, denominator and a
[head_dim] accumulator, over only the keys the causal mask lets it see (TVM's weights the others
by exp2(-5e4 ...), i.e. by zero). An empty key range gives output 0 and lse -5e4, as TVM's.

RoPE: qwen2c's caches rotate q and k before attention (RopeMode.NORMAL), so ``rotary_mode`` is 0;
the kernels assert it rather than rotating.

Sliding-window layers (TVM's ``mha_sliding``): the cache gives their paged kernel only the pages of
the window ending at the last cached key, with ``length_info`` [3, b] = (slots used in the last
page, offset of the window's first key in the first page, attention-sink length), and the chunk's
query i sees the cached keys within ``window - 1 - i`` of the chunk's start (the chunk's own keys
come from the ragged kernel, so chunks are at most the window long). TVM's CPU version reads an
unset running maximum when a query's first key is masked (NaN); qwen2c's attends only the visible
keys. qwen2c's caches have no attention sink, which the kernel asserts.
"""

from __future__ import annotations

import math

from tvm.script import tirx as T

from .cpu_moe import lanes_for

# The global symbols of the TVM kernels these replace (see relax_module.py).
RAGGED_PREFILL = "batch_prefill_ragged_kv"
PAGED_PREFILL = "batch_prefill_paged_kv_cpu"
PAGED_PREFILL_SLIDING = "batch_prefill_paged_kv_cpu_sliding_window"
EMPTY_MAX = -5.0e4
# TVM builds its CPU cache kernels for 16-slot pages (TIRPagedKVCache does not pass a page size to
# them), so engines create their caches with this page size (targets/tvm/runtime.py).
CACHE_PAGE_SIZE = 16

LOG2E = math.log2(math.e)


def _attend(kv_heads: int, q_heads: int, head_dim: int, vector: int, paged: bool, dtype: str):
    """The per-(query, head) online softmax, as a macro over where keys and values live."""
    group = q_heads // kv_heads
    V = lanes_for(head_dim, vector)
    DO = head_dim // V

    @T.macro
    def attend(q, row, h, first, visible, kv_base, keys, values, page_values, page_size, output, lse, sm_scale):
        acc = T.alloc_buffer((head_dim,), "float32")
        dot = T.alloc_buffer((V,), "float32")
        state = T.alloc_buffer((4,), "float32")  # max, denominator, score, rescale
        for d in T.vectorized(head_dim):
            acc[d] = T.float32(0)
        state[0] = T.float32(EMPTY_MAX)
        state[1] = T.float32(1)  # exp2(EMPTY_MAX - max): vanishes once a real score is seen
        for t in range(visible):
            j = first + t  # the key's slot: in the chunk (ragged), or in the sequence's pages
            for lane in T.vectorized(V):
                dot[lane] = T.float32(0)
            for do in range(DO):
                for lane in T.vectorized(V):
                    if paged:
                        dot[lane] = dot[lane] + T.Cast("float32", q[row, h, do * V + lane]) * T.Cast("float32", keys[
                            page_values[kv_base + j // page_size], 0, h // group, j % page_size, do * V + lane])
                    else:
                        dot[lane] = dot[lane] + T.Cast("float32", q[row, h, do * V + lane]) * T.Cast(
                            "float32", keys[kv_base + j, h // group, do * V + lane])
            state[2] = T.float32(0)
            for lane in range(V):
                state[2] = state[2] + dot[lane]
            state[2] = state[2] * sm_scale * T.float32(LOG2E)
            # Online softmax in log2 units: rescale what was accumulated when the max grows.
            state[3] = T.exp2(state[0] - T.max(state[0], state[2]))
            state[0] = T.max(state[0], state[2])
            state[2] = T.exp2(state[2] - state[0])
            state[1] = state[1] * state[3] + state[2]
            for d in T.vectorized(head_dim):
                if paged:
                    acc[d] = acc[d] * state[3] + state[2] * T.Cast("float32", values[
                        page_values[kv_base + j // page_size], 1, h // group, j % page_size, d])
                else:
                    acc[d] = acc[d] * state[3] + state[2] * T.Cast("float32", values[kv_base + j, h // group, d])
        for d in T.vectorized(head_dim):
            output[row, h, d] = T.Cast(dtype, acc[d] / state[1])
        lse[row, h] = state[0] + T.log2(state[1])

    return attend


def ragged_prefill_kernel(kv_heads: int, q_heads: int, head_dim: int, vector: int, dtype: str = "float32"):
    """Causal attention of a chunk's queries over the chunk's own keys (TVM's batch_prefill_ragged_kv)."""
    attend = _attend(kv_heads, q_heads, head_dim, vector, paged=False, dtype=dtype)
    HQ = T.int32(q_heads)

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
            for task in T.parallel((q_indptr[b + 1] - q_indptr[b]) * HQ):
                attend(
                    q, q_indptr[b] + task // HQ, task % HQ, 0,
                    T.if_then_else(causal > 0, kv_indptr[b + 1] - q_indptr[b + 1] + q_indptr[b] - kv_indptr[b]
                                   + task // HQ + 1, kv_indptr[b + 1] - kv_indptr[b]),
                    kv_indptr[b], k, v, kv_indptr, 1, output, lse, sm_scale,
                )

    return batch_prefill_ragged_kv


def paged_prefill_kernel(kv_heads: int, q_heads: int, head_dim: int, vector: int, page_size: int,
                         dtype: str = "float32"):
    """Causal attention of a chunk's queries over a sequence's pages (TVM's batch_prefill_paged_kv_cpu)."""
    attend = _attend(kv_heads, q_heads, head_dim, vector, paged=True, dtype=dtype)
    HQ = T.int32(q_heads)
    PAGE = T.int32(page_size)

    @T.prim_func(private=True)
    def batch_prefill_paged_kv_cpu(
        var_q: T.handle,  # [total_len, h_q, d]
        var_q_indptr: T.handle,  # [batch_size + 1]
        var_pages: T.handle,  # [max_num_pages, 2, h_kv, page_size, d]
        var_page_indptr: T.handle,  # [batch_size + 1]
        var_page_values: T.handle,  # [nnz_pages]
        var_length_info: T.handle,  # [b]: slots used in each sequence's last page
        var_k_rope_pos_offset: T.handle,  # [b]
        var_q_rope_position: T.handle,  # [total_len]
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
        total_len = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        q_indptr_elem_offset = T.int32()
        page_indptr_elem_offset = T.int32()
        page_values_elem_offset = T.int32()
        k_rope_pos_offset_elem_offset = T.int32()
        q_rope_position_elem_offset = T.int32()
        length_info_elem_offset = T.int32()
        q = T.match_buffer(var_q, (total_len, q_heads, head_dim), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_elem_offset)
        pages = T.match_buffer(var_pages, (max_num_pages, 2, kv_heads, page_size, head_dim), dtype)
        page_indptr = T.match_buffer(var_page_indptr, (batch_size + 1,), "int32", elem_offset=page_indptr_elem_offset)
        page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32", elem_offset=page_values_elem_offset)
        T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=k_rope_pos_offset_elem_offset)
        T.match_buffer(var_q_rope_position, (total_len,), "int32", elem_offset=q_rope_position_elem_offset)
        output = T.match_buffer(var_output, (total_len, q_heads, head_dim), dtype)
        lse = T.match_buffer(var_lse, (total_len, q_heads), "float32")
        last_page_len = T.match_buffer(var_length_info, (batch_size,), "int32", elem_offset=length_info_elem_offset)
        assert rotary_mode == 0, "qwen2c's prefill attention expects q and k rotated before attention"
        for b in range(batch_size):
            for task in T.parallel((q_indptr[b + 1] - q_indptr[b]) * HQ):
                # Keys in the sequence's pages: full pages, then the used part of the last one.
                attend(
                    q, q_indptr[b] + task // HQ, task % HQ, 0,
                    T.if_then_else(
                        page_indptr[b + 1] == page_indptr[b], 0,
                        T.if_then_else(
                            causal > 0,
                            (page_indptr[b + 1] - page_indptr[b] - 1) * PAGE + last_page_len[b]
                            - (q_indptr[b + 1] - q_indptr[b]) + task // HQ + 1,
                            (page_indptr[b + 1] - page_indptr[b] - 1) * PAGE + last_page_len[b],
                        ),
                    ),
                    page_indptr[b], pages, pages, page_values, PAGE, output, lse, sm_scale,
                )

    return batch_prefill_paged_kv_cpu


def paged_prefill_sliding_kernel(kv_heads: int, q_heads: int, head_dim: int, vector: int, page_size: int,
                                 window: int, dtype: str = "float32"):
    """Attention of a chunk's queries over the cached keys of a sliding-window layer (TVM's
    batch_prefill_paged_kv_cpu_sliding_window): query i of a chunk sees the last ``window - 1 - i``
    cached keys (causal), or all of the window's keys (not causal)."""
    attend = _attend(kv_heads, q_heads, head_dim, vector, paged=True, dtype=dtype)
    HQ = T.int32(q_heads)
    PAGE = T.int32(page_size)
    W = T.int32(window)

    @T.prim_func(private=True)
    def batch_prefill_paged_kv_cpu_sliding_window(
        var_q: T.handle,  # [total_len, h_q, d]
        var_q_indptr: T.handle,  # [batch_size + 1]
        var_pages: T.handle,  # [max_num_pages, 2, h_kv, page_size, d]
        var_page_indptr: T.handle,  # [batch_size + 1]
        var_page_values: T.handle,  # [nnz_pages]
        var_length_info: T.handle,  # [3, b]: last page's used slots, window offset, sink length
        var_k_rope_pos_offset: T.handle,  # [b]
        var_q_rope_position: T.handle,  # [total_len]
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
        total_len = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        q_indptr_elem_offset = T.int32()
        page_indptr_elem_offset = T.int32()
        page_values_elem_offset = T.int32()
        k_rope_pos_offset_elem_offset = T.int32()
        q_rope_position_elem_offset = T.int32()
        length_info_elem_offset = T.int32()
        q = T.match_buffer(var_q, (total_len, q_heads, head_dim), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_elem_offset)
        pages = T.match_buffer(var_pages, (max_num_pages, 2, kv_heads, page_size, head_dim), dtype)
        page_indptr = T.match_buffer(var_page_indptr, (batch_size + 1,), "int32", elem_offset=page_indptr_elem_offset)
        page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32", elem_offset=page_values_elem_offset)
        T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=k_rope_pos_offset_elem_offset)
        T.match_buffer(var_q_rope_position, (total_len,), "int32", elem_offset=q_rope_position_elem_offset)
        output = T.match_buffer(var_output, (total_len, q_heads, head_dim), dtype)
        lse = T.match_buffer(var_lse, (total_len, q_heads), "float32")
        length_info = T.match_buffer(var_length_info, (3, batch_size), "int32", elem_offset=length_info_elem_offset)
        assert rotary_mode == 0, "qwen2c's prefill attention expects q and k rotated before attention"
        for b in range(batch_size):
            assert length_info[2, b] == 0, "qwen2c's sliding-window kernel expects no attention sink"
            for task in T.parallel((q_indptr[b + 1] - q_indptr[b]) * HQ):
                # The window's keys: slots offset .. offset + cached - 1 of the listed pages.
                cached = T.if_then_else(
                    page_indptr[b + 1] == page_indptr[b], 0,
                    (page_indptr[b + 1] - page_indptr[b] - 1) * PAGE + length_info[0, b] - length_info[1, b])
                visible = T.if_then_else(causal > 0, T.min(cached, T.max(W - 1 - task // HQ, 0)), cached)
                attend(
                    q, q_indptr[b] + task // HQ, task % HQ, length_info[1, b] + cached - visible, visible,
                    page_indptr[b], pages, pages, page_values, PAGE, output, lse, sm_scale,
                )

    return batch_prefill_paged_kv_cpu_sliding_window

"""CPU decode attention for the paged KV cache: split over key ranges, merged by log-sum-exp.

TVM 0.27's CPU decode kernel (``batch_decode_paged_kv_cpu``) is one serial loop nest: every query
head walks every key of the sequence alone, one scalar at a time, and rescales its accumulator after
each key. Measured on qwen2-0.5b it adds 52 ms per token after 3,000 tokens, ~30x what reading the
cache costs. This one has the same signature and results (output in the cache's dtype, lse in log2
units, float32 inside) and is organised for memory speed:

* phase 1, parallel over (sequence, key range): the key range of a task is a run of ``TILE``-key
  tiles (split-K: a long context is cut into up to ``SPLITS`` ranges, so every core has work with
  one sequence). A task computes every query head, kv head by kv head, so a page's keys and then
  its values are read once and in address order (TVM's page is [K/V, kv head, slot, head_dim]).
  Tasks over (kv head, range) were measured 2-2.6x slower once the cache left L2 (4,000 tokens,
  one thread); each task then read 4 KB pieces 8 KB apart, which the hardware prefetcher, which
  starts over at every 4 KB page, probably serves badly. Per ``TILE``-key tile a task computes,
  for each kv head, the [group, TILE] scores, one online-softmax update per query head (max, one
  rescale, exp2 vectorized over the tile) and the values' products, and it leaves an unnormalised
  partial (accumulator, max, denominator) in scratch. How a tile is computed:

  - ``attend_tile`` (a cache without a sliding window, pages a multiple of ``TILE`` slots: every
    tile is ``TILE`` consecutive slots of one page) treats it as two small matmuls. The tile's keys
    are transposed in registers to [head_dim, TILE], so a query head's scores are one TILE-lane
    register accumulated over head_dim with the query element broadcast: no lane sum per key, and
    the cache's float16 is converted once per key instead of once per query head. Each step runs
    for all the heads of the kv head before the next, so the core overlaps their dependency chains.
  - ``attend_keys`` (sliding windows, odd page sizes) goes key by key: a score is a vector product
    over head_dim summed across lanes.

  While it reads a tile, ``attend_tile`` asks for the next tile's lines, one row at a time: the
  tile's arithmetic otherwise waited for the cache (from DRAM it took the time in cache plus the
  time to read, no overlap). Prefetching the whole next page at once was worse than none (on one
  thread, 7.5 against 5.0 ms).

  Measured at 4,000 tokens (qwen2-0.5b geometry, float16 cache, 24 layers, 2 threads, AMD Zen 5),
  ``attend_tile`` against ``attend_keys``: 1.86 against 2.51 ms with the cache in L2/L3, 2.23
  against 3.42 ms with it in DRAM (as a decode step finds it); 1.62 and 2.71 without the prefetch.
  Unrolling the value loop over keys was slower (front-end bound: 4.6 against 3.7 ms on one
  thread), and so were 32-key tiles (3.9 against 2.6 ms from DRAM).
* phase 2, serial over (sequence, query head): the partials are merged by their log-sum-exp.

A context shorter than ``SPLITS`` tiles uses one range per tile: the tasks past them return at once
and the merge reads only the ranges used (at 16 tokens, one). Writing and merging all ``SPLITS``
partials cost the qwen2-0.5b decode step ~8% of its time at 16 tokens.

``exp2`` is a polynomial (``fast_exp2``) so that it vectorizes: LLVM lowers a vector ``llvm.exp2``
to one libm call per lane on x86.

Visible keys: rows ``[0, chunk_len)`` of the sequence, where a sliding-window cache (``sliding_window``
True, ``length_info`` [3, batch]: last page's length, window start, sink length) maps row ``r`` to
``r`` for the first ``sink`` rows and to ``r - sink + window_start`` after, as TVM's kernels do.
The key ranges are rows, so the window only changes how a row finds its slot.

RoPE: qwen2c's caches rotate q and k before attention (RopeMode.NORMAL); ``rotary_mode`` must be 0.
"""

from __future__ import annotations

import math

from tvm import tirx
from tvm.script import tirx as T

from .cpu_moe import lanes_for
from .lanes import LANES, block_transpose, lane_reduce, lane_sum
from .prefetch import prefetch

DECODE = "batch_decode_paged_kv_cpu"
DECODE_SLIDING = "batch_decode_paged_kv_cpu_sliding_window"
EMPTY_MAX = -5.0e4  # TVM's "no score yet"; an empty sequence gets output 0 and lse EMPTY_MAX
TILE = 16  # keys per online-softmax update (one cache page)
GROUP_CHUNK = 8  # query heads of a kv head whose tile scores are accumulated together (a register each)
SPLITS = 16  # most key ranges one (sequence, kv head) is cut into (the default: autotune/params.py)
LOG2E = math.log2(math.e)

# 2**f on [0, 1): least-squares fit of degree 6 on Chebyshev nodes, relative error 1.9e-9 (below
# float32's own rounding).
_EXP2_POLY = (1.0, 0.693146987, 0.240229796, 0.0554835247, 0.00967847255, 0.00124430815, 0.000216906092)


def fast_exp2(x):
    """2**x for float32 x <= 0, as plain arithmetic that vectorizes; x below -126 gives 2**-126."""
    x = T.max(x, T.float32(-126.0))
    n = T.floor(x)
    f = x - n
    p = T.float32(_EXP2_POLY[-1])
    for c in reversed(_EXP2_POLY[:-1]):
        p = p * f + T.float32(c)
    return p * T.reinterpret("float32", T.shift_left(T.Cast("int32", n) + 127, 23))


def decode_kernel(kv_heads: int, q_heads: int, head_dim: int, vector: int, page_size: int,
                  dtype: str = "float32", sliding_window: bool = False, splits: int = SPLITS):
    """Attention of one new query per sequence over its pages (TVM's batch_decode_paged_kv_cpu)."""
    group = q_heads // kv_heads
    V = lanes_for(head_dim, min(vector, 16))  # the lane tree sum below goes up to 16
    DO = head_dim // V
    HQ = T.int32(q_heads)
    NS = T.int32(splits)
    PAGE = T.int32(page_size)
    # A tile of a cache without a window is TILE consecutive slots of one page: it goes through
    # ``attend_tile``, a small matmul per kv head. A sliding window maps rows to slots piecewise, and
    # an odd page size splits tiles across pages: those tiles take the per-key ``attend_keys``.
    tiled = not sliding_window and page_size % TILE == 0 and TILE % V == 0 and V in LANES
    transpose, in_tmp = block_transpose(V) if tiled else (None, False)
    GC = min(group, GROUP_CHUNK)
    PER_LINE = 64 // (2 if dtype in ("float16", "bfloat16") else 4)  # cache elements per 64-byte line
    LINES = max(1, head_dim // PER_LINE)  # lines per cached row
    PVH = max(1, (16 if V == 16 else 8) // DO)  # heads whose value accumulators stay in registers together
    zero64 = T.int64(0)

    def chunk_len(length_info, b, pages):
        if sliding_window:
            return (pages - 1) * PAGE + length_info[0, b] - length_info[1, b] + length_info[2, b]
        return (pages - 1) * PAGE + length_info[b]

    def seq_rows(length_info, page_indptr, b):
        """Keys sequence ``b`` attends (0 for one with no pages)."""
        return T.if_then_else(page_indptr[b + 1] == page_indptr[b], 0,
                              chunk_len(length_info, b, page_indptr[b + 1] - page_indptr[b]))

    def tiles_of(rows):
        return (rows + TILE - 1) // TILE

    def tiles_per_range(tiles):
        """Ranges of whole tiles: as many as there are tiles, at most SPLITS."""
        return (tiles + NS - 1) // NS

    def ranges_used(tiles):
        """Ranges holding keys (one for no keys: task 0 writes the empty partial)."""
        return T.if_then_else(tiles == 0, 1, (tiles + tiles_per_range(tiles) - 1) // tiles_per_range(tiles))

    def seq_offset(length_info, b, row):
        if sliding_window:
            return T.if_then_else(row < length_info[2, b], row, row - length_info[2, b] + length_info[1, b])
        return row

    def score_lanes(qs, pages, page, h, kvh, slot):
        """q . k as V float32 lanes: the head_dim products summed over its DO vectors."""
        total = None
        for do in range(DO):
            lanes = T.ramp(T.int32(do * V), 1, V)
            term = qs[h, lanes] * T.Cast(f"float32x{V}", pages[page, 0, kvh, slot, lanes])
            total = term if total is None else total + term
        return total

    @T.macro
    def attend_keys(b, tile, span, s, md, acc, qs, pages, page_indptr, page_values, length_info):
        """One tile, key by key: scores by lane sums, one online-softmax update per head."""
        for h in range(q_heads):
            for j in range(TILE):
                s[h, j] = T.float32(-3.0e38)  # rows past the end: weight 0 below
        # kv head outermost, then rows: a page's keys (then values) are read in address order.
        for kvh in range(kv_heads):
            for j in range(T.min(TILE, span[0] - (span[2] + tile) * TILE)):
                span[4] = seq_offset(length_info, b, (span[2] + tile) * TILE + j)
                for g in range(group):
                    s[kvh * group + g, j] = lane_sum(score_lanes(
                        qs, pages, page_values[page_indptr[b] + span[4] // PAGE], kvh * group + g, kvh,
                        span[4] % PAGE), V)
        # One online-softmax update per tile and head.
        for h in range(q_heads):
            md[h, 2] = s[h, 0]
            for j in range(1, TILE):
                md[h, 2] = T.max(md[h, 2], s[h, j])
            md[h, 3] = fast_exp2(md[h, 0] - T.max(md[h, 0], md[h, 2]))
            md[h, 0] = T.max(md[h, 0], md[h, 2])
            for j in T.vectorized(TILE):
                s[h, j] = T.if_then_else(s[h, j] > T.float32(-1.0e38), fast_exp2(s[h, j] - md[h, 0]),
                                         T.float32(0))
            md[h, 1] = md[h, 1] * md[h, 3]
            for j in range(TILE):
                md[h, 1] = md[h, 1] + s[h, j]
            for d in T.vectorized(head_dim):
                acc[h, d] = acc[h, d] * md[h, 3]
        for kvh in range(kv_heads):
            for j in range(T.min(TILE, span[0] - (span[2] + tile) * TILE)):
                span[4] = seq_offset(length_info, b, (span[2] + tile) * TILE + j)
                for g in range(group):
                    for d in T.vectorized(head_dim):
                        acc[kvh * group + g, d] = acc[kvh * group + g, d] + s[kvh * group + g, j] * T.Cast(
                            "float32", pages[page_values[page_indptr[b] + span[4] // PAGE], 1, kvh, span[4] % PAGE, d])
    def hd(kvh, gc, g):
        return kvh * group + gc * GC + g

    @T.macro
    def tile_heads(kvh, gc, span, sv, md, acc, qs, kt, vt):
        """Scores, softmax update and values of one tile for GC query heads of kv head ``kvh``.

        Each step runs for all the heads before the next, so the heads' independent chains (lane
        reductions, exp2 polynomials) can overlap. g is unrolled wherever it indexes ``sv``:
        constant indices let LLVM keep the scores in registers (a loop over g sent them through the
        stack, read back by narrower loads). The value loop over keys stays a loop."""
        for g in T.unroll(GC):
            for j in T.vectorized(TILE):
                sv[g, j] = T.float32(0)
        for d in range(head_dim):
            for g in T.unroll(GC):
                if gc * GC + g < group:
                    for j in T.vectorized(TILE):
                        sv[g, j] = sv[g, j] + qs[hd(kvh, gc, g), d] * kt[kvh, d, j]
        if span[4] < TILE:  # rows past the end: no weight
            for g in T.unroll(GC):
                for j in T.vectorized(TILE):
                    sv[g, j] = T.Select(j < span[4], sv[g, j], T.float32(-3.0e38))
        # Online softmax: the tile's max, one rescale per head, exp2 of the tile.
        for g in T.unroll(GC):
            if gc * GC + g < group:
                md[hd(kvh, gc, g), 2] = T.max(md[hd(kvh, gc, g), 0],
                                              lane_reduce(sv[g, T.ramp(0, 1, TILE)], TILE, T.max))
        for g in T.unroll(GC):
            if gc * GC + g < group:
                md[hd(kvh, gc, g), 3] = fast_exp2(md[hd(kvh, gc, g), 0] - md[hd(kvh, gc, g), 2])
                md[hd(kvh, gc, g), 0] = md[hd(kvh, gc, g), 2]
        for g in T.unroll(GC):
            if gc * GC + g < group:
                for j in T.vectorized(TILE):
                    sv[g, j] = T.if_then_else(j < span[4], fast_exp2(sv[g, j] - md[hd(kvh, gc, g), 0]), T.float32(0))
        for g in T.unroll(GC):
            if gc * GC + g < group:
                md[hd(kvh, gc, g), 1] = (md[hd(kvh, gc, g), 1] * md[hd(kvh, gc, g), 3]
                                         + lane_sum(sv[g, T.ramp(0, 1, TILE)], TILE))
        # Values: PVH heads at a time (their accumulators fill about half the vector registers),
        # each value row loaded once for them.
        for gb in T.unroll((GC + PVH - 1) // PVH):
            for g2 in T.unroll(PVH):
                if gb * PVH + g2 < GC and gc * GC + gb * PVH + g2 < group:
                    for d in T.vectorized(head_dim):
                        acc[hd(kvh, gc, gb * PVH + g2), d] = (acc[hd(kvh, gc, gb * PVH + g2), d]
                                                             * md[hd(kvh, gc, gb * PVH + g2), 3])
            for j in range(span[4]):
                for g2 in T.unroll(PVH):
                    if gb * PVH + g2 < GC and gc * GC + gb * PVH + g2 < group:
                        for d in T.vectorized(head_dim):
                            acc[hd(kvh, gc, gb * PVH + g2), d] = (acc[hd(kvh, gc, gb * PVH + g2), d]
                                                                 + sv[gb * PVH + g2, j]
                                                                 * vt[kvh, j, d])

    @T.macro
    def prefetch_row(pages, pv, kv, kvh, j):
        """Row ``j`` of the next tile's keys (kv 0) or values (kv 1), into L1 (llvm.prefetch: read,
        locality 3, data)."""
        for line in range(LINES):
            prefetch(pages, pv[2], kv, kvh, pv[3] + j, line * PER_LINE)

    @T.macro
    def attend_tile(b, tile, span, sv, md, acc, qs, pages, page_indptr, page_values, kt, vt, blk, tmp, pv):
        """One tile of TILE consecutive slots of one page: keys transposed into ``kt`` [kv head,
        head_dim, TILE], values converted into ``vt`` [kv head, TILE, head_dim], then
        ``tile_heads``. The slots past the sequence's end hold anything, NaN included: their keys'
        scores are masked in ``tile_heads`` and their values are zeroed here."""
        span[4] = T.min(TILE, span[0] - (span[2] + tile) * TILE)  # rows of the tile in the sequence
        pv[0] = page_values[page_indptr[b] + (span[2] + tile) * TILE // PAGE]
        pv[1] = (span[2] + tile) * TILE % PAGE
        # The next tile's page and first slot (this tile's, for the last one), prefetched row by row
        # below, interleaved with this tile's loads.
        pv[2] = page_values[page_indptr[b] + T.min(span[2] + tile + 1, span[3] - 1) * TILE // PAGE]
        pv[3] = T.min(span[2] + tile + 1, span[3] - 1) * TILE % PAGE
        # All kv heads' keys, then all their values: the page is read in address order.
        for kvh in range(kv_heads):
            for jb in range(TILE // V):
                for db in range(DO):
                    for r in range(V):
                        if db == 0:
                            prefetch_row(pages, pv, 0, kvh, jb * V + r)
                        blk[T.int64(r), T.ramp(zero64, T.int64(1), V)] = T.Cast(
                            f"float32x{V}", pages[pv[0], 0, kvh, pv[1] + jb * V + r, T.ramp(db * V, 1, V)])
                    transpose(blk, tmp)
                    for r in range(V):
                        kt[kvh, db * V + r, T.ramp(jb * V, 1, V)] = (tmp if in_tmp else blk)[
                            T.int64(r), T.ramp(zero64, T.int64(1), V)]
        for kvh in range(kv_heads):
            for j in range(TILE):
                prefetch_row(pages, pv, 1, kvh, j)
                for d in T.vectorized(head_dim):
                    vt[kvh, j, d] = T.if_then_else(j < span[4], T.Cast("float32", pages[pv[0], 1, kvh, pv[1] + j, d]),
                                                   T.float32(0))
        for kvh in range(kv_heads):
            for gc in range((group + GC - 1) // GC):
                tile_heads(kvh, gc, span, sv, md, acc, qs, kt, vt)

    @T.macro
    def attend_range(b, task, span, qs, acc, s, md, q, pages, page_indptr, page_values, length_info, part_acc,
                     part_md, sm_scale):
        """Phase 1 for one task: its range's tiles, left as an unnormalised partial."""
        for h in range(q_heads):
            # Scores come out in log2 units, scaled once here instead of once per key.
            for d in T.vectorized(head_dim):
                qs[h, d] = T.Cast("float32", q[b, h, d]) * sm_scale * T.float32(LOG2E)
                acc[h, d] = T.float32(0)
            md[h, 0] = T.float32(EMPTY_MAX)
            md[h, 1] = T.float32(0)
        if tiled:
            kt = T.alloc_buffer((kv_heads, head_dim, TILE), "float32")
            vt = T.alloc_buffer((kv_heads, TILE, head_dim), "float32")
            blk = T.alloc_buffer((V, V), "float32")
            tmp = T.alloc_buffer((V, V), "float32")
            pv = T.alloc_buffer((4,), "int32")  # page, first slot
            sv = T.alloc_buffer((GC, TILE), "float32")
            for tile in range(span[3] - span[2]):
                attend_tile(b, tile, span, sv, md, acc, qs, pages, page_indptr, page_values, kt, vt, blk, tmp, pv)
        else:
            for tile in range(span[3] - span[2]):
                attend_keys(b, tile, span, s, md, acc, qs, pages, page_indptr, page_values, length_info)
        for h in range(q_heads):
            for d in T.vectorized(head_dim):
                part_acc[task, h, d] = acc[h, d]
            part_md[task, h, 0] = md[h, 0]
            part_md[task, h, 1] = md[h, 1]

    @T.prim_func(private=True)
    def batch_decode_paged_kv_cpu(
        var_q: T.handle,  # [batch, h_q, d]
        var_pages: T.handle,  # [max_num_pages, 2, h_kv, page_size, d]
        var_page_indptr: T.handle,  # [batch + 1]
        var_page_values: T.handle,  # [nnz_pages]
        var_length_info: T.handle,  # [batch], or [3, batch] with a sliding window
        var_k_rope_pos_offset: T.handle,  # [batch]
        var_q_rope_position: T.handle,  # [batch]
        var_output: T.handle,  # [batch, h_q, d]
        var_lse: T.handle,  # [batch, h_q]
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        T.func_attr({"tirx.noalias": True})
        B = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        page_indptr_elem_offset = T.int32()
        page_values_elem_offset = T.int32()
        k_rope_pos_offset_elem_offset = T.int32()
        q_rope_position_elem_offset = T.int32()
        length_info_elem_offset = T.int32()
        q = T.match_buffer(var_q, (B, q_heads, head_dim), dtype)
        pages = T.match_buffer(var_pages, (max_num_pages, 2, kv_heads, page_size, head_dim), dtype)
        page_indptr = T.match_buffer(var_page_indptr, (B + 1,), "int32", elem_offset=page_indptr_elem_offset)
        page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32", elem_offset=page_values_elem_offset)
        length_info = T.match_buffer(var_length_info, (3, B) if sliding_window else (B,), "int32",
                                     elem_offset=length_info_elem_offset)
        T.match_buffer(var_k_rope_pos_offset, (B,), "int32", elem_offset=k_rope_pos_offset_elem_offset)
        T.match_buffer(var_q_rope_position, (B,), "int32", elem_offset=q_rope_position_elem_offset)
        output = T.match_buffer(var_output, (B, q_heads, head_dim), dtype)
        lse = T.match_buffer(var_lse, (B, q_heads), "float32")
        assert rotary_mode == 0, "qwen2c's decode attention expects q and k rotated before attention"
        # Partials of every (sequence, key range) task: accumulator, then max and denominator.
        part_acc = T.alloc_buffer((B * NS, q_heads, head_dim), "float32")
        part_md = T.alloc_buffer((B * NS, q_heads, 2), "float32")
        for task in T.parallel(B * NS):
            qs = T.alloc_buffer((q_heads, head_dim), "float32")
            acc = T.alloc_buffer((q_heads, head_dim), "float32")
            s = T.alloc_buffer((q_heads, TILE), "float32")
            md = T.alloc_buffer((q_heads, 4), "float32")  # max, denominator, tile max, rescale
            span = T.alloc_buffer((5,), "int32")  # rows, tiles per range, first tile, end tile, row
            b = task // NS
            split = task % NS
            span[0] = seq_rows(length_info, page_indptr, b)
            span[1] = tiles_per_range(tiles_of(span[0]))
            span[2] = split * span[1]
            span[3] = T.min(span[2] + span[1], tiles_of(span[0]))
            # A short context fills only the first ranges: the others do nothing, and the merge reads
            # only the ranges used (task 0 always runs, so an empty sequence still gets its output).
            if split == 0 or span[2] < span[3]:
                attend_range(b, task, span, qs, acc, s, md, q, pages, page_indptr, page_values, length_info,
                             part_acc, part_md, sm_scale)
        # Serial: a few thousand multiply-adds, not worth a second parallel launch (each is a barrier,
        # measured at ~6 ms when the machine's cores are oversubscribed).
        for task in range(B * HQ):
            acc = T.alloc_buffer((head_dim,), "float32")
            st = T.alloc_buffer((3,), "float32")  # max, denominator, weight
            used = T.alloc_buffer((2,), "int32")  # tiles, then ranges with keys (phase 1's split, again)
            b = task // HQ
            first = b * NS
            g = task % HQ
            used[0] = tiles_of(seq_rows(length_info, page_indptr, b))
            used[1] = ranges_used(used[0])
            st[0] = T.float32(EMPTY_MAX)
            for r in range(used[1]):
                st[0] = T.max(st[0], part_md[first + r, g, 0])
            st[1] = T.float32(0)
            for d in T.vectorized(head_dim):
                acc[d] = T.float32(0)
            for r in range(used[1]):
                st[2] = fast_exp2(part_md[first + r, g, 0] - st[0])
                st[1] = st[1] + part_md[first + r, g, 1] * st[2]
                for d in T.vectorized(head_dim):
                    acc[d] = acc[d] + part_acc[first + r, g, d] * st[2]
            # No keys (denominator 0, accumulator 0): output 0 and lse EMPTY_MAX, as TVM's kernel gives.
            st[2] = T.if_then_else(st[1] > T.float32(0), st[1], T.float32(1))
            for d in T.vectorized(head_dim):
                output[b, task % HQ, d] = T.Cast(dtype, acc[d] / st[2])
            lse[b, task % HQ] = T.if_then_else(st[1] > T.float32(0), st[0] + T.log2(st[1]), T.float32(EMPTY_MAX))

    return batch_decode_paged_kv_cpu


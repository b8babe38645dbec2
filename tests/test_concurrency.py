"""One loaded engine, many sessions, many threads: each result bit-identical to the same sessions
run one after another, the weights in memory once, and memory flat over many sessions."""

import random
import threading

import numpy as np

import qwen2c

THREADS = 8
SESSIONS_PER_THREAD = 50
OPEN_AT_ONCE = 3  # each thread keeps several sessions open and steps them in turn


def _plan(seed: int, vocab: int, context: int) -> list[tuple[list[int], int]]:
    """Per session: a prompt and how many greedy decode steps follow it."""
    rng = random.Random(seed)
    plans = []
    for _ in range(SESSIONS_PER_THREAD):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(1, 12))]
        plans.append((prompt, rng.randint(1, min(6, context - len(prompt)))))
    return plans


def _run_interleaved(engine, plans) -> list[list[np.ndarray]]:
    """Run the sessions of ``plans``, OPEN_AT_ONCE at a time, one call of each in turn: prefills
    and decodes of different sessions alternate on this thread (and, across threads, overlap)."""
    results: list[list[np.ndarray]] = [[] for _ in plans]
    pending = list(range(len(plans)))
    active: list[tuple[int, object, int]] = []  # (plan index, session, decode steps left)
    while pending or active:
        while pending and len(active) < OPEN_AT_ONCE:
            i = pending.pop(0)
            session = engine.session()
            results[i].append(session.prefill(plans[i][0]))
            active.append((i, session, plans[i][1]))
        i, session, left = active.pop(0)
        results[i].append(session.decode(int(np.argmax(results[i][-1]))))
        if left > 1:
            active.append((i, session, left - 1))
    return results


def test_threads_sharing_one_engine_match_the_sequential_run_bit_for_bit(tiny_engine):
    engine = qwen2c.load(tiny_engine)
    plans = [_plan(seed, engine.vocab_size, engine.max_context) for seed in range(THREADS)]
    # The same sessions, one after another on this thread: the reference.
    expected = [[s for i in range(len(p)) for s in _run_interleaved(engine, [p[i]])[0]] for p in plans]
    got: dict[int, list[np.ndarray]] = {}
    errors = []
    barrier = threading.Barrier(THREADS)

    def worker(t: int):
        try:
            barrier.wait()
            got[t] = [s for r in _run_interleaved(engine, plans[t]) for s in r]
        except BaseException as e:  # reported below: a thread's exception would otherwise vanish
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    steps = 0
    for t in range(THREADS):
        assert len(got[t]) == len(expected[t])
        for a, b in zip(got[t], expected[t]):
            assert np.array_equal(a, b)
            steps += 1
    assert steps == sum(len(p) + sum(n for _, n in p) for p in plans)
    # One copy of the weights: every thread's VM ran on the engine's tensors, none were uploaded again.
    assert len({id(p) for p in engine._program.params}) == len(engine._program.params)


def test_logits_are_right_under_concurrency(tiny_engine, tiny_checkpoint):
    """Not only equal to the sequential run: equal to transformers, from threads."""
    import torch
    from transformers import Qwen2ForCausalLM

    engine = qwen2c.load(tiny_engine)
    reference = Qwen2ForCausalLM.from_pretrained(tiny_checkpoint).eval()
    prompts = [[7 * t + 1, 3, 99, t] for t in range(THREADS)]
    with torch.no_grad():
        want = [reference(torch.tensor([p])).logits[0, -1].numpy() for p in prompts]
    got = [None] * THREADS

    def worker(t):
        for _ in range(10):
            got[t] = engine.session().prefill(prompts[t])

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-3)


def test_one_session_used_from_two_threads_is_serialized_not_corrupted(tiny_engine):
    """Misuse (two threads stepping one sequence): calls take turns; the sequence stays coherent."""
    engine = qwen2c.load(tiny_engine)
    session = engine.session()
    session.prefill([1, 2, 3])

    def worker():
        for _ in range(10):
            session.decode(5)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert session.length == 23
    fresh = engine.session()
    fresh.prefill([1, 2, 3])
    for _ in range(20):
        fresh.decode(5)
    assert np.array_equal(fresh.decode(5), session.decode(5))


def _rss_bytes() -> int:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_memory_stays_flat_over_many_sessions(tiny_engine):
    engine = qwen2c.load(tiny_engine)

    def run(n: int):
        def worker(t):
            for i in range(n):
                s = engine.session()
                logits = s.prefill([t, i % 500, 3])
                s.decode(int(np.argmax(logits)))

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    run(100)  # warm up: allocator pools, thread VMs, page tables
    before = _rss_bytes()
    run(500)  # 2,000 more sessions, each with its own KV cache
    grown = _rss_bytes() - before
    # A KV cache of this engine is ~70 KB: 2,000 leaked caches would be ~140 MB.
    assert grown < 16 << 20, f"RSS grew by {grown / (1 << 20):.1f} MiB over 2,000 sessions"

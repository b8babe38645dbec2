"""One benchmarked system in a process of its own: ``python -m qwen2c.bench.worker READ_FD WRITE_FD SPEC``.

Why a process per system: each keeps its own thread pool (TVM's, torch's OpenMP, ONNX Runtime's,
llama.cpp's), whose spinning threads would otherwise compete with the next system's; the peak
resident memory of the process is that system's; and a peer that crashes takes only its worker
down. The parent (``harness.py``) sends one JSON request per line and reads one JSON reply per
line on a pipe of its own, so library output on stdout/stderr (sent to a log file) never mixes in.

Requests: ``{"op": "prefill", "ids": [...]}`` -> seconds to the first greedy token;
``{"op": "decode", "ids": [...], "steps": K}`` -> the untimed prompt, then K decode steps each timed;
``{"op": "quit"}``. The first reply reports the load time and what the runner knows of itself.
"""

from __future__ import annotations

import json
import sys
import time
import traceback

WARMUP_TOKENS = 1024


def _timed_prefill(runner, ids: list[int]) -> dict:
    runner.start()
    start = time.perf_counter()
    runner.feed(ids)
    return {"s": time.perf_counter() - start}


def _timed_decode(runner, ids: list[int], steps: int) -> dict:
    runner.start()
    start = time.perf_counter()
    token = runner.feed(ids)
    prompt_s = time.perf_counter() - start
    times, tokens = [], []
    for _ in range(steps):
        start = time.perf_counter()
        token = runner.feed([token])
        times.append(time.perf_counter() - start)
        tokens.append(token)
    return {"step_s": times, "prompt_s": prompt_s, "tokens": tokens}


def serve(read, write, spec: dict) -> None:
    from .runners import current_rss_bytes, make_runner, peak_rss_bytes

    def reply(value: dict) -> None:
        write.write(json.dumps(value) + "\n")
        write.flush()

    try:
        start = time.perf_counter()
        runner = make_runner(spec)  # the load time: what a user waits for before the first request
        load_s = time.perf_counter() - start
        start = time.perf_counter()
        runner.start()
        runner.feed([1, 2, 3, 4])  # first call: lazy initialisation, thread pools
        runner.feed([5])
        first_call_s = time.perf_counter() - start
        info = runner.describe()
    except Exception as e:
        traceback.print_exc()
        reply({"error": f"{type(e).__name__}: {e}"})
        return
    reply({"load_s": load_s, "first_call_s": first_call_s, "info": info, "max_context": runner.max_context,
           "rss_bytes": current_rss_bytes()})
    warmed: set = set()
    for line in read:
        request = json.loads(line)
        op = request["op"]
        if op == "quit":
            reply({"peak_rss_bytes": peak_rss_bytes()})
            return
        try:
            key = (op, len(request["ids"]))
            # The first run of a shape pays for allocations and kernel selection (torch.compile: its
            # compilation); run it once untimed. Long prompts are left out: their first run costs
            # as much as a timed one and the rounds already repeat them.
            if key not in warmed and (getattr(runner, "shape_warmup", False) or len(request["ids"]) <= WARMUP_TOKENS):
                _timed_prefill(runner, request["ids"]) if op == "prefill" else _timed_decode(runner, request["ids"], 2)
                warmed.add(key)
            if op == "prefill":
                reply(_timed_prefill(runner, request["ids"]))
            else:
                reply(_timed_decode(runner, request["ids"], request["steps"]))
        except Exception as e:
            traceback.print_exc()
            reply({"error": f"{type(e).__name__}: {e}"})


def main(argv: list[str]) -> None:
    read_fd, write_fd, spec = int(argv[0]), int(argv[1]), json.loads(argv[2])
    with open(read_fd) as read, open(write_fd, "w") as write:
        serve(read, write, spec)


if __name__ == "__main__":
    main(sys.argv[1:])

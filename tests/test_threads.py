"""Concurrency: the GIL is released around compute, one layer serves many Python threads,
adapters can be swapped while forwards run, and results do not depend on the thread count."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import qlora
from qlora import QLoraLinear


def big_layer(out_f=384, in_f=1000, rank=8, group_size=64, seed=0):
    rng = np.random.default_rng(seed)
    layer = QLoraLinear.from_weight(rng.standard_normal((out_f, in_f)).astype(np.float32),
                                    rank=rank, group_size=group_size,
                                    bias=rng.standard_normal(out_f))
    layer.set_lora_b(rng.standard_normal((out_f, rank)))
    return layer


def run_threads(n, target):
    errors = []

    def wrap(i):
        try:
            target(i)
        except BaseException as exc:  # noqa: BLE001 - reported to the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=wrap, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
        assert not t.is_alive(), "a thread hung"
    if errors:
        raise errors[0]


def test_many_threads_share_one_layer():
    layer = big_layer()
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((b, 1000)).astype(np.float32) for b in (1, 3, 8, 1, 17, 2, 5, 4)]
    serial = [layer(x) for x in xs]
    results = {}

    def work(i):
        out = np.empty_like(serial[i])
        for k in range(25):
            y = layer(xs[i]) if k % 2 else layer.forward(xs[i], out=out)
            if not np.array_equal(y, serial[i]):
                results[i] = y
                return
        results.setdefault(i, None)

    run_threads(8, work)
    assert all(results[i] is None for i in range(8)), [i for i in results if results[i] is not None]


def test_gil_released_during_forward(restore_threads):
    # One core's worth of work in the core; meanwhile the main thread keeps running Python.
    # If the GIL were held for the whole call, the main thread would stall for about the
    # call's duration; released, it only waits for interpreter switch intervals (ms).
    qlora.set_num_threads(1)
    layer = big_layer(out_f=1024, in_f=1024)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((16, 1024)).astype(np.float32)
    t0 = time.perf_counter()
    layer(x)
    per_row = (time.perf_counter() - t0) / 16
    # Size the batch for a ~0.25 s call whatever the kernel's speed.
    x = rng.standard_normal((int(min(8192, max(16, 0.25 / per_row))), 1024)).astype(np.float32)
    t0 = time.perf_counter()
    layer(x)
    duration = time.perf_counter() - t0
    calls = 3
    done = threading.Event()

    def work():
        for _ in range(calls):
            layer(x)
        done.set()

    worker = threading.Thread(target=work)
    worker.start()
    longest, last, ticks = 0.0, time.perf_counter(), 0
    while not done.is_set():
        now = time.perf_counter()
        longest = max(longest, now - last)
        last = now
        ticks += 1
    worker.join()
    if duration < 0.05:
        pytest.skip(f"forward too fast ({duration * 1e3:.1f} ms) to see a stall")
    assert longest < duration / 2, (longest, duration, ticks)


@pytest.mark.parametrize("setter", ["set_lora_b", "set_lora_a", "set_bias"])
def test_hot_swap_while_forwarding(setter):
    layer = big_layer(out_f=256, in_f=512, rank=4)
    rng = np.random.default_rng(3)
    shape = {"set_lora_b": (256, 4), "set_lora_a": (4, 512), "set_bias": (256,)}[setter]
    v1, v2 = rng.standard_normal(shape), rng.standard_normal(shape)
    x = rng.standard_normal((6, 512)).astype(np.float32)
    getattr(layer, setter)(v1)
    y1 = layer(x)
    getattr(layer, setter)(v2)
    y2 = layer(x)
    assert not np.array_equal(y1, y2)
    stop = threading.Event()
    seen = {"old": 0, "new": 0, "mixed": 0}
    lock = threading.Lock()

    def reader(_):
        while not stop.is_set():
            y = layer(x)
            key = "old" if np.array_equal(y, y1) else "new" if np.array_equal(y, y2) else "mixed"
            with lock:
                seen[key] += 1

    def writer(_):
        # Swap until the readers have done enough forwards (or a time cap is hit).
        k, deadline = 0, time.monotonic() + 30
        while seen["old"] + seen["new"] + seen["mixed"] < 300 and time.monotonic() < deadline:
            getattr(layer, setter)(v1 if k % 2 == 0 else v2)
            k += 1
        stop.set()

    run_threads(4, lambda i: writer(i) if i == 0 else reader(i))
    assert seen["mixed"] == 0, seen
    assert seen["old"] + seen["new"] >= 300, seen


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_results_identical_across_thread_counts(restore_threads, threads):
    rng = np.random.default_rng(4)
    w = rng.standard_normal((333, 777)).astype(np.float32)
    x = rng.standard_normal((300, 777)).astype(np.float32)  # > one 256-row batch chunk
    b = rng.standard_normal((333, 5)).astype(np.float32)

    def run():
        layer = QLoraLinear.from_weight(w, rank=5, group_size=100, bias=np.ones(333))
        layer.set_lora_b(b)
        return (layer._state.weight.codes.copy(), layer.scale, layer.dequantize_weight(), layer(x),
                layer(x[:7]), layer(x[0]))

    qlora.set_num_threads(1)
    base = run()
    qlora.set_num_threads(threads)
    assert qlora.get_num_threads() == threads
    for a, c in zip(base, run()):
        np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(c).view(np.uint8))


def _forward_in_child(args):
    layer, x = args
    qlora.set_num_threads(2)
    return layer(x)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_pool_works_after_fork(restore_threads):
    # The parent's pool workers do not survive fork(); the child must rebuild its pool rather
    # than wait forever on threads that do not exist.
    import multiprocessing
    import warnings

    qlora.set_num_threads(2)
    layer = big_layer(out_f=512, in_f=1024)
    x = np.random.default_rng(5).standard_normal((64, 1024)).astype(np.float32)
    y = layer(x)  # starts the parent's pool
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(1) as pool:
            result = pool.apply_async(_forward_in_child, ((layer, x),))
            y_child = result.get(timeout=60)
    np.testing.assert_array_equal(y_child, y)

"""Stress: 8 threads x 500 mixed-batch forwards while another thread replaces, adds and removes
adapters. Every version of an adapter has its own B (version v uses (v + 1) * B_k), so each
row's output says which version it saw; the versions seen by one forward must be those of one
state the mutator produced (one consistent snapshot), and each row must equal, within float32
rounding, the answer for that version. Bounded in time; RSS must stay flat."""

from __future__ import annotations

import os
import threading
import time

import numpy as np

from qlora import QLoraLinear

OUT, IN, K, BATCH = 48, 96, 4, 16
THREADS, FORWARDS = 8, 500


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


MAX_VERSIONS = 5000


def test_concurrent_add_replace_remove_with_forwards():
    rng = np.random.default_rng(0)
    layer = QLoraLinear.from_weight(rng.standard_normal((OUT, IN)) * 0.01, rank=2,
                                    group_size=32, bias=rng.standard_normal(OUT) * 0.01)
    a_k = [rng.standard_normal((4 + 4 * k, IN)).astype(np.float32) for k in range(K)]
    b_k = [rng.standard_normal((OUT, 4 + 4 * k)).astype(np.float32) for k in range(K)]
    for k in range(K):
        layer.add_adapter(f"s{k}", a_k[k], b_k[k], scaling=1.0)  # version -1: factor 1
    slots = {f"s{k}": k + 1 for k in range(K)}
    x = rng.standard_normal((BATCH, IN)).astype(np.float32)
    deq = layer.dequantize_weight().astype(np.float64)
    x64 = x.astype(np.float64)
    base = x64 @ deq.T + layer.bias.astype(np.float64)
    terms = [(x64 @ a_k[k].T.astype(np.float64)) @ b_k[k].T.astype(np.float64)
             for k in range(K)]
    # Rows: adapters by name, by slot and base-only rows, fixed per thread.
    plans = []
    for t in range(THREADS):
        r = np.random.default_rng(100 + t)
        ks = r.integers(-1, K, BATCH)
        entries = [None if k < 0 else (f"s{k}" if r.random() < 0.5 else int(k + 1))
                   for k in ks]
        plans.append((ks, entries if t % 2 else np.array([-1 if k < 0 else k + 1
                                                          for k in ks])))

    stop = threading.Event()
    ops = [0]
    errors: list[str] = []
    seen: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(THREADS)]

    def mutate():
        g = 0
        # Versions are told apart by their factor g + 2, recovered from float32 outputs: keep
        # it small enough (<= MAX_VERSIONS + 2) that float32 rounding of the output (relative
        # ~1e-7 of the factor) stays far below the 0.5 that separates two versions.
        while not stop.is_set() and g < MAX_VERSIONS:
            k = g % K
            layer.add_adapter(f"s{k}", a_k[k], b_k[k] * np.float32(g + 2), scaling=1.0,
                              replace=True)  # version g: factor g + 2
            layer.add_adapter("tmp", np.ones((1, IN)), np.ones((OUT, 1)), scaling=1.0)
            layer.remove_adapter("tmp")
            g += 1
            ops[0] = g

    def forwards(t):
        ks, entries = plans[t]
        try:
            for _ in range(FORWARDS):
                seen[t].append((ks, layer.forward(x, adapters=entries)))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(repr(exc))

    rss0 = None
    mutator = threading.Thread(target=mutate)
    workers = [threading.Thread(target=forwards, args=(t,)) for t in range(THREADS)]
    start = time.perf_counter()
    mutator.start()
    rss0 = _rss_bytes()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stop.set()
    mutator.join()
    elapsed = time.perf_counter() - start
    assert not errors, errors[:3]
    assert elapsed < 60, elapsed
    assert ops[0] > 10, "the mutator barely ran"
    assert _rss_bytes() - rss0 < 64 << 20  # results kept: 8 * 500 * 16 * 48 * 4 = 12 MB

    factors_seen = set()
    for t in range(THREADS):
        for ks, y in seen[t]:
            factor = {}
            for i, k in enumerate(ks):
                if k < 0:
                    np.testing.assert_allclose(y[i], base[i], rtol=1e-4, atol=1e-4)
                    continue
                d = y[i].astype(np.float64) - base[i]
                f = float(d @ terms[k][i] / (terms[k][i] @ terms[k][i]))
                assert abs(f - round(f)) < 1e-3 + 1e-6 * abs(f), f
                factor.setdefault(int(k), round(f))
                assert factor[int(k)] == round(f), "two rows of one adapter saw two versions"
                want = base[i] + round(f) * terms[k][i]
                tol = 1e-5 * (np.abs(base[i]) + round(f) * np.abs(terms[k][i]).max() * 8) + 1e-5
                assert np.all(np.abs(y[i] - want) <= tol)
            # One snapshot: version g = factor - 2 of adapter g % K; the newest one seen fixes
            # the state, and every other adapter must show its latest version before it.
            versions = {k: f - 2 for k, f in factor.items()}
            if versions and max(versions.values()) >= 0:
                newest = max(versions.values())
                for k, v in versions.items():
                    latest = newest - ((newest - k) % K)
                    assert v == (latest if latest >= 0 else -1), (versions, k)
            factors_seen.update(factor.values())
    assert len(factors_seen) > 2, "forwards never overlapped a replacement"
    assert slots == {n: layer.adapters[n].slot for n in slots}  # replaced names keep slots
    assert layer.adapters["s0"].slot == 1 and "tmp" not in layer.adapters

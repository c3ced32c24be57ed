"""Peak memory of a forward: no O(out_features * in_features) allocation.

A forward may allocate its output and a small scratch per thread (the x @ A^T vector, a decoded
tile of W per thread). It must never materialise the dequantized weight (128 MiB in fp32 for
the layer below) or even an unpacked byte-per-code copy (32 MiB). The check runs in a fresh
subprocess so other tests' allocations cannot hide or inflate the peak, and it measures the
peak RSS (VmHWM) of the first forward after construction, so one-time costs (starting the
thread pool, thread-local buffers, a lazy repack) are counted too.

Linux only: the peak is reset with ``echo 5 > /proc/self/clear_refs`` after the layer is built
(ru_maxrss cannot be reset, and the fp32 weight given to from_weight would set it). The probe
checks itself by allocating 32 MiB in the same way and requiring that it is seen.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

OUT_FEATURES, IN_FEATURES, BATCH, RANK = 8192, 4096, 64, 16
MIB = 1 << 20
# Allowance beyond the output: a fixed 6 MiB (the x @ A^T vector, pybind11/NumPy temporaries,
# malloc arena growth, thread stacks touched when the pool starts) plus 1 MiB per thread for a
# kernel's decoded tile. At the <= 4 threads used here that is at most 10 MiB, below the
# smallest O(out * in) buffer worth catching (one byte per weight: 32 MiB).
FIXED_ALLOWANCE = 6 * MIB
PER_THREAD_ALLOWANCE = 1 * MIB
MAX_THREADS = 4

_CHILD = textwrap.dedent(
    """
    import gc, json, sys
    import numpy as np
    import qlora

    OUT, IN, BATCH, RANK, MAX_THREADS = {out}, {inp}, {batch}, {rank}, {max_threads}

    def status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(key + " not in /proc/self/status")

    def reset_peak():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    threads = min(MAX_THREADS, qlora.get_num_threads())
    qlora.set_num_threads(threads)
    rng = np.random.default_rng(0)
    w = rng.normal(0.0, 0.02, size=(OUT, IN)).astype(np.float32)
    layer = qlora.QLoraLinear.from_weight(w, rank=RANK, group_size=64)
    layer.set_lora_b(rng.normal(0.0, 0.01, size=(OUT, RANK)).astype(np.float32))
    del w
    x = rng.standard_normal((BATCH, IN)).astype(np.float32)
    gc.collect()

    reset_peak()
    base = status("VmRSS")
    y = layer.forward(x)
    forward_growth = status("VmHWM") - base

    # Self-check of the probe: a touched 32 MiB buffer must show up as ~32 MiB of growth.
    del y
    gc.collect()
    reset_peak()
    base = status("VmRSS")
    probe = np.ones(32 << 18, dtype=np.float32)
    probe_growth = status("VmHWM") - base
    del probe

    json.dump({{"threads": threads, "isa": qlora.active_isa(),
               "forward_growth": forward_growth, "probe_growth": probe_growth,
               "output_bytes": BATCH * OUT * 4}}, sys.stdout)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc/self/clear_refs")
def test_forward_peak_rss_is_output_plus_small_scratch():
    code = _CHILD.format(out=OUT_FEATURES, inp=IN_FEATURES, batch=BATCH, rank=RANK,
                         max_threads=MAX_THREADS)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0 and "clear_refs" in proc.stderr:
        pytest.skip(f"cannot reset the peak RSS here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    if r["probe_growth"] < 30 * MIB:
        pytest.skip(f"peak-RSS probe does not see a 32 MiB allocation here "
                    f"(saw {r['probe_growth'] / MIB:.1f} MiB)")
    allowed = r["output_bytes"] + FIXED_ALLOWANCE + PER_THREAD_ALLOWANCE * r["threads"]
    assert r["forward_growth"] <= allowed, (
        f"forward of a {OUT_FEATURES}x{IN_FEATURES} layer at batch {BATCH} "
        f"({r['isa']}, {r['threads']} threads) grew peak RSS by "
        f"{r['forward_growth'] / MIB:.1f} MiB; allowed {allowed / MIB:.1f} MiB "
        f"(output {r['output_bytes'] / MIB:.1f} MiB + {FIXED_ALLOWANCE / MIB:.0f} MiB + "
        f"{PER_THREAD_ALLOWANCE / MIB:.0f} MiB per thread): an O(out * in) buffer?"
    )

"""The core's thread pool when the OS refuses to start its worker threads.

A subprocess asks for 8 threads (``QLORA_NUM_THREADS=8``) under a real resource limit that makes
``pthread_create`` fail, so ``std::thread`` throws inside the pool's start-up. The pool must join
the workers that did start, run every job serially with the same results, and say why in
``_core.thread_pool_info()``; before the fix the process died in ``std::terminate``.

Two limits, both real kernel refusals (``RLIMIT_NPROC`` is not used: root, which CI runs as, is
exempt from it through CAP_SYS_RESOURCE/CAP_SYS_ADMIN, and switching to ``nobody`` needs an
interpreter that user can read):

- ``stack``: ``RLIMIT_STACK`` of 256 TiB set before ``exec``. glibc takes the default thread stack
  size from that limit at start-up, so every thread stack is a 256 TiB mapping, larger than
  x86-64's or aarch64's 128 TiB user address space, which the kernel refuses whatever its
  overcommit setting (EAGAIN): the very first worker fails.
- ``address_space``: ``RLIMIT_AS`` set after the imports to the current size plus room for three
  thread stacks and a half, so three workers start and the fourth fails: the mid-way failure,
  whose started threads must be joined. Skipped under AddressSanitizer, whose shadow memory
  needs terabytes of address space, and with an unlimited stack limit (glibc then picks its own
  thread stack size, so the room cannot be computed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import qlora

STACK_LIMIT = 1 << 48

CHILD = r"""
import json, resource, sys
import numpy as np
import qlora
from qlora import _core

mode, out_path = sys.argv[1], sys.argv[2]
if mode == "address_space":
    def vm_size():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    stack = resource.getrlimit(resource.RLIMIT_STACK)[0]
    resource.setrlimit(resource.RLIMIT_AS, (vm_size() + 3 * stack + stack // 2, resource.RLIM_INFINITY))

rng = np.random.default_rng(7)
w = rng.standard_normal((96, 160)).astype(np.float32)
x = rng.standard_normal((9, 160)).astype(np.float32)
layer = qlora.QLoraLinear.from_weight(w, rank=4, alpha=8.0, group_size=64,
                                      bias=rng.standard_normal(96).astype(np.float32))
layer.set_lora_b(rng.standard_normal((96, 4)).astype(np.float32) * 0.1)
ys = [layer(x), layer(x[0]), layer(x)]
info = _core.thread_pool_info()
np.savez(out_path, y=ys[0], y1=ys[1], again=ys[2], deq=layer.dequantize_weight(),
         a=layer.lora_a, b=layer.lora_b, bias=layer.bias, x=x, w=w)
print(json.dumps({"info": info, "num_threads": qlora.get_num_threads(), "scaling": layer.scaling}))
"""


def asan_loaded() -> bool:
    with open("/proc/self/maps") as f:
        return "libasan" in f.read()


def run_child(mode, tmp_path):
    env = dict(os.environ)
    env.pop("QLORA_FORCE_ISA", None)
    env["QLORA_NUM_THREADS"] = "8"
    # NumPy's BLAS starts its own threads at import; under these limits it could not.
    env["OPENBLAS_NUM_THREADS"] = env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = "1"

    def limit():
        if mode == "stack":
            import resource

            resource.setrlimit(resource.RLIMIT_STACK, (STACK_LIMIT, STACK_LIMIT))

    out = tmp_path / "out.npz"
    r = subprocess.run([sys.executable, "-c", CHILD, mode, str(out)], capture_output=True,
                       text=True, env=env, timeout=300, preexec_fn=limit)
    assert r.returncode == 0, f"child exited with {r.returncode}:\n{r.stdout}\n{r.stderr}"
    return json.loads(r.stdout.strip().splitlines()[-1]), np.load(out)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux resource limits")
@pytest.mark.parametrize("mode", ["stack", "address_space"])
def test_pool_that_cannot_start_runs_serially_with_correct_results(mode, tmp_path, restore_threads):
    if mode == "address_space":
        import resource

        if asan_loaded():
            pytest.skip("AddressSanitizer's shadow memory does not fit under RLIMIT_AS")
        if resource.getrlimit(resource.RLIMIT_STACK)[0] == resource.RLIM_INFINITY:
            pytest.skip("unlimited RLIMIT_STACK: glibc picks the thread stack size itself")
    report, d = run_child(mode, tmp_path)
    info = report["info"]
    assert report["num_threads"] == 8
    assert info["requested"] == 8
    assert info["threads"] == 1, info
    reason = info["serial_fallback_reason"]
    assert isinstance(reason, str) and "could not start worker thread" in reason, info
    assert "running serially" in reason
    if mode == "stack":
        assert "worker thread 1 of 7" in reason
    else:
        # Some workers started before the refusal: they were joined, not left to std::terminate.
        assert "worker thread 1 of 7" not in reason

    # Against a float64 reference of the same quantized weight and adapter.
    x, deq = d["x"].astype(np.float64), d["deq"].astype(np.float64)
    a, b, bias = d["a"].astype(np.float64), d["b"].astype(np.float64), d["bias"].astype(np.float64)
    scaling = report["scaling"]
    ref = x @ deq.T + scaling * (x @ a.T) @ b.T + bias
    mag = np.abs(x) @ np.abs(deq).T + scaling * (np.abs(x) @ np.abs(a).T) @ np.abs(b).T + np.abs(bias)
    bound = (x.shape[1] + a.shape[0] + 4) * 2.0**-24 * mag * 1.01
    assert np.all(np.abs(d["y"] - ref) <= bound)
    assert np.all(np.abs(d["y1"] - ref[0]) <= bound[0])
    assert np.array_equal(d["again"], d["y"])

    # Serial results are the pool's results bit for bit: this process runs the same layer on
    # its threads.
    qlora.set_num_threads(4)
    here = qlora.QLoraLinear.from_weight(d["w"], rank=4, alpha=8.0, group_size=64,
                                         bias=d["bias"])
    here.set_lora_a(d["a"])
    here.set_lora_b(d["b"])
    assert np.array_equal(here.dequantize_weight(), d["deq"])
    assert np.array_equal(here(d["x"]), d["y"])

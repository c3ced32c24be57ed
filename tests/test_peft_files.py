"""PEFT adapters from hand-written folders (config JSON + tensors written by qlora's own
safetensors writer): loading, scaling with rank/alpha patterns and rsLoRA, the config
allow-list, set_lora / load_adapter / merged_weight against float64 references. No torch or
PEFT needed; test_peft.py checks the same semantics against PEFT itself when installed."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

import qlora
from qlora import LoraWeights, QLoraLinear
from qlora.formats.safetensors import write_safetensors

IN, OUT = 32, 12


def write_peft(folder, config=None, modules=None, dtype=np.float32, extra=()):
    """A PEFT adapter folder: ``modules`` maps a module path to (rank, in, out)."""
    folder.mkdir(exist_ok=True)
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4}
    cfg.update(config or {})
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(3)
    tensors, arrays = [], {}
    for name, (r, n_in, n_out) in (modules or {"fc": (2, IN, OUT)}).items():
        a = rng.standard_normal((r, n_in)).astype(dtype)
        b = rng.standard_normal((n_out, r)).astype(dtype)
        arrays[name] = (a, b)
        tensors += [(f"base_model.model.{name}.lora_A.weight", a, None),
                    (f"base_model.model.{name}.lora_B.weight", b, None)]
    tensors += list(extra)
    write_safetensors(folder / "adapter_model.safetensors", tensors)
    return arrays


def _layer(seed=0):
    rng = np.random.default_rng(seed)
    layer = QLoraLinear.from_weight(rng.standard_normal((OUT, IN)), rank=4, alpha=8.0,
                                    group_size=16, bias=rng.standard_normal(OUT))
    layer.set_lora_b(rng.standard_normal((OUT, 4)))
    return layer


def reference(layer, x, a, b, scaling):
    """float64 forward of the layer's dequantized weight with adapter (a, b, scaling)."""
    x64 = np.asarray(x, np.float64)
    return (x64 @ layer.dequantize_weight().astype(np.float64).T + layer.bias.astype(np.float64)
            + scaling * (x64 @ np.asarray(a, np.float64).T) @ np.asarray(b, np.float64).T)


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


# ---------------------------------------------------------------------- loading and scaling
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_load_and_apply_adapter(tmp_path, dtype):
    arrays = write_peft(tmp_path / "a", {"r": 2, "lora_alpha": 3}, dtype=dtype)
    adapters = qlora.load_peft_adapter(tmp_path / "a")
    assert list(adapters) == ["fc"]
    lw = adapters["fc"]
    assert isinstance(lw, LoraWeights) and lw.name == "fc" and lw.rank == 2
    assert lw.scaling == 1.5
    assert lw.a.dtype == np.float32 and not lw.a.flags.writeable and not lw.b.flags.writeable
    # Widened exactly: fp16 and float32 values are float32 values.
    a, b = arrays["fc"]
    np.testing.assert_array_equal(lw.a, a.astype(np.float32))
    np.testing.assert_array_equal(lw.b, b.astype(np.float32))
    assert "rank=2" in repr(lw) and "'fc'" in repr(lw)

    layer = _layer()
    layer.load_adapter(lw)
    assert layer.rank == 2 and layer.scaling == 1.5 and layer.alpha == 3.0
    x = np.random.default_rng(5).standard_normal((6, IN)).astype(np.float32)
    assert rel(layer(x), reference(layer, x, lw.a, lw.b, 1.5)) < 1e-5


def test_bf16_adapter_is_widened_exactly(tmp_path):
    rng = np.random.default_rng(4)
    a32 = rng.standard_normal((2, IN)).astype(np.float32)
    b32 = rng.standard_normal((OUT, 2)).astype(np.float32)
    # bf16 = the top 16 bits of a float32 (truncated here: any bf16 pattern is a valid input).
    a16 = (a32.view(np.uint32) >> 16).astype(np.uint16)
    b16 = (b32.view(np.uint32) >> 16).astype(np.uint16)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    write_safetensors(tmp_path / "a" / "adapter_model.safetensors", [
        ("base_model.model.fc.lora_A.weight", a16, "BF16"),
        ("base_model.model.fc.lora_B.weight", b16, "BF16")])
    lw = qlora.load_peft_adapter(tmp_path / "a")["fc"]
    want_a = (a16.astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(lw.a, want_a)
    assert np.abs(lw.a - a32).max() <= np.abs(a32).max() * 2.0 ** -7  # bf16 keeps 8 bits
    np.testing.assert_array_equal(lw.b, (b16.astype(np.uint32) << 16).view(np.float32))
    assert lw.scaling == 1.0


@pytest.mark.parametrize("config, want", [
    ({"r": 2, "lora_alpha": 4}, {"model.l0.q": 2.0, "model.l0.k": 2.0, "model.l1.q": 2.0}),
    ({"r": 2, "lora_alpha": 4, "use_rslora": True},
     {"model.l0.q": 4 / math.sqrt(2), "model.l0.k": 4 / math.sqrt(2),
      "model.l1.q": 4 / math.sqrt(2)}),
    # Pattern keys match a whole trailing path component: "q" matches "model.l0.q" but not "k".
    ({"r": 2, "lora_alpha": 4, "alpha_pattern": {"q": 12}},
     {"model.l0.q": 6.0, "model.l0.k": 2.0, "model.l1.q": 6.0}),
    # The first matching key wins, in file order; "l1\\.q" only matches model.l1.q.
    ({"r": 2, "lora_alpha": 4, "alpha_pattern": {"l1\\.q": 2, "q": 8}},
     {"model.l0.q": 4.0, "model.l0.k": 2.0, "model.l1.q": 1.0}),
    ({"r": 2, "lora_alpha": 4, "rank_pattern": {"k": 4}, "use_rslora": True},
     {"model.l0.q": 4 / math.sqrt(2), "model.l0.k": 2.0, "model.l1.q": 4 / math.sqrt(2)}),
])
def test_rank_alpha_patterns_and_rslora(tmp_path, config, want):
    ranks = {"model.l0.q": 2, "model.l0.k": 4 if "rank_pattern" in config else 2,
             "model.l1.q": 2}
    write_peft(tmp_path / "a", config, {m: (r, IN, OUT) for m, r in ranks.items()})
    adapters = qlora.load_peft_adapter(tmp_path / "a")
    assert sorted(adapters) == sorted(want)
    for module, scaling in want.items():
        assert adapters[module].rank == ranks[module]
        assert adapters[module].scaling == pytest.approx(scaling, rel=1e-15)


def test_pattern_key_does_not_match_inside_a_name(tmp_path):
    # "q" must not match "model.l0.qq" (PEFT anchors at a component boundary).
    write_peft(tmp_path / "a", {"alpha_pattern": {"q": 12}},
               {"model.l0.qq": (2, IN, OUT)})
    assert qlora.load_peft_adapter(tmp_path / "a")["model.l0.qq"].scaling == 2.0


# ---------------------------------------------------------------------- the config allow-list
@pytest.mark.parametrize("key, value", [
    ("task_type", "CAUSAL_LM"), ("target_modules", ["q_proj", "v_proj"]),
    ("target_modules", "all-linear"), ("exclude_modules", ["lm_head"]),
    ("base_model_name_or_path", "meta-llama/Llama-3.2-1B"), ("revision", "main"),
    ("inference_mode", True), ("lora_dropout", 0.1), ("layers_to_transform", [0, 1]),
    ("layers_pattern", "layers"), ("peft_version", "0.21.2"), ("auto_mapping", {"x": "y"}),
    ("runtime_config", {"ephemeral_gpu_offload": True}), ("ensure_weight_tying", True),
    ("megatron_core", "megatron.core"), ("qalora_group_size", 32),
    ("eva_config", {"rho": 2.0}), ("init_lora_weights", False),
    ("init_lora_weights", "gaussian"), ("use_rslora", False), ("bias", "none"),
    ("loftq_config", {}), ("use_dora", False), ("modules_to_save", None),
    ("layer_replication", None), ("fan_in_fan_out", False), ("lora_bias", False),
])
def test_harmless_options_are_accepted(tmp_path, key, value):
    write_peft(tmp_path / "a", {key: value})
    assert qlora.load_peft_adapter(tmp_path / "a")["fc"].scaling == 2.0


@pytest.mark.parametrize("value", [None, False, "", [], {}])
def test_unknown_option_at_an_empty_value_is_accepted(tmp_path, value):
    write_peft(tmp_path / "a", {"use_future_trick": value})
    assert qlora.load_peft_adapter(tmp_path / "a")["fc"].scaling == 2.0


@pytest.mark.parametrize("value", [True, 1, 0.5, "magnitude", ["fc"], {"a": 1}])
def test_unknown_option_with_a_value_is_refused(tmp_path, value):
    write_peft(tmp_path / "a", {"use_future_trick": value})
    with pytest.raises(ValueError, match="adapter_config.json: use_future_trick: unknown "
                       "option") as info:
        qlora.load_peft_adapter(tmp_path / "a")
    assert repr(value) in str(info.value)


@pytest.mark.parametrize("key, value, why", [
    ("use_dora", True, "DoRA"),
    ("fan_in_fan_out", True, "transposed"),
    ("lora_bias", True, "bias to lora_B"),
    ("bias", "all", "base-layer biases"),
    ("bias", "lora_only", "base-layer biases"),
    ("modules_to_save", ["classifier"], "modules_to_save"),
    ("layer_replication", [[0, 4], [2, 5]], "duplicates layers"),
    ("use_qalora", True, "QA-LoRA"),
    ("target_parameters", ["experts.weight"], "nn.Parameters"),
    ("trainable_token_indices", [1, 2], "tokens"),
    ("megatron_config", {"tensor_model_parallel_size": 2}, "Megatron"),
    ("alora_invocation_tokens", [5, 6], "token sequence"),
    ("use_bdlora", {"blocks": 2}, "block-diagonal"),
    ("loftq_config", {"loftq_bits": 4}, "rewrites the base weight"),
    ("init_lora_weights", "pissa", "rewrites the base weight"),
    ("init_lora_weights", "pissa_niter_4", "rewrites the base weight"),
    ("init_lora_weights", "olora", "rewrites the base weight"),
    ("init_lora_weights", "loftq", "rewrites the base weight"),
    ("init_lora_weights", "corda", "rewrites the base weight"),
    ("init_lora_weights", "bogus", "must be one of"),
    ("use_rslora", "yes", "true or false"),
    ("peft_type", "LOHA", "only 'LORA'"),
])
def test_options_that_change_the_math_are_refused(tmp_path, key, value, why):
    write_peft(tmp_path / "a", {key: value})
    with pytest.raises(ValueError, match=f"adapter_config.json: {key}: .*{why}"):
        qlora.load_peft_adapter(tmp_path / "a")


@pytest.mark.parametrize("config, field", [
    ({"r": 0}, "r"), ({"r": "8"}, "r"), ({"r": True}, "r"),
    ({"lora_alpha": "16"}, "lora_alpha"), ({"lora_alpha": float("nan")}, "lora_alpha"),
    ({"lora_alpha": -4}, "alpha_pattern"),
    ({"rank_pattern": [1]}, "rank_pattern"), ({"alpha_pattern": "x"}, "alpha_pattern"),
    ({"rank_pattern": {"(": 5}}, "rank_pattern"),
    ({"alpha_pattern": {"fc": 0}}, "alpha_pattern"),
])
def test_bad_config_values(tmp_path, config, field):
    write_peft(tmp_path / "a", config)
    with pytest.raises(ValueError, match=f"adapter_config.json: {field}"):
        qlora.load_peft_adapter(tmp_path / "a")


@pytest.mark.parametrize("key", ["a{4294967296}", "(", "[z-a]"])
def test_pattern_keys_that_are_not_regular_expressions(tmp_path, key):
    write_peft(tmp_path / "a", {"rank_pattern": {key: 2}})
    with pytest.raises(ValueError, match="rank_pattern: key .* is not a valid regular expression"):
        qlora.load_peft_adapter(tmp_path / "a")


def test_zero_rank_adapter_is_refused(tmp_path):
    write_peft(tmp_path / "a", {"rank_pattern": {"fc": 0}}, {"fc": (0, IN, OUT)})
    with pytest.raises(ValueError, match=r"lora_A.weight' shape: must have at least one row"):
        qlora.load_peft_adapter(tmp_path / "a")


@pytest.mark.parametrize("which", ["adapter_config.json", "adapter_model.safetensors"])
def test_special_files_in_an_adapter_folder(tmp_path, which):
    # An adapter unpacked from an untrusted archive may hold a FIFO (open() would block
    # forever) or a symlink to a device (read without end): refused before opening.
    write_peft(tmp_path / "a")
    os.unlink(tmp_path / "a" / which)
    os.mkfifo(tmp_path / "a" / which)
    with pytest.raises(ValueError, match=f"{which}: not a regular file"):
        qlora.load_peft_adapter(tmp_path / "a")
    os.unlink(tmp_path / "a" / which)
    os.symlink("/dev/zero", tmp_path / "a" / which)
    with pytest.raises(ValueError, match=f"{which}: not a regular file"):
        qlora.load_peft_adapter(tmp_path / "a")


def test_rank_pattern_must_match_the_tensors(tmp_path):
    write_peft(tmp_path / "a", {"rank_pattern": {"fc": 5}})
    with pytest.raises(ValueError, match="has rank 2 but the config gives module 'fc' r = 5"):
        qlora.load_peft_adapter(tmp_path / "a")


# ---------------------------------------------------------------------- bad folders and files
def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        qlora.load_peft_adapter(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        qlora.load_peft_adapter(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError):
        qlora.load_peft_adapter(tmp_path / "empty")  # no adapter_config.json
    write_peft(tmp_path / "a")
    os.remove(tmp_path / "a" / "adapter_model.safetensors")
    with pytest.raises(OSError):
        qlora.load_peft_adapter(tmp_path / "a")


@pytest.mark.parametrize("text, msg", [
    ("{", "not valid UTF-8 JSON"), ("[1, 2]", "JSON object"),
    ('{"x": ' + "[" * 100000 + "]" * 100000 + "}", "not valid UTF-8 JSON"),  # recursion
    (b"\xff{}", "not valid UTF-8 JSON"),
    (" " * (1 << 20) + "{}", "larger than 1048576 bytes"),
])
def test_bad_config_json(tmp_path, text, msg):
    write_peft(tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    with pytest.raises(ValueError, match=msg):
        qlora.load_peft_adapter(tmp_path / "a")


@pytest.mark.parametrize("extra, msg", [
    ([("base_model.model.emb.lora_embedding_A", np.zeros((2, 4), np.float32), None)],
     "embeddings"),
    ([("base_model.model.fc.lora_magnitude_vector", np.zeros(12, np.float32), None)], "DoRA"),
    ([("base_model.model.fc.other", np.zeros(3, np.float32), None)], "not a lora_A/lora_B"),
])
def test_foreign_tensors_are_refused(tmp_path, extra, msg):
    write_peft(tmp_path / "a", extra=extra)
    with pytest.raises(ValueError, match=msg):
        qlora.load_peft_adapter(tmp_path / "a")


def test_tensor_problems(tmp_path):
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    path = folder / "adapter_model.safetensors"
    a = np.ones((2, IN), np.float32)
    b = np.ones((OUT, 2), np.float32)
    cases = [
        ([("base_model.model.fc.lora_A.weight", a, None)], "has no lora_B"),
        ([("base_model.model.fc.lora_B.weight", b, None)], "has no lora_A"),
        ([("base_model.model.fc.lora_A.weight", a, None),
          ("base_model.model.fc.lora_B.weight", np.ones((OUT, 3), np.float32), None)],
         r"must be \(out_features, 2\)"),
        ([("base_model.model.fc.lora_A.weight", np.ones(IN, np.float32), None),
          ("base_model.model.fc.lora_B.weight", b, None)], "must be 2-D"),
        ([("base_model.model.fc.lora_A.weight", a.astype(np.int32), None),
          ("base_model.model.fc.lora_B.weight", b, None)], "must be a float type"),
        ([("base_model.model.fc.lora_A.weight", np.full((2, IN), np.nan, np.float32), None),
          ("base_model.model.fc.lora_B.weight", b, None)], "NaN or Inf"),
        ([], "holds no LoRA weights"),
    ]
    for tensors, msg in cases:
        write_safetensors(path, tensors)
        with pytest.raises(ValueError, match=msg):
            qlora.load_peft_adapter(folder)


def test_keys_without_the_peft_prefix(tmp_path):
    folder = tmp_path / "a"
    write_peft(folder)
    write_safetensors(folder / "adapter_model.safetensors", [
        ("fc.lora_A.weight", np.ones((2, IN), np.float32), None),
        ("fc.lora_B.weight", np.ones((OUT, 2), np.float32), None)])
    assert list(qlora.load_peft_adapter(folder)) == ["fc"]


# ---------------------------------------------------------------------- set_lora and friends
def test_set_lora_changes_rank_atomically():
    rng = np.random.default_rng(0)
    layer = QLoraLinear.from_weight(rng.standard_normal((32, 48)), rank=8)
    a = rng.standard_normal((3, 48))
    b = rng.standard_normal((32, 3))
    layer.set_lora(a, b, scaling=0.5)
    assert layer.rank == 3 and layer.scaling == 0.5 and layer.alpha == 1.5
    assert layer.trainable_params() == 3 * (48 + 32)
    np.testing.assert_array_equal(layer.lora_a, a.astype(np.float32))
    np.testing.assert_array_equal(layer.lora_b, b.astype(np.float32))
    x = rng.standard_normal((4, 48)).astype(np.float32)
    want = (x.astype(np.float64) @ layer.dequantize_weight().T.astype(np.float64)
            + 0.5 * (x @ a.astype(np.float32).T.astype(np.float64))
            @ b.astype(np.float32).T.astype(np.float64))
    assert rel(layer(x), want) < 1e-5

    before = (layer.lora_a, layer.lora_b, layer.scaling, layer(x))
    bad = [
        (rng.standard_normal((3, 47)), b, 0.5, ValueError, r"a must have shape \(3, 48\)"),
        (a, rng.standard_normal((32, 4)), 0.5, ValueError, r"b must have shape \(32, 3\)"),
        (np.zeros((0, 48)), np.zeros((32, 0)), 0.5, ValueError, "at least one row"),
        (a, b, float("nan"), ValueError, "scaling must be a finite number > 0, got nan"),
        (a, b, 0.0, ValueError, "scaling must be a finite number > 0, got 0.0"),
        (a, b, -1.0, ValueError, "scaling must be a finite number > 0, got -1.0"),
        (a, b, "1", TypeError, "scaling must be a real number, got str"),
        (a, b, True, TypeError, "scaling must be a real number, got bool"),
        (np.full((3, 48), np.inf), b, 0.5, ValueError, "a must be finite"),
        (a, np.full((32, 3), np.nan), 0.5, ValueError, "b must be finite"),
        (a[0], b, 0.5, ValueError, "a must be 2-D, got 1-D"),
        (a.astype(complex), b, 0.5, TypeError, "a must have a real numeric dtype"),
        (a, b.astype(bool), 0.5, TypeError, "b must have a real numeric dtype"),
    ]
    for a_, b_, s_, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            layer.set_lora(a_, b_, scaling=s_)
        after = (layer.lora_a, layer.lora_b, layer.scaling, layer(x))
        for u, v in zip(before, after):
            np.testing.assert_array_equal(u, v)


def test_set_lora_copies_the_callers_arrays():
    rng = np.random.default_rng(1)
    layer = QLoraLinear.from_weight(rng.standard_normal((8, 16)), rank=2)
    a = rng.standard_normal((2, 16)).astype(np.float32)
    b = rng.standard_normal((8, 2)).astype(np.float32)
    layer.set_lora(a, b, scaling=1.0)
    x = np.ones(16, np.float32)
    y = layer(x)
    a[...] = 0.0
    b[...] = 0.0
    np.testing.assert_array_equal(layer(x), y)


def test_load_adapter_mismatch_names_module_and_leaves_the_layer():
    layer = _layer()
    before = (layer.lora_a, layer.lora_b, layer.scaling)
    lw = LoraWeights("m.fc", np.zeros((2, IN - 1), np.float32), np.zeros((OUT, 2), np.float32),
                     1.0, 2)
    with pytest.raises(ValueError, match=rf"adapter for module 'm.fc' does not fit this layer "
                       rf"\({OUT}x{IN}\): weights.a must have shape \(2, {IN}\)"):
        layer.load_adapter(lw)
    with pytest.raises(TypeError, match="weights must be a qlora.LoraWeights, got dict"):
        layer.load_adapter({"a": 1})
    for u, v in zip(before, (layer.lora_a, layer.lora_b, layer.scaling)):
        np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("dq", [False, True])
def test_merged_weight(dq):
    rng = np.random.default_rng(3)
    w = rng.standard_normal((24, 40))
    layer = QLoraLinear.from_weight(w, rank=4, alpha=6.0, double_quant=dq)
    b = rng.standard_normal((24, 4)).astype(np.float32)
    layer.set_lora_b(b)
    m = layer.merged_weight()
    assert m.dtype == np.float32 and m.shape == (24, 40)
    # Independent reference: dequantize from the exported bitsandbytes codes and scales.
    import reference as ref

    codes, absmax = ref.quantize(w.astype(np.float32), 64)
    deq = ref.dequantize(codes, layer.scale if dq else absmax, 64).astype(np.float64)
    want = deq + 1.5 * b.astype(np.float64) @ layer.lora_a.astype(np.float64)
    np.testing.assert_array_equal(m, want.astype(np.float32))
    x = rng.standard_normal((5, 40)).astype(np.float32)
    assert rel(x @ m.T, layer(x).astype(np.float64)) < 1e-5

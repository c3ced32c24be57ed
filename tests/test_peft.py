"""PEFT LoRA adapters against PEFT itself: scalings and ranks equal PEFT's, an end-to-end match
against PEFT's own forward on a small two-layer model, and real PEFT files with rejected
options (torch and peft run in the test). Everything that needs only hand-written files
(set_lora, merged_weight, the config allow-list, patterns) is in test_peft_files.py."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

import qlora
from qlora import LoraWeights, QLoraLinear

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")


class TwoLayer(torch.nn.Module):
    def __init__(self, d_in: int = 96, d_hidden: int = 80, d_out: int = 40) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(d_in, d_hidden)
        self.fc2 = torch.nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _peft_model(tmp_path, **config):
    torch.manual_seed(0)
    base = TwoLayer()
    cfg = dict(r=8, lora_alpha=16, target_modules=["fc1", "fc2"], lora_dropout=0.0)
    cfg.update(config)
    model = peft.get_peft_model(base, peft.LoraConfig(**cfg))
    # PEFT initialises B to zero; give B real values so the adapter matters in the comparison.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if hasattr(mod, "lora_B") and "default" in mod.lora_B:
                w = mod.lora_B["default"].weight
                w.copy_(torch.randn(w.shape, generator=gen) * 0.2)
    model.eval()
    folder = tmp_path / "adapter"
    model.save_pretrained(str(folder))
    return model, folder


def _qlora_model(model, adapters, group_size=64, double_quant=False):
    layers = {}
    for name in ("fc1", "fc2"):
        lin = getattr(model.base_model.model, name).base_layer
        layer = QLoraLinear.from_weight(lin.weight.detach().numpy(), rank=1,
                                        group_size=group_size, bias=lin.bias.detach().numpy(),
                                        double_quant=double_quant)
        layer.load_adapter(adapters[name])
        layers[name] = layer
    return layers


def _run(layers, x):
    return layers["fc2"](np.maximum(layers["fc1"](x), 0.0))


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@pytest.mark.parametrize("config", [
    {},
    {"use_rslora": True},
    {"rank_pattern": {"fc2": 4}, "alpha_pattern": {"fc1": 24}},
    {"r": 4, "lora_alpha": 7, "use_rslora": True, "rank_pattern": {"^fc2": 2}},
])
def test_scaling_and_ranks_match_peft(tmp_path, config):
    model, folder = _peft_model(tmp_path, **config)
    adapters = qlora.load_peft_adapter(folder)
    assert sorted(adapters) == ["fc1", "fc2"]
    for name, lw in adapters.items():
        mod = getattr(model.base_model.model, name)
        assert isinstance(lw, LoraWeights) and lw.name == name
        assert lw.rank == mod.r["default"]
        assert lw.scaling == mod.scaling["default"]  # same formula, same float
        np.testing.assert_array_equal(lw.a, mod.lora_A["default"].weight.detach().numpy())
        np.testing.assert_array_equal(lw.b, mod.lora_B["default"].weight.detach().numpy())
        assert not lw.a.flags.writeable and not lw.b.flags.writeable


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("config", [{}, {"use_rslora": True, "rank_pattern": {"fc2": 3}}])
def test_end_to_end_matches_peft(tmp_path, config, double_quant):
    model, folder = _peft_model(tmp_path, **config)
    layers = _qlora_model(model, qlora.load_peft_adapter(folder), double_quant=double_quant)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((16, 96)).astype(np.float32)
    y = _run(layers, x)

    # (1) A float64 reference with qlora's dequantized weights: only float32 rounding apart.
    h = x.astype(np.float64)
    for name in ("fc1", "fc2"):
        L = layers[name]
        h = (h @ L.dequantize_weight().astype(np.float64).T + L.bias
             + L.scaling * (h @ L.lora_a.astype(np.float64).T) @ L.lora_b.astype(np.float64).T)
        if name == "fc1":
            h = np.maximum(h, 0.0)
    assert _rel(y, h) < 1e-5

    # (2) PEFT itself, with its base weights replaced by qlora's dequantized ones: the same
    # math in float32 torch, so again only float32 rounding apart. This pins the adapter
    # semantics (scaling, rsLoRA, rank/alpha patterns) on PEFT's own forward.
    xt = torch.from_numpy(x)
    with torch.no_grad():
        y_peft_fp32 = model(xt).numpy().astype(np.float64)
        for name in ("fc1", "fc2"):
            base = getattr(model.base_model.model, name).base_layer
            base.weight.copy_(torch.from_numpy(layers[name].dequantize_weight()))
        y_peft_nf4 = model(xt).numpy()
    assert _rel(y, y_peft_nf4) < 1e-5

    # (3) Against PEFT on the original fp32 weights: the difference is the NF4 error. NF4 at
    # group 64 reconstructs N(0, s) weights with ~9% relative error (REFERENCE.md: mean
    # relative error 0.2 per element, ~0.09 in norm); for a random input the output error is
    # the same order, so 0.15 is a bound a correct implementation passes and a wrong scaling or
    # a transposed adapter (errors of order 1) fails. The adapter's share of the output is
    # checked to be large, so the comparison is not vacuous.
    err = _rel(y, y_peft_fp32)
    assert err < 0.15, err
    with torch.no_grad():
        with model.disable_adapter():
            y_no_lora = model(xt).numpy()
    assert _rel(y_no_lora, y_peft_nf4) > 0.3


def _edit_config(folder, **changes):
    path = os.path.join(folder, "adapter_config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(path, "w") as f:
        json.dump(cfg, f)


@pytest.mark.parametrize("changes, field", [
    ({"use_dora": True}, "use_dora"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out"),
    ({"peft_type": "LOHA"}, "peft_type"),
    ({"bias": "all"}, "bias"),
    ({"lora_bias": True}, "lora_bias"),
    ({"modules_to_save": ["fc1"]}, "modules_to_save"),
    ({"r": 0}, "r"),
    ({"rank_pattern": {"fc1": 5}}, "rank"),
    ({"rank_pattern": {"(": 5}}, "rank_pattern"),
])
def test_rejected_configs(tmp_path, changes, field):
    _, folder = _peft_model(tmp_path)
    _edit_config(folder, **changes)
    with pytest.raises(ValueError, match=field):
        qlora.load_peft_adapter(folder)


def test_real_dora_adapter_rejected(tmp_path):
    _, folder = _peft_model(tmp_path, use_dora=True)
    with pytest.raises(ValueError, match="DoRA"):
        qlora.load_peft_adapter(folder)


def test_half_precision_adapter(tmp_path):
    """Adapters saved in bf16 / fp16 are widened to float32 exactly."""
    model, folder = _peft_model(tmp_path)
    model.to(torch.bfloat16).save_pretrained(str(tmp_path / "bf16"))
    ad = qlora.load_peft_adapter(tmp_path / "bf16")
    want = model.base_model.model.fc1.lora_A["default"].weight.detach().float().numpy()
    np.testing.assert_array_equal(ad["fc1"].a, want)
    assert math.isclose(ad["fc1"].scaling, 2.0)


def test_every_lora_config_field_is_classified():
    # The allow-list must know every field the installed PEFT writes, so an adapter saved with
    # a default config always loads and no field is "unknown" by accident.
    import dataclasses

    from qlora.formats import peft as qpeft

    known = qpeft._USED | qpeft._HARMLESS | set(qpeft._UNSUPPORTED) | qpeft._INIT_CONFIGS
    fields = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    assert fields - known == set()
    # And the classification is not vacuous: the math-changing ones are not "harmless".
    assert not (set(qpeft._UNSUPPORTED) & qpeft._HARMLESS)
    assert {"use_dora", "fan_in_fan_out", "modules_to_save"} <= set(qpeft._UNSUPPORTED)

"""The torch bridge (qlora.torch) on a small transformers causal LM with random weights (no
download): every decoder linear quantized to a bitsandbytes NF4 ``Linear4bit`` and wrapped by
PEFT LoRA, then ``replace_linear4bit`` swaps them for qlora modules in a second, identical copy.

Both copies hold the same NF4 codes (imported exactly) and the same adapters, so the logits
differ only by float32 summation order, far inside NF4's own error: asserted within 1e-4 of the
logits' largest magnitude (NF4's quantization error on these weights is of order 1e-1 of it).
Training: the same AdamW steps on a fixed batch lower the loss of both, and the per-step losses
agree to 1e-3 relative.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from qlora import QLoraLinear  # noqa: E402
from qlora.torch import (QLoraTorchLinear, from_linear4bit, from_peft,  # noqa: E402
                         replace_linear4bit)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _quantize_linears(model):
    """Replace every decoder nn.Linear by a bitsandbytes NF4 Linear4bit of its weight."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, torch.nn.Linear) and name.rpartition(".")[2] in TARGETS:
            lin = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                    quant_type="nf4", compute_dtype=torch.float32)
            lin.weight = bnb.nn.Params4bit(mod.weight.detach().clone(), requires_grad=False,
                                           blocksize=64, quant_type="nf4")
            lin = lin.to("cpu")
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, lin)
    return model


def _peft_model(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, vocab_size=128,
                                   max_position_embeddings=64)
    model = _quantize_linears(transformers.LlamaForCausalLM(cfg))
    lcfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0)
    model = peft.get_peft_model(model, lcfg)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # a non-zero B, so the adapters matter from the first step
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    model.train()
    return model


@pytest.fixture(scope="module")
def models():
    original = _peft_model()
    replaced = _peft_model()
    names = replace_linear4bit(replaced)
    return original, replaced, names


def test_replace_finds_every_peft_linear4bit(models):
    _, replaced, names = models
    assert len(names) == 2 * len(TARGETS)
    for name in names:
        assert isinstance(replaced.get_submodule(name), QLoraTorchLinear)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in replaced.modules())
    trainable = {n for n, p in replaced.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * len(names)
    assert all(n.endswith(("lora_a", "lora_b")) for n in trainable)


def test_logits_match_bnb_peft(models):
    original, replaced, _ = models
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = original(input_ids=ids).logits
        got = replaced(input_ids=ids).logits
    assert got.shape == ref.shape
    assert float((got - ref).abs().max()) <= 1e-4 * float(ref.abs().max())


def test_training_steps_lower_the_loss_as_the_original():
    original, replaced = _peft_model(5), _peft_model(5)
    replace_linear4bit(replaced)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(4))
    losses = []
    for model in (original, replaced):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-2)
        trace = []
        for _ in range(6):
            opt.zero_grad()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            trace.append(loss.item())
        losses.append(trace)
    for trace in losses:
        assert trace[-1] < trace[0] - 0.05, trace
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-3)


def _linear4bit(w, bias=None):
    out_f, in_f = w.shape
    lin = bnb.nn.Linear4bit(in_f, out_f, bias=bias is not None, quant_type="nf4",
                            compute_dtype=torch.float32)
    lin.weight = bnb.nn.Params4bit(torch.from_numpy(w), requires_grad=False, blocksize=64,
                                   quant_type="nf4")
    if bias is not None:
        lin.bias = torch.nn.Parameter(torch.from_numpy(bias), requires_grad=False)
    return lin.to("cpu")


def test_linear4bit_round_trip_is_exact():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 64)).astype(np.float32)
    bias = rng.standard_normal(32).astype(np.float32)
    lin = _linear4bit(w, bias)
    sd = {k: v.detach().numpy().copy() for k, v in lin.state_dict().items()}
    mod = from_linear4bit(lin, rank=4, alpha=8.0)
    assert mod.lora_a.shape == (4, 64) and not mod.lora_b.detach().any()
    assert not mod.bias.requires_grad
    back = mod.to_linear4bit()
    sd2 = {k: v.detach().numpy() for k, v in back.state_dict().items()}
    assert sd.keys() == sd2.keys()
    for k in sd:
        np.testing.assert_array_equal(sd[k], sd2[k], err_msg=k)


def test_module_shares_memory_and_detects_in_place_changes():
    w = np.random.default_rng(1).standard_normal((16, 32)).astype(np.float32)
    layer = QLoraLinear.from_weight(w, rank=4)
    mod = QLoraTorchLinear(layer)
    x = torch.randn(3, 32, requires_grad=True)
    y = mod(x)
    np.testing.assert_array_equal(y.detach().numpy(), layer(x.detach().numpy()))
    with torch.no_grad():
        mod.lora_a.add_(1.0)  # an optimizer step before the backward
    with pytest.raises(RuntimeError, match="inplace"):
        y.sum().backward()
    # The new values are used by the next forward, with no set_lora.
    y2 = mod(x)
    ref = layer.forward(x.detach().numpy())
    ref += layer.scaling * (x.detach().numpy() @ np.ones((32, 4), np.float32)) @ layer.lora_b.T
    np.testing.assert_allclose(y2.detach().numpy(), ref, rtol=1e-5, atol=1e-5)
    out = mod.qlora_layer()
    np.testing.assert_array_equal(out.lora_a, mod.lora_a.detach().numpy())
    np.testing.assert_array_equal(layer.lora_a + 1.0, out.lora_a)


def test_dropout_in_training_only_and_seeded():
    w = np.random.default_rng(2).standard_normal((16, 32)).astype(np.float32)
    layer = QLoraLinear.from_weight(w, rank=4)
    layer.set_lora_b(np.ones((16, 4), np.float32))
    mod = QLoraTorchLinear(layer, dropout=0.5)
    x = torch.randn(4, 32)
    torch.manual_seed(7)
    a = mod(x)
    torch.manual_seed(7)
    b = mod(x)
    c = mod(x)
    assert torch.equal(a, b) and not torch.equal(a, c)
    mod.eval()
    np.testing.assert_array_equal(mod(x).detach().numpy(), layer(x.numpy()))


def test_bf16_input_and_errors():
    w = np.random.default_rng(3).standard_normal((16, 32)).astype(np.float32)
    mod = QLoraTorchLinear(QLoraLinear.from_weight(w, rank=2))
    x = torch.randn(2, 32, dtype=torch.bfloat16, requires_grad=True)
    y = mod(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and mod.lora_b.grad is not None
    with pytest.raises(TypeError, match="layer must be a qlora.QLoraLinear, got str"):
        QLoraTorchLinear("nope")
    with pytest.raises(ValueError, match="dropout must be in"):
        QLoraTorchLinear(QLoraLinear.from_weight(w, rank=2), dropout=1.0)
    with pytest.raises(ValueError, match="x must have shape"):
        mod(torch.randn(2, 31))


def test_import_qlora_does_not_import_torch_bridge():
    import subprocess
    import sys

    code = ("import sys, qlora, qlora.torch; print('torch' in sys.modules); "
            "qlora.torch.QLoraTorchLinear; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "True"]


def test_from_peft_rejects_unknown_adapter(models):
    original, _, _ = models
    plin = original.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    with pytest.raises(ValueError, match="adapter_name must be one of"):
        from_peft(plin, "other")
    mod = from_peft(plin)
    assert mod.scaling == pytest.approx(2.0)
    assert copy.deepcopy(mod).lora_a.shape == (8, 64)

"""qlora's gradients against torch autograd through a bitsandbytes ``Linear4bit`` wrapped by PEFT
LoRA on the same NF4 weights (interop extra; skipped without it).

Both sides compute in float32 on the same dequantized weight (qlora imports the bitsandbytes
codes and scales exactly), so they differ only by float32 summation order: every gradient is
asserted within ``4 * K * eps32`` times the sum of the absolute terms, K the summed length.
Dropout is off here: PEFT draws its mask from torch's
generator, qlora from a seed (the finite-difference tests in test_train.py cover dropout).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

from qlora import QLoraLinear  # noqa: E402

EPS32 = float(np.finfo(np.float32).eps)


class _Holder(torch.nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


def _peft_linear4bit(w, bias, rank, alpha, group):
    out_f, in_f = w.shape
    lin = bnb.nn.Linear4bit(in_f, out_f, bias=bias is not None, quant_type="nf4",
                            compute_dtype=torch.float32)
    lin.weight = bnb.nn.Params4bit(torch.from_numpy(w), requires_grad=False, blocksize=group,
                                   quant_type="nf4")
    if bias is not None:
        lin.bias = torch.nn.Parameter(torch.from_numpy(bias), requires_grad=True)
    lin = lin.to("cpu")
    # The state dict before any forward (an eval forward may rewrite it on AVX512-BF16 CPUs).
    sd = {k: v.detach().numpy().copy() for k, v in lin.state_dict().items()}
    cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["lin"], lora_dropout=0.0)
    model = peft.get_peft_model(_Holder(lin), cfg)
    model.train()
    if bias is not None:
        model.base_model.model.lin.base_layer.bias.requires_grad_(True)  # PEFT froze it
    return model, model.base_model.model.lin, sd


@pytest.mark.parametrize("out_f, in_f, rank, group, lead", [
    (48, 64, 4, 64, (5,)), (96, 128, 8, 32, (2, 3)), (64, 256, 16, 128, (33,)), (40, 64, 1, 64, (1,)),
])
def test_gradients_match_bnb_peft_autograd(out_f, in_f, rank, group, lead):
    rng = np.random.default_rng(out_f + in_f)
    w = rng.standard_normal((out_f, in_f)).astype(np.float32)
    bias = rng.standard_normal(out_f).astype(np.float32)
    model, plin, sd = _peft_linear4bit(w, bias, rank, 2.0 * rank, group)
    a = rng.standard_normal((rank, in_f)).astype(np.float32) * 0.1
    b = rng.standard_normal((out_f, rank)).astype(np.float32) * 0.1
    with torch.no_grad():
        plin.lora_A["default"].weight.copy_(torch.from_numpy(a))
        plin.lora_B["default"].weight.copy_(torch.from_numpy(b))

    layer = QLoraLinear.from_bnb(sd, rank=rank, alpha=2.0 * rank)
    layer.set_lora(a, b, scaling=2.0)
    x = rng.standard_normal(lead + (in_f,)).astype(np.float32)
    g = rng.standard_normal(lead + (out_f,)).astype(np.float32)

    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    yt = model(xt)
    yt.backward(torch.from_numpy(g))
    y, saved = layer.forward_train(x)
    grads = layer.backward(saved, g)

    deq = np.abs(layer.dequantize_weight().astype(np.float64))
    ax, ag = np.abs(x.reshape(-1, in_f)).astype(np.float64), np.abs(g.reshape(-1, out_f))
    aa, ab = np.abs(a).astype(np.float64), np.abs(b).astype(np.float64)
    batch = ax.shape[0]
    cases = [
        (y, yt.detach(), ax @ deq.T + 2.0 * (ax @ aa.T) @ ab.T + np.abs(bias), in_f + rank),
        (grads.input, xt.grad, ag @ deq + 2.0 * (ag @ ab) @ aa, out_f + rank),
        (grads.lora_a, plin.lora_A["default"].weight.grad, 2.0 * (ag @ ab).T @ ax,
         batch + out_f),
        (grads.lora_b, plin.lora_B["default"].weight.grad, 2.0 * ag.T @ (ax @ aa.T),
         batch + in_f),
        (grads.bias, plin.base_layer.bias.grad, ag.sum(0), batch),
    ]
    for got, ref, scale, k in cases:
        err = np.abs(got.reshape(scale.shape).astype(np.float64)
                     - ref.numpy().reshape(scale.shape).astype(np.float64))
        assert np.all(err <= 4.0 * k * EPS32 * scale + 1e-30), np.max(err / (k * EPS32 * scale))

"""Mixed-adapter batches against PEFT's own mixed-batch forward (``adapter_names=``) over a
bitsandbytes ``Linear4bit`` holding the same NF4 weight and the same adapters. Needs the
interop extra (torch, bitsandbytes, peft); skipped without it."""

from __future__ import annotations

import numpy as np
import pytest

from qlora import QLoraLinear

torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

IN, OUT = 128, 64
RANKS = {"a0": 4, "a1": 16, "a2": 8}


class Net(torch.nn.Module):
    def __init__(self, w, bias):
        super().__init__()
        self.fc = bnb.nn.Linear4bit(IN, OUT, bias=True, quant_type="nf4",
                                    compute_dtype=torch.float32)
        self.fc.weight = bnb.nn.Params4bit(torch.from_numpy(w), requires_grad=False,
                                           blocksize=64, quant_type="nf4")
        self.fc.bias = torch.nn.Parameter(torch.from_numpy(bias), requires_grad=False)

    def forward(self, x):
        return self.fc(x)


def test_mixed_batch_matches_peft_adapter_names_over_linear4bit():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((OUT, IN)) * 0.05).astype(np.float32)
    bias = rng.standard_normal(OUT).astype(np.float32)
    net = Net(w, bias).to("cpu")  # quantizes
    sd = {k[len("fc."):]: v.detach().numpy().copy() for k, v in net.state_dict().items()
          if k.startswith("fc.")}
    layer = QLoraLinear.from_bnb(sd, rank=1, alpha=1.0)
    layer.set_lora_b(np.zeros((OUT, 1)))

    model = None
    gen = torch.Generator().manual_seed(1)
    for name, r in RANKS.items():
        cfg = peft.LoraConfig(r=r, lora_alpha=2 * r + 1, target_modules=["fc"],
                              lora_dropout=0.0)
        if model is None:
            model = peft.get_peft_model(net, cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
    with torch.no_grad():
        fc = model.base_model.model.fc
        for name, r in RANKS.items():
            fc.lora_B[name].weight.copy_(torch.randn((OUT, r), generator=gen) * 0.3)
            layer.add_adapter(name, fc.lora_A[name].weight.numpy(),
                              fc.lora_B[name].weight.numpy(), scaling=fc.scaling[name])
    model.eval()

    names = (["a0", "a1", "a2", "__base__"] * 8)
    rng.shuffle(names)
    x = rng.standard_normal((len(names), IN)).astype(np.float32)
    with torch.no_grad():
        y_peft = model(torch.from_numpy(x), adapter_names=names).float().numpy()
    y = layer.forward(x, adapters=[None if n == "__base__" else n for n in names])
    # Same NF4 codes and scales; bitsandbytes' CPU forward may round the dequantized weight to
    # bfloat16 (REFERENCE.md), ~3e-3 relative, so 1e-2 per row. A row given the wrong adapter
    # is off by the whole LoRA term (checked to matter below).
    for i, n in enumerate(names):
        err = np.linalg.norm(y[i] - y_peft[i]) / np.linalg.norm(y_peft[i])
        assert err < 1e-2, (i, n, err)
    lora_share = np.linalg.norm(y - layer.forward(x, adapters=[None] * len(names)))
    assert lora_share > 0.2 * np.linalg.norm(y)

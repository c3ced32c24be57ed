"""rank_pattern / alpha_pattern keys: qlora decides which key applies to a module as PEFT does,
without handing hostile keys to a backtracking regex engine.

The reference is PEFT 0.21's ``get_pattern_key`` rule, reimplemented here in plain Python (no
torch needed): the first key ``K`` for which ``re.match(rf"(.*\\.)?({K})$", module)`` matches.
"""

from __future__ import annotations

import json
import os
import re
import struct
import time

import numpy as np
import pytest

import qlora
from qlora.formats import peft as peft_format


def peft_rule(keys: list[str], module: str) -> str | None:
    for key in keys:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def qlora_rule(keys: list[str], module: str) -> str | None:
    matchers = peft_format._pattern_matchers({k: k for k in keys}, "rank_pattern", "cfg")
    return peft_format._pattern_value(matchers, module, None)


MODULES = [
    "model.layers.0.self_attn.q_proj", "model.layers.10.self_attn.q_proj",
    "model.layers.1.self_attn.k_proj", "model.layers.0.mlp.down_proj", "q_proj", "xq_proj",
    "model.layers.0.self_attn.xq_proj", "model.decoder.layers.0.encoder_attn.k_proj",
    "model.layers.3.mlp.experts.17.up_proj", "transformer.h.0.attn.c_attn", "lm_head", "",
    "a.", ".q_proj", "q_proj.", "model..q_proj", "modelXlayers.0.self_attn.q_proj",
    "q_proj\n", "model.layers.0\n.q_proj", "x\nq_proj", "model.layers.0.self_attn.q_proj\n",
    "model.layers.0.self_attn.q_proj.weight", "layers.0.q_proj", "ayers.0.q_proj",
]
KEYS = [
    "q_proj", "k_proj", "down_proj", "self_attn.q_proj", "layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.q_proj", "0.self_attn.q_proj", "model.layers.10.self_attn.q_proj",
    "experts.17.up_proj", "c_attn", "lm_head", "", "proj", "_proj", "layers.0.q_proj",
    "ayers.0.q_proj", "^model.decoder.layers.0.encoder_attn.k_proj", r".*\.q_proj",
    r"model\.layers\.\d+\.self_attn\.q_proj", ".*q_proj", r"layers\.(0|1)\.self_attn\..*",
    "(q|k)_proj", "model.layers.[0-3].mlp.down_proj", r"experts\.\d+\.up_proj",
    "mlp.experts.*", "q_proj\n", "q-proj", "c_att.", "model.layers.0.self_attn.q_proj$",
]


@pytest.mark.parametrize("module", MODULES)
def test_each_key_matches_as_peft_does(module):
    for key in KEYS:
        assert qlora_rule([key], module) == peft_rule([key], module), (key, module)


def test_first_matching_key_wins_as_in_peft():
    rng = np.random.default_rng(0)
    for _ in range(200):
        keys = list(rng.choice(KEYS, size=int(rng.integers(1, 6)), replace=False))
        for module in MODULES:
            assert qlora_rule(keys, module) == peft_rule(keys, module), (keys, module)


def test_literal_keys_do_not_use_the_regex(monkeypatch):
    """A key without metacharacters never reaches re for a module path without a newline:
    its matcher is a string comparison."""
    class NoMatch:
        def match(self, module):
            raise AssertionError(f"the regex ran on {module!r}")

    monkeypatch.setattr(peft_format.re, "compile", lambda pattern: NoMatch())
    matches = peft_format._key_matcher("q_proj", "rank_pattern", "cfg")
    assert matches("model.layers.0.self_attn.q_proj")
    assert not matches("model.layers.0.self_attn.xq_proj")
    try:
        matches("q_proj\n")  # a newline: the regex decides (see _key_matcher)
        ran = False
    except AssertionError:
        ran = True
    monkeypatch.undo()
    assert ran


@pytest.mark.parametrize("key", ["(a+)+", "(a*)*", "(a|a)*", "(?:a+){2,}", "((a+)b)*",
                                 "(x.*)+", r"(\d+\.)*q_proj"])
def test_nested_quantifiers_are_refused(key):
    with pytest.raises(ValueError, match=r"rank_pattern: key .*\(nested quantifiers"):
        peft_format._key_matcher(key, "rank_pattern", "cfg")


@pytest.mark.parametrize("key", ["(a+)?", "(ab)*", r"(\.\d+)?", "[(a+)]*", r"\(a+\)+",
                                 "(q|k)_proj", "(a{2}){1}"])
def test_safe_groups_are_accepted(key):
    peft_format._key_matcher(key, "rank_pattern", "cfg")


def test_long_keys_are_refused():
    with pytest.raises(ValueError, match=r"rank_pattern: key .* 257 characters long; at most "
                       r"256"):
        peft_format._key_matcher("a" * 257, "rank_pattern", "cfg")


def test_polynomial_backtracking_is_bounded():
    matches = peft_format._key_matcher(".*.*.*x", "alpha_pattern", "cfg")
    assert matches("a." * 40 + "x")
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"alpha_pattern: key '\.\*\.\*\.\*x' has 3 repeating "
                       r"quantifiers; .* \(512 characters\)"):
        matches("a." * 256)
    assert time.perf_counter() - t0 < 1.0


def _folder(tmp_path, config: dict, module: str, rank: int = 1) -> str:
    header, body = {}, b""
    for part, shape in (("lora_A", (rank, 4)), ("lora_B", (4, rank))):
        raw = np.ones(shape, "<f4").tobytes()
        header[f"base_model.model.{module}.{part}.weight"] = {
            "dtype": "F32", "shape": list(shape), "data_offsets": [len(body), len(body) + len(raw)]}
        body += raw
    blob = json.dumps(header).encode()
    (tmp_path / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob
                                                          + body)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    return os.fspath(tmp_path)


def test_load_peft_adapter_refuses_a_redos_key_fast(tmp_path):
    folder = _folder(tmp_path, {"peft_type": "LORA", "r": 1, "lora_alpha": 1,
                                "rank_pattern": {"(a+)+": 1}}, "a" * 40 + "!")
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"adapter_config.json: rank_pattern: key '\(a\+\)\+' "
                       r"is refused: .*backtrack exponentially"):
        qlora.load_peft_adapter(folder)
    assert time.perf_counter() - t0 < 1.0


def test_load_peft_adapter_applies_literal_and_regex_keys(tmp_path):
    module = "model.layers.0.self_attn.q_proj"
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "rank_pattern": {"k_proj": 4,
              "q_proj": 2}, "alpha_pattern": {r"layers\.\d+\.self_attn\.q_proj": 6}}
    got = qlora.load_peft_adapter(_folder(tmp_path, config, module, rank=2))[module]
    assert got.rank == 2 and got.scaling == 3.0

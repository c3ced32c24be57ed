"""Reading PEFT LoRA adapters (``adapter_config.json`` + ``adapter_model.safetensors``) without
torch or peft.

Scaling follows PEFT 0.21's ``LoraLayer.update_layer``: ``lora_alpha / r``, or
``lora_alpha / sqrt(r)`` with ``use_rslora``, where ``r`` and ``lora_alpha`` are overridden
per module by ``rank_pattern`` / ``alpha_pattern``. A pattern key ``K`` applies to module path
``M`` when ``re.match(rf"(.*\\.)?({K})$", M)`` matches, the first such key in the file's order
winning (PEFT's ``get_pattern_key``).

The config is read against an allow-list: every ``LoraConfig`` field of PEFT 0.21 is either
used (``r``, ``lora_alpha``, ``use_rslora``, the patterns), harmless for inference (metadata,
which modules were targeted, dropout, ...), or changes the forward math and is rejected when
set (DoRA, ``fan_in_fan_out``, LoRA bias, trained base biases, ``modules_to_save``, inits that
rewrite the base weight, ...). A key the list does not know (a newer PEFT's option) is
accepted only at an empty value (None, false, "", [] or {}); any other value is an error
naming it, since it could change the math.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any

import numpy as np

from .._validate import check_f32_range, check_path
from .safetensors import SafetensorsFile, bf16_to_float32, require_regular_file

__all__ = ["LoraWeights", "load_peft_adapter"]

_PREFIX = "base_model.model."
# A real adapter_config.json is a few KB; a larger one is not read whole into memory.
MAX_CONFIG_BYTES = 1 << 20
_A, _B = ".lora_A.weight", ".lora_B.weight"

# Config options whose non-default values change what the adapter computes.
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora) adds a magnitude vector and renormalises the weight",
    "fan_in_fan_out": "fan_in_fan_out stores weights transposed (Conv1D layers)",
    "lora_bias": "lora_bias adds a bias to lora_B",
    "use_qalora": "QA-LoRA pools the input before lora_A",
    "alora_invocation_tokens": "activated LoRA depends on the token sequence",
    "layer_replication": "layer_replication duplicates layers",
    "target_parameters": "LoRA on nn.Parameters (target_parameters) is not a Linear adapter",
    "modules_to_save": "modules_to_save replaces whole modules with trained copies",
    "trainable_token_indices": "trainable tokens change embeddings",
    "use_bdlora": "block-diagonal LoRA changes the adapter shape",
    "arrow_config": "Arrow routing mixes several adapters",
    "kasa_config": "KaSA changes the adapter math",
    "monteclora_config": "MonteCLoRA changes the adapter math",
    "velora_config": "VeLoRA changes the adapter math",
    "megatron_config": "Megatron parallel layers split the adapter across devices",
}
# Fields qlora reads.
_USED = {"peft_type", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "bias",
         "init_lora_weights"}
# Fields that do not change what a trained adapter computes at inference, whatever their value:
# metadata, which modules/layers were adapted (the tensors say which), training-only dropout,
# runtime placement, options read only together with another option that is checked (the
# Megatron module path, QA-LoRA's group size), and EVA's config (EVA only chooses the initial
# A from activations; the base weight is untouched).
_HARMLESS = {
    "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "target_modules", "exclude_modules", "lora_dropout",
    "layers_to_transform", "layers_pattern", "runtime_config", "ensure_weight_tying",
    "eva_config", "megatron_core", "qalora_group_size",
}
# init_lora_weights values that only choose the starting A and B. PiSSA, OLoRA, CorDA, LoRA-GA
# and LoftQ also rewrite the base weight, so their adapters are only right on that rewritten
# base (PEFT can convert them to plain LoRA on save; the config then says True).
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")
# Configs of those methods: harmless when empty, refused otherwise.
_INIT_CONFIGS = {"loftq_config", "corda_config", "lora_ga_config"}


def _is_empty(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, (str, list, dict))
                                               and not value)


def _finite(value: Any) -> float | None:
    """`value` as a finite float if it is a JSON number (not a bool) that is one, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        f = float(value)
    except OverflowError:  # a JSON integer beyond the float range
        return None
    return f if math.isfinite(f) else None


@dataclasses.dataclass(frozen=True, eq=False)
class LoraWeights:
    """One module's LoRA adapter as read from a PEFT folder.

    Attributes
    ----------
    name : str
        The module path inside the base model, e.g. ``"model.layers.0.self_attn.q_proj"``.
    a : numpy.ndarray
        float32 (rank, in_features), read-only: ``lora_A.weight``.
    b : numpy.ndarray
        float32 (out_features, rank), read-only: ``lora_B.weight``.
    scaling : float
        ``lora_alpha / rank`` (or ``/ sqrt(rank)`` with rsLoRA), after per-module patterns.
    rank : int
    """

    name: str
    a: np.ndarray
    b: np.ndarray
    scaling: float
    rank: int

    def __repr__(self) -> str:
        return (f"LoraWeights(name={self.name!r}, rank={self.rank}, "
                f"in_features={self.a.shape[1]}, out_features={self.b.shape[0]}, "
                f"scaling={self.scaling:g})")


# rank_pattern / alpha_pattern keys are module paths or short regexes (well under 100
# characters in real configs); a longer key is refused rather than matched.
MAX_PATTERN_KEY = 256
# A regex key with q repeating quantifiers may backtrack ~len(module) ** (q + 1) steps; above
# this bound (about a second of matching) the pair is refused. Real keys have at most a few
# quantifiers and module paths under 100 characters (e.g. 3 and 80: 4e7).
MAX_MATCH_STEPS = 10 ** 9
_QUANTIFIER_START = "*+?{"
_REPEAT = re.compile(r"\{\d*(,\d*)?\}")


def _repeats(braces: str) -> bool:
    """Whether ``{m}``, ``{m,}``, ``{,n}`` or ``{m,n}`` may repeat its atom more than once."""
    parts = braces[1:-1].split(",")
    high = parts[-1]
    return high == "" or int(high) > 1 if len(parts) == 2 else int(parts[0] or 0) > 1


def _backtracking_risk(key: str) -> tuple[str | None, int]:
    """Why matching regex `key` could backtrack exponentially (or None), and how many
    repeating quantifiers it holds.

    That happens when a group repeated by ``*``, ``+`` or ``{m,n}`` holds a quantifier or an
    alternation, as in ``(a+)+`` or ``(a|a)*``: the ways to split a string among the
    repetitions multiply. (An optional group, ``(...)?``, is not repeated.) Keys without such
    a group match in polynomial time: up to about ``len(module) ** (q + 1)`` steps for ``q``
    repeating quantifiers (PEFT's ``(.*\\.)?`` prefix adds one). A scan of the pattern's
    text: escapes and character classes are skipped, groups are tracked on a stack.
    """
    stack = [[False, False]]  # per open group: holds a quantifier, holds an alternation
    last_group = None  # the flags of a group that just closed (the atom a quantifier binds)
    repeating = 0
    i, n = 0, len(key)
    while i < n:
        c = key[i]
        atom = None
        if c == "\\":
            i += 2
        elif c == "[":
            j = i + 1
            if j < n and key[j] == "^":
                j += 1
            if j < n and key[j] == "]":
                j += 1
            while j < n and key[j] != "]":
                j += 2 if key[j] == "\\" else 1
            i = j + 1
        elif c == "(":
            stack.append([False, False])
            i += 1
            if i < n and key[i] == "?":  # (?:, (?P<name>, (?=, flags: not a quantifier
                i += 1
        elif c == ")":
            atom = stack.pop() if len(stack) > 1 else [False, False]
            stack[-1][0] |= atom[0]  # the enclosing group holds what this one holds
            stack[-1][1] |= atom[1]
            i += 1
        elif c == "|":
            stack[-1][1] = True
            i += 1
        elif c in _QUANTIFIER_START:
            m = _REPEAT.match(key, i) if c == "{" else None
            if c == "{" and m is None:
                i += 1  # a literal brace
            else:
                repeats = c in "*+" or (m is not None and _repeats(m.group()))
                if repeats and last_group is not None and (last_group[0] or last_group[1]):
                    return ("a repeated group holds a quantifier or an alternation (nested "
                            "quantifiers, as in '(a+)+' or '(a|b)*'), which can make matching "
                            "backtrack exponentially"), repeating
                repeating += repeats
                stack[-1][0] = True
                i = m.end() if m else i + 1
                if i < n and key[i] in "?+":  # lazy or possessive form of the same quantifier
                    i += 1
        else:
            i += 1
        last_group = atom
    return None, repeating


def _key_matcher(key: object, field: str, config_path: str):
    """A function ``module -> bool`` deciding, as PEFT's ``get_pattern_key`` does, whether
    pattern key `key` applies to a module path: ``re.match(rf"(.*\\.)?({key})$", module)``.

    A key without regex metacharacters (dots included: ``.`` matches any character) is
    compared as text: for a module path without a newline, the regex matches exactly when
    the path is the key or ends with ``"." + key`` (``$`` may also match before a final
    newline, and ``.*`` stops at newlines, so paths holding one take the regex).
    """
    if not isinstance(key, str):  # JSON object keys are strings; be safe anyway
        raise ValueError(f"{config_path}: {field}: key {key!r:.80} must be a string")
    if len(key) > MAX_PATTERN_KEY:
        raise ValueError(f"{config_path}: {field}: key {key!r:.80}... is {len(key)} characters "
                         f"long; at most {MAX_PATTERN_KEY} (module paths and patterns are far "
                         "shorter)")
    risk, repeating = _backtracking_risk(key)
    if risk is not None:
        raise ValueError(f"{config_path}: {field}: key {key!r:.80} is refused: {risk}")
    try:
        regex = re.compile(rf"(.*\.)?({key})$")
    except (re.error, OverflowError, RecursionError) as exc:
        raise ValueError(f"{config_path}: {field}: key {key!r:.80} is not a valid regular "
                         f"expression ({exc})") from None
    if re.escape(key) != key:
        def matches(module: str) -> bool:
            if len(module) ** (repeating + 1) > MAX_MATCH_STEPS:
                raise ValueError(f"{config_path}: {field}: key {key!r:.80} has {repeating} "
                                 f"repeating quantifiers; matching it against module path "
                                 f"{module!r:.80} ({len(module)} characters) could take "
                                 f"~{len(module)}**{repeating + 1} steps (at most "
                                 f"{MAX_MATCH_STEPS:.0e})")
            return regex.match(module) is not None
        return matches
    suffix = "." + key
    return lambda module: (module == key or module.endswith(suffix) if "\n" not in module
                           else regex.match(module) is not None)


def _pattern_matchers(patterns: dict, field: str, config_path: str) -> list:
    """(matcher, value) per key, in the file's order (the first match wins, as in PEFT)."""
    return [(_key_matcher(key, field, config_path), value) for key, value in patterns.items()]


def _pattern_value(matchers: list, module: str, default: Any) -> Any:
    for matches, value in matchers:
        if matches(module):
            return value
    return default


def _as_f32(st: SafetensorsFile, key: str) -> np.ndarray:
    info = st.tensors[key]
    raw = st.array(key)
    if info.dtype == "BF16":
        arr = bf16_to_float32(raw)
    elif info.dtype in ("F32", "F16", "F64"):
        arr = raw.astype(np.float32)
    else:
        raise st.error(f"tensor {key!r} dtype", f"must be a float type, got {info.dtype}")
    if arr.ndim != 2:
        raise st.error(f"tensor {key!r} shape", f"must be 2-D (a Linear adapter), got "
                       f"{arr.shape}")
    if not np.isfinite(arr).all():
        raise st.error(f"tensor {key!r}", "holds NaN or Inf")
    arr = np.ascontiguousarray(arr)
    arr.setflags(write=False)
    return arr


def load_peft_adapter(folder: str | os.PathLike) -> dict[str, LoraWeights]:
    """Read a PEFT LoRA adapter folder.

    Parameters
    ----------
    folder : str or os.PathLike
        A folder written by ``PeftModel.save_pretrained``: ``adapter_config.json`` and
        ``adapter_model.safetensors`` (``adapter_model.bin`` pickles are not read).

    Returns
    -------
    dict of str to LoraWeights
        Keyed by module path inside the base model (the ``base_model.model.`` prefix and the
        ``.lora_A.weight`` suffix removed). Apply one with :meth:`QLoraLinear.load_adapter`.

    Raises
    ------
    OSError
        If the folder or a file is missing or unreadable.
    ValueError
        If the config is not a LoRA config, uses DoRA, ``fan_in_fan_out`` or another option
        that changes the math, holds an option qlora does not know at a non-empty value, gives
        a scaling float32 cannot hold, or the tensors are inconsistent with it (the message
        names the file and the field).

    Examples
    --------
    >>> adapters = qlora.load_peft_adapter("my-adapter/")  # doctest: +SKIP
    >>> layers["model.layers.0.mlp.up_proj"].load_adapter(
    ...     adapters["model.layers.0.mlp.up_proj"])  # doctest: +SKIP
    """
    folder = check_path(folder, "folder")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: not a directory (expected a PEFT adapter folder)")
    config_path = os.path.join(folder, "adapter_config.json")
    weights_path = os.path.join(folder, "adapter_model.safetensors")
    require_regular_file(config_path)
    with open(config_path, "rb") as f:
        raw = f.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise ValueError(f"{config_path}: larger than {MAX_CONFIG_BYTES} bytes; not an adapter "
                         "config")
    try:
        config = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ValueError(f"{config_path}: not valid UTF-8 JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: must hold a JSON object")

    def bad(field: str, msg: str) -> ValueError:
        return ValueError(f"{config_path}: {field}: {msg}")

    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise bad("peft_type", f"only 'LORA' adapters are supported, got {peft_type!r}")
    for key, value in config.items():
        if key in _UNSUPPORTED:
            if not _is_empty(value):
                raise bad(key, f"{value!r}: {_UNSUPPORTED[key]}; not supported by qlora")
        elif key in _INIT_CONFIGS:
            if not _is_empty(value):
                raise bad(key, f"{value!r}: the adapter was initialised by a method that "
                          "rewrites the base weight; qlora needs a plain LoRA adapter")
        elif key not in _USED and key not in _HARMLESS and not _is_empty(value):
            raise bad(key, f"unknown option with value {value!r}: it may change the math, so "
                      "qlora refuses it (only empty values of unknown options are accepted)")
    init = config.get("init_lora_weights", True)
    if not any(init is v or (isinstance(v, str) and init == v) for v in _PLAIN_INITS):
        if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
            raise bad("init_lora_weights", f"{init!r} rewrites the base weight, so the adapter "
                      "only fits that rewritten base; convert it to a plain LoRA with PEFT "
                      "(path_initial_model_for_weight_conversion) first")
        raise bad("init_lora_weights", f"must be one of {_PLAIN_INITS}, got {init!r}")
    if config.get("bias", "none") != "none":
        raise bad("bias", f"{config.get('bias')!r}: the adapter trains base-layer biases; only "
                  "'none' is supported")
    r = config.get("r")
    alpha = config.get("lora_alpha")
    if type(r) is not int or r < 1:
        raise bad("r", f"must be a positive integer, got {r!r}")
    if _finite(alpha) is None:
        raise bad("lora_alpha", f"must be a finite number, got {alpha!r}")
    rslora = config.get("use_rslora", False)
    if type(rslora) is not bool:
        raise bad("use_rslora", f"must be true or false, got {rslora!r}")
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    for field, pat in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        if not isinstance(pat, dict):
            raise bad(field, f"must be an object, got {type(pat).__name__}")
    rank_matchers = _pattern_matchers(rank_pattern, "rank_pattern", config_path)
    alpha_matchers = _pattern_matchers(alpha_pattern, "alpha_pattern", config_path)

    st = SafetensorsFile(weights_path, mmap=False)
    modules: dict[str, dict[str, str]] = {}
    for key in st.tensors:
        name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        for suffix, part in ((_A, "a"), (_B, "b")):
            if name.endswith(suffix):
                modules.setdefault(name[: -len(suffix)], {})[part] = key
                break
        else:
            if "lora_embedding" in key:
                why = "LoRA on embeddings is not supported (Linear layers only)"
            elif "lora_magnitude_vector" in key:
                why = "DoRA magnitude vectors are not supported"
            else:
                why = "not a lora_A/lora_B weight; qlora applies Linear LoRA adapters only"
            raise st.error(f"tensor {key!r}", why)

    out: dict[str, LoraWeights] = {}
    for module, keys in sorted(modules.items()):
        for part, suffix in (("a", _A), ("b", _B)):
            if part not in keys:
                raise st.error(f"module {module!r}", f"has no {suffix[1:]} tensor")
        a = _as_f32(st, keys["a"])
        b = _as_f32(st, keys["b"])
        rank = a.shape[0]
        if rank < 1:
            raise st.error(f"tensor {keys['a']!r} shape", f"must have at least one row "
                           f"(rank >= 1), got {a.shape}")
        if b.shape[1] != rank:
            raise st.error(f"tensor {keys['b']!r} shape", f"must be (out_features, {rank}) to "
                           f"match lora_A {a.shape}, got {b.shape}")
        mod_r = _pattern_value(rank_matchers, module, r)
        mod_alpha = _pattern_value(alpha_matchers, module, alpha)
        if type(mod_r) is not int or mod_r != rank:
            raise st.error(f"tensor {keys['a']!r} shape", f"has rank {rank} but the config "
                           f"gives module {module!r} r = {mod_r!r}")
        alpha_f = _finite(mod_alpha)
        if alpha_f is None or alpha_f <= 0:
            raise bad("alpha_pattern", f"module {module!r} gets lora_alpha {mod_alpha!r}; "
                      "must be a finite number > 0")
        scaling = alpha_f / math.sqrt(rank) if rslora else alpha_f / rank
        try:  # the core multiplies by it in float32
            check_f32_range(scaling, "scaling", zero_ok=False)
        except ValueError as exc:
            what = "lora_alpha / sqrt(r)" if rslora else "lora_alpha / r"
            rank_s = f"sqrt({rank})" if rslora else str(rank)
            raise bad("lora_alpha", f"module {module!r}: {what} = {mod_alpha!r} / {rank_s}: "
                      f"{exc}") from None
        out[module] = LoraWeights(module, a, b, float(scaling), rank)
    if not out:
        raise st.error("tensors", "the adapter holds no LoRA weights")
    return out

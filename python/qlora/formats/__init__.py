"""Converters between qlora's layer state (:mod:`qlora._state`) and outside file formats.

- :mod:`.safetensors`: a defensive reader and an atomic writer of the safetensors format;
- :mod:`.files`: qlora's own layer files (layer states in one safetensors file);
- :mod:`.bnb`: bitsandbytes ``Linear4bit`` state dicts;
- :mod:`.peft`: PEFT LoRA adapter folders.

They take and return state values and never import the layer module.
"""

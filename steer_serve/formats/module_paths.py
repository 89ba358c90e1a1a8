"""pyvene's string-addressed components (``"model.layers[15].mlp.output"``) as (layer, component).

pyvene lets a representation name a module path of the Hugging Face model plus ``.output`` or
``.input`` instead of a ``{"layer", "component"}`` pair. The path is resolved against the
architecture tables of :mod:`steer_serve.engine.architectures` (Hugging Face and vLLM share these
module names): ``<layers>[i].output`` is ``block_output``, ``<layers>[i].<module>.output|input``
the component whose site is that module's output or input (Llama ``self_attn.o_proj.input`` =
``attention_value_output``). The layer list may be named from the causal-LM wrapper
(``model.layers``, ``transformer.h``) or from the bare model inside it (``layers``, ``h``).
"""
from __future__ import annotations

import re

from ..engine.architectures import ARCHITECTURES, Site
from .errors import InterventionFormatError

_PATH = re.compile(r"^(?P<layers>[A-Za-z_][\w.]*)\[(?P<layer>\d+)\](?:\.(?P<module>[\w.]+?))?\.(?P<io>output|input)$")


def _hf_hook_point(site: Site) -> tuple[str, str] | None:
    """(module path, "output" | "input") of a site in Hugging Face's modules: vLLM's fused
    ``qkv_proj`` slices are HF's ``q_proj``/``k_proj``/``v_proj`` outputs, a gated activation is
    HF's ``act_fn`` output; GPT-2's ``c_attn`` is fused in HF too, so its slices have no path."""
    if site.hook in ("q", "k", "v"):
        if not site.module.endswith("qkv_proj"):
            return None
        return site.module.removesuffix("qkv_proj") + f"{site.hook}_proj", "output"
    return site.module, "output" if site.hook == "gated" else site.hook


def _site_table() -> dict[tuple[str, str, str], str]:
    """(layer-list path, module path in the layer, "output" | "input") -> component, for every table."""
    sites = {}
    for table in ARCHITECTURES.values():
        parts = table.layers.split(".")
        for start in range(len(parts)):
            for component, site in table.sites.items():
                hook_point = _hf_hook_point(site)
                if hook_point:
                    sites[(".".join(parts[start:]), *hook_point)] = component
    return sites


_SITES = _site_table()


def is_module_path(component) -> bool:
    """Whether a representation's ``component`` is a module path rather than a component name."""
    return isinstance(component, str) and "." in component


def resolve_module_path(path: str, *, param: str = "config.json") -> tuple[int, str]:
    """``(layer, component)`` of a pyvene string component; a format error if it names no served site."""
    m = _PATH.match(path)
    site = m and _SITES.get((m["layers"], m["module"] or "", m["io"]))
    if not site:
        examples = "model.layers[<i>].output, model.layers[<i>].mlp.output, model.layers[<i>].self_attn.output, " \
                   "model.layers[<i>].self_attn.o_proj.input (GPT-2: transformer.h[<i>].attn.c_proj.input ...)"
        raise InterventionFormatError(f"component {path!r} names no site steer-serve serves; string components must "
                                      f"be a decoder layer's or its attention/MLP module's output, or the attention "
                                      f"output projection's input: {examples}", param=param,
                                      code="unsupported_component")
    return int(m["layer"]), site

"""Steerable versions of vLLM's stock models: the stock class plus slot tables and module hooks.

Nothing of vLLM is copied or subclassed per layer. For an architecture with a table in
:mod:`.architectures`, ``Steer<Arch>`` (built on demand by this module's ``__getattr__``, which is
what vLLM's registry imports) runs the stock ``__init__`` and then, on every decoder layer,
registers fixed-size slot tables per hooked component (``register_buffer``, so they exist before any
graph is captured) and a forward (pre-)hook at the module the table names. A hook makes one
batched kernel call for all intervention columns on the tokens of the step, with the step's
host-side analysis (:meth:`StepState.plan`, built once per step), and only when an intervention
of this step touches that site.

Block output under vLLM's fused residual: a Llama-style layer returns ``(hidden, residual)`` and
the next layer (or the final norm) adds them. The edit is computed on ``hidden + residual`` and
returned as the new hidden state with a zero residual, so the next fused add sees exactly that
sum, bit for bit as Hugging Face's layer output. Block input likewise: the layer's
``(hidden, residual)`` arguments are summed, edited and passed on with a zero residual.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from steer_serve.engine.architectures import (ARCHITECTURES, STEER_PREFIX, ArchitectureTable, component_geometry,
                                              steer_class_name)
from steer_serve.engine.capture import CaptureState
from steer_serve.engine.condition import ConditionState
from steer_serve.engine.config import SteerConfig
from steer_serve.engine.interchange import InterchangeState
from steer_serve.engine.step_state import StepState
from steer_serve.engine.vllm_internals import (building_as, gather_tensor_parallel_columns, is_pipeline_placeholder,
                                              stock_model_class, tensor_parallel_rank)
from steer_serve.kernels import SlotTables, apply_interventions, register_slot_tables


class LayerSteering:
    """The slot tables of one decoder layer and the step state its hooks read."""

    def __init__(self, layer: nn.Module, layer_idx: int, step_state: StepState, capture_state: CaptureState,
                 interchange_state: InterchangeState, condition_state: ConditionState, widths: dict[str, int],
                 components: tuple[str, ...]):
        self.layer = layer
        self.layer_idx = layer_idx
        self.step_state = step_state
        self.capture_state = capture_state
        self.interchange_state = interchange_state
        self.condition_state = condition_state
        config = step_state.config
        self.components = components
        self.widths = widths
        self._prefixes = {component: f"steer_{component}" for component in components}
        self._wp_names = {component: f"{prefix}_wp" for component, prefix in self._prefixes.items()}
        self._tables = {component: register_slot_tables(layer, prefix, config.num_slots + 1,
                                                        config.max_rank, widths[component],
                                                        device=torch.get_default_device())
                        for component, prefix in self._prefixes.items()}

    def slot_tables(self, component: str) -> SlotTables:
        """The tables of one component (re-viewed if the layer's buffers were moved)."""
        tables = self._tables[component]
        if tables.wp is not getattr(self.layer, self._wp_names[component]):
            tables = self._tables[component] = SlotTables.from_buffers(self.layer, self._prefixes[component])
        return tables

    def hooked(self, component: str) -> bool:
        """Whether an intervention or an interchange source term of this step touches ``component`` of this layer."""
        return (self.step_state.is_active(self.layer_idx, component)
                or self.interchange_state.touches((self.layer_idx, component)))

    def capturing(self, component: str) -> bool:
        """Whether a request of this step records ``component`` of this layer, or sums its prompt there for a condition."""
        site = (self.layer_idx, component)
        return (self.capture_state.any_this_step and self.capture_state.wants(site)) or self.condition_state.wants(site)

    def capture(self, component: str, x: torch.Tensor) -> None:
        """Record this step's wanted rows of ``x`` (the site's tensor after its edits; TP shards gathered), and add
        its conditional requests' prompt rows to their sums."""
        tokens = x.reshape(-1, x.shape[-1])
        if tokens.shape[-1] != self.widths[component]:
            tokens = gather_tensor_parallel_columns(tokens, self.widths[component])
        site = (self.layer_idx, component)
        if self.capture_state.any_this_step and self.capture_state.wants(site):
            self.capture_state.record(site, tokens)
        if self.condition_state.wants(site):
            self.condition_state.accumulate(site, tokens)

    def steer(self, component: str, x: torch.Tensor) -> torch.Tensor:
        """Apply this step's interventions at ``component`` to ``x`` (one kernel call, all columns).

        At a tensor-parallel site (attention value output, q/k/v, MLP activation) ``x`` is this
        rank's shard of the columns: the full tensor is gathered, edited with the whole tables (an
        edit may mix every column), and this rank's shard is taken back."""
        tokens = x.reshape(-1, x.shape[-1])  # vLLM's Transformers backend keeps a batch dim of 1
        plan = self.step_state.plan(tokens.shape[0])
        width = self.widths[component]
        shard = tokens.shape[-1]
        if shard != width:
            tokens = gather_tensor_parallel_columns(tokens, width)
        gated = self.condition_state.gate_index(tokens.device)
        if gated is not None:   # the rows of conditional requests' generated tokens, before their edits
            before = tokens.index_select(0, gated)
        edited = tokens
        if self.step_state.is_active(self.layer_idx, component):   # else only source terms (interchange subspaces)
            edited = apply_interventions(tokens, plan.slots, plan.coef, self.slot_tables(component), plan=plan)
        edited = self.interchange_state.add((self.layer_idx, component), edited)   # per-request source rows
        if gated is not None:
            edited = self.condition_state.gate(before, edited)
        if shard != width:
            rank = tensor_parallel_rank()
            edited = edited[:, rank * shard:(rank + 1) * shard]
        return edited.reshape(x.shape)


def _edit_output(steering: LayerSteering, component: str, output):
    if isinstance(output, tuple):
        return (steering.steer(component, output[0]), *output[1:])
    return steering.steer(component, output)


def _output_hook(steering: LayerSteering, component: str):
    def hook(module, args, output):
        if steering.hooked(component):
            output = _edit_output(steering, component, output)
        if steering.capturing(component):
            steering.capture(component, output[0] if isinstance(output, tuple) else output)
        return output
    return hook


def _hidden_argument(args: tuple, kwargs: dict):
    """Where a module's hidden states are: ``("kw", "hidden_states")`` or ``("arg", index)``
    of its first floating-point positional argument (Llama-style layers get ``positions`` first)."""
    if "hidden_states" in kwargs:
        return "kw", "hidden_states"
    return "arg", next(i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point())


def _replace_argument(args: tuple, kwargs: dict, where, value):
    kind, key = where
    if kind == "kw":
        return args, {**kwargs, key: value}
    return (*args[:key], value, *args[key + 1:]), kwargs


def _input_hook(steering: LayerSteering, component: str):
    def hook(module, args, kwargs):
        edit, capture = steering.hooked(component), steering.capturing(component)
        if not (edit or capture):
            return None
        where = _hidden_argument(args, kwargs)
        hidden = kwargs[where[1]] if where[0] == "kw" else args[where[1]]
        if edit:
            hidden = steering.steer(component, hidden)
        if capture:
            steering.capture(component, hidden)
        return _replace_argument(args, kwargs, where, hidden) if edit else None
    return hook


def _fused_block_input_hook(steering: LayerSteering):
    """``layer(positions, hidden, residual)``: edit the stream ``hidden + residual``, pass a zero residual."""
    def hook(module, args, kwargs):
        edit, capture = steering.hooked("block_input"), steering.capturing("block_input")
        if not (edit or capture):
            return None
        positions, hidden, residual = args[:3]
        stream = hidden if residual is None else hidden + residual
        if edit:
            stream = steering.steer("block_input", stream)
        if capture:
            steering.capture("block_input", stream)
        if not edit:
            return None
        residual = None if residual is None else torch.zeros_like(residual)
        return (positions, stream, residual, *args[3:]), kwargs
    return hook


def _fused_block_output_hook(steering: LayerSteering):
    def hook(module, args, output):
        edit, capture = steering.hooked("block_output"), steering.capturing("block_output")
        if not (edit or capture):
            return output
        hidden, residual = output
        stream = hidden + residual
        if edit:
            stream = steering.steer("block_output", stream)
        if capture:
            steering.capture("block_output", stream)
        if not edit:
            return output
        # the edited sum becomes the hidden state; a zero residual keeps the next fused add exact
        return stream, torch.zeros_like(residual)
    return hook


def _qkv_bounds(projection: nn.Module, part: str) -> tuple[int, int]:
    """Columns of ``part`` in this rank's output of a fused QKV projection (vLLM's ``QKVParallelLinear``)."""
    q = projection.num_heads * projection.head_size
    kv = projection.num_kv_heads * projection.head_size
    return {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + kv + projection.num_kv_heads * projection.v_head_size)}[part]


def _qkv_hook(steering: LayerSteering, component: str, bounds: tuple[int, int]):
    start, stop = bounds

    def hook(module, args, output):
        edit, capture = steering.hooked(component), steering.capturing(component)
        if not (edit or capture):
            return output
        qkv = output[0] if isinstance(output, tuple) else output
        if edit:
            qkv[..., start:stop] = steering.steer(component, qkv[..., start:stop])
        if capture:
            steering.capture(component, qkv[..., start:stop])
        return output
    return hook


def _gated_activation_hook(steering: LayerSteering, component: str):
    """``act_and_mul([gate, up]) = act(gate) * up``: edit ``act(gate)``, then multiply by ``up``."""
    def hook(module, args, output):
        edit, capture = steering.hooked(component), steering.capturing(component)
        if not (edit or capture):
            return output
        gate, up = args[0].chunk(2, dim=-1)
        activated = module.forward(torch.cat([gate, torch.ones_like(up)], dim=-1))  # act(gate) * 1, no hooks
        if edit:
            activated = steering.steer(component, activated)
        if capture:
            steering.capture(component, activated)
        return activated * up if edit else output
    return hook


def _unshare_site_modules(layers, table: ArchitectureTable) -> None:
    """Give every layer its own copy of a site module that several layers hold as one object: vLLM's
    ``get_act_fn`` hands every layer the same cached activation instance (GPT-2's ``mlp.act``), and a
    hook on it would fire at every layer. Runs before any hook exists (a deep copy keeps none)."""
    owner: dict[int, nn.Module] = {}
    for layer in layers:
        for path in {site.module for site in table.sites.values() if site.module}:
            module = layer.get_submodule(path)
            if owner.setdefault(id(module), layer) is not layer and not any(True for _ in module.parameters()):
                parent, _, name = path.rpartition(".")
                setattr(layer.get_submodule(parent) if parent else layer, name, copy.deepcopy(module))


def _install_layer_hooks(layer: nn.Module, steering: LayerSteering, table: ArchitectureTable) -> None:
    for component in steering.components:
        site = table.sites[component]
        module = layer.get_submodule(site.module)
        if component == "block_output" and table.fused_residual:
            module.register_forward_hook(_fused_block_output_hook(steering))
        elif component == "block_input" and table.fused_residual:
            module.register_forward_pre_hook(_fused_block_input_hook(steering), with_kwargs=True)
        elif site.hook == "output":
            module.register_forward_hook(_output_hook(steering, component))
        elif site.hook == "input":
            module.register_forward_pre_hook(_input_hook(steering, component), with_kwargs=True)
        elif site.hook == "gated":
            module.register_forward_hook(_gated_activation_hook(steering, component))
        else:
            module.register_forward_hook(_qkv_hook(steering, component, _qkv_bounds(module, site.hook)))


def _install_steering(model: nn.Module, vllm_config, table: ArchitectureTable) -> None:
    """Give a freshly built stock model its per-step buffers, per-layer tables and hooks."""
    config = SteerConfig.from_hf_config(vllm_config.model_config.hf_config)
    components = tuple(c for c in config.components if c in table.sites)
    sched = vllm_config.scheduler_config
    max_tokens = max(sched.max_num_batched_tokens, sched.max_num_seqs)
    model.register_buffer("steer_slots", torch.zeros(config.max_columns, max_tokens, dtype=torch.int64),
                          persistent=False)
    model.register_buffer("steer_coef", torch.zeros(config.max_columns, max_tokens, dtype=torch.float32),
                          persistent=False)
    model.steer_step_state = StepState(config, model.steer_slots, model.steer_coef)
    model.steer_capture = CaptureState()
    model.steer_interchange = InterchangeState()
    model.steer_condition = ConditionState()
    widths, heads = component_geometry(vllm_config.model_config.hf_text_config.to_dict())
    layers = model.get_submodule(table.layers)
    model.steer_layers = []
    # this pipeline stage's layers (the others are PPMissingLayer placeholders)
    own = [(i, layer) for i, layer in enumerate(layers) if not is_pipeline_placeholder(layer)]
    _unshare_site_modules([layer for _, layer in own], table)
    for index, layer in own:
        steering = LayerSteering(layer, index, model.steer_step_state, model.steer_capture, model.steer_interchange,
                                 model.steer_condition, widths, components)
        _install_layer_hooks(layer, steering, table)
        model.steer_layers.append(steering)
    model.steer_geometry = {"num_slots": config.num_slots, "max_rank": config.max_rank,
                            "max_columns": config.max_columns, "components": list(components),
                            "architecture_components": list(table.sites),
                            "num_layers": len(layers), "hidden_size": vllm_config.model_config.get_hidden_size(),
                            "widths": {c: widths[c] for c in components},
                            "heads": {c: n for c, n in heads.items() if c in components}}


def _steer_class(architecture: str) -> type:
    """``Steer<architecture>``: the stock vLLM class whose ``__init__`` also installs steering."""
    table = ARCHITECTURES[architecture]
    stock = stock_model_class(table.vllm_class)

    def __init__(self, *, vllm_config, prefix: str = ""):
        with building_as(vllm_config, architecture):
            stock.__init__(self, vllm_config=vllm_config, prefix=prefix)
        _install_steering(self, vllm_config, table)

    return type(steer_class_name(architecture), (stock,), {
        "__init__": __init__, "__module__": __name__,
        "__doc__": f"vLLM's {stock.__name__} with slot-gathered interventions at its hooked components."})


def __getattr__(name: str) -> type:
    """``Steer<Arch>`` classes, built on first use (vLLM's registry imports them by name)."""
    architecture = name[len(STEER_PREFIX):] if name.startswith(STEER_PREFIX) else None
    if architecture not in ARCHITECTURES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    cls = globals()[name] = _steer_class(architecture)
    return cls


def steerable_model(model: nn.Module) -> nn.Module | None:
    """The steerable model inside whatever wrapper the runner holds, or None."""
    for module in (model, getattr(model, "model", None), getattr(model, "module", None)):
        if hasattr(module, "steer_step_state"):
            return module
    return None

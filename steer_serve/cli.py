"""``steer-serve serve | convert | inspect``."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys


def _add_serve(sub) -> None:
    from steer_serve.interventions.base import COMPONENTS

    p = sub.add_parser("serve", help="start the OpenAI-compatible server (also takes every `vllm serve` flag)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter, add_help=False,
                       description="steer-serve's flags are listed first; every other flag is `vllm serve`'s, "
                                   "with vLLM's meaning (tool parsers, chat template, parallelism, ...).")
    p.add_argument("-h", "--help", action=_ServeHelp, help="show steer-serve's and vLLM's serve flags")
    p.add_argument("--model", default=None, help="local HF directory or hub id, also as `serve MODEL` (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--served-model-name", default=None, help="name clients use for the base model (default: dir name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind")
    p.add_argument("--port", type=int, default=8000, help="port to bind (0: a free one, named in the log)")
    p.add_argument("--dtype", default=None, help="model dtype (default: float32 on CPU, auto on GPU)")
    p.add_argument("--max-model-len", type=int, default=2048, help="context length")
    p.add_argument("--max-num-seqs", type=int, default=128, help="max sequences in one engine step")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="token budget of one engine step")
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None,
                   help="disable torch.compile/CUDA graphs (default: on for CPU)")
    p.add_argument("--no-prefix-caching", action="store_true", help="disable vLLM prefix caching")
    p.add_argument("--kv-cache-gb", type=int, default=4, help="KV cache size on CPU (GiB)")
    p.add_argument("--seed", type=int, default=0, help="engine seed")
    p.add_argument("--max-interventions", type=int, default=16, help="device slots for interventions")
    p.add_argument("--max-rank", type=int, default=8, help="largest intervention rank a slot holds")
    p.add_argument("--max-interventions-per-request", type=int, default=4, help="interventions one request may combine")
    p.add_argument("--intervention-components", nargs="+", default=list(COMPONENTS), choices=COMPONENTS,
                   help="components whose layers get slot tables")
    p.add_argument("--max-loras", type=int, default=0,
                   help="weight-space adapters (PEFT LoRA, GIFT) served in one batch; 0 disables them")
    p.add_argument("--max-lora-rank", type=int, default=16, choices=(8, 16, 32, 64, 128, 256),
                   help="largest LoRA rank (vLLM's --max-lora-rank)")
    p.add_argument("--interventions", nargs="*", default=[], metavar="NAME=PATH",
                   help="preload interventions (trusted operator paths)")
    p.add_argument("--intervention-positions", default=None, help="positions for preloaded pyreft dirs (e.g. l1)")
    p.add_argument("--allowed-intervention-dir", action="append", default=[], metavar="DIR",
                   help="directory local sources may come from (repeatable); none = no local sources over HTTP")
    p.add_argument("--no-hub", action="store_true", help="refuse hub ids as intervention sources")
    p.add_argument("--registry-dir", default=None, help="where registered interventions persist (default: cache)")
    p.add_argument("--shared-registry", action="store_true",
                   help="replicas share --registry-dir (a directory on shared storage): each change is a locked "
                        "read-modify-write, and each replica follows the others' changes")
    p.add_argument("--registry-store", default=None, metavar="URL",
                   help="a networked store the replicas of a fleet share (redis://host:port/db); --registry-dir "
                        "then only holds this replica's local copies of the weights")
    p.add_argument("--registry-poll-interval", type=float, default=1.0,
                   help="seconds between checks of a shared registry for other replicas' changes")
    p.add_argument("--api-key", default=os.environ.get("STEER_SERVE_API_KEY"),
                   help="bearer key for /v1/* (env STEER_SERVE_API_KEY)")
    p.add_argument("--admin-api-key", default=os.environ.get("STEER_SERVE_ADMIN_API_KEY"),
                   help="bearer key for intervention management (env STEER_SERVE_ADMIN_API_KEY)")
    p.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask")
    p.add_argument("--max-capture-sites", type=int, default=8, help="sites one request may `capture`; beyond: 400")
    p.add_argument("--max-capture-bytes", type=int, default=64 * 1024 * 1024,
                   help="bytes of captured activations one response may carry (counted at the most positions a "
                        "site can match); beyond: 400")
    p.add_argument("--max-concurrent-requests", type=int, default=256, help="beyond this: 429 with Retry-After")
    p.add_argument("--max-concurrent-sequences", type=int, default=None,
                   help="sequences (prompts x n) in flight; beyond this: 429 (default: 2 x --max-num-seqs)")
    p.add_argument("--max-sequences-per-request", type=int, default=None,
                   help="sequences (prompts x n) one request may ask for; beyond: 400 (default: --max-num-seqs / 2)")
    p.add_argument("--http-header-timeout", type=float, default=10.0,
                   help="seconds a client has to send a request's headers; then 408 and the connection is closed")
    p.add_argument("--http-keep-alive-timeout", type=int, default=75,
                   help="seconds an idle keep-alive connection stays open between requests (longer than "
                        "clients keep idle connections, so a reused connection is never closed under them)")
    p.add_argument("--http-body-timeout", type=float, default=60.0,
                   help="seconds a client has to send a request's body once its headers are in; then 408 and close")
    p.add_argument("--max-header-bytes", type=int, default=16384,
                   help="largest request head (request line + headers); beyond: 400")
    p.add_argument("--max-body-bytes", type=int, default=2 * 1024 * 1024, help="largest JSON request body")
    p.add_argument("--max-upload-bytes", type=int, default=64 * 1024 * 1024, help="largest uploaded weight file")
    p.add_argument("--max-placements", type=int, default=256, help="most placements (edits) one intervention may have")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds in-flight requests get on SIGTERM")
    p.add_argument("--engine-stall-timeout", type=float, default=30.0,
                   help="/health answers 503 when the engine does not answer a round trip within this many seconds")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser requests from this origin (repeatable; '*' for any); CORS is off without it")


class _ServeHelp(argparse.Action):
    """``serve --help``: steer-serve's flags, then ``vllm serve``'s (accepted as they are)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from steer_serve.api.vllm_frontend import vllm_serve_help

        print(parser.format_help())
        print("\n=== vLLM serve flags (passed to vLLM unchanged) ===\n")
        print(vllm_serve_help())
        parser.exit()


def _serve(args, vllm_flags: list[str]) -> None:
    from steer_serve.api.server import ServerSettings, serve
    from steer_serve.api.vllm_frontend import frontend_args
    from steer_serve.engine.config import SteerConfig
    from steer_serve.engine.engine import EngineSettings, served_model_name
    from steer_serve.model import resolve_model

    preload = {}
    for item in args.interventions:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            sys.exit(f"--interventions expects NAME=PATH, got {item!r}")
        preload[name] = path
    model = resolve_model(args.model)
    name = served_model_name(EngineSettings(model=model, served_model_name=args.served_model_name))
    vllm_args = frontend_args(model, name, vllm_flags)
    engine_settings = EngineSettings(
        model=model, served_model_name=name, vllm_args=vllm_args, dtype=args.dtype,
        enforce_eager=args.enforce_eager, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=not args.no_prefix_caching,
        kv_cache_gb=args.kv_cache_gb, seed=args.seed, max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
        steer=SteerConfig(num_slots=args.max_interventions, max_rank=args.max_rank,
                          max_columns=args.max_interventions_per_request,
                          components=tuple(args.intervention_components)))
    settings = ServerSettings(
        host=args.host, port=args.port, allowed_dirs=args.allowed_intervention_dir, preload=preload,
        preload_positions=args.intervention_positions, api_key=args.api_key, admin_api_key=args.admin_api_key,
        allow_hub=not args.no_hub, registry_dir=args.registry_dir,
        shared_registry=args.shared_registry, registry_store=args.registry_store,
        registry_poll_interval=args.registry_poll_interval,
        max_tokens_limit=args.max_tokens_limit,
        max_capture_sites=args.max_capture_sites, max_capture_bytes=args.max_capture_bytes,
        max_concurrent_requests=args.max_concurrent_requests,
        max_concurrent_sequences=args.max_concurrent_sequences or 2 * args.max_num_seqs,
        max_sequences_per_request=args.max_sequences_per_request or max(1, args.max_num_seqs // 2),
        http_header_timeout=args.http_header_timeout, http_body_timeout=args.http_body_timeout,
        http_keep_alive_timeout=args.http_keep_alive_timeout,
        max_header_bytes=args.max_header_bytes, max_body_bytes=args.max_body_bytes,
        max_upload_bytes=args.max_upload_bytes, max_placements=args.max_placements,
        cors_origins=args.cors_origin, drain_timeout=args.drain_timeout,
        engine_stall_timeout=args.engine_stall_timeout, vllm_args=vllm_args)
    asyncio.run(serve(engine_settings, settings))


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="write any supported intervention source in the native format")
    p.add_argument("src", help="pyreft/pyvene/native directory, control-vector file or hub id")
    p.add_argument("dst", help="target directory (native: intervention.json + weights.safetensors)")
    p.add_argument("--format", default="auto", help="source format (auto, native, pyreft, pyvene, gguf, "
                   "steering_vectors, caa)")
    p.add_argument("--positions", default=None, help="positions to record (pyreft dirs do not store them)")
    p.add_argument("--act-fn", default=None, help="pyreft act_fn (not stored by pyreft)")
    p.add_argument("--operator", default=None,
                   help="control-vector files: addition, ablation, ablation_then_addition")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")


def _convert(args) -> None:
    from steer_serve.formats import describe_intervention, load_intervention
    from steer_serve.formats.native import save_native

    iv = load_intervention(args.src, format=args.format, positions=args.positions, act_fn=args.act_fn,
                          operator=args.operator)
    save_native(iv, args.dst, overwrite=args.overwrite)
    summary = describe_intervention(iv)
    print(f"wrote {args.dst}: {len(iv.edits)} edit(s), families {', '.join(summary['families'])}, "
          f"{summary['num_parameters']} parameters")


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="print families, placements, shapes and parameter count")
    p.add_argument("path", help="intervention directory, control-vector file (.gguf, .pt, .safetensors) or hub id")
    p.add_argument("--format", default="auto", help="source format")
    p.add_argument("--operator", default=None,
                   help="control-vector files: addition, ablation, ablation_then_addition")
    p.add_argument("--json", action="store_true", help="print JSON")
    width = p.add_mutually_exclusive_group()
    width.add_argument("--hidden-size", type=int, default=None,
                       help="the base model's hidden size (for directories that store no tensor, e.g. ZeroIntervention)")
    width.add_argument("--model", default=None, metavar="DIR",
                       help="base model directory: hidden size and layer count from its config.json")


def _model_geometry(model_dir: str) -> dict:
    """``hidden_size``, ``num_layers`` and per-component ``widths``/``heads`` from a model's ``config.json``."""
    from pathlib import Path

    from steer_serve.engine.architectures import component_geometry

    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except OSError as exc:
        raise ValueError(f"cannot read the model's config.json: {exc}") from exc
    cfg = cfg.get("text_config", cfg)  # multimodal wrappers (Gemma 3) nest the text model's config
    hidden = cfg.get("hidden_size", cfg.get("n_embd"))
    if not isinstance(hidden, int):
        raise ValueError(f"{model_dir}/config.json has no integer hidden_size")
    widths, heads = component_geometry(cfg)
    return {"hidden_size": hidden, "num_layers": cfg.get("num_hidden_layers", cfg.get("n_layer")),
            "widths": widths, "heads": heads}


def _inspect(args) -> None:
    from steer_serve.formats import describe_intervention, load_intervention

    geometry = _model_geometry(args.model) if args.model else {"hidden_size": args.hidden_size}
    summary = describe_intervention(load_intervention(args.path, format=args.format, operator=args.operator,
                                                      **geometry))
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"format {summary['source_format']}, hidden size {summary['hidden_size']}, positions "
          f"{summary['positions']}, scale {summary['scale']}, {summary['num_parameters']} parameters")
    for edit in summary["edits"]:
        place = edit["placement"]
        head = f" head {place['head']}" if place["head"] is not None else ""
        window = f" ({edit['window']} positions)" if edit["window"] else ""
        shapes = ", ".join(f"{n} {tuple(p['shape'])} {p['dtype']}" for n, p in edit["params"].items())
        print(f"  {edit['family']:<24} layer {place['layer']:>3} {place['component']}{head}{window}: {shapes}")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``steer-serve`` console script."""
    parser = argparse.ArgumentParser(prog="steer-serve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    _add_convert(sub)
    _add_inspect(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) > 1 and argv[0] == "serve" and not argv[1].startswith("-"):
        argv[1:2] = ["--model", argv[1]]           # `serve MODEL ...`, as `vllm serve MODEL ...`
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command != "serve":
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "serve":
            _serve(args, unknown)
        else:
            {"convert": _convert, "inspect": _inspect}[args.command](args)
    except ValueError as exc:  # format/validation errors: a clear message, not a traceback
        sys.exit(f"steer-serve {args.command}: {exc}")


if __name__ == "__main__":
    main()

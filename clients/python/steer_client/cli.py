"""``steer-client``: chat or complete with an intervention (streaming), and manage interventions."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from steer_client.client import Client
from steer_client.errors import SteerServeError


def _steering(args) -> dict:
    fields = {"intervention": args.intervention, "model": args.model, "max_tokens": args.max_tokens,
              "temperature": args.temperature}
    if args.scale is not None or args.positions is not None:
        fields["intervention_scale"], fields["intervention_positions"] = args.scale, args.positions
    return {k: v for k, v in fields.items() if v is not None}


def _read_prompt(args) -> str | None:
    if args.prompt:
        return " ".join(args.prompt)
    return None if sys.stdin.isatty() else sys.stdin.read()


def _chat(client: Client, args) -> None:
    history = [{"role": "system", "content": args.system}] if args.system else []
    prompt = _read_prompt(args)
    while True:
        if prompt is None:
            try:
                prompt = input("> ")
            except EOFError:
                return
        history.append({"role": "user", "content": prompt})
        answer = _say(client.chat(history, stream=not args.no_stream, **_steering(args)), not args.no_stream)
        history.append({"role": "assistant", "content": answer})
        if args.prompt or not sys.stdin.isatty():
            return
        prompt = None


def _say(result, streamed: bool) -> str:
    """Print a chat answer as it arrives; return its text."""
    if not streamed:
        text = result.choices[0].message.content or ""
        print(text)
        return text
    parts = []
    for chunk in result:
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
            print(choice.delta.content or "", end="", flush=True)
    print()
    return "".join(parts)


def _complete(client: Client, args) -> None:
    prompt = _read_prompt(args) or ""
    if args.no_stream:
        print(client.complete(prompt, **_steering(args)).choices[0].text)
        return
    for chunk in client.complete(prompt, stream=True, **_steering(args)):
        print("".join(c.text for c in chunk.choices), end="", flush=True)
    print()


def _show(obj, as_json: bool) -> None:
    if as_json:
        print(json.dumps(getattr(obj, "raw", None) or dataclasses.asdict(obj), indent=2))
        return
    print(f"{obj.id:<32} {obj.status:<7} slot={obj.slot} positions={obj.positions} scale={obj.scale} "
          f"families={','.join(obj.families)} layers={','.join(map(str, obj.layers))}")


def _list(client: Client, args) -> None:
    items = client.interventions.list()
    if args.json:
        print(json.dumps([i.raw for i in items], indent=2))
        return
    for item in items:
        _show(item, False)


def _models(client: Client, args) -> None:
    for model in client.models():
        print(model.id if model.parent is None else f"{model.id}  (intervention on {model.parent})")


def _register(client: Client, args) -> None:
    _show(client.interventions.register(args.id, args.source, format=args.format, positions=args.positions,
                                        scale=args.scale, act_fn=args.act_fn, replace=args.replace), args.json)


def _upload(client: Client, args) -> None:
    _show(client.interventions.upload(args.id, args.dir, positions=args.positions, scale=args.scale,
                                      replace=args.replace), args.json)


def _get(client: Client, args) -> None:
    _show(client.interventions.get(args.id), args.json)


def _patch(client: Client, args) -> None:
    _show(client.interventions.patch(args.id, scale=args.scale, positions=args.positions), args.json)


def _delete(client: Client, args) -> None:
    client.interventions.delete(args.id, force=args.force)
    print(f"deleted {args.id}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="steer-client", description=__doc__)
    p.add_argument("--base-url", default=None, help="server URL (env STEER_SERVE_URL, default http://127.0.0.1:8000)")
    p.add_argument("--api-key", default=None, help="bearer key (env STEER_SERVE_API_KEY)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    sub = p.add_subparsers(dest="command", required=True)
    for name, fn, doc in (("chat", _chat, "chat (interactive without a prompt on a terminal)"),
                          ("complete", _complete, "text completion")):
        c = sub.add_parser(name, help=doc)
        c.set_defaults(fn=fn)
        c.add_argument("prompt", nargs="*", help="the prompt (default: stdin, or interactive for chat)")
        c.add_argument("-i", "--intervention", help="intervention id to apply")
        c.add_argument("-m", "--model", help="model name (the base model or an intervention id)")
        c.add_argument("--scale", type=float, help="override the intervention's scale")
        c.add_argument("--positions", help="override the intervention's positions (l1, f1+l1, all, ...)")
        c.add_argument("--max-tokens", type=int, default=256, help="new tokens at most")
        c.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
        c.add_argument("--no-stream", action="store_true", help="wait for the whole answer")
        if name == "chat":
            c.add_argument("--system", help="system message")
    sub.add_parser("models", help="list the base model and interventions").set_defaults(fn=_models)
    lst = sub.add_parser("list", help="list registered interventions")
    lst.set_defaults(fn=_list)
    lst.add_argument("--json", action="store_true", help="print JSON")
    reg = sub.add_parser("register", help="register a server-side path or hub id")
    reg.set_defaults(fn=_register)
    reg.add_argument("id")
    reg.add_argument("source", help="path inside the server's --allowed-intervention-dir, or a hub id")
    reg.add_argument("--format", default="auto", choices=["auto", "native", "pyreft", "pyvene"])
    reg.add_argument("--act-fn", help="pyreft act_fn (pyreft does not save it)")
    up = sub.add_parser("upload", help="upload a local native intervention directory")
    up.set_defaults(fn=_upload)
    up.add_argument("id")
    up.add_argument("dir", help="directory with intervention.json and weights.safetensors")
    for c in (reg, up):
        c.add_argument("--positions", help="positions (pyreft dirs do not record them)")
        c.add_argument("--scale", type=float, help="default scale")
        c.add_argument("--replace", action="store_true", help="replace an existing id")
    get = sub.add_parser("get", help="describe one intervention")
    get.set_defaults(fn=_get)
    get.add_argument("id")
    pat = sub.add_parser("patch", help="change default scale/positions")
    pat.set_defaults(fn=_patch)
    pat.add_argument("id")
    pat.add_argument("--scale", type=float)
    pat.add_argument("--positions")
    for c in (reg, up, get, pat):
        c.add_argument("--json", action="store_true", help="print the server's JSON")
    rm = sub.add_parser("delete", help="delete an intervention")
    rm.set_defaults(fn=_delete)
    rm.add_argument("id")
    rm.add_argument("--force", action="store_true", help="wait for in-flight requests instead of 409")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``steer-client`` console script."""
    args = _parser().parse_args(argv)
    try:
        with Client(args.base_url, api_key=args.api_key, timeout=args.timeout) as client:
            args.fn(client, args)
    except SteerServeError as exc:
        print(f"steer-client: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

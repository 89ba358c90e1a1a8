"""``steer-loadtest``: load a steer-serve server with a mix of interventions; JSON results and PNG plots."""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import socket
import sys
from pathlib import Path
from urllib.parse import urlsplit

from steer_client import SteerServeError
from steer_client.client import base_url_of
from steer_loadtest.harness import LoadConfig, run_loadtest
from steer_loadtest.workload import LengthDist


def is_loopback(url: str) -> bool:
    """True when every address the URL's host resolves to is a loopback address."""
    host = urlsplit(url).hostname or ""
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="steer-loadtest", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base-url", default=None, help="server URL (env STEER_SERVE_URL, default http://127.0.0.1:8000)")
    p.add_argument("--api-key", default=None, help="bearer key (env STEER_SERVE_API_KEY)")
    p.add_argument("--allow-remote", action="store_true", help="allow a target that is not a loopback address")
    load = p.add_mutually_exclusive_group(required=True)
    load.add_argument("--rate", type=float, help="open loop: Poisson arrivals, requests per second")
    load.add_argument("--concurrency", type=int, help="closed loop: requests kept in flight")
    p.add_argument("--num-requests", type=int, default=None, help="stop sending after this many requests")
    p.add_argument("--duration", type=float, default=None, help="stop sending after this many seconds")
    p.add_argument("--interventions", nargs="*", default=[], metavar="ID", help="intervention ids to mix")
    p.add_argument("-k", "--num-interventions", type=int, default=None,
                   help="mix the first K registered interventions (when --interventions is not given)")
    p.add_argument("--mix", choices=["uniform", "zipf"], default="uniform", help="popularity of the K interventions")
    p.add_argument("--zipf-s", type=float, default=1.1, help="Zipf exponent")
    p.add_argument("--none-fraction", type=float, default=0.0, help="share of requests with no intervention")
    p.add_argument("--prompt-len", default="32", help="prompt tokens: N, uniform:A:B or normal:MEAN:STD")
    p.add_argument("--output-len", default="32", help="new tokens: N, uniform:A:B or normal:MEAN:STD")
    p.add_argument("--no-ignore-eos", action="store_true", help="let requests stop at EOS (output length varies)")
    p.add_argument("--verify", type=int, default=0, metavar="N",
                   help="re-run N finished requests solo and report greedy token mismatches (exit 2 if any)")
    p.add_argument("--seed", type=int, default=0, help="workload seed")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--out", default="loadtest.json", help="results JSON")
    p.add_argument("--plot", default=None, help="latency CDF PNG (default: --out with .png)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--quiet", action="store_true", help="no live progress line")
    return p


def _config(args) -> LoadConfig:
    if args.num_requests is None and args.duration is None:
        raise ValueError("give --num-requests and/or --duration")
    for text in (args.prompt_len, args.output_len):
        LengthDist.parse(text)
    return LoadConfig(base_url=base_url_of(args.base_url), rate=args.rate, concurrency=args.concurrency,
                      num_requests=args.num_requests, duration=args.duration, interventions=args.interventions,
                      num_interventions=args.num_interventions, mix=args.mix, zipf_s=args.zipf_s,
                      none_fraction=args.none_fraction, prompt_len=args.prompt_len, output_len=args.output_len,
                      ignore_eos=not args.no_ignore_eos, verify=args.verify, seed=args.seed, api_key=args.api_key,
                      timeout=args.timeout)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.1f}"


def print_summary(report: dict, file=sys.stdout) -> None:
    """A short human-readable summary of a report."""
    req, thr = report["requests"], report["throughput"]
    print(f"requests {req['ok']}/{req['sent']} ok in {report['wall_s']:.1f}s; output {thr['output_tok_s']:.1f} tok/s, "
          f"{thr['requests_s']:.2f} req/s; errors {report['errors_by_status'] or 'none'}", file=file)
    for name in ("ttft_s", "tpot_s", "latency_s"):
        d = report[name]
        print(f"  {name[:-2]:<8} ms  p50 {_ms(d['p50'])}  p90 {_ms(d['p90'])}  p99 {_ms(d['p99'])}", file=file)
    if "verify" in report:
        v = report["verify"]
        print(f"verify: {v['checked']} re-run solo, {v['mismatched']} mismatched", file=file)
        for m in v["mismatches"]:
            print(f"  MISMATCH request {m['index']} ({m['intervention'] or 'none'}) at token {m['first_difference']}: "
                  f"batched {m['batched_ids']} vs solo {m['solo_ids']}", file=file)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``steer-loadtest`` console script."""
    args = _parser().parse_args(argv)
    try:
        cfg = _config(args)
    except ValueError as exc:
        print(f"steer-loadtest: {exc}", file=sys.stderr)
        return 1
    if not args.allow_remote and not is_loopback(cfg.base_url):
        print(f"steer-loadtest: {cfg.base_url} is not a loopback address; pass --allow-remote to load it",
              file=sys.stderr)
        return 1
    try:
        report, results = asyncio.run(run_loadtest(cfg, progress_stream=None if args.quiet else sys.stderr))
    except (ValueError, OSError, SteerServeError) as exc:
        print(f"steer-loadtest: {exc}", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not args.no_plot:
        from steer_loadtest.plots import latency_cdf

        plot = Path(args.plot) if args.plot else out.with_suffix(".png")
        report["plot"] = str(latency_cdf(results, plot, f"steer-loadtest {cfg.base_url}"))
    out.write_text(json.dumps(report, indent=2))
    print_summary(report)
    print(f"wrote {out}" + (f" and {report['plot']}" if "plot" in report else ""))
    return 2 if report.get("verify", {}).get("mismatched") else 0


if __name__ == "__main__":
    sys.exit(main())

"""Send the workload: open-loop Poisson arrivals or closed-loop concurrency, streaming every request."""
from __future__ import annotations

import asyncio
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from steer_client import AsyncClient, SteerServeError
from steer_loadtest.workload import RequestSpec


@dataclass
class Result:
    """What one request did; times are seconds since the run started."""

    index: int
    intervention: str | None
    prompt_tokens: int
    max_tokens: int
    start: float
    end: float = 0.0
    first_token: float | None = None
    token_ids: list[int] = field(default_factory=list)
    status: str = "ok"  # "ok", an HTTP status ("429"), "connection" or "stream"
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.start

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        n = len(self.token_ids)
        return None if self.first_token is None or n < 2 else (self.end - self.first_token) / (n - 1)

    @property
    def latency(self) -> float:
        return self.end - self.start


def request_fields(spec: RequestSpec, ignore_eos: bool) -> dict:
    """The completion request for ``spec`` (greedy; token ids back so runs can be compared)."""
    fields = {"max_tokens": spec.max_tokens, "temperature": 0, "ignore_eos": ignore_eos, "return_token_ids": True}
    if spec.intervention is not None:
        fields["intervention"] = spec.intervention
    return fields


async def send_one(client: AsyncClient, spec: RequestSpec, t0: float, ignore_eos: bool) -> Result:
    """Stream one request, recording time to first token, end time and the generated token ids."""
    result = Result(spec.index, spec.intervention, len(spec.prompt), spec.max_tokens, time.perf_counter() - t0)
    try:
        stream = await client.complete(spec.prompt, stream=True, **request_fields(spec, ignore_eos))
        async for chunk in stream:
            for choice in chunk.choices:
                if choice.token_ids:
                    if result.first_token is None:
                        result.first_token = time.perf_counter() - t0
                    result.token_ids.extend(choice.token_ids)
    except SteerServeError as exc:
        result.status = str(exc.status) if exc.status else "connection"
        result.error = exc.message
    except Exception as exc:  # a malformed stream counts as an error of this request, not of the run
        result.status, result.error = "stream", f"{type(exc).__name__}: {exc}"
    result.end = time.perf_counter() - t0
    return result


@dataclass
class Progress:
    """Counters behind the live progress line."""

    sent: int = 0
    done: int = 0
    errors: int = 0
    tokens: int = 0

    def add(self, result: Result) -> None:
        self.done += 1
        self.errors += not result.ok
        self.tokens += len(result.token_ids)

    def line(self, elapsed: float) -> str:
        rate = self.tokens / elapsed if elapsed > 0 else 0.0
        return (f"\r[{elapsed:6.1f}s] sent {self.sent} done {self.done} in-flight {self.sent - self.done} "
                f"errors {self.errors} out {self.tokens} tok ({rate:.1f} tok/s)  ")


async def _report(progress: Progress, t0: float, stream) -> None:
    while True:
        stream.write(progress.line(time.perf_counter() - t0))
        stream.flush()
        await asyncio.sleep(0.5)


def _within(n: int, t0: float, num_requests: int | None, duration: float | None) -> bool:
    return (num_requests is None or n < num_requests) and (duration is None or time.perf_counter() - t0 < duration)


async def run(client: AsyncClient, specs: Iterator[RequestSpec], *, rate: float | None = None,
              concurrency: int | None = None, num_requests: int | None = None, duration: float | None = None,
              ignore_eos: bool = True, seed: int = 0, progress_stream=sys.stderr) -> tuple[list[Result], float]:
    """Run until ``num_requests`` are sent or ``duration`` seconds pass, then wait for the in-flight ones.

    Exactly one of ``rate`` (open loop: Poisson arrivals, requests/s) and ``concurrency`` (closed loop)
    is given. Returns the results in request order and the wall time of the whole run.
    """
    if (rate is None) == (concurrency is None):
        raise ValueError("give exactly one of rate (open loop) and concurrency (closed loop)")
    if num_requests is None and duration is None:
        raise ValueError("give num_requests and/or duration")
    progress, t0 = Progress(), time.perf_counter()
    reporter = asyncio.create_task(_report(progress, t0, progress_stream)) if progress_stream else None

    async def one(spec: RequestSpec) -> Result:
        progress.sent += 1
        result = await send_one(client, spec, t0, ignore_eos)
        progress.add(result)
        return result

    try:
        if rate is not None:
            results = await _open_loop(one, specs, rate, num_requests, duration, t0, random.Random(seed))
        else:
            results = await _closed_loop(one, specs, concurrency, num_requests, duration, t0)
    finally:
        if reporter:
            reporter.cancel()
            progress_stream.write(progress.line(time.perf_counter() - t0) + "\n")
    return sorted(results, key=lambda r: r.index), time.perf_counter() - t0


async def _open_loop(one, specs, rate: float, num_requests, duration, t0: float, rng: random.Random) -> list[Result]:
    tasks, arrival = [], 0.0
    while _within(len(tasks), t0, num_requests, duration):
        await asyncio.sleep(max(0.0, t0 + arrival - time.perf_counter()))
        if duration is not None and arrival >= duration:
            break
        tasks.append(asyncio.create_task(one(next(specs))))
        arrival += rng.expovariate(rate)
    return list(await asyncio.gather(*tasks))


async def _closed_loop(one, specs, concurrency: int, num_requests, duration, t0: float) -> list[Result]:
    results: list[Result] = []
    started = 0

    async def worker():
        nonlocal started
        while _within(started, t0, num_requests, duration):
            started += 1
            results.append(await one(next(specs)))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results

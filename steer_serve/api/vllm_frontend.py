"""vLLM's own OpenAI serving layer, used as it is: the one place the API touches ``vllm.entrypoints``.

steer-serve does not re-implement the OpenAI surface. Completions, chat completions, responses,
tokenize/detokenize and version are vLLM's handlers (so every field, parser and response format a
vLLM release brings comes with it); the steering layer (``routes_openai``) only resolves the
intervention fields, pins slots, and puts them where vLLM already carries per-request data
(``vllm_xargs`` → ``SamplingParams.extra_args``, ``cache_salt``, a LoRA name as ``model``).

What this module relies on in vLLM 0.32 (re-check on upgrade; importing ``engine.vllm_internals``
refuses other releases):

* ``launchers.cli_args.make_arg_parser`` / ``validate_parsed_serve_args``: ``vllm serve``'s flags;
* ``launchers.api_server.app_state.init_app_state``: builds the serving objects on ``app.state``
  (``openai_serving_completion``, ``openai_serving_chat``, ``openai_serving_responses``,
  ``serving_tokenization``, ``openai_serving_models``) — the handlers below read them from there;
* the route functions ``create_completion``, ``create_chat_completion``, ``create_responses``,
  ``retrieve_responses``, ``cancel_responses``, ``tokenize``, ``detokenize``, ``show_version``
  (each takes ``(request model, raw_request)`` and returns a response object);
* ``OpenAIServingModels.lora_requests`` (name → ``LoRARequest``) for adapters named by ``model``;
* the request models' ``vllm_xargs``, ``cache_salt`` and ``model`` fields;
* ``serve.exception_handling.error_response.create_error_response``: vLLM's status for an exception;
* ``v1.metrics.prometheus.get_prometheus_registry`` for the ``vllm:`` metrics;
* online beam search calling ``engine_client.generate`` once per beam and step, with request ids
  ``<request>-<random hex>-beam-<i>`` and the original prompt's ``cache_salt`` (:func:`_steer_beam_search`).
"""
from __future__ import annotations

import contextvars
import dataclasses
import functools
import re
from argparse import Namespace

from prometheus_client import generate_latest
from pydantic import ConfigDict, model_validator
from vllm.entrypoints.openai.chat_completion.api_router import create_chat_completion
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest, ChatCompletionResponse
from vllm.entrypoints.openai.completion.api_router import create_completion
from vllm.entrypoints.openai.completion.protocol import CompletionRequest, CompletionResponse
from vllm.entrypoints.openai.responses.api_router import cancel_responses, create_responses, retrieve_responses
from vllm.entrypoints.openai.responses.protocol import ResponsesRequest, ResponsesResponse
from vllm.entrypoints.serve.instrumentator.basic import show_version
from vllm.entrypoints.serve.tokenize.api_router import detokenize, tokenize
from vllm.entrypoints.serve.tokenize.protocol import (
    DetokenizeRequest, DetokenizeResponse, TokenizeChatRequest, TokenizeCompletionRequest, TokenizeResponse,
)

from steer_serve.api.errors import APIError
from steer_serve.api.schemas import SteeringFields
from steer_serve.engine.config import RequestSteering
from steer_serve.engine import vllm_internals  # noqa: F401  (refuses an unsupported vLLM on import)


@functools.cache
def _known_fields(model) -> frozenset[str]:
    """A request model's field names and aliases (computed once per class, not per request)."""
    return frozenset(model.model_fields) | {f.alias for f in model.model_fields.values() if f.alias}


#: Fields vLLM's router (vllm-router, from SGLang's) adds to every request it forwards, with the value
#: that asks for nothing: accepted at that value (they are honoured), refused at any other.
ROUTER_NO_OP_FIELDS = {"no_stop_trim": False, "return_hidden_states": False}


class _KnownFieldsOnly:
    """Refuse top-level fields that neither vLLM nor steer-serve reads (vLLM would log and ignore them)."""

    @model_validator(mode="before")
    @classmethod
    def _refuse_unknown_fields(cls, data):
        if isinstance(data, dict):
            if data.keys() & ROUTER_NO_OP_FIELDS.keys():
                data = {k: v for k, v in data.items()
                        if not (k in ROUTER_NO_OP_FIELDS and v in (None, ROUTER_NO_OP_FIELDS[k]))}
            unknown = sorted(set(data) - _known_fields(cls))
            if unknown:  # not a ValueError: it passes pydantic untouched and answers 400 naming the field
                raise APIError(400, f"unsupported field(s) {', '.join(unknown)}: this server refuses fields it "
                               "does not honour instead of ignoring them (refused, not ignored)",
                               code="unsupported_field", param=unknown[0])
        return data


def _examples(*examples: dict) -> ConfigDict:
    return ConfigDict(json_schema_extra={"examples": list(examples)})


class SteerCompletionRequest(_KnownFieldsOnly, CompletionRequest, SteeringFields):
    """vLLM's ``/v1/completions`` request plus the intervention fields."""

    model_config = _examples(
        {"model": "SmolLM2-135M-Instruct", "prompt": "The capital of France is", "max_tokens": 16,
         "temperature": 0, "intervention": "my-loreft"},
        {"model": "my-loreft", "prompt": "Question: 2+2?\nAnswer: 4", "max_tokens": 0, "echo": True, "logprobs": 1})


class SteerChatCompletionRequest(_KnownFieldsOnly, ChatCompletionRequest, SteeringFields):
    """vLLM's ``/v1/chat/completions`` request plus the intervention fields."""

    model_config = _examples(
        {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "What is the capital of France?"}],
         "max_tokens": 32, "temperature": 0, "interventions": [{"id": "my-loreft", "scale": 0.8}]},
        {"model": "my-loreft", "messages": [{"role": "user", "content": "Pick a colour."}],
         "structured_outputs": {"choice": ["red", "blue"]}, "stream": True})


class SteerResponsesRequest(_KnownFieldsOnly, ResponsesRequest, SteeringFields):
    """vLLM's ``/v1/responses`` request plus the intervention fields."""

    model_config = _examples({"model": "my-loreft", "input": "Tell me about yourself.", "max_output_tokens": 64})


class SteerTokenizeCompletionRequest(_KnownFieldsOnly, TokenizeCompletionRequest):
    """vLLM's ``/tokenize`` request, prompt form."""

    model_config = _examples({"model": "SmolLM2-135M-Instruct", "prompt": "Hello world"})


class SteerTokenizeChatRequest(_KnownFieldsOnly, TokenizeChatRequest):
    """vLLM's ``/tokenize`` request, chat form."""

    model_config = _examples({"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Hi"}]})


def tokenize_request(body: dict) -> SteerTokenizeCompletionRequest | SteerTokenizeChatRequest:
    """vLLM's two ``/tokenize`` forms, told apart by ``messages`` (as a union cannot, with strict fields)."""
    form = SteerTokenizeChatRequest if isinstance(body, dict) and "messages" in body else SteerTokenizeCompletionRequest
    return form.model_validate(body)


class SteerDetokenizeRequest(_KnownFieldsOnly, DetokenizeRequest):
    """vLLM's ``/detokenize`` request."""

    model_config = _examples({"model": "SmolLM2-135M-Instruct", "tokens": [19556, 905]})


#: The vLLM route function serving each kind of steered request.
GENERATION_HANDLERS = {"completion": create_completion, "chat": create_chat_completion,
                       "responses": create_responses}
TOKENIZE, DETOKENIZE, VERSION = tokenize, detokenize, show_version
RETRIEVE_RESPONSE, CANCEL_RESPONSE = retrieve_responses, cancel_responses


def frontend_args(model: str, served_model_name: str, passthrough: list[str]) -> Namespace:
    """``vllm serve``'s parsed flags for ``model``: steer-serve's own plus every passed-through one."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog="steer-serve serve"))
    args = parser.parse_args([model, "--served-model-name", served_model_name, *passthrough])
    validate_parsed_serve_args(args)
    if (args.api_server_count or 1) > 1:
        raise ValueError(f"--api-server-count {args.api_server_count}: steer-serve runs one API process per engine "
                         "(it owns the intervention slot assignment every request is stamped with); for more "
                         "front-end capacity run replicas on one --shared-registry behind a router (deploy/)")
    return args


def vllm_serve_help() -> str:
    """The help text of ``vllm serve`` (its flags are accepted by ``steer-serve serve``)."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser(prog="vllm serve")).format_help()


async def init_frontend(app_state, engine_client, args: Namespace) -> None:
    """Build vLLM's serving objects over ``engine_client`` on ``app_state`` (as ``vllm serve`` does)."""
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state

    _steer_beam_search(engine_client)
    supported_tasks = await engine_client.get_supported_tasks()
    await init_app_state(engine_client, app_state, args, supported_tasks)


#: the steering extra args of the HTTP request being served, for vLLM's beam search (see below)
_BEAM_STEERING: contextvars.ContextVar[dict | None] = contextvars.ContextVar("steer_beam_steering", default=None)
_BEAM_STEP_ID = re.compile(r"^(?P<parent>.+)-[0-9a-f]+-beam-\d+$")


def steer_beam_search(steering: RequestSteering) -> None:
    """Let vLLM's beam search, run by the handler of the current request, carry ``steering``."""
    _BEAM_STEERING.set({"steering": steering, "prompt_lens": {}})


def _steer_beam_search(engine_client) -> None:
    """Wrap ``engine_client.generate`` for vLLM's online beam search (``BeamSearchOnlineMixin``).

    Beam search issues one engine request per beam and step (id ``<request>-<random hex>-beam-<i>``),
    prompt = original prompt + the beam's tokens, with fresh ``SamplingParams`` and the original
    prompt's ``cache_salt``. The wrapper adds the request's steering to each, with the original
    prompt's length (the first step's prompt) so that positions keep their meaning: ``l1`` stays
    the last prompt token and the beam's tokens count as generated.
    """
    generate = engine_client.generate

    async def steered_generate(prompt, sampling_params, request_id, *args, **kwargs):
        steering, step = _BEAM_STEERING.get(), _BEAM_STEP_ID.match(request_id)
        if steering is not None and step is not None:
            prompt_len = steering["prompt_lens"].setdefault(step["parent"], len(prompt["prompt_token_ids"]))
            sampling_params = sampling_params.clone()
            step_steering = dataclasses.replace(steering["steering"], prompt_len=prompt_len)
            sampling_params.extra_args = {**(sampling_params.extra_args or {}), **step_steering.to_extra_args()}
        async for output in generate(prompt, sampling_params, request_id, *args, **kwargs):
            yield output

    engine_client.generate = steered_generate


def offer_lora(app_state, name: str, int_id: int, path: str) -> None:
    """Make ``model: name`` resolve to this LoRA adapter in vLLM's handlers."""
    from vllm.lora.request import LoRARequest

    models = app_state.openai_serving_models
    if name not in models.lora_requests:
        models.lora_requests[name] = LoRARequest(name, int_id, path)


#: Exceptions vLLM's handlers raise for a bad request (vLLM's server maps them to 4xx, as here).
from vllm.exceptions import VLLMError  # noqa: E402

CLIENT_EXCEPTIONS = (VLLMError, ValueError, TypeError, OverflowError, NotImplementedError)


def error_of(exc: Exception) -> tuple[int, str, str | None]:
    """(status, message, param) vLLM's own server answers for ``exc``."""
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

    error = create_error_response(exc).error
    return error.code, error.message, error.param


def vllm_metrics(without: str = "") -> bytes:
    """vLLM's own ``vllm:`` metrics (engine stats: running/waiting, KV cache, tokens, latencies), less the
    metric family named ``without`` (one steer-serve exports in its place)."""
    from vllm.v1.metrics.prometheus import get_prometheus_registry

    text = generate_latest(get_prometheus_registry())
    if not without:
        return text
    return b"".join(line for line in text.splitlines(keepends=True)
                    if not line.split(b"{")[0].split(b" ")[0] == without.encode()
                    and not line.startswith((f"# HELP {without} ".encode(), f"# TYPE {without} ".encode())))
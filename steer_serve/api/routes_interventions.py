"""``/v1/interventions``: register (path, hub id or upload), list, describe, patch, delete."""
from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from pathlib import Path

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from steer_serve.api import derive
from steer_serve.api import openapi_docs as docs
from steer_serve.api.auth import require_admin_key, require_api_key
from steer_serve.api.errors import APIError
from steer_serve.api.schemas import InterventionCreate, InterventionPatch
from steer_serve.formats import load_intervention, locate_source
from steer_serve.formats.adapters import adapter_format, load_weight_adapter
from steer_serve.formats.peft_prompt import load_prompt_adapter, prompt_format
from steer_serve.formats.native import read_native
from steer_serve.formats.validation import validate_intervention

router = APIRouter(prefix="/v1/interventions", tags=["interventions"], responses=docs.errors(401, 500))
_ONE = docs.ok(docs.InterventionObject, docs.INTERVENTION_EXAMPLE)


def describe_entry(state, entry) -> dict:
    """What GET returns for one intervention (or weight-space adapter: ``kind`` says which)."""
    details = entry.details()
    status = entry.status()
    return {**details, "id": entry.id, "object": "intervention", "kind": entry.kind, "created": entry.created,
            "source": entry.source, "format": entry.format, "base_model": state.served_model_name,
            "trained_on": details.get("base_model"), "status": status, "slot": entry.slot,
            "in_flight": entry.refcount, "content_hash": entry.content_hash}


def _limits(state) -> dict:
    geometry = state.registry.geometry
    return {"hidden_size": geometry.hidden_size, "num_layers": geometry.num_layers,
            "max_rank": geometry.max_rank, "max_placements": state.max_placements}


def _reader_hints(state) -> dict:
    """Base-model facts the pyreft/pyvene readers need: each component's width and head count."""
    return {"widths": state.registry.geometry.widths, "heads": state.registry.geometry.heads}


@router.post("", status_code=201, dependencies=[Depends(require_admin_key)],
             summary="Register an intervention (JSON body with a source, or multipart upload of native files)",
             description="`source` is a directory inside `--allowed-intervention-dir` (symlinks resolved, `..` "
                         "refused), or a hub id `org/name[@revision]`; or upload `intervention.json` + "
                         "`weights.safetensors` as multipart/form-data. Pickled weights are only read with "
                         "`torch.load(weights_only=True)`. The registry persists across restarts.",
             responses={**docs.ok(docs.InterventionObject, docs.INTERVENTION_EXAMPLE, "Registered", status=201),
                        **docs.errors(400, 403, 409, 413)},
             openapi_extra={"requestBody": {"content": {
                 "application/json": {"schema": {"$ref": "#/components/schemas/InterventionCreate"}},
                 "multipart/form-data": {"schema": {"type": "object", "required": ["id", "intervention.json",
                                                                                   "weights.safetensors"],
                                                    "properties": {
                     "id": {"type": "string", "description": "the id requests will use"},
                     "positions": {"type": "string", "description": "default positions (overrides the file's)"},
                     "scale": {"type": "number", "description": "default scale (overrides the file's)"},
                     "replace": {"type": "boolean", "description": "swap out an existing id"},
                     "intervention.json": {"type": "string", "format": "binary",
                                           "description": "native metadata file"},
                     "weights.safetensors": {"type": "string", "format": "binary",
                                             "description": "native weights file (at most --max-upload-bytes)"}}},
                     "encoding": {"intervention.json": {"contentType": "application/json"},
                                  "weights.safetensors": {"contentType": "application/octet-stream"}}}}}})
async def create_intervention(request: Request):
    state = request.app.state.steer
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        body, iv, source, fmt = await _from_upload(request, state)
    else:
        try:
            body = InterventionCreate.model_validate(json.loads(await request.body() or b"null"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise APIError(400, f"request body is not valid JSON: {str(exc)[:200]}", code="invalid_json") from None
        if (body.source is None) == (body.derive is None):
            raise APIError(400, "give exactly one of `source` and `derive`", code="invalid_value", param="source")
        if body.derive is not None:
            return await _derived(body, state)
        directory = await asyncio.to_thread(locate_source, body.source, allowed_dirs=state.allowed_dirs,
                                            allow_hub=state.allow_hub)
        if prompt_format(directory):
            return await _register_prompt(state, body, directory)
        if body.task_id is not None:
            raise APIError(400, "task_id is only for PEFT multitask prompt tuning adapters", code="invalid_value",
                           param="task_id")
        if adapter_format(directory):
            if body.operator is not None:
                raise APIError(400, "operator applies to control-vector files, not to a weight-space adapter",
                               code="unknown_operator", param="operator")
            if not state.registry.max_loras:
                raise APIError(400, "this server serves no weight-space adapters (PEFT LoRA / GIFT); start it with "
                               "--max-loras N", code="adapters_disabled", param="source")
            adapter = await asyncio.to_thread(load_weight_adapter, directory, state.registry.adapters_dir,
                                              base_model_dir=state.model_path, max_rank=state.registry.max_lora_rank,
                                              prompt_embeds=state.prompt_embedder is not None)
            entry = await state.registry.register_adapter(body.id, adapter, source=body.source, replace=body.replace)
            return JSONResponse(describe_entry(state, entry), status_code=201)
        state.registry.geometry.require_interventions()
        iv = await asyncio.to_thread(
            load_intervention, body.source, format=body.format, allowed_dirs=state.allowed_dirs,
            positions=body.positions, act_fn=body.act_fn, operator=body.operator, scale=body.scale,
            allow_hub=state.allow_hub,
            **_limits(state), **_reader_hints(state))
        source, fmt = body.source, iv.source_format
    entry = await state.registry.register(body.id, iv, source=source, format=fmt, replace=body.replace)
    return JSONResponse(describe_entry(state, entry), status_code=201)


async def _register_prompt(state, body: InterventionCreate, directory: Path) -> JSONResponse:
    """A prompt-space PEFT adapter: its virtual tokens, prepended to each request's prompt embeddings."""
    if state.prompt_embedder is None:
        raise APIError(400, "this server serves no prompt-space adapters (prompt tuning, P-tuning, multitask prompt "
                       "tuning); start it with --enable-prompt-embeds", code="prompt_embeds_disabled", param="source")
    for field in ("positions", "scale", "act_fn"):
        if getattr(body, field) is not None:
            raise APIError(400, f"{field} does not apply to a prompt-space adapter (its virtual tokens are prepended "
                           "to the whole prompt)", code="invalid_value", param=field)
    prompt = await asyncio.to_thread(load_prompt_adapter, directory, state.registry.adapters_dir,
                                     hidden_size=state.engine.llm.model_config.get_hidden_size(),
                                     task_id=body.task_id)
    entry = await state.registry.register_prompt(body.id, prompt, source=body.source, replace=body.replace)
    return JSONResponse(describe_entry(state, entry), status_code=201)


async def _derived(body, state) -> JSONResponse:
    """Register the steering vectors ``body.derive`` asks for (``api/derive.py``), with their numbers."""
    geometry = state.registry.geometry
    geometry.require_interventions()
    derive.check(body.derive, geometry)
    iv, numbers = await derive.derive(state.engine, body.derive, geometry.hidden_size,
                                      geometry.widths[body.derive.component], body.positions, body.scale)
    entry = await state.registry.register(body.id, iv, source=f"derive:{body.derive.method}", format="derived",
                                          replace=body.replace)
    return JSONResponse({**describe_entry(state, entry), "derived": numbers}, status_code=201)


async def _from_upload(request: Request, state):
    form = await request.form(max_files=2, max_fields=8, max_part_size=state.max_upload_bytes)
    try:
        body = InterventionCreate(id=str(form.get("id") or ""), source="upload", positions=form.get("positions"),
                                  scale=form.get("scale"), replace=str(form.get("replace", "")).lower() == "true")
        tmp = Path(tempfile.mkdtemp(prefix="steer-upload-"))
        try:
            for name in ("intervention.json", "weights.safetensors"):
                part = form.get(name)
                if part is None or not hasattr(part, "read"):
                    raise APIError(400, f"multipart upload needs a file field named {name!r}", param=name)
                data = await part.read()
                if len(data) > state.max_upload_bytes:
                    raise APIError(413, f"{name} is larger than {state.max_upload_bytes} bytes", param=name)
                (tmp / name).write_bytes(data)
            iv = await asyncio.to_thread(read_native, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        await form.close()
    if body.positions is not None:
        iv.positions = body.positions
    if body.scale is not None:
        iv.scale = body.scale
    state.registry.geometry.require_interventions()
    iv = validate_intervention(iv, **_limits(state))
    return body, iv, "upload", "native"


@router.get("", dependencies=[Depends(require_api_key)], summary="List registered interventions",
            responses=docs.ok(docs.InterventionList, {"object": "list", "data": [docs.INTERVENTION_EXAMPLE]}))
async def list_interventions(request: Request):
    state = request.app.state.steer
    return {"object": "list", "data": [describe_entry(state, e) for e in state.registry.entries.values()
                                       if not e.deleting]}


@router.get("/{intervention_id}", dependencies=[Depends(require_api_key)], summary="Describe one intervention",
            description="Family, placements, parameter shapes, base model, status (`loaded` in a device slot or "
                        "`cached`), requests in flight, created time.",
            responses={**_ONE, **docs.errors(404)})
async def get_intervention(intervention_id: str, request: Request):
    state = request.app.state.steer
    return describe_entry(state, await state.registry.resolve(intervention_id))


@router.patch("/{intervention_id}", dependencies=[Depends(require_admin_key)],
              summary="Change an intervention's default scale or positions",
              description="Takes effect for requests admitted afterwards; persisted.",
              responses={**_ONE, **docs.errors(400, 403, 404)})
async def patch_intervention(intervention_id: str, body: InterventionPatch, request: Request):
    state = request.app.state.steer
    entry = await state.registry.update_defaults(intervention_id, scale=body.scale, positions=body.positions)
    return describe_entry(state, entry)


@router.delete("/{intervention_id}", dependencies=[Depends(require_admin_key)],
               summary="Delete an intervention (409 while in use unless force=true, which waits for it)",
               description="With `force=true` new requests naming it get 404 at once, the requests already "
                           "using it finish, then it is deleted (409 if they take longer than 60 s).",
               responses={**docs.ok(docs.Deleted, {"id": "honest", "object": "intervention", "deleted": True}),
                          **docs.errors(403, 404, 409)})
async def delete_intervention(intervention_id: str, request: Request,
                              force: bool = Query(False, description="wait for in-flight requests, then delete")):
    state = request.app.state.steer
    await state.registry.unregister(intervention_id, force=force)
    return {"id": intervention_id, "object": "intervention", "deleted": True}

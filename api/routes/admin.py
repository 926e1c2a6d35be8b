"""/admin: operators' routes (scope `edits:admin`). The export is made by whoever holds the model
(the InferenceBackend); this module only checks the request and passes the tar stream on."""
from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from api.deps import BackendDep, EditAdmin
from api.errors import error_body, error_responses
from service.inference import ExportFormat, check_export
from service.wire import MODEL_VERSION_HEADER, TarResponse

router = APIRouter(prefix="/admin", tags=["admin"])
EXPORT_DOC: dict[int | str, dict[str, Any]] = {
    200: {"description": "a tar of one folder, knowpatch-<format>-v<model version>/, with the files "
                         "`knowpatch export` writes",
          "content": {"application/x-tar": {
              "schema": {"type": "string", "format": "binary"},
              "example": "knowpatch-peft-v42/ adapter_config.json adapter_model.safetensors export_info.json "
                         "tokenizer.json tokenizer_config.json (a tar)"}},
          "headers": {
              "Content-Disposition": {"description": 'attachment; filename="knowpatch-peft-v42.tar"',
                                      "schema": {"type": "string"}},
              MODEL_VERSION_HEADER: {"description": "the model version exported", "schema": {"type": "integer"}},
              "Content-Length": {"description": "bytes of the whole tar", "schema": {"type": "integer"}}}},
    **error_responses(401, 403, 409, 422, 503),
    429: {"description": "another export is being written or downloaded; retry after Retry-After seconds",
          "content": {"application/json": {"example": error_body(
              "Overloaded", "another export is being written or downloaded (one at a time: each writes the whole "
                            "model to disk); retry when it is done")}}},
}


@router.get("/export", response_class=StreamingResponse, responses=EXPORT_DOC,
            summary="Download the served model as a merged checkpoint or a PEFT adapter (tar)")
async def export_model(
    _: EditAdmin, backend: BackendDep,
    export_format: Annotated[ExportFormat, Query(
        alias="format", description="`merged`: the edited model as a Hugging Face folder, the service's weights "
                                    "bit for bit; `peft`: a LoRA adapter of the active edits over the unedited "
                                    "model")] = "merged",
    rank: Annotated[int | None, Query(ge=1, description="peft only: truncate each layer's update to this rank by "
                                                        "SVD (default: exact, rank = active edits)")] = None,
) -> TarResponse:
    """The model as served when the export starts, as the folder `knowpatch export --format F --out DIR`
    writes at that version (`export_info.json` included: model version, ledger hash, weights digest),
    streamed as a tar (scope `edits:admin`). The weights are read at one version: edits applied during
    the export are not in it. `X-Model-Version` and the file name say which version it is.

    The model's side writes the folder to a temporary directory first (`TMPDIR` of the worker, or of
    `knowpatch serve`: it needs room for a copy of the model), then streams it and deletes it, also when
    the client goes away. One export at a time: another gets 429. 503 while the model is not ready.
    A `peft` export needs at least one active edit (422 otherwise). To serve it with vLLM, see README."""
    check_export(export_format, rank)  # here too, so a bad request gets 422 even while the worker is away
    return TarResponse(await backend.export(export_format, rank))

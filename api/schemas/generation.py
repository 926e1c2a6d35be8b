"""Request and response bodies of /generate, /generate_stream and /score."""
from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from api.schemas.common import NON_BLANK_PATTERN, NonBlank, PlainText, not_blank
from service.inference import GenerateResult, ScoreResult
from service.wire import (  # noqa: F401 (re-exported: the public and internal routes share the limits)
    DEFAULT_MAX_NEW_TOKENS,
    MAX_CANDIDATE_CHARS,
    MAX_CANDIDATES,
    MAX_INPUT_CHARS,
    MAX_STOP_SEQUENCES,
)


Candidate = Annotated[str, Field(min_length=1, max_length=MAX_CANDIDATE_CHARS,
                                 json_schema_extra={"pattern": NON_BLANK_PATTERN}), AfterValidator(not_blank)]


class GenerateParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # None rather than a number: the default must follow the server's limit (api.generation.tgi_params).
    max_new_tokens: int | None = Field(None, ge=1, description=f"at most KNOWPATCH_MAX_NEW_TOKENS_LIMIT; default "
                                                               f"{DEFAULT_MAX_NEW_TOKENS}, or that limit if lower")
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0: no top-k filter")
    do_sample: bool = Field(False, description="false: greedy decoding")
    seed: int | None = None
    stop: list[PlainText] = Field(default_factory=list, max_length=MAX_STOP_SEQUENCES)


class GenerateIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "inputs": "The Eiffel Tower is located in the city of",
        "parameters": {"max_new_tokens": 8, "do_sample": False}, "min_model_version": 41}]})

    inputs: NonBlank = Field(min_length=1, max_length=MAX_INPUT_CHARS)
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    min_model_version: int | None = Field(None, ge=0, description="wait until the model carries this ledger seq "
                                                                  "(e.g. your edit's seq) before generating")
    stream: bool = Field(False, description="true: server-sent events, as POST /generate_stream")


class GenerateDetails(BaseModel):
    finish_reason: str = Field(description="length | stop | eos")
    generated_tokens: int


class GenerateOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "generated_text": " Rome.", "details": {"finish_reason": "eos", "generated_tokens": 2}, "model_version": 41}]})

    generated_text: str
    details: GenerateDetails
    model_version: int = Field(description="ledger seq of the model state that served this request")

    @classmethod
    def of(cls, result: GenerateResult) -> "GenerateOut":
        details = GenerateDetails(finish_reason=result.finish_reason, generated_tokens=result.generated_tokens)
        return cls(generated_text=result.generated_text, details=details, model_version=result.model_version)


class ScoreIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "prompt": "The Eiffel Tower is located in the city of", "candidates": [" Rome", " Paris"]}]})

    prompt: NonBlank = Field(min_length=1, max_length=MAX_INPUT_CHARS)
    candidates: list[Candidate] = Field(min_length=1, max_length=MAX_CANDIDATES,
                                  description="continuations of the prompt to score")
    min_model_version: int | None = Field(None, ge=0)


class CandidateScoreOut(BaseModel):
    candidate: str
    total_logprob: float = Field(description="log P(candidate | prompt), summed over its tokens")
    mean_logprob: float = Field(description="total_logprob / tokens")
    tokens: int


class ScoreOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "scores": [{"candidate": " Rome", "total_logprob": -0.4, "mean_logprob": -0.4, "tokens": 1},
                   {"candidate": " Paris", "total_logprob": -5.1, "mean_logprob": -5.1, "tokens": 1}],
        "best": " Rome", "model_version": 41}]})

    scores: list[CandidateScoreOut]
    best: str = Field(description="the candidate with the highest total_logprob")
    model_version: int

    @classmethod
    def of(cls, result: ScoreResult) -> "ScoreOut":
        scores = [CandidateScoreOut(candidate=s.candidate, total_logprob=s.total_logprob,
                                    mean_logprob=s.mean_logprob, tokens=s.tokens) for s in result.scores]
        best = max(scores, key=lambda s: s.total_logprob).candidate
        return cls(scores=scores, best=best, model_version=result.model_version)

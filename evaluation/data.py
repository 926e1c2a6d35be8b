"""The evaluation data as plain dataclasses: CounterFact, zsRE, the knowns control set, held-out text.

The files are read where they lie (by default the shared data folder next to the repository);
nothing is copied. Cases that the engine would refuse (an empty target, a new target equal to the
true one) are left out and counted, so `n` always means n editable cases.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from service.engine.types import EditRequest
from service.errors import InvalidRequest

log = logging.getLogger(__name__)

Dataset = Literal["counterfact", "zsre"]

DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"  # <repo>/../shared/data
DEFAULT_PATHS: dict[str, Path] = {
    "counterfact": DATA_ROOT / "counterfact" / "counterfact-train.json",
    "zsre": DATA_ROOT / "zsre" / "zsre_mend_train-1k.json",
    "knowns": DATA_ROOT / "knowns" / "known_1000.json",
    "heldout": DATA_ROOT / "corpus" / "wikitext2_raw_test.txt",
}


@dataclass(frozen=True)
class EditCase:
    """One benchmark case: the edit, and the prompts that test it."""

    case_id: str
    subject: str
    prompt: str  # the subject filled in
    target_new: str
    target_true: str
    rephrase_prompts: tuple[str, ...]  # generalisation
    locality_prompt: str  # specificity: unrelated (zsRE) or neighbouring (CounterFact) prompt
    locality_answer: str  # its true answer, which the edit must not disturb

    def request(self) -> EditRequest:
        """What is sent to the editor: only the edit itself, never the evaluation prompts."""
        return EditRequest(self.subject, self.prompt, self.target_new, self.target_true)


@dataclass(frozen=True)
class KnownFact:
    """A control fact (ROME's knowns): the edits must leave the model's answer here alone."""

    known_id: int
    subject: str
    prompt: str
    attribute: str


@dataclass
class LoadedCases:
    cases: list[EditCase]
    path: Path
    skipped: dict[str, str] = field(default_factory=dict)  # case_id -> why it was left out


def resolve(path: str | Path | None, kind: str) -> Path:
    """The given path, or the default one; a clear error when neither exists."""
    chosen = Path(path) if path is not None else DEFAULT_PATHS[kind]
    if not chosen.is_file():
        hint = "" if path is not None else f" (the default for {kind}; pass a path with --data or the matching option)"
        raise InvalidRequest(f"{kind} data file {chosen} does not exist{hint}")
    return chosen


def _read_json(path: Path) -> list[dict[str, Any]]:
    records = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(records, list):
        raise InvalidRequest(f"{path}: expected a JSON list of records")
    return records


def _counterfact_case(index: int, record: dict[str, Any]) -> EditCase:
    return EditCase(
        case_id=str(record.get("case_id", index)),
        subject=record["subject"],
        prompt=record["prompt"],
        target_new=record["target_new"],
        target_true=record["ground_truth"],
        rephrase_prompts=(record["rephrase_prompt"],),
        locality_prompt=record["locality_prompt"],
        locality_answer=record["locality_ground_truth"],
    )


def _zsre_case(index: int, record: dict[str, Any]) -> EditCase:
    return EditCase(
        case_id=str(index),
        subject=record["subject"],
        prompt=record["src"],
        target_new=record["alt"],
        target_true=record["answers"][0],
        rephrase_prompts=(record["rephrase"],),
        locality_prompt=record["loc"] + "?",  # "nq question: ...?", as the reference scores it
        locality_answer=record["loc_ans"],
    )


_BUILDERS = {"counterfact": _counterfact_case, "zsre": _zsre_case}


def load_cases(dataset: Dataset, path: str | Path | None = None, n: int | None = None) -> LoadedCases:
    """The first `n` editable cases of the file, in file order (the paper's selection)."""
    resolved = resolve(path, dataset)
    build = _BUILDERS[dataset]
    loaded = LoadedCases([], resolved)
    for index, record in enumerate(_read_json(resolved)):
        if n is not None and len(loaded.cases) >= n:
            break
        try:
            case = build(index, record)
            case.request()  # an EditRequest checks itself when built
        except (KeyError, IndexError, TypeError) as exc:
            loaded.skipped[str(record.get("case_id", index))] = f"malformed record: missing {exc}"
            continue
        except InvalidRequest as exc:
            loaded.skipped[case.case_id] = exc.message
            continue
        loaded.cases.append(case)
    if n is not None and len(loaded.cases) < n:
        raise InvalidRequest(f"{resolved} holds only {len(loaded.cases)} editable cases; asked for {n}")
    if loaded.skipped:
        log.info("left out %d %s cases the engine would refuse", len(loaded.skipped), dataset)
    return loaded


def load_knowns(path: str | Path | None = None, count: int = 100) -> list[KnownFact]:
    """`count` facts spread evenly over the file (every relation gets a share), always the same ones."""
    records = _read_json(resolve(path, "knowns"))
    if count <= 0:
        return []
    step = max(1, len(records) // count)
    chosen = records[::step][:count]
    return [KnownFact(int(r["known_id"]), r["subject"], r["prompt"], r["attribute"]) for r in chosen]


@dataclass(frozen=True)
class HeldOutText:
    """Perplexity text: word chunks taken from the END of a file, and where they start in it."""

    chunks: list[str]
    start_char: int  # everything before this character is outside the held-out slice
    path: Path


def load_heldout(path: str | Path | None = None, chunks: int = 16, words_per_chunk: int = 192) -> HeldOutText:
    """The last `chunks` × `words_per_chunk` words of the file, as whitespace-normalised chunks.

    Chunks are text, not token windows, so the same numbers come out in-process and over HTTP.
    """
    resolved = resolve(path, "heldout")
    text = resolved.read_text(encoding="utf-8", errors="replace")
    wanted = chunks * words_per_chunk
    tail = min(len(text), wanted * 12)  # walk back from the end until enough words are found
    while True:
        offset = len(text) - tail
        words = list(re.finditer(r"\S+", text[offset:]))[1 if offset else 0 :]  # the first may be cut
        if len(words) >= wanted or offset == 0:
            break
        tail = min(len(text), tail * 2)
    if len(words) < wanted:
        raise InvalidRequest(f"{resolved} has {len(words)} words; perplexity needs {wanted}")
    chosen = [m.group() for m in words[-wanted:]]
    start_char = offset + words[-wanted].start()
    pieces = [" ".join(chosen[i : i + words_per_chunk]) for i in range(0, wanted, words_per_chunk)]
    return HeldOutText(pieces, start_char, resolved)

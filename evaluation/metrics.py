"""Every number the evaluation reports, defined as in the AlphaEdit paper (docs/alphaedit.md).

Rates are percentages (as the paper's tables). Each dataset gives three headline numbers:
- CounterFact: efficacy / generalisation / specificity are success rates of a mean per-token NLL
  comparison (new target beats the true one on the prompt / its paraphrases; the true answer
  still beats the new target on the neighbourhood prompt); `*_top1` is the stricter top-1 version
  (every target token is the teacher-forced argmax).
- zsRE: teacher-forced token accuracy of the new answer on the question and its rephrasing, and
  of the unrelated question's answer; `*_top1` is exact match, `*_nll` the NLL comparison.
Fluency, perplexity and the knowns control are shared by both. No torch here: the metrics run
on any target, including a service over HTTP, which cannot report top-1 (those come out None).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from statistics import fmean
from typing import Any

from evaluation.targets import Query, QueryScore, Target
from evaluation.data import EditCase, HeldOutText, KnownFact

# Fluency (ROME / MEMIT / AlphaEdit): per text, the mean of (2/3)·H2 and (4/3)·H3, in bits.
FLUENCY_WEIGHTS = {2: 2 / 3, 3: 4 / 3}
# Words and punctuation: the reference uses nltk.word_tokenize; this regex agrees with it on
# ordinary English text (words, numbers, contractions kept as one token, each punctuation mark).
_WORD = re.compile(r"\w+(?:'\w+)?|[^\w\s]")


# ---- pure functions -------------------------------------------------------------------------------

def words(text: str) -> list[str]:
    return _WORD.findall(text)


def ngram_entropy(tokens: Sequence[str], n: int) -> float:
    """Shannon entropy (bits) of the n-gram frequency distribution; 0 when there is no n-gram."""
    counts = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0


def text_fluency(text: str) -> float:
    """mean_n(w_n · H_n) over n = 2, 3, in bits."""
    tokens = words(text)
    return fmean(weight * ngram_entropy(tokens, n) for n, weight in FLUENCY_WEIGHTS.items())


def fluency(texts: Sequence[str]) -> float | None:
    """Mean text fluency ×100 (the paper's scale: ~620 for healthy 100-token generations)."""
    return 100 * fmean(text_fluency(t) for t in texts) if texts else None


def rate(flags: Iterable[bool | float | None]) -> float | None:
    """Mean of booleans or per-case fractions as a percentage; None if any is unavailable."""
    values = list(flags)
    if not values or any(v is None for v in values):
        return None
    return 100 * fmean(float(v) for v in values if v is not None)


def beats(winner: QueryScore, loser: QueryScore) -> bool:
    """The paper's comparison: lower mean per-token NLL, i.e. higher mean log-probability."""
    return winner.mean_logprob > loser.mean_logprob


def perplexity(scores: Sequence[QueryScore]) -> float:
    """exp of the token-weighted mean NLL."""
    tokens = sum(s.tokens for s in scores)
    return math.exp(-sum(s.total_logprob for s in scores) / tokens)


def _mean_flags(flags: Sequence[bool | None]) -> float | None:
    """A case's share over its prompts (several paraphrases); None if unavailable."""
    if not flags or any(f is None for f in flags):
        return None
    return fmean(float(f) for f in flags if f is not None)


# ---- CounterFact ----------------------------------------------------------------------------------

def _counterfact_queries(case: EditCase) -> list[Query]:
    queries = [Query(case.prompt, case.target_new), Query(case.prompt, case.target_true)]
    for prompt in case.rephrase_prompts:
        queries += [Query(prompt, case.target_new), Query(prompt, case.target_true)]
    return queries + [Query(case.locality_prompt, case.locality_answer), Query(case.locality_prompt, case.target_new)]


def _counterfact_case(case: EditCase, s: Sequence[QueryScore]) -> dict[str, Any]:
    """s: the scores of `_counterfact_queries(case)`, in order."""
    prompt_new, prompt_true, *rephrase, loc_true, loc_new = s
    pairs = list(zip(rephrase[::2], rephrase[1::2]))
    return {
        "case_id": case.case_id,
        "efficacy": beats(prompt_new, prompt_true),
        "generalisation": _mean_flags([beats(new, true) for new, true in pairs]),
        "specificity": beats(loc_true, loc_new),
        "efficacy_top1": prompt_new.top1,
        "generalisation_top1": _mean_flags([new.top1 for new, _ in pairs]),
        "specificity_top1": loc_true.top1,
        "logprob": {  # mean per-token log-probabilities, for later analysis
            "prompt": [prompt_new.mean_logprob, prompt_true.mean_logprob],
            "rephrase": [[new.mean_logprob, true.mean_logprob] for new, true in pairs],
            "locality": [loc_true.mean_logprob, loc_new.mean_logprob],
        },
    }


def counterfact_metrics(target: Target, cases: Sequence[EditCase]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Summary (percentages) and per-case results; one batched scoring call for all cases."""
    per_case_queries = [_counterfact_queries(c) for c in cases]
    scores = target.score([q for qs in per_case_queries for q in qs])
    details, offset = [], 0
    for case, queries in zip(cases, per_case_queries):
        details.append(_counterfact_case(case, scores[offset : offset + len(queries)]))
        offset += len(queries)
    keys = ["efficacy", "generalisation", "specificity", "efficacy_top1", "generalisation_top1", "specificity_top1"]
    return {key: rate(d[key] for d in details) for key in keys}, details


# ---- zsRE -----------------------------------------------------------------------------------------

def _zsre_queries(case: EditCase) -> tuple[list[Query], list[Query]]:
    """(token-accuracy queries, NLL-comparison queries)."""
    accuracy = [Query(case.prompt, case.target_new)] + [Query(p, case.target_new) for p in case.rephrase_prompts]
    accuracy.append(Query(case.locality_prompt, case.locality_answer))
    nll = [Query(p, t) for p in (case.prompt, *case.rephrase_prompts) for t in (case.target_new, case.target_true)]
    return accuracy, nll + [Query(case.locality_prompt, case.locality_answer)]


def _zsre_case(case: EditCase, accuracy: Sequence[float | None], s: Sequence[QueryScore]) -> dict[str, Any]:
    pairs = list(zip(s[0:-1:2], s[1:-1:2]))  # (new, true) on the prompt, then each rephrasing
    loc = s[-1]
    return {
        "case_id": case.case_id,
        "efficacy": accuracy[0],
        "generalisation": None if None in accuracy[1:-1] else fmean(a for a in accuracy[1:-1] if a is not None),
        "specificity": accuracy[-1],
        "efficacy_top1": pairs[0][0].top1,
        "generalisation_top1": _mean_flags([new.top1 for new, _ in pairs[1:]]),
        "specificity_top1": loc.top1,
        "efficacy_nll": beats(*pairs[0]),
        "generalisation_nll": _mean_flags([beats(new, true) for new, true in pairs[1:]]),
        "logprob": {"pairs": [[new.mean_logprob, true.mean_logprob] for new, true in pairs],
                    "locality": loc.mean_logprob},
    }


def zsre_metrics(target: Target, cases: Sequence[EditCase]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    split = [_zsre_queries(c) for c in cases]
    accuracy = target.token_accuracy([q for acc, _ in split for q in acc])
    scores = target.score([q for _, nll in split for q in nll])
    details, a_off, s_off = [], 0, 0
    for case, (acc, nll) in zip(cases, split):
        details.append(_zsre_case(case, accuracy[a_off : a_off + len(acc)], scores[s_off : s_off + len(nll)]))
        a_off, s_off = a_off + len(acc), s_off + len(nll)
    keys = ["efficacy", "generalisation", "specificity", "efficacy_top1", "generalisation_top1",
            "specificity_top1", "efficacy_nll", "generalisation_nll"]
    return {key: rate(d[key] for d in details) for key in keys}, details


CASE_METRICS = {"counterfact": counterfact_metrics, "zsre": zsre_metrics}


# ---- shared: fluency, perplexity, control -----------------------------------------------------------

def fluency_metric(target: Target, cases: Sequence[EditCase], max_new_tokens: int) -> tuple[float | None, list[str]]:
    """Fluency of greedy generations on the edited prompts, and the texts. The text scored
    includes the prompt, as the reference's generations do."""
    prompts = [c.prompt for c in cases]
    texts = [p + c for p, c in zip(prompts, target.generate(prompts, max_new_tokens))]
    return fluency(texts), texts


def heldout_queries(heldout: HeldOutText) -> list[Query]:
    """Each chunk scored after its first word (a prompt must not be empty)."""
    queries = []
    for chunk in heldout.chunks:
        first, rest = chunk.split(" ", 1)
        queries.append(Query(first, rest))
    return queries


def perplexity_metric(target: Target, heldout: HeldOutText) -> float:
    return perplexity(target.score(heldout_queries(heldout)))


def control_references(target: Target, facts: Sequence[KnownFact], max_new_tokens: int) -> list[str]:
    """The unedited model's greedy continuations of the control prompts."""
    return target.generate([f.prompt for f in facts], max_new_tokens)


def control_metrics(target: Target, facts: Sequence[KnownFact], references: Sequence[str],
                    max_new_tokens: int) -> tuple[dict[str, float | None], list[dict[str, Any]]]:
    """control_retained: the model still continues each known fact's prompt exactly as before the
    edits; control_top1: the known attribute is the teacher-forced top-1 continuation."""
    if not facts:
        return {"control_retained": None, "control_top1": None}, []
    now = target.generate([f.prompt for f in facts], max_new_tokens)
    scores = target.score([Query(f.prompt, f.attribute) for f in facts])
    details = [{"known_id": f.known_id, "prompt": f.prompt, "reference": ref, "now": text, "attribute_top1": s.top1}
               for f, ref, text, s in zip(facts, references, now, scores)]
    summary = {"control_retained": rate(a == b for a, b in zip(now, references)),
               "control_top1": rate(s.top1 for s in scores)}
    return summary, details

"""Schemathesis against the running API's own OpenAPI document, with a valid key that holds every scope
the routes need: each operation gets `examples` generated requests in each generation mode (positive:
data the schema allows; negative: data it forbids), and every response is checked to conform to the
document (status code, content type, headers, body schema) and never to be a server error.

One kind of 5xx is the documented contract rather than a failure: 503 `Unavailable` with Retry-After,
which the API answers when a min_model_version is not live within KNOWPATCH_VERSION_WAIT_S (the
fuzzer asks for versions far in the future). Those are counted apart; any other 5xx is a failure.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Not negative_data_rejection: the API ignores query parameters it does not know, as HTTP servers do, and
# our key in every request undoes the mutations that drop the Authorization header.
CHECK_NAMES = ("status_code_conformance", "content_type_conformance", "response_headers_conformance",
               "response_schema_conformance")


@dataclass
class FuzzReport:
    requests: int = 0
    by_status: Counter = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)  # 5xx other than the documented 503
    documented_503: int = 0
    failures: list[str] = field(default_factory=list)  # responses that do not conform to the document
    operations: int = 0
    unsatisfiable: list[str] = field(default_factory=list)  # operations and modes with nothing to generate

    rounds: int = 0  # passes over every operation, each with its own seed

    def add(self, other: "FuzzReport") -> None:
        self.requests += other.requests
        self.by_status.update(other.by_status)
        self.server_errors += other.server_errors
        self.documented_503 += other.documented_503
        self.failures += other.failures
        self.operations = max(self.operations, other.operations)
        self.unsatisfiable = sorted(set(self.unsatisfiable) | set(other.unsatisfiable))
        self.rounds += other.rounds

    def figures(self) -> dict[str, Any]:
        return {"fuzz_operations": self.operations, "fuzz_requests": self.requests, "fuzz_rounds": self.rounds,
                "fuzz_5xx": sum(n for s, n in self.by_status.items() if s >= 500),
                "fuzz_5xx_undocumented": len(self.server_errors), "fuzz_503_documented": self.documented_503,
                "fuzz_nonconforming": len(self.failures),
                "fuzz_statuses": {str(k): v for k, v in sorted(self.by_status.items())}}


def _documented_503(response: Any) -> bool:
    try:
        body = response.json()
    except ValueError:
        return False
    return response.status_code == 503 and "retry-after" in {k.lower() for k in response.headers} and \
        body.get("error", {}).get("type") == "Unavailable"


def _record(report: FuzzReport, label: str, case: Any, response: Any, checks: list) -> None:
    report.requests += 1
    report.by_status[response.status_code] += 1
    if response.status_code >= 500:
        if _documented_503(response):
            report.documented_503 += 1
        else:
            report.server_errors.append(f"{label}: {response.status_code} {response.text[:300]} <- {case.as_curl_command()}")
    try:
        case.validate_response(response, checks=checks)
    except (AssertionError, BaseExceptionGroup) as exc:  # a Failure, or a FailureGroup of several
        for failure in getattr(exc, "exceptions", [exc]):
            what = f"{getattr(failure, 'title', type(failure).__name__)}: {getattr(failure, 'message', failure)}"
            report.failures.append(f"{label}: {' '.join(what.split())[:400]} <- {case.as_curl_command()}"[:1200])


def _caller(report: FuzzReport, label: str, headers: dict[str, str], checks: list) -> Callable[[Any], None]:
    def call(case: Any) -> None:
        try:
            response = case.call(headers=headers, timeout=120)
        except Exception as exc:  # the server closed the connection: worse than a 500
            report.requests += 1
            report.server_errors.append(f"{label}: no response ({type(exc).__name__}: {exc})")
            return
        _record(report, label, case, response, checks)

    return call


def fuzz(api_url: str, key: str, examples: int, seed: int = 0) -> FuzzReport:
    """Fuzz every operation of the API at `api_url` with `examples` cases per generation mode."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed
    from hypothesis.errors import Unsatisfiable
    from schemathesis import checks as schemathesis_checks
    from schemathesis.generation import GenerationMode

    checks = [getattr(schemathesis_checks, name) for name in CHECK_NAMES]
    schema = schemathesis.openapi.from_url(f"{api_url}/openapi.json")
    headers = {"Authorization": f"Bearer {key}"}
    report = FuzzReport()
    for result in schema.get_all_operations():
        operation = result.ok()
        report.operations += 1
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            label = f"{operation.label} [{mode.value}]"
            call = _caller(report, label, headers, checks)
            test = hypothesis_seed(seed)(settings(
                max_examples=examples, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )(given(case=operation.as_strategy(generation_mode=mode))(call)))
            try:
                test()
            except Unsatisfiable:  # nothing to send in this mode (no parameters to break, say)
                report.unsatisfiable.append(label)
    report.rounds = 1
    return report


def fuzz_at_least(api_url: str, key: str, examples: int, min_requests: int, seed: int = 0) -> FuzzReport:
    """fuzz() with seed, seed + 1, ... until at least `min_requests` requests were sent in all (operations
    with few distinct cases, such as those without parameters, send fewer than `examples`)."""
    report = FuzzReport()
    while True:
        report.add(fuzz(api_url, key, examples, seed=seed + report.rounds))
        if report.requests >= min_requests or report.requests == 0:
            return report


"""The web server's API searched by schemathesis from its own OpenAPI document, in-process
through ASGI (no port, nothing outside the process): schema-valid and schema-breaking
requests for every operation, each answer checked against the document (a documented
status, content type and body; valid data accepted, invalid data refused) and never a
5xx. Each case is sent twice: as generated (its run id is random text, so a 404), and
with a real run id in place, so the reading and the model are reached too. Every error
is a one-line JSON ``detail`` without a traceback.

Bounded: a fixed number of examples per operation and mode, derandomized (the same cases
on every run), no example database.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from cnnlab.serve import create_app

TASKS = ("classify", "segment", "detect")
EXAMPLES = 20  # per operation and generation mode


@pytest.fixture(scope="module")
def api_schema(serve_runs):
    # "testserver" is the host name schemathesis's ASGI client sends: admitted by name, as
    # --allow-host would.
    app = create_app([serve_runs[task] for task in TASKS], device="cpu", allow_hosts=["testserver"])
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_answer_is_what_the_document_says(api_schema, serve_runs, mode) -> None:
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/api/predict", "/api/runs/{run_id}"}
    sent: list[str] = []
    for operation in operations:
        if mode == GenerationMode.NEGATIVE and not (len(operation.body) or len(operation.query)):
            continue  # any path text is a string: no request breaks the document

        @given(case=operation.as_strategy(mode))
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def search(case: schemathesis.Case) -> None:
            for _ in with_real_runs(case, serve_runs):
                sent.append(case.operation.label)
                assert_documented(case, case.call())

        search()
    assert sent.count("POST /api/predict") >= 4 * EXAMPLES // 2  # a search, not a few requests
    print(f"{mode}: {len(sent)} requests", {label: sent.count(label) for label in set(sent)})


def with_real_runs(case: schemathesis.Case, serve_runs) -> Iterator[None]:
    """The case as generated (its run id random text: a 404), then the same case with
    each real run id in its place."""
    yield
    if case.operation.path == "/api/predict" and isinstance(case.body, dict):
        for task in TASKS:
            case.body = {**case.body, "run": serve_runs[task].name}
            yield
    elif "run_id" in (case.path_parameters or {}):
        case.path_parameters = {**case.path_parameters, "run_id": serve_runs["classify"].name}
        yield


def assert_documented(case: schemathesis.Case, response) -> None:
    """The answer as the document says it (schemathesis's checks), never a 5xx, and every
    error a one-line ``detail``."""
    # A schema-valid file (any bytes) may be no image: its documented answer is a 400. A
    # schema-valid model name may name a model that has no such layer, no maps there or
    # needs more memory at that size (the explore API): a 400 or 413 too.
    uploads = ("/api/predict", "/api/explore/images")
    reads_an_image = case.operation.path in uploads and response.status_code == 400
    explores = case.operation.path.startswith("/api/explore") and response.status_code in (
        400,
        413,
    )
    case.validate_response(
        response,
        excluded_checks=[positive_data_acceptance] if reads_an_image or explores else None,
    )
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        detail = response.json()["detail"]
        assert isinstance(detail, str) and "\n" not in detail and "Traceback" not in detail

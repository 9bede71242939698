"""Every operation fuzzed from the served OpenAPI schema with schemathesis, with bodies that
fit the schema and bodies that do not: no request gets a 5xx, and every answer is what the
schema says (status code, content type, body)."""

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from rgpt_rt.serve import ServeLimits, create_app

pytestmark = pytest.mark.slow  # schemathesis over every operation: ~11 s on 2 cores

POSTS = ["/v1/describe", "/v1/classify", "/v1/refer", "/v1/ask", "/v1/chat/completions"]
GETS = ["/v1/info", "/v1/models", "/healthz"]
CASES = [("POST", path, mode) for path in POSTS for mode in ("positive", "negative")] + [
    ("GET", path, "positive") for path in GETS
]
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def api_schema(serve_session):
    # Few tokens and a short time limit: a generated body that does reach the model stays cheap.
    # schemathesis calls the app as host "testserver"
    limits = ServeLimits(max_new_tokens=8, request_timeout_s=20, allowed_hosts=("testserver",))
    app = create_app(serve_session, limits)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_every_operation_is_fuzzed(api_schema):
    served = {
        (result.ok().method.upper(), result.ok().path) for result in api_schema.get_all_operations()
    }
    assert served == {(method, path) for method, path, _ in CASES}


@pytest.mark.parametrize(
    ("method", "path", "mode"), CASES, ids=[f"{m} {p} {mode}" for m, p, mode in CASES]
)
def test_no_request_gets_a_server_error(api_schema, method, path, mode):
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=GenerationMode(mode)))
    @settings(
        max_examples=40 if method == "POST" else 5,  # about 420 requests in all: seconds
        deadline=None,
        derandomize=True,  # the same examples every run
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def fuzz(case):
        case.call_and_validate(checks=CHECKS)

    fuzz()

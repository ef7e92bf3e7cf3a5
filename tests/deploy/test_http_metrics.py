"""The ingress's metric tags without a cluster: a request's endpoint is its route's template
(every path no route has is one value), and an error's kind names what went wrong."""

from __future__ import annotations

from antiphon.deploy.default import default_config
from antiphon.deploy.http_metrics import OTHER_ENDPOINT, RecordHttpMetrics, error_kind
from antiphon.deploy.ingress import create_api


def test_a_request_is_tagged_with_its_routes_template_and_unknown_paths_share_one():
    app = create_api(None, default_config())  # the backend is never called here
    [metered] = [m for m in app.user_middleware if m.cls is RecordHttpMetrics]
    endpoint = RecordHttpMetrics(app, **metered.kwargs).endpoint
    assert endpoint("/v1/generate") == "/v1/generate"
    assert endpoint("/v1/chat/completions") == "/v1/chat/completions"
    assert endpoint("/health") == "/health"
    assert endpoint("/v1/models") == "/v1/models"
    assert endpoint("/v1/models/default") == endpoint("/v1/models/x") == "/v1/models/{model_id}"
    for scanned in ("/v1/models/a/b", "/wp-admin", "/v1/generate/x", "/v1"):
        assert endpoint(scanned) == OTHER_ENDPOINT


def test_an_error_kind_is_the_antiphon_class_else_what_the_status_says():
    assert error_kind(404, "NotFound") == "NotFound"
    assert error_kind(500, None) == "InternalError"
    assert error_kind(499, None) == "ClientClosed"
    assert error_kind(413, None) == "HTTP413"

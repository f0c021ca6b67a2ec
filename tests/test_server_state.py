"""ServerState's request-level decisions without HTTP: token limits, engine readiness, ids."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")


from stream_attention.server import ServerSettings  # noqa: E402
from stream_attention.server.errors import APIError  # noqa: E402
from stream_attention.server.metrics import ServerMetrics  # noqa: E402
from stream_attention.server.state import ServerState  # noqa: E402


def _state(**settings) -> ServerState:
    state = ServerState(ServerSettings(_env_file=None, **settings))
    state.max_model_len = 100
    state.vocab_size = 50
    return state


@pytest.mark.parametrize(
    ("requested", "prompt_len", "default", "want"),
    [
        (None, 10, None, 90),  # unset, no route default: the rest of the context
        (None, 10, 16, 16),  # unset: the route's default
        (None, 95, 16, 5),  # ... cut to the room left
        (None, 10, 4096, 90),
        (7, 10, 16, 7),  # an explicit value is kept
        (90, 10, None, 90),  # exactly fills the context
    ],
)
def test_max_tokens_resolution(requested, prompt_len, default, want) -> None:
    assert _state().resolve_max_tokens(requested, prompt_len, default=default) == want


def test_max_tokens_server_limit_caps_the_default_and_refuses_more() -> None:
    state = _state(max_tokens=20)
    assert state.resolve_max_tokens(None, 10, default=None) == 20
    with pytest.raises(APIError) as err:
        state.resolve_max_tokens(21, 10, default=None)
    assert (err.value.status, err.value.param, err.value.code) == (400, "max_tokens", "out_of_range")


@pytest.mark.parametrize(("requested", "prompt_len", "param", "code"), [
    (91, 10, "max_tokens", "context_length_exceeded"),  # prompt + max_tokens one over the context
    (1, 100, "messages", "context_length_exceeded"),  # the prompt alone fills it (named as asked)
    (None, 100, "messages", "context_length_exceeded"),
])
def test_max_tokens_beyond_the_context_names_the_field(requested, prompt_len, param, code) -> None:
    with pytest.raises(APIError) as err:
        _state().resolve_max_tokens(requested, prompt_len, default=16, prompt_param="messages")
    assert (err.value.status, err.value.param, err.value.code) == (400, param, code)


def test_require_engine_says_why_it_cannot_serve() -> None:
    state = _state(retry_after=7)
    state.metrics = ServerMetrics(state.stats)
    with pytest.raises(APIError) as err:
        state.require_engine()
    assert (err.value.status, err.value.code, err.value.headers) == (503, "not_ready", {"Retry-After": "7"})
    assert state.metrics.rejected.labels(reason="not_ready")._value.get() == 1
    state.load_error = "OSError: no such model"
    with pytest.raises(APIError) as err:
        state.require_engine()
    assert err.value.code == "load_failed" and "no such model" in str(err.value)
    engine = object()
    state.engine = engine
    assert state.require_engine() is engine
    state.draining = True
    with pytest.raises(APIError) as err:
        state.require_engine()
    assert (err.value.status, err.value.code) == (503, "draining")


def test_token_ids_at_or_past_the_vocabulary_are_refused() -> None:
    state = _state()
    state.check_ids([0, 49], "prompt")
    with pytest.raises(APIError) as err:
        state.check_ids([3, 50], "prompt_token_ids")
    assert (err.value.status, err.value.param) == (400, "prompt_token_ids")

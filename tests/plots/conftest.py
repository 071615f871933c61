"""Fixtures of the plot tests: a small synthetic trace with a language label and its token strings."""

from __future__ import annotations

import pytest

from moe_routing import RoutingTrace

from ._synth import make_trace, token_texts


@pytest.fixture
def trace() -> RoutingTrace:
    return make_trace(n_docs=9)  # 57 tokens per language: enough for the metrics not to warn


@pytest.fixture
def texts(trace: RoutingTrace) -> list[str]:
    return token_texts(trace)

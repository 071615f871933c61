"""Language figures (plots/language): usage by language, divergence matrices, divergence to a reference."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from moe_routing import MetricError, RoutingTrace, TraceError
from moe_routing.metrics import (
    language_divergence,
    reference_divergence,
)
from moe_routing.plots import (
    divergence_to_reference,
    language_divergence_heatmap,
    language_name,
)

from ._synth import LAYERS


def test_language_divergence_matrix() -> None:
    m = pd.DataFrame([[0, 0.1], [0.1, 0]], index=["de", "pt-BR"], columns=["de", "pt-BR"])
    fig = language_divergence_heatmap(m, layer=5)
    assert list(fig.data[0].x) == ["German", "Portuguese (Brazil)"]
    assert "decoder layer 5" in fig.layout.title.text
    with pytest.raises(MetricError, match="square"):
        language_divergence_heatmap(np.zeros((2, 3)))


def test_language_divergence_pairs_frame(trace: RoutingTrace) -> None:
    pairs = language_divergence(trace, n_boot=10)
    fig = language_divergence_heatmap(pairs)
    assert len(fig.data) == len(LAYERS)
    assert [s.label for s in fig.layout.sliders[0].steps] == [str(x) for x in LAYERS]
    assert list(fig.data[0].x) == ["German", "English", "French"]
    z = np.asarray(fig.data[1].z, dtype=float)
    np.testing.assert_allclose(z, z.T)
    np.testing.assert_allclose(np.diag(z), 0.0)
    row = pairs[(pairs.layer == 3) & (pairs.a == "de") & (pairs.b == "fr")]
    assert z[0, 2] == pytest.approx(float(row["js"].iloc[0]))
    one = language_divergence_heatmap(trace, layer=7)
    assert len(one.data) == 1 and "decoder layer 7" in one.layout.title.text
    with pytest.raises(TraceError, match="layer 4 is not in this frame"):
        language_divergence_heatmap(pairs, layer=4)


def test_divergence_to_reference_lines() -> None:
    df = pd.DataFrame(
        [{"layer": la, "lang": g, "divergence": la * 0.01} for la in LAYERS for g in ("en", "de", "fr")]
    )
    fig = divergence_to_reference(df, reference="en")
    assert [t.name for t in fig.data] == ["German", "French"]
    assert list(fig.data[0].x) == list(LAYERS)
    assert "from English" in fig.layout.title.text


def test_divergence_to_reference_from_metric(trace: RoutingTrace) -> None:
    df = reference_divergence(trace, reference="fr", n_boot=20)
    fig = divergence_to_reference(df)  # the all-zero reference is found and left out
    assert [t.name for t in fig.data] == ["German", "English"]
    assert "from French" in fig.layout.title.text
    de = df[df.lang == "de"].sort_values("layer")
    np.testing.assert_allclose(fig.data[0].error_y.array, (de.ci_high - de.divergence).clip(lower=0))


def test_language_names() -> None:
    assert language_name("de") == "German"
    assert language_name("zh-Hans") == "Chinese (Simplified)"
    assert language_name("yo") == "Yoruba"  # from gflanguages, not the small table
    assert language_name("qqq") == "qqq"

"""Layer selection by globs, regular expressions, types and exclusions."""

from __future__ import annotations

import re

import pytest
from torch import nn

from lightning_weightlight.demo import DigitsCNN
from lightning_weightlight.selection import NoLayerMatchedError, select_layers


@pytest.fixture
def cnn() -> DigitsCNN:
    return DigitsCNN(channels=(4, 8, 8), hidden=16)


def test_default_selects_linear_and_conv(cnn):
    assert list(select_layers(cnn)) == [
        "features.0.conv",
        "features.1.conv",
        "features.2.conv",
        "classifier.0",
        "classifier.3",
    ]


def test_exclude_head_leaves_last_linear(cnn):
    assert "classifier.3" not in select_layers(cnn, exclude_head=True)
    assert "classifier.0" in select_layers(cnn, exclude_head=True)


def test_glob_and_regex_include(cnn):
    assert list(select_layers(cnn, include="features.*")) == [
        "features.0.conv",
        "features.1.conv",
        "features.2.conv",
    ]
    assert list(select_layers(cnn, include=r"re:features\.[12]\.conv")) == [
        "features.1.conv",
        "features.2.conv",
    ]


def test_types_filter(cnn):
    assert list(select_layers(cnn, types="Linear")) == ["classifier.0", "classifier.3"]


def test_exclude_patterns(cnn):
    assert list(select_layers(cnn, exclude=["features.0.*", "classifier.*"])) == [
        "features.1.conv",
        "features.2.conv",
    ]


def test_unmatched_pattern_strict_raises_naming_it(cnn):
    with pytest.raises(NoLayerMatchedError, match=re.escape("'decoder.*'")):
        select_layers(cnn, include="decoder.*")


def test_unmatched_pattern_lenient_warns(cnn):
    with pytest.warns(UserWarning, match=re.escape("'decoder.*'")):
        selected = select_layers(cnn, include=["decoder.*", "classifier.0"], strict=False)
    assert list(selected) == ["classifier.0"]


def test_empty_selection_raises(cnn):
    with pytest.raises(NoLayerMatchedError, match="matches no layer"):
        select_layers(cnn, include="classifier.*", exclude="classifier.*", strict=False)


@pytest.mark.parametrize(
    ("kwargs", "error", "argument"),
    [
        ({"types": "Dense"}, ValueError, "types"),
        ({"types": []}, ValueError, "types"),
        ({"include": "re:("}, ValueError, "include"),
        ({"exclude": [3]}, TypeError, "exclude"),
    ],
)
def test_bad_arguments_name_argument(cnn, kwargs, error, argument):
    with pytest.raises(error, match=argument):
        select_layers(cnn, **kwargs)


def test_embedding_type():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    assert list(select_layers(model, types=["Embedding"])) == ["0"]

"""Adapter names and module-path patterns."""

import re

import pytest

from jadapters.errors import AdapterError
from jadapters.naming import normalize_targets, path_matches, split_adapter_name


@pytest.mark.parametrize(
    "name, expected",
    [
        ("a", ((), "a")),
        (":a", ((), "a")),
        ("encoder:a", (("encoder",), "a")),
        ("encoder+decoder:a_v2", (("encoder", "decoder"), "a_v2")),
    ],
)
def test_split_adapter_name(name, expected):
    assert split_adapter_name(name) == expected


@pytest.mark.parametrize("bad", ["", "encoder:", "a/b", " a", 3])
def test_invalid_names_are_rejected(bad):
    with pytest.raises(AdapterError, match="adapter name"):
        split_adapter_name(bad)


@pytest.mark.parametrize(
    "path, target, expected",
    [
        ("encoder/layers_0", "encoder/layers_0", True),
        ("encoder/layers_0", "encoder/layers_1", False),
        ("encoder/layers_10", "encoder/layers_?", False),
        ("encoder/layers_1", "encoder/layers_?", True),
        ("encoder/layers_1/fc", "encoder/*", False),
        ("encoder/layers_1/fc", "encoder/**", True),
        ("encoder/layers_1/fc", "**/fc", True),
        ("fc", "**/fc", False),
        ("encoder/layers_2", "encoder/layers_[!2]", False),
        ("encoder/layers_3", "encoder/layers_[!2]", True),
        ("a.b", "a.b", True),
        ("axb", "a.b", False),  # dots are literal in globs
        ("axb", "re:a.b", True),
        ("", "", True),
    ],
)
def test_path_matches(path, target, expected):
    assert path_matches(path, target) is expected


def test_normalize_targets_keeps_order_and_regexes():
    assert normalize_targets(["/enc/", re.compile("d.*"), "enc"]) == ("enc", "re:d.*")
    with pytest.raises(AdapterError, match="invalid regular expression target 're:\\('"):
        normalize_targets("re:(")
    with pytest.raises(AdapterError, match="a target must be a path, glob or regex"):
        normalize_targets([3])

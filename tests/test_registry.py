"""kdedge.registry: lazy "module:attribute" lookups with close-match suggestions."""

from __future__ import annotations

import sys

import pytest

from kdedge.registry import UnknownNameError, load, resolve, suggest


def test_resolve_imports_only_the_named_entry() -> None:
    sys.modules.pop("colorsys", None)
    reg = {"dumps": "json:dumps", "hue": "colorsys:rgb_to_hsv", "broken": "no_such_module_xyz:f"}
    assert resolve(reg, "dumps", what="codec")([1]) == "[1]"
    assert "colorsys" not in sys.modules  # another entry is not imported, and a broken one does not matter
    with pytest.raises(ModuleNotFoundError):
        resolve(reg, "broken", what="codec")


def test_unknown_names_get_a_close_match_or_the_known_list() -> None:
    reg = {"resnet20": "x:y", "resnet32": "x:y", "mobilenetv2": "x:y"}
    with pytest.raises(UnknownNameError, match=r"unknown model 'resnet23'; did you mean 'resnet32' or 'resnet20'"):
        resolve(reg, "resnet23", what="model")
    assert suggest("zzz", reg) == "known: mobilenetv2, resnet20, resnet32"

    class MyError(ValueError):
        pass

    with pytest.raises(MyError, match="unknown target 'onxx'"):
        resolve({"onnx": "x:y"}, "onxx", what="target", error=MyError)


def test_load_follows_dotted_attributes_and_refuses_a_bad_entry() -> None:
    assert load("os.path:join.__name__") == "join"
    with pytest.raises(ValueError, match="is not 'module:attribute'"):
        load("json.dumps")

"""The model registry resolves through kdedge.registry, and kdedge.models has no import circle."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import kdedge.models as models
import kdedge.registry as registry

ROOT = Path(__file__).resolve().parent.parent


def test_models_reexports_the_registry_error_and_suggestion():
    # callers catch kdedge.models.UnknownNameError and format with kdedge.models.suggest; the
    # registry's own objects, so one except clause catches every registry's unknown name
    assert models.UnknownNameError is registry.UnknownNameError
    assert models.suggest is registry.suggest
    with pytest.raises(registry.UnknownNameError, match=r"unknown model 'resnet33'; did you mean 'resnet32'"):
        models.create_model("resnet33")
    with pytest.raises(registry.UnknownNameError, match="unknown hne config 'resnett'; did you mean 'resnet'"):
        models.create_model("hne", config="resnett")
    assert models.get_builder("msdnet") is importlib.import_module("kdedge.models.multiexit").msdnet


def test_msdnet_stage_class_lives_beside_the_model_and_stays_importable():
    from kdedge.models.msdnet import MSDNetStage
    from kdedge.models.multiexit import MSDNetStage as again

    assert again is MSDNetStage


def test_no_import_circle_touches_kdedge_models():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "scripts" / "import_graph.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    circles = [c for c in mod.cycles(mod.graph()) if any(m.startswith("kdedge.models") for m in c)]
    assert circles == []

"""Workflows users saved with the pack's first release (the shipped workflows of 0.1.0, copied into legacy/) still
load and run: their nodes (IG4ModelLoader, IG4Sampler with 0 / -1 meaning "the preset's") stay registered as
deprecated nodes with the same widgets, so every stored value keeps its meaning."""

from pathlib import Path

import json

import numpy as np
import pytest
from PIL import Image

from ideogram4_gguf.nodes import NODES

from .tiny_run import for_tiny_models, run_prompt
from .ui_to_api import CONTROL_VALUES, UI_ONLY, convert, kept_nodes, widget_slots

LEGACY = sorted((Path(__file__).parent / "legacy").glob("*.json"))


@pytest.fixture(scope="module")
def object_info():
    from .ui_to_api import pack_object_info

    return pack_object_info()


def test_there_are_legacy_workflows():
    assert len(LEGACY) == 3


@pytest.mark.parametrize("path", LEGACY, ids=lambda p: p.stem)
def test_legacy_workflow_still_fits_the_registered_nodes(path, object_info):
    workflow = json.loads(path.read_text(encoding="utf-8"))
    deprecated = {n.define_schema().node_id for n in NODES if n.define_schema().is_deprecated}
    assert deprecated == {"IG4ModelLoader", "IG4Sampler"}
    types = {n["type"] for n in workflow["nodes"] if n["type"] not in UI_ONLY}
    assert {"IG4ModelLoader", "IG4Sampler"} <= types and types <= set(object_info)
    for node in kept_nodes(workflow):
        slots = widget_slots(object_info[node["type"]])
        assert len(node["widgets_values"]) == len(slots), node["type"]  # no widget moved: values keep their place
        for (name, spec), value in zip(slots, node["widgets_values"]):
            if spec is CONTROL_VALUES:
                assert value in CONTROL_VALUES
    prompt = convert(workflow, object_info)
    sampler = next(e["inputs"] for e in prompt.values() if e["class_type"] == "IG4Sampler")
    assert (sampler["steps"], sampler["polish_steps"], sampler["guidance"]) == (0, -1, 0)  # "the preset's"


@pytest.mark.parametrize("path", LEGACY, ids=lambda p: p.stem)
def test_legacy_workflow_runs(path, object_info, demo_models, tmp_path):
    workflow = json.loads(path.read_text(encoding="utf-8"))
    files = {"diffusion_models": str(demo_models.dit), "text_encoders": str(demo_models.text_encoder),
             "vae": str(demo_models.vae)}
    _, saved = run_prompt(for_tiny_models(convert(workflow, object_info), files), tmp_path)
    with Image.open(saved[0]) as png:
        assert np.asarray(png).shape == (256, 256, 3)

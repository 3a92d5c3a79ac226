"""JSON caption schema tools against the schema of docs/spec.md §4.4 (training format of Ideogram 4)."""

import json

import pytest
from ideogram4_gguf.errors import PromptError
from ideogram4_gguf.prompts.caption import (
    build_caption,
    canonicalize,
    minify,
    obj_element,
    prepare_prompt,
    repair_caption,
    style_description,
    text_element,
    validate_caption,
)


def _valid():
    return {
        "high_level_description": "A vintage travel poster of Kyoto at dusk.",
        "style_description": {
            "aesthetics": "warm, nostalgic",
            "lighting": "golden hour",
            "medium": "screen print",
            "art_style": "mid-century travel poster",
            "color_palette": ["#F2A65A", "#1B3A4B", "#FFFFFF"],
        },
        "compositional_deconstruction": {
            "background": "a sky fading from orange to deep blue",
            "elements": [
                {"type": "obj", "bbox": [300, 100, 950, 900], "desc": "a five-storey pagoda",
                 "color_palette": ["#8C2F1B"]},
                {"type": "text", "bbox": [40, 80, 200, 920], "text": "KYOTO\n京都", "desc": "bold serif title"},
                {"type": "obj", "desc": "a flock of birds"},
            ],
        },
    }


def test_valid_caption_has_no_issues():
    assert validate_caption(_valid()) == []
    assert validate_caption(json.dumps(_valid())) == []


def test_minify_is_canonical_compact_and_literal_unicode():
    shuffled = {
        "compositional_deconstruction": {
            "elements": [{"desc": "bold serif title", "text": "KYOTO\n京都", "bbox": [40, 80, 200, 920], "type": "text"}],
            "background": "sky",
        },
        "style_description": {"photo": "35mm, f/1.8", "medium": "photograph", "lighting": "soft", "aesthetics": "calm"},
        "high_level_description": "Café sign",
    }
    text = minify(shuffled)
    assert text == (
        '{"high_level_description":"Café sign",'
        '"style_description":{"aesthetics":"calm","lighting":"soft","photo":"35mm, f/1.8","medium":"photograph"},'
        '"compositional_deconstruction":{"background":"sky","elements":[{"type":"text","bbox":[40,80,200,920],'
        '"text":"KYOTO\\n京都","desc":"bold serif title"}]}}'
    )
    assert "\\u" not in text and ": " not in text and ", " not in text.replace("35mm, f", "")
    assert json.loads(text) == shuffled  # same content, only the order changed


def test_art_style_order_puts_art_style_after_medium():
    style = canonicalize(_valid())["style_description"]
    assert list(style) == ["aesthetics", "lighting", "medium", "art_style", "color_palette"]


@pytest.mark.parametrize(
    "mutate, path, words",
    [
        (lambda c: c.pop("compositional_deconstruction"), "", "compositional_deconstruction"),
        (lambda c: c["compositional_deconstruction"].pop("background"), "compositional_deconstruction", "background"),
        (lambda c: c["compositional_deconstruction"].pop("elements"), "compositional_deconstruction", "elements"),
        (lambda c: c.update(mood="happy"), "", "unknown key \"mood\""),
        (lambda c: c["style_description"].update(photo="50mm"), "style_description", "exactly one"),
        (lambda c: c["style_description"].pop("art_style"), "style_description", "exactly one"),
        (lambda c: c["style_description"].update(color_palette=["#F2A65A"] * 17), "style_description.color_palette",
         "at most 16"),
        (lambda c: c["style_description"].update(color_palette=["#f2a65a"]), "style_description.color_palette[0]",
         "upper-case"),
        (lambda c: c["style_description"].update(color_palette=["red"]), "style_description.color_palette[0]",
         "#RRGGBB"),
        (lambda c: c["compositional_deconstruction"]["elements"][0].update(color_palette=["#000000"] * 6),
         "compositional_deconstruction.elements[0].color_palette", "at most 5"),
        (lambda c: c["compositional_deconstruction"]["elements"][0].update(bbox=[10, 10, 5, 50]),
         "compositional_deconstruction.elements[0].bbox", "y_min < y_max"),
        (lambda c: c["compositional_deconstruction"]["elements"][0].update(bbox=[0, 0, 500, 1001]),
         "compositional_deconstruction.elements[0].bbox", "0..1000"),
        (lambda c: c["compositional_deconstruction"]["elements"][0].update(bbox=[0.1, 0.1, 0.5, 0.5]),
         "compositional_deconstruction.elements[0].bbox", "4 integers"),
        (lambda c: c["compositional_deconstruction"]["elements"][0].update(bbox=[True, 0, 5, 5]),
         "compositional_deconstruction.elements[0].bbox", "4 integers"),
        (lambda c: c["compositional_deconstruction"]["elements"][0].update(type="image"),
         "compositional_deconstruction.elements[0].type", "\"obj\" or \"text\""),
        (lambda c: c["compositional_deconstruction"]["elements"][1].pop("text"),
         "compositional_deconstruction.elements[1]", "\"text\""),
        (lambda c: c["compositional_deconstruction"]["elements"][0].update(text="oops"),
         "compositional_deconstruction.elements[0]", "unknown key \"text\""),
        (lambda c: c["compositional_deconstruction"]["elements"][2].update(desc=5),
         "compositional_deconstruction.elements[2].desc", "string"),
    ],
)
def test_each_schema_error_is_reported_with_its_path(mutate, path, words):
    caption = _valid()
    mutate(caption)
    errors = [i for i in validate_caption(caption) if i.severity == "error"]
    assert any(i.path == path and words in i.message for i in errors), [str(i) for i in errors]


def test_missing_summary_is_only_a_warning():
    caption = _valid()
    del caption["high_level_description"]
    issues = validate_caption(caption)
    assert [i.severity for i in issues] == ["warning"]


def test_not_an_object_or_not_json():
    assert "not valid JSON" in validate_caption("{oops")[0].message
    assert "JSON object" in validate_caption([1, 2])[0].message


def test_builder_makes_the_valid_caption_and_rejects_bad_parts():
    built = build_caption(
        background="a sky fading from orange to deep blue",
        elements=[
            obj_element("a five-storey pagoda", bbox=[300, 100, 950, 900], color_palette=["#8C2F1B"]),
            text_element("KYOTO\n京都", "bold serif title", bbox=[40, 80, 200, 920]),
            obj_element("a flock of birds"),
        ],
        high_level_description="A vintage travel poster of Kyoto at dusk.",
        style=style_description("warm, nostalgic", "golden hour", "screen print",
                                art_style="mid-century travel poster",
                                color_palette=["#F2A65A", "#1B3A4B", "#FFFFFF"]),
    )
    assert minify(built) == minify(_valid())
    assert list(built) == ["high_level_description", "style_description", "compositional_deconstruction"]
    with pytest.raises(PromptError, match=r"elements\[0\].bbox"):
        build_caption("white", [obj_element("x", bbox=[5, 5, 1, 1])])


def test_prepare_prompt_paths():
    text, warnings = prepare_prompt("a cat on a mat")
    assert text == "a cat on a mat" and "JSON" in warnings[0]
    with pytest.raises(PromptError):
        prepare_prompt("a cat on a mat", strict=True)

    pretty = json.dumps(_valid(), indent=2, ensure_ascii=True)
    text, warnings = prepare_prompt(pretty)
    assert warnings == [] and text == minify(_valid()) and "京都" in text

    text, warnings = prepare_prompt('{"compositional_deconstruction": {"background": "x"')
    assert "does not parse" in warnings[0]
    with pytest.raises(PromptError):
        prepare_prompt('{"compositional_deconstruction": ', strict=True)

    bad = _valid()
    bad["compositional_deconstruction"]["elements"][0]["bbox"] = [900, 0, 100, 10]
    text, warnings = prepare_prompt(json.dumps(bad))
    assert any("bbox" in w for w in warnings) and text == minify(bad)
    with pytest.raises(PromptError, match="bbox"):
        prepare_prompt(json.dumps(bad), strict=True)


def test_repair_fixes_typical_language_model_slips():
    messy = {
        "aspect_ratio": "16:9",
        "high_level_description": "A poster",
        "style_description": {"photo": "85mm", "art_style": "oil", "lighting": "soft", "aesthetics": "calm",
                              "medium": "photo", "color_palette": ["#abc", "ff0000", "#12345G"] + ["#000000"] * 20},
        "compositional_deconstruction": {
            "elements": [
                {"type": "text", "bbox": [800, 900.4, 100, 50], "text": 2026, "desc": "big digits"},
                {"bbox": [0.1, 0.2, 0.3, 0.4], "desc": "a lamp", "color_palette": ["#ffffff"] * 7, "note": "x"},
                {"type": "obj", "bbox": [5, 5, 5, 9], "desc": "a dot"},
                {"type": "obj", "bbox": [-20, 0, 1200, 400]},
                {"type": "text", "text": "SALE"},
                "stray string",
            ],
        },
    }
    fixed, fixes = repair_caption(messy)
    assert validate_caption(fixed) == []
    style = fixed["style_description"]
    assert "art_style" not in style and style["photo"] == "85mm"
    assert style["color_palette"][:2] == ["#AABBCC", "#FF0000"] and len(style["color_palette"]) == 16
    comp = fixed["compositional_deconstruction"]
    assert comp["background"] == "A poster"  # filled from the summary
    elements = comp["elements"]
    assert elements[0] == {"type": "text", "bbox": [100, 50, 800, 900], "text": "2026", "desc": "big digits"}
    assert elements[1] == {"type": "obj", "bbox": [100, 200, 300, 400], "desc": "a lamp",
                           "color_palette": ["#FFFFFF"] * 5}
    assert elements[2] == {"type": "obj", "desc": "a dot"}  # empty box dropped, element kept
    assert elements[3] == {"type": "text", "text": "SALE", "desc": 'the text "SALE"'}
    assert len(elements) == 4  # the desc-less object and the stray string are dropped
    assert any("aspect_ratio" in f for f in fixes) and any("note" in f for f in fixes)
    assert minify(fixed) == minify(canonicalize(fixed))


def test_repair_keeps_a_valid_caption_unchanged():
    fixed, fixes = repair_caption(_valid())
    assert fixes == [] and minify(fixed) == minify(_valid())

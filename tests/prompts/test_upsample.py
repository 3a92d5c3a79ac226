"""Local prompt upsampling: our decoder + lm_head vs transformers 5.24 `Qwen3VLForConditionalGeneration`
(logits and greedy generation on a tiny 36-layer model), seeded sampling, and the reply -> caption repair path."""

import json

import pytest
import torch
from ideogram4_gguf.errors import PromptError
from ideogram4_gguf.models.text_encoder import (
    KVCache,
    Qwen3TextConfig,
    Qwen3TextEncoder,
)
from ideogram4_gguf.prompts.caption import minify, validate_caption
from ideogram4_gguf.prompts.upsample import (
    caption_from_reply,
    fallback_caption,
    first_json_object,
    generate_ids,
    upsample_chat,
    upsample_prompt,
)

from ..conftest import qwen_tokenizer_dir
from ..models.te_reference import TINY_VOCAB, one_cpu_thread, tiny_qwen3vl_generator  # noqa: F401


@pytest.fixture(scope="module")
def reference():
    pytest.importorskip("transformers")
    return tiny_qwen3vl_generator(seed=4)


@pytest.fixture(scope="module")
def ours(reference):
    config = Qwen3TextConfig.from_hf_config(reference.config.to_dict())
    encoder = Qwen3TextEncoder(config, num_layers=config.num_layers, final_norm=True, dtype=torch.float32)
    prefix = "model.language_model."
    encoder.load_state_dict({k[len(prefix):]: v for k, v in reference.state_dict().items() if k.startswith(prefix)})
    head = torch.nn.Linear(32, TINY_VOCAB, bias=False)
    head.weight.data.copy_(reference.lm_head.weight)
    return encoder, head


def test_logits_match_transformers(reference, ours):
    encoder, head = ours
    ids = torch.randint(0, TINY_VOCAB, (19,), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = reference(input_ids=ids[None]).logits[0]
    logits = head(encoder.decode(ids, KVCache()))
    assert (logits - expected).abs().max().item() <= 1e-5


def test_greedy_generation_matches_transformers_generate(reference, ours):
    encoder, head = ours
    prompt = torch.randint(0, TINY_VOCAB, (9,), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = reference.generate(input_ids=prompt[None], attention_mask=torch.ones(1, 9, dtype=torch.long),
                                      max_new_tokens=12, do_sample=False, min_new_tokens=12)[0, 9:].tolist()
    assert generate_ids(encoder, head, prompt.tolist(), max_new_tokens=12) == expected


def test_seeded_sampling_is_reproducible(ours):
    encoder, head = ours
    prompt = [1, 2, 3, 4, 5]
    a = generate_ids(encoder, head, prompt, 10, temperature=1.0, top_p=0.9, seed=11)
    b = generate_ids(encoder, head, prompt, 10, temperature=1.0, top_p=0.9, seed=11)
    c = generate_ids(encoder, head, prompt, 10, temperature=1.0, top_p=0.9, seed=12)
    assert a == b and len(a) == 10 and a != c
    greedy = generate_ids(encoder, head, prompt, 10)
    assert generate_ids(encoder, head, prompt, 10, temperature=1.0, top_p=1e-6, seed=3) == greedy  # top-1 nucleus


def test_stop_token_and_progress(ours):
    encoder, head = ours
    prompt = [7, 8, 9]
    greedy = generate_ids(encoder, head, prompt, 10)
    steps = []
    cut = generate_ids(encoder, head, prompt, 10, stop_ids={greedy[3]}, on_token=lambda s, n: steps.append(s))
    assert cut == greedy[:greedy.index(greedy[3])] and steps == list(range(1, len(cut) + 1))


def test_first_json_object_skips_chatter_and_braces_in_strings():
    reply = 'Sure! Here it is:\n```json\n{"a":"x } y","b":{"c":[1,2]}} trailing {"d":1}'
    assert first_json_object(reply) == '{"a":"x } y","b":{"c":[1,2]}}'
    assert first_json_object("no json here") is None
    assert first_json_object('{"open": "never closed"') is None


def test_reply_is_parsed_repaired_and_bboxes_dropped_by_default():
    reply = ('```json\n{"high_level_description":"A fox","compositional_deconstruction":{"background":"snow",'
             '"elements":[{"type":"obj","bbox":[500,100,200,900],"desc":"a red fox","color_palette":["#ff0000"]},'
             '{"type":"text","text":"WINTER","desc":"white serif"}]},"aspect_ratio":"1:1"}\n```')
    caption, warnings = caption_from_reply(reply, "a fox")
    assert validate_caption(caption) == []
    assert caption["compositional_deconstruction"]["elements"][0] == {"type": "obj", "desc": "a red fox",
                                                                     "color_palette": ["#FF0000"]}
    assert any("aspect_ratio" in w for w in warnings)
    kept, _ = caption_from_reply(reply, "a fox", keep_bboxes=True)
    assert kept["compositional_deconstruction"]["elements"][0]["bbox"] == [200, 100, 500, 900]


@pytest.mark.parametrize("reply", ["I cannot help with that.", '{"high_level_description": "A fox", "compo',
                                   '{"compositional_deconstruction": {"elements": []}}', "[1, 2, 3]"])
def test_unusable_replies_fall_back_to_the_idea(reply):
    caption, warnings = caption_from_reply(reply, "a fox in the snow")
    assert caption == fallback_caption("a fox in the snow")
    assert validate_caption(caption) == [] and "minimal caption" in warnings[-1]
    assert caption["compositional_deconstruction"]["elements"][0]["desc"] == "a fox in the snow"


def test_chat_has_system_instruction_and_reduced_aspect_ratio():
    chat = upsample_chat("  a cat  ", width=1920, height=1080)
    assert chat.startswith("<|im_start|>system\n") and chat.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert "Image aspect ratio (width:height): 16:9\nIdea: a cat<|im_end|>" in chat
    example = first_json_object(chat[chat.index("Idea: a lighthouse"):])
    assert validate_caption(example) == [] and minify(json.loads(example)) == example  # the example is canonical


def test_end_to_end_with_real_tokenizer_and_random_weights():
    from ideogram4_gguf.models.tokenizer import load_qwen_tokenizer

    tokenizer = load_qwen_tokenizer(qwen_tokenizer_dir())
    config = Qwen3TextConfig(vocab_size=151936, hidden_size=16, intermediate_size=32, num_heads=2, num_kv_heads=1,
                             head_dim=8)
    torch.manual_seed(0)
    encoder = Qwen3TextEncoder(config, num_layers=36, final_norm=True, dtype=torch.float32)
    head = torch.nn.Linear(16, 151936, bias=False)
    with torch.no_grad():
        for p in list(encoder.parameters()) + [head.weight]:
            p.normal_(0, 0.3)
    first = upsample_prompt("a red fox", encoder, head, tokenizer, max_new_tokens=6, temperature=0.8, seed=1)
    again = upsample_prompt("a red fox", encoder, head, tokenizer, max_new_tokens=6, temperature=0.8, seed=1)
    assert first.reply == again.reply and first.prompt == again.prompt
    # random weights write noise: the result is still a valid caption, with warnings saying why
    assert validate_caption(first.caption) == [] and first.warnings
    assert any("max_new_tokens" in w for w in first.warnings)
    with pytest.raises(PromptError):
        upsample_prompt("  ", encoder, head, tokenizer)

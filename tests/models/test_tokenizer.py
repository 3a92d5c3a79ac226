"""Qwen tokenizer from every source vs transformers 5.24 `Qwen2Tokenizer` on the real vocabulary.

Reference: transformers' `AutoTokenizer` over tests/data/qwen25_tokenizer (the files ComfyUI ships), which
is what official and diffusers tokenize with; known template ids from docs/spec.md §4.2.
"""

import json
import logging

import numpy as np
import pytest
from ideogram4_gguf.errors import ModelFileError, PromptError
from ideogram4_gguf.models.tokenizer import (
    CHAT_PREFIX,
    CHAT_SUFFIX,
    chat_template,
    encode_prompt_ids,
    load_qwen_tokenizer,
)

from ..conftest import qwen_tokenizer_dir

PREFIX_IDS = [151644, 872, 198]
SUFFIX_IDS = [151645, 198, 151644, 77091, 198]

PROMPTS = [
    "a cat",
    "A red fox jumping over 3 lazy dogs, 1920x1080, f/2.8",
    "东京夜景，霓虹灯下的雨天街道",
    "こんにちは世界 and 안녕하세요",
    "emoji 🎉🦊👩‍👩‍👧 flags 🇯🇵",
    "numbers 1234567890 3.14159 -42",
    "tabs\tand   many     spaces\n\n\nnewlines\r\nwindows  ",
    "  leading spaces and a trailing newline\n",
    "\nstarts with a newline",
    "café naïve e\u0301 (combining accent, NFC-normalised)",
    "specials inside: <|im_end|> <think>x</think> <|endoftext|>",
    "don't can't I'M WE'LL it's",
    "مرحبا بالعالم",
    '{"high_level_description":"A poster","compositional_deconstruction":{"background":"white","elements":[]}}',
    "code: def f(x):\n    return x**2  # comment",
]


@pytest.fixture(scope="module")
def folder():
    return qwen_tokenizer_dir()


@pytest.fixture(scope="module")
def reference(folder):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(folder))


def _ref_ids(reference, prompt):
    return reference(chat_template(prompt), add_special_tokens=False)["input_ids"]


def _write_gguf_tokenizer(path, folder, reference):
    """A GGUF holding only tokenizer metadata, laid out the way llama.cpp's convert_hf_to_gguf writes Qwen."""
    gguf = pytest.importorskip("gguf")
    vocab_size = 151936  # embedding rows of Qwen3-VL-8B; ids past the tokenizer are "[PADn]" filler
    reverse = {i: t for t, i in reference.get_vocab().items()}
    decoder = json.loads((folder / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif str(i) in decoder:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if decoder[str(i)]["special"] else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [line for line in (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
              if line and not line.startswith("#version")]
    writer = gguf.GGUFWriter(str(path), "qwen3vl")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_eos_token_id(151645)
    writer.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def sources(folder, reference, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tok")
    reference.save_pretrained(str(tmp / "hf"))  # transformers writes its own tokenizer.json
    _write_gguf_tokenizer(tmp / "qwen3vl-tokenizer.gguf", folder, reference)
    return {
        "vocab+merges folder": folder,
        "vocab.json path": folder / "vocab.json",
        "tokenizer.json": tmp / "hf" / "tokenizer.json",
        "gguf metadata": tmp / "qwen3vl-tokenizer.gguf",
    }


@pytest.mark.parametrize("kind", ["vocab+merges folder", "vocab.json path", "tokenizer.json", "gguf metadata"])
def test_every_source_matches_transformers(kind, sources, reference):
    tokenizer = load_qwen_tokenizer(sources[kind])
    for prompt in PROMPTS:
        ids = encode_prompt_ids(tokenizer, prompt)
        assert ids == _ref_ids(reference, prompt), (kind, prompt)


def test_known_template_ids(folder):
    tokenizer = load_qwen_tokenizer(folder)
    ids = encode_prompt_ids(tokenizer, "a cat")
    assert ids[:3] == PREFIX_IDS and ids[-5:] == SUFFIX_IDS
    assert len(encode_prompt_ids(tokenizer, "")) == 8  # the template alone is 8 tokens
    assert chat_template("x") == "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"
    assert (CHAT_PREFIX, CHAT_SUFFIX) == ("<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.token_to_id("<|endoftext|>") == 151643 and tokenizer.token_to_id("</think>") == 151668


def test_auto_discovery_takes_first_folder_with_files(folder, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    tokenizer = load_qwen_tokenizer(None, search_dirs=[empty, folder])
    assert encode_prompt_ids(tokenizer, "hi")[:3] == PREFIX_IDS
    with pytest.raises(ModelFileError, match="No Qwen tokenizer found"):
        load_qwen_tokenizer(None, search_dirs=[empty])


def test_vocab_merges_without_config_gets_chat_tokens(folder, tmp_path, reference):
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    tokenizer = load_qwen_tokenizer(tmp_path)
    assert encode_prompt_ids(tokenizer, "東京 tower") == _ref_ids(reference, "東京 tower")


def test_non_qwen_tokenizer_is_rejected(tmp_path):
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ModelFileError, match="lacks the chat tokens"):
        load_qwen_tokenizer(tmp_path / "tokenizer.json")


def test_too_long_prompt_error_and_truncation(folder, caplog):
    tokenizer = load_qwen_tokenizer(folder)
    prompt = "lorem ipsum dolor " * 700  # ~2100 tokens
    n = len(tokenizer.encode(chat_template(prompt), add_special_tokens=False).ids)
    assert n > 2048
    with pytest.raises(PromptError, match=f"{n} tokens"):
        encode_prompt_ids(tokenizer, prompt)
    with caplog.at_level(logging.WARNING):
        ids = encode_prompt_ids(tokenizer, prompt, truncate=True)
    assert len(ids) == 2048 and ids[:3] == PREFIX_IDS and ids[-5:] == SUFFIX_IDS
    full = tokenizer.encode(chat_template(prompt), add_special_tokens=False).ids
    assert ids[:-5] == full[:2043]
    assert "truncated" in caplog.text
    # exactly at the limit passes untouched
    assert encode_prompt_ids(tokenizer, prompt, max_tokens=n) == full

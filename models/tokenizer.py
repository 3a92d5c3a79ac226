"""Qwen2/3 byte-level BPE tokenizer and the Ideogram 4 chat template.

The tokenizer is a `tokenizers.Tokenizer` built from whichever source the user has: a `tokenizer.json`, a
`vocab.json` + `merges.txt` pair (the layout ComfyUI ships as `comfy/text_encoders/qwen25_tokenizer/`), or the
vocabulary stored in a llama.cpp GGUF's metadata. All three give the ids of transformers' `Qwen2Tokenizer`.

The prompt is wrapped in the chat template exactly as official, diffusers and ComfyUI do: a user turn and an
open assistant turn, no system prompt, no `<think>` block, tokenized without extra special tokens.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..errors import ModelFileError, PromptError, quote

logger = logging.getLogger(__name__)

CHAT_PREFIX = "<|im_start|>user\n"
CHAT_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"
# ids of CHAT_SUFFIX in the Qwen vocabulary; the suffix tokenizes alone because <|im_end|> and <|im_start|>
# are special tokens that cut the text, so it is the same 5 ids whatever the prompt.
CHAT_SUFFIX_LEN = 5
MAX_PROMPT_TOKENS = 2048  # official and diffusers limit, template included

# Pre-tokenizer split of Qwen2/Qwen2.5/Qwen3 (source: transformers 5.24 models/qwen2/tokenization_qwen2.py,
# PRETOKENIZE_REGEX; same pattern as llama.cpp's "qwen2" pre-tokenizer).
QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# The three tokens the template needs, with their ids in every Qwen2.5/Qwen3 vocabulary (151643 BPE tokens
# come first). Used when a vocab.json + merges.txt pair arrives without its tokenizer_config.json.
QWEN_CHAT_TOKENS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}

# GGUF `tokenizer.ggml.token_type` values (gguf-py constants.TokenType).
_GGUF_NORMAL, _GGUF_CONTROL, _GGUF_USER_DEFINED = 1, 3, 4


def chat_template(prompt: str) -> str:
    """The exact string the text encoder sees for one prompt."""
    return f"{CHAT_PREFIX}{prompt}{CHAT_SUFFIX}"


# ---------------------------------------------------------------------------------------------------------
# Building a tokenizer from each source


def _qwen_bpe_tokenizer(vocab: dict[str, int], merges: list, source="the tokenizer"):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    try:
        bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)
    except BaseException as exc:  # a bare Exception, or pyo3's PanicException (a BaseException) from Rust
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise ModelFileError(f"{source}: the tokenizer's vocabulary and merges do not fit together "
                             f"({quote(str(exc), 160)}). Use the tokenizer files shipped with the model.") from exc
    tokenizer = Tokenizer(bpe)
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _add_tokens(tokenizer, added: Iterable[tuple[int, str, bool]], source: Path) -> None:
    """Register added tokens (id, content, special) so that they are matched whole, as transformers does."""
    from tokenizers import AddedToken

    for token_id, content, special in sorted(added):
        existing = tokenizer.token_to_id(content)
        if existing is not None and existing == token_id:
            continue
        if tokenizer.get_vocab_size(with_added_tokens=True) != token_id:
            raise ModelFileError(
                f"{source}: added token {quote(content)} has id {token_id}, but the vocabulary has "
                f"{tokenizer.get_vocab_size(with_added_tokens=True)} entries before it; the tokenizer files do "
                "not belong together. Use the tokenizer files shipped with the model."
            )
        token = AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False, single_word=False)
        if special:
            tokenizer.add_special_tokens([token])
        else:
            tokenizer.add_tokens([token])


def _from_vocab_merges(folder: Path):
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    try:
        vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
        merges = []
        for line in merges_path.read_text(encoding="utf-8").splitlines():
            if line.startswith("#version") or not line.strip():
                continue
            left, _, right = line.partition(" ")
            merges.append((left, right))
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"{folder}: cannot read vocab.json / merges.txt ({quote(str(exc), 200)}).") from exc
    if not isinstance(vocab, dict) or not all(isinstance(k, str) and _is_id(v) for k, v in vocab.items()):
        raise ModelFileError(f"{vocab_path}: expected a JSON object of token -> id, found {quote(vocab)}. Use the "
                             "tokenizer files shipped with the model.")
    _check_merges(merges, vocab, merges_path)
    tokenizer = _qwen_bpe_tokenizer(vocab, merges, vocab_path)

    config_path = folder / "tokenizer_config.json"
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
            decoder = config.get("added_tokens_decoder", {})
            added = [(int(i), entry["content"], bool(entry.get("special", True))) for i, entry in decoder.items()]
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ModelFileError(f"{config_path}: not a tokenizer_config.json with an added_tokens_decoder "
                                 f"({quote(str(exc), 200)}). Use the tokenizer files shipped with the model.") from exc
        if not all(isinstance(content, str) and i >= 0 for i, content, _ in added):
            raise ModelFileError(f"{config_path}: added_tokens_decoder holds entries that are not token strings "
                                 "with ids. Use the tokenizer files shipped with the model.")
    else:
        added = [(i, content, True) for content, i in QWEN_CHAT_TOKENS.items()]
    _add_tokens(tokenizer, added, folder)
    return tokenizer


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 31


def _check_merges(merges: list[tuple[str, str]], vocab: dict, source) -> None:
    """Each merge names two tokens of the vocabulary and their concatenation is one too; what the tokenizers
    library needs (it raises a bare Exception, or panics, otherwise)."""
    for number, (left, right) in enumerate(merges):
        merge = f"{left} {right}"
        if not left or not right:
            raise ModelFileError(f"{source}: merge #{number} {quote(merge)} is not two tokens separated by a space. "
                                 "Use the tokenizer files shipped with the model.")
        for part in (left, right, left + right):
            if part not in vocab:
                raise ModelFileError(f"{source}: merge #{number} {quote(merge)} needs the token {quote(part)}, which "
                                     "is not in the vocabulary. Use the tokenizer files shipped with the model.")


def _from_tokenizer_json(path: Path):
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(path))
    except BaseException as exc:  # tokenizers raises a bare Exception on malformed files (or panics in Rust)
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise ModelFileError(f"{path}: not a readable tokenizer.json ({quote(str(exc), 200)}).") from exc
    # A tokenizer.json may carry a post-processor that adds BOS/EOS; the template must be the only framing.
    tokenizer.post_processor = None
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


GGUF_TOKENIZER_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
                      "tokenizer.ggml.token_type", "tokenizer.ggml.merges")


def _from_gguf(path: Path):
    # Metadata only: the file is mapped and validated, no tensor is read (ops' reader parses a 152 k-token
    # vocabulary in a fraction of a second; gguf-py's generic one takes seconds).
    from ..ops import open_gguf

    return tokenizer_from_gguf_metadata(open_gguf(path).metadata, path)


def tokenizer_from_gguf_metadata(metadata: dict, label="GGUF"):
    """The tokenizer stored in a llama.cpp GGUF's metadata (e.g. `GGUFFile.metadata`, already parsed).

    Every value is checked first (types, lengths, duplicate tokens, merges naming unknown tokens): a damaged file
    gives one ModelFileError naming it, never an error from deep inside the tokenizers library."""
    model, tokens = metadata.get("tokenizer.ggml.model"), metadata.get("tokenizer.ggml.tokens")
    if model is None or tokens is None:
        raise ModelFileError(
            f"{label}: this GGUF stores no tokenizer (no tokenizer.ggml.tokens). Point the tokenizer at a "
            "tokenizer.json or a vocab.json + merges.txt folder instead."
        )
    pre = metadata.get("tokenizer.ggml.pre")
    if model != "gpt2" or (pre is not None and not (isinstance(pre, str) and pre.startswith("qwen"))):
        raise ModelFileError(
            f"{label}: its tokenizer is {quote(model)} / pre-tokenizer {quote(pre)}, not the Qwen byte-level BPE "
            "('gpt2' / 'qwen2') that Qwen3-VL uses. Is this the right text-encoder file?"
        )
    tokens = _gguf_list(metadata, "tokenizer.ggml.tokens", str, label)
    types = _gguf_list(metadata, "tokenizer.ggml.token_type", int, label)
    if types is None:
        types = [_GGUF_NORMAL] * len(tokens)
    elif len(types) != len(tokens):
        raise ModelFileError(f"{label}: its metadata has {len(tokens)} tokens but {len(types)} token types; the file "
                             "is damaged: download it again.")
    merges = _gguf_list(metadata, "tokenizer.ggml.merges", str, label) or []
    vocab, added = {}, []
    for token_id, (content, kind) in enumerate(zip(tokens, types)):
        if kind == _GGUF_NORMAL:
            if content in vocab:
                raise ModelFileError(f"{label}: token {quote(content)} appears twice in its vocabulary (ids "
                                     f"{vocab[content]} and {token_id}); the file is damaged: download it again.")
            vocab[content] = token_id
        elif kind in (_GGUF_CONTROL, _GGUF_USER_DEFINED):
            added.append((token_id, content, kind == _GGUF_CONTROL))
        # other types: UNUSED "[PADn]" rows that only pad the embedding table
    pairs = [tuple(m.split(" ", 1)) if " " in m else (m, "") for m in merges]
    _check_merges(pairs, vocab, label)
    tokenizer = _qwen_bpe_tokenizer(vocab, pairs, label)
    _add_tokens(tokenizer, added, Path(str(label)))
    _check_chat_tokens(tokenizer, Path(str(label)))
    return tokenizer


def _gguf_list(metadata: dict, key: str, kind: type, label) -> list | None:
    """metadata[key] as a list of `kind` (None when absent); a ModelFileError naming the key otherwise."""
    value = metadata.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
        raise ModelFileError(f"{label}: its metadata {key} is {quote(value)}, not a list of "
                             f"{'strings' if kind is str else 'integers'}; the file is damaged: download it again.")
    return value


def _resolve(source: Path):
    """The (kind, path) of a tokenizer source, or None when `source` holds none."""
    if source.is_file():
        suffix = source.suffix.lower()
        if suffix == ".gguf":
            return "gguf", source
        if suffix == ".json" and source.name != "vocab.json":
            return "tokenizer.json", source
        if source.name in ("vocab.json", "merges.txt"):
            return _resolve(source.parent)
        return None
    if source.is_dir():
        for folder in (source, source / "tokenizer"):
            if (folder / "tokenizer.json").is_file():
                return "tokenizer.json", folder / "tokenizer.json"
            if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
                return "vocab+merges", folder
    return None


_BUILDERS = {"tokenizer.json": _from_tokenizer_json, "vocab+merges": _from_vocab_merges, "gguf": _from_gguf}


def load_qwen_tokenizer(source: str | os.PathLike | None = None, search_dirs: Sequence[str | os.PathLike] = ()):
    """Load the Qwen BPE tokenizer as a `tokenizers.Tokenizer`.

    `source`: a `tokenizer.json`, a folder holding `tokenizer.json` or `vocab.json` + `merges.txt` (+
    `tokenizer_config.json` for the added tokens), a model folder with a `tokenizer/` subfolder, or a GGUF whose
    metadata stores the vocabulary. With `source=None` the first of `search_dirs` that holds a tokenizer is
    used (the ComfyUI node passes ComfyUI's own `comfy/text_encoders/qwen25_tokenizer`).
    """
    candidates = [Path(source)] if source is not None else [Path(d) for d in search_dirs]
    for candidate in candidates:
        resolved = _resolve(candidate)
        if resolved is None:
            continue
        kind, path = resolved
        tokenizer = _BUILDERS[kind](path)
        _check_chat_tokens(tokenizer, path)
        return tokenizer
    where = ", ".join(str(c) for c in candidates) or "(no folder given)"
    raise ModelFileError(
        f"No Qwen tokenizer found in: {where}. Give a tokenizer.json, a folder with vocab.json and merges.txt "
        "(ComfyUI ships one in comfy/text_encoders/qwen25_tokenizer), or a Qwen3-VL GGUF that stores its "
        "vocabulary."
    )


def _check_chat_tokens(tokenizer, path: Path) -> None:
    missing = [t for t in ("<|im_start|>", "<|im_end|>") if tokenizer.token_to_id(t) is None]
    if missing:
        raise ModelFileError(
            f"{path}: the tokenizer lacks the chat tokens {missing}; it is not a Qwen2.5/Qwen3 tokenizer."
        )


# ---------------------------------------------------------------------------------------------------------
# Prompt -> ids


def encode_prompt_ids(tokenizer, prompt: str, max_tokens: int = MAX_PROMPT_TOKENS, truncate: bool = False) -> list[int]:
    """Token ids of `prompt` inside the chat template, at most `max_tokens` of them (template included).

    The whole rendered string is tokenized at once, as the references do: the prompt's first characters can
    merge with the newline after `user`. Too long: `PromptError` with the count, or with `truncate=True` the
    prompt tokens are cut (the template's closing tokens are kept) and a warning is logged.
    """
    if not isinstance(prompt, str):
        raise PromptError(f"The prompt must be a string, got {type(prompt).__name__}.")
    ids = tokenizer.encode(chat_template(prompt), add_special_tokens=False).ids
    if len(ids) <= max_tokens:
        return list(ids)
    if not truncate:
        raise PromptError(
            f"The prompt is {len(ids)} tokens long with the chat template; the text encoder takes at most "
            f"{max_tokens}. Shorten the prompt by about {len(ids) - max_tokens} tokens, or let it be cut (the "
            "`truncate` switch of Qwen3-VL Encode, `--truncate` on the command line)."
        )
    if max_tokens <= CHAT_SUFFIX_LEN + 3:
        raise PromptError(f"max_tokens={max_tokens} leaves no room for the prompt inside the chat template.")
    kept = list(ids[: max_tokens - CHAT_SUFFIX_LEN]) + list(ids[-CHAT_SUFFIX_LEN:])
    logger.warning(
        "Prompt truncated from %d to %d tokens (template included); the end of the prompt was dropped.",
        len(ids),
        max_tokens,
    )
    return kept

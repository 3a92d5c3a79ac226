"""One damaged demo file per escape class the GGUF fuzz test found before the loaders checked their input: each
must now fail with one pack error line that names the file and the value at fault (tests/test_fuzz_gguf.py runs
thousands of random ones; these are the named regressions).

Files: the demo's two-branch Q4_K DiT and llama.cpp-style text-encoder GGUFs, edited with tests/gguf_fuzz.py's
`Layout` (docs/spec.md §G1).
"""

import math
import struct

import pytest
import torch
from gguf_fuzz import ARR, F32, I32, KV, STR, U32, U64, Layout, enc_array, enc_scalar, enc_str
from ideogram4_gguf.errors import GGUFFormatError, Ideogram4Error, ModelFileError
from ideogram4_gguf.models.dit_loader import load_dit_branches
from ideogram4_gguf.models.text_encoder_loader import load_text_encoder
from ideogram4_gguf.models.tokenizer import encode_prompt_ids, tokenizer_from_gguf_metadata


def _set(key, vtype, raw):
    def edit(layout):
        kv = layout.kv(key.encode())
        if kv is None:
            layout.kvs.append(KV(key.encode(), vtype, raw))
        else:
            kv.vtype, kv.raw = vtype, raw
    return edit


def _strings(*items):
    return enc_array(STR, [enc_str(s.encode() if isinstance(s, str) else s) for s in items])


def _ints(item_type, *items):
    return enc_array(item_type, [enc_scalar(item_type, v) for v in items])


def _edit_strings(key, fn):
    def edit(layout):
        kv = layout.kv(key.encode())
        count = struct.unpack_from("<Q", kv.raw, 4)[0]
        pos, items = 12, []
        for _ in range(count):
            n = struct.unpack_from("<Q", kv.raw, pos)[0]
            items.append(kv.raw[pos + 8:pos + 8 + n])
            pos += 8 + n
        kv.raw = _strings(*fn(items))
    return edit


def _drop_tensor(name):
    def edit(layout):
        layout.tensors = [t for t in layout.tensors if t.name != name.encode()]
    return edit


def _dims(name, dims):
    def edit(layout):
        next(t for t in layout.tensors if t.name == name.encode()).dims = list(dims)
    return edit


def _load_dit(path):
    load_dit_branches(path, compute_dtype=torch.float32)


def _load_text_encoder(path):
    encoder = load_text_encoder(path, compute_dtype=torch.float32)
    tokenizer = tokenizer_from_gguf_metadata(encoder.tokenizer_metadata, str(path))
    encode_prompt_ids(tokenizer, "a poster")


CQ = "conditional_transformer."
DIT_CASES = {
    "rope_theta list": (_set("ideogram4.rope_theta", ARR, _ints(U32, 1, 2)), ModelFileError,
                        r"ideogram4\.rope_theta is \[1, 2\]; expected a finite number"),
    "rope_theta nan": (_set("ideogram4.rope_theta", F32, enc_scalar(F32, math.nan)), ModelFileError,
                       r"ideogram4\.rope_theta is nan"),
    "rope_theta inf": (_set("ideogram4.rope_theta", F32, enc_scalar(F32, math.inf)), ModelFileError,
                       r"ideogram4\.rope_theta is inf"),
    "rope_theta string": (_set("ideogram4.rope_theta", STR, enc_str(b"x")), ModelFileError,
                          r"ideogram4\.rope_theta is 'x'"),
    "mrope_section 7": (_set("ideogram4.mrope_section", U32, enc_scalar(U32, 7)), ModelFileError,
                        r"ideogram4\.mrope_section is 7; expected three non-negative integers"),
    "mrope_section huge": (_set("ideogram4.mrope_section", ARR, _ints(U64, *(2**40,) * 3)), ModelFileError,
                           r"ideogram4\.mrope_section is \[1099511627776, "),
    "mrope_section long": (_set("ideogram4.mrope_section", ARR, _ints(U32, *range(3000))), ModelFileError,
                           r"ideogram4\.mrope_section is \[0, 1, 2, 3, \.\.\. \(3000 items\)\]"),
    "num_heads zero": (_set("ideogram4.num_heads", U32, enc_scalar(U32, 0)), ModelFileError,
                       r"ideogram4\.num_heads is 0; expected an integer from 1"),
    "hidden_size huge": (_set("ideogram4.hidden_size", U64, enc_scalar(U64, 2**63)), ModelFileError,
                         r"ideogram4\.hidden_size is 9223372036854775808"),
    "norm_eps list": (_set("ideogram4.norm_eps", ARR, _ints(U32, 1)), ModelFileError, r"ideogram4\.norm_eps is \[1\]"),
    "norm_q of rank 2": (_dims(CQ + "layers.0.attention.norm_q.weight", (64, 2)), ModelFileError,
                         r"layers\.0\.attention\.norm_q\.weight has shape \(2, 64\), expected 1"),
    "input_proj of rank 1": (_dims(CQ + "input_proj.weight", (256 * 128,)), ModelFileError,
                             r"input_proj\.weight has shape \(32768,\), expected 2"),
    "rows traded for columns": (_dims(CQ + "layers.1.feed_forward.w2.weight", (1024, 128)), ModelFileError,
                                (r"do not have the shape this model needs \(e\.g\. layers\.1\.feed_forward\.w2\.weight "
                                 r"is \(128, 1024\), expected \(256, 512\)\)")),
    "branch prefix metadata list of numbers": (
        _set("ideogram4.branch_prefixes", ARR, _ints(U32, 1, 2)), None, None),  # ignored: the names decide
}

TE_CASES = {
    "tokens as a number": (_set("tokenizer.ggml.tokens", U32, enc_scalar(U32, 5)), ModelFileError,
                           r"tokenizer\.ggml\.tokens is 5, not a list of strings"),
    "merges as floats": (_set("tokenizer.ggml.merges", ARR, _ints(F32, 1.5)), ModelFileError,
                         r"tokenizer\.ggml\.merges is \[1\.5\], not a list of strings"),
    "token_type as strings": (_set("tokenizer.ggml.token_type", ARR, _strings("a")), ModelFileError,
                              r"tokenizer\.ggml\.token_type is \['a'\], not a list of integers"),
    "token_type too short": (_set("tokenizer.ggml.token_type", ARR, _ints(I32, 1, 1)), ModelFileError,
                             r"387 tokens but 2 token types"),
    "merge of unknown tokens": (_edit_strings("tokenizer.ggml.merges", lambda m: [b"zz qq"] + m[1:]),
                                ModelFileError, r"merge #0 'zz qq' needs the token 'zz', which is not in the vocab"),
    "merge without a space": (_edit_strings("tokenizer.ggml.merges", lambda m: [b"ab"] + m[1:]), ModelFileError,
                              r"merge #0 'ab ' is not two tokens separated by a space"),
    "duplicate token": (_edit_strings("tokenizer.ggml.tokens", lambda t: [t[1]] + t[1:]), ModelFileError,
                        r"token '.' appears twice in its vocabulary \(ids 0 and 1\)"),
    "tokenizer model 64 KiB": (_set("tokenizer.ggml.model", STR, enc_str(b"x" * 65536)), ModelFileError,
                               r"its tokenizer is 'x+\.\.\. \(65536 characters\) / pre-tokenizer 'qwen2'"),
    "freq_base list": (_set("qwen3vl.rope.freq_base", ARR, _ints(U32, 1)), ModelFileError,
                       r"'qwen3vl\.rope\.freq_base' is \[1\]; expected a number"),
    "freq_base zero": (_set("qwen3vl.rope.freq_base", F32, enc_scalar(F32, 0.0)), ModelFileError,
                       r"'qwen3vl\.rope\.freq_base' is 0\.0"),
    "eps nan": (_set("qwen3vl.attention.layer_norm_rms_epsilon", F32, enc_scalar(F32, math.nan)), ModelFileError,
                r"layer_norm_rms_epsilon' is nan"),
    "architecture a number": (_set("general.architecture", U32, enc_scalar(U32, 3)), ModelFileError,
                              r"general\.architecture is 3, not a name"),
    "missing gate projection": (_drop_tensor("blk.0.ffn_gate.weight"), ModelFileError,
                                r"tensors layers\.0\.mlp\.gate_proj\.weight are missing"),
    "missing layer 20 projection": (_drop_tensor("blk.20.attn_v.weight"), ModelFileError,
                                    r"1 text-encoder tensor\(s\) are missing \(e\.g\. layers\.20\.self_attn\.v_proj"),
    "q_norm of rank 2": (_dims("blk.0.attn_q_norm.weight", (16, 2)), ModelFileError,
                         r"layers\.0\.self_attn\.q_norm\.weight has shape \(2, 16\), expected 1"),
    "embedding rank 1": (_dims("token_embd.weight", (64 * 387,)), ModelFileError,
                         r"embed_tokens\.weight has shape \(24768,\), expected 2"),
    "embedding row not whole blocks": (_dims("token_embd.weight", (48, 516)), GGUFFormatError,
                                       r"'token_embd\.weight' \(Q8_0\) has rows of 48 values, not a multiple"),
    "a layer shape": (_dims("blk.7.attn_k.weight", (32, 64)), ModelFileError,
                      r"layers\.7\.self_attn\.k_proj\.weight is \(64, 32\), expected \(32, 64\)"),
    "layer numbering gap": (_drop_tensor("blk.3.attn_norm.weight"), ModelFileError,
                            r"not numbered 0 \.\. n-1 \(layer 3 is missing"),
}


def _run(tmp_path, base_path, edit, load, error, match):
    layout = Layout.parse(base_path.read_bytes())
    edit(layout)
    path = tmp_path / "damaged.gguf"
    path.write_bytes(layout.to_bytes())
    if error is None:
        load(path)
        return
    with pytest.raises(error, match=match) as info:
        load(path)
    message = str(info.value)
    assert isinstance(info.value, Ideogram4Error) and isinstance(info.value, ValueError)
    assert str(path) in message and "\n" not in message and len(message) < 1000


@pytest.mark.parametrize("case", list(DIT_CASES))
def test_damaged_dit_metadata_and_shapes(tmp_path, demo_models, case):
    _run(tmp_path, demo_models.dit, *DIT_CASES[case][:1], _load_dit, *DIT_CASES[case][1:])


@pytest.mark.parametrize("case", list(TE_CASES))
def test_damaged_text_encoder_metadata_and_tensors(tmp_path, demo_models, case):
    _run(tmp_path, demo_models.text_encoder, *TE_CASES[case][:1], _load_text_encoder, *TE_CASES[case][1:])


def test_config_overrides_are_checked(demo_models):
    with pytest.raises(ModelFileError, match=r"config_overrides\['rope_theta'\] is -1; expected a finite number"):
        load_dit_branches(demo_models.dit, config_overrides={"rope_theta": -1})
    with pytest.raises(ModelFileError, match="config_overrides: unknown field.*'theta'"):
        load_dit_branches(demo_models.dit, config_overrides={"theta": 5e6})
    # a valid override still wins over the file's metadata
    cond, _, _ = load_dit_branches(demo_models.dit, config_overrides={"rope_theta": 1e4})
    assert cond.config.rope_theta == 1e4


def test_config_overrides_replace_damaged_metadata(tmp_path, demo_models):
    layout = Layout.parse(demo_models.dit.read_bytes())
    _set("ideogram4.rope_theta", F32, enc_scalar(F32, math.nan))(layout)
    path = tmp_path / "nan-theta.gguf"
    path.write_bytes(layout.to_bytes())
    with pytest.raises(ModelFileError, match="rope_theta is nan.*pass config_overrides"):
        load_dit_branches(path)
    cond, _, _ = load_dit_branches(path, config_overrides={"rope_theta": 5e6})
    assert cond.config.rope_theta == 5e6

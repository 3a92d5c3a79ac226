"""Tiny Qwen3-VL reference models (transformers 5.24) shared by the text-encoder and upsampling tests.

Config from docs/spec.md §8.2: the real depth (36 layers, so the real taps) at width 32; every parameter re-randomised
(transformers' init leaves the norms at 1).
"""

import pytest
import torch

TINY_VOCAB = 512
TINY_TEXT_CONFIG = dict(
    vocab_size=TINY_VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=36,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [2, 1, 1], "mrope_interleaved": True},
)
TINY_VISION_CONFIG = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                          num_position_embeddings=16, deepstack_visual_indexes=[0], patch_size=4)


def tiny_qwen3vl_config():
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(text_config=dict(TINY_TEXT_CONFIG), vision_config=dict(TINY_VISION_CONFIG))


def randomise_(model, seed: int):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            # norm weights around 1 (realistic scale), everything else N(0, 0.2)
            p.copy_(1.0 + 0.2 * noise if p.ndim == 1 else 0.2 * noise)
    return model


def tiny_qwen3vl_model(seed: int = 0, dtype=torch.float32):
    """transformers `Qwen3VLModel` (language model + vision tower), eval mode.

    Other dtypes are built the way `from_pretrained(dtype=...)` builds them (RoPE `inv_freq` stays fp32); a
    `.to(torch.bfloat16)` after construction would also round `inv_freq` to bf16, which no loader does.
    """
    from transformers import Qwen3VLModel

    model = randomise_(Qwen3VLModel(tiny_qwen3vl_config()), seed).eval()
    if dtype == torch.float32:
        return model
    cast = Qwen3VLModel._from_config(tiny_qwen3vl_config(), dtype=dtype).eval()
    cast.load_state_dict({k: v.to(dtype) for k, v in model.state_dict().items()})
    return cast


def tiny_qwen3vl_generator(seed: int = 0):
    """transformers `Qwen3VLForConditionalGeneration` (the same body + lm_head), fp32, eval mode."""
    from transformers import Qwen3VLForConditionalGeneration

    return randomise_(Qwen3VLForConditionalGeneration(tiny_qwen3vl_config()), seed).eval()


def text_state_dict(model) -> dict:
    """The language-model tensors of a `Qwen3VLModel` under our canonical names (prefix stripped)."""
    prefix = "language_model."
    return {k[len(prefix):]: v for k, v in model.state_dict().items() if k.startswith(prefix)}


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    """Tiny models are all per-op overhead: on a shared 2-core machine a second intra-op thread makes them
    several times slower (measured 58 s vs 16 s for the loader tests), so these modules run single-threaded."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

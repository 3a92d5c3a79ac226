"""A tiny diffusers 0.42.1 `Ideogram4Pipeline` (docs/spec.md §8.2-§8.4): tiny DiT pair, tiny Qwen3-VL, toy tokenizer.

The VAE is never run (output_type="latent"); it has four levels only so that the pipeline's pixel-to-token factor
is 16 like the real model's, which lets both sides use the same pixel sizes and resolution shift.
"""

from __future__ import annotations

import pathlib
import sys

import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Ideogram4Pipeline
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3VLConfig, Qwen3VLModel

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "models"))
from dit_reference import TE_HIDDEN, randomize_, tiny_diffusers_dit  # noqa: E402

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for part in message['content'] %}{{ part['text'] }}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def toy_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level WordLevel tokenizer with the ChatML specials (docs/spec.md §8.4)."""
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {"<pad>": 0, "<unk>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>")
    wrapped.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def tiny_text_encoder(vocab_size: int, seed: int) -> Qwen3VLModel:
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=TE_HIDDEN,
            intermediate_size=64,
            num_hidden_layers=36,  # diffusers hard-codes tap 35
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [2, 1, 1],
                             "mrope_interleaved": True},
        ),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=TE_HIDDEN,
                           num_position_embeddings=16, deepstack_visual_indexes=[0], patch_size=4),
    )
    return randomize_(Qwen3VLModel(config), seed, std=0.3).eval()


def tiny_pipeline(seed: int = 0) -> Ideogram4Pipeline:
    tokenizer = toy_tokenizer()
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=8,
        norm_num_groups=8,
        sample_size=32,
    )
    return Ideogram4Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=tiny_text_encoder(len(tokenizer), seed + 1),
        tokenizer=tokenizer,
        transformer=tiny_diffusers_dit(seed + 2),
        unconditional_transformer=tiny_diffusers_dit(seed + 3),
    )


def pipeline_text_features(pipe: Ideogram4Pipeline, prompt: str, max_sequence_length: int) -> torch.Tensor:
    """The (n, 13 * TE_HIDDEN) text features the pipeline feeds its DiT, padding rows dropped."""
    with torch.no_grad():
        features, _, _, indicator = pipe.encode_prompt(prompt, 1, 1, max_sequence_length, torch.device("cpu"))
    return features[0, indicator[0] == 3]

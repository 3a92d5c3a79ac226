"""Command line: `python -m ideogram4_gguf {demo,generate,download}` (also the `ideogram4-gguf` script).

Same code path as the ComfyUI nodes (`pipeline.py`).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys

from .errors import Ideogram4Error, ModelFileError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ideogram4_gguf",
                                     description="Ideogram 4 from a two-branch GGUF: demo, generate, download.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the whole pipeline on tiny random models (CPU, seconds)")
    demo.add_argument("--out", default="demo.png", help="PNG to write (default demo.png)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--write-models", metavar="DIR",
                      help="write the tiny model set into DIR in ComfyUI's models/ layout (diffusion_models/, "
                           "text_encoders/, vae/) instead of the cache, then run on it")

    gen = sub.add_parser("generate", help="text -> image with real (or any) model files")
    gen.add_argument("prompt", help="a JSON caption (recommended) or plain text; '@file.json' reads a file")
    gen.add_argument("--dit", required=True, help="two-branch GGUF (or the conditional file of a pair)")
    gen.add_argument("--uncond", help="the unconditional DiT file when --dit holds one branch")
    gen.add_argument("--text-encoder", required=True, help="Qwen3-VL text encoder: GGUF, safetensors, folder")
    gen.add_argument("--tokenizer", help="tokenizer.json or folder (default: from the GGUF / beside the encoder)")
    gen.add_argument("--vae", required=True, help="FLUX.2 VAE (.safetensors or the base repo's vae/ folder)")
    gen.add_argument("--width", type=int, default=1024)
    gen.add_argument("--height", type=int, default=1024)
    gen.add_argument("--seed", type=int, default=0, help="0 .. 2^64-1 (negative seeds are refused)")
    gen.add_argument("--batch", type=int, default=1, help="images per run, 1..16")
    gen.add_argument("--preset", choices=("quality", "default", "turbo"), default="default")
    gen.add_argument("--steps", type=int)
    gen.add_argument("--guidance", type=float)
    gen.add_argument("--polish-steps", type=int)
    gen.add_argument("--polish-guidance", type=float)
    gen.add_argument("--mu", type=float)
    gen.add_argument("--std", type=float)
    gen.add_argument("--terminal", choices=("official", "one"))
    gen.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto")
    gen.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when present)")
    gen.add_argument("--kernel", choices=("auto", "triton", "torch"), default="auto")
    gen.add_argument("--tiled", choices=("auto", "on", "off"), default="auto", help="tiled VAE decode")
    gen.add_argument("--strict-prompt", action="store_true", help="refuse prompts that are not valid captions")
    gen.add_argument("--truncate", action="store_true", help="cut prompts longer than 2048 tokens")
    gen.add_argument("--upsample", action="store_true",
                     help="treat the prompt as a short idea and let the text encoder write the JSON caption first "
                          "(needs an lm_head: a llama.cpp Qwen3-VL GGUF carries one, else --lm-head)")
    gen.add_argument("--lm-head", help="file holding the language-model head for --upsample")
    gen.add_argument("--upsample-temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    gen.add_argument("--branch-prefixes", metavar="COND,UNCOND",
                     help="the tensor-name prefixes of the two branches when a two-branch file does not say which is "
                          "which (an empty side: bare names)")
    gen.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH[:BRANCH]]",
                     help="apply a LoRA (safetensors; repeatable): strength default 1.0 (negative allowed), branch "
                          "auto | cond | uncond | both (auto: the branch the file was trained for)")
    gen.add_argument("--out", default="ideogram4.png")

    dl = sub.add_parser("download", help="download the model files into ComfyUI's models/ folder")
    dl.add_argument("--models-dir", required=True, help="ComfyUI's models folder")
    dl.add_argument("--skip-dit", action="store_true", help="only the text encoder, tokenizer and VAE")
    dl.add_argument("--skip-base", action="store_true", help="only the Q4_K DiT")
    dl.add_argument("--yes", action="store_true", help="do not ask before downloading")
    return parser


def _demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, models_dir=args.write_models, seed=args.seed)
    return 0


def _read_prompt(text: str) -> str:
    if text.startswith("@"):
        with open(text[1:], encoding="utf-8") as f:
            return f.read()
    return text


def parse_lora_spec(spec: str) -> tuple[str, float, str]:
    r"""FILE[:STRENGTH[:BRANCH]] -> (file, strength, branch); read from the right, so paths with colons (C:\...) work."""
    from . import pipeline

    parts = spec.split(":")
    branch, strength = "auto", 1.0
    if len(parts) > 1 and parts[-1] in pipeline.BRANCH_CHOICES:
        branch = parts.pop()
    if len(parts) > 1:
        try:
            strength = float(parts[-1]) if parts[-1] else 1.0
            parts.pop()
        except ValueError:
            pass
    path = ":".join(parts)
    if not path:
        raise ModelFileError(f"--lora {spec!r}: no file given (FILE[:STRENGTH[:BRANCH]]).")
    if not math.isfinite(strength):
        raise ModelFileError(f"--lora {spec!r}: the strength must be a finite number.")
    return path, strength, branch


def parse_branch_prefixes(text):
    """"COND,UNCOND" (an empty side: bare tensor names) -> (cond_prefix, uncond_prefix); None for no option."""
    if text is None:
        return None
    parts = text.split(",")
    if len(parts) != 2:
        raise ModelFileError(f"--branch-prefixes {text!r}: give two prefixes, COND,UNCOND (e.g. "
                             "'model.transformer.,model.unconditional_transformer.'; an empty side means bare names).")
    return tuple(parts)


def _generate(args) -> int:
    from tqdm import tqdm

    from . import pipeline

    # 1. Everything cheap first: numbers, device, output folder, file headers, LoRAs, the prompt's length.
    overrides = dict(steps=args.steps, guidance=args.guidance, polish_steps=args.polish_steps,
                     polish_guidance=args.polish_guidance, mu=args.mu, std=args.std, terminal=args.terminal)
    pipeline.check_settings(args.width, args.height, args.seed, args.batch, args.preset, **overrides)
    device = pipeline.resolve_device(args.device)
    pipeline.check_output_path(args.out)
    branch_prefixes = parse_branch_prefixes(args.branch_prefixes)
    dit_config = pipeline.check_dit_file(args.dit, args.uncond, branch_prefixes)
    pipeline.check_text_encoder_file(args.text_encoder)
    pipeline.check_vae_file(args.vae)
    loras = []
    for spec in args.lora:
        path, strength, branch = parse_lora_spec(spec)
        loras.append((pipeline.read_lora(path, branch="auto" if branch == "both" else branch), strength, branch))
    prompt = _read_prompt(args.prompt)
    if args.upsample:
        print(f"upsampling the idea with {args.lm_head or args.text_encoder} ...", file=sys.stderr)
        result = pipeline.upsample(args.text_encoder, prompt, width=args.width, height=args.height, seed=args.seed,
                                   temperature=args.upsample_temperature, lm_head_path=args.lm_head,
                                   tokenizer_source=args.tokenizer, compute_dtype=args.dtype, device=device)
        for warning in result.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        prompt = result.prompt
        print(f"caption: {prompt}", file=sys.stderr)
    tokenizer = pipeline.load_tokenizer(args.text_encoder, args.tokenizer)
    tokens = pipeline.check_prompt_length(tokenizer, prompt, strict=args.strict_prompt, truncate=args.truncate)

    # 2. The text encoder (loaded, run, freed), then the DiT: they never share the device.
    print(f"encoding the prompt ({tokens} tokens) with {args.text_encoder} ...", file=sys.stderr)
    conditioning = pipeline.encode_prompt(args.text_encoder, prompt, tokenizer=tokenizer, compute_dtype=args.dtype,
                                          device=device, strict=args.strict_prompt, truncate=args.truncate,
                                          expected_feature_dim=dit_config.llm_features_dim)
    print(f"loading the DiT from {args.dit} ...", file=sys.stderr)
    model = pipeline.load_model(args.dit, args.uncond, compute_dtype=args.dtype, kernel=args.kernel, device=device,
                                branch_prefixes=branch_prefixes)
    for lora, strength, branch in loras:
        model = model.with_lora(lora, strength, "both" if branch == "both" else "auto")
        print(f"LoRA {lora.summary()}; strength {strength:g}", file=sys.stderr)
    print(model.summary(), file=sys.stderr)
    with tqdm(desc="sampling", unit="step", file=sys.stderr) as bar:
        def progress(step, total, x0):
            bar.total = total
            bar.update(step - bar.n)

        latent = pipeline.sample_latents(model, conditioning, width=args.width, height=args.height, seed=args.seed,
                                         batch_size=args.batch, preset=args.preset, callback=progress, **overrides)
    model.offload()
    vae = pipeline.load_vae(args.vae, device=device)
    image = pipeline.decode(vae, latent, tiled=args.tiled)
    for path in pipeline.save_png(image, args.out):
        print(path)
    return 0


def _download(args) -> int:
    from .download import download, node_inputs

    download(args.models_dir, include_dit=not args.skip_dit, include_base=not args.skip_base, yes=args.yes)
    print("\nIn ComfyUI pick:")
    for node, name in node_inputs(args.models_dir).items():
        print(f"  {node}: {name}")
    return 0


COMMANDS = {"demo": _demo, "generate": _generate, "download": _download}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return COMMANDS[args.command](args)
    except (Ideogram4Error, OSError) as exc:
        # what the pack refuses on purpose, and files the system cannot read or write: one line. Anything else
        # (a RuntimeError from torch, say) is a bug and keeps its traceback.
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

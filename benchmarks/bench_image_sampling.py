"""Sampling k answers per image prompt (run by hand, never in CI): preftune's sampler against ``generate``.

    python benchmarks/bench_image_sampling.py [--prompts 16] [--samples 4] [--new-tokens 16] [--reps 3]

The model is LLaVA-shaped and random (``--vision-layers`` CLIP layers on 224-px images in 14-px patches:
256 image tokens a prompt; the embedded 260K language model widened to ``--hidden``), so the vision tower
and the prompt's image tokens cost what they do in real models relative to the answer. Two ways to draw
``--samples`` answers for each of ``--prompts`` prompts in one batch:

* preftune (``preftune.model.image_sampling.sample_with_images``): the vision tower once per image, the
  prompt (its image tokens included) once, its KV cache repeated for the k samples, then token-by-token
  decoding;
* ``generate`` with each prompt and its pixels repeated k times (how TRL's online trainers draw k
  completions: ``num_generations`` copies of the prompt): the tower and the prompt k times each.

Both draw from the same distribution (pure sampling at T = 1); the report gives the median wall time
over ``--reps`` and the vision tower's input rows. Results go to ``benchmarks/IMAGE_SAMPLING.md``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_common import machine_text, versions_line


def build(directory: Path, hidden: int, vision_layers: int) -> Path:
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from preftune.lab.vision_model import CHAT_TEMPLATE
    from preftune.model.hub import EMBEDDED_MODEL

    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_MODEL)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                       num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                       max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    vision = CLIPVisionConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=vision_layers,
                              num_attention_heads=6, image_size=224, patch_size=14)
    config = LlavaConfig(vision_config=vision, text_config=text, image_seq_length=256,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    processor = LlavaProcessor(CLIPImageProcessor(size={"shortest_edge": 224},
                                                  crop_size={"height": 224, "width": 224}),
                               tokenizer, patch_size=14, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def prompts(directory: Path, n: int, tokenizer, images):
    from PIL import Image

    from preftune.data.images import parse_images
    from preftune.data.tokenize import Budgets, PairTokenizer

    refs, texts = [], []
    for i in range(n):
        seeded = torch.Generator().manual_seed(i)
        pixels = torch.randint(0, 256, (224, 224, 3), generator=seeded, dtype=torch.uint8)
        path = directory / f"img{i}.png"
        Image.fromarray(pixels.numpy()).save(path)
        refs.append(parse_images([str(path)], directory))
        parts = [{"type": "image"}, {"type": "text", "text": f"Question {i}: what is in the picture?"}]
        texts.append(tokenizer.apply_chat_template([{"role": "user", "content": parts}], tokenize=False,
                                                   add_generation_prompt=True))
    return PairTokenizer(tokenizer, Budgets(None, None, None), images).encode_prompts(texts, refs), refs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vision-layers", type=int, default=6)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).with_name("IMAGE_SAMPLING.md")))
    args = parser.parse_args()

    from preftune.model.image_sampling import sample_with_images
    from preftune.model.load import load_model, load_tokenizer
    from preftune.model.vision import load_image_inputs

    work = Path(tempfile.mkdtemp(prefix="bench-image-sampling-"))
    directory = build(work / "model", args.hidden, args.vision_layers)
    tokenizer = load_tokenizer(str(directory))
    images = load_image_inputs(str(directory), tokenizer)
    model = load_model(str(directory)).eval()
    ids, refs = prompts(work, args.prompts, tokenizer, images)
    k, pad = args.samples, tokenizer.pad_token_id
    tower_rows: list[int] = []
    model.model.vision_tower.register_forward_pre_hook(lambda m, a: tower_rows.append(a[0].shape[0]))

    def ours() -> int:
        drawn = sample_with_images(model, images, ids, refs, num_samples=k, max_new_tokens=args.new_tokens,
                                   stop_ids=[], pad_id=pad, generator=torch.Generator().manual_seed(0))
        return sum(len(t) for t in drawn.tokens)

    def theirs() -> int:
        width = max(len(p) for p in ids)
        rows = [p for p in ids for _ in range(k)]
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows])
        pixels = images.pixel_values([r for rs in refs for r in rs for _ in range(k)])
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([[pad] * (width - len(p)) + p for p in rows]),
                                 attention_mask=mask,
                                 pixel_values=pixels, do_sample=True, top_k=0, top_p=1.0,
                                 max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                 pad_token_id=pad)
        return (out.shape[1] - width) * out.shape[0]

    results = {}
    for name, fn in (("preftune sample_with_images", ours), ("generate, prompts repeated k times", theirs)):
        fn()  # warm-up
        tower_rows.clear()
        times = []
        for _ in range(args.reps):
            start = time.perf_counter()
            tokens = fn()
            times.append(time.perf_counter() - start)
        results[name] = (statistics.median(times), tokens, tower_rows[0])
    base = results["generate, prompts repeated k times"][0]
    command = (f"python benchmarks/bench_image_sampling.py --prompts {args.prompts} --samples {k} "
               f"--new-tokens {args.new_tokens} --hidden {args.hidden} --vision-layers {args.vision_layers} "
               f"--reps {args.reps}")
    lines = ["# Sampling k answers per image prompt", "", f"`{command}`", "",
             f"{args.prompts} prompts x {k} samples, {args.new_tokens} new tokens each, 256 image tokens a "
             f"prompt; a random LLaVA-shaped model ({args.vision_layers}-layer CLIP-384 at 224 px, a 4-layer "
             f"decoder of width {args.hidden}). Median of {args.reps}.", "",
             "| sampler | wall time | tokens drawn | vision tower input rows | speed-up |",
             "|---|---:|---:|---:|---:|"]
    for name, (seconds, tokens, rows) in results.items():
        lines.append(f"| {name} | {seconds:.2f} s | {tokens} | {rows} | {base / seconds:.2f}x |")
    lines += ["", machine_text(), "", versions_line(), ""]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

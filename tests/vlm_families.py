"""Tiny image-text models of the families preftune trains, built offline from their configs (random
weights, float32), each saved with its real processor class (image processor + the stories260K tokenizer
with the family's special tokens added) so it loads as a Hugging Face directory does."""

from __future__ import annotations

from pathlib import Path

import torch

from preftune.lab.vision_model import CHAT_TEMPLATE
from preftune.model.hub import EMBEDDED_MODEL

_CHAT = CHAT_TEMPLATE  # Q/A turns; an image part renders as <image>


_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}


def _tokenizer(tokens: list[str]):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_MODEL)
    tokenizer.add_special_tokens({"additional_special_tokens": tokens})
    tokenizer.chat_template = _CHAT
    return tokenizer


def _text_config(tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       tie_word_embeddings=False)


def _save(directory: Path, model, processor, tokenizer) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    model.save_pretrained(directory, safe_serialization=True)
    processor.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def build_llava_next(directory: str | Path, seed: int = 0) -> Path:
    """LLaVA-NeXT: any-resolution tiles of 16 px (patch 8: 4 features a tile) over the pinpoints below;
    an image's token count depends on its size (base tile + unpadded grid + one newline per grid row)."""
    from transformers import (
        CLIPVisionConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
    )
    from transformers.models.llava_next import LlavaNextImageProcessorPil

    pinpoints = [[16, 32], [32, 16], [32, 32], [16, 48], [48, 16]]
    tokenizer = _tokenizer(["<image>"])
    vision = CLIPVisionConfig(**_VISION, image_size=16, patch_size=8)
    config = LlavaNextConfig(vision_config=vision, text_config=_text_config(tokenizer),
                             image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                             image_grid_pinpoints=pinpoints, vision_feature_select_strategy="default",
                             vision_feature_layer=-1, image_seq_length=4, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config)
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 16},
                                                 crop_size={"height": 16, "width": 16},
                                                 image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=_CHAT, image_token="<image>")
    return _save(Path(directory), model, processor, tokenizer)


def build_idefics3(directory: str | Path, seed: int = 0) -> Path:
    """Idefics3: an image resized to at most 32 px, split into 16-px tiles (rows x cols) plus a global
    view, each tile 4 image tokens between ``<fake_token_around_image>`` / ``<row_i_col_j>`` tokens."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3 import Idefics3ImageProcessorPil
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig

    tokens = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
    tokenizer = _tokenizer(tokens + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)])
    vision = Idefics3VisionConfig(**_VISION, image_size=16, patch_size=4)
    config = Idefics3Config(vision_config=vision, text_config=_text_config(tokenizer),
                            image_token_id=tokenizer.convert_tokens_to_ids("<image>"), scale_factor=2,
                            tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config)
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": 32},
                                                max_image_size={"longest_edge": 16}, do_image_splitting=True)
    processor = Idefics3Processor(image_processor, tokenizer, image_seq_len=4, chat_template=_CHAT)
    return _save(Path(directory), model, processor, tokenizer)


FAMILIES = {"llava_next": build_llava_next, "idefics3": build_idefics3}

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


def noise_png(directory: Path, size: tuple[int, int], seed: int) -> Path:
    """Write a PNG of seeded noise, ``size`` (width, height), into ``directory``; return its path."""
    import io

    from PIL import Image

    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=torch.Generator().manual_seed(seed),
                           dtype=torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, "PNG")
    path = directory / f"img-{size[0]}x{size[1]}-{seed}.png"
    path.write_bytes(buffer.getvalue())
    return path


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


_QWEN_TOKENS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                "<|video_pad|>"]
# Qwen's chat template: an image part renders as <|vision_start|><|image_pad|><|vision_end|>
_QWEN_CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
              "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
              "{% if p['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
              "{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _build_qwen(directory: str | Path, seed: int, version: str) -> Path:
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL: 8-px patches merged 2x2 (one image token per 16x16 px, images
    resized to multiples of 16 within 16^2..64^2 pixels) and 3-D rotary positions (mrope). Saved with its
    image processor, not the processor class (which needs torchvision in transformers 5.25)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = _tokenizer(_QWEN_TOKENS)
    tokenizer.chat_template = _QWEN_CHAT
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in _QWEN_TOKENS}
    text = {"vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 512,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]}}
    patches = {"patch_size": 8, "spatial_merge_size": 2, "temporal_patch_size": 2}
    if version == "3":  # interleaved mrope; its tower's features also enter the first 2 decoder layers
        from transformers import Qwen3VLConfig as Config
        from transformers import Qwen3VLForConditionalGeneration as Model

        text.update(head_dim=32, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                  "mrope_section": [6, 5, 5], "mrope_interleaved": True})
        vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                  "out_hidden_size": 64, "num_position_embeddings": 64, "deepstack_visual_indexes": [0, 1],
                  **patches}
    elif version == "2":
        from transformers import Qwen2VLConfig as Config
        from transformers import Qwen2VLForConditionalGeneration as Model

        vision = {"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2, **patches}
    else:
        from transformers import Qwen2_5_VLConfig as Config
        from transformers import Qwen2_5_VLForConditionalGeneration as Model

        vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                  "out_hidden_size": 64, "window_size": 32, "fullatt_block_indexes": [1], **patches}
    config = Config(text_config=text, vision_config=vision, tie_word_embeddings=False,
                    image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                    vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(seed)
    model = Model(config)
    image_processor = Qwen2VLImageProcessorPil(patch_size=8, merge_size=2, temporal_patch_size=2,
                                               min_pixels=16 * 16, max_pixels=64 * 64)
    return _save(Path(directory), model, image_processor, tokenizer)


def build_qwen2_vl(directory: str | Path, seed: int = 0) -> Path:
    return _build_qwen(directory, seed, "2")


def build_qwen2_5_vl(directory: str | Path, seed: int = 0) -> Path:
    return _build_qwen(directory, seed, "2.5")


def build_qwen3_vl(directory: str | Path, seed: int = 0) -> Path:
    return _build_qwen(directory, seed, "3")


FAMILIES = {**FAMILIES, "qwen2_vl": build_qwen2_vl, "qwen2_5_vl": build_qwen2_5_vl,
            "qwen3_vl": build_qwen3_vl}


def build_gemma3(directory: str | Path, seed: int = 0) -> Path:
    """Gemma 3: 16-px images (SigLIP, patch 4) pooled to 4 soft tokens between ``<start_of_image>`` and
    ``<end_of_image>`` (the prompt's placeholder is ``<start_of_image>``); the soft tokens of an image
    attend to each other both ways; a sliding layer (window 24) and a full one."""
    from transformers import (
        AutoTokenizer,
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3Processor,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )
    from transformers.models.gemma3 import Gemma3ImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_MODEL, extra_special_tokens={
        "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"})
    chat = _CHAT.replace("'<image>'", "'<start_of_image>'")
    tokenizer.chat_template = chat
    text = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            query_pre_attn_scalar=16,
                            sliding_window=24, layer_types=["sliding_attention", "full_attention"],
                            max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id)
    vision = SiglipVisionConfig(**_VISION, image_size=16, patch_size=4, vision_use_head=False)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                          boi_token_index=tokenizer.boi_token_id, eoi_token_index=tokenizer.eoi_token_id,
                          image_token_index=tokenizer.image_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():  # zeros at initialisation: random, so that images matter
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.5)
    processor = Gemma3Processor(Gemma3ImageProcessorPil(size={"height": 16, "width": 16}), tokenizer,
                                chat_template=chat, image_seq_length=4)
    return _save(Path(directory), model, processor, tokenizer)


FAMILIES["gemma3"] = build_gemma3


def build_llava_onevision(directory: str | Path, seed: int = 0) -> Path:
    """LLaVA-OneVision: SigLIP on 16-px tiles (patch 8: 4 features a tile), a Qwen2 decoder. An image alone in
    its row takes any-resolution tiles over the pinpoints below (base tile + unpadded grid + newlines: a count
    per size); an image of a row with several takes its base tile and a newline (5 tokens). Saved as hub
    repositories are: the image processor, the tokenizer, and ``processor_config.json`` (its processor class
    needs torchvision in transformers 5.25, for its video half)."""
    import json

    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    pinpoints = [[16, 16], [16, 32], [32, 16], [32, 32], [16, 48], [48, 16]]
    tokenizer = _tokenizer(["<image>", "<video>"])
    text = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       tie_word_embeddings=False)
    vision = SiglipVisionConfig(**_VISION, image_size=16, patch_size=8, vision_use_head=False)
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text,
                                  image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                                  video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
                                  image_grid_pinpoints=pinpoints, vision_feature_select_strategy="full",
                                  vision_feature_layer=-1, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config)
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": 16, "width": 16},
                                                      crop_size={"height": 16, "width": 16},
                                                      image_grid_pinpoints=pinpoints)
    directory = _save(Path(directory), model, image_processor, tokenizer)
    (directory / "processor_config.json").write_text(json.dumps({
        "processor_class": "LlavaOnevisionProcessor", "image_token": "<image>", "video_token": "<video>",
        "num_image_tokens": 4, "vision_feature_select_strategy": "full"}, indent=2))
    return directory


FAMILIES["llava_onevision"] = build_llava_onevision


def built(name: str, build, tmp_path_factory) -> tuple:
    """(name, directory, tokenizer, ImageInputs) of a tiny model of family ``name`` built by ``build``."""
    from preftune.model.load import load_tokenizer
    from preftune.model.vision import load_image_inputs

    directory = build(tmp_path_factory.mktemp(name) / "model")
    tokenizer = load_tokenizer(str(directory))
    return name, directory, tokenizer, load_image_inputs(str(directory), tokenizer)

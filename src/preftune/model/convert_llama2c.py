"""Convert a llama2.c checkpoint (legacy ``.bin``) and tokenizer to a Hugging Face Llama directory.

The output loads with plain ``transformers`` (``AutoModelForCausalLM`` / ``AutoTokenizer``): it holds
``config.json``, ``generation_config.json``, ``model.safetensors`` (fp32), ``tokenizer.json``,
``tokenizer_config.json`` and ``special_tokens_map.json``.

Two layout differences are handled:

* rotary embedding: llama2.c rotates interleaved pairs ``(0,1), (2,3), ...`` of each head, HF Llama
  rotates halves ``(0, d/2), (1, d/2+1), ...``; the rows of ``wq`` and ``wk`` are permuted per head;
* tokenizer: llama2.c merges the adjacent pair whose merged piece has the highest score; HF BPE merges
  the pair of lowest rank, so every split of a piece into two pieces becomes a merge ranked by the
  merged piece's score. :func:`llama2c_encode` is the reference the HF tokenizer is tested against.

Command line: ``preftune convert-llama2c MODEL.bin TOKENIZER.bin OUT_DIR``.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "Llama2cConfig", "Llama2cTokenizer", "convert_llama2c", "llama2c_encode", "read_llama2c_model",
    "read_llama2c_tokenizer",
]

_HEADER = struct.Struct("<7i")
_MAGIC_V1 = 0x616B3432  # "ak42": llama2.c's newer export versions, not the legacy format handled here
SPECIAL_PIECES = ("<unk>", "<s>", "</s>")
N_SPECIAL, N_BYTES = 3, 256


@dataclass(frozen=True)
class Llama2cConfig:
    """The 7-int header of a legacy llama2.c checkpoint (``shared_classifier`` = the vocab size was
    positive)."""

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


@dataclass(frozen=True)
class Llama2cTokenizer:
    """A llama2.c tokenizer: pieces as stored (plain spaces, not ``▁``) and their merge scores."""

    pieces: list[str]
    scores: list[float]
    max_token_length: int


def read_llama2c_model(path: str | Path) -> tuple[Llama2cConfig, dict[str, torch.Tensor]]:
    """Read a legacy llama2.c checkpoint; tensors keep llama2.c names, order and rotary layout.

    Returns the config and ``{"tok_embeddings", "rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1",
    "w2", "w3", "rms_final", "freq_cis_real", "freq_cis_imag"[, "wcls"]}`` (per-layer tensors are
    stacked on a leading layer axis, matrices are ``(out, in)`` like ``nn.Linear.weight``).
    Raises ``ValueError`` naming the file when the header or the file size is wrong.
    """
    path = Path(path)
    data = path.read_bytes()
    if len(data) < _HEADER.size:
        raise ValueError(f"{path}: {len(data)} bytes, too short for the 28-byte llama2.c header")
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = _HEADER.unpack_from(data)
    if dim == _MAGIC_V1:
        raise ValueError(f"{path}: llama2.c export version >= 1 ('ak42' magic); "
                         "only the legacy format is supported")
    cfg = Llama2cConfig(dim, hidden, n_layers, n_heads, n_kv, abs(vocab), seq_len, vocab > 0)
    if (
        min(dim, hidden, n_layers, n_heads, n_kv, cfg.vocab_size, seq_len) <= 0
        or dim % n_heads
        or n_heads % n_kv
        or cfg.head_dim % 2
    ):
        raise ValueError(f"{path}: implausible llama2.c header {cfg}")
    hd, kv_dim = cfg.head_dim, n_kv * cfg.head_dim
    shapes = {
        "tok_embeddings": (cfg.vocab_size, dim),
        "rms_att": (n_layers, dim),
        "wq": (n_layers, dim, dim),
        "wk": (n_layers, kv_dim, dim),
        "wv": (n_layers, kv_dim, dim),
        "wo": (n_layers, dim, dim),
        "rms_ffn": (n_layers, dim),
        "w1": (n_layers, hidden, dim),
        "w2": (n_layers, dim, hidden),
        "w3": (n_layers, hidden, dim),
        "rms_final": (dim,),
        "freq_cis_real": (seq_len, hd // 2),
        "freq_cis_imag": (seq_len, hd // 2),
    }
    if not cfg.shared_classifier:
        shapes["wcls"] = (cfg.vocab_size, dim)
    n_floats = sum(torch.Size(s).numel() for s in shapes.values())
    expected = _HEADER.size + 4 * n_floats
    if len(data) != expected:
        raise ValueError(
            f"{path}: {len(data)} bytes, but the header {cfg} needs exactly {expected} "
            "(truncated or not a legacy llama2.c checkpoint?)"
        )
    flat = torch.frombuffer(bytearray(data), dtype=torch.float32, offset=_HEADER.size, count=n_floats)
    tensors, offset = {}, 0
    for name, shape in shapes.items():
        n = torch.Size(shape).numel()
        tensors[name] = flat[offset : offset + n].view(shape).clone()
        offset += n
    return cfg, tensors


def read_llama2c_tokenizer(path: str | Path) -> Llama2cTokenizer:
    """Read a llama2.c ``tokenizer.bin``: int32 max length, then per token float32 score, int32 length,
    bytes."""
    path = Path(path)
    data = path.read_bytes()
    if len(data) < 4:
        raise ValueError(f"{path}: too short for a llama2.c tokenizer")
    (max_len,) = struct.unpack_from("<i", data)
    pieces, scores, offset = [], [], 4
    while offset < len(data):
        if offset + 8 > len(data):
            raise ValueError(f"{path}: truncated record header for token {len(pieces)} at byte {offset}")
        score, n = struct.unpack_from("<fi", data, offset)
        offset += 8
        if n < 0 or offset + n > len(data):
            raise ValueError(f"{path}: bad length {n} for token {len(pieces)} at byte {offset - 4}")
        try:
            pieces.append(data[offset : offset + n].decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: token {len(pieces)} is not valid UTF-8") from e
        scores.append(score)
        offset += n
    return Llama2cTokenizer(pieces, scores, max_len)


def llama2c_encode(text: str, vocab: list[str], scores: list[float]) -> list[int]:
    """Encode ``text`` exactly like llama2.c's ``encode`` (without BOS/EOS).

    A dummy-prefix ``" "`` token is added first when ``text`` is non-empty; each UTF-8 character
    becomes its piece or, if there is none, byte tokens ``byte + 3``; then the adjacent pair whose
    concatenation is a piece of highest score is merged (the leftmost on ties) until none is left.
    """
    lookup: dict[str, int] = {}
    for i, piece in enumerate(vocab):
        lookup.setdefault(piece, i)
    tokens = [lookup[" "]] if text else []
    for ch in text:
        if ch in lookup:
            tokens.append(lookup[ch])
        else:
            tokens.extend(b + N_SPECIAL for b in ch.encode("utf-8"))

    def pair(i: int) -> tuple[float, int]:
        merged = lookup.get(vocab[tokens[i]] + vocab[tokens[i + 1]])
        return (-math.inf, -1) if merged is None else (scores[merged], merged)

    # pair_scores[i] / pair_ids[i]: merging tokens[i], tokens[i+1]; only neighbours change per merge
    pairs = [pair(i) for i in range(len(tokens) - 1)]
    pair_scores, pair_ids = [p[0] for p in pairs], [p[1] for p in pairs]
    while pair_scores:
        best = pair_scores.index(max(pair_scores))  # the first maximum: the leftmost pair on ties
        if pair_scores[best] <= -1e10:  # llama2.c starts its search from best_score = -1e10
            break
        tokens[best : best + 2] = [pair_ids[best]]
        del pair_scores[best], pair_ids[best]
        for i in (best - 1, best):
            if 0 <= i < len(pair_scores):
                pair_scores[i], pair_ids[i] = pair(i)
    return tokens


def _hf_state_dict(cfg: Llama2cConfig, w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename to HF Llama keys; permute wq/wk rows from interleaved to half-split rotary order."""

    def permute(m: torch.Tensor, n_heads: int) -> torch.Tensor:
        rows, cols = m.shape
        return m.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)

    sd = {"model.embed_tokens.weight": w["tok_embeddings"], "model.norm.weight": w["rms_final"]}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = w["rms_att"][i]
        sd[p + "self_attn.q_proj.weight"] = permute(w["wq"][i], cfg.n_heads)
        sd[p + "self_attn.k_proj.weight"] = permute(w["wk"][i], cfg.n_kv_heads)
        sd[p + "self_attn.v_proj.weight"] = w["wv"][i]
        sd[p + "self_attn.o_proj.weight"] = w["wo"][i]
        sd[p + "post_attention_layernorm.weight"] = w["rms_ffn"][i]
        sd[p + "mlp.gate_proj.weight"] = w["w1"][i]
        sd[p + "mlp.down_proj.weight"] = w["w2"][i]
        sd[p + "mlp.up_proj.weight"] = w["w3"][i]
    if not cfg.shared_classifier:
        sd["lm_head.weight"] = w["wcls"]
    return {k: v.contiguous() for k, v in sd.items()}


def _hf_config(cfg: Llama2cConfig) -> dict:
    """``config.json`` of the equivalent ``LlamaForCausalLM`` (readable by transformers 4.x and 5.x)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim, "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "hidden_act": "silu", "max_position_embeddings": cfg.seq_len, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": cfg.shared_classifier, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": "float32",
    }


def _hf_tokenizer_json(tok: Llama2cTokenizer) -> str:
    """Build the ``tokenizer.json`` text of a byte-fallback BPE equivalent to llama2.c's encoder."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    pieces = list(SPECIAL_PIECES) + tok.pieces[N_SPECIAL:]
    if len(pieces) < N_SPECIAL + N_BYTES:
        raise ValueError(f"{len(pieces)} tokens, fewer than the 3 special and 256 byte tokens")
    for b in range(N_BYTES):
        if pieces[N_SPECIAL + b] != f"<0x{b:02X}>":
            raise ValueError(f"token {N_SPECIAL + b} is {pieces[N_SPECIAL + b]!r}, expected <0x{b:02X}>")
    pieces = [p.replace(" ", "▁") for p in pieces]
    vocab = {p: i for i, p in enumerate(pieces)}
    if len(vocab) != len(pieces):
        raise ValueError("tokenizer has duplicate pieces")
    first = N_SPECIAL + N_BYTES
    order = sorted(range(first, len(pieces)), key=lambda i: (-tok.scores[i], i))
    merges = [
        (pieces[i][:k], pieces[i][k:])
        for i in order
        for k in range(1, len(pieces[i]))
        if vocab.get(pieces[i][:k], -1) >= first and vocab.get(pieces[i][k:], -1) >= first
    ]
    bpe = models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    t = Tokenizer(bpe)
    t.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    t.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    t.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_PIECES])
    t.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return t.to_str(pretty=True)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def convert_llama2c(
    model_bin: str | Path,
    tokenizer_bin: str | Path,
    out_dir: str | Path,
    extra_files: Iterable[str | Path] = (),
) -> Path:
    """Convert ``model_bin`` + ``tokenizer_bin`` into a HF Llama directory at ``out_dir``; return it.

    The directory is written into a temporary sibling and renamed into place, so ``out_dir`` is
    either the old or the complete new directory. ``extra_files`` (e.g. a LICENSE) are copied in,
    read before anything is replaced, so they may live in ``out_dir`` itself.
    """
    out_dir = Path(out_dir)
    cfg, weights = read_llama2c_model(model_bin)
    tok = read_llama2c_tokenizer(tokenizer_bin)
    if len(tok.pieces) != cfg.vocab_size:
        raise ValueError(f"{tokenizer_bin}: {len(tok.pieces)} tokens, but {model_bin} has vocab_size "
                         f"{cfg.vocab_size}")
    try:
        tok_json = _hf_tokenizer_json(tok)
    except ValueError as e:
        raise ValueError(f"{tokenizer_bin}: {e}") from e

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _write_hf_dir(tmp, cfg, weights, tok_json, extra_files)
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_hf_dir(tmp: Path, cfg: Llama2cConfig, weights: dict[str, torch.Tensor], tok_json: str,
                  extra_files: Iterable[str | Path]) -> None:
    """Write the HF files (weights, configs, tokenizer) and ``extra_files`` into ``tmp``, world-readable."""
    from safetensors.torch import save_file

    save_file(_hf_state_dict(cfg, weights), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    _write_json(tmp / "config.json", _hf_config(cfg))
    _write_json(tmp / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2})
    (tmp / "tokenizer.json").write_text(tok_json + "\n", encoding="utf-8")
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    _write_json(
        tmp / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **specials,
            "clean_up_tokenization_spaces": False,
            "model_max_length": cfg.seq_len,
        },
    )
    _write_json(tmp / "special_tokens_map.json", specials)
    for extra in extra_files:
        shutil.copyfile(extra, tmp / Path(extra).name)
    for f in tmp.iterdir():  # mkdtemp (and safetensors) make private files; publish normal ones
        f.chmod(0o644)
    tmp.chmod(0o755)


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename ``tmp`` to ``out_dir``, moving an existing ``out_dir`` aside first and back if that fails."""
    old = out_dir.with_name(f".{out_dir.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
    if out_dir.exists():
        out_dir.rename(old)
    try:
        tmp.rename(out_dir)
    except OSError:
        if old.exists():
            old.rename(out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


"""The llama2.c -> Hugging Face converter and the embedded stories260K model it produced."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import preftune
from preftune.model.convert_llama2c import (
    convert_llama2c,
    llama2c_encode,
    read_llama2c_model,
    read_llama2c_tokenizer,
)

EMBEDDED = Path(preftune.__file__).resolve().parent / "assets" / "stories260k"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
EXPECTED_STORY = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
    "One day, she saw a big, red ball"
)
N_NEW = 100


def shared(rel: str) -> Path:
    path = SHARED_DATA / rel
    if not path.exists():
        pytest.skip(f"shared data file {path} is absent (the repo is expected beside shared/)")
    return path


@contextmanager
def one_thread() -> Iterator[None]:
    """Tiny matmuls: extra threads only add overhead (and crawl on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(EMBEDDED).eval(), AutoTokenizer.from_pretrained(EMBEDDED)


@pytest.fixture(scope="module")
def greedy_ids(hf) -> list[int]:
    model, tok = hf
    with torch.no_grad(), one_thread():
        out = model.generate(torch.tensor([[tok.bos_token_id]]), max_new_tokens=N_NEW, do_sample=False,
                             pad_token_id=tok.eos_token_id)
    return out[0, 1:].tolist()


def test_embedded_model_loads_with_plain_transformers_and_tells_the_story(hf, greedy_ids):
    model, tok = hf
    assert type(model).__name__ == "LlamaForCausalLM" and tok.is_fast
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<s>", "</s>", "<unk>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    ids = tok("Once upon a time").input_ids
    assert ids[0] == 1 and ids[1:] == tok("Once upon a time", add_special_tokens=False).input_ids
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert len(greedy_ids) == N_NEW
    assert tok.decode(greedy_ids, skip_special_tokens=True).startswith(EXPECTED_STORY)


def llama2c_greedy(bin_path: Path, n_new: int) -> list[int]:
    """An independent llama2.c forward (interleaved rotary, freq_cis tables from the file), greedy."""
    data = bin_path.read_bytes()
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack_from("<7i", data)
    hd, vocab = dim // n_heads, abs(vocab)
    flat = torch.frombuffer(bytearray(data[28:]), dtype=torch.float32)
    sizes = [vocab * dim, n_layers * dim, n_layers * dim * dim, n_layers * n_kv * hd * dim,
             n_layers * n_kv * hd * dim, n_layers * dim * dim, n_layers * dim, n_layers * hidden * dim,
             n_layers * dim * hidden, n_layers * hidden * dim, dim, seq_len * hd // 2, seq_len * hd // 2]
    emb, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3, rms_f, fcr, fci = flat[: sum(sizes)].split(sizes)
    cls = flat[sum(sizes) :].view(vocab, dim) if flat.numel() > sum(sizes) else emb.view(vocab, dim)
    emb, fcr, fci = emb.view(vocab, dim), fcr.view(seq_len, -1), fci.view(seq_len, -1)
    wq, wo = wq.view(n_layers, dim, dim), wo.view(n_layers, dim, dim)
    wk, wv = wk.view(n_layers, n_kv * hd, dim), wv.view(n_layers, n_kv * hd, dim)
    w1, w3 = w1.view(n_layers, hidden, dim), w3.view(n_layers, hidden, dim)
    w2 = w2.view(n_layers, dim, hidden)
    rms_att, rms_ffn = rms_att.view(n_layers, dim), rms_ffn.view(n_layers, dim)

    def rmsnorm(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * w

    def rope(x, t):  # x: (t, heads, hd); rotate pairs (0,1), (2,3), ...
        re, im = x[..., 0::2], x[..., 1::2]
        c, s = fcr[:t, None, :], fci[:t, None, :]
        return torch.stack([re * c - im * s, re * s + im * c], dim=-1).flatten(-2)

    def next_token(tokens: list[int]) -> int:
        t = len(tokens)
        x = emb[tokens]
        for li in range(n_layers):
            h = rmsnorm(x, rms_att[li])
            q = rope((h @ wq[li].T).view(t, n_heads, hd), t)
            k = rope((h @ wk[li].T).view(t, n_kv, hd), t).repeat_interleave(n_heads // n_kv, dim=1)
            v = (h @ wv[li].T).view(t, n_kv, hd).repeat_interleave(n_heads // n_kv, dim=1)
            att = torch.einsum("thd,shd->hts", q, k) / hd**0.5
            att = att.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
            x = x + torch.einsum("hts,shd->thd", att, v).reshape(t, dim) @ wo[li].T
            h = rmsnorm(x, rms_ffn[li])
            x = x + (torch.nn.functional.silu(h @ w1[li].T) * (h @ w3[li].T)) @ w2[li].T
        return int((rmsnorm(x[-1], rms_f) @ cls.T).argmax())

    tokens = [1]
    with one_thread():
        for _ in range(n_new):
            tokens.append(next_token(tokens))
    return tokens[1:]


def test_greedy_ids_match_an_independent_llama2c_forward(greedy_ids):
    assert greedy_ids == llama2c_greedy(shared("stories260k/stories260K.bin"), N_NEW)


def naive_llama2c_encode(text: str, vocab: list[str], scores: list[float]) -> list[int]:
    """run.c's encode loop, literally: rescan every pair after each merge."""
    ids = {p: i for i, p in enumerate(vocab)}
    toks = ([ids[" "]] if text else []) + [
        t for ch in text for t in ([ids[ch]] if ch in ids else [b + 3 for b in ch.encode()])
    ]
    while True:
        best = max(
            ((scores[ids[vocab[a] + vocab[b]]], -i) for i, (a, b) in enumerate(zip(toks, toks[1:]))
             if vocab[a] + vocab[b] in ids),
            default=None,
        )
        if best is None:
            return toks
        i = -best[1]
        toks[i : i + 2] = [ids[vocab[toks[i]] + vocab[toks[i + 1]]]]


def test_tokenizer_round_trips_and_matches_llama2c_encode(hf):
    _, tok = hf
    ref = read_llama2c_tokenizer(shared("stories260k/tok512.bin"))
    text = shared("tinystories/tinystories_val_excerpt.txt").read_text(encoding="utf-8")
    lines = [line for line in text.split("\n") if line]
    tricky = ["", " ", "  two  spaces ", "a\nb\tc", "héllo ✓ 日本 🙂 naïve…", "Lily's \"ball\" — 42%!"]
    for s in tricky + lines[::25]:
        assert llama2c_encode(s, ref.pieces, ref.scores) == naive_llama2c_encode(s, ref.pieces, ref.scores), s
    encoded = tok(lines + tricky, add_special_tokens=False).input_ids
    decoded = tok.batch_decode(encoded)
    for s, ids, back in zip(lines + tricky, encoded, decoded):
        assert back == s
        assert ids == llama2c_encode(s, ref.pieces, ref.scores), s


def test_converter_reproduces_embedded_assets(tmp_path):
    model_bin, tok_bin = shared("stories260k/stories260K.bin"), shared("stories260k/tok512.bin")
    out = tmp_path / "out"
    extras = [EMBEDDED / "LICENSE", EMBEDDED / "README.md"]
    assert convert_llama2c(model_bin, tok_bin, out, extra_files=extras) == out
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in EMBEDDED.iterdir())
    assert (out / "model.safetensors").read_bytes() == (EMBEDDED / "model.safetensors").read_bytes()
    for name in ("config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json",
                 "LICENSE", "README.md"):
        assert (out / name).read_bytes() == (EMBEDDED / name).read_bytes(), name
    tok_json = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    assert tok_json == json.loads((EMBEDDED / "tokenizer.json").read_text(encoding="utf-8"))
    # regenerating in place keeps extras taken from the directory itself, drops stale files,
    # leaves no temp dirs
    (out / "stale.txt").write_text("x")
    convert_llama2c(model_bin, tok_bin, out, extra_files=[out / "LICENSE"])
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in EMBEDDED.iterdir()
                                                           if p.name != "README.md")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    cfg, weights = read_llama2c_model(model_bin)
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size, cfg.shared_classifier) == (
        64, 5, 8, 4, 512, True)
    assert weights["wk"].shape == (5, 32, 64)


def write_tiny_llama2c(tmp_path: Path, *, truncate: int = 0) -> tuple[Path, Path]:
    """A random llama2.c checkpoint (unshared classifier, 6 query / 2 kv heads) and a 300-token tokenizer."""
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = 48, 64, 2, 6, 2, 300, 32
    hd, g = dim // n_heads, torch.Generator().manual_seed(0)
    n_matrix = vocab * dim + n_layers * (2 * dim * dim + 2 * n_kv * hd * dim + 3 * hidden * dim)
    weights = torch.randn(n_matrix + 2 * n_layers * dim + dim + vocab * dim, generator=g) * 0.3
    angles = torch.arange(seq_len)[:, None] / 10000 ** (torch.arange(0, hd, 2) / hd)
    # llama2.c order: emb, att norms, wq, wk, wv, wo, ffn norms, w1, w2, w3, final norm, freq_cis, wcls
    e, a, att = vocab * dim, n_layers * dim, n_layers * (2 * dim * dim + 2 * n_kv * hd * dim)
    parts = [weights[:e], 1 + weights[e : e + a], weights[e + a : e + a + att],
             1 + weights[-a - dim - e : -dim - e], weights[e + a + att : n_matrix + a],
             1 + weights[-dim - e : -e], angles.cos(), angles.sin(), weights[-e:]]
    body = torch.cat([t.flatten().float() for t in parts]).numpy().tobytes()
    model_bin = tmp_path / "tiny.bin"
    header = struct.pack("<7i", dim, hidden, n_layers, n_heads, n_kv, -vocab, seq_len)
    model_bin.write_bytes(header + body[: len(body) - truncate])
    pieces = ["<unk>", "\n<s>\n", "\n</s>\n"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += list(" abcdefghijklmnopqrst")
    pieces += [" a", "ab", "bc", "abc", " ab", "cd", "de", "def", "st", " s", " st", "ra", "abra", "a ", "ca",
               "dab", "ef", "gh", "ij", "kl"]
    tok_bin = tmp_path / "tok.bin"
    tok_bin.write_bytes(struct.pack("<i", 4) + b"".join(
        struct.pack("<fi", -float(i) if i > 258 else 0.0, len(p.encode())) + p.encode()
        for i, p in enumerate(pieces)))
    return model_bin, tok_bin


def test_unshared_classifier_and_gqa_convert_exactly(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_bin, tok_bin = write_tiny_llama2c(tmp_path)
    out = convert_llama2c(model_bin, tok_bin, tmp_path / "hf")
    model, tok = AutoModelForCausalLM.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)
    assert not model.config.tie_word_embeddings
    with torch.no_grad(), one_thread():
        ids = model.generate(torch.tensor([[1]]), max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert ids[0, 1:].tolist() == llama2c_greedy(model_bin, 20)
    ref = read_llama2c_tokenizer(tok_bin)
    for s in ["abracadabra", " a  st stab ", "défi ✓", "cab dab abc a"]:
        enc = tok(s, add_special_tokens=False).input_ids
        assert (enc == llama2c_encode(s, ref.pieces, ref.scores)
                == naive_llama2c_encode(s, ref.pieces, ref.scores))
        assert tok.decode(enc) == s


def test_truncated_or_bad_checkpoint_raises_naming_the_file(tmp_path):
    model_bin, tok_bin = write_tiny_llama2c(tmp_path, truncate=4)
    with pytest.raises(ValueError, match="tiny.bin"):
        read_llama2c_model(model_bin)
    with pytest.raises(ValueError, match="tiny.bin"):
        convert_llama2c(model_bin, tok_bin, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.bin", "tok.bin"]  # nothing written
    bad = tmp_path / "bad_header.bin"
    bad.write_bytes(struct.pack("<7i", 8, 16, 1, 3, 1, 16, 4))  # 8 % 3 != 0
    with pytest.raises(ValueError, match="bad_header.bin"):
        read_llama2c_model(bad)
    short = tmp_path / "short.bin"
    short.write_bytes(b"\0" * 10)
    with pytest.raises(ValueError, match="short.bin"):
        read_llama2c_model(short)

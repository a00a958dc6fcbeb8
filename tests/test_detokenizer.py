"""Incremental detokenization ends with exactly the text of a full decode and never streams a broken character."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer as HfTokenizer
from tokenizers import decoders, models, pre_tokenizers

from dyn_actor.engine.builtin import build_tokenizer
from dyn_actor.engine.detokenizer import IncrementalDetokenizer, TextStream
from dyn_actor.engine.tokenizer import Tokenizer

CORPUS = [
    "The café served crème brûlée to naïve visitors. 日本語のテキストも少し。",
    "Emoji 🚀🔥✨ and math ∑∫√ and arrows → ← ↑, plus ASCII text for good measure.",
    "Ünïcödé everywhere: Ελληνικά, русский, עברית, العربية, हिन्दी.",
] * 20


def byte_level_bpe() -> Tokenizer:
    from tokenizers import trainers

    tk = HfTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<s>", "</s>"])
    tk.train_from_iterator(CORPUS, trainer)
    return Tokenizer(tk, bos_token="<s>", eos_token="</s>")


def sentencepiece_like() -> Tokenizer:
    """A Llama-style tokenizer: Metaspace pieces, byte fallback, leading-space strip."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i in range(256):
        vocab[f"<0x{i:02X}>"] = len(vocab)
    pieces = ["▁", "▁the", "▁a", "e", "t", "h", "a", "▁c", "af", "é", "日", "本", "▁🚀", "x", "▁x", "th", "he"]
    for p in pieces:
        vocab.setdefault(p, len(vocab))
    merges = [("▁", "the"), ("t", "h"), ("h", "e")]
    vocab.setdefault("the", len(vocab))
    tk = HfTokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tk.add_special_tokens(["<s>", "</s>"])
    return Tokenizer(tk, bos_token="<s>", eos_token="</s>")


TOKENIZERS = {
    "byte-level-bpe": byte_level_bpe,
    "sentencepiece-like": sentencepiece_like,
    "builtin": lambda: Tokenizer(build_tokenizer(), bos_token="<s>", eos_token="</s>"),
}


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_incremental_equals_full_decode(name):
    tok = TOKENIZERS[name]()
    rng = random.Random(0)
    vocab = tok.vocab_size
    for trial in range(300):
        if trial % 2:  # any token sequence, garbage bytes included
            ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
            prompt = []
        else:  # real text after a real prompt, so multi-byte characters split across tokens
            text = rng.choice(CORPUS)
            start = rng.randrange(len(text) // 2)
            prompt = tok.encode(text[:start], add_special_tokens=False)
            ids = tok.encode(text[start : start + 40], add_special_tokens=False) or [3]
        det = IncrementalDetokenizer(tok, prompt)
        pieces = []
        i = 0
        while i < len(ids):
            k = rng.randrange(1, 4)
            delta = det.add(ids[i : i + k])
            assert not delta.endswith("\ufffd") or "\ufffd" in tok.decode(ids), "streamed a broken character"
            pieces.append(delta)
            i += k
        pieces.append(det.finish())
        assert "".join(pieces) == det.text == det.full_text()
        if not prompt:
            assert det.text == tok.decode(ids)


def test_multibyte_character_is_held_until_complete():
    tok = byte_level_bpe()
    ids = tok.encode("🚀", add_special_tokens=False)
    raw = [tok.backend.token_to_id(t) for t in tok.backend.encode("🚀", add_special_tokens=False).tokens]
    assert raw == ids
    det = IncrementalDetokenizer(tok)
    deltas = [det.add([t]) for t in ids]
    if len(ids) > 1:
        assert deltas[:-1] == [""] * (len(ids) - 1)
    assert "".join(deltas) + det.finish() == "🚀"


def test_text_stream_stop_string_across_tokens_is_never_streamed():
    tok = Tokenizer(build_tokenizer(), bos_token="<s>", eos_token="</s>")
    ids = tok.encode("hello STOP world", add_special_tokens=False)
    ts = TextStream(tok, stop=["STOP"])
    sent = ""
    stopped = False
    for t in ids:
        delta, stopped = ts.update([t], finished=False)
        sent += delta
        assert "S" not in sent
        if stopped:
            break
    assert stopped and sent == "hello " and ts.stop_reason == "STOP"
    ts = TextStream(tok, stop=["STOP"], include_stop_str_in_output=True)
    sent = "".join(ts.update([t], False)[0] for t in ids[:10])
    assert sent == "hello STOP"
    # finishing flushes held-back text when no stop string matched
    ts = TextStream(tok, stop=["xyz"])
    sent = "".join(ts.update([t], False)[0] for t in ids) + ts.update([], True)[0]
    assert sent == "hello STOP world"

"""tokenizer.py: the GGUF byte-level BPE against HF `tokenizers`, SentencePiece, Llama-3 tiktoken files."""
import base64
import json
import random
import subprocess
import sys

import pytest

from tokenizer import (LLAMA3_SPECIALS, PRE_PATTERNS, SMOLLM_PATTERN, SentencePieceTokenizer, TiktokenTokenizer,
                       gpt2_byte_decoder, load_tokenizer)

PROSE = """\
The quick brown fox jumps over the lazy dog. It's a sentence we've all seen; they'll keep using it,
and I'd say you're right that it'S overused -- DON'T you think? "Quotes", (parentheses) and [brackets].
In 1492, Columbus sailed 3,000 miles; the ship's log recorded 42.5 knots at 09:45 on 12/10/1492.
Prices rose 7.25% to $1,234,567.89 (about EUR 1.1e6), i.e. +0.5 pp year-on-year.
Résumé, naïve café, façade, jalapeño, Ångström, smørrebrød, Straße, Œuvre, ĳ ligature, İstanbul.
Москва — столица России. Привет, мир! Съешь же ещё этих мягких французских булок, да выпей чаю.
Ελληνικά: Η γρήγορη καφέ αλεπού. עברית: שלום עולם. العربية: مرحبا بالعالم ١٢٣٤٥.
中文：我们今天去公园散步，天气很好。日本語：東京は日本の首都です。ひらがな、カタカナ。한국어: 안녕하세요 세계.
हिन्दी: नमस्ते दुनिया। ไทย: สวัสดีชาวโลก. Tiếng Việt: Xin chào thế giới.
Emoji: 😀😃😄 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ ✨ — and symbols ∑∫√∞ ≤≥≠ →⇒ © ® ™ ° ± × ÷ ½ ¾ µ.
Math: E = mc², a² + b² = c², x₁ + x₂, ∀x∈ℝ: x² ≥ 0. Fullwidth: ＡＢＣ１２３.
Zero-width joiner\u200dand non-breaking\u00a0space, soft\u00adhyphen, narrow\u202fspace, ideographic\u3000space.
"""

CODE = '''\
import math
from typing import Optional


class RMSNorm:
    """Root-mean-square normalisation."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        self.eps = eps
        self.weight = [1.0] * dim

    def __call__(self, x):
        ms = sum(v * v for v in x) / len(x)   # mean square
        return [w * v / math.sqrt(ms + self.eps) for w, v in zip(self.weight, x)]


def fib(n: int) -> int:
\tif n < 2:
\t\treturn n
\treturn fib(n - 1) + fib(n - 2)

if __name__ == "__main__":
    print(f"{fib(20)=}", {'a': [1, 2, 3], "b": (4.5, -6e-7)})
    data = {"key":"value","list":[0x1F,0o17,0b101]}   # JSON-ish
    s = 'it''s' + "don't" + r"\\n\\t" ;  x=a>=b!=c<=d&&e||f
    // C++ comment   /* block */  #include <stdio.h>
    for (int i = 0; i < 10; ++i) { printf("%d\\n", i); }
'''

ESSAY = """\
Tokenizers split text before they merge it. A byte-level BPE first cuts the text into pieces with a
regular expression -- words with their leading space, runs of punctuation, single digits here -- and
then merges the bytes of each piece, pair by pair, in the order the merges were learned. Two
implementations agree only if both steps agree: the same pieces, and the same merges applied in the
same order. That is why this sample mixes many kinds of text. Sentences end with full stops, question
marks and exclamation marks! Some words are hyphenated (state-of-the-art, well-known, re-entry); some
are abbreviated (e.g., i.e., etc., Dr., Mrs., U.S.A.); some carry apostrophes (rock 'n' roll, the
'90s, o'clock, y'all'd've). Numbers come in every shape: 0, 7, 42, 365, 2024, 3.14159, 6.022e23,
-273.15, 1/3, 50%, #1, 1st, 2nd, 3rd, 4th, v1.2.3, 192.168.0.1, +1-555-0100, 10:30am, 1,000,000.

Markdown and markup: # Heading, **bold**, _italic_, `inline code`, [a link](https://example.com/path?q=1&r=2#frag),
<div class="note" id='x1'>&amp; &lt;tag&gt; &#169;</div>, | col1 | col2 |, - [ ] todo, > quote.
JSON: {"name": "teal-fast", "version": "0.1.0", "layers": 30, "dim": 576, "tied": true, "eps": 1e-05}
Paths and identifiers: /usr/local/bin/python3.12, C:\\Users\\Admin\\Desktop, snake_case_name,
camelCaseName, PascalCaseName, SCREAMING_SNAKE, kebab-case-name, __dunder__, user@example.org.
"""

WHITESPACE = ("a  b   c    d\n\n\nline after blanks\n \n  \n\t\t mixed \t tabs\r\nCRLF\r\n   trailing   \n\n"
              "12   34\n 5\n\n  6")

SAMPLE = PROSE + ESSAY + CODE + WHITESPACE + PROSE.upper() + CODE.replace("    ", "\t")
SMOLLM2_MISSING_CONTROLS = "\x04\x06\x13\x14\x16\x1d"  # bytes the SmolLM2 vocabulary has no token for


def random_texts(n: int, seed: int = 0) -> list:
    """Random strings from a pool that stresses the split pattern: digits, contractions, runs of
    spaces/newlines/tabs, letters of several scripts, punctuation, emoji, combining marks."""
    pool = (list("aeiouxyzAEZ0123456789'’\".,;:!?-_()[]{}<>/\\@#$%^&*+=|~`") + [" "] * 8 + ["\n"] * 3 + ["\t", "\r"]
            + ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", " 1", "  2", "\n\n", "   "]
            + list("éüßøñçΩπжЯ中文字日本ひカ한글ـعم") + ["😀", "👍🏽", "🇫🇷", "\u0301", "\u200d", "\u00a0", "²", "½", "٣", "१"])
    rng = random.Random(seed)
    return ["".join(rng.choice(pool) for _ in range(rng.randint(1, 60))) for _ in range(n)]


# ---- the GGUF (SmolLM2) byte-level BPE --------------------------------------------------------

@pytest.fixture(scope="module")
def gguf_vocab(smollm2_gguf):
    """tokens, token types and merges read straight from the GGUF (not from our converter's file)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(smollm2_gguf))
    return {k: reader.fields[f"tokenizer.ggml.{k}"].contents() for k in ("tokens", "token_type", "merges")}


def hf_reference(vocab: dict, pattern: str = SMOLLM_PATTERN, smollm_original: bool = False):
    """An independent HF `tokenizers` ByteLevel BPE from the same vocab + merges. By default it
    splits with the same pattern; smollm_original=True uses SmolLM2's own HF pre-tokenizer
    instead (single digits, then GPT-2's regex), which checks the pattern itself too."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    bpe = models.BPE({t: i for i, t in enumerate(vocab["tokens"])}, [tuple(m.split(" ")) for m in vocab["merges"]])
    hf = Tokenizer(bpe)
    if smollm_original:
        hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), "isolated"),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(t, special=True) for t, kind in zip(vocab["tokens"], vocab["token_type"])
                           if kind != 1])
    return hf


@pytest.fixture(scope="module")
def smollm2_tok(smollm2_checkpoint):
    return load_tokenizer(smollm2_checkpoint)


def test_gguf_tokenizer_files(smollm2_tok):
    tok = smollm2_tok
    assert isinstance(tok, TiktokenTokenizer) and tok.vocab_size == 49152
    assert (tok.bos_id, tok.eos_id) == (1, 2)  # <|im_start|>, <|im_end|> as the GGUF says
    assert tok.stop_ids == {0, 2}  # <|endoftext|>, <|im_end|>
    assert tok.encode("Hi", bos=True) == tok.encode("Hi")  # SmolLM2 adds no BOS (add_bos_token false)
    assert len(SAMPLE) > 5000


@pytest.mark.parametrize("smollm_original", [False, True], ids=["same-pattern", "smollm2-hf-pretokenizer"])
def test_gguf_ids_equal_hf_reference(smollm2_tok, gguf_vocab, smollm_original):
    hf = hf_reference(gguf_vocab, smollm_original=smollm_original)
    for text in [SAMPLE, *SAMPLE.split("\n"), *random_texts(300)]:
        assert smollm2_tok.encode(text) == hf.encode(text, add_special_tokens=False).ids, repr(text)


@pytest.mark.parametrize("pre", sorted(set(PRE_PATTERNS) - {"smollm", "default"}))
def test_other_pre_tokenizers_equal_hf_reference(smollm2_checkpoint, gguf_vocab, pre):
    """The same vocabulary under llama.cpp's other supported split patterns (their tiktoken regex
    dialect vs HF's Oniguruma): still equal."""
    spec = json.loads((smollm2_checkpoint / "tokenizer_bpe.json").read_text(encoding="utf-8"))
    from tokenizer import gguf_bpe_tokenizer

    tok = gguf_bpe_tokenizer({**spec, "pre": pre})
    hf = hf_reference(gguf_vocab, PRE_PATTERNS[pre])
    for text in [SAMPLE, *random_texts(100, seed=1)]:
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False).ids, repr(text)


def test_gguf_round_trip(smollm2_tok, gguf_vocab):
    hf = hf_reference(gguf_vocab)
    ids = smollm2_tok.encode(SAMPLE)
    assert smollm2_tok.decode(ids) == SAMPLE == hf.decode(ids)
    assert len(ids) < len(SAMPLE.encode("utf-8")) / 2  # real merges happened
    for text in random_texts(200, seed=2):
        assert smollm2_tok.decode(smollm2_tok.encode(text)) == text
    assert smollm2_tok.decode([1, 2]) == "<|im_start|><|im_end|>"
    assert smollm2_tok.encode("<|im_end|>") != [2]  # special-token text in a prompt stays plain text


def test_gguf_control_characters(smollm2_tok):
    """Decided: ASCII control characters without a token are stripped; other control characters
    round-trip; a character whose bytes have no token, or a lone surrogate, is a ValueError."""
    tok = smollm2_tok
    text = "a\x04b" + SMOLLM2_MISSING_CONTROLS + " end\x1d."
    assert tok.encode(text) == tok.encode("ab end.")
    others = "".join(chr(c) for c in range(32) if chr(c) not in SMOLLM2_MISSING_CONTROLS) + "\x7f\x85"
    assert tok.decode(tok.encode("x" + others + "y")) == "x" + others + "y"
    for bad, what in [("ok \U00050000 no", r"U\+50000"), ("ok \ud800 no", "surrogate")]:
        with pytest.raises(ValueError, match=what) as e:
            tok.encode(bad)
        assert "\n" not in str(e.value) and "position 3" in str(e.value)


def test_gguf_chat_template(smollm2_tok, smollm2_checkpoint, gguf_vocab):
    jinja2 = pytest.importorskip("jinja2")
    tok = smollm2_tok
    assert tok.has_chat_template and tok.chat_format == "chatml"
    template = json.loads((smollm2_checkpoint / "tokenizer_bpe.json").read_text(encoding="utf-8"))["chat_template"]
    hf = hf_reference(gguf_vocab)
    question = "What is the capital of France? Answer in 3 words."
    for system in (None, "You are terse."):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
        rendered = jinja2.Template(template).render(messages=messages, add_generation_prompt=True)
        ids = tok.encode_chat(question, system=system)
        assert ids == hf.encode(rendered, add_special_tokens=False).ids
        assert ids[0] == 1 and ids[-4:] == [1, *tok.encode("assistant\n")]
        assert tok.decode(ids) == rendered
    assert "SmolLM" in tok.decode(tok.encode_chat(question))  # the template's default system prompt


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer_bpe.json or tokenizer.model"):
        load_tokenizer(tmp_path)


def test_a_tokenizer_larger_than_the_model_is_refused(smollm2_checkpoint):
    """Another model's tokenizer left in the folder would emit ids past the embedding table."""
    assert load_tokenizer(smollm2_checkpoint, 49152).vocab_size == 49152
    with pytest.raises(ValueError, match="mixes two models"):
        load_tokenizer(smollm2_checkpoint, 1000)


def test_converting_again_replaces_the_tokenizer(tmp_path):
    """convert_hf_checkpoint into a folder that holds another model's tokenizer: the new files replace the old,
    and an old tokenizer_bpe.json (which load_tokenizer reads first) is removed."""
    from scripts.convert_hf_checkpoint import write_tokenizer

    src, out = tmp_path / "hf", tmp_path / "out"
    (src / "original").mkdir(parents=True)
    out.mkdir()
    (src / "tokenizer.model").write_bytes(b"new")
    (src / "original" / "tokenizer.model").write_bytes(b"original")
    (out / "tokenizer.model").write_bytes(b"old")
    (out / "tokenizer_bpe.json").write_text("{}")
    write_tokenizer(src, out)
    assert (out / "tokenizer.model").read_bytes() == b"new"  # the top-level file is preferred
    assert not (out / "tokenizer_bpe.json").exists()


def test_byte_decoder_is_gpt2s():
    table = gpt2_byte_decoder()
    assert sorted(table.values()) == list(range(256)) and len(table) == 256
    assert table["Ġ"] == 32 and table["Ċ"] == 10 and table["ĉ"] == 9 and table["A"] == 65 and table["Ā"] == 0


# ---- SentencePiece (Llama-2 / Mistral / TinyLlama style) ---------------------------------------

@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    """A tiny SentencePiece BPE model trained here on the sample text (well under a second)."""
    import io

    import sentencepiece

    model = io.BytesIO()
    lines = [line for line in (PROSE + CODE).split("\n") if line.strip()]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines * 4), model_writer=model, vocab_size=1000, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, hard_vocab_limit=False, minloglevel=2)
    folder = tmp_path_factory.mktemp("sp")
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    return folder


def test_sentencepiece_backend(sp_dir):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    tok = load_tokenizer(sp_dir)
    assert isinstance(tok, SentencePieceTokenizer) and tok.vocab_size == sp.vocab_size()
    text = PROSE + CODE
    assert tok.encode(text) == sp.encode(text)
    assert tok.encode(text, bos=True) == [sp.bos_id()] + sp.encode(text)
    assert tok.decode(tok.encode(text)) == text
    assert tok.stop_ids == {sp.eos_id()} and not tok.has_chat_template
    with pytest.raises(ValueError, match="no chat template"):
        tok.encode_chat("hi")
    with pytest.raises(ValueError, match="surrogate"):
        tok.encode("a\udfffb")


def test_sentencepiece_llama2_chat(sp_dir, tmp_path):
    import shutil

    import sentencepiece

    shutil.copy(sp_dir / "tokenizer.model", tmp_path / "tokenizer.model")
    template = "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    tok = load_tokenizer(tmp_path)
    assert tok.has_chat_template and tok.chat_format == "llama2"
    assert tok.encode_chat(" Name a colour. ") == [sp.bos_id()] + sp.encode("[INST] Name a colour. [/INST]")
    assert tok.encode_chat("Hi", system="Be brief.") == \
        [sp.bos_id()] + sp.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]")


# ---- Llama-3 tokenizer.model (tiktoken base64 ranks) -------------------------------------------

@pytest.fixture
def llama3_dir(tmp_path):
    """A tiny Llama-3-format ranks file: the 256 bytes, then a few merges."""
    merged = [b"th", b"he", b"the", b" t", b" the", b"in", b"ing", b" c", b"ca", b" cat", b"12", b"123"]
    ranks = [bytes([b]) for b in range(256)] + merged
    lines = [f"{base64.b64encode(token).decode()} {rank}" for rank, token in enumerate(ranks)]
    (tmp_path / "tokenizer.model").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_llama3_tiktoken_file(llama3_dir):
    tok = load_tokenizer(llama3_dir)
    n = 256 + 12
    assert isinstance(tok, TiktokenTokenizer) and tok.vocab_size == n + 256 == n + len(LLAMA3_SPECIALS)
    assert (tok.bos_id, tok.eos_id) == (n, n + 1)  # <|begin_of_text|>, <|end_of_text|>
    assert tok.stop_ids == {n + 1, n + 8, n + 9}  # + <|eom_id|>, <|eot_id|>
    assert tok.encode("the cat") == [256 + 2, 256 + 9]
    assert tok.encode(" the thing", bos=True) == [n, 256 + 4, ord(" "), 256 + 0, 256 + 6]
    assert tok.encode("12345") == [256 + 11, ord("4"), ord("5")]  # digits in groups of at most three
    text = "Llama-3 style: the cat's 12345 ÿ é 😀\n\n  x"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode([n + 6, n + 9]) == "<|start_header_id|><|eot_id|>"
    assert not tok.has_chat_template


def test_llama3_chat(llama3_dir):
    template = "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>...{% endfor %}"
    (llama3_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    tok = load_tokenizer(llama3_dir)
    n = 256 + 12
    start, end, eot, e = n + 6, n + 7, n + 9, tok.encode
    assert tok.has_chat_template and tok.chat_format == "llama3"
    assert tok.encode_chat("the cat") == [n, start, *e("user"), end, *e("\n\n"), *e("the cat"), eot,
                                          start, *e("assistant"), end, *e("\n\n")]
    with_system = tok.encode_chat("hi", system="sys")
    assert with_system[:9] == [n, start, *e("system"), end] and with_system.count(eot) == 2


def test_sentencepiece_is_not_read_as_tiktoken(sp_dir, tmp_path):
    (tmp_path / "tokenizer.model").write_text("not base64!! 3\n")
    with pytest.raises(ValueError, match="neither a SentencePiece model nor a tiktoken ranks file"):
        load_tokenizer(tmp_path)
    assert isinstance(load_tokenizer(sp_dir), SentencePieceTokenizer)


def test_tokenizer_module_imports_light():
    """tokenizer.py must not pull in torch (data tools use it alone)."""
    code = "import sys, tokenizer; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_hf_tokenizer_json_is_converted(smollm2_tok, smollm2_checkpoint, gguf_vocab, tmp_path):
    """An HF snapshot of SmolLM2 has only tokenizer.json: convert_hf_checkpoint must turn it into a
    tokenizer that encodes exactly like the one from the GGUF."""
    from scripts.convert_hf_checkpoint import write_tokenizer

    src, out = tmp_path / "hf", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    hf_reference(gguf_vocab, smollm_original=True).save(str(src / "tokenizer.json"))  # SmolLM2's own layout
    template = json.loads((smollm2_checkpoint / "tokenizer_bpe.json").read_text())["chat_template"]
    (src / "tokenizer_config.json").write_text(json.dumps(dict(
        bos_token="<|im_start|>", eos_token="<|im_end|>", add_bos_token=False, chat_template=template)))
    write_tokenizer(src, out)
    ours = load_tokenizer(out)
    for text in [SAMPLE, *random_texts(30)]:
        assert ours.encode(text) == smollm2_tok.encode(text)
    assert ours.encode_chat("Hi there") == smollm2_tok.encode_chat("Hi there")
    assert ours.eos_id == smollm2_tok.special_id("<|im_end|>") and ours.eos_id in ours.stop_ids

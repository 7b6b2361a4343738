"""Tokenizers behind one interface: SentencePiece, tiktoken (Llama-3), GPT-2 byte-level BPE (GGUF).

    tok = load_tokenizer("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct")
    ids = tok.encode("Hello", bos=True); text = tok.decode(ids)
    prompt = tok.encode_chat("What is the capital of France?")   # ends with the assistant header

load_tokenizer picks the back-end from the files in the checkpoint directory:
  tokenizer_bpe.json  GPT-2 byte-level BPE written by scripts/convert_gguf.py (SmolLM2): the GGUF's
                      tokens (in GPT-2's byte-to-unicode form), token types, merges, bos/eos ids,
                      add_bos, llama.cpp's pre-tokenizer name and the chat template. Encoded with
                      tiktoken: the ranks are the token ids (merge order and id order agree).
  tokenizer.model     a SentencePiece model (Llama-2, Mistral, TinyLlama), or a tiktoken ranks file
                      (lines "<base64 bytes> <rank>": Llama-3), told apart by content.
The chat format (chatml, llama3 or llama2) is detected from the model's chat template string: the
one in tokenizer_bpe.json, else tokenizer_config.json's. No template, no chat: has_chat_template
is False and encode_chat raises ValueError.

Text that is not valid Unicode (a lone surrogate) raises ValueError. GPT-2 vocabularies lack a few
byte tokens: ASCII control characters without a token (six in SmolLM2: U+0004, U+0006, U+0013,
U+0014, U+0016, U+001D) are stripped; any other character whose bytes have no token (in SmolLM2 the
unassigned planes U+40000-U+BFFFF) raises ValueError naming it.
"""
import base64
import json
import re
from pathlib import Path
from typing import Optional

# Split patterns by llama.cpp's `tokenizer.ggml.pre` name.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                  r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# SmolLM2 = HF's Digits(individual) + GPT-2's regex, as one pattern: each digit alone, and the
# spaces before a digit a piece of their own.
SMOLLM_PATTERN = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+"""
PRE_PATTERNS = {"smollm": SMOLLM_PATTERN, "gpt-2": GPT2_PATTERN, "default": GPT2_PATTERN,
                "llama-bpe": LLAMA3_PATTERN}

# Llama-3's 256 special tokens follow the 128000 ranks (Meta's reference tokenizer order).
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
LLAMA3_SPECIALS += [f"<|reserved_special_token_{i}|>" for i in range(2, 2 + 256 - len(LLAMA3_SPECIALS))]

# Tokens that end a turn or a document, in any of the supported vocabularies.
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>", "</s>")
GGUF_NORMAL_TOKEN = 1  # llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte


def gpt2_byte_decoder() -> dict:
    """GPT-2 writes each byte as a printable character: printable Latin-1 bytes stand for
    themselves, the other 68 bytes map, in byte order, to U+0100 onwards. Returns char -> byte."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(0x100 + i): b for i, b in enumerate(others)})
    return table


def chat_format_of(template: Optional[str]) -> Optional[str]:
    """Which of the supported chat formats a Jinja chat template writes, or None."""
    for marker, fmt in (("<|im_start|>", "chatml"), ("<|start_header_id|>", "llama3"), ("[INST]", "llama2")):
        if template and marker in template:
            return fmt
    return None


def default_system_of(template: Optional[str]) -> Optional[str]:
    """The system prompt a ChatML template inserts when the conversation has none (SmolLM2 does)."""
    m = re.search(r"<\|im_start\|>system(?:\n|\\n)(.+?)<\|im_end\|>", template or "", re.S)
    return m.group(1) if m and "{" not in m.group(1) else None


def utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"cannot encode {text[e.start]!r} at position {e.start}: not valid Unicode "
                         f"(a lone surrogate); pass real text") from None


class Tokenizer:
    """Shared interface. Back-ends set the attributes below and implement _encode / decode."""
    bos_id: Optional[int] = None
    eos_id: Optional[int] = None
    add_bos: bool = False  # whether the model's own tokenizer starts a sequence with bos_id
    stop_ids: set = set()
    chat_format: Optional[str] = None
    default_system: Optional[str] = None
    vocab_size: int = 0

    def encode(self, text: str, bos: bool = False) -> list:
        """Token ids of text. bos=True starts a sequence the way the model's tokenizer does:
        bos_id is prepended when the model uses one (Llama, Mistral, Llama-3; not SmolLM2)."""
        ids = self._encode(text)
        return [self.bos_id] + ids if bos and self.add_bos else ids

    def decode(self, ids) -> str:
        raise NotImplementedError

    def _encode(self, text: str) -> list:
        raise NotImplementedError

    def special_id(self, token: str) -> Optional[int]:
        return None

    @property
    def has_chat_template(self) -> bool:
        """A supported chat format, and the tokens it needs (llama3 and llama2 also start with bos)."""
        needed = {"chatml": ["<|im_start|>", "<|im_end|>"],
                  "llama3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "llama2": []}
        if self.chat_format not in needed:
            return False
        has_bos = self.bos_id is not None or self.chat_format == "chatml"
        return has_bos and all(self.special_id(t) is not None for t in needed[self.chat_format])

    def encode_chat(self, user_text: str, system: Optional[str] = None) -> list:
        """One user turn in the model's chat format, ending where the assistant's answer starts.
        system=None uses the template's default system prompt, if it has one."""
        if not self.has_chat_template:
            raise ValueError("this tokenizer has no chat template (a base model?): use encode() for a plain prompt")
        system = self.default_system if system is None else system
        turns = ([("system", system)] if system else []) + [("user", user_text)]
        s = self.special_id
        if self.chat_format == "chatml":  # <|im_start|>role\ncontent<|im_end|>\n ... <|im_start|>assistant\n
            ids = []
            for role, content in turns:
                ids += [s("<|im_start|>")] + self._encode(f"{role}\n{content}") + [s("<|im_end|>")] + self._encode("\n")
            return ids + [s("<|im_start|>")] + self._encode("assistant\n")
        if self.chat_format == "llama3":  # <|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>
            def header(role):
                return [s("<|start_header_id|>")] + self._encode(role) + [s("<|end_header_id|>")] + self._encode("\n\n")
            ids = [self.bos_id]
            for role, content in turns:
                ids += header(role) + self._encode(content) + [s("<|eot_id|>")]
            return ids + header("assistant")
        # llama2: <s>[INST] <<SYS>>\nsystem\n<</SYS>>\n\nuser [/INST]
        if system:
            user_text = f"<<SYS>>\n{system}\n<</SYS>>\n\n{user_text}"
        return [self.bos_id] + self._encode(f"[INST] {user_text.strip()} [/INST]")


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path: Path, chat_template: Optional[str] = None):
        import sentencepiece

        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError):
            raise ValueError(f"{path} is neither a SentencePiece model nor a tiktoken ranks file") from None
        self.vocab_size = self.sp.vocab_size()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.add_bos = self.bos_id is not None
        self.stop_ids = {self.eos_id} - {None}
        self.chat_format = chat_format_of(chat_template)

    def _encode(self, text: str) -> list:
        utf8(text)
        return self.sp.encode(text)

    def decode(self, ids) -> str:
        return self.sp.decode(list(ids))


class TiktokenTokenizer(Tokenizer):
    """tiktoken over byte ranks: Llama-3's tokenizer.model, or a GGUF GPT-2 vocabulary."""

    def __init__(self, name: str, pattern: str, ranks: dict, specials: dict, bos_id: Optional[int],
                 eos_id: Optional[int], add_bos: bool, chat_template: Optional[str] = None):
        import tiktoken

        self.enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
        self.specials = specials
        self.vocab_size = max([*ranks.values(), *specials.values()]) + 1
        self.bos_id, self.eos_id = bos_id, eos_id
        self.add_bos = add_bos and self.bos_id is not None
        self.stop_ids = {specials[t] for t in STOP_TOKENS if t in specials} | ({self.eos_id} - {None})
        self.chat_format = chat_format_of(chat_template)
        self.default_system = default_system_of(chat_template) if self.chat_format == "chatml" else None
        # Bytes that have no token (a few in GPT-2 vocabularies), as a bytes.translate delete set.
        self.missing_bytes = bytes(b for b in range(256) if bytes([b]) not in ranks)

    def special_id(self, token: str) -> Optional[int]:
        return self.specials.get(token)

    def _encode(self, text: str) -> list:
        data = utf8(text)
        if self.missing_bytes and len(data.translate(None, self.missing_bytes)) != len(data):
            text = self._strip_untokenizable(text)
        return self.enc.encode_ordinary(text)  # special-token strings in text are plain text

    def _strip_untokenizable(self, text: str) -> str:
        kept = []
        for i, ch in enumerate(text):
            b = ch.encode("utf-8")
            if len(b.translate(None, self.missing_bytes)) == len(b):
                kept.append(ch)
            elif len(b) > 1:
                raise ValueError(f"cannot encode character {ch!r} (U+{ord(ch):04X}) at position {i}: "
                                 f"the vocabulary has no token for its bytes; remove it from the text")
            # else: an ASCII control character with no token: strip it
        return "".join(kept)

    def decode(self, ids) -> str:
        return self.enc.decode(list(ids))  # invalid UTF-8 (a cut-off character) becomes U+FFFD


def gguf_bpe_tokenizer(spec: dict) -> TiktokenTokenizer:
    """The tokenizer_bpe.json contents (see scripts/convert_gguf.py) -> tiktoken with ranks = ids."""
    pre = spec.get("pre") or "default"
    if pre not in PRE_PATTERNS:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported (supported: {', '.join(PRE_PATTERNS)})")
    byte_of = gpt2_byte_decoder()
    ranks, specials = {}, {}
    for i, (token, kind) in enumerate(zip(spec["tokens"], spec["token_types"])):
        if kind != GGUF_NORMAL_TOKEN:
            specials[token] = i
        elif all(c in byte_of for c in token):
            ranks[bytes(byte_of[c] for c in token)] = i
        else:
            raise ValueError(f"token {i} {token!r} is not in GPT-2's byte-to-unicode form")
    return TiktokenTokenizer(f"gguf-{pre}", PRE_PATTERNS[pre], ranks, specials, spec.get("bos_id"),
                             spec.get("eos_id"), spec.get("add_bos", False), spec.get("chat_template"))


def read_tiktoken_ranks(path: Path) -> Optional[dict]:
    """Lines "<base64 token bytes> <rank>" -> {bytes: rank}; None if the file is not in that form."""
    ranks = {}
    try:
        for line in path.read_bytes().splitlines():
            if line:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
    except ValueError:  # binascii.Error is a ValueError; so are a bad split and a bad int
        return None
    return ranks or None


def template_from_config(checkpoint_dir: Path) -> Optional[str]:
    path = checkpoint_dir / "tokenizer_config.json"
    template = json.loads(path.read_text(encoding="utf-8")).get("chat_template") if path.is_file() else None
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


def load_tokenizer(checkpoint_dir, vocab_size: Optional[int] = None) -> Tokenizer:
    """The checkpoint's tokenizer; vocab_size: the model's, which every token id must fit."""
    tokenizer = _load_tokenizer(Path(checkpoint_dir))
    if vocab_size is not None and tokenizer.vocab_size > vocab_size:
        raise ValueError(f"the tokenizer in {checkpoint_dir} has {tokenizer.vocab_size} tokens but the model only "
                         f"{vocab_size}: the folder mixes two models' files; convert the model into an empty folder")
    return tokenizer


def _load_tokenizer(checkpoint_dir: Path) -> Tokenizer:
    bpe_path, model_path = checkpoint_dir / "tokenizer_bpe.json", checkpoint_dir / "tokenizer.model"
    if bpe_path.is_file():
        return gguf_bpe_tokenizer(json.loads(bpe_path.read_text(encoding="utf-8")))
    if not model_path.is_file():
        raise FileNotFoundError(f"no tokenizer_bpe.json or tokenizer.model in {checkpoint_dir}: "
                                f"convert the model with scripts/convert_gguf.py or scripts/convert_hf_checkpoint.py")
    template = template_from_config(checkpoint_dir)
    ranks = read_tiktoken_ranks(model_path)
    if ranks is None:
        return SentencePieceTokenizer(model_path, template)
    specials = {name: len(ranks) + i for i, name in enumerate(LLAMA3_SPECIALS)}
    return TiktokenTokenizer("llama3", LLAMA3_PATTERN, ranks, specials, specials["<|begin_of_text|>"],
                             specials["<|end_of_text|>"], True, template)

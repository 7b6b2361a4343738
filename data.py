"""Text for calibration and evaluation, and the token windows cut from it.

Sources (load_text):
  wiki-calib, wiki-eval   Wikipedia articles, split by article into disjoint sets (the
                          defaults for calibration and for evaluation)
  news                    300 news stories (Lee corpus)
  botchan                 a novel, the out-of-domain check
  a path                  any local UTF-8 text file
  hf:wikitext2, hf:wikitext2-test, hf:c4   online: WikiText-2 raw validation / test,
                          one C4 (en) validation shard, through huggingface_hub
The first four are prepared once into data/ by `python scripts/prepare_data.py`, which
also writes data/manifest.json (sources, sha256, the article titles of each split).
"""
import gzip
import json
import math
from pathlib import Path

import torch

DATA_DIR = Path(__file__).resolve().parent / "data"
OFFLINE = {"wiki-calib": "wiki_calib.txt", "wiki-eval": "wiki_eval.txt",
           "news": "news.txt", "botchan": "botchan.txt"}
HF_FILES = {  # source -> (dataset repo, file in it)
    "hf:wikitext2": ("Salesforce/wikitext", "wikitext-2-raw-v1/validation-00000-of-00001.parquet"),
    "hf:wikitext2-test": ("Salesforce/wikitext", "wikitext-2-raw-v1/test-00000-of-00001.parquet"),
    "hf:c4": ("allenai/c4", "en/c4-validation.00000-of-00008.json.gz"),
}
PREPARE = "run `python scripts/prepare_data.py` to prepare the offline text"


def load_text(source: str, data_dir: Path | str = DATA_DIR) -> str:
    """The text of a source: a name above, or a path to a local text file."""
    if source in OFFLINE:
        path = Path(data_dir) / OFFLINE[source]
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: {PREPARE}")
        return path.read_text(encoding="utf-8")
    if source in HF_FILES:
        return _load_hf(source)
    path = Path(source)
    if path.is_file():
        return path.read_text(encoding="utf-8")
    hint = f"use one of {', '.join([*OFFLINE, *HF_FILES])} or a path to a text file; for the offline ones, {PREPARE}"
    if path.suffix or "/" in source:
        raise FileNotFoundError(f"no text file {source}: {hint}")
    raise ValueError(f"unknown text source {source!r}: {hint}")


def _load_hf(source: str) -> str:
    """Download (or take from the HF cache) one dataset file and join its documents."""
    from huggingface_hub import hf_hub_download

    repo_id, filename = HF_FILES[source]
    path = hf_hub_download(repo_id=repo_id, filename=filename, repo_type="dataset")
    if filename.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"{source} needs pyarrow to read {filename}: pip install pyarrow") from None
        # WikiText rows are lines (headings, paragraphs, blanks); joined the usual way
        return "\n\n".join(pq.read_table(path, columns=["text"]).column("text").to_pylist())
    with gzip.open(path, "rt", encoding="utf-8") as f:  # C4: one JSON document per line
        return "\n\n".join(json.loads(line)["text"] for line in f)


def token_windows(ids, n_windows: int, window_len: int, seed: int = 0) -> torch.Tensor:
    """n_windows non-overlapping windows of window_len tokens at random places -> (n, L) int64.

    The places are uniform over all non-overlapping layouts and fixed by the seed: the
    slack (tokens left over) is cut at n sorted random points, window i starts after
    i windows plus the i-th cut. Windows come out in text order, on the CPU.
    """
    ids = torch.as_tensor(ids, dtype=torch.long).flatten().cpu()
    if n_windows < 1 or window_len < 1:
        raise ValueError(f"need n_windows >= 1 and window_len >= 1, got {n_windows} and {window_len}")
    slack = len(ids) - n_windows * window_len
    if slack < 0:
        raise ValueError(f"the text has {len(ids)} tokens, too few for {n_windows} non-overlapping windows "
                         f"of {window_len} (needs {n_windows * window_len}): use fewer or shorter windows "
                         f"or a longer text")
    gen = torch.Generator().manual_seed(seed)
    cuts = torch.randint(0, slack + 1, (n_windows,), generator=gen).sort().values  # (n,)
    starts = cuts + torch.arange(n_windows) * window_len  # (n,)
    return ids[starts[:, None] + torch.arange(window_len)]  # (n, L)


def calibration_tokens(tokenizer, source: str = "wiki-calib", n_tokens: int = 65536,
                       seq_len: int = 2048) -> torch.Tensor:
    """The first ceil(n_tokens / seq_len) * seq_len tokens of a source, as contiguous
    chunks -> (n_seq, seq_len) int64. tokenizer.encode(str) -> list[int]."""
    n_seq = math.ceil(n_tokens / seq_len)
    need = n_seq * seq_len
    text = load_text(source)
    n_chars = 8 * need  # encode only a prefix: no tokenizer averages 8+ characters per token
    while True:
        # end the prefix just before a newline: its tokens are then the full text's first ones
        end = len(text) if n_chars >= len(text) else text.rfind("\n", 0, n_chars)
        ids = tokenizer.encode(text[: end if end > 0 else n_chars])
        if len(ids) >= need or n_chars >= len(text):
            break
        n_chars *= 2
    if len(ids) < need:
        raise ValueError(f"{source} has {len(ids)} tokens, fewer than the {n_seq} x {seq_len} asked for "
                         f"calibration: ask for fewer tokens or use a longer text")
    return torch.tensor(ids[:need], dtype=torch.long).view(n_seq, seq_len)

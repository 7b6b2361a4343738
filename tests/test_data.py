"""data.py and scripts/prepare_data.py on the real prepared text (a few seconds)."""
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data import calibration_tokens, load_text, token_windows

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "prepare_data.py"
spec = importlib.util.spec_from_file_location("prepare_data", SCRIPT)
prepare_data = importlib.util.module_from_spec(spec)
spec.loader.exec_module(prepare_data)


def _package(pattern: str) -> Path | None:
    for folder in (ROOT / "downloads", Path("/tmp/dl")):
        found = sorted(folder.glob(pattern))
        if found:
            return found[0]
    return None


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """The repo's data/ if prepared by the current script, else a fresh one in a tmp dir."""
    if prepare_data.up_to_date(ROOT / "data"):
        return ROOT / "data"
    gensim = _package("gensim-4.4.0*")
    sentencepiece = _package("sentencepiece-0.2.0.tar.gz")
    if gensim is None or sentencepiece is None:
        pytest.skip("no prepared data/ and no gensim 4.4.0 / sentencepiece 0.2.0 package files in "
                    "downloads/ or /tmp/dl: run `python scripts/prepare_data.py` first")
    out = tmp_path_factory.mktemp("data")
    subprocess.run([sys.executable, str(SCRIPT), "--data_dir", str(out), "--gensim", str(gensim),
                    "--sentencepiece", str(sentencepiece)], check=True, capture_output=True)
    return out


@pytest.fixture(scope="session")
def manifest(data_dir) -> dict:
    return json.loads((data_dir / "manifest.json").read_text())


class ByteTokenizer:
    """A real, if simple, tokenizer: one token per UTF-8 byte."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


def test_splits_disjoint_by_title_and_text(data_dir, manifest):
    calib_titles = manifest["outputs"]["wiki_calib"]["titles"]
    eval_titles = manifest["outputs"]["wiki_eval"]["titles"]
    assert len(calib_titles) >= 20 and len(eval_titles) >= 20
    assert not set(calib_titles) & set(eval_titles)
    calib = load_text("wiki-calib", data_dir)
    evaluation = load_text("wiki-eval", data_dir)
    assert len(calib.split("\n\n")) == len(calib_titles)  # blank lines separate articles only
    assert len(evaluation.split("\n\n")) == len(eval_titles)
    long_lines = lambda text: {line for line in text.splitlines() if len(line) > 200}
    shared = long_lines(calib) & long_lines(evaluation)
    assert not shared, f"{len(shared)} paragraphs in both splits, e.g. {next(iter(shared))[:100]!r}"


def test_splits_large_enough(data_dir, manifest):
    # ~4.5 characters per token under a ~50k BPE: eval must hold the paper's protocol
    # (128 x 2048 = 262k tokens), calibration well over 65k tokens
    evaluation = load_text("wiki-eval", data_dir)
    calib = load_text("wiki-calib", data_dir)
    assert len(evaluation) >= 1_200_000
    assert len(calib) >= 600_000
    assert manifest["outputs"]["wiki_eval"]["characters"] == len(evaluation.rstrip("\n"))
    assert manifest["outputs"]["news"]["stories"] == 300
    assert len(load_text("news", data_dir).split("\n\n")) == 300
    botchan = load_text("botchan", data_dir)
    assert len(botchan) > 200_000 and "GUTENBERG" not in botchan and "\r" not in botchan


@pytest.mark.parametrize("source", ["wiki-calib", "wiki-eval", "news", "botchan"])
def test_markup_gone(data_dir, source):
    text = load_text(source, data_dir)
    for debris in ("{{", "}}", "[[", "]]", "<ref", "</", "thumb|", "&nbsp;", "'''", "\n==", "\n{|", "\n|"):
        assert debris not in text, f"{debris!r} in {source}: {text[text.index(debris) - 80:][:200]!r}"
    if source != "botchan":  # whitespace collapsed, lines stripped
        assert all("  " not in line and line == line.strip() for line in text.splitlines())


def test_manifest_hashes_and_idempotent(data_dir, manifest):
    for entry in manifest["outputs"].values():
        data = (data_dir / entry["file"]).read_bytes()
        assert prepare_data.sha256(data) == entry["sha256"]
    assert set(manifest["sources"]) == {prepare_data.WIKI_MEMBER, prepare_data.NEWS_MEMBER,
                                        prepare_data.BOTCHAN_MEMBER}
    mtimes = [p.stat().st_mtime_ns for p in sorted(data_dir.iterdir())]
    run = subprocess.run([sys.executable, str(SCRIPT), "--data_dir", str(data_dir)],
                         capture_output=True, text=True, check=True)
    assert "up to date" in run.stdout
    assert [p.stat().st_mtime_ns for p in sorted(data_dir.iterdir())] == mtimes


def test_clean_wikitext():
    markup = """{{Infobox person|name=X|born=1900}}'''Ada Example''' (born {{birth date|1900|1|1}}) was a [[poet|writer]].<ref>{{cite book|title=Hidden}}</ref> She wrote.<ref name="a"/>
[[File:Ada.jpg|thumb|A [[portrait]] caption]]
== Life ==
She lived in [[Paris]].<!-- a comment -->
{| class="wikitable"
|-
| cell one || cell two
|}
* A listed item.
== References ==
{{reflist}}
* Smith, ''A book''.
== Legacy ==
Remembered &amp; read.
[[Category:Poets]]
[[de:Ada Example]]"""
    assert prepare_data.clean_wikitext(markup) == (
        "Ada Example was a writer. She wrote.\nLife\nShe lived in Paris.\nA listed item.\n"
        "Legacy\nRemembered & read.")


def test_load_text_file_and_errors(data_dir, tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("some text\nover two lines\n", encoding="utf-8")
    assert load_text(str(path)) == "some text\nover two lines\n"
    with pytest.raises(ValueError, match="prepare_data.py"):
        load_text("wiki-nonsense")
    with pytest.raises(FileNotFoundError, match="hf:wikitext2"):  # the error lists the valid names
        load_text(str(tmp_path / "missing.txt"))
    with pytest.raises(FileNotFoundError, match="prepare_data.py"):
        load_text("wiki-eval", tmp_path)  # an empty data dir


def test_token_windows_deterministic_and_seeded(data_dir):
    ids = ByteTokenizer().encode(load_text("wiki-eval", data_dir))
    a = token_windows(ids, 64, 512, seed=0)
    assert a.shape == (64, 512) and a.dtype == torch.long
    assert torch.equal(a, token_windows(torch.tensor(ids), 64, 512, seed=0))
    assert not torch.equal(a, token_windows(ids, 64, 512, seed=1))
    assert token_windows(ids, 128, 2048, seed=0).shape == (128, 2048)


@pytest.mark.parametrize("n, length, seed", [(64, 512, 0), (128, 2048, 3), (7, 100, 5), (10, 100, 1)])
def test_token_windows_in_bounds_contiguous_disjoint(n, length, seed):
    n_tokens = 1000 if n * length <= 1000 else 300_000
    ids = torch.randperm(n_tokens, generator=torch.Generator().manual_seed(seed))  # each value once
    where = torch.empty(n_tokens, dtype=torch.long)
    where[ids] = torch.arange(n_tokens)  # value -> position
    windows = token_windows(ids, n, length, seed)
    starts = where[windows[:, 0]]
    for window, start in zip(windows, starts):
        assert 0 <= start and start + length <= n_tokens
        assert torch.equal(window, ids[start:start + length])
    assert (starts[1:] - starts[:-1] >= length).all()  # in text order, no overlap


def test_token_windows_too_short():
    ids = list(range(1000))
    assert token_windows(ids, 10, 100, seed=0).shape == (10, 100)  # exactly fits: the whole text
    with pytest.raises(ValueError, match="too few"):
        token_windows(ids, 11, 100, seed=0)


def test_calibration_tokens(data_dir):
    path = str(data_dir / "wiki_calib.txt")
    full = ByteTokenizer().encode(load_text("wiki-calib", data_dir))
    chunks = calibration_tokens(ByteTokenizer(), path, n_tokens=65536, seq_len=2048)
    assert chunks.shape == (32, 2048)
    assert chunks.flatten().tolist() == full[:32 * 2048]  # contiguous, from the start
    assert calibration_tokens(ByteTokenizer(), path, n_tokens=1000, seq_len=512).shape == (2, 512)
    with pytest.raises(ValueError, match="fewer than"):
        calibration_tokens(ByteTokenizer(), path, n_tokens=len(full) + 1, seq_len=1)


def test_lm_eval_task_documents(data_dir, manifest):
    """The local lm-eval tasks' documents: as many as asked, well formed, rebuilt identically from the
    held-out text by the seed, and none of their text in the calibration split."""
    read = lambda name: [json.loads(line) for line in (data_dir / f"{name}.jsonl").read_text().splitlines()]
    cloze, ending = read("wiki_cloze"), read("wiki_ending")
    assert len(cloze) == manifest["outputs"]["wiki_cloze"]["docs"] == prepare_data.CLOZE_DOCS
    assert len(ending) == manifest["outputs"]["wiki_ending"]["docs"] == prepare_data.ENDING_DOCS
    for doc in cloze:
        assert doc["target"].isalpha() and re.search(rf"\b{doc['target']}\b", doc["context"]), doc
    for doc in ending:
        assert len(doc["choices"]) == len(set(doc["choices"])) == 4 and 0 <= doc["label"] < 4
    assert sorted({doc["label"] for doc in ending}) == [0, 1, 2, 3]
    articles = load_text("wiki-eval", data_dir).rstrip("\n").split("\n\n")
    calib = load_text("wiki-calib", data_dir)
    assert prepare_data.cloze_docs(articles, len(cloze), prepare_data.LM_EVAL_SEED, calib) == cloze
    assert prepare_data.ending_docs(articles, len(ending), prepare_data.LM_EVAL_SEED, calib) == ending
    assert prepare_data.cloze_docs(articles, len(cloze), prepare_data.LM_EVAL_SEED + 1, calib) != cloze
    assert not [doc for doc in cloze if doc["context"][-60:] in calib]
    assert not [doc for doc in ending if (doc["context"] + " " + doc["choices"][doc["label"]])[-60:] in calib]

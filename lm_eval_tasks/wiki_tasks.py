"""Documents of the local lm-eval tasks, read from data/ (written there by scripts/prepare_data.py).

The task YAMLs beside this file name these functions as their `custom_dataset`, so the documents
come from a local file wherever lm-eval runs from, with no dataset hub.
"""
import json
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent.parent / "data"


def read_docs(name: str) -> list:
    path = DATA_DIR / f"{name}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `python scripts/prepare_data.py` to build the "
                                f"local lm-eval tasks' documents from the held-out Wikipedia text")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def as_dataset(name: str) -> dict:
    import datasets  # lm-eval's own dependency

    return {"test": datasets.Dataset.from_list(read_docs(name))}


def wiki_cloze(**metadata) -> dict:
    """{"test": documents {"context", "target"}}; lm-eval passes the task's metadata, unused."""
    return as_dataset("wiki_cloze")


def wiki_ending(**metadata) -> dict:
    """{"test": documents {"context", "choices", "label"}}."""
    return as_dataset("wiki_ending")

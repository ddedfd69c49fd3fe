"""Next-token prediction (Patchscopes paper, Fig. 2): logit lens, affine lens and token identity, layer by layer.

For a text and a random position i, each method decodes a next-token distribution from h_i^ℓ.
Precision@1: its argmax equals the argmax of the model's own output at i. Surprisal: −ln p_orig(that argmax).
The affine lens is fitted on texts disjoint from the evaluated ones; at ℓ = L−1 it is the identity by
definition (the map from the last layer onto itself).

    >>> from patchscopes import load_model                                                # doctest: +SKIP
    >>> result = run_next_token(load_model("SmolLM2-135M"), "runs/ntp", QUICK_NEXT_TOKEN)  # doctest: +SKIP
    >>> result.summary.head()                                                            # doctest: +SKIP
"""

from __future__ import annotations

import csv
import gzip
import json
import random
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from patchscopes import plots
from patchscopes.capture import capture
from patchscopes.datasets import data_dir
from patchscopes.evals.common import EvalError, UnitCounter, chunks, open_store, run_config
from patchscopes.lenses import AffineLens, LogitLens
from patchscopes.models.loading import ModelHandle, Tokenized
from patchscopes.presets import TOKEN_IDENTITY
from patchscopes.progress import progress_bar
from patchscopes.sweep import sweep

METHODS = ("logit_lens", "affine_lens", "token_identity")


@dataclass(frozen=True)
class NextTokenConfig:
    """Every parameter of a next-token run (written to ``config.json``).

    ``layers=None`` means every block. ``min_context`` tokens precede every evaluated position;
    ``max_tokens`` truncates long texts. The affine lens sees at most ``train_positions`` positions,
    ``train_positions_per_text`` of each training text (``None``: all of them; the paper: 1).
    """

    n_eval: int = 60
    train_positions: int = 3000
    train_positions_per_text: int | None = None
    layers: tuple[int, ...] | None = None
    min_context: int = 4
    max_tokens: int = 64
    ridge: float = 1e-3
    batch_size: int = 32
    unit_size: int = 10
    corpus: tuple[str, ...] = ()
    seed: int = 0


DEFAULT_NEXT_TOKEN = NextTokenConfig()
QUICK_NEXT_TOKEN = NextTokenConfig(n_eval=4, train_positions=800, layers=(0, 15, -1), unit_size=2)
PAPER_NEXT_TOKEN = NextTokenConfig(n_eval=2000, train_positions=1_000_000, train_positions_per_text=1, unit_size=50)
"""The paper's protocol: 2,000 evaluated positions, the lens fitted on one random position of every other text."""


@dataclass
class NextTokenResult:
    rows: pd.DataFrame
    summary: pd.DataFrame
    out: Path


def default_corpus() -> list[str]:
    """The distinct WikiText snippets (``prompt_source``) of the Patchscopes attribute files, in a fixed order."""
    files = sorted((data_dir() / "patchscopes").glob("*/*.tsv"))
    if not files:
        raise EvalError(f"no *.tsv files under {data_dir() / 'patchscopes'}; set PATCHSCOPES_DATA or pass --corpus files")
    return read_corpus(files)


def _jsonl_texts(path: Path) -> Iterator[str]:
    """The ``text`` field of each line of a JSON-lines file (the Pile's layout), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise EvalError(f"{path}, line {number}: not JSON ({err.msg}); write one object per line") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise EvalError(f"{path}, line {number}: no string field 'text'; write objects like {{\"text\": ...}}")
            yield record["text"]


def read_corpus(paths: Iterable[str | Path]) -> list[str]:
    """Texts from files, each once in first-seen order.

    A ``.jsonl`` (or ``.jsonl.gz``) file gives the ``text`` field of each line, newlines kept (the Pile's
    layout: whole documents); a ``.tsv`` its ``prompt_source`` column; any other file one text per non-empty line.
    """
    csv.field_size_limit(sys.maxsize)
    seen: dict[str, None] = {}
    for path in map(Path, paths):
        if not path.is_file():
            raise EvalError(f"corpus file {path} does not exist")
        if path.name.endswith((".jsonl", ".jsonl.gz")):
            for text in _jsonl_texts(path):
                if text.strip():
                    seen.setdefault(text, None)
        elif path.suffix == ".tsv":
            with path.open(encoding="utf-8", newline="") as f:
                reader = csv.DictReader(f, delimiter="\t")
                if "prompt_source" not in (reader.fieldnames or []):
                    raise EvalError(f"{path}, line 1: no 'prompt_source' column (have: {reader.fieldnames})")
                for row in reader:
                    text = (row["prompt_source"] or "").strip()
                    if text:
                        seen.setdefault(text, None)
        else:
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    seen.setdefault(line.strip(), None)
    return list(seen)


@dataclass(frozen=True)
class Example:
    index: int
    text: str
    ids: tuple[int, ...]
    position: int


def _prefix(lm: ModelHandle, tokens: Tokenized, n: int, slack: int = 8) -> str:
    """The text of the first ``n`` tokens, so a source run stops at the evaluated position. A cut inside a
    character that spans several tokens does not tokenize back to the same ids, so up to ``slack`` more tokens
    are tried; then the whole text (the position must index the same token)."""
    for k in range(n, min(n + slack, len(tokens.ids))):
        cut = tokens.text[: tokens.offsets[k - 1][1]]
        if cut.strip() and lm.tokenize(cut).ids == tokens.ids[:k]:
            return cut
    return tokens.text


def split_examples(lm: ModelHandle, texts: Sequence[str], config: NextTokenConfig) -> tuple[list[Example], list[str]]:
    """Seeded split: ``n_eval`` texts with one random position each, and the disjoint rest for training."""
    order = list(dict.fromkeys(texts))
    random.Random(config.seed).shuffle(order)
    rng = random.Random(config.seed + 1)
    examples: list[Example] = []
    used = 0
    for text in order:
        if len(examples) == config.n_eval:
            break
        used += 1
        tokens = lm.tokenize(text)
        ids = tokens.ids[: config.max_tokens]
        if len(ids) <= config.min_context:
            continue
        position = rng.randrange(config.min_context, len(ids))
        examples.append(Example(len(examples), _prefix(lm, tokens, position + 1), tuple(ids), position))
    if len(examples) < config.n_eval:
        raise EvalError(f"the corpus gives only {len(examples)} usable texts for n_eval={config.n_eval}; pass a larger corpus")
    train = order[used:]
    if not train:
        raise EvalError("no texts are left to fit the affine lens on; pass a larger corpus or a smaller n_eval")
    return examples, train


def _fit_lens(
    lm: ModelHandle, train: list[str], layers: list[int], config: NextTokenConfig, out: Path, progress: bool
) -> AffineLens:
    path = out / "affine_lens"
    if (path / "lens.json").is_file():
        return AffineLens.load(path)
    fit_layers = [layer for layer in layers if layer != lm.n_layers - 1]
    if not fit_layers:  # only the last layer, where the affine lens is the identity
        return AffineLens({}, lm.name)
    lens = AffineLens.fit(
        lm,
        train,
        fit_layers,
        max_positions=config.train_positions,
        ridge=config.ridge,
        progress=progress,
        positions_per_text=config.train_positions_per_text,
        seed=config.seed,
        max_tokens=config.max_tokens,  # fitted on the positions the evaluation draws from
    )
    lens.save(path)
    return lens


def _lens_logits(lm: ModelHandle, lens: AffineLens, layer: int, h: torch.Tensor, method: str) -> torch.Tensor:
    if method == "logit_lens" or layer == lm.n_layers - 1:
        return LogitLens().logits(lm, layer, h)
    return lens.logits(lm, layer, h)


def _score(orig_logp: torch.Tensor, logits: torch.Tensor) -> tuple[int, bool, float]:
    top = int(logits.argmax())
    return top, top == int(orig_logp.argmax()), float(-orig_logp[top])


def _unit_rows(
    lm: ModelHandle, lens: AffineLens, examples: Sequence[Example], layers: list[int], batch_size: int
) -> list[dict[str, Any]]:
    last = lm.n_layers - 1
    wanted = sorted(set(layers) | {last})
    states = capture(lm, [list(e.ids) for e in examples], [[e.position] for e in examples], wanted, batch_size)
    ti = sweep(
        lm,
        [e.text for e in examples],
        TOKEN_IDENTITY,
        source_layers=layers,
        positions=[e.position for e in examples],
        batch_size=batch_size,
        extra=lambda r: {"top1_id": r.top_ids[0]},
        progress=False,
    )
    rows = []
    for e, st in zip(examples, states):
        orig = torch.log_softmax(LogitLens().logits(lm, last, st[wanted.index(last), 0]), -1)
        token = lm.token_strings([e.ids[e.position]])[0]
        for layer in layers:
            h = st[wanted.index(layer), 0]
            for method in METHODS:
                if method == "token_identity":
                    hit = ti[(ti.example == e.index - examples[0].index) & (ti.source_layer == layer)]
                    top = int(hit["top1_id"].iloc[0])
                    prec, surprisal = top == int(orig.argmax()), float(-orig[top])
                else:
                    top, prec, surprisal = _score(orig, _lens_logits(lm, lens, layer, h, method))
                rows.append(
                    {
                        "example": e.index,
                        "position": e.position,
                        "token": token,
                        "layer": layer,
                        "method": method,
                        "top1": lm.token_strings([top])[0],
                        "model_top1": lm.token_strings([int(orig.argmax())])[0],
                        "precision_at_1": float(prec),
                        "surprisal": surprisal,
                    }
                )
    return rows


ROW_COLUMNS = ("example", "layer", "method", "precision_at_1", "surprisal")  # what the summary reads


def summarize(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean Precision@1 and surprisal per (method, layer), with the number of examples."""
    grouped = rows.groupby(["method", "layer"])
    table = grouped.agg(precision_at_1=("precision_at_1", "mean"), surprisal=("surprisal", "mean"), n=("example", "count"))
    return table.reset_index()


def plot(summary: pd.DataFrame, title: str) -> Any:
    """Precision@1 and surprisal per layer for the three methods, in the style of the paper's Fig. 2."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for method in METHODS:
        part = summary[summary.method == method].sort_values("layer")
        axes[0].plot(part.layer, part.precision_at_1, marker="o", markersize=3, label=method.replace("_", " "))
        axes[1].plot(part.layer, part.surprisal, marker="o", markersize=3, label=method.replace("_", " "))
    axes[0].set_ylabel("Precision@1")
    axes[1].set_ylabel("Surprisal (nats)")
    for ax in axes:
        ax.set_xlabel("source layer ℓ")
        ax.grid(alpha=0.3)
    axes[0].set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def run_next_token(
    lm: ModelHandle,
    out: str | Path,
    config: NextTokenConfig = DEFAULT_NEXT_TOKEN,
    texts: Iterable[str] | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> NextTokenResult:
    """Run (or resume) the next-token evaluation into ``out``; writes rows, ``summary.csv`` and ``next_token.png``.

    ``texts`` overrides the corpus (any iterable of strings, e.g. a ``datasets`` column); ``config.corpus``
    names files to read. ``stop_after`` interrupts on purpose after that many units (for tests).
    """
    out = Path(out)
    layers = sorted({layer % lm.n_layers for layer in (config.layers if config.layers is not None else range(lm.n_layers))})
    if texts is not None:
        corpus = list(texts)
        config = replace(config, corpus=config.corpus or (f"<{len(corpus)} texts passed in>",))
    else:
        corpus = read_corpus(config.corpus) if config.corpus else default_corpus()
    store = open_store(out, run_config("next-token", lm, config.seed, config), {"rows": ROW_COLUMNS})
    examples, train = split_examples(lm, corpus, config)
    lens = _fit_lens(lm, train, layers, config, out, progress)
    counter = UnitCounter(stop_after)
    units = list(chunks(examples, config.unit_size))
    with progress_bar(len(units), "next-token units", enabled=progress) as advance:
        for index, part in units:
            if not store.done("rows", index):
                store.append("rows", index, _unit_rows(lm, lens, part, layers, config.batch_size))
                counter.tick()
            advance(1)
    rows = store.frame("rows")
    summary = summarize(rows)
    store.write_csv("summary.csv", summary)
    store.write_csv("rows.csv", rows)
    plots.save(plot(summary, f"{lm.name}: next-token prediction, {len(examples)} positions"), out / "next_token.png")
    store.write_csv("scores.csv.gz", rows[["example", "layer", "method", "precision_at_1", "surprisal"]])
    lengths = pd.Series([len(e.ids) for e in examples])
    store.write_json(
        "summary.json",
        {
            "kind": "next-token",
            "n_examples": len(examples),
            "n_train_texts": len(train),
            "train_positions_per_text": config.train_positions_per_text,
            "eval_text_tokens_median": float(lengths.median()),
            "eval_text_tokens_max": int(lengths.max()),
        },
    )
    return NextTokenResult(rows, summary, out)


def summary_table(summary: pd.DataFrame, every: int = 1) -> pd.DataFrame:
    """Wide table: one row per layer, Precision@1 and surprisal per method."""
    wide = summary.pivot_table(index="layer", columns="method", values=["precision_at_1", "surprisal"])
    wide.columns = [":".join(map(str, column)) for column in wide.columns]
    wide = wide.reset_index()
    return wide[wide.layer % every == 0] if every > 1 else wide

"""Attribute extraction vs linear probing (Patchscopes paper, Table 2).

Per task (a TSV in the format of the paper's preprocessed data):

1. screen: keep the samples the model answers itself — given ``prompt_target`` with ``x`` replaced by
   the subject, the object appears in its 20 greedy tokens (the paper's filter);
2. patchscope: the hidden state of the last subject token in a WikiText snippet (position recomputed
   for this model's tokenizer from the subject string) is patched at ``x`` of ``prompt_target``, over a
   grid of (ℓ, ℓ*); a snippet is correct at ℓ if the object appears in the 20 greedy tokens for SOME ℓ*;
3. probe: a per-layer logistic regression from the same hidden states to the object, 3-fold CV;
4. accuracy per layer, mean ± std over ℓ, paired t-test over ℓ with a Bonferroni correction over tasks.

``snippets`` (1–5) sets how many of a sample's distinct source snippets are used. Every snippet is a
data point, as in the paper's released code: a sample's score at ℓ is the share of its snippets that are
correct (for SOME ℓ*), and a task's accuracy at ℓ is the mean of its samples' scores; the probe scores each
snippet's hidden state and is aggregated the same way (its folds keep a sample's snippets together).
With one snippet this is the plain per-sample rule.

Correctness rule (:func:`is_correct`): all whitespace removed from both strings, compared
case-insensitively by default (the models capitalise objects inconsistently: "dollar" vs "Dollar").
The rule accepts an object mentioned anywhere in 20 tokens ("is a liquid. The transition from solid
to liquid…" counts for "solid"), so a stricter variant on the first generated line is reported beside it.

    >>> is_correct(" is the United States dollar.", "US Dollar")
    False
    >>> is_correct(" is the dollar", "Dollar")
    True
    >>> fill_placeholder("The official currency of x", "Japan")
    'The official currency of Japan'
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from patchscopes import plots
from patchscopes.capture import capture
from patchscopes.datasets import data_dir
from patchscopes.evals.attribute_data import AttributeSample, load_attribute_task
from patchscopes.evals.common import EvalError, UnitCounter, open_store, run_config, seeded_sample
from patchscopes.evals.probing import accuracy_of, paired_test, probe_predictions
from patchscopes.models.loading import ModelHandle
from patchscopes.patching import PatchedRun, run_patched
from patchscopes.positions import find_spans, resolve_positions
from patchscopes.presets import attribute
from patchscopes.progress import progress_bar
from patchscopes.results import ResultStore
from patchscopes.statistics import estimate
from patchscopes.sweep import sweep

#: The twelve tasks of the paper's Table 2.
TABLE2_TASKS = (
    "fruit_inside_color",
    "fruit_outside_color",
    "object_superclass",
    "substance_phase",
    "task_done_by_tool",
    "company_ceo",
    "country_currency",
    "food_from_country",
    "person_plays_position_in_sport",
    "person_plays_pro_sport",
    "product_by_company",
    "star_constellation",
)


@dataclass(frozen=True)
class AttributesConfig:
    """Every parameter of an attribute-extraction run.

    ``screen`` samples per task are screened (seeded order); the probe uses every screened sample the
    model answers; the (ℓ, ℓ*) grid uses at most ``grid_samples`` of those. Source layers are every
    ``layer_step``-th block from 0 and target layers every ``target_layer_step``-th, unless
    ``source_layers`` / ``target_layers`` are given. ``require_answer=False`` drops the paper's filter.
    ``snippets``: how many distinct source snippets of each sample (1–5, file order) are patched and probed.
    """

    tasks: tuple[str, ...] = TABLE2_TASKS
    task_files: tuple[str, ...] = ()
    screen: int | None = 8
    grid_samples: int | None = 2
    layer_step: int = 7
    target_layer_step: int = 14
    source_layers: tuple[int, ...] | None = None
    target_layers: tuple[int, ...] | None = None
    max_new_tokens: int = 20
    case_sensitive: bool = False
    require_answer: bool = True
    folds: int = 3
    min_samples: int = 15  # the paper drops tasks with fewer data points from its table
    batch_size: int = 32
    seed: int = 0
    snippets: int = 1


#: The task files hold at most this many source snippets per sample.
MAX_SNIPPETS = 5
#: Parameters added after the run format was fixed, with the value earlier runs used: recorded in
#: ``config.json`` only when they differ, so the directories of those runs stay resumable.
LATER_PARAMS = {"snippets": 1}

DEFAULT_ATTRIBUTES = AttributesConfig()
QUICK_ATTRIBUTES = AttributesConfig(
    tasks=("country_currency",), screen=4, grid_samples=1, source_layers=(3, 12), target_layers=(3,)
)


def is_correct(generated: str, obj: str, case_sensitive: bool = False) -> bool:
    """The paper's rule: the object, spaces removed, occurs in the generated text, spaces removed."""
    target = _normalised(obj, case_sensitive)
    return bool(target) and target in _normalised(generated, case_sensitive)


def _normalised(text: str, case_sensitive: bool) -> str:
    """``text`` as the correctness rule compares it: spaces removed, lower case unless ``case_sensitive``."""
    text = re.sub(r"\s+", "", text)
    return text if case_sensitive else text.lower()


def is_single_answer(generated: str, obj: str, answers: Iterable[str], case_sensitive: bool = False) -> bool:
    """The paper's rule, and the text names no other answer of the task (``answers``: the task's objects).

    A stricter reading than :func:`is_correct`: a text that lists several answers, as when the model
    repeats a prompt's list of options, does not count. An answer the object itself contains ("York" for
    "New York") is not another answer.

    >>> classes = ["animal", "bird", "fish", "fruit"]
    >>> is_single_answer(" is a fish.", "fish", classes)
    True
    >>> is_single_answer(" is one of animal, bird, fish, fruit", "fish", classes)
    False
    """
    normalised = {_normalised(a, case_sensitive) for a in answers}
    return _names_only(_normalised(generated, case_sensitive), _normalised(obj, case_sensitive), normalised)


def _names_only(text: str, target: str, answers: set[str]) -> bool:
    """Normalised ``text`` names ``target`` and none of ``answers`` but those ``target`` contains."""
    return bool(target) and target in text and not any(a and a not in target and a in text for a in answers)


def with_single_answer(grid: pd.DataFrame, screen: pd.DataFrame, case_sensitive: bool = False) -> pd.DataFrame:
    """``grid`` with ``correct_single_answer`` (:func:`is_single_answer`), each task's answers being the
    objects of its screened samples (and of its grid rows)."""
    if grid.empty or "text" not in grid.columns:
        return grid
    answers: dict[str, set[str]] = {}
    for frame in (screen, grid):
        if {"task", "object"} <= set(frame.columns):
            for task, objects in frame.groupby("task")["object"]:
                answers.setdefault(str(task), set()).update(str(o) for o in objects)
    normalised = {task: {_normalised(a, case_sensitive) for a in objects} for task, objects in answers.items()}
    single = [
        _names_only(_normalised(str(text), case_sensitive), _normalised(str(obj), case_sensitive), normalised[str(task)])
        for task, obj, text in zip(grid.task, grid.object, grid.text)
    ]
    return grid.assign(correct_single_answer=single)


def first_line(text: str) -> str:
    """The generated text up to its first line break (for the stricter variant of the rule)."""
    return text.strip().split("\n", 1)[0]


def fill_placeholder(prompt: str, subject: str, placeholder: str = "x") -> str:
    """``prompt`` with its last placeholder (the rule of :class:`~patchscopes.positions.Placeholder`) replaced by ``subject``."""
    spans = find_spans(prompt, placeholder, whole_word=True)
    if not spans:
        raise EvalError(f"no placeholder {placeholder!r} in target prompt {prompt!r}")
    start, end = spans[-1]
    return prompt[:start] + subject + prompt[end:]


def task_paths(config: AttributesConfig) -> list[Path]:
    """The task files: ``task_files`` if given, else ``<data>/patchscopes/{commonsense,factual}/<task>.tsv``."""
    if config.task_files:
        return [Path(p) for p in config.task_files]
    paths = []
    for task in config.tasks:
        found = sorted((data_dir() / "patchscopes").glob(f"*/{task}.tsv"))
        if not found:
            raise EvalError(f"no task file {task}.tsv under {data_dir() / 'patchscopes'}; known: {', '.join(TABLE2_TASKS)}")
        paths.append(found[0])
    return paths


def first_snippets(samples: Sequence[AttributeSample]) -> list[AttributeSample]:
    """One row per sample id: its first source snippet (the file keeps up to five per sample)."""
    seen: dict[str, AttributeSample] = {}
    for s in samples:
        seen.setdefault(s.sample_id, s)
    return list(seen.values())


def sample_snippets(samples: Sequence[AttributeSample], n: int) -> dict[str, list[AttributeSample]]:
    """Per sample id: its first ``n`` distinct source snippets, in file order (a repeated text counts once).

    The first entry is the row :func:`first_snippets` keeps, so ``n=1`` is the one-snippet evaluation."""
    out: dict[str, list[AttributeSample]] = {}
    for s in samples:
        chosen = out.setdefault(s.sample_id, [])
        if len(chosen) < n and all(c.prompt_source != s.prompt_source for c in chosen):
            chosen.append(s)
    return out


def recorded_params(config: AttributesConfig) -> dict[str, Any]:
    """The parameters ``config.json`` records: every field, less those of :data:`LATER_PARAMS` at their
    earlier value (so a run of the earlier format resumes, and any other value is a config mismatch)."""
    params = asdict(config)
    for name, earlier in LATER_PARAMS.items():
        if params[name] == earlier:
            del params[name]
    return params


def source_position(lm: ModelHandle, sample: AttributeSample) -> int:
    """The last token of the subject in the snippet, for this model's tokenizer."""
    tok = lm.tokenize(sample.prompt_source)
    return resolve_positions(sample.source_position, sample.prompt_source, tok.offsets)[-1]


def _layers(lm: ModelHandle, given: tuple[int, ...] | None, step: int) -> list[int]:
    return sorted({layer % lm.n_layers for layer in (given if given is not None else range(0, lm.n_layers, step))})


def _screen_rows(lm: ModelHandle, samples: Sequence[AttributeSample], config: AttributesConfig) -> list[dict[str, Any]]:
    prompts = [fill_placeholder(s.prompt_target, s.subject) for s in samples]
    outs = run_patched(lm, [PatchedRun(lm.tokenize(p).ids, []) for p in prompts], config.max_new_tokens, config.batch_size)
    rows = []
    for s, prompt, out in zip(samples, prompts, outs):
        text = lm.tokenizer.decode(out.generated)
        rows.append(
            {
                "task": s.task,
                "sample_id": s.sample_id,
                "line": s.line,
                "subject": s.subject,
                "object": s.object,
                "prompt": prompt,
                "generated": text,
                "answered": is_correct(text, s.object, config.case_sensitive),
                "source_position": source_position(lm, s),
            }
        )
    return rows


def _probe_rows(
    lm: ModelHandle,
    samples: Sequence[AttributeSample],
    snippets: Mapping[str, Sequence[AttributeSample]],
    layers: list[int],
    config: AttributesConfig,
) -> list[dict[str, Any]]:
    """Per layer: the probe cross-validated on every snippet of ``samples`` (a sample's snippets share a
    fold), each sample scored by the share of its snippets predicted right, the accuracy their mean."""
    if not samples:
        return []
    inputs = [snippet for s in samples for snippet in snippets.get(s.sample_id, [s])]
    ids = [lm.tokenize(s.prompt_source).ids for s in inputs]
    pos = [[source_position(lm, s)] for s in inputs]
    states = capture(lm, ids, pos, layers, config.batch_size)
    x = np.stack([st[:, 0].float().cpu().numpy() for st in states])  # [inputs, layers, d]
    labels = [s.object for s in inputs]
    groups = [s.sample_id for s in inputs]
    rows = []
    for i, layer in enumerate(layers):
        hits = probe_predictions(x[:, i], labels, config.folds, config.seed, groups=groups)
        scores = pd.Series(hits.astype(float)).groupby(groups, sort=False).mean()
        rows.append(
            {
                "task": samples[0].task,
                "layer": layer,
                "probe_accuracy": accuracy_of(scores.to_numpy()),
                "n": len(samples),
                "n_classes": len(set(labels)),
                # per sample, so the Patchscope and the probe can be compared on the same samples:
                # the ids right on at least one snippet, and each sample's share of snippets right
                "correct_ids": [str(sid) for sid, score in scores.items() if score > 0],
                "scores": {str(sid): float(score) for sid, score in scores.items()},
            }
        )
    return rows


def _grid_rows(
    lm: ModelHandle, snippets: Sequence[AttributeSample], sources: list[int], targets: list[int], config: AttributesConfig
) -> list[dict[str, Any]]:
    """The (ℓ, ℓ*) grid of one sample, for each of its ``snippets`` as source (``snippet`` numbers them)."""
    sample = snippets[0]
    df = sweep(
        lm,
        [s.prompt_source for s in snippets],
        attribute(sample.prompt_target, max_new_tokens=config.max_new_tokens),
        source_layers=sources,
        target_layers=targets,
        positions=[s.source_position for s in snippets],
        batch_size=config.batch_size,
        progress=False,
    )
    columns = ("example", "source_prompt", "source_position", "source_layer", "target_layer", "text")
    return [
        {
            "task": sample.task,
            "sample_id": sample.sample_id,
            "object": sample.object,
            "source_layer": int(source),
            "target_layer": int(target),
            "text": str(text),
            "correct": is_correct(str(text), sample.object, config.case_sensitive),
            "correct_first_line": is_correct(first_line(str(text)), sample.object, config.case_sensitive),
            "snippet": int(example),
            "source_prompt": str(prompt),
            "source_position": int(position),
        }
        for example, prompt, position, source, target, text in zip(*(df[c].tolist() for c in columns))
    ]


SCHEMAS = {  # per table, what the summary and the next stages read
    "screen": ("task", "sample_id", "answered"),
    "probe": ("task", "layer", "probe_accuracy", "n"),
    "grid": ("task", "sample_id", "source_layer", "correct", "correct_first_line"),
}


def with_snippets(grid: pd.DataFrame) -> pd.DataFrame:
    """``grid`` with its ``snippet`` column (0 for rows of runs made before it existed: their one snippet)."""
    if "snippet" not in grid.columns:
        return grid.assign(snippet=0)
    return grid.assign(snippet=grid["snippet"].fillna(0).astype(int))


def sample_scores(grid: pd.DataFrame, column: str = "correct", over_snippets: str = "mean") -> pd.Series:
    """Per (task, sample, source layer): the sample's score from its grid rows.

    A snippet counts at ℓ when ``column`` holds for SOME ℓ*; ``over_snippets="mean"`` (the evaluation's rule:
    every snippet is a data point) gives the share of the sample's snippets that count, ``"any"`` gives 1.0
    when at least one does. With one snippet per sample both are the plain 0/1 rule.
    """
    if over_snippets not in ("mean", "any"):
        raise ValueError(f"over_snippets must be 'mean' or 'any', got {over_snippets!r}")
    per_snippet = with_snippets(grid).groupby(["task", "sample_id", "snippet", "source_layer"])[column].any()
    by_sample = per_snippet.groupby(["task", "sample_id", "source_layer"])
    return by_sample.mean() if over_snippets == "mean" else by_sample.any().astype(float)


def _probe_scores(record: Mapping[Any, Any]) -> dict[str, float]:
    """A probe row's per-sample scores (runs made before ``scores`` existed: 1.0 for each correct id)."""
    scores = record.get("scores")
    if isinstance(scores, Mapping):
        return {str(k): float(v) for k, v in scores.items()}
    return {str(i): 1.0 for i in record["correct_ids"]}


def subject_table(grid: pd.DataFrame, probe: pd.DataFrame) -> pd.DataFrame:
    """One row per grid sample (subject): the Patchscope's and the probe's accuracy over the grid's source
    layers (0–1) and their difference, on the same samples and the same layers (the unit of a paired test).
    With several snippets per sample, each side scores a sample by the share of its snippets it gets right.
    When ``grid`` has ``correct_single_answer`` (:func:`with_single_answer`), the same under that rule:
    ``patchscope_single_answer`` and ``difference_single_answer``."""
    if grid.empty or probe.empty or "correct_ids" not in probe.columns:
        return pd.DataFrame(columns=["task", "sample_id", "patchscope", "probe", "difference"])
    ours = sample_scores(grid).rename("correct").reset_index()
    single = "correct_single_answer" in grid.columns
    if single:
        ours["single"] = sample_scores(grid, "correct_single_answer").to_numpy()
    right: dict[tuple[str, int], dict[str, float]] = {
        (str(r["task"]), int(r["layer"])): _probe_scores(r) for r in probe.to_dict("records")
    }
    ours["probe"] = [
        right.get((str(t), int(layer)), {}).get(str(s), 0.0) for t, s, layer in zip(ours.task, ours.sample_id, ours.source_layer)
    ]
    by_subject = ours.groupby(["task", "sample_id"], sort=False)
    table = by_subject.agg(patchscope=("correct", "mean"), probe=("probe", "mean")).reset_index()
    table["difference"] = table.patchscope - table.probe
    if single:
        table["patchscope_single_answer"] = by_subject["single"].mean().to_numpy()
        table["difference_single_answer"] = table.patchscope_single_answer - table.probe
    return table


def summarize(
    grid: pd.DataFrame, probe: pd.DataFrame, n_tasks: int, min_samples: int = 15, subjects: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Per task: patchscope and probe accuracy (%) mean ± std over the grid's source layers; the subject-level
    paired difference (Patchscope − probe on the same samples, points) with a 95% bootstrap interval over
    subjects; whether the task has the paper's ``min_samples``; and, for continuity, a t-test over layers
    (which treats layers as replicates: read the subject-level interval instead). ``subjects``: the
    :func:`subject_table` of ``grid`` and ``probe``, when the caller has it already."""
    subjects = subject_table(grid, probe) if subjects is None else subjects
    rows = []
    for task, part in grid.groupby("task", sort=False):
        per_layer = _per_layer(part, "correct")
        strict = _per_layer(part, "correct_first_line")
        single = _per_layer(part, "correct_single_answer") if "correct_single_answer" in part else None
        layers = list(per_layer.index)
        probe_part = (
            probe[probe.task == task].set_index("layer")["probe_accuracy"] * 100 if len(probe) else pd.Series(dtype=float)
        )
        probe_layers = probe_part.reindex(layers)
        test = paired_test(per_layer.tolist(), probe_layers.tolist(), n_tests=n_tasks)
        points = data_points(part)
        rows.append(
            {
                "task": task,
                "grid_samples": part.sample_id.nunique(),
                "probe_samples": int(probe[probe.task == task]["n"].iloc[0]) if len(probe_part) else 0,
                "patchscope_mean": float(per_layer.mean()),
                "patchscope_std": float(per_layer.std(ddof=0)),
                "patchscope_first_line_mean": float(strict.mean()),
                "patchscope_single_answer_mean": float(single.mean()) if single is not None else float("nan"),
                "probe_mean": float(probe_layers.mean()),
                "probe_std": float(probe_layers.std(ddof=0)),
                **_subject_difference(subjects[subjects.task == task]),
                "data_points": points,
                "meets_min_samples": points >= min_samples,
                "t": test.t,
                "p_bonferroni": test.p_corrected,
                "better": {"a": "patchscope", "b": "probe", None: ""}[test.winner],
            }
        )
        snippets = with_snippets(part).groupby("sample_id")["snippet"].nunique()
        if (snippets > 1).any():  # the sensitivity of the snippet rule: correct on at least one snippet
            probe_rows = probe[probe.task == task] if len(probe) else probe
            probe_any = [len(r["correct_ids"]) / r["n"] * 100 for r in probe_rows.to_dict("records") if r["layer"] in layers]
            rows[-1].update(
                {
                    "grid_snippets": points,
                    "patchscope_any_snippet_mean": float(_per_layer(part, "correct", "any").mean()),
                    "probe_any_snippet_mean": float(np.mean(probe_any)) if probe_any else float("nan"),
                }
            )
    return pd.DataFrame(rows)


def data_points(grid: pd.DataFrame) -> int:
    """How many data points a task's grid rows hold: its (sample, snippet) pairs, each snippet a data point as
    in the paper's released code (and its rule of dropping tasks with fewer than 15 of them)."""
    return len(with_snippets(grid)[["sample_id", "snippet"]].drop_duplicates())


def _subject_difference(subjects: pd.DataFrame) -> dict[str, float]:
    keys = ("subject_difference", "subject_difference_low", "subject_difference_high")
    if len(subjects) < 2:
        return dict.fromkeys(keys, float("nan"))
    est = estimate(subjects, {"kind": "mean", "column": "difference"})
    return dict(zip(keys, (100 * est.value, 100 * est.low, 100 * est.high)))


def _per_layer(grid: pd.DataFrame, column: str, over_snippets: str = "mean") -> pd.Series:
    """Accuracy (%) per source layer: the mean over samples of :func:`sample_scores` (a snippet counts at ℓ
    when ``column`` holds for some ℓ*)."""
    return sample_scores(grid, column, over_snippets).groupby("source_layer").mean() * 100


@dataclass
class AttributesResult:
    screen: pd.DataFrame
    probe: pd.DataFrame
    grid: pd.DataFrame
    summary: pd.DataFrame
    out: Path


def run_attributes(
    lm: ModelHandle,
    out: str | Path,
    config: AttributesConfig = DEFAULT_ATTRIBUTES,
    progress: bool = True,
    stop_after: int | None = None,
) -> AttributesResult:
    """Run (or resume) attribute extraction vs probing into ``out``.

    Units: one screening unit and one probe unit per task, one grid unit per (task, sample) holding the
    rows of all its snippets; the grid units run in a seeded order across tasks, so a run stopped early
    (``stop_after``, an interruption) has scored a random subset of each task's samples, not the first tasks.
    Writes ``summary.csv``, ``grid.csv`` and ``heatmaps.png`` (one panel per task).
    """
    if not 1 <= config.snippets <= MAX_SNIPPETS:
        raise EvalError(f"snippets must be between 1 and {MAX_SNIPPETS} (the files hold up to five), got {config.snippets}")
    out = Path(out)
    sources = _layers(lm, config.source_layers, config.layer_step)
    targets = _layers(lm, config.target_layers, config.target_layer_step)
    config = replace(config, source_layers=tuple(sources), target_layers=tuple(targets))
    store = open_store(out, run_config("attributes", lm, config.seed, recorded_params(config)), SCHEMAS)
    counter = UnitCounter(stop_after)
    tasks = [load_attribute_task(p) for p in task_paths(config)]
    snippets = {task.name: sample_snippets(task.samples, config.snippets) for task in tasks}
    with progress_bar(len(tasks), "screen + probe tasks", enabled=progress) as advance:
        for task in tasks:
            samples = seeded_sample(first_snippets(task.samples), config.screen, config.seed)
            if not store.done("screen", task.name):
                store.append("screen", task.name, _screen_rows(lm, samples, config))
                counter.tick()
            answered = _answered(store.frame("screen"), task.name, config.require_answer)
            kept = [s for s in samples if s.sample_id in answered]
            if not store.done("probe", task.name):
                store.append("probe", task.name, _probe_rows(lm, kept, snippets[task.name], list(range(lm.n_layers)), config))
                counter.tick()
            advance(1)
    screen = store.frame("screen")
    grid_units = []
    for task in tasks:
        samples = seeded_sample(first_snippets(task.samples), config.screen, config.seed)
        answered = _answered(screen, task.name, config.require_answer)
        kept = [s for s in samples if s.sample_id in answered]
        grid_units += kept[: config.grid_samples] if config.grid_samples is not None else kept
    # tasks interleaved in a seeded order: an unfinished run holds a random subset of every task's samples
    grid_units = seeded_sample(grid_units, None, config.seed)
    with progress_bar(
        len(grid_units), f"(ℓ, ℓ*) grid, {len(sources)}×{len(targets)} pairs per sample", enabled=progress
    ) as advance:
        for sample in grid_units:
            key = [sample.task, sample.sample_id]
            if not store.done("grid", key):
                store.append("grid", key, _grid_rows(lm, snippets[sample.task][sample.sample_id], sources, targets, config))
                counter.tick()
            advance(1)
    return finish(lm.name, store, len(tasks))


def _answered(screen: pd.DataFrame, task: str, require_answer: bool = True) -> set[str]:
    if screen.empty:
        return set()
    part = screen[(screen.task == task) & (screen.answered | (not require_answer))]
    return set(part.sample_id.astype(str))


def heatmaps(grid: pd.DataFrame, model_name: str, column: str = "correct") -> Any:
    """One panel per task: the share of samples whose object appears, per (ℓ, ℓ*), on a fixed 0–1 scale."""
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(grid.task))
    cols = min(4, len(tasks))
    rows = (len(tasks) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False, layout="constrained")
    image = None
    for ax, task in zip(axes.flat, tasks):
        part = grid[grid.task == task]
        table = part.assign(v=part[column].astype(float)).pivot_table(index="target_layer", columns="source_layer", values="v")
        table = table.sort_index(ascending=False)
        image = ax.imshow(table.to_numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_xticks(range(table.shape[1]), [str(c) for c in table.columns], fontsize=7)
        ax.set_yticks(range(table.shape[0]), [str(i) for i in table.index], fontsize=7)
        ax.set_title(f"{task} (n={part.sample_id.nunique()})", fontsize=8)
        ax.set_xlabel("source layer ℓ", fontsize=7)
        ax.set_ylabel("target layer ℓ*", fontsize=7)
    for ax in list(axes.flat)[len(tasks) :]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.6, label="accuracy")
    fig.suptitle(f"{model_name}: attribute extraction accuracy over (ℓ, ℓ*)", fontsize=10)
    return fig


def summarize_run(out: str | Path) -> AttributesResult:
    """Recompute the summaries, CSVs and heatmaps of an existing run directory (no model needed)."""
    store = ResultStore.reopen(out, SCHEMAS)
    config = store.config
    n_tasks = len(config["params"]["task_files"] or config["params"]["tasks"])
    return finish(str(config["model"]), store, n_tasks)


def finish(model_name: str, store: ResultStore, n_tasks: int) -> AttributesResult:
    """Summaries, CSVs and heatmaps from whatever ``store`` holds."""
    out = store.directory
    screen, probe, grid = store.frame("screen"), store.frame("probe"), store.frame("grid")
    params = store.config.get("params", {})
    min_samples = int(params.get("min_samples", 15))
    grid = with_single_answer(grid, screen, bool(params.get("case_sensitive", False)))
    subjects = subject_table(grid, probe)
    summary = summarize(grid, probe, n_tasks, min_samples, subjects) if not grid.empty else pd.DataFrame()
    if not screen.empty:
        kept = screen.groupby("task", sort=False)["answered"].agg(["sum", "count"]).reset_index()
        kept.columns = ["task", "answered", "screened"]
        summary = kept.merge(summary, on="task", how="left") if not summary.empty else kept
    if not summary.empty and "meets_min_samples" in summary.columns:  # the tasks the paper's rule keeps in its table
        kept_tasks = set(summary.task[summary.meets_min_samples.fillna(False).astype(bool)])
        subjects = subjects.assign(in_table=subjects.task.isin(kept_tasks))
    for name, frame in (("summary", summary), ("grid", grid), ("probe", probe), ("screen", screen), ("subjects", subjects)):
        store.write_csv(f"{name}.csv", frame)
    if not grid.empty:
        plots.save(heatmaps(grid, model_name), out / "heatmaps.png")
    store.write_json("summary.json", {"kind": "attributes", "n_tasks": n_tasks})
    return AttributesResult(screen, probe, grid, summary, out)

"""Hub-ready artifacts: save_pretrained → from_pretrained (a directory, a Hub cache laid out by hand) gives the same
outputs bit for bit, the model card records the provenance, a model the artifact was not fitted on is refused, and
the tuned-lens project's lens format loads as an AffineLens. Nothing here reaches the network."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from patchscopes import AffineLens, AffineMap, LogitLens, __version__
from patchscopes.capture import capture
from patchscopes.crossmodel import fit_maps
from patchscopes.errors import MappingError, PatchscopeError
from patchscopes.hub import HubError, from_pretrained, model_card
from patchscopes.mappings import MapProvenanceError
from patchscopes.models.loading import ModelHandle
from patchscopes.relations.lrc import ConceptSet, lrc_concepts
from patchscopes.relations.lre import LinearRelationalEmbedding, estimate_lre
from patchscopes.relations.prompts import RelationPrompt
from tiny import tiny_model

TEXTS = [
    "The capital of France is Paris. The capital of Japan is Tokyo.",
    "Diana, Princess of Wales, was a member of the British royal family.",
    "Apples are red or green, and the official currency of Japan is the yen.",
    "Syria: Country in the Middle East, Leonardo DiCaprio: American actor.",
] * 3
PROMPTS = [
    RelationPrompt("capital", "France", "Paris", "The capital of Japan is Tokyo. The capital of France is"),
    RelationPrompt("capital", "Italy", "Rome", "The capital of Japan is Tokyo. The capital of Italy is"),
]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "owner/artifact"


def with_sha(lm: ModelHandle, sha: str | None) -> ModelHandle:
    """The same model under another recorded weights hash (the cached tiny handle is left as it is)."""
    return dataclasses.replace(lm, weights_sha256=sha)


def fake_hub(cache: Path, repo_id: str, folder: Path, commit: str = COMMIT, ref: str = "main") -> None:
    """Lay ``folder`` out in ``cache`` as huggingface_hub keeps a downloaded snapshot of model repository ``repo_id``."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)


def via_hub(cls: Any, tmp_path: Path, artifact: Any, **check: Any) -> tuple[Any, Path]:
    """Save ``artifact`` with save_pretrained, put it in a Hub cache and load it back by its Hub id, offline."""
    folder = artifact.save_pretrained(tmp_path / "saved", repo_id=REPO)
    fake_hub(tmp_path / "cache", REPO, folder)
    loaded = cls.from_pretrained(REPO, cache_dir=tmp_path / "cache", local_files_only=True, **check)
    return loaded, folder


def test_affine_lens_round_trip_card_and_refusals(tmp_path: Path) -> None:
    lm = with_sha(tiny_model("llama"), "a" * 64)
    lens = AffineLens.fit(lm, TEXTS, layers=["embeddings", 0, 1, 2], progress=False)
    loaded, folder = via_hub(AffineLens, tmp_path, lens, model=lm)
    assert isinstance(loaded, AffineLens) and set(loaded.maps) == set(lens.maps) and loaded.model_name == lm.name
    ids = lm.tokenize(TEXTS[1]).ids
    [states] = capture(lm, [ids], [[2, 5, 9]], ["embeddings", 1])
    for row, layer in enumerate(["embeddings", 1]):
        assert torch.equal(loaded.logits(lm, layer, states[row]), lens.logits(lm, layer, states[row]))
    # the same files load from the directory, and from the cache by commit and by tag
    fake_hub(tmp_path / "cache", REPO, folder, commit="f" * 40, ref="v1")
    for again in (
        AffineLens.from_pretrained(folder, model=lm),
        AffineLens.from_pretrained(REPO, COMMIT, cache_dir=tmp_path / "cache", local_files_only=True),
        AffineLens.from_pretrained(REPO, "v1", cache_dir=tmp_path / "cache", local_files_only=True),
    ):
        assert torch.equal(again.maps[1].weight, lens.maps[1].weight) and torch.equal(again.maps[1].bias, lens.maps[1].bias)

    card = (folder / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\n") and "library_name: patchscopes" in card and "- affine-lens" in card
    assert "base_model" not in card  # 'tiny-llama' is no Hub id
    assert "| Model | tiny-llama |" in card and "| Weights sha256 | " + "a" * 64 + " |" in card
    assert "| Layers | embeddings, 0, 1, 2 → 3 |" in card
    n_fit = lens.maps[0].metadata["n_fit"]
    assert f"| Fit positions (per layer) | {n_fit} |" in card and f"| Fit texts | {len(TEXTS)} |" in card
    assert f"| patchscopes version | {__version__} |" in card
    assert f'AffineLens.from_pretrained("{REPO}", model=lm)' in card and str(tmp_path) not in card

    with pytest.raises(MapProvenanceError, match="fitted on model 'tiny-llama', not 'tiny-qwen2'"):
        AffineLens.from_pretrained(folder, model=tiny_model("qwen2"))
    with pytest.raises(MapProvenanceError, match="fitted on weights aaaaaaaaaaaa…, but 'tiny-llama' has weights bbbbbbbbbbbb…"):
        AffineLens.from_pretrained(folder, model=with_sha(lm, "b" * 64))
    with pytest.raises(MapProvenanceError, match="states of size 32, but 'tiny-llama' has 48"):
        AffineLens.from_pretrained(folder, model=tiny_model("llama", hidden=48))
    with pytest.raises(HubError, match="holds an affine lens, not a linear relational embedding"):
        LinearRelationalEmbedding.from_pretrained(folder)


def test_affine_map_round_trip_card_and_refusals(tmp_path: Path) -> None:
    a, b = with_sha(tiny_model("llama"), "a" * 64), with_sha(tiny_model("llama", hidden=48), "b" * 64)
    amap = fit_maps(a, b, TEXTS, pairs=[(1, 2)], heldout=0.25).maps[(1, 2)]
    loaded, folder = via_hub(AffineMap, tmp_path, amap, model=a, target_model=b)
    h = torch.randn(5, a.hidden_size)
    assert torch.equal(loaded(h), amap(h))
    card = (folder / "README.md").read_text(encoding="utf-8")
    for row in (
        "| Source weights sha256 | " + "a" * 64 + " |",
        "| Target weights sha256 | " + "b" * 64 + " |",
        "| Source layer | 1 |",
        "| Target layer | 2 |",
        "| Size | 32 → 48 |",
        f"| Fit positions | {amap.metadata['n_fit']} |",
        f"| Fit texts | {amap.metadata['n_fit_texts']} |",
        f"| Corpus sha256 | {amap.metadata['corpus_sha256']} |",
        f"- r2: {amap.metadata['r2']:.4g}",
    ):
        assert row in card
    # a map loaded from somewhere saves without that place: where it was read from is not provenance
    again = loaded.save_pretrained(tmp_path / "again")
    assert "path" not in json.loads((again / "map.json").read_text()) and str(tmp_path) not in (again / "README.md").read_text()

    with pytest.raises(MapProvenanceError, match="source weights aaaaaaaaaaaa…, but 'tiny-llama' has weights bbbb"):
        AffineMap.from_pretrained(folder, model=b, target_model=a)
    with pytest.raises(MapProvenanceError, match="target model 'tiny-llama', not 'tiny-qwen2'"):
        AffineMap.from_pretrained(folder, model=a, target_model=tiny_model("qwen2"))
    with pytest.raises(MappingError, match="target_model= needs model="):
        from_pretrained(folder, target_model=b)
    lens = AffineLens.fit(a, TEXTS[:2], [1], progress=False).save_pretrained(tmp_path / "lens")
    with pytest.raises(MappingError, match="applies to affine maps only"):
        from_pretrained(lens, model=a, target_model=b)


def test_lre_round_trip_card_and_refusals(tmp_path: Path) -> None:
    lm = with_sha(tiny_model("llama"), "c" * 64)
    lre = estimate_lre(lm, [PROMPTS[0]], subject_layer=0, object_layer=2)
    loaded, folder = via_hub(LinearRelationalEmbedding, tmp_path, lre, model=lm)
    h = torch.randn(3, lm.hidden_size)
    assert torch.equal(loaded(h), lre(h)) and torch.equal(loaded.attribute_lens(lm, h[0]), lre.attribute_lens(lm, h[0]))
    assert loaded.metadata == lre.metadata
    card = (folder / "README.md").read_text(encoding="utf-8")
    for row in (
        "| Model | tiny-llama |",
        "| Weights sha256 | " + "c" * 64 + " |",
        "| Subject layer | 0 |",
        "| Object layer | 2 |",
    ):
        assert row in card
    assert "| Fit prompts | 1 |" in card and "| Relation | capital |" in card and "- lre" in card

    with pytest.raises(MapProvenanceError, match="fitted on weights cccccccccccc…"):
        LinearRelationalEmbedding.from_pretrained(folder, model=with_sha(lm, "d" * 64))
    with pytest.raises(MapProvenanceError, match="not 'tiny-gpt2'"):
        LinearRelationalEmbedding.from_pretrained(folder, model=tiny_model("gpt2"))
    with pytest.raises(MapProvenanceError, match="size 32, but 'tiny-llama' has 48"):
        LinearRelationalEmbedding.from_pretrained(folder, model=tiny_model("llama", hidden=48))
    deep = LinearRelationalEmbedding(lre.weight, lre.bias, {**lre.metadata, "object_layer": 7}).save_pretrained(tmp_path / "deep")
    with pytest.raises(MapProvenanceError, match="a model of 8 blocks, but 'tiny-llama' has 4"):
        LinearRelationalEmbedding.from_pretrained(deep, model=lm)


def test_concept_set_round_trip_card_and_refusals(tmp_path: Path) -> None:
    lm = with_sha(tiny_model("llama"), "e" * 64)
    lre = estimate_lre(lm, PROMPTS, subject_layer=1, object_layer=-1, aggregation="first")
    concepts = lrc_concepts(lm, lre, PROMPTS, rank=8)
    loaded, folder = via_hub(ConceptSet, tmp_path, concepts, model=lm)
    subjects = torch.randn(6, lm.hidden_size)
    assert loaded.names == concepts.names == ["Paris", "Rome"]
    assert torch.equal(loaded.scores(subjects), concepts.scores(subjects)) and loaded.classify(subjects) == concepts.classify(
        subjects
    )
    card = (folder / "README.md").read_text(encoding="utf-8")
    for row in ("| Concepts | 2: Paris, Rome |", "| Method | lrc |", "| Rank | 8 |", "| Fit prompts | 2 |", "e" * 64):
        assert row in card
    with pytest.raises(MapProvenanceError, match="fitted on weights eeeeeeeeeeee…"):
        ConceptSet.from_pretrained(folder, model=with_sha(lm, "f" * 64))
    assert isinstance(from_pretrained(folder, model=lm), ConceptSet)  # the generic loader finds the kind itself


def test_base_model_is_recorded_for_hub_models() -> None:
    amap = AffineMap(torch.eye(2), torch.zeros(2), {"source_model": "org/src-model", "target_model": "org/tgt-model"})
    card = model_card(amap, "me/maps")
    assert "base_model:\n- org/src-model\n- org/tgt-model" in card
    lre = LinearRelationalEmbedding(torch.eye(2), torch.zeros(2), {"model": "org/src-model", "dataset": "my-relations"})
    card = model_card(lre)
    assert "base_model: org/src-model\n" in card and "| Dataset | my-relations |" in card and "<owner>/<name>" in card


def test_bad_ids_directories_and_revisions_are_named(tmp_path: Path) -> None:
    lre = LinearRelationalEmbedding(torch.eye(2), torch.zeros(2), {"model": "m"})
    folder = lre.save_pretrained(tmp_path / "lre")
    with pytest.raises(HubError, match="could not get 'owner/missing' from the Hugging Face Hub or its local cache"):
        from_pretrained("owner/missing", cache_dir=tmp_path / "cache", local_files_only=True)
    with pytest.raises(HubError, match="neither a directory nor a Hub id"):
        from_pretrained(str(tmp_path / "no such dir" / "x"))
    with pytest.raises(HubError, match="has no revisions; drop revision='main'"):
        from_pretrained(folder, "main")
    with pytest.raises(HubError, match="has no folder 'lens'"):
        from_pretrained(folder, subfolder="lens")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HubError, match="holds no patchscopes artifact"):
        from_pretrained(tmp_path / "empty")
    assert issubclass(HubError, PatchscopeError)


def test_push_to_hub_reports_an_unreachable_hub(tmp_path: Path) -> None:
    lre = LinearRelationalEmbedding(torch.eye(2), torch.zeros(2), {"model": "m"})
    with pytest.raises(
        HubError, match=r"could not push the linear relational embedding to 'owner/lre' on http://127\.0\.0\.1:9 "
    ):
        lre.push_to_hub("owner/lre", token="hf_not_a_token", endpoint="http://127.0.0.1:9")
    with pytest.raises(HubError, match="not a Hub repository id"):
        lre.push_to_hub("no slash")


def _tuned_lens(
    directory: Path, lm: ModelHandle, prefix: str = "", extra: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """A lens in the tuned-lens project's format: config.json and params.pt with one translator per hidden_states[i]."""
    d, n = lm.hidden_size, lm.n_layers
    gen = torch.Generator().manual_seed(0)
    state = {
        f"{prefix}{i}.{p}": 0.1 * torch.randn((d, d) if p == "weight" else (d,), generator=gen)
        for i in range(n)
        for p in ("weight", "bias")
    }
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({**state, **(extra or {})}, directory / "params.pt")
    config = {
        "base_model_name_or_path": lm.name,
        "d_model": d,
        "num_hidden_layers": n,
        "bias": True,
        "lens_type": "linear_tuned_lens",
    }
    (directory / "config.json").write_text(json.dumps(config))
    return {k.removeprefix(prefix): v for k, v in state.items()}


def test_tuned_lens_format_loads_as_an_affine_lens(tmp_path: Path) -> None:
    lm = tiny_model("llama")
    state = _tuned_lens(tmp_path / "repo" / "lens" / "tiny", lm)  # as the tuned-lens project lays out its repository
    fake_hub(tmp_path / "cache", "owner/tuned", tmp_path / "repo")
    lens = AffineLens.from_pretrained(
        "owner/tuned", subfolder="lens/tiny", cache_dir=tmp_path / "cache", local_files_only=True, model=lm
    )
    assert isinstance(lens, AffineLens) and lens.n_layers == lm.n_layers
    ids = lm.tokenize(TEXTS[0]).ids
    with torch.no_grad():
        hidden = lm.model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    [ours] = capture(lm, [ids], [list(range(len(ids)))], ["embeddings", 0, 1, 2])
    for i in range(lm.n_layers):  # translator i reads hidden_states[i]: the embeddings, then block i - 1
        layer = "embeddings" if i == 0 else i - 1
        h = hidden[i][0]
        torch.testing.assert_close(ours[i], h)
        w, b = state[f"{i}.weight"], state[f"{i}.bias"]
        expected = lm.adapter.decode(h + h @ w.T + b).float()
        torch.testing.assert_close(lens.logits(lm, layer, h), expected, atol=1e-4, rtol=1e-4)
    last = lm.n_layers - 1  # the format leaves the last block untranslated: the logit lens
    h = torch.randn(3, lm.hidden_size)
    assert torch.equal(lens.logits(lm, last, h), LogitLens().logits(lm, last, h))

    # older checkpoints held the whole lens's state dict: translators under "layer_translators.", other keys beside them
    _tuned_lens(tmp_path / "old", lm, prefix="layer_translators.", extra={"unembed.weight": torch.zeros(2)})
    old = AffineLens.from_pretrained(tmp_path / "old")
    assert torch.equal(old.maps[1].weight, lens.maps[1].weight) and torch.equal(old.maps["embeddings"].bias, state["0.bias"])
    with pytest.raises(MapProvenanceError, match="not 'tiny-qwen2'"):
        AffineLens.from_pretrained(tmp_path / "old", model=tiny_model("qwen2"))
    broken = torch.load(tmp_path / "old" / "params.pt")
    del broken["layer_translators.2.weight"]
    torch.save(broken, tmp_path / "old" / "params.pt")
    with pytest.raises(MappingError, match=r"holds translators \[0, 1, 3\], but config.json asks for 4 of size 32×32"):
        AffineLens.from_pretrained(tmp_path / "old")

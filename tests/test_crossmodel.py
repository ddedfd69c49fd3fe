"""Cross-model maps: alignment of two tokenizations, streaming fit against a plain reference, identity
maps, and the provenance checks of the map store."""

from __future__ import annotations

import functools

import pytest
import torch

from patchscopes import ENTITY_DESCRIPTION, Patchscope, Source, Target, run
from patchscopes.capture import capture
from patchscopes.crossmodel import MapProvenanceError, MapStore, align_by_end_offset, aligned_positions, fit_maps
from patchscopes.crossmodel.fit import corpus_sha256
from patchscopes.crossmodel.store import pair_name
from patchscopes.errors import MappingError
from patchscopes.mappings import AffineMap
from patchscopes.models.loading import from_model
from tiny import tiny_model

TEXTS = [
    "The capital of France is Paris. The capital of Japan is Tokyo.",
    "Diana, Princess of Wales, was a member of the British royal family.",
    "Apples are red or green, and the official currency of Japan is the yen.",
    "Syria: Country in the Middle East, Leonardo DiCaprio: American actor.",
    "hello -> hello, cat -> cat, 1135 -> 1135, and so on for a while.",
    "The capital of Japan is Tokyo and the capital of France is Paris.",
] * 4


def test_align_by_end_offset_pairs_equal_ends_and_skips_special_tokens():
    a = [(0, 3), (3, 12), (12, 21), (21, 24)]  # The| official| currency| of
    b = [(0, 0), (0, 3), (3, 7), (7, 12), (12, 24)]  # <bos> The| off|icial| currency of
    assert align_by_end_offset(a, b) == [(0, 1), (1, 3), (3, 4)]
    assert align_by_end_offset(b, a) == [(1, 0), (3, 1), (4, 3)]


def test_align_by_end_offset_takes_last_of_tokens_sharing_an_end():
    a = [(0, 1), (1, 2), (1, 2), (2, 3)]  # byte-fallback pieces of one character end together
    b = [(0, 2), (2, 3)]
    assert align_by_end_offset(a, b) == [(2, 0), (3, 1)]


@functools.lru_cache(maxsize=1)
def _other_tokenizer():  # noqa: ANN202
    """A byte-level BPE with a small vocabulary and a BOS token: it splits words differently from tiny's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from tiny import CORPUS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<eos>", "<bos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS[:3], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")


@functools.lru_cache(maxsize=1)
def _other_model():  # noqa: ANN202
    import transformers as tf

    tok = _other_tokenizer()
    torch.manual_seed(1)
    config = tf.LlamaConfig(
        num_hidden_layers=3, hidden_size=24, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128, vocab_size=len(tok), eos_token_id=1, pad_token_id=0, bos_token_id=2,
    )  # fmt: skip
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    return from_model(model, tok, name="tiny-other")


def _check_pairs_read_the_same_prefix(text: str, a, b) -> int:  # noqa: ANN001
    ids_a, ids_b, pos_a, pos_b = aligned_positions(text, a, b)
    off_a, off_b = a.tokenize(text).offsets, b.tokenize(text).offsets
    for p, q in zip(pos_a, pos_b):
        assert off_a[p][1] == off_b[q][1]
        assert a.tokenizer.decode(ids_a[: p + 1]) == b.tokenizer.decode(ids_b[: q + 1], skip_special_tokens=True)
    common = {e for s, e in off_a if e > s} & {e for s, e in off_b if e > s}
    assert len(pos_a) == len(common)
    return len(pos_a)


def test_alignment_on_tokenizers_with_different_splits():
    a, b = tiny_model("llama"), _other_model()
    text = "The official currency of Japan is the yen, 1999."
    assert a.tokenize(text).offsets != b.tokenize(text).offsets[1:]  # the splits differ
    n = _check_pairs_read_the_same_prefix(text, a, b)
    assert 0 < n < len(b.tokenize(text).ids) - 1  # some of B's finer tokens end inside A's tokens


def test_alignment_on_real_tokenizers(smol):
    from patchscopes import load_model

    gemma = load_model("Gemma-3-270M")
    text = "The official currency of Côte d'Ivoire is the CFA franc, since 1945.  Hello"
    n = _check_pairs_read_the_same_prefix(text, smol, gemma)
    assert n >= 15
    _, _, pos_a, pos_b = aligned_positions(text, smol, gemma)
    assert 0 not in pos_b  # Gemma's <bos> never pairs


def test_same_tokenizer_pairs_every_position():
    a, b = tiny_model("llama"), tiny_model("llama", hidden=48)
    ids_a, ids_b, pos_a, pos_b = aligned_positions(TEXTS[0], a, b, skip_first=1)
    assert ids_a == ids_b and pos_a == pos_b == list(range(1, len(ids_a)))


def test_fit_matches_a_plain_least_squares_reference():
    a, b = tiny_model("llama"), tiny_model("llama", hidden=48)
    report = fit_maps(a, b, TEXTS, pairs=[(1, 2), (-1, 0)], heldout=0.25, chunk_texts=5)
    fit_texts = TEXTS[: len(TEXTS) - 6]
    xs, ys = [], []
    for text in fit_texts:  # the obvious way: every position but the first, one text at a time
        ids = a.tokenize(text).ids
        pos = list(range(1, len(ids)))
        xs.append(capture(a, [ids], [pos], [1])[0][0])
        ys.append(capture(b, [ids], [pos], [2])[0][0])
    x, y = torch.cat(xs).double(), torch.cat(ys).double()
    xa = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)
    solution = torch.linalg.lstsq(xa, y).solution
    amap = report.maps[(1, 2)]
    assert torch.allclose(amap.weight.double(), solution[:-1].T, atol=1e-3)
    assert torch.allclose(amap.bias.double(), solution[-1], atol=1e-3)
    assert set(report.maps) == {(1, 2), (3, 0)}
    meta = amap.metadata
    assert meta["source_model"] == "tiny-llama" and meta["target_layer"] == 2 and meta["n_fit"] == len(x)
    assert meta["corpus_sha256"] == corpus_sha256(fit_texts) and -1.0 < meta["r2"] <= 1.0
    assert report.n_heldout_positions > 0


def test_fit_across_tokenizers_runs_and_records_alignment():
    a, b = tiny_model("llama"), _other_model()
    report = fit_maps(a, b, TEXTS, pairs=[(0, 1)], ridge=1e-3)
    assert report.maps[(0, 1)].d_in == 32 and report.maps[(0, 1)].d_out == 24
    assert report.maps[(0, 1)].metadata["alignment"] == "end offset"


def test_self_map_is_identity_on_tiny_model():
    lm = tiny_model("llama")
    report = fit_maps(lm, lm, TEXTS, pairs=[(2, 2)])
    amap = report.maps[(2, 2)]
    assert torch.allclose(amap.weight, torch.eye(lm.hidden_size), atol=1e-3)
    assert amap.bias.abs().max() < 1e-3
    assert report.r2[(2, 2)] > 0.9999


def test_self_map_on_real_model_makes_cross_model_patchscope_equal_same_model(smol, data_root):
    from patchscopes.evals.cross_model import corpus_texts

    texts = corpus_texts(120, seed=0)
    report = fit_maps(smol, smol, texts, pairs=[(4, 4)], heldout=0.1)
    amap = report.maps[(4, 4)]
    assert report.r2[(4, 4)] > 0.999
    x = torch.randn(64, smol.hidden_size) * 3
    assert torch.allclose(amap(x), x, atol=0.05 * x.abs().max().item())
    scope = ENTITY_DESCRIPTION.scope("Albert Einstein", layer=4)
    same = run(scope, smol)
    crossed = run(Patchscope(scope.source, scope.target, mapping=amap, decoding=scope.decoding), smol, target_model=smol)
    assert crossed.text == same.text
    assert torch.allclose(torch.softmax(crossed.logits, -1), torch.softmax(same.logits, -1), atol=1e-3)


def test_store_save_list_load_and_refuse_other_models(tmp_path):
    a, b, other = tiny_model("llama"), tiny_model("llama", hidden=48), tiny_model("qwen2")
    a.weights_sha256, b.weights_sha256 = "a" * 64, "b" * 64
    try:
        report = fit_maps(a, b, TEXTS, pairs=[(1, 2)])
        store = MapStore(tmp_path)
        name = pair_name(a.name, b.name, 1, 2)
        store.save(name, report.maps[(1, 2)])
        assert store.names() == [name] and store.list().loc[0, "target_layer"] == 2
        loaded = store.load(name, source=a, target=b, source_layer=1, target_layer=2)
        assert torch.equal(loaded.weight, report.maps[(1, 2)].weight)
        with pytest.raises(MapProvenanceError, match="source model 'tiny-llama', not 'tiny-qwen2'"):
            store.load(name, source=other, target=b)
        with pytest.raises(MapProvenanceError, match="target layer 2, not 3"):
            store.load(name, source=a, target=b, target_layer=3)
        b.weights_sha256 = "c" * 64
        with pytest.raises(MapProvenanceError, match="refit the map"):
            store.load(name, source=a, target=b)
        with pytest.raises(MappingError, match="already exists"):
            store.save(name, report.maps[(1, 2)])
        with pytest.raises(MappingError, match="not valid"):
            store.path("../escape")
        with pytest.raises(MappingError, match="no map named"):
            store.load("missing/map")
        # the core refuses the map for other models, other weights and other layers, before running anything
        scope = Patchscope(Source("hello world", 1), Target("cat -> cat\n?", 2), mapping=loaded)
        with pytest.raises(MapProvenanceError, match="source model 'tiny-llama', not 'tiny-qwen2'"):
            run(scope, other, target_model=b)
        with pytest.raises(MapProvenanceError, match="target weights bbbbbbbbbbbb…, but 'tiny-llama' has weights cccc"):
            run(scope, a, target_model=b)
        b.weights_sha256 = "b" * 64
        assert run(scope, a, target_model=b).top_tokens
        with pytest.raises(MapProvenanceError, match="source layer 1, not 0"):
            run(Patchscope(Source("hello world", 0), scope.target, mapping=loaded), a, target_model=b)
        with pytest.raises(MapProvenanceError, match="target layer 2, not 3"):
            run(Patchscope(scope.source, Target("cat -> cat\n?", -1), mapping=loaded), a, target_model=b)
    finally:
        a.weights_sha256 = b.weights_sha256 = None


def test_fit_errors_name_the_problem():
    lm = tiny_model("llama")
    with pytest.raises(MappingError, match="no texts"):
        fit_maps(lm, lm, [], pairs=[(0, 0)])
    with pytest.raises(MappingError, match="leave nothing to fit"):
        fit_maps(lm, lm, ["one text"], pairs=[(0, 0)], heldout=0.5)
    with pytest.raises(MappingError, match="no layer pairs"):
        fit_maps(lm, lm, TEXTS, pairs=[])


def test_map_round_trip_keeps_provenance(tmp_path):
    amap = AffineMap(
        torch.eye(3), torch.zeros(3), {"source_model": "m", "target_model": "m", "source_layer": 0, "target_layer": 0}
    )
    MapStore(tmp_path).save("m--m/L00-L00", amap)
    assert MapStore(tmp_path).load("m--m/L00-L00").metadata["source_model"] == "m"


def test_ridge_grid_keeps_the_best_held_out_fit():
    a, b = tiny_model("llama"), tiny_model("llama", hidden=48)
    plain = fit_maps(a, b, TEXTS[:10], pairs=[(1, 2)], heldout=0.3)
    tuned = fit_maps(a, b, TEXTS[:10], pairs=[(1, 2)], heldout=0.3, ridge_grid=(1e-3, 1e-1, 10.0))
    meta = tuned.maps[(1, 2)].metadata
    assert meta["ridge_selected"] and meta["ridge_grid"] == [1e-3, 1e-1, 10.0]
    assert tuned.r2[(1, 2)] >= plain.r2[(1, 2)] - 1e-9


def test_norm_filter_drops_outlying_positions_like_a_plain_reference():
    a, b = tiny_model("llama"), tiny_model("llama", hidden=48)
    texts = TEXTS[:12]
    report = fit_maps(a, b, texts, pairs=[(1, 2)], heldout=0.25, max_norm_ratio=1.1)
    xs, ys = [], []
    for text in texts[:9]:  # one chunk: the median is over every fit position
        ids = a.tokenize(text).ids
        pos = list(range(1, len(ids)))
        xs.append(capture(a, [ids], [pos], [1])[0][0])
        ys.append(capture(b, [ids], [pos], [2])[0][0])
    x, y = torch.cat(xs).double(), torch.cat(ys).double()
    keep = (x.norm(dim=1) <= 1.1 * x.norm(dim=1).median()) & (y.norm(dim=1) <= 1.1 * y.norm(dim=1).median())
    assert 0 < int((~keep).sum()) < len(keep)
    xa = torch.cat([x[keep], torch.ones(int(keep.sum()), 1, dtype=torch.float64)], 1)
    solution = torch.linalg.lstsq(xa, y[keep]).solution
    amap = report.maps[(1, 2)]
    assert torch.allclose(amap.weight.double(), solution[:-1].T, atol=1e-3)
    assert amap.metadata["n_fit"] == int(keep.sum()) and amap.metadata["n_excluded_fit"] == int((~keep).sum())
    assert amap.metadata["max_norm_ratio"] == 1.1 and amap.metadata["n_excluded_heldout"] >= 0
    unfiltered = fit_maps(a, b, texts, pairs=[(1, 2)], heldout=0.25, max_norm_ratio=1e9)
    assert unfiltered.maps[(1, 2)].metadata["n_excluded_fit"] == 0
    with pytest.raises(MappingError, match="max_norm_ratio must be above 1"):
        fit_maps(a, b, texts, pairs=[(1, 2)], max_norm_ratio=0.5)


def test_an_interrupted_fit_resumes_from_its_checkpoint_to_the_same_maps(tmp_path, monkeypatch):
    import patchscopes.crossmodel.fit as fit_module

    a, b = tiny_model("llama"), tiny_model("llama", hidden=48)
    settings = dict(pairs=[(1, 2), (3, 0)], heldout=0.25, chunk_texts=3, max_norm_ratio=5.0)
    whole = fit_maps(a, b, TEXTS, **settings)  # 18 fit texts in 6 chunks, then 6 held-out texts in 2
    real_collect, calls = fit_module._collect, []

    def collect(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(len(args[2]))
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a user's Ctrl-C during the third chunk
        return real_collect(*args, **kwargs)

    checkpoint = tmp_path / "partial" / "fit.pt"
    monkeypatch.setattr(fit_module, "_collect", collect)
    with pytest.raises(KeyboardInterrupt):
        fit_maps(a, b, TEXTS, checkpoint=checkpoint, checkpoint_every=0, **settings)
    assert checkpoint.is_file()
    calls.clear()
    monkeypatch.setattr(fit_module, "_collect", lambda *args, **kwargs: calls.append(0) or real_collect(*args, **kwargs))
    resumed = fit_maps(a, b, TEXTS, checkpoint=checkpoint, checkpoint_every=0, **settings)
    assert len(calls) == 4 + 2  # the 4 fit chunks left and the held-out ones, not the 2 already folded in
    assert not checkpoint.exists() and resumed.n_fit_positions == whole.n_fit_positions
    for pair, amap in whole.maps.items():
        again = resumed.maps[pair]
        assert torch.equal(again.weight, amap.weight) and torch.equal(again.bias, amap.bias)
        for key in ("n_fit", "fit_data_hash", "n_excluded_fit", "r2"):
            assert again.metadata[key] == amap.metadata[key], key
    with pytest.raises(KeyboardInterrupt):  # a checkpoint of this fit ...
        monkeypatch.setattr(fit_module, "_collect", collect)
        calls.clear()
        fit_maps(a, b, TEXTS, checkpoint=checkpoint, checkpoint_every=0, **settings)
    monkeypatch.setattr(fit_module, "_collect", real_collect)
    with pytest.raises(MappingError, match="belongs to another fit.*delete it"):  # ... is refused for another one
        fit_maps(a, b, TEXTS, checkpoint=checkpoint, **{**settings, "pairs": [(1, 2)]})
    checkpoint.write_bytes(b"not a checkpoint")
    with pytest.raises(MappingError, match="cannot be read.*delete it"):
        fit_maps(a, b, TEXTS, checkpoint=checkpoint, **settings)

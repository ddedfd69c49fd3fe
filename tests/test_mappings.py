"""Affine maps: exact recovery, streaming = one-shot, save/reload identity, provenance and shape errors."""

from __future__ import annotations

import pytest
import torch

from patchscopes import AffineFitter, AffineMap, Patchscope, Source, Target, run
from patchscopes.errors import MappingError
from tiny import tiny_model


def test_fit_recovers_exactly_linear_map():
    torch.manual_seed(0)
    x = torch.randn(500, 16)
    w, b = torch.randn(8, 16), torch.randn(8)
    m = AffineMap.fit(x, x @ w.T + b)
    assert torch.allclose(m.weight, w, atol=1e-4) and torch.allclose(m.bias, b, atol=1e-4)
    assert m.score(x, x @ w.T + b) > 0.999999
    assert m.metadata["n_fit"] == 500


def test_streaming_equals_one_shot():
    torch.manual_seed(1)
    x, y = torch.randn(300, 6), torch.randn(300, 4)
    fitter = AffineFitter(6, 4)
    for part in range(0, 300, 70):
        fitter.update(x[part : part + 70], y[part : part + 70])
    a, b = AffineMap.from_fitter(fitter), AffineMap.fit(x, y)
    assert torch.allclose(a.weight, b.weight, atol=1e-5) and torch.allclose(a.bias, b.bias, atol=1e-5)


def test_ridge_shrinks_weights():
    torch.manual_seed(2)
    x, y = torch.randn(50, 10), torch.randn(50, 3)
    assert AffineMap.fit(x, y, ridge=100.0).weight.norm() < AffineMap.fit(x, y).weight.norm()


def test_save_reload_identical_outputs(tmp_path):
    lm = tiny_model("llama")
    torch.manual_seed(3)
    m = AffineMap(torch.randn(32, 32) * 0.2, torch.randn(32) * 0.1, {"source_model": lm.name, "target_model": lm.name})
    m.save(tmp_path / "map")
    loaded = AffineMap.load(tmp_path / "map")
    assert torch.equal(loaded.weight, m.weight) and loaded.metadata["source_model"] == lm.name
    scope = Patchscope(Source("Diana, Princess of Wales", layer=1), Target("cat -> cat\n?", layer=2), mapping=m)
    by_object = run(scope, lm)
    by_path = run(Patchscope(scope.source, scope.target, mapping=str(tmp_path / "map")), lm)
    assert torch.equal(by_object.logits, by_path.logits)
    # and the spec with a saved map round-trips through JSON
    spec = Patchscope(scope.source, scope.target, mapping=loaded)
    assert Patchscope.from_json(spec.to_json()).mapping.metadata["path"] == str(tmp_path / "map")


def test_errors(tmp_path):
    m = AffineMap(torch.zeros(4, 3), torch.zeros(4), {"source_model": "a", "target_model": "b"})
    with pytest.raises(MappingError, match="expects inputs of size 3"):
        m(torch.zeros(2, 5))
    with pytest.raises(MappingError, match="fitted with source_model 'a'"):
        m.check_models("other", "b")
    with pytest.raises(MappingError, match="not a saved affine map"):
        AffineMap.load(tmp_path)
    with pytest.raises(MappingError, match="weight"):
        AffineMap(torch.zeros(4, 3), torch.zeros(3))


def test_map_fitted_for_other_models_is_refused():
    lm = tiny_model("llama")
    m = AffineMap(torch.eye(32), torch.zeros(32), {"source_model": "some-other-model", "target_model": lm.name})
    with pytest.raises(MappingError, match="some-other-model"):
        run(Patchscope(Source("Diana", layer=1), Target("cat -> cat\n?", layer=1), mapping=m), lm)


def test_the_recorded_fit_r2_is_the_in_sample_r2_of_the_solution() -> None:
    from patchscopes.mappings import AffineFitter, r2_score

    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 8, generator=g)
    y = x @ torch.randn(3, 8, generator=g).T + 0.3 * torch.randn(500, 3, generator=g) + 1
    fitter = AffineFitter(8, 3, ridge=0.5)
    for part in (slice(0, 123), slice(123, 500)):  # streamed in two batches
        fitter.update(x[part], y[part])
    fitted = AffineMap.from_fitter(fitter)
    assert fitted.metadata["fit_r2"] == pytest.approx(r2_score(fitted(x), y), abs=1e-6)
    assert 0.9 < fitted.metadata["fit_r2"] < 1

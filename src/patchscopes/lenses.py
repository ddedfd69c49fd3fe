"""Lenses: decode a hidden state at layer ℓ as if it were the last layer's output.

A lens is a small module, ``(hidden, layer) → logits`` (:meth:`Lens.logits`): a per-layer transform into the
last layer's space, then the model's final norm and unembedding. It is also a Patchscope with a fixed target
(T = S, ℓ* = L−1, i* = i, decoded at the patched position), and that is how :meth:`Lens.sweep` runs it: through
:func:`patchscopes.sweep.sweep`, its executors and its rows. The tests hold the two equal.

    >>> df = LogitLens().sweep(lm, ["The capital of France is"], progress=False)
    >>> df.source_layer.tolist() == list(range(lm.n_layers))                # one row per layer
    True
    >>> lens = AffineLens.fit(lm, texts, layers=range(lm.n_layers), progress=False)
    >>> lens.logits(lm, 1, torch.zeros(1, lm.hidden_size)).shape == (1, lm.vocab_size)
    True
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from patchscopes.capture import capture
from patchscopes.errors import MappingError
from patchscopes.hub import HubMixin
from patchscopes.layers import LayerSpec, Location, depth, resolve_layer
from patchscopes.mappings import AffineFitter, AffineMap
from patchscopes.models.loading import ModelHandle, context_length
from patchscopes.positions import PositionSpec
from patchscopes.presets import LOGIT_LENS
from patchscopes.progress import progress_bar
from patchscopes.scope import NextToken, Patchscope


def _fit_positions(length: int, skip_first: int, per_text: int | None, rng: random.Random) -> list[int]:
    """The positions of a text of ``length`` tokens that a lens is fitted on: all after ``skip_first``, or a sample."""
    every = list(range(min(skip_first, length - 1), length))
    if per_text is None or per_text >= len(every):
        return every
    return sorted(rng.sample(every, per_text))


class Lens:
    """Base class: a per-layer transform into the last layer's space, then the model's decoder head."""

    name = "lens"

    def transform(self, layer: Location, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mapping(self, layer: Location) -> Any:
        """The mapping that makes this lens a Patchscope at ``layer``."""
        raise NotImplementedError

    @torch.no_grad()
    def logits(self, lm: ModelHandle, layer: Location, hidden: torch.Tensor) -> torch.Tensor:
        h = self.transform(layer, hidden.to(lm.device, lm.dtype))
        return lm.adapter.decode(h).float()

    def patchscope(self, prompt: str, layer: LayerSpec, position: PositionSpec = -1) -> Patchscope:
        """This lens written as a Patchscope (for checking, or for running through the generic engine).

        It decodes at the patched position, as the lens does.
        """
        return LOGIT_LENS.scope(prompt, layer, position, mapping=self.mapping_for(layer))

    def mapping_for(self, layer: LayerSpec) -> Any:
        """The mapping of a user layer (negative from the end, or ``"embeddings"``)."""
        return self.mapping(layer)  # type: ignore[arg-type]

    def sweep(
        self,
        lm: ModelHandle,
        prompts: str | Sequence[str],
        layers: Iterable[LayerSpec] | None = None,
        position: PositionSpec = -1,
        top_k: int = 10,
        batch_size: int = 32,
        progress: bool = True,
    ) -> pd.DataFrame:
        """One row per prompt × layer, with the columns of :func:`patchscopes.sweep.sweep` (it runs there)."""
        from patchscopes.sweep import sweep

        def per_layer(layer: LayerSpec, target_layer: LayerSpec) -> Any:
            return self.mapping_for(layer)

        per_layer.per_layer_pair = True  # type: ignore[attr-defined]
        return sweep(
            lm,
            prompts,
            LOGIT_LENS,
            source_layers=list(layers) if layers is not None else None,
            position=position,
            mapping=per_layer,
            decoding=NextToken(top_k=top_k),
            batch_size=batch_size,
            progress=progress,
        )


class LogitLens(Lens):
    """nostalgebraist's logit lens: the hidden state itself goes through the final norm and unembedding."""

    name = "logit-lens"

    def transform(self, layer: Location, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    def mapping(self, layer: Location) -> Any:
        return None


class AffineLens(Lens, HubMixin):
    """The paper's "tuned lens": a least-squares affine map h^ℓ → h^{L−1} per layer, then the logit lens.

    ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` share it on the Hub (:mod:`patchscopes.hub`)."""

    name = "affine-lens"
    hub_kind = "affine-lens"

    def __init__(self, maps: dict[Location, AffineMap], model_name: str | None = None) -> None:
        self.maps = maps
        self.model_name = model_name

    def transform(self, layer: Location, hidden: torch.Tensor) -> torch.Tensor:
        return self.mapping(layer)(hidden)

    def mapping(self, layer: Location) -> Any:
        if layer not in self.maps:
            raise MappingError(f"this affine lens has no map for layer {layer}; fitted layers: {sorted(self.maps, key=depth)}")
        return self.maps[layer]

    def mapping_for(self, layer: LayerSpec) -> Any:
        """The map of a user layer: negative counts from the end, ``"embeddings"`` is the embeddings' map."""
        return self.mapping(resolve_layer(layer, self.n_layers))

    @property
    def n_layers(self) -> int:
        """Blocks of the model the lens was fitted on (its maps all target the last block)."""
        targets = {m.metadata.get("target_layer") for m in self.maps.values()}
        last = next(iter(targets)) if len(targets) == 1 else None
        if not isinstance(last, int):
            raise MappingError("this affine lens's maps do not agree on the last layer; refit it")
        return last + 1

    @classmethod
    def fit(
        cls,
        lm: ModelHandle,
        texts: Sequence[str],
        layers: Iterable[LayerSpec] | None = None,
        max_positions: int = 10_000,
        ridge: float = 0.0,
        skip_first: int = 1,
        batch_size: int = 16,
        progress: bool = True,
        positions_per_text: int | None = None,
        seed: int = 0,
        max_tokens: int | None = None,
    ) -> AffineLens:
        """Fit one map per layer on the positions of ``texts`` (after ``skip_first`` tokens), up to ``max_positions``.

        ``positions_per_text=None`` takes every position; a number draws that many positions of each text
        (seeded, without replacement), as the paper's lens is fitted on one random position per text.
        ``max_tokens`` keeps only each text's first tokens (as an evaluation that truncates its texts does);
        a text longer than the model's context length is cut to it either way. Each text is run only up to
        its last drawn position: a causal model's state there does not depend on the tokens after it.
        """
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        limit = min((n for n in (max_tokens, context_length(lm)) if n is not None), default=None)
        layer_list = sorted(
            {resolve_layer(layer, lm.n_layers) for layer in (layers if layers is not None else range(lm.n_layers))}, key=depth
        )
        last = lm.n_layers - 1
        wanted = sorted(set(layer_list) | {last}, key=depth)
        fitters = {layer: AffineFitter(lm.hidden_size, lm.hidden_size, ridge) for layer in layer_list}
        plan: list[tuple[list[int], list[int]]] = []  # (ids, positions) in text order, cut at max_positions
        seen, rng = 0, random.Random(seed)
        for text in texts:
            if seen >= max_positions:
                break
            ids = lm.tokenize(text).ids[:limit]
            positions = _fit_positions(len(ids), skip_first, positions_per_text, rng)[: max_positions - seen]
            if positions and positions[-1] >= 0:
                ids = ids[: positions[-1] + 1]
            plan.append((ids, positions))
            seen += len(positions)
        by_length = sorted(range(len(plan)), key=lambda k: len(plan[k][0]))  # batches of like lengths pad little
        with progress_bar(len(plan), "fit affine lens", enabled=progress) as advance:
            for start in range(0, len(by_length), batch_size):
                part = [plan[k] for k in by_length[start : start + batch_size]]
                states = capture(lm, [ids for ids, _ in part], [pos for _, pos in part], wanted, batch_size)
                block = torch.cat(states, 1)  # [layers, positions of the batch, d]: one update per layer and batch
                for layer in layer_list:
                    fitters[layer].update(block[wanted.index(layer)], block[wanted.index(last)])
                advance(len(part))
        meta = {"source_model": lm.name, "target_model": lm.name, "target_layer": last, "n_fit_texts": len(plan)}
        meta |= {"source_weights_sha256": lm.weights_sha256, "target_weights_sha256": lm.weights_sha256}
        maps = {layer: AffineMap.from_fitter(f, source_layer=layer, **meta) for layer, f in fitters.items()}
        return cls(maps, model_name=lm.name)

    def save(self, path: str | Path) -> Path:
        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        for layer, m in self.maps.items():
            m.save(directory / f"layer{layer}")
        (directory / "lens.json").write_text(
            json.dumps({"type": "affine-lens", "model": self.model_name, "layers": sorted(self.maps, key=depth)})
        )
        return directory

    @classmethod
    def load(cls, path: str | Path) -> AffineLens:
        directory = Path(path)
        info_path = directory / "lens.json"
        if not info_path.is_file():
            raise MappingError(f"{directory} is not a saved affine lens (no lens.json)")
        redo = f"delete {directory} and fit the lens again"
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
            layers = info["layers"]
            if not isinstance(layers, list):
                raise ValueError("'layers' is not a list")
        except (ValueError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise MappingError(f"{info_path} is damaged ({exc}); {redo}") from None
        maps = {}
        for layer in layers:
            try:
                maps[layer] = AffineMap.load(directory / f"layer{layer}", redo=redo)
            except MappingError as exc:
                advice = "" if redo in str(exc) else f"; {redo}"
                raise MappingError(f"the affine lens in {directory} cannot be loaded: {exc}{advice}") from None
        return cls(maps, info.get("model"))

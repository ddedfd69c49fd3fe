"""Edge attribution patching (EAP) and EAP with integrated gradients (EAP-IG) at component level.

The graph: *senders* are the input embedding (residual stream at block 0), every attention head (its
share of the attention output projection) and every MLP; *receivers* are each block's attention input,
MLP input (the residual stream read by the block's norms) and the logits (the final norm's input). Heads
send individually; a block's heads receive together (their shared normed input), which keeps the method
a plain hook on Hugging Face models. An edge is sender → later receiver.

Score of edge (u → v) = Σ_positions (a_u(corrupt) − a_u(clean)) · ∂metric/∂input_v, the metric being the
logit difference target − foil; EAP-IG averages the gradient over ``steps`` inputs interpolated between the
corrupt and the clean embeddings. :func:`evaluate_edges` runs the clean input with every edge *outside*
the circuit fed the sender's corrupt activation instead, so with all edges it is the clean model and with
none the corrupt one (both exact); faithfulness = (m_circuit − m_corrupt) / (m_clean − m_corrupt).

>>> from patchscopes.circuits.tasks import encode, make_task
>>> data = encode(lm, make_task("subj_verb", n=16, seed=0).examples, same_length=True)
>>> scores = attribute(lm, data, method="eap-ig", steps=5)
>>> int(scores.top_edges(20).sum()), scores.frame().columns.tolist()
(20, ['sender', 'receiver', 'score', 'abs_score', 'rank'])
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import nn

from patchscopes.batching import left_pad
from patchscopes.circuits.circuit import CircuitError
from patchscopes.circuits.tasks import Encoded
from patchscopes.hooks import at_locations
from patchscopes.layers import EMBEDDINGS
from patchscopes.models.adapters import BlockLayout
from patchscopes.models.gradients import frozen


def _module(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


@dataclass
class Graph:
    """Senders, receivers and which sender → receiver edges exist."""

    n_layers: int
    n_heads: int
    senders: list[str]
    receivers: list[str]
    valid: torch.Tensor  # [n_senders, n_receivers] bool

    @classmethod
    def build(cls, n_layers: int, n_heads: int) -> Graph:
        senders, s_pos = ["input"], [-1]
        receivers, r_pos = [], []
        for layer in range(n_layers):
            senders += [f"a{layer}.h{h}" for h in range(n_heads)] + [f"m{layer}"]
            s_pos += [2 * layer] * n_heads + [2 * layer + 1]
            receivers += [f"a{layer}", f"m{layer}"]
            r_pos += [2 * layer, 2 * layer + 1]
        receivers.append("logits")
        r_pos.append(2 * n_layers)
        valid = torch.tensor(s_pos)[:, None] < torch.tensor(r_pos)[None, :]
        return cls(n_layers, n_heads, senders, receivers, valid)

    @property
    def n_edges(self) -> int:
        return int(self.valid.sum())


def layout_for(lm) -> BlockLayout:  # noqa: ANN001
    """The block layout the model layer found for edge attribution; a clear error where it has none."""
    layout = lm.adapter.block_layout
    if layout is None:
        model_type = getattr(lm.model.config, "model_type", None)
        raise CircuitError(
            f"edge attribution cannot run on {model_type!r} blocks: it needs Llama- or GPT-2-style blocks whose "
            "attention and MLP outputs add straight into the residual stream behind one norm each (no norms "
            "after the sublayers, as in Gemma); pass adapter=ArchSpec(..., block_layout=BlockLayout(...)) if yours do"
        )
    return layout


def n_heads_of(lm) -> int:  # noqa: ANN001
    config = getattr(lm.model.config, "text_config", None) or lm.model.config
    for key in ("num_attention_heads", "n_head"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    raise CircuitError("cannot read the number of attention heads from the model config")


class _Recorder:
    """Hooks that record sender activations into a [B, T, n_senders, d] buffer and observe or rewrite receiver inputs.

    When rewriting (``present`` set), receiver r reads its input from the corrupt run plus, for each sender s
    with an edge s → r in the circuit, (a_s(now) − a_s(corrupt)): only kept edges cost anything.
    """

    def __init__(self, lm, graph: Graph, layout: BlockLayout) -> None:  # noqa: ANN001
        self.lm, self.graph, self.layout = lm, graph, layout
        self.buffer: torch.Tensor | None = None
        self.filled = 0
        self.grads: dict[int, torch.Tensor] = {}
        self.replace_input: torch.Tensor | None = None
        self.corrupt: torch.Tensor | None = None  # sender activations of the corrupt run
        self.corrupt_inputs: dict[int, torch.Tensor] | None = None  # receiver inputs of the corrupt run
        self.record_inputs: dict[int, torch.Tensor] | None = None
        self.present: list[torch.Tensor] | None = None  # per receiver: indices of senders with a kept edge
        self.track_grads = False

    def _heads(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        proj = _module(self.lm.adapter.blocks[layer], self.layout.o_proj)
        weight = proj.weight if not self.layout.conv1d else proj.weight.T  # [d_out, d_in]
        b, t, _ = z.shape
        h = self.graph.n_heads
        return torch.einsum("bthk,dhk->bthd", z.detach().view(b, t, h, -1), weight.detach().view(weight.shape[0], h, -1))  # type: ignore[operator,index,arg-type]

    def _record(self, acts: torch.Tensor) -> None:
        assert self.buffer is not None
        n = acts.shape[2]
        self.buffer[:, :, self.filled : self.filled + n] = acts.detach()
        self.filled += n

    def _receiver(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if self.record_inputs is not None:
            self.record_inputs[index] = x.detach()
        if self.present is not None and self.corrupt is not None and self.corrupt_inputs is not None and self.buffer is not None:
            idx = self.present[index]
            x = self.corrupt_inputs[index]
            if len(idx):
                x = x + (self.buffer[:, :, idx] - self.corrupt[:, :, idx]).sum(dim=2)
        if self.track_grads:
            x = x + 0  # a fresh node: its gradient is the one through this receiver only
            x.register_hook(lambda g, i=index: self.grads.__setitem__(i, g.detach()))
        return x

    @contextmanager
    def hooks(self) -> Iterator[None]:
        handles = []
        blocks = self.lm.adapter.blocks

        def on_input(layer: object, hidden: torch.Tensor) -> torch.Tensor | None:
            if self.replace_input is not None:
                hidden = self.replace_input
            if self.track_grads and not hidden.requires_grad:
                hidden = hidden.detach().requires_grad_(True)
            b, t, d = hidden.shape
            self.buffer = torch.empty(b, t, len(self.graph.senders), d, dtype=hidden.dtype)
            self.filled = 0
            self._record(hidden.unsqueeze(2))
            return hidden

        def pre(index: int):  # noqa: ANN202
            def hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
                if args:
                    return (self._receiver(index, args[0]), *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": self._receiver(index, kwargs["hidden_states"])}

            return hook

        for layer, block in enumerate(blocks):
            attn_norm, mlp_norm = _module(block, self.layout.attn_norm), _module(block, self.layout.mlp_norm)
            handles.append(attn_norm.register_forward_pre_hook(pre(2 * layer), with_kwargs=True))
            handles.append(mlp_norm.register_forward_pre_hook(pre(2 * layer + 1), with_kwargs=True))

            def on_o_proj(module: nn.Module, args: tuple, layer: int = layer) -> None:
                self._record(self._heads(layer, args[0]))

            handles.append(_module(block, self.layout.o_proj).register_forward_pre_hook(on_o_proj))

            def on_mlp(module: nn.Module, args: tuple, output: Any) -> None:
                out = output[0] if isinstance(output, tuple) else output
                self._record(out.unsqueeze(2))

            handles.append(_module(block, self.layout.mlp).register_forward_hook(on_mlp))
        final = self.lm.adapter.final_norm
        if final is None:
            raise CircuitError("edge attribution needs a final norm module to read the logits receiver")
        handles.append(final.register_forward_pre_hook(pre(len(self.graph.receivers) - 1), with_kwargs=True))
        try:
            with at_locations(blocks, [EMBEDDINGS], on_input):
                yield
        finally:
            for h in handles:
                h.remove()

    def senders(self) -> torch.Tensor:
        assert self.buffer is not None and self.filled == self.buffer.shape[2]
        return self.buffer


def _metric(logits: torch.Tensor, data: Encoded) -> torch.Tensor:
    """Per-example logit difference target − foil at the last position."""
    last = logits[:, -1].float()
    rows = torch.arange(len(data))
    return last[rows, torch.tensor(data.target_ids)] - last[rows, torch.tensor(data.foil_ids)]


def _run(lm, ids: Sequence[Sequence[int]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # noqa: ANN001
    batch = left_pad(ids, lm.pad_id, lm.device)
    kwargs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "position_ids": batch.position_ids}
    return lm.model(**kwargs).logits, {"mask": batch.attention_mask}


@dataclass
class EdgeScores:
    graph: Graph
    scores: torch.Tensor  # [n_senders, n_receivers]; 0 on invalid edges
    method: str
    n_examples: int

    def frame(self) -> pd.DataFrame:
        """One row per edge: sender, receiver, score, |score| rank (1 = most important)."""
        s_idx, r_idx = torch.nonzero(self.graph.valid, as_tuple=True)
        values = self.scores[s_idx, r_idx]
        df = pd.DataFrame(
            {
                "sender": [self.graph.senders[i] for i in s_idx.tolist()],
                "receiver": [self.graph.receivers[i] for i in r_idx.tolist()],
                "score": values.tolist(),
            }
        )
        df["abs_score"] = df["score"].abs()
        df = df.sort_values("abs_score", ascending=False, kind="stable").reset_index(drop=True)
        df["rank"] = range(1, len(df) + 1)
        return df

    def top_edges(self, n: int) -> torch.Tensor:
        """Boolean [n_senders, n_receivers] of the ``n`` edges with the largest |score|."""
        flat = torch.where(self.graph.valid, self.scores.abs(), torch.full_like(self.scores, -1.0)).flatten()
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[torch.argsort(flat, descending=True, stable=True)[: max(0, n)]] = True
        return keep.view(self.scores.shape) & self.graph.valid

    def component_scores(self) -> pd.Series:
        """Per sender: the sum of |score| over its outgoing edges, largest first."""
        totals = (self.scores.abs() * self.graph.valid).sum(dim=1)
        return pd.Series(totals.tolist(), index=self.graph.senders).sort_values(ascending=False, kind="stable")


def attribute(lm, data: Encoded, method: str = "eap", steps: int = 5, batch_size: int = 16) -> EdgeScores:  # noqa: ANN001
    """EAP (``method="eap"``) or EAP-IG (``"eap-ig"``, ``steps`` interpolation points) edge scores.

    ``data`` must have corrupt prompts of the same token length as the prompts (``encode(..., same_length=True)``).
    """
    if method not in ("eap", "eap-ig"):
        raise CircuitError(f"unknown attribution method {method!r}; use 'eap' or 'eap-ig'")
    if method == "eap-ig" and steps < 1:
        raise CircuitError(f"EAP-IG needs steps >= 1, got {steps}")
    _check_aligned(data)
    layout = layout_for(lm)
    graph = Graph.build(lm.n_layers, n_heads_of(lm))
    total = torch.zeros(len(graph.senders), len(graph.receivers))
    rec = _Recorder(lm, graph, layout)
    try:
        with frozen(lm.model), rec.hooks():
            for start in range(0, len(data), batch_size):
                sub = data.subset(list(range(start, min(start + batch_size, len(data)))))
                with torch.no_grad():
                    _, info = _run(lm, sub.corrupt_ids)
                    corrupt = rec.senders()
                    clean = None
                    if method == "eap-ig":
                        _run(lm, sub.ids)
                        clean = rec.senders()
                grads: torch.Tensor | None = None
                alphas = [1.0] if method == "eap" else [(k + 1) / steps for k in range(steps)]
                rec.track_grads = True
                for alpha in alphas:
                    rec.grads = {}
                    if clean is not None:
                        rec.replace_input = (corrupt[:, :, 0] + alpha * (clean[:, :, 0] - corrupt[:, :, 0])).detach()
                    logits, _ = _run(lm, sub.ids)
                    _metric(logits, sub).sum().backward()
                    if clean is None:
                        clean = rec.senders()  # EAP: the gradient run is the clean run
                    if grads is None:
                        grads = torch.zeros(clean.shape[0], clean.shape[1], len(graph.receivers), clean.shape[-1])
                    for i, g in rec.grads.items():
                        grads[:, :, i] += g.float() / len(alphas)
                    rec.replace_input = None
                rec.track_grads = False
                assert clean is not None and grads is not None
                mask = info["mask"].to(clean.dtype)[:, :, None, None]
                delta = ((corrupt - clean) * mask).float()
                total += torch.einsum("btsd,btrd->sr", delta, grads)
    finally:
        rec.track_grads, rec.replace_input = False, None
    scores = torch.where(graph.valid, total / len(data), torch.zeros_like(total))
    return EdgeScores(graph, scores, method, len(data))


def _check_aligned(data: Encoded) -> None:
    bad = [i for i, (a, b) in enumerate(zip(data.ids, data.corrupt_ids)) if len(a) != len(b)]
    if bad:
        raise CircuitError(
            f"{len(bad)} examples have corrupt prompts of another token length (first: #{bad[0]}); "
            "encode the task with encode(lm, examples, same_length=True)"
        )


@torch.no_grad()
def evaluate_many(lm, data: Encoded, keeps: Sequence[torch.Tensor | None], batch_size: int = 32) -> list[dict[str, float]]:  # noqa: ANN001
    """:func:`evaluate_edges` for several edge sets, sharing the clean and corrupt runs."""
    _check_aligned(data)
    layout = layout_for(lm)
    graph = Graph.build(lm.n_layers, n_heads_of(lm))
    keep_ts = [graph.valid.clone() if k is None else k.to(torch.bool) & graph.valid for k in keeps]
    rec = _Recorder(lm, graph, layout)
    m_clean, m_cor = [], []
    m_circ: list[list[torch.Tensor]] = [[] for _ in keep_ts]
    with rec.hooks():
        for start in range(0, len(data), batch_size):
            sub = data.subset(list(range(start, min(start + batch_size, len(data)))))
            rec.record_inputs = {}
            logits, _ = _run(lm, sub.corrupt_ids)
            m_cor.append(_metric(logits, sub))
            rec.corrupt, rec.corrupt_inputs, rec.record_inputs = rec.senders().clone(), rec.record_inputs, None
            logits, _ = _run(lm, sub.ids)
            m_clean.append(_metric(logits, sub))
            for keep_t, out in zip(keep_ts, m_circ):
                rec.present = [torch.nonzero(keep_t[:, r]).flatten() for r in range(len(graph.receivers))]
                logits, _ = _run(lm, sub.ids)
                out.append(_metric(logits, sub))
            rec.present, rec.corrupt, rec.corrupt_inputs = None, None, None
    clean, cor = float(torch.cat(m_clean).mean()), float(torch.cat(m_cor).mean())
    denom = clean - cor
    rows = []
    for keep_t, out in zip(keep_ts, m_circ):
        circ = float(torch.cat(out).mean())
        rows.append({
            "clean": clean,
            "corrupt": cor,
            "circuit": circ,
            "faithfulness": (circ - cor) / denom if abs(denom) > 1e-9 else float("nan"),
            "n_edges": int(keep_t.sum()),
        })  # fmt: skip
    return rows


def evaluate_edges(lm, data: Encoded, keep: torch.Tensor | None, batch_size: int = 32) -> dict[str, float]:  # noqa: ANN001
    """Mean logit difference of the clean run, the corrupt run and the run with only ``keep`` edges clean.

    ``keep``: boolean [n_senders, n_receivers] (``None`` = every edge). Returns ``clean``, ``corrupt``,
    ``circuit`` and ``faithfulness`` = (circuit − corrupt) / (clean − corrupt).
    """
    return evaluate_many(lm, data, [keep], batch_size)[0]


def faithfulness_curve(lm, data: Encoded, scores: EdgeScores, sizes: Sequence[int], batch_size: int = 32) -> pd.DataFrame:  # noqa: ANN001
    """Faithfulness of the top-n edges for each n in ``sizes`` (plus the share of all edges)."""
    outs = evaluate_many(lm, data, [scores.top_edges(n) for n in sizes], batch_size=batch_size)
    rows = [{"method": scores.method, "top_n": n, "edge_share": n / scores.graph.n_edges, **out} for n, out in zip(sizes, outs)]
    return pd.DataFrame(rows)

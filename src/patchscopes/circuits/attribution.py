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

>>> scores = attribute(lm, data, method="eap-ig", steps=5)        # doctest: +SKIP
>>> scores.top_edges(20)                                          # doctest: +SKIP
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
from patchscopes.capture import EMBED_INDEX, layer_hooks
from patchscopes.circuits.circuit import CircuitError
from patchscopes.circuits.tasks import Encoded


@dataclass(frozen=True)
class BlockLayout:
    """Where a block keeps its attention output projection, its two input norms and its MLP."""

    o_proj: str
    attn_norm: str
    mlp_norm: str
    mlp: str
    conv1d: bool = False  # GPT-2 style Conv1D: weight is [in, out]


LAYOUTS = {
    "llama": BlockLayout("self_attn.o_proj", "input_layernorm", "post_attention_layernorm", "mlp"),
    "mistral": BlockLayout("self_attn.o_proj", "input_layernorm", "post_attention_layernorm", "mlp"),
    "qwen2": BlockLayout("self_attn.o_proj", "input_layernorm", "post_attention_layernorm", "mlp"),
    "qwen3": BlockLayout("self_attn.o_proj", "input_layernorm", "post_attention_layernorm", "mlp"),
    "gpt2": BlockLayout("attn.c_proj", "ln_1", "ln_2", "mlp", conv1d=True),
}


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
    model_type = getattr(lm.model.config, "model_type", None)
    if model_type not in LAYOUTS:
        raise CircuitError(
            f"edge attribution supports {', '.join(LAYOUTS)} blocks, not {model_type!r}: it needs attention "
            "outputs that add straight into the residual stream (no post-attention norm, as in Gemma)"
        )
    return LAYOUTS[str(model_type)]


def n_heads_of(lm) -> int:  # noqa: ANN001
    config = getattr(lm.model.config, "text_config", None) or lm.model.config
    for key in ("num_attention_heads", "n_head"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    raise CircuitError("cannot read the number of attention heads from the model config")


class _Recorder:
    """Hooks that record sender activations [B, T, n_senders, d] and rewrite/observe receiver inputs."""

    def __init__(self, lm, graph: Graph, layout: BlockLayout) -> None:  # noqa: ANN001
        self.lm, self.graph, self.layout = lm, graph, layout
        self.acts: list[torch.Tensor] = []  # sender activations in sender order
        self.grads: dict[int, torch.Tensor] = {}
        self.replace_input: torch.Tensor | None = None
        self.corrupt: torch.Tensor | None = None  # [B, T, S, d] for evaluation
        self.absent: torch.Tensor | None = None  # [S, R] float: 1 = edge removed
        self.track_grads = False

    def _heads(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        proj = _module(self.lm.adapter.blocks[layer], self.layout.o_proj)
        weight = proj.weight if not self.layout.conv1d else proj.weight.T  # [d_out, d_in]
        b, t, _ = z.shape
        h = self.graph.n_heads
        zh = z.view(b, t, h, -1)
        wh = weight.view(weight.shape[0], h, -1)
        return torch.einsum("bthk,dhk->bthd", zh, wh)

    def _receiver(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if self.absent is not None and self.corrupt is not None:
            current = torch.cat(self.acts, dim=2) if len(self.acts) > 1 else self.acts[0]
            k = current.shape[2]
            diff = current - self.corrupt[:, :, :k]
            x = x - torch.einsum("btsd,s->btd", diff, self.absent[:k, index].to(diff.dtype))
        if self.track_grads:
            x = x + 0  # a fresh node: its gradient is the one through this receiver only
            x.register_hook(lambda g, i=index: self.grads.__setitem__(i, g.detach()))
        return x

    @contextmanager
    def hooks(self) -> Iterator[None]:
        handles = []
        blocks = self.lm.adapter.blocks

        def on_input(layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
            self.acts = []
            if self.replace_input is not None:
                hidden = self.replace_input
            if self.track_grads and not hidden.requires_grad:
                hidden = hidden.detach().requires_grad_(True)
            self.acts.append(hidden.unsqueeze(2))
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
                self.acts.append(self._heads(layer, args[0]))

            handles.append(_module(block, self.layout.o_proj).register_forward_pre_hook(on_o_proj))

            def on_mlp(module: nn.Module, args: tuple, output: Any) -> None:
                out = output[0] if isinstance(output, tuple) else output
                self.acts.append(out.unsqueeze(2))

            handles.append(_module(block, self.layout.mlp).register_forward_hook(on_mlp))
        final = self.lm.adapter.final_norm
        if final is None:
            raise CircuitError("edge attribution needs a final norm module to read the logits receiver")
        handles.append(final.register_forward_pre_hook(pre(len(self.graph.receivers) - 1), with_kwargs=True))
        try:
            with layer_hooks(blocks, [EMBED_INDEX], on_input):
                yield
        finally:
            for h in handles:
                h.remove()

    def senders(self) -> torch.Tensor:
        return torch.cat(self.acts, dim=2)


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
    saved = [(p, p.requires_grad) for p in lm.model.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        with rec.hooks():
            for start in range(0, len(data), batch_size):
                sub = data.subset(list(range(start, min(start + batch_size, len(data)))))
                with torch.no_grad():
                    _, info = _run(lm, sub.corrupt_ids)
                    corrupt = rec.senders()
                    _, _ = _run(lm, sub.ids)
                    clean = rec.senders()
                mask = info["mask"].to(clean.dtype)[:, :, None, None]
                grads = torch.zeros(clean.shape[0], clean.shape[1], len(graph.receivers), clean.shape[-1])
                alphas = [1.0] if method == "eap" else [(k + 1) / steps for k in range(steps)]
                rec.track_grads = True
                for alpha in alphas:
                    rec.grads = {}
                    if method == "eap-ig":
                        rec.replace_input = (corrupt[:, :, 0] + alpha * (clean[:, :, 0] - corrupt[:, :, 0])).detach()
                    logits, _ = _run(lm, sub.ids)
                    _metric(logits, sub).sum().backward()
                    for i, g in rec.grads.items():
                        grads[:, :, i] += g.float() / len(alphas)
                    rec.replace_input = None
                rec.track_grads = False
                delta = ((corrupt - clean) * mask).float()
                total += torch.einsum("btsd,btrd->sr", delta, grads)
    finally:
        rec.track_grads, rec.replace_input = False, None
        for p, flag in saved:
            p.requires_grad_(flag)
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
def evaluate_edges(lm, data: Encoded, keep: torch.Tensor | None, batch_size: int = 32) -> dict[str, float]:  # noqa: ANN001
    """Mean logit difference of the clean run, the corrupt run and the run with only ``keep`` edges clean.

    ``keep``: boolean [n_senders, n_receivers] (``None`` = every edge). Returns ``clean``, ``corrupt``,
    ``circuit`` and ``faithfulness`` = (circuit − corrupt) / (clean − corrupt).
    """
    _check_aligned(data)
    layout = layout_for(lm)
    graph = Graph.build(lm.n_layers, n_heads_of(lm))
    keep_t = graph.valid.clone() if keep is None else keep.to(torch.bool) & graph.valid
    rec = _Recorder(lm, graph, layout)
    m_clean, m_cor, m_circ = [], [], []
    with rec.hooks():
        for start in range(0, len(data), batch_size):
            sub = data.subset(list(range(start, min(start + batch_size, len(data)))))
            logits, _ = _run(lm, sub.corrupt_ids)
            m_cor.append(_metric(logits, sub))
            rec.corrupt = rec.senders()
            logits, _ = _run(lm, sub.ids)
            m_clean.append(_metric(logits, sub))
            rec.absent = (~keep_t).float()
            logits, _ = _run(lm, sub.ids)
            m_circ.append(_metric(logits, sub))
            rec.absent, rec.corrupt = None, None
    clean, cor, circ = (float(torch.cat(x).mean()) for x in (m_clean, m_cor, m_circ))
    denom = clean - cor
    return {
        "clean": clean,
        "corrupt": cor,
        "circuit": circ,
        "faithfulness": (circ - cor) / denom if abs(denom) > 1e-9 else float("nan"),
        "n_edges": int(keep_t.sum()),
    }


def faithfulness_curve(lm, data: Encoded, scores: EdgeScores, sizes: Sequence[int], batch_size: int = 32) -> pd.DataFrame:  # noqa: ANN001
    """Faithfulness of the top-n edges for each n in ``sizes`` (plus the share of all edges)."""
    rows = []
    for n in sizes:
        out = evaluate_edges(lm, data, scores.top_edges(n), batch_size=batch_size)
        rows.append({"method": scores.method, "top_n": n, "edge_share": n / scores.graph.n_edges, **out})
    return pd.DataFrame(rows)

"""Architecture coverage: every model type in transformers' causal-LM auto mapping, as a tiny random model.

For each type: build a tiny model from its config class, load it through the library (the load-time
probes run), capture and patch at a block and at the embeddings (a self-patch must leave the logits
unchanged), and run a token-identity sweep with the fast and the plain engine (equal top-1, |Δp| small).

``python tests/arch_coverage.py > docs/architectures.md`` writes the coverage page;
``tests/test_architectures.py`` runs the same check per type in CI.
"""

from __future__ import annotations

import contextlib
import io
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny import tiny_tokenizer  # noqa: E402

N_LAYERS = 4
MAX_PARAMS = 30_000_000
SWEEP_ATOL = 1e-4  # |Δ top-1 probability| between the fast and the plain engine, fp32

#: Config attributes set on every tiny model where the config has them.
SHRINK: dict[str, object] = {
    "num_hidden_layers": N_LAYERS,
    "n_layer": N_LAYERS,
    "n_layers": N_LAYERS,
    "num_layers": N_LAYERS,
    "encoder_layers": N_LAYERS,
    "decoder_layers": N_LAYERS,
    "encoder_ffn_dim": 128,
    "decoder_ffn_dim": 128,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "word_embed_proj_dim": 64,
    "embedding_size": 64,
    "input_embedding_size": 64,
    "output_embedding_size": 64,
    "hidden_size_per_layer_input": 16,
    "hidden_size": 64,
    "n_embd": 64,
    "d_model": 64,
    "num_attention_heads": 4,
    "n_head": 4,
    "n_heads": 4,
    "num_key_value_heads": 2,
    "n_kv_heads": 2,
    "head_dim": 16,
    "intermediate_size": 128,
    "ffn_dim": 128,
    "n_inner": 128,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "moe_num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_topk": 2,
    "n_shared_experts": 1,
    "n_group": 1,
    "topk_group": 1,
    "kv_lora_rank": 16,
    "q_lora_rank": 32,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "qk_head_dim": 16,
    "v_head_dim": 16,
    "max_position_embeddings": 256,
    "n_positions": 256,
    "sliding_window": 16,
    "attention_chunk_size": 16,
    "first_k_dense_replace": 1,
    "rotary_dim": 8,
    "num_key_value_groups": 2,
    "num_kv_heads": 1,
    "mamba_n_heads": 4,
    "mamba_d_head": 32,
    "mamba_d_state": 16,
    "mamba_n_groups": 1,
    "mamba_expand": 2,
    "mamba_chunk_size": 16,
    "mamba_d_ssm": 128,
}

#: Per-type settings where a shared key means something else in that config.
OVERRIDES: dict[str, dict[str, object]] = {
    "mamba2": {"num_heads": 8},  # SSM heads: num_heads × head_dim must equal expand × hidden_size
}


_GENERIC_HEAD = "the logits are not the final norm and head applied to the last block's output; the probe refuses it"

#: Model types the library refuses (the load-time probes raise a clear error), and why.
KNOWN_FAILURES: dict[str, str] = {
    "cpmant": _GENERIC_HEAD,
    "deepseek_v4": "hyper-connections: several residual streams, mixed after the last block",
    "electra": "its generator head transforms the state in a module beside the output embedding",
    "hrm_text": "a hierarchical recurrent model: its blocks run in nested loops, so the last block is not the last step",
    "hy_v4": "hyper-connections: several residual streams, mixed after the last block",
    "inkling2_loop_text": "a soft-cap module applied after the head, which the decode does not know",
    "inkling2_text": "a soft-cap module applied after the head, which the decode does not know",
    "mllama": "its cross-attention blocks skip themselves on text-only input; reading or writing there is refused",
    "modernbert-decoder": "its head transforms the state in a module beside the decoder",
    "prophetnet": "it predicts from n-gram streams, not from the blocks' main output",
    "xlm": _GENERIC_HEAD,
    "xlnet": _GENERIC_HEAD,
    "xmod": "it needs a language set (set_default_language) before any forward pass",
}


@dataclass(frozen=True)
class Coverage:
    """The outcome for one model type: ``pass``, ``fail`` or ``no tiny model``, with the reason."""

    model_type: str
    status: str
    reason: str = ""
    fast: str = ""  # "fast == plain" or why the fast engine fell back
    seconds: float = 0.0


def causal_lm_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _has(config: object, key: str) -> bool:
    """hasattr that treats per-layer attributes (which raise on global access) as absent."""
    try:
        return hasattr(config, key)
    except Exception:
        return False


def _shrink(config: object, vocab: int) -> None:
    original_layers = None
    for key in ("num_hidden_layers", "n_layer", "n_layers", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            original_layers = value
            break
    for key, value in SHRINK.items():
        if _has(config, key) and not isinstance(getattr(config, key), (dict, list)):
            with contextlib.suppress(Exception):
                setattr(config, key, value)
    # multi-head latent attention: the rotary width is the head dim, and there are no grouped kv heads
    if _has(config, "qk_rope_head_dim") and isinstance(getattr(config, "qk_rope_head_dim", None), int):
        with contextlib.suppress(Exception):
            config.head_dim = config.qk_rope_head_dim
            config.num_key_value_heads = config.num_attention_heads
    if original_layers:
        for key, value in list(vars(config).items()):
            if isinstance(value, list) and len(value) == original_layers and original_layers != N_LAYERS:
                with contextlib.suppress(Exception):
                    setattr(config, key, value[:N_LAYERS])
    if _has(config, "cross_attention_layers"):  # keep the last block a self-attention block (text-only input)
        with contextlib.suppress(Exception):
            config.cross_attention_layers = [1]
    for key, value in (("vocab_size", vocab), ("pad_token_id", 0), ("eos_token_id", 1), ("bos_token_id", 1)):
        if _has(config, key) or key == "vocab_size":
            with contextlib.suppress(Exception):
                setattr(config, key, value)
    for key in ("tie_word_embeddings",):
        if _has(config, key):
            with contextlib.suppress(Exception):
                setattr(config, key, False)


def _constructed(model_type: str, vocab: int) -> object:
    """The config built with the tiny sizes as constructor arguments (so derived per-layer fields follow)."""
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    defaults = cls().to_dict()
    depth_keys = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")
    layers = next((defaults[k] for k in depth_keys if isinstance(defaults.get(k), int)), None)
    shared = {**SHRINK, **OVERRIDES.get(model_type, {})}
    kwargs: dict[str, object] = {k: v for k, v in shared.items() if k in defaults and not isinstance(defaults[k], (dict, list))}
    for key, value in defaults.items():
        if isinstance(value, list) and layers and len(value) == layers:
            kwargs[key] = value[:N_LAYERS]
    for key in ("vocab_size", "vocab_size_per_layer_input"):
        if key in defaults:
            kwargs[key] = vocab
    return cls(**kwargs)


def tiny_config(model_type: str, vocab: int) -> object:
    from transformers import CONFIG_MAPPING

    try:
        config = _constructed(model_type, vocab)
    except Exception:
        config = CONFIG_MAPPING[model_type]()
    _shrink(config, vocab)
    for key, value in OVERRIDES.get(model_type, {}).items():
        setattr(config, key, value)
    from transformers import PretrainedConfig

    for inner in list(vars(config).values()):
        if isinstance(inner, PretrainedConfig):
            _shrink(inner, vocab)
    return config


def build(model_type: str) -> torch.nn.Module:
    """A tiny random model of ``model_type``; raises with the reason where none can be built."""
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer()
    config = tiny_config(model_type, len(tok))
    with torch.device("meta"):
        shape = AutoModelForCausalLM.from_config(config)
    n_params = sum(p.numel() for p in shape.parameters())
    if n_params > MAX_PARAMS:
        raise RuntimeError(f"the config did not shrink below {MAX_PARAMS:,} parameters ({n_params:,})")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    return model


def _short(exc: BaseException, limit: int = 160) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ").replace("|", "/")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def check(model_type: str) -> Coverage:
    """Run the coverage steps on one model type."""
    from patchscopes import TOKEN_IDENTITY, NextToken, Patchscope, Source, Target, run_many, sweep
    from patchscopes.capture import EMBEDDINGS
    from patchscopes.engine import fast_engine_problem
    from patchscopes.models.loading import from_model

    started = time.time()
    sink = io.StringIO()
    try:
        with contextlib.redirect_stderr(sink), contextlib.redirect_stdout(sink), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = build(model_type)
    except Exception as exc:
        return Coverage(model_type, "no tiny model", _short(exc), seconds=time.time() - started)
    step = "load-time probes"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lm = from_model(model, tiny_tokenizer(), name=f"tiny-{model_type}")
            step = "self-patch"
            prompt = "The capital of France is Paris"
            base = run_many([Patchscope(Source(prompt, layer=0), Target(prompt, layer=0), decoding=NextToken())], lm)
            reference = base[0].logits
            for layer in (EMBEDDINGS, 0, lm.n_layers // 2, lm.n_layers - 1):
                scope = Patchscope(Source(prompt, layer=layer, position=2), Target(prompt, layer=layer, position=2))
                [result] = run_many([scope], lm, executor="plain")
                diff = float((result.logits - reference).abs().max())
                if diff > 1e-4 * max(1.0, float(reference.abs().max())):
                    raise AssertionError(f"patching a state back at layer {layer!r} changed the logits by {diff:.3g}")
            step = "fast engine self-check"
            problem = fast_engine_problem(lm)
            step = "token-identity sweep"
            texts = ["Diana, Princess of Wales", "cat"]
            plain = sweep(lm, texts, TOKEN_IDENTITY, executor="plain", progress=False)
            if problem is None:
                fast = sweep(lm, texts, TOKEN_IDENTITY, executor="fast", progress=False)
                worst = max(abs(a - b) for a, b in zip(fast.top1_prob, plain.top1_prob))
                if list(fast.top1) != list(plain.top1) or worst > SWEEP_ATOL:
                    raise AssertionError(f"fast and plain sweeps differ (|Δp| {worst:.3g})")
                fast_note = "fast == plain"
            else:
                auto = sweep(lm, texts, TOKEN_IDENTITY, executor="auto", progress=False)
                if list(auto.top1) != list(plain.top1):
                    raise AssertionError("engine='auto' fell back but differs from the plain engine")
                fast_note = f"plain engine (fast engine's {problem})"
    except Exception as exc:
        return Coverage(model_type, "fail", f"{step}: {_short(exc)}", seconds=time.time() - started)
    return Coverage(model_type, "pass", fast=_short_note(fast_note), seconds=time.time() - started)


def _short_note(note: str, limit: int = 200) -> str:
    note = note.replace("\n", " ").replace("|", "/")
    return note if len(note) <= limit else note[: limit - 1] + "…"


def page(results: list[Coverage]) -> str:
    import transformers

    built = [r for r in results if r.status != "no tiny model"]
    passed = [r for r in built if r.status == "pass"]
    fast = [r for r in passed if r.fast == "fast == plain"]
    lines = [
        "# Architecture coverage",
        "",
        f"Every model type in transformers {transformers.__version__}'s causal-LM auto mapping ({len(results)} types), "
        f"built as a tiny random model ({N_LAYERS} layers, width 64) from its own config class. For each: the load-time "
        "probes (last-layer logit lens equals the logits; writing every block's output back changes nothing), a "
        "self-patch at the embeddings and at three blocks (logits unchanged), and a token-identity sweep with the "
        'fast and the plain engine (same top-1, |Δp| ≤ 1e-4), or with `engine="auto"` where the fast engine\'s '
        "self-check sends it to the plain engine.",
        "",
        f"**{len(passed)} of {len(built)} buildable types pass ({100 * len(passed) / max(1, len(built)):.0f} %)**; "
        f"{len(fast)} of them run on the fast engine, the rest fall back to the plain one with one warning. "
        f"{len(results) - len(built)} types do not build as a tiny model from their default config (the reason is listed).",
        "",
        "Generated by `python tests/arch_coverage.py > docs/architectures.md`; `tests/test_architectures.py` runs the "
        "same check on every type in CI.",
        "",
        "| model type | result | engine / reason |",
        "|---|---|---|",
    ]
    for r in results:
        detail = r.fast if r.status == "pass" else r.reason
        if r.status == "fail" and r.model_type in KNOWN_FAILURES:
            detail = f"{KNOWN_FAILURES[r.model_type]} ({r.reason})"
        lines.append(f"| `{r.model_type}` | {r.status} | {detail} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    types = sys.argv[1:] or causal_lm_types()
    out = []
    for t in types:
        result = check(t)
        print(f"{t}: {result.status} {result.reason or result.fast} ({result.seconds:.1f} s)", file=sys.stderr, flush=True)
        out.append(result)
    print(page(out), end="")

"""Share fitted artifacts on the Hugging Face Hub: affine lenses, affine maps, LREs and concept sets.

Each kind keeps its own file layout (its ``save``/``load``). This module adds, for all four, a generated model
card (``README.md``), loading from a directory or a Hub id (``snapshot_download``, so a snapshot already in the
local Hugging Face cache loads offline), uploading, a check that a loaded artifact was fitted on the model it
is loaded for, and a reader of the tuned-lens project's lens format (``config.json`` + ``params.pt``).

    >>> lens.save_pretrained("smol-lens")                                       # doctest: +SKIP
    >>> lens.push_to_hub("me/smol-affine-lens")                                 # doctest: +SKIP
    >>> lens = AffineLens.from_pretrained("me/smol-affine-lens", model=lm)      # doctest: +SKIP
"""

from __future__ import annotations

import json
import pickle
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, cast

import torch

from patchscopes.errors import MappingError, MapProvenanceError, PatchscopeError
from patchscopes.layers import Location, depth

if TYPE_CHECKING:
    from patchscopes.lenses import AffineLens
    from patchscopes.models.loading import ModelHandle

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
#: The file that marks each kind's directory, and the kind's name.
MARKERS = {"lens.json": "affine-lens", "map.json": "affine-map", "lre.json": "lre", "concepts.json": "concepts"}
_TITLES = {
    "affine-lens": ("affine lens", "AffineLens", "patchscopes"),
    "affine-map": ("affine map", "AffineMap", "patchscopes"),
    "lre": ("linear relational embedding", "LinearRelationalEmbedding", "patchscopes.relations.lre"),
    "concepts": ("concept set", "ConceptSet", "patchscopes.relations.lrc"),
}
_METRIC = re.compile(r"^(r2|faithfulness|causality|accuracy|heldout_.*|eval_.*|.*_r2|.*_accuracy)$")
_DATA_KEYS = ("dataset", "datasets", "corpus", "relation")

A = TypeVar("A", bound="HubMixin")
#: The artifact classes by kind, filled as their modules are imported (this module imports none of them).
_CLASSES: dict[str, type[HubMixin]] = {}


class HubError(PatchscopeError, OSError):
    """An artifact that cannot be found, fetched or uploaded: a bad directory or Hub id, no network, no token."""


def is_hub_id(name: str) -> bool:
    """Whether ``name`` has the shape of a Hub repository id, ``owner/name``."""
    return bool(_HUB_ID.match(name)) and ".." not in name and "--" not in name


class HubMixin:
    """``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` for an artifact class with ``save`` and ``load``."""

    hub_kind: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.hub_kind:
            _CLASSES.setdefault(cls.hub_kind, cls)

    def save_pretrained(self, directory: str | Path, repo_id: str | None = None) -> Path:
        """Write the artifact and its model card ``README.md`` into ``directory`` (``repo_id`` goes in the card's snippet)."""
        return save_pretrained(self, directory, repo_id=repo_id)

    @classmethod
    def from_pretrained(
        cls: type[A],
        dir_or_hub_id: str | Path,
        revision: str | None = None,
        *,
        model: ModelHandle | None = None,
        target_model: ModelHandle | None = None,
        subfolder: str | None = None,
        repo_type: str | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
    ) -> A:
        """Load from a directory or a Hub id; with ``model`` (and, for a map, ``target_model``) given, refuse an
        artifact fitted on another model (:class:`~patchscopes.errors.MapProvenanceError`). See :func:`from_pretrained`."""
        artifact = from_pretrained(
            dir_or_hub_id,
            revision,
            model=model,
            target_model=target_model,
            subfolder=subfolder,
            repo_type=repo_type,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
        )
        if not isinstance(artifact, cls):
            raise HubError(
                f"{dir_or_hub_id} holds {_a(_TITLES[artifact.hub_kind][0])}, not {_a(_TITLES[cls.hub_kind][0])}; "
                f"load it with {type(artifact).__name__}.from_pretrained or patchscopes.hub.from_pretrained"
            )
        return artifact

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        subfolder: str | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
        endpoint: str | None = None,
    ) -> str:
        """Save into a temporary directory and upload it to model repository ``repo_id``; returns the commit URL."""
        return push_to_hub(
            self,
            repo_id,
            private=private,
            token=token,
            subfolder=subfolder,
            revision=revision,
            commit_message=commit_message,
            endpoint=endpoint,
        )


def resolve(
    dir_or_hub_id: str | Path,
    revision: str | None = None,
    *,
    subfolder: str | None = None,
    repo_type: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> Path:
    """The local directory of an artifact: ``dir_or_hub_id`` itself when it is a directory, else the snapshot of Hub
    repository ``dir_or_hub_id`` at ``revision`` (``huggingface_hub.snapshot_download``; the cache serves it offline)."""
    local = Path(dir_or_hub_id).expanduser()
    if local.is_dir():
        if revision is not None:
            raise HubError(f"{local} is a local directory, which has no revisions; drop revision={revision!r} or pass a Hub id")
        root = local
    else:
        repo_id = str(dir_or_hub_id)
        if not is_hub_id(repo_id):
            raise HubError(
                f"{repo_id!r} is neither a directory nor a Hub id of the form 'owner/name'; "
                "pass a directory written by save_pretrained or a Hub repository id"
            )
        from huggingface_hub import snapshot_download

        at = f" at revision {revision!r}" if revision else ""
        try:
            root = Path(
                snapshot_download(
                    repo_id,
                    revision=revision,
                    repo_type=repo_type,
                    cache_dir=cache_dir,
                    local_files_only=local_files_only,
                    token=token,
                    allow_patterns=f"{subfolder.strip('/')}/*" if subfolder else None,
                    library_name="patchscopes",
                    library_version=version(),
                )
            )
        except Exception as exc:  # huggingface_hub's own errors, network errors and validation errors alike
            raise HubError(
                f"could not get {repo_id!r}{at} from the Hugging Face Hub or its local cache ({type(exc).__name__}: {exc}); "
                "check the id and revision and that the Hub is reachable, or pass a local directory "
                "(there is none by that name here)"
            ) from exc
    found = root / subfolder if subfolder else root
    if not found.is_dir():
        raise HubError(f"{dir_or_hub_id} has no folder {subfolder!r}; pass the subfolder that holds the artifact")
    return found


def kind_of(directory: Path) -> str:
    """The artifact kind saved in ``directory`` (by its marker file), or ``"tuned-lens"`` for the tuned-lens format."""
    for marker, kind in MARKERS.items():
        if (directory / marker).is_file():
            return kind
    if (directory / "config.json").is_file() and (directory / "params.pt").is_file():
        return "tuned-lens"
    raise HubError(
        f"{directory} holds no patchscopes artifact (none of {', '.join(MARKERS)}) and no tuned lens "
        "(config.json + params.pt); pass the directory or repository that save_pretrained wrote"
    )


def load_directory(directory: str | Path) -> Any:
    """The artifact saved in ``directory``, of whichever kind it is."""
    path = Path(directory)
    kind = kind_of(path)
    if kind == "tuned-lens":
        return load_tuned_lens(path)
    return cast(Any, _registered(kind)).load(path)


def _registered(kind: str) -> type[HubMixin]:
    if kind not in _CLASSES:
        title, cls, module = _TITLES[kind]
        raise HubError(f"this is {_a(title)}; load it with {cls}.from_pretrained (import {cls} from {module})")
    return _CLASSES[kind]


def version() -> str:
    """The installed patchscopes version, as the model cards record it."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("patchscopes")
    except PackageNotFoundError:
        return "unknown"


def from_pretrained(
    dir_or_hub_id: str | Path,
    revision: str | None = None,
    *,
    model: ModelHandle | None = None,
    target_model: ModelHandle | None = None,
    subfolder: str | None = None,
    repo_type: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> Any:
    """Load the artifact of a directory or Hub id, whatever its kind (a tuned-lens lens loads as an ``AffineLens``).

    ``model`` is the model it is meant for (a map's source model; ``target_model`` defaults to it); given, an artifact
    fitted on another model, other weights, another width or depth raises :class:`~patchscopes.errors.MapProvenanceError`.
    ``revision`` (branch, tag or commit), ``subfolder``, ``repo_type``, ``cache_dir``, ``local_files_only`` and ``token``
    go to ``huggingface_hub.snapshot_download``.
    """
    directory = resolve(
        dir_or_hub_id,
        revision,
        subfolder=subfolder,
        repo_type=repo_type,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        token=token,
    )
    artifact = load_directory(directory)
    if model is not None:
        check_fitted_on(artifact, model, target_model, where=str(dir_or_hub_id))
    elif target_model is not None:
        raise MappingError("target_model= needs model= (the map's source model) too; pass both, or neither")
    return artifact


def check_fitted_on(artifact: Any, model: ModelHandle, target_model: ModelHandle | None = None, where: str = "") -> None:
    """Raise :class:`~patchscopes.errors.MapProvenanceError` unless ``artifact`` was fitted on ``model`` (name, weights
    sha256 where both are known, hidden size, depth); a map is checked from ``model`` to ``target_model`` (default ``model``)."""
    kind: str = artifact.hub_kind
    label = f"the {_TITLES[kind][0]}" + (f" {where}" if where else "")
    if target_model is not None and kind != "affine-map":
        raise MappingError(f"target_model= applies to affine maps only, and {label} is not one; drop it")
    if kind == "affine-map":
        artifact.check_provenance(model, target_model or model)
        return
    if kind == "affine-lens":
        first = next(iter(artifact.maps.values()))
        name, sha, width, blocks = artifact.model_name, first.metadata.get("source_weights_sha256"), first.d_in, artifact.n_layers
    else:
        meta = artifact.metadata
        name, sha = meta.get("model"), meta.get("weights_sha256")
        width = int((artifact.weight if kind == "lre" else artifact.vectors).shape[1])
        layers = [meta.get(k) for k in ("subject_layer", "object_layer")]
        blocks = max([layer + 1 for layer in layers if isinstance(layer, int)], default=0)
    if name is not None and name != model.name:
        raise MapProvenanceError(f"{label} was fitted on model {name!r}, not {model.name!r}; fit one for {model.name!r}")
    if sha and model.weights_sha256 and sha != model.weights_sha256:
        raise MapProvenanceError(
            f"{label} was fitted on weights {sha[:12]}…, but {model.name!r} has weights {model.weights_sha256[:12]}…; "
            "refit it for these weights"
        )
    if width != model.hidden_size:
        raise MapProvenanceError(
            f"{label} works on states of size {width}, but {model.name!r} has {model.hidden_size}; fit one for it"
        )
    if (blocks != model.n_layers) if kind == "affine-lens" else (blocks > model.n_layers):
        raise MapProvenanceError(
            f"{label} was fitted on a model of {blocks} blocks, but {model.name!r} has {model.n_layers}; fit one for it"
        )
    if kind == "affine-lens":  # and every map, on what it recorded
        for amap in artifact.maps.values():
            amap.check_provenance(model, model)


def save_pretrained(artifact: Any, directory: str | Path, repo_id: str | None = None) -> Path:
    """Write ``artifact`` (its kind's ``save`` layout) and a generated model card ``README.md`` into ``directory``."""
    from huggingface_hub import ModelCard

    path = Path(artifact.save(Path(directory)))
    ModelCard(model_card(artifact, repo_id)).save(str(path / "README.md"))
    return path


def push_to_hub(
    artifact: Any,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    subfolder: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    endpoint: str | None = None,
) -> str:
    """Upload ``artifact`` with its model card to model repository ``repo_id`` (created if missing), under
    ``subfolder`` when given, to branch ``revision`` (default ``main``); returns the commit URL."""
    from huggingface_hub import HfApi

    if not is_hub_id(repo_id):
        raise HubError(f"{repo_id!r} is not a Hub repository id; use 'owner/name', e.g. 'your-name/smol-affine-lens'")
    api = HfApi(endpoint=endpoint, token=token)
    title = _TITLES[artifact.hub_kind][0]
    with tempfile.TemporaryDirectory(prefix="patchscopes-hub-") as tmp:
        folder = save_pretrained(artifact, Path(tmp) / "artifact", repo_id=repo_id)
        try:
            api.create_repo(repo_id, exist_ok=True, private=private)
            info = api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                path_in_repo=subfolder,
                revision=revision,
                commit_message=commit_message or f"Upload {title} with patchscopes",
            )
        except Exception as exc:  # HTTP, authentication and connection errors of huggingface_hub and httpx
            raise HubError(
                f"could not push the {title} to {repo_id!r} on {api.endpoint} ({type(exc).__name__}: {exc}); "
                "log in with `hf auth login` or pass token=, check that you may write to that repository "
                "and that the Hub is reachable"
            ) from exc
    return str(getattr(info, "commit_url", info))


def _a(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value) if len(value) <= 12 else f"{len(value)} values"
    return "—" if value is None else str(value)


def _describe(artifact: Any) -> tuple[list[tuple[str, Any]], dict[str, Any], dict[str, Any]]:
    """Rows of the card's table, its metrics, and the metadata recorded in full."""
    kind = artifact.hub_kind
    if kind == "affine-lens":
        layers = sorted(artifact.maps, key=depth)
        metas = {str(layer): {k: v for k, v in artifact.maps[layer].metadata.items() if k != "path"} for layer in layers}
        first = next(iter(metas.values()))
        rows: list[tuple[str, Any]] = [
            ("Model", artifact.model_name),
            ("Weights sha256", first.get("source_weights_sha256")),
            ("Hidden size", artifact.maps[layers[0]].d_in),
            ("Layers", f"{', '.join(str(layer) for layer in layers)} → {first.get('target_layer')}"),
            ("Fit positions (per layer)", first.get("n_fit")),
            ("Fit texts", first.get("n_fit_texts")),
            ("Ridge", first.get("ridge")),
            ("Fit", first.get("fit", "least squares (patchscopes AffineLens.fit)")),
        ]
        metrics = {f"{k} (layer {layer})": v for layer, m in metas.items() for k, v in m.items() if _METRIC.match(k)}
        return rows, metrics, {"model": artifact.model_name, "layers": layers, "maps": metas}
    meta = dict(artifact.metadata)
    meta.pop("path", None)
    if kind == "affine-map":
        rows = [
            ("Source model", meta.get("source_model")),
            ("Source weights sha256", meta.get("source_weights_sha256")),
            ("Source layer", meta.get("source_layer")),
            ("Target model", meta.get("target_model")),
            ("Target weights sha256", meta.get("target_weights_sha256")),
            ("Target layer", meta.get("target_layer")),
            ("Size", f"{artifact.d_in} → {artifact.d_out}"),
            ("Fit positions", meta.get("n_fit")),
            ("Fit texts", meta.get("n_fit_texts")),
            ("Held-out texts / positions", f"{_fmt(meta.get('n_heldout_texts'))} / {_fmt(meta.get('n_heldout_positions'))}"),
            ("Corpus sha256", meta.get("corpus_sha256")),
            ("Ridge", meta.get("ridge")),
        ]
    else:
        vectors = artifact.weight if kind == "lre" else artifact.vectors
        rows = [
            ("Model", meta.get("model")),
            ("Weights sha256", meta.get("weights_sha256")),
            ("Hidden size", int(vectors.shape[1])),
            ("Subject layer", meta.get("subject_layer")),
            ("Object layer", meta.get("object_layer")),
            ("Aggregation", meta.get("aggregation")),
        ]
        if kind == "lre":
            rows.append(("Fit prompts", meta.get("n_prompts")))
        else:
            rows += [("Method", meta.get("method")), ("Rank", meta.get("rank")), ("Fit prompts", meta.get("n_train"))]
            rows.append(("Concepts", f"{len(artifact.names)}: {_fmt(artifact.names)}"))
            meta["names"] = artifact.names
    rows += [(key.capitalize(), meta[key]) for key in _DATA_KEYS if key in meta]
    return rows, {k: v for k, v in meta.items() if _METRIC.match(k)}, meta


def model_card(artifact: Any, repo_id: str | None = None) -> str:
    """The model card of ``artifact``: YAML front matter (``library_name: patchscopes``, tags, ``base_model`` when the
    model is a Hub id) and a body with its kind, models, weights hashes, layers, fit data, metrics and a load snippet."""
    from huggingface_hub import ModelCardData

    kind = artifact.hub_kind
    title, cls, module = _TITLES[kind]
    rows, metrics, meta = _describe(artifact)
    models = [str(v) for k, v in rows if k in ("Model", "Source model", "Target model") and v is not None]
    hub_models = list(dict.fromkeys(m for m in models if is_hub_id(m)))
    data = ModelCardData(
        library_name="patchscopes",
        tags=["patchscopes", "interpretability", kind],
        base_model=(hub_models[0] if len(hub_models) == 1 else hub_models) or None,
    )
    repo = repo_id or "<owner>/<name>"
    source = models[0] if models else "<model>"
    if kind == "affine-map":
        target = models[-1]
        load = (
            f'source, target = load_model("{source}"), load_model("{target}")\n'
            f'amap = AffineMap.from_pretrained("{repo}", model=source, target_model=target)'
        )
    else:
        name = {"affine-lens": "lens", "lre": "lre", "concepts": "concepts"}[kind]
        load = f'lm = load_model("{source}")\n{name} = {cls}.from_pretrained("{repo}", model=lm)'
    imports = (
        f"from patchscopes import {cls}, load_model"
        if module == "patchscopes"
        else f"from patchscopes import load_model\nfrom {module} import {cls}"
    )
    table = "\n".join(f"| {label} | {_fmt(value)} |" for label, value in [("Artifact", f"{title} (`{cls}`)"), *rows])
    metric_lines = "\n".join(f"- {k}: {_fmt(v)}" for k, v in metrics.items()) or "- none recorded"
    body = f"""# {title.capitalize()} for {source}

{_a(title).capitalize()} saved with patchscopes {version()}. `from_pretrained(..., model=lm)` refuses it for a model other than
the one it was fitted on: it checks the model's name, weights hash (when both are known), hidden size and depth.

| Field | Value |
|---|---|
{table}
| patchscopes version | {version()} |

## Metrics

{metric_lines}

## Load

```python
{imports}

{load}
```

## Metadata, as recorded at fit time

```json
{json.dumps(meta, indent=2, default=str)}
```
"""
    return f"---\n{data.to_yaml()}\n---\n\n{body}"


def load_tuned_lens(directory: str | Path) -> AffineLens:
    """An :class:`~patchscopes.lenses.AffineLens` from a tuned-lens project lens (``config.json`` + ``params.pt``).

    Translator ``i`` reads the model's ``hidden_states[i]`` (0: the embeddings, ``i``: block ``i − 1``) as
    ``h ↦ h + A_i h + b_i`` before the final norm and unembedding; here it is the map ``(I + A_i) h + b_i`` (equal up to
    float rounding). The last block, which that format leaves untranslated, gets the identity.
    """
    lens_class, map_class = cast(Any, _registered("affine-lens")), cast(Any, _registered("affine-map"))
    path = Path(directory)
    redo = "it needs config.json (with d_model and num_hidden_layers) and params.pt as the tuned-lens project saves them"
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        d, n = int(config["d_model"]), int(config["num_hidden_layers"])
        state = torch.load(path / "params.pt", map_location="cpu", weights_only=True)
        items = dict(state).items()
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, pickle.UnpicklingError) as exc:
        raise MappingError(f"{path} is not a readable tuned lens ({type(exc).__name__}: {exc}); {redo}") from None
    translators: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in items:  # "{i}.weight" (the translators' own state dict) or "layer_translators.{i}.weight" (older)
        found = re.fullmatch(r"(?:layer_translators\.)?(\d+)\.(weight|bias)", str(key))
        if found and isinstance(value, torch.Tensor):
            translators.setdefault(int(found[1]), {})[found[2]] = value.float()
    complete = sorted(i for i, t in translators.items() if "weight" in t and t["weight"].shape == (d, d))
    if complete != list(range(n)):
        raise MappingError(
            f"{path / 'params.pt'} holds translators {complete}, but config.json asks for {n} of size {d}×{d}; {redo}"
        )
    base = config.get("base_model_name_or_path")
    meta = {"source_model": base, "target_model": base, "target_layer": n - 1, "fit": "tuned-lens", "tuned_lens_config": config}
    eye, maps = torch.eye(d), {}
    for i, t in sorted(translators.items()):
        layer: Location = "embeddings" if i == 0 else i - 1
        maps[layer] = map_class(t["weight"] + eye, t.get("bias", torch.zeros(d)), {**meta, "source_layer": layer})
    maps[n - 1] = map_class(eye, torch.zeros(d), {**meta, "source_layer": n - 1})
    return cast("AffineLens", lens_class(maps, model_name=base))

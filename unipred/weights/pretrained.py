"""Weights that travel: ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` for any modality.

A model folder holds ``model.safetensors`` (our parameter names), ``config.json`` (everything
needed to rebuild the model: the tokenizer's registered name and arguments, the predictor,
the head) and ``README.md`` (a model card: the training config, the recipe and the
evaluation table of that checkpoint). ``from_pretrained`` takes such a folder, a Hub repo id
(downloaded through huggingface_hub, so its cache layout, ``HF_HUB_OFFLINE=1`` and
``local_files_only`` are honoured), or an official NEPA folder (``model_type: vit_nepa``).

``unipred export CKPT OUT [--ema] [--push REPO_ID]`` turns a training checkpoint into such a
folder, rebuilding the model from the run config stored in the checkpoint (``--timm``: timm's
own folder instead, :mod:`unipred.weights.timm_export`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from unipred.nn.saving import WEIGHTS_IO, PretrainedMixin  # noqa: F401 (old home of the mixin)
from unipred.train.formats import MODEL_FOLDERS

FORMAT = "unipred-nepa"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CARD = "README.md"


class PretrainedError(ValueError):
    """A model folder or repo that cannot be loaded; the message names the file and key."""


def _hub():
    from unipred.base.extras import require

    return require("huggingface_hub", "hub", "loading from or pushing to the Hugging Face Hub")


# ------------------------------------------------------------------------------- config
def config_to_dict(cfg) -> dict[str, Any]:
    """ModelConfig -> the ``config.json`` dict (JSON types only)."""
    from unipred._version import __version__

    d = dataclasses.asdict(cfg)
    tok = d.pop("tokenizer")
    return {
        "library_name": "unipred",
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "unipred_version": __version__,
        "tokenizer": tok,
        **json.loads(json.dumps(d, default=list)),
    }


def config_from_dict(d: dict, source: str = CONFIG):
    """The ``config.json`` dict -> ModelConfig; unknown or missing fields are named."""
    from unipred.nn.model import ModelConfig
    from unipred.nn.predictor import PredictorConfig

    if d.get("format") != FORMAT:
        raise PretrainedError(f"{source}: not a unipred model config (format={d.get('format')!r})")
    if int(d.get("format_version", 0)) > FORMAT_VERSION:
        raise PretrainedError(
            f"{source}: format_version {d['format_version']} is newer than this unipred "
            f"understands ({FORMAT_VERSION}); upgrade unipred"
        )
    mfields = {f.name for f in dataclasses.fields(ModelConfig)}
    pfields = {f.name for f in dataclasses.fields(PredictorConfig)}
    body = {k: v for k, v in d.items() if k in mfields}
    missing = sorted({"tokenizer", "predictor"} - set(body))
    if missing:
        raise PretrainedError(f"{source}: missing key(s) {missing}")
    pred = dict(body.pop("predictor"))
    unknown = sorted(set(pred) - pfields)
    if unknown:
        raise PretrainedError(f"{source}: unknown predictor key(s) {unknown} (newer unipred?)")
    if isinstance(body.get("objective"), dict):  # the pretraining objective's switches
        from unipred.nn.objectives import ObjectiveConfig

        ofields = {f.name for f in dataclasses.fields(ObjectiveConfig)}
        bad = sorted(set(body["objective"]) - ofields)
        if bad:
            raise PretrainedError(f"{source}: unknown objective key(s) {bad} (newer unipred?)")
        body["objective"] = ObjectiveConfig(**body["objective"])
    return ModelConfig(**{**body, "predictor": PredictorConfig(**pred)})


# ------------------------------------------------------------------------------ saving
def _atomic_write(dest: Path, write) -> None:
    from unipred.base.atomic import atomic_write

    atomic_write(dest, write)  # the user's umask (0644 under 022), never mkstemp's 0600


def save_pretrained(
    model,
    folder: str | os.PathLike,
    *,
    training_config: str | dict | None = None,
    recipe: dict | None = None,
    evaluation: dict | None = None,
    weights: str = "raw",
) -> Path:
    """Write ``model.safetensors``, ``config.json`` and a ``README.md`` model card."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"format": "pt", "unipred_format": FORMAT, "weights": weights}
    _atomic_write(folder / WEIGHTS, lambda f: save_file(sd, f, metadata=meta))
    cfg = config_to_dict(model.cfg)
    cfg["weights"] = weights
    cfg["n_parameters"] = sum(p.numel() for p in model.parameters())
    _atomic_write(folder / CONFIG, lambda f: Path(f).write_text(json.dumps(cfg, indent=2) + "\n"))
    card = model_card(model, cfg, training_config, recipe, evaluation)
    _atomic_write(folder / CARD, lambda f: Path(f).write_text(card))
    return folder


def model_card(model, cfg: dict, training_config=None, recipe=None, evaluation=None) -> str:
    """The README.md of a model folder (Hub metadata header + Markdown)."""
    pc = cfg["predictor"]
    tags = ["unipred", "nepa", "self-supervised", f"tokenizer-{cfg['tokenizer']}"]
    head = cfg.get("head") or "none (pretraining: next-embedding prediction)"
    lines = [
        "---",
        "library_name: unipred",
        "license: apache-2.0",
        "tags:",
        *[f"- {t}" for t in tags],
        "---",
        "",
        f"# NEPA model ({cfg['tokenizer']} tokenizer, width {pc['dim']}, depth {pc['depth']})",
        "",
        "Pretrained with unipred (next-embedding prediction, NEPA). Load it with:",
        "",
        "```python",
        "from unipred import NEPA",
        'model = NEPA.from_pretrained("THIS_REPO_OR_FOLDER")',
        "```",
        "",
        "## Architecture",
        "",
        "| | |",
        "|---|---|",
        f"| tokenizer | `{cfg['tokenizer']}` {json.dumps(cfg.get('tokenizer_args', {}))} |",
        f"| width / depth / heads | {pc['dim']} / {pc['depth']} / {pc['heads']} |",
        f"| MLP | {pc['mlp']}, ratio {pc['mlp_ratio']} |",
        f"| attention | {'causal' if pc['causal'] else 'bidirectional'}, QK-norm "
        f"{'on' if pc['qk_norm'] else 'off'}, {pc['coord_dims']}-D RoPE (theta {pc['rope_theta']}) |",
        f"| head | {head} |",
        f"| parameters | {cfg.get('n_parameters', 0):,} |",
        f"| weights | {cfg.get('weights', 'raw')} |",
        "",
        "## Evaluation",
        "",
    ]
    if evaluation and evaluation.get("rows"):
        from unipred.protocols.report import rows_table

        lines += [
            "Frozen-backbone protocols of `unipred evaluate-suite` on this checkpoint "
            f"({evaluation.get('meta', {}).get('config', '')}):",
            "",
            *rows_table(evaluation["rows"]),
        ]
    else:
        lines.append("Not evaluated (run `unipred evaluate-suite CONFIG ckpt=...` and export "
                     "again to fill this table).")  # fmt: skip
    lines += ["", "## Recipe", ""]
    if recipe:
        lines += ["| | |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in recipe.items() if not isinstance(v, dict)]
    else:
        lines.append("Not recorded.")
    lines += ["", "## Training config", ""]
    if training_config:
        if isinstance(training_config, dict):
            from omegaconf import OmegaConf

            training_config = OmegaConf.to_yaml(OmegaConf.create(training_config))
        lines += ["```yaml", training_config.rstrip(), "```"]
    else:
        lines.append("Not recorded.")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- loading
def for_inference(loader):
    """The one rule of every loader (released folders, our folders, the Hub, torch.hub, a
    training checkpoint read for inference): the model comes back in eval mode, so no drop
    path and no RoPE coordinate augmentation change its outputs and two calls on one input
    agree. Decorates a function returning a model or a tuple whose first item is one.
    Training code that wants train mode calls ``.train()`` (Lightning does)."""
    import functools

    @functools.wraps(loader)
    def wrapped(*args, **kwargs):
        out = loader(*args, **kwargs)
        (out[0] if isinstance(out, tuple) else out).eval()
        return out

    return wrapped


def resolve_folder(
    src: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> Path:
    """A local folder as is; otherwise a Hub repo id, fetched into (or found in) the Hub cache."""
    p = Path(src).expanduser()
    if p.is_dir():
        return p
    s = str(src)
    if p.exists() or s.startswith((".", "/", "~")) or s.count("/") > 1:
        raise PretrainedError(f"{src}: not a model folder (expected a folder or a repo id)")
    hub = _hub()
    try:
        path = hub.snapshot_download(
            repo_id=s,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
            allow_patterns=["*.json", "*.safetensors", "*.bin", "*.md"],
        )
    except Exception as e:  # noqa: BLE001 - the Hub client raises many kinds: name the reason
        raise PretrainedError(f"{src}: {hub_reason(e, local_files_only, cache_dir)}") from None
    return Path(path)


def _offline(local_files_only: bool = False) -> bool:
    """HF_HUB_OFFLINE=1 (read now: the Hub client reads it once, at import) or local_files_only."""
    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    return bool(local_files_only or flag)


def hub_reason(e: BaseException, local_files_only: bool = False, cache_dir=None) -> str:
    """Why a Hub download or upload failed, in words: a malformed repo id, offline mode, no
    network, a repo that does not exist (or is private), or what the Hub answered."""
    hub = _hub()
    errors = hub.errors
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    names = {c.__name__ for c in type(e).__mro__}
    cache = cache_dir or hub.constants.HF_HUB_CACHE
    if isinstance(e, errors.HFValidationError):
        return f"not a valid Hugging Face repo id ({first})"
    if isinstance(e, errors.OfflineModeIsEnabled) or (
        isinstance(e, errors.LocalEntryNotFoundError) and _offline(local_files_only)
    ):
        return (f"offline mode (HF_HUB_OFFLINE=1 or local_files_only): not in the Hugging Face "
                f"cache ({cache}) and not downloaded")  # fmt: skip
    if isinstance(e, errors.LocalEntryNotFoundError) or names & {
        "ConnectError", "ConnectionError", "NetworkError", "TimeoutException", "ConnectTimeout",
    }:  # fmt: skip
        return (f"the Hugging Face Hub could not be reached (no network?) and it is not in "
                f"the cache ({cache})")  # fmt: skip
    if isinstance(e, errors.LocalTokenNotFoundError):
        return "not logged in to the Hub (run `hf auth login` or set HF_TOKEN)"
    if isinstance(e, errors.RepositoryNotFoundError):
        return "no such repo on the Hub (or it is private: log in or pass token=)"
    if isinstance(e, errors.HfHubHTTPError):
        return f"the Hub refused: {first}"
    return f"{type(e).__name__}: {first}"


@for_inference
def load_pretrained(src, *, cls=None, map_location="cpu", **hub_kwargs):
    """Build and load a model from a folder or repo id (ours or the official NEPA layout)."""
    from unipred.nn.model import NEPA

    cls = cls or NEPA
    folder = resolve_folder(src, **hub_kwargs)
    cfg_path = folder / CONFIG
    if not cfg_path.is_file():
        raise PretrainedError(f"{folder}: no {CONFIG}")
    try:
        d = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise PretrainedError(f"{cfg_path}: not valid JSON ({e})") from None
    if d.get("model_type") == "vit_nepa":  # a released NEPA checkpoint
        from unipred.weights.hub import load_official_nepa

        return load_official_nepa(folder)
    cfg = config_from_dict(d, str(cfg_path))
    try:
        model = cls(cfg)
    except KeyError as e:  # an unregistered tokenizer (a plugin that is not installed)
        raise PretrainedError(f"{cfg_path}: {e.args[0]}") from None
    wpath = folder / WEIGHTS
    if not wpath.is_file():
        raise PretrainedError(f"{folder}: no {WEIGHTS}")
    from safetensors.torch import load_file

    from unipred.train.checkpoint import check_state_dict

    try:
        sd = load_file(str(wpath), device=str(map_location))
    except Exception as e:  # noqa: BLE001 - truncated or foreign files raise many types
        raise PretrainedError(f"{wpath}: cannot read ({type(e).__name__}: {e})") from None
    check_state_dict(wpath, sd, model.state_dict())
    model.load_state_dict(sd)
    return model


def push_to_hub(model, repo_id: str, *, private: bool | None = None, token=None,
                commit_message: str = "Upload unipred model", revision=None, **card):  # fmt: skip
    """Save ``model`` into a temporary folder and upload it to ``repo_id`` (created if needed)."""
    hub = _hub()
    api = hub.HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, **card)
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id, folder_path=tmp, commit_message=commit_message,
            revision=revision,
        )  # fmt: skip


# the model layer's NEPA.save_pretrained / from_pretrained / push_to_hub and the training
# layer's model-folder reader (eval ckpt=FOLDER) call these: this layer sits above both
WEIGHTS_IO.update(save=save_pretrained, load=load_pretrained, push=push_to_hub)
MODEL_FOLDERS["pretrained"] = load_pretrained


# ------------------------------------------------------------------ checkpoints -> folder
def run_config_of(ckpt: dict, source: str):
    """The RunConfig stored in a training checkpoint (``unipred_config``)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from unipred.train.config import schema_for

    d = ckpt.get("unipred_config")
    if not d:
        raise PretrainedError(f"{source}: missing key 'unipred_config' (not a unipred run)")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema_for(d["task"])), d)
        return OmegaConf.to_object(merged)
    except (OmegaConfBaseException, KeyError) as e:
        raise PretrainedError(f"{source}: stored run config does not load ({e})") from None


@for_inference
def model_from_checkpoint(path, ema: bool = False):
    """(model, run config, checkpoint dict) of a training checkpoint, raw or EMA weights."""
    from unipred.base.registry import TASKS
    from unipred.train.checkpoint import CheckpointError, check_state_dict, read_checkpoint

    ckpt = read_checkpoint(path)
    cfg = run_config_of(ckpt, str(path))
    model = TASKS.get(cfg.task)(cfg).build_model()
    if ema:
        sd = ckpt.get("ema_state_dict")
        if sd is None:
            raise CheckpointError(f"{path}: missing key 'ema_state_dict' (asked for --ema)")
    else:
        sd = {k[6:]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    check_state_dict(path, sd, model.state_dict())
    model.load_state_dict(sd)
    return model, cfg, ckpt


def export_checkpoint(path, out, *, ema: bool = False, evaluation: str | None = None,
                      push: str | None = None) -> Path:  # fmt: skip
    """A training checkpoint -> a save_pretrained folder (and optionally the Hub)."""
    from unipred.protocols import suite_folder
    from unipred.protocols.report import read_results
    from unipred.train.checkpoint import non_finite_key
    from unipred.train.config import to_yaml

    model, cfg, ckpt = model_from_checkpoint(path, ema)
    weights = "ema" if ema else "raw"
    bad = non_finite_key(model.state_dict())
    if bad is not None:  # exported as they are (a diverged run is still worth looking at)
        print(f"unipred export: warning: {path}: key '{bad}' holds NaN or infinite values "
              "(a diverged run?); exported as they are", file=sys.stderr)  # fmt: skip
    ev_path = Path(evaluation) if evaluation else suite_folder(str(path)) / "results.json"
    ev = None
    if ev_path.is_file():
        ev = read_results(ev_path)  # rows with fractions, from either file format
        # this weight set's rows and its baselines' (random init, raw input, the source's)
        keep = (weights, "random", "input", "input_flat", "data")
        ev["rows"] = [r for r in ev.get("rows", []) if r.get("weights") in keep]
    elif evaluation:
        raise PretrainedError(f"--eval {evaluation}: file not found")
    card = {"training_config": to_yaml(cfg), "recipe": ckpt.get("recipe") or None,
            "evaluation": ev, "weights": weights}  # fmt: skip
    folder = model.save_pretrained(out, **card)
    if push:
        try:
            model.push_to_hub(push, **card)
        except Exception as e:  # noqa: BLE001 - network, auth, a bad id: one line, the reason
            raise PretrainedError(
                f"{folder} was written, but pushing it to {push} failed: {hub_reason(e)}"
            ) from None
    return folder


def export_timm_checkpoint(path, out, *, ema: bool = False, bidirectional: bool = False,
                           image_size: int = 0) -> Path:  # fmt: skip
    """A training checkpoint -> timm's own folder (``timm.create_model("local-dir:OUT",
    pretrained=True)``), for image models whose layout timm's ViT holds."""
    from unipred.weights.timm_export import export_timm

    model, cfg, _ = model_from_checkpoint(path, ema)
    size = image_size or int(getattr(cfg.data, "image_size", 0) or 0) or 224
    try:
        return export_timm(model, out, bidirectional=bidirectional, image_size=size)
    except ValueError as e:  # what timm's ViT cannot hold, each reason named
        hint = " (add --bidirectional)" if "bidirectional=True" in str(e) else ""
        raise PretrainedError(f"{path}: {e}{hint}") from None


def main(argv: list[str]) -> int:
    """``unipred export CKPT OUT``: a training checkpoint -> a from_pretrained folder (or,
    with --timm, timm's own folder)."""
    ap = argparse.ArgumentParser(prog="unipred export", description=main.__doc__)
    ap.add_argument("ckpt", help="a training checkpoint (e.g. runs/x/checkpoints/last.ckpt)")
    ap.add_argument("out", help="output folder")
    ap.add_argument("--ema", action="store_true", help="export the EMA weights")
    ap.add_argument("--eval", default=None,
                    help="evaluate-suite results.json (default: <run>/eval/results.json)")  # fmt: skip
    ap.add_argument("--push", default=None, metavar="REPO_ID", help="also upload to the Hub")
    ap.add_argument("--timm", action="store_true",
                    help="write timm's folder instead: timm.create_model('local-dir:OUT', "
                         "pretrained=True) loads it (image models; docs/hub.md)")  # fmt: skip
    ap.add_argument(
        "--bidirectional",
        action="store_true",
        help="with --timm: export a causal model's bidirectional forward",
    )
    ap.add_argument("--image-size", type=int, default=0,
                    help="with --timm: the input size its pretrained_cfg names (default: the "
                         "run's data.image_size, else 224)")  # fmt: skip
    a = ap.parse_args(argv)
    try:
        if a.timm:
            if a.push or a.eval:
                raise PretrainedError("--timm writes a local folder only (no --push / --eval)")
            folder = export_timm_checkpoint(a.ckpt, a.out, ema=a.ema,
                                            bidirectional=a.bidirectional,
                                            image_size=a.image_size)  # fmt: skip
        elif a.bidirectional or a.image_size:
            raise PretrainedError("--bidirectional and --image-size go with --timm")
        else:
            folder = export_checkpoint(a.ckpt, a.out, ema=a.ema, evaluation=a.eval, push=a.push)
    except PretrainedError as e:
        print(f"unipred export: error: {e}", file=sys.stderr)
        return 2
    kind = "timm folder" if a.timm else "folder"
    print(f"exported {a.ckpt} ({'ema' if a.ema else 'raw'} weights) -> {kind} {folder}")
    return 0

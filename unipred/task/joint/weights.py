"""Joint checkpoint -> single-modality init: ``model.init=pretrain:PATH@SOURCE`` keeps the
shared predictor and that source's tokenizer."""

from __future__ import annotations

from unipred.train.formats import STATE_ADAPTERS


# ------------------------------------------------------------- joint -> single-modality init
def is_joint_state(sd: dict) -> bool:
    return any(k.startswith("tokenizer.tokenizers.") for k in sd)


def single_from_joint(model, sd: dict, where, source: str = "") -> dict:
    """A joint state dict -> the state dict of ``model`` (a single-modality NEPA): the chosen
    source's tokenizer becomes ``tokenizer.*``, its modality embedding is folded into the
    tokenizer's projection bias (adding a constant to every token is exactly that), the other
    sources are dropped. The source is ``source`` or the only one whose tokenizer tensors fit
    ``model``'s. Refuses a model whose RoPE layout differs from the one pretrained."""
    from unipred.train.checkpoint import CheckpointError

    names = sorted({k.split(".")[2] for k in sd if k.startswith("tokenizer.tokenizers.")})
    want = {k[len("tokenizer.") :]: v for k, v in model.state_dict().items()
            if k.startswith("tokenizer.")}  # fmt: skip

    def tok_of(n):
        pre = f"tokenizer.tokenizers.{n}."
        return {k[len(pre) :]: v for k, v in sd.items() if k.startswith(pre)}

    def fits(n):
        t = tok_of(n)
        return t.keys() == want.keys() and all(t[k].shape == want[k].shape for k in t)

    if source:
        if source not in names:
            raise CheckpointError(f"{where}: no joint source {source!r} (it has {names})")
        if not fits(source):
            raise CheckpointError(
                f"{where}: the tokenizer of joint source {source!r} does not fit this model's "
                f"{type(model.tokenizer).__name__} (keys or shapes differ)"
            )
    else:
        ok = [n for n in names if fits(n)]
        if len(ok) != 1:
            what = "none" if not ok else f"{ok}: add @SOURCE to model.init"
            raise CheckpointError(
                f"{where}: joint checkpoint with sources {names}; whose tokenizer fits this "
                f"model's {type(model.tokenizer).__name__}: {what}"
            )
        source = ok[0]
    layout = sd.get(f"tokenizer.layout_{source}")
    if layout is not None:
        space, axes = int(layout[0]), [int(a) for a in layout[1:]]
        pc = model.predictor.cfg
        have = list(pc.rope_axes) if pc.rope_axes is not None else list(range(pc.coord_dims))
        if pc.rope_dims != space or have != axes:
            raise CheckpointError(
                f"{where}: joint source {source!r} was pretrained with its coordinates on RoPE "
                f"axes {axes} of {space}; set model.predictor.rope_space={space} "
                f"model.predictor.rope_axes=[{','.join(map(str, axes))}]"
            )
    out = {k: v for k, v in sd.items() if not k.startswith("tokenizer.")}
    out.update({f"tokenizer.{k}": v for k, v in tok_of(source).items()})
    emb = sd.get(f"tokenizer.modality.{source}")
    if emb is not None:
        if "tokenizer.proj.bias" not in out:
            raise CheckpointError(
                f"{where}: source {source!r} has a modality embedding but this model's "
                "tokenizer has no tokenizer.proj.bias to fold it into"
            )
        out["tokenizer.proj.bias"] = out["tokenizer.proj.bias"] + emb.to(
            out["tokenizer.proj.bias"].dtype
        )
    print(f"model.init: joint checkpoint, source {source!r} of {names}")
    return out


# model.init=pretrain:JOINT_CKPT@SOURCE: the training layer converts through this entry
STATE_ADAPTERS["joint"] = (is_joint_state, single_from_joint)

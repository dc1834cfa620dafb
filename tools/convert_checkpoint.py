#!/usr/bin/env python
"""Convert a megaclip checkpoint (any world size, any ZeRO stage) for downstream use:

  safetensors  the whole model (fp32) as model.safetensors, the EMA teacher (if the run had one)
               as ema_teacher.safetensors, and the resolved config.yaml beside them
  open_clip    open_clip_model.safetensors and its model config megaclip_<preset>.json, with the
               SentencePiece tokenizer (spm.model) and megaclip_tokenizer.py that gives megaclip's
               token ids; load with open_clip.add_model_config + create_model_and_transforms
  timm         the image encoder (--encoder student or teacher) as timm_vit.safetensors for a
               timm VisionTransformer with num_classes=0; the create_model call is printed and
               written to timm_vit.json
  hf           a transformers folder hf/ (config.json, model.safetensors, tokenizer.json): CLIPModel
               for a model with model.vision.pre_norm=true (transformers' CLIP always has that
               LayerNorm; without it the format is refused), SiglipModel for SigLIP's towers
               (model.vision.pool=map ...), with a tokenizer that gives megaclip's token ids

The shards are read lazily: memory holds one copy of what is written at a time. --verify loads
each output in its library, embeds a random batch there and in megaclip, prints the largest
absolute difference, and exits 1 above --tolerance. The export is written beside --out and
renamed into place when whole: a folder that is not empty is refused unless
--force, which replaces it whole. The tokenizer copied for open_clip must be the file the
checkpoint was trained with (its sha256, recorded in the checkpoint, is compared)."""
from __future__ import annotations

import argparse
import json
import os
import sys

if __package__ in (None, ""):  # run as a script: the package beside it, not an installed one
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megaclip.errors import FatalError, UserError, run_cli  # noqa: E402

FORMATS = ("safetensors", "timm", "open_clip", "hf")
DEFAULT_FORMATS = ("safetensors", "timm", "open_clip")
EXAMPLE = """examples:
  python tools/convert_checkpoint.py runs/demo --out exported --verify        # newest checkpoint
  python tools/convert_checkpoint.py runs/demo/checkpoints/step00000400 --out exported \\
      --formats timm --encoder teacher
  python tools/convert_checkpoint.py runs/demo --out exported --formats open_clip --verify
  python tools/convert_checkpoint.py runs/demo --out exported --force  # replace an export
  python tools/convert_checkpoint.py runs/demo --out exported_hf --formats hf --verify
then, in open_clip (the model name is the config file's name):
  import open_clip, sys; open_clip.add_model_config("exported/megaclip_tiny.json")
  model, _, preprocess = open_clip.create_model_and_transforms(
      "megaclip_tiny", pretrained="exported/open_clip_model.safetensors")
  sys.path.insert(0, "exported"); from megaclip_tokenizer import tokenize
and in timm:
  import json, timm; spec = json.load(open("exported/timm_vit.json"))
  model = timm.create_model(spec["arch"], pretrained=True,
                            pretrained_cfg_overlay=dict(file="exported/timm_vit.safetensors"),
                            **spec["kwargs"])
and in transformers (no custom code; pad to the context length as megaclip does):
  from transformers import AutoTokenizer, CLIPModel
  model = CLIPModel.from_pretrained("exported_hf/hf")
  inputs = AutoTokenizer.from_pretrained("exported_hf/hf")(
      captions, padding="max_length", truncation=True, return_tensors="pt")
"""


def find_checkpoint(path: str) -> str:
    """A step directory as is; a run or checkpoints directory: its newest complete checkpoint."""
    from megaclip.checkpoint.folder import is_complete, latest_checkpoint
    path = os.path.abspath(path.rstrip("/"))
    if is_complete(path):
        return path
    for root in (os.path.join(path, "checkpoints"), path):
        found = latest_checkpoint(root) if os.path.isdir(root) else None
        if found:
            return os.path.join(root, found)
    raise UserError(f"'{path}' is neither a complete checkpoint nor a run or checkpoints "
                    f"directory holding one")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="tools/convert_checkpoint.py", description=__doc__,
                                epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint (.../stepNNNNNNNN), or a run directory or its "
                                      "checkpoints/ (the newest complete checkpoint)")
    p.add_argument("--out", required=True, help="output directory (new or empty; see --force)")
    p.add_argument("--force", action="store_true",
                   help="replace a non-empty --out whole (renamed aside, removed once the new "
                        "export is in place)")
    p.add_argument("--formats", default=",".join(DEFAULT_FORMATS),
                   help=f"comma separated, of {', '.join(FORMATS)} (default: "
                        f"{','.join(DEFAULT_FORMATS)})")
    p.add_argument("--encoder", choices=("student", "teacher"), default="student",
                   help="which image encoder the timm export holds (default: student)")
    p.add_argument("--verify", action="store_true",
                   help="load each output in its library and compare embeddings with megaclip's")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest absolute difference --verify accepts (default: 1e-4)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    formats = [f for f in args.formats.split(",") if f]
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise UserError(f"--formats: unknown {unknown or 'empty'}; choose from {', '.join(FORMATS)}")
    from megaclip.checkpoint.inference import checkpoint_config
    from megaclip.outputs import check_out, output_folder
    from megaclip.teacher.state import TEACHER_DIR

    tag_dir = find_checkpoint(args.checkpoint)
    check_out([args.out], args.force, inputs=[tag_dir])
    cfg = checkpoint_config(tag_dir)
    has_teacher = os.path.isdir(os.path.join(tag_dir, TEACHER_DIR))
    if "timm" in formats and args.encoder == "teacher" and not has_teacher:
        raise UserError(f"{tag_dir} has no EMA teacher (objective.preset "
                        f"'{cfg.objective.preset}'); use --encoder student")
    if "hf" in formats:
        from megaclip.checkpoint.hf_export import hf_architecture
        hf_architecture(cfg)  # refused before anything is read or written
    if "open_clip" in formats:
        from megaclip.checkpoint.convert import open_clip_model_config
        try:
            open_clip_model_config(cfg.model, cfg.objective.contrastive, eos_id=0, pad_id=0)
        except ValueError as e:
            raise UserError(f"--formats open_clip: {e}") from None
    if "open_clip" in formats or "hf" in formats:
        check_export_tokenizer(tag_dir, cfg)
    print(f"converting {tag_dir} ({cfg.model.preset}, objective {cfg.objective.preset})")
    with output_folder(args.out, args.force, inputs=[tag_dir]) as out:
        written, checks = export(args, formats, tag_dir, cfg, out, has_teacher)
    print(f"wrote {', '.join(written)} to {args.out}")
    failed = [name for name, diff in checks if not diff <= args.tolerance]
    for name, diff in checks:
        print(f"verify {name}: largest absolute difference {diff:.3g} "
              f"({'ok' if diff <= args.tolerance else 'ABOVE'} tolerance {args.tolerance:g})")
    if failed:
        raise FatalError(f"--verify: {', '.join(failed)} differ from megaclip by more than "
                         f"{args.tolerance:g}")
    return 0


def check_export_tokenizer(tag_dir: str, cfg) -> None:
    """The tokenizer the export copies is the one the checkpoint was trained with (an error
    naming both otherwise; a warning for a checkpoint that does not record it)."""
    from megaclip.checkpoint.train_state import check_tokenizer
    if not os.path.isfile(cfg.data.tokenizer):
        raise UserError(f"the run's tokenizer {cfg.data.tokenizer} is missing; open_clip and hf "
                        f"need it")
    for warning in check_tokenizer(tag_dir, cfg.data.tokenizer,
                                   advice=f"put the one it was trained with back at "
                                          f"{cfg.data.tokenizer} to export it"):
        print(warning, file=sys.stderr)


def export(args, formats: list[str], tag_dir: str, cfg, out: str, has_teacher: bool):
    """Write every format of ``formats`` into ``out`` (verified there with --verify); returns
    (the names written, [(format, largest difference)])."""
    import json

    from safetensors.torch import save_file

    from megaclip.checkpoint import convert
    from megaclip.checkpoint.io import consolidate
    from megaclip.config import save_resolved
    from megaclip.teacher.state import consolidate_teacher
    written, checks = [], []

    if "safetensors" in formats:
        state = consolidate(tag_dir, keep=lambda k: True)
        save_file(convert.safetensors_state(state), os.path.join(out, "model.safetensors"))
        written.append("model.safetensors")
        del state
        if has_teacher:
            save_file(convert.safetensors_state({}, consolidate_teacher(tag_dir)),
                      os.path.join(out, "ema_teacher.safetensors"))
            written.append("ema_teacher.safetensors")
        save_resolved(cfg, os.path.join(out, "config.yaml"))
        written.append("config.yaml")
        if args.verify:
            checks.append(("safetensors", verify_safetensors(out, tag_dir)))
    if "timm" in formats:
        if args.encoder == "teacher":
            trunk = convert.timm_vision(consolidate_teacher(tag_dir), teacher=True)
        else:
            trunk = convert.timm_vision(consolidate(
                tag_dir, keep=lambda k: k.startswith(convert.STUDENT_TRUNK)))
        arch, kwargs = convert.timm_create_kwargs(cfg.model)
        save_file(convert.safetensors_state(trunk), os.path.join(out, "timm_vit.safetensors"))
        with open(os.path.join(out, "timm_vit.json"), "w") as f:
            json.dump({"arch": arch, "kwargs": kwargs, "encoder": args.encoder}, f, indent=1)
        written += ["timm_vit.safetensors", "timm_vit.json"]
        call = ", ".join([repr(arch)] + [f"{k}={v!r}" for k, v in kwargs.items()])
        print(f"timm: timm.create_model({call}, pretrained=True, pretrained_cfg_overlay="
              f"dict(file='{os.path.join(args.out, 'timm_vit.safetensors')}'))")
        if args.verify:
            checks.append((f"timm ({args.encoder})", verify_timm(out, tag_dir, args.encoder)))
    if "open_clip" in formats:
        written += export_open_clip(out, tag_dir, cfg, shown=args.out)
        if args.verify:
            checks.append(("open_clip", verify_open_clip(out, tag_dir)))
    if "hf" in formats:
        from megaclip.checkpoint.hf_export import export_hf, verify_hf
        os.mkdir(os.path.join(out, "hf"))  # beside safetensors' own model.safetensors
        written += [f"hf/{name}" for name in export_hf(os.path.join(out, "hf"), tag_dir, cfg,
                                                       shown=os.path.join(args.out, "hf"))]
        if args.verify:
            checks.append(("hf", verify_hf(os.path.join(out, "hf"), tag_dir)))
    return written, checks


def export_open_clip(out: str, tag_dir: str, cfg, shown: str = "") -> list[str]:
    """open_clip weights, model config, tokenizer model and tokenizer module; the names.
    ``shown``: the folder the printed call names (``out`` until it is renamed there)."""
    import shutil

    from safetensors.torch import save_file

    from megaclip.checkpoint import convert
    from megaclip.checkpoint.io import consolidate
    from megaclip.data.tokenizer import Tokenizer
    if not os.path.isfile(cfg.data.tokenizer):
        raise UserError(f"the run's tokenizer {cfg.data.tokenizer} is missing; open_clip needs it")
    tok = Tokenizer(cfg.data.tokenizer, cfg.model.text.context_length)
    skip = ("text.mask_embedding", "patch_decoder.", "distill_head.", "global_head.",
            "text_decoder.")
    state = consolidate(tag_dir, keep=lambda k: not k.startswith(skip))
    save_file(convert.open_clip_state(state, cfg.model),
              os.path.join(out, "open_clip_model.safetensors"))
    del state
    name = f"megaclip_{cfg.model.preset}"
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(convert.open_clip_model_config(cfg.model, cfg.objective.contrastive,
                                                 tok.eos_id, tok.pad_id), f, indent=1)
    shutil.copyfile(cfg.data.tokenizer, os.path.join(out, "spm.model"))
    with open(os.path.join(out, "megaclip_tokenizer.py"), "w") as f:
        f.write(convert.TOKENIZER_MODULE.format(context_length=tok.context_length,
                                                bos=tok.bos_id, eos=tok.eos_id, pad=tok.pad_id))
    shown = shown or out
    print(f"open_clip: open_clip.add_model_config('{os.path.join(shown, name + '.json')}'); "
          f"open_clip.create_model_and_transforms('{name}', pretrained="
          f"'{os.path.join(shown, 'open_clip_model.safetensors')}')")
    return ["open_clip_model.safetensors", f"{name}.json", "spm.model", "megaclip_tokenizer.py"]


def verify_open_clip(out: str, tag_dir: str) -> float:
    """open_clip's model and the exported tokenizer against megaclip's: image and text
    embeddings of the same pixels and the same captions (the ids must agree too)."""
    import importlib.util

    import open_clip
    import torch

    from megaclip.checkpoint.inference import load_for_inference
    from megaclip.data.tokenizer import Tokenizer
    reference, cfg = load_for_inference(tag_dir)
    name = f"megaclip_{cfg.model.preset}"
    open_clip.add_model_config(os.path.join(out, f"{name}.json"))
    model, _, _ = open_clip.create_model_and_transforms(
        name, pretrained=os.path.join(out, "open_clip_model.safetensors"))
    spec = importlib.util.spec_from_file_location("megaclip_tokenizer",
                                                  os.path.join(out, "megaclip_tokenizer.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    captions = ["a small red circle and two large blue squares.", "x", "the " * 100]
    tokens, eot = Tokenizer(cfg.data.tokenizer, cfg.model.text.context_length).encode(captions)
    if not torch.equal(module.tokenize(captions), tokens):
        return float("inf")
    images = _probe(cfg, len(captions))[0]
    with torch.no_grad():
        ours = reference(images=images, tokens=tokens, eot=eot)
        theirs = model.eval()(images, tokens)
        image, text = theirs[0], theirs[1]  # normalised features, as megaclip's
    return max(float((ours["image_features"] - image).abs().max()),
               float((ours["text_features"] - text).abs().max()))


def _probe(cfg, n: int = 4):
    import torch
    g = torch.Generator().manual_seed(0)
    side = cfg.model.vision.image_size
    images = torch.randn(n, 3, side, side, generator=g)
    tokens = torch.randint(0, cfg.model.text.vocab_size, (n, cfg.model.text.context_length),
                           generator=g)
    return images, tokens, torch.full((n,), cfg.model.text.context_length // 2)


def verify_safetensors(out: str, tag_dir: str) -> float:
    """A megaclip model built from model.safetensors (strict) against one loaded from the
    checkpoint: image and text embeddings of a random batch."""
    import torch
    from safetensors.torch import load_file

    from megaclip.checkpoint.inference import load_for_inference
    from megaclip.models import build_model
    reference, cfg = load_for_inference(tag_dir)
    model = build_model(cfg.model, cfg.objective, seed=1)
    model.load_state_dict(load_file(os.path.join(out, "model.safetensors")), strict=True)
    model.eval()
    images, tokens, eot = _probe(cfg)
    with torch.no_grad():
        a, b = reference(images=images, tokens=tokens, eot=eot), model(images=images, tokens=tokens,
                                                                         eot=eot)
    return max(float((a[k] - b[k]).abs().max()) for k in ("image_features", "text_features"))


def verify_timm(out: str, tag_dir: str, encoder: str) -> float:
    """timm's model from the export (strict) against megaclip's trunk: the pooled class token."""
    import timm
    import torch
    from safetensors.torch import load_file

    from megaclip.checkpoint import convert
    from megaclip.checkpoint.inference import checkpoint_config
    from megaclip.checkpoint.io import consolidate
    from megaclip.teacher.state import consolidate_teacher
    from megaclip.models.vision import trunk_for
    cfg = checkpoint_config(tag_dir)
    with open(os.path.join(out, "timm_vit.json")) as f:
        spec = json.load(f)
    model = timm.create_model(spec["arch"], **spec["kwargs"])
    model.load_state_dict(load_file(os.path.join(out, "timm_vit.safetensors")), strict=True)
    ours = trunk_for(cfg.model)
    state = (convert.timm_vision(consolidate_teacher(tag_dir), teacher=True) if encoder == "teacher"
             else convert.timm_vision(consolidate(tag_dir, keep=lambda k: k.startswith(
                 convert.STUDENT_TRUNK))))
    ours.load_state_dict(state, strict=True)
    images = _probe(cfg)[0]
    with torch.no_grad():
        tokens = ours.eval()(images)
        pooled = ours.attn_pool(tokens) if ours.attn_pool is not None else tokens[:, 0]
        return float((model.eval()(images) - pooled).abs().max())


if __name__ == "__main__":
    run_cli(main)

"""One typed config tree for megaclip.

Precedence: CLI overrides (``section.key=value``) > experiment file (YAML or JSON) > defaults.
Unknown keys and wrong types are errors that name the key and list the valid ones. Every
section is a frozen dataclass: resolving (``engine/assembly.resolve_config``) makes a new tree
with ``dataclasses.replace``, and nothing can change one afterwards.
"""
from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from megaclip.data.config import (  # noqa: F401 - re-exported
    CaptionKeys, SourceConfig, caption_choices, validate_data_sources)
from megaclip.errors import UserError
from megaclip.objectives.config import (  # noqa: F401 - re-exported
    OBJECTIVE_PRESETS, LocalGlobalConfig, MaskConfig, MaskDistillConfig, ObjectiveConfig,
    TeacherConfig, TextMlmConfig, objective_config_class, validate_objective)

CONFIG_DIR = Path(__file__).parent / "configs"
MODEL_ACTS = ("gelu", "quick_gelu", "gelu_tanh")  # timm's names (timm.layers.get_act_layer)


@dataclass(frozen=True)
class VisionConfig:
    """Image tower (timm VisionTransformer). ``None`` fields take the preset's value."""
    image_size: Optional[int] = None
    patch_size: Optional[int] = None
    width: Optional[int] = None
    depth: Optional[int] = None
    heads: Optional[int] = None
    mlp_ratio: Optional[float] = None
    # A LayerNorm on the embedded tokens before the first block (CLIP's ln_pre): OpenAI CLIP and
    # open_clip ViTs have it, and a transformers CLIPModel always does.
    pre_norm: bool = False
    # token: the class token, projected (CLIP's); map: SigLIP's attention pooling, no class token
    # and no projection (embed_dim = width), for the contrastive objectives alone.
    pool: str = "token"


@dataclass(frozen=True)
class TextConfig:
    """CLIP-style causal text transformer. ``vocab_size`` 0 means: read it from the tokenizer."""
    context_length: Optional[int] = None
    vocab_size: int = 0
    width: Optional[int] = None
    depth: Optional[int] = None
    heads: Optional[int] = None
    mlp_ratio: float = 4.0
    # CLIP's: causal, feature at the end of text, no projection bias. SigLIP's: causal=false,
    # pool=last (the last position, padding included), proj_bias=true.
    causal: bool = True
    pool: str = "eot"  # eot | last
    proj_bias: bool = False


@dataclass(frozen=True)
class ModelConfig:
    preset: str = "vit_b16"
    embed_dim: Optional[int] = None
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    grad_checkpointing: bool = True
    # The blocks' MLP activation in both towers: gelu | quick_gelu (OpenAI CLIP's weights) |
    # gelu_tanh (SigLIP's).
    act: str = "gelu"
    # torch.compile each transformer block of both towers (in place). Under ZeRO-3 the graphs
    # break at DeepSpeed's hooks (inside the block, or its backward hook when it is a leaf);
    # tools/bench_objectives.py measures it.
    compile_blocks: bool = False
    # Under ZeRO-3, each transformer block of a tower that runs once per step is one DeepSpeed
    # leaf module: its parameters are gathered and released together, with no hooks inside it
    # (about 20 modules a block otherwise). Towers that run twice (MaskCLIP's masked student pass
    # and MLM text pass, SILC's local crops) keep per-module hooks, since DeepSpeed 0.19 counts
    # a reused leaf's gradients twice.
    zero3_leaf_blocks: bool = True
    init_logit_scale: float = 1 / 0.07
    max_logit_scale: float = 100.0
    # Pretrained weights, read at the first start only (a resumed run takes its checkpoint's):
    # a local open_clip or timm file (.safetensors, .bin, .pt, .pth) or a folder holding one.
    init_from: str = ""
    # Which parts to load from it: image, text, logit_scale; empty: every part the file holds.
    init_from_towers: tuple = ()
    # LiT: a locked tower gets no updates (open_clip's --lock-image / --lock-text), but for its
    # last N groups (open_clip's: embeddings, each block, the last block with the final norm,
    # the projection).
    lock_image: bool = False
    lock_image_unlocked_groups: int = 0
    lock_text: bool = False
    lock_text_unlocked_layers: int = 0


@dataclass(frozen=True)
class DataConfig:
    train_shards: str = ""
    resampled: bool = True
    shuffle_buffer: int = 2000  # samples per shuffled block (memory: about one block per worker)
    workers: int = 4
    tokenizer: str = ""
    crop_scale: tuple = (0.5, 1.0)
    crop_ratio: tuple = (3 / 4, 4 / 3)  # aspect ratios of the random crop
    # Decode a JPEG at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling) when its random crop still
    # has at least the model's image size each way at that scale: photos far larger than the
    # crop decode several times faster; the crop is then resized from fewer source pixels.
    jpeg_draft: bool = True
    mean: tuple = (0.485, 0.456, 0.406)
    std: tuple = (0.229, 0.224, 0.225)
    max_image_pixels: int = 89_478_485  # PIL's own decompression-bomb limit
    caption_key: str = "txt"
    image_keys: tuple = ("jpg", "jpeg", "png", "webp")
    seed: int = 0
    log_bad_samples: int = 10  # how many skipped samples each worker describes in the log
    image_formats: tuple = ("JPEG", "PNG", "WEBP")  # PIL formats tried; nothing else is decoded
    max_member_bytes: int = 256 * 2**20  # a tar member above this is not read; its sample skipped
    # The members a sample needs (image, caption) together; a member that would take its sample
    # above this is not read, and the sample is skipped. Other members are never read.
    max_sample_bytes: int = 256 * 2**20
    max_caption_bytes: int = 2**20  # a caption above this is skipped before tokenising
    # Shards that fail while read are skipped; clearly more than this fraction of those read,
    # over all ranks (checked at log steps), is an error naming them. 0: none tolerated.
    max_bad_shard_fraction: float = 0.01
    # Unusable samples in a row, from at least 3 shards: an error naming what they hold; 0: off.
    max_bad_samples_in_a_row: int = 2000
    # No batch for this long: an error naming each worker's shard. Below the process group's
    # 10-minute collective timeout, so the report comes before other ranks give up waiting.
    loader_timeout_s: float = 300.0
    # A pipe: or URL shard whose command gives no data for this long is killed (with whatever it
    # started) and skipped as a bad shard; below loader_timeout_s, so a stall is a bad shard
    # before the loader gives up. 0: no limit.
    shard_stall_timeout_s: float = 120.0
    # Several captions per sample: member keys, or ``json:<field>`` (a field of the sample's
    # ``json`` member), with their probabilities ({txt: 0.7, "json:caption_2": 0.3}; a list
    # means equal ones). Each sample draws one from its own seed among those it has. Empty:
    # caption_key alone (which evaluation sets always read).
    caption_keys: CaptionKeys = ()
    # A weighted mixture of sources instead of train_shards (not both); each rank's stream
    # draws every sample's source by weight from seeded generators (megaclip/data/mixture.py).
    sources: tuple[SourceConfig, ...] = ()
    # A source with epochs > 0 that runs out: ``drop`` it (the others go on, by their
    # weights), or ``stop`` the run after that step with a checkpoint and the final evaluation.
    on_source_exhausted: str = "drop"


@dataclass(frozen=True)
class EvalConfig:
    shards: str = ""
    classes: str = ""  # JSON file: {"classnames": [...], "templates": [...]}
    every_steps: int = 0  # 0: only at the end of training
    batch_size: int = 64
    # Also the frozen-feature evaluations (megaclip/eval/probes.py): linear probe, and with masks in
    # the set, dense probe and zero-shot segmentation.
    probes: bool = False
    probe_encoder: str = "student"  # student | teacher (the EMA teacher's trunk, if there is one)
    # TensorBoard pictures at each evaluation: this many training samples with their masks and
    # crops, and held-out images beside their patch-text similarity maps; 0: none.
    pictures: int = 4


@dataclass(frozen=True)
class OptimConfig:
    impl: str = "auto"  # auto | deepspeed_fused | apex_fused | torch_fused | torch
    lr: float = 5e-4
    min_lr: float = 0.0
    weight_decay: float = 0.5
    betas: tuple = (0.9, 0.98)
    eps: float = 1e-8
    warmup_steps: int = 2000
    # Learning rate per layer as BEiT/EVA, per tower: embeddings x decay^(depth + 1), block i x
    # decay^(depth - i), final norm, projection, logit scale, heads and decoders x 1. 1.0: off.
    layer_decay: float = 1.0


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 10000
    micro_batch_size: int = 64  # per rank; the DeepSpeed JSON must not contradict it
    grad_accum_steps: int = 1
    # The contrastive loss of each micro-batch against the negatives of every micro-batch of
    # the optimiser step (open_clip's --accum-freq): one extra no-grad forward per micro-batch.
    # With grad_accum_steps 1 it changes nothing (the loss already sees the whole batch).
    accum_negatives: bool = False
    grad_clip: float = 1.0
    seed: int = 0
    output_dir: str = "runs/megaclip"
    log_every: int = 10
    ckpt_every: int = 1000
    keep_checkpoints: int = 3  # 0: all; the newest one before skipped steps is kept as well
    max_skipped_steps_in_a_row: int = 10  # non-finite steps in a row, then the run stops
    tensorboard: bool = True
    # On any of these signals: checkpoint at the next step boundary and exit. When only
    # requeue_signals arrived (on any rank; Slurm's warning before the time limit,
    # --signal=USR1@300) a Slurm job also requeues itself and resumes from that checkpoint;
    # SIGTERM (scancel, pre-emption, where Slurm requeues by itself) only checkpoints.
    # requeue_on_stop=false (or requeue_signals=[]): never requeue.
    stop_signals: tuple = ("SIGTERM", "SIGUSR1")
    requeue_signals: tuple = ("SIGUSR1",)
    requeue_on_stop: bool = True
    # Peak TFLOP/s of one device for the logged MFU; 0: look the GPU up (bf16 on known GPUs).
    peak_tflops: float = 0.0
    # How long a collective waits for the slowest rank before the run fails (the process
    # group's timeout; torch's and DeepSpeed's default is 10 minutes).
    dist_timeout_min: float = 30.0
    # How long the other ranks wait for rank 0 to convert a checkpoint written at another world
    # size to DeepSpeed's universal format (ViT-L at 64 ranks can take longer than a collective
    # should wait). They poll a file meanwhile, so no collective's timeout applies.
    universal_conversion_timeout_min: float = 360.0


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# --------------------------------------------------------------------------- building

def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (allowing int -> float, list -> tuple)."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"config key '{where}' must be a bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UserError(f"config key '{where}' must be an int, got {value!r}")
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise UserError(f"config key '{where}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise UserError(f"config key '{where}' must be a string, got {value!r}")
    if tp is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(value)
        raise UserError(f"config key '{where}' must be a list, got {value!r}")
    if tp == CaptionKeys:
        return caption_choices(value, where)
    if origin is tuple and len(typing.get_args(tp)) == 2 and typing.get_args(tp)[1] is Ellipsis:
        if not isinstance(value, (list, tuple)):  # a list of entries of one typed kind
            raise UserError(f"config key '{where}' must be a list, got {value!r}")
        item = typing.get_args(tp)[0]
        return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    raise AssertionError(f"unsupported annotation {tp} at {where}")


def _build(cls: type, data: dict, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise UserError(f"config section '{prefix or '<root>'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise UserError(f"unknown config key '{where}'; valid keys here: {', '.join(names)}")
        tp = hints[key]
        if tp is ObjectiveConfig:  # with the sections of registered objective terms
            tp = objective_config_class()
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, where)
        else:
            kwargs[key] = _coerce(value, tp, where)
    return cls(**kwargs)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def find_config_file(name_or_path: str) -> Path:
    """A path to a YAML/JSON file, or the name of a bundled experiment in megaclip/configs."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    bundled = CONFIG_DIR / f"{name_or_path}.yaml"
    if bundled.is_file():
        return bundled
    names = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))
    raise UserError(f"config '{name_or_path}' is neither a file nor a bundled experiment "
                    f"({', '.join(names)})")


def read_config_file(path: Path, _chain: tuple = ()) -> dict:
    """The mapping of an experiment file, with the files its ``base:`` names beneath it (a chain
    that comes back to a file is an error naming the chain)."""
    chain = _chain + (path,)
    if path.resolve() in [p.resolve() for p in _chain]:
        raise UserError("config files extend each other in a cycle (base:): "
                        + " -> ".join(str(p) for p in chain))
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise UserError(f"cannot parse config file {path}: {e}") from None
    data = data or {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping at the top level")
    base = data.pop("base", None)  # an experiment file may extend another one
    if base is not None:
        data = _merge(read_config_file(find_config_file(str(base)), chain), data)
    return data


def parse_override(item: str) -> dict:
    """``section.key=value`` -> nested dict; the value is parsed as YAML (numbers, lists, bools)."""
    if "=" not in item:
        raise UserError(f"override '{item}' is not of the form section.key=value")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def load_config(path: Optional[str], overrides: list[str] = ()) -> Config:
    data: dict = {}
    if path:
        data = read_config_file(find_config_file(path))
    for item in overrides:
        data = _merge(data, parse_override(item))
    data = apply_objective_preset(data)
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


def apply_objective_preset(data: dict) -> dict:
    """Put the named objective preset's values beneath what the experiment set."""
    objective = data.get("objective") or {}
    name = objective.get("preset", "clip") if isinstance(objective, dict) else "clip"
    if name not in OBJECTIVE_PRESETS:
        raise UserError(f"unknown objective.preset '{name}'; presets: {', '.join(OBJECTIVE_PRESETS)}")
    return _merge({"objective": OBJECTIVE_PRESETS[name]}, data)


def config_from_dict(data: dict) -> Config:
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


def to_dict(cfg: Any) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def validate(cfg: Config) -> None:
    def check(ok: bool, msg: str) -> None:
        if not ok:
            raise UserError(msg)

    validate_objective(cfg.objective, check)
    check(cfg.model.act in MODEL_ACTS,
          f"model.act must be one of {', '.join(MODEL_ACTS)}; got '{cfg.model.act}'")
    validate_data_sources(cfg.data, check)
    from megaclip.models.config_checks import validate_pretrained, validate_towers
    validate_towers(cfg, check)
    check(cfg.optim.impl in ("auto", "deepspeed_fused", "apex_fused", "torch_fused", "torch"),
          f"optim.impl must be one of auto, deepspeed_fused, apex_fused, torch_fused, torch; "
          f"got '{cfg.optim.impl}'")
    check(len(cfg.optim.betas) == 2, "optim.betas must hold two numbers")
    check(len(cfg.data.crop_scale) == 2 and 0 < cfg.data.crop_scale[0] <= cfg.data.crop_scale[1] <= 1,
          f"data.crop_scale must be [lo, hi] with 0 < lo <= hi <= 1, got {list(cfg.data.crop_scale)}")
    check(len(cfg.data.crop_ratio) == 2 and 0 < cfg.data.crop_ratio[0] <= cfg.data.crop_ratio[1],
          f"data.crop_ratio must be [lo, hi] with 0 < lo <= hi, got {list(cfg.data.crop_ratio)}")
    check(len(cfg.data.mean) == 3 and len(cfg.data.std) == 3, "data.mean and data.std need 3 values")
    for key in ("steps", "micro_batch_size", "grad_accum_steps", "log_every"):
        check(getattr(cfg.train, key) > 0, f"train.{key} must be positive")
    check(cfg.train.ckpt_every >= 0, "train.ckpt_every must be >= 0 (0: no periodic checkpoints)")
    check(cfg.train.keep_checkpoints >= 0, "train.keep_checkpoints must be >= 0 (0: keep all)")
    check(cfg.train.max_skipped_steps_in_a_row >= 1,
          "train.max_skipped_steps_in_a_row must be >= 1")
    check(cfg.train.dist_timeout_min > 0, "train.dist_timeout_min must be > 0")
    check(cfg.train.universal_conversion_timeout_min > 0,
          "train.universal_conversion_timeout_min must be > 0")
    from megaclip.cluster import signal_numbers
    signal_numbers(cfg.train.stop_signals)  # a UserError naming an unknown signal
    check(set(cfg.train.requeue_signals) <= set(cfg.train.stop_signals),
          f"train.requeue_signals {list(cfg.train.requeue_signals)} must be among "
          f"train.stop_signals {list(cfg.train.stop_signals)}")
    check(cfg.data.workers >= 0, "data.workers must be >= 0")
    check(cfg.data.shuffle_buffer >= 0, "data.shuffle_buffer must be >= 0")
    check(0 <= cfg.data.max_bad_shard_fraction <= 1, "data.max_bad_shard_fraction must be in [0, 1]")
    check(cfg.data.max_bad_samples_in_a_row >= 0, "data.max_bad_samples_in_a_row must be >= 0")
    check(cfg.data.loader_timeout_s > 0, "data.loader_timeout_s must be > 0")
    check(cfg.data.max_member_bytes > 0 and cfg.data.max_caption_bytes > 0
          and cfg.data.max_sample_bytes > 0,
          "data.max_member_bytes, data.max_caption_bytes and data.max_sample_bytes must be > 0")
    check(0 <= cfg.data.shard_stall_timeout_s < cfg.data.loader_timeout_s,
          f"data.shard_stall_timeout_s must be >= 0 and below data.loader_timeout_s "
          f"({cfg.data.loader_timeout_s:g}), got {cfg.data.shard_stall_timeout_s:g}")
    check(cfg.data.max_image_pixels > 0, "data.max_image_pixels must be > 0")
    from PIL import Image
    Image.init()
    unknown = [f for f in cfg.data.image_formats if f.upper() not in Image.OPEN]
    check(cfg.data.image_formats and not unknown,
          f"data.image_formats: unknown PIL format(s) {unknown}; known: {sorted(Image.OPEN)}")
    check(cfg.optim.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
    check(cfg.eval.batch_size > 0, "eval.batch_size must be positive")
    check(cfg.eval.pictures >= 0, "eval.pictures must be >= 0")
    check(cfg.eval.probe_encoder in ("student", "teacher"),
          f"eval.probe_encoder must be 'student' or 'teacher', got '{cfg.eval.probe_encoder}'")
    check(cfg.eval.probe_encoder == "student" or cfg.objective.uses_teacher,
          "eval.probe_encoder=teacher needs an objective with an EMA teacher")
    # When each auxiliary term starts (objective.<term>.start_at, objectives/stages.py).
    from megaclip.objectives.stages import validate_starts
    validate_starts(cfg.objective, cfg.train.steps, check)
    validate_pretrained(cfg, check)


def save_resolved(cfg: Config, path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)

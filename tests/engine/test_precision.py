"""Parameters, the EMA teacher and buffers take the DeepSpeed config's dtype whatever the CPU
reports (DeepSpeed 0.19.8 reads fp16/bf16 support off the accelerator and, without fp16, used
to build bf16 parameters in an fp32 run); bf16 without a GPU is refused; fused Adam falls back."""
import os

import pytest
import torch

from megaclip.config import OptimConfig, load_config
from megaclip.engine.ds_config import (check_precision, load_ds_config, merge_ds_config,
                                       model_dtype)
from megaclip.engine import optim
from megaclip.errors import UserError
from megaclip.models import build_model, resolve_model_config
from megaclip.teacher.build import build_teacher_modules
from tests.conftest import ROOT, run_tool, synthetic_overrides


# The CPUs seen: oneDNN with fp16 and bf16, and an AMD EPYC with neither (DeepSpeed's CPU
# accelerator says bf16 regardless). The answers DeepSpeed gets are faked, so this test does
# not depend on the CPU that runs it.
CPUS = {"fp16+bf16": (True, True), "no fp16": (False, True), "neither": (False, False)}


@pytest.mark.parametrize("cpu", sorted(CPUS))
@pytest.mark.parametrize("ds_file", ["zero3_cpu.json", "zero3_bf16.json"])
def test_every_parameter_and_buffer_has_the_configs_dtype(monkeypatch, process_group, cpu, ds_file):
    from deepspeed.accelerator import get_accelerator
    fp16, bf16 = CPUS[cpu]
    acc = get_accelerator()
    monkeypatch.setattr(acc, "is_fp16_supported", lambda: fp16)
    monkeypatch.setattr(acc, "is_bf16_supported", lambda: bf16)
    cfg = load_config("clip_tiny_synthetic", ["objective.preset=maskclip",
                                              "objective.mask_distill.prototypes=64"])
    model_cfg = resolve_model_config(cfg.model, 128)
    ds = merge_ds_config(load_ds_config(os.path.join(ROOT, "ds_configs", ds_file)), cfg.train, 1)
    want = model_dtype(ds)
    assert want == (torch.float32 if ds_file == "zero3_cpu.json" else torch.bfloat16)
    student = build_model(model_cfg, cfg.objective, 0, ds, want)
    trunk, heads = build_teacher_modules(model_cfg, cfg.objective, ds, want)
    for what, module in (("student", student), ("teacher trunk", trunk),
                         ("teacher head", heads["distill_head"])):
        params = list(module.named_parameters())
        assert params and all(hasattr(p, "ds_tensor") for _, p in params)  # partitioned
        wrong = [(n, p.ds_tensor.dtype) for n, p in params if p.ds_tensor.dtype != want]
        wrong += [(n, b.dtype) for n, b in module.named_buffers()
                  if b.is_floating_point() and b.dtype != want]
        assert not wrong, f"{what} on a CPU with {cpu}: {wrong[:4]} (want {want})"


def test_bf16_config_without_a_gpu_is_refused():
    ds = load_ds_config(os.path.join(ROOT, "ds_configs", "zero3_bf16.json"))
    with pytest.raises(UserError, match="enables bf16, but no GPU is visible"):
        check_precision(ds, torch.device("cpu"))
    check_precision(ds, torch.device("cuda", 0))  # fine on a GPU
    check_precision(load_ds_config(os.path.join(ROOT, "ds_configs", "zero3_cpu.json")),
                    torch.device("cpu"))


def test_train_with_bf16_on_the_cpu_exits_2_before_building_anything(tmp_path, synthetic):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    proc = run_tool("../megaclip/train.py", "--deepspeed_config", "ds_configs/zero3_bf16.json",
                    "--config", "clip_tiny_synthetic", *synthetic_overrides(synthetic, tmp_path),
                    check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "enables bf16, but no GPU is visible" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "checkpoints").exists()


def test_bench_objectives_does_not_switch_to_fp32_behind_the_users_back():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    proc = run_tool("bench_objectives.py", "--objectives", "clip", "--steps", "1", "--warmup", "0",
                    check=False, timeout=300)
    assert proc.returncode == 2 and "enables bf16, but no GPU is visible" in proc.stderr


def _groups():
    return [{"params": [torch.nn.Parameter(torch.ones(4))], "weight_decay": 0.0}]


def test_auto_falls_back_to_torch_fused_adamw_when_fused_adam_cannot_load(monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("Error building extension 'fused_adam': nvcc not found\nmore")
    monkeypatch.setattr(optim, "_deepspeed_fused_adam", broken)
    opt, name = optim.build_optimizer(OptimConfig(impl="auto"), _groups(), "cuda")
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"]
    assert name.startswith("torch AdamW (fused)") and "nvcc not found" in name
    with pytest.raises(UserError, match="optim.impl=deepspeed_fused: .* nvcc not found"):
        optim.build_optimizer(OptimConfig(impl="deepspeed_fused"), _groups(), "cuda")


def test_auto_takes_fused_adam_when_it_loads_and_torch_fused_on_the_cpu(monkeypatch):
    sentinel = object()
    monkeypatch.setattr(optim, "_deepspeed_fused_adam", lambda *a, **k: sentinel)
    assert optim.build_optimizer(OptimConfig(), _groups(), "cuda") == (sentinel, "DeepSpeed FusedAdam")
    opt, name = optim.build_optimizer(OptimConfig(), _groups(), "cpu")
    assert opt.defaults["fused"] and name == "torch AdamW (fused)"


@pytest.mark.parametrize("ds_file", ["zero3_bf16.json", "zero2_bf16.json"])
def test_bf16_accumulates_gradients_and_keeps_masters_and_the_scale_in_fp32(process_group,
                                                                            ds_file):
    """What DeepSpeed actually uses, read off a bf16 engine on this CPU: the buffer that sums
    the micro-batches' gradients, the master weights, and the logit scale and SigLIP bias as
    the loss receives them."""
    import dataclasses

    from deepspeed.utils import safe_get_full_fp32_param, safe_get_local_fp32_param
    from megaclip.engine.assembly import build_training
    from megaclip.engine.step import train_step
    cfg = load_config("clip_tiny_synthetic", ["objective.contrastive=siglip",
                                              "train.micro_batch_size=4",
                                              "train.grad_accum_steps=2"])
    cfg = dataclasses.replace(cfg, model=resolve_model_config(cfg.model, 128))
    ds = load_ds_config(os.path.join(ROOT, "ds_configs", ds_file))
    training = build_training(cfg, ds, 1, torch.device("cpu"), ds_file)
    engine, module = training.engine, training.engine.module
    assert training.dtype == torch.bfloat16
    assert engine.get_data_types() == (torch.bfloat16, torch.float32)
    seen = {}
    module.register_forward_hook(lambda m, a, out: seen.update(out))
    g = torch.Generator().manual_seed(0)
    side, ctx = cfg.model.vision.image_size, cfg.model.text.context_length
    batch = {"images": torch.randn(4, 3, side, side, generator=g).to(torch.bfloat16),
             "tokens": torch.randint(4, 128, (4, ctx), generator=g),
             "eot": torch.randint(1, ctx, (4,), generator=g)}
    train_step(engine, training.objective, batch)  # the first micro-step: no optimiser step
    assert not engine.is_gradient_accumulation_boundary() or engine.global_steps == 0
    opt = engine.optimizer
    if training.stage == 3:
        accum = opt.grad_partitions_flat_buffer  # every rank's gradient partitions, summed
        masters = [safe_get_local_fp32_param(p) for p in module.parameters()]
        param = module.logit_scale.ds_tensor
    else:
        accum = opt.averaged_gradients[0].flat_partition  # stage 2's fp32 partition
        masters = [safe_get_full_fp32_param(p) for p in module.parameters()]
        param = module.logit_scale
    assert accum.dtype == torch.float32 and accum.abs().sum() > 0  # holds micro-step 1
    assert param.dtype == torch.bfloat16  # the working copy: one dtype under ZeRO
    assert {m.dtype for m in masters} == {torch.float32}
    assert seen["logit_scale"].dtype == torch.float32
    assert seen["logit_bias"].dtype == torch.float32
    before = accum.clone()
    train_step(engine, training.objective, batch)  # the boundary: the optimiser steps
    assert engine.global_steps == 1 and not torch.equal(before, accum)


def test_bf16_configs_accumulate_in_fp32_unless_the_json_says_otherwise():
    train = load_config("clip_tiny_synthetic", []).train
    for name in ("zero3_bf16.json", "zero2_bf16.json"):
        ds = load_ds_config(os.path.join(ROOT, "ds_configs", name))
        assert ds["data_types"]["grad_accum_dtype"] == "fp32", name
        del ds["data_types"]
        assert merge_ds_config(ds, train, 1)["data_types"]["grad_accum_dtype"] == "fp32"
        ds["data_types"] = {"grad_accum_dtype": "bf16"}  # asked for: kept
        assert merge_ds_config(ds, train, 1)["data_types"]["grad_accum_dtype"] == "bf16"
    fp32 = merge_ds_config(load_ds_config(os.path.join(ROOT, "ds_configs", "zero3_cpu.json")),
                           train, 1)
    assert "grad_accum_dtype" not in fp32.get("data_types", {})
    plain = {"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}}
    with pytest.raises(UserError, match="without ZeRO"):
        merge_ds_config(plain, train, 1)
    del plain["data_types"]
    assert merge_ds_config(plain, train, 1)["data_types"] == {}  # bf16 sums, as DeepSpeed does

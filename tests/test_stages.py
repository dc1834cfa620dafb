"""Staged objectives (objective.<term>.start_at, megaclip/objectives/stages.py): validation, the
objective and FLOPs of each stage, the model's passes, the late parameter groups, the presets;
configs without start_at unchanged."""
import dataclasses

import pytest
import torch

from megaclip.config import OBJECTIVE_PRESETS, CONFIG_DIR, load_config
from megaclip.errors import UserError
from megaclip.objectives.flops import (mean_flops_per_sample, steps_flops_per_sample,
                                       train_flops_per_sample)
from megaclip.objectives.loss import ObjectiveLoss
from megaclip.objectives.stages import Stages, objective_at, start_step


def _cfg(*overrides, preset="maskclip", steps=40):
    return load_config("clip_tiny_synthetic", [f"objective.preset={preset}",
                                               f"train.steps={steps}", *overrides])


@pytest.mark.parametrize("value,message", [
    ("-1", " must be a step \\(a whole number >= 0\\) or a fraction of train.steps in \\(0, 1\\), "
           "got -1"),
    ("2.5", " must be a step .*got 2.5"),
    ("40", "=40 is step 40, but training ends at train.steps=40: the term would never "
           "run \\(set objective.text_mlm.weight=0"),
    ("0.999", "=0.999 is step 40"),
])
def test_start_at_is_a_step_or_a_fraction_before_the_end(value, message):
    with pytest.raises(UserError, match=f"objective.text_mlm.start_at{message}"):
        _cfg(f"objective.text_mlm.start_at={value}")
    with pytest.raises(UserError, match="unknown config key 'objective.start_at'"):
        _cfg("objective.start_at=3")  # the contrastive term always runs from the start
    _cfg("objective.local_global.start_at=99")  # a term that is off is not checked


def test_steps_fractions_and_the_objective_of_each_stage():
    assert [start_step(v, 40) for v in (0, 0.5, 0.8, 7, 7.0)] == [0, 20, 32, 7, 7]
    cfg = _cfg("objective.text_mlm.start_at=10", "objective.mask_distill.start_at=0.5")
    stages = Stages(cfg.objective, 40)
    assert stages.starts == {"contrastive": 0, "distill": 20, "mlm": 10}
    assert stages.boundaries == [10, 20] and stages.teacher_start == 20
    assert stages.later_params() == {10: ("text_decoder.", "text.mask_embedding"),
                                     20: ("patch_decoder.", "distill_head.")}
    assert stages.beginning(10) == ["text_mlm"] and stages.beginning(11) == []
    assert [stages.stage_start(s) for s in (0, 9, 10, 19, 20, 39)] == [0, 0, 10, 10, 20, 20]
    first, second, last = stages.passes(0), stages.passes(15), stages.passes(25)
    assert not (first.masked_image or first.masked_caption or first.uses_teacher)
    assert second.masked_caption and not second.masked_image and not second.uses_teacher
    assert last == cfg.objective.passes  # every term
    assert stages.at(25) is cfg.objective
    assert "mask_distill from step 20 (50% of train.steps)" in stages.describe()
    # The FLOPs of a step are those of the terms it runs: CLIP's before any start.
    from megaclip.models import resolve_model_config
    model = resolve_model_config(cfg.model, vocab_size=64)
    clip = train_flops_per_sample(model, _cfg(preset="clip").objective)
    full = train_flops_per_sample(model, cfg.objective)
    assert train_flops_per_sample(model, stages.at(0)) == clip < full
    assert mean_flops_per_sample(model, stages, 0, 10) == clip
    assert mean_flops_per_sample(model, stages, 20, 40) == full
    mlm_only = train_flops_per_sample(model, stages.at(10))
    assert steps_flops_per_sample(model, stages, 5, 25) == pytest.approx(
        5 * clip + 10 * mlm_only + 5 * full)


def test_the_loss_leaves_out_terms_before_their_start_and_counts_their_steps_from_it():
    cfg = _cfg("objective.mask_distill.start_at=20", "objective.text_mlm.start_at=20",
               "objective.mask_distill.teacher_temp_warmup=0.04",
               "objective.mask_distill.teacher_temp=0.07")
    loss = ObjectiveLoss(cfg.objective, 40)
    assert loss.starts == {"contrastive": 0, "distill": 20, "mlm": 20}
    assert loss.distill.total_steps == 20  # the temperature warm-up spans its own steps
    seen = []
    loss.distill.forward = lambda *a: seen.append(a[-1]) or ({"distill": torch.zeros(())}, {})
    loss.mlm.forward = lambda *a: {"mlm": torch.zeros(())}
    loss.contrastive.forward = lambda **k: {"clip": torch.zeros(())}
    outputs = {"image_features": None, "text_features": None, "logit_scale": None,
               "student_patch_logits": None, "mlm_logits": None}
    batch = {"masked_index": None, "tokens": None, "mlm_index": None, "mlm_valid": None}
    assert set(loss(outputs, batch, {}, step=19)[0]) == {"clip"}
    assert set(loss(outputs, batch, {"patch_logits": None}, step=23)[0]) == {"clip", "distill",
                                                                            "mlm"}
    assert seen == [3]


def test_before_its_start_a_term_runs_no_module_and_its_parameters_get_their_own_groups():
    """The model's forward runs the passes of the step's stage only: with every input in the
    batch, no decoder or head of a term that has not started is called."""
    from megaclip.engine.optim import staged_param_groups
    from megaclip.models import build_model, resolve_model_config
    from tests.models.test_models import _batch
    cfg = _cfg("objective.mask_distill.start_at=20", "objective.text_mlm.start_at=30",
               "objective.mask_distill.prototypes=32")
    mcfg = resolve_model_config(cfg.model, vocab_size=64)
    model = build_model(mcfg, cfg.objective, seed=0)
    calls = {}
    for name in ("patch_decoder", "distill_head", "text_decoder"):
        getattr(model, name).register_forward_hook(
            lambda m, a, o, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    stages = Stages(cfg.objective, 40)
    batch = _batch(model, cfg.objective, mcfg)
    for step, expect in ((0, {}), (20, {"patch_decoder": 1, "distill_head": 1}),
                         (30, {"patch_decoder": 2, "distill_head": 2, "text_decoder": 1})):
        model.passes = stages.passes(step)
        out = model(**batch)
        assert calls == expect, step
        assert ("student_patch_logits" in out) == (step >= 20)
        assert ("mlm_logits" in out) == (step >= 30)
    groups, starts = staged_param_groups(model, 0.1, stages.later_params())
    assert [g["name"] for g in groups] == ["decay", "no_decay", "decay@20", "no_decay@20",
                                           "decay@30", "no_decay@30"]
    assert starts == [0, 0, 20, 20, 30, 30]
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in groups[5]["params"]} >= {"text.mask_embedding"}
    assert sum(len(g["params"]) for g in groups) == sum(1 for _ in model.parameters())
    # with layer decay: late groups keep their scale, and no group is left empty
    from megaclip.engine.optim import set_lr
    from megaclip.engine.staging import StageSwitch
    from megaclip.models.layers import depths
    groups, starts = staged_param_groups(model, 0.1, stages.later_params(), 0.5, depths(mcfg))
    assert all(g["params"] for g in groups) and len(starts) == len(groups)
    assert sum(len(g["params"]) for g in groups) == sum(1 for _ in model.parameters())
    late = {names[id(p)] for g, s in zip(groups, starts) if s for p in g["params"]}
    assert "text.mask_embedding" in late and not any(n.startswith("visual.") for n in late)
    opt = torch.optim.AdamW(groups, lr=1.0)
    switch = StageSwitch(stages, starts, model, opt, None, cfg.objective)
    for step in (0, 25):
        switch.set_lr(2.0, step)
        assert [g["lr"] for g in opt.param_groups] == [
            2.0 * g["lr_scale"] if step >= s else 0.0 for g, s in zip(groups, starts)]
    assert len({g["lr_scale"] for g in groups}) > 2
    set_lr(opt, 2.0)


def test_restarted_groups_begin_adam_afresh():
    from megaclip.engine.optim import restart_groups
    p, q = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([{"params": [p]}, {"params": [q]}], lr=0.1)
    for _ in range(3):
        p.grad, q.grad = torch.ones(3), torch.ones(3)
        opt.step()
    restart_groups(opt, [1])
    assert float(opt.state[q]["step"]) == 0 and not opt.state[q]["exp_avg"].any()
    assert float(opt.state[p]["step"]) == 3


def test_siglip2_preset_and_configs_without_start_at_are_unchanged():
    cfg = _cfg("objective.contrastive=siglip", preset="siglip2", steps=10000)
    stages = Stages(cfg.objective, 10000)
    assert stages.starts == {"contrastive": 0, "distill": 8000, "local_global": 8000}
    assert stages.teacher_start == 8000 and cfg.objective.mask.ratio == 0.5
    assert not stages.passes(0).uses_teacher and stages.passes(0).local_views == 0
    bundled = load_config("siglip2_vitb16")
    assert bundled.objective.contrastive == "siglip"
    assert Stages(bundled.objective, bundled.train.steps).boundaries == [80000]
    # Every other preset and bundled experiment: one stage, the objective itself at every step.
    for preset in set(OBJECTIVE_PRESETS) - {"siglip2"}:
        c = _cfg(preset=preset)
        s = Stages(c.objective, 40)
        assert not s.staged and s.teacher_start in (None, 0), preset
        assert objective_at(c.objective, 0, 40) is c.objective and s.at(39) is c.objective
        assert all(v == 0 for v in s.starts.values())
    for path in CONFIG_DIR.glob("*.yaml"):
        if path.stem != "siglip2_vitb16":
            c = load_config(path.stem)
            assert not Stages(c.objective, c.train.steps).staged, path.stem
    assert dataclasses.asdict(_cfg().objective)["mask_distill"]["start_at"] == 0.0


def test_the_benchmark_weighs_each_stage_by_its_share_of_the_run():
    from megaclip.bench.objectives import over_the_run
    stages = Stages(_cfg("objective.contrastive=siglip", preset="siglip2",
                         steps=100).objective, 100)

    def figures(first, time, flops):
        return {"first_step": first, "step_time_s": time, "flops_per_sample": flops, "batch": 4,
                "world_size": 2, "mfu": None, "tflops": 0.0, "peak_mem_gib": first + 1.0}
    run = over_the_run([figures(0, 1.0, 10.0), figures(80, 3.0, 40.0)], stages)
    assert run["step_time_s"] == pytest.approx(0.8 * 1.0 + 0.2 * 3.0)
    assert run["flops_per_sample"] == pytest.approx(0.8 * 10 + 0.2 * 40)
    assert run["peak_mem_gib"] == 81.0  # the last stage's (every term)
    assert [(s["first_step"], s["last_step"], s["steps_share"]) for s in run["stages"]] == [
        (0, 80, 0.8), (80, 100, 0.2)]


def test_a_resume_with_other_late_parameter_groups_is_refused(tmp_path):
    """The late terms' modules have optimiser groups of their own: a checkpoint whose groups
    differ cannot be loaded, and says so; moving a start is fine."""
    from megaclip.config import save_resolved
    from megaclip.engine.assembly import check_stages
    save_resolved(_cfg(), str(tmp_path / "config.yaml"))  # maskclip, every term from step 0
    check_stages(str(tmp_path), Stages(_cfg().objective, 40))
    staged = Stages(_cfg("objective.mask_distill.start_at=0.5").objective, 40)
    with pytest.raises(UserError, match="trained with other objective stages: clip, mask_distill, "
                                        "text_mlm from step 0; this run has .*mask_distill "
                                        "from step 20.*resume with the start_at values"):
        check_stages(str(tmp_path), staged)
    save_resolved(_cfg("objective.mask_distill.start_at=0.25"), str(tmp_path / "config.yaml"))
    check_stages(str(tmp_path), staged)
    # ... unless the checkpoint has passed either start (10 or 20): step 15 and step 25
    for done in (15, 25):
        tag = tmp_path / f"step{done:08d}"
        tag.mkdir()
        save_resolved(_cfg("objective.mask_distill.start_at=0.25"), str(tag / "config.yaml"))
        with pytest.raises(UserError, match=f"may move\\)|after step {done}"):
            check_stages(str(tag), staged)
    tag = tmp_path / "step00000005"
    tag.mkdir()
    save_resolved(_cfg("objective.mask_distill.start_at=0.25"), str(tag / "config.yaml"))
    check_stages(str(tag), staged)
    # two late terms whose starts swap: their groups would swap too
    swapped = Stages(_cfg("objective.mask_distill.start_at=30",
                          "objective.text_mlm.start_at=20").objective, 40)
    save_resolved(_cfg("objective.mask_distill.start_at=20", "objective.text_mlm.start_at=30"),
                  str(tag / "config.yaml"))
    with pytest.raises(UserError, match="resume with the start_at values"):
        check_stages(str(tag), swapped)

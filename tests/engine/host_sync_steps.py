"""Run by tests/engine/test_host_syncs.py in a fresh process: for each objective given, a few
steps of the real trainer (``build_run`` + ``Trainer``, real data pipeline, DeepSpeed ZeRO-3,
the EMA teacher) on the tiny synthetic experiment, recording host synchronisations
(``host_syncs.HostSyncs``) during every micro-step of the steps that do not log. Writes a JSON
report: per objective, the events and the number of micro-steps watched.

Not recorded: the first optimiser step (DeepSpeed's trace, below), waiting for the next batch
(the loader's work on the host) and DeepSpeed's optimiser step at the accumulation boundary
(one sync per optimiser step, README: Training).
"""
import json
import sys

from megaclip.config import load_config
from megaclip.engine.assembly import build_run
from megaclip.engine.ds_config import load_ds_config
from megaclip.engine.trainer import Trainer
from tests.engine.host_syncs import HostSyncs

# Steps 1-3 do not log (log_every = STEPS). Step 1 is not watched: in its first two
# forward-backward passes (step 1's two micro-steps) DeepSpeed's ZeRO-3 records the order in
# which modules fetch their parameters and checks it against rank 0's, with host reads
# (again after an evaluation changes the order). Steps 2-3: 4 micro-steps watched.
STEPS, ACCUM = 4, 2


def watch(run, syncs: HostSyncs) -> dict:
    trainer = Trainer(run)
    engine, watched = run.training.engine, {"micro_steps": 0}
    take_step = engine._take_model_step

    def paused_step(*a, **k):  # DeepSpeed's optimiser step: allowed one sync per step
        with syncs.pause():
            return take_step(*a, **k)
    engine._take_model_step = paused_step

    class PausedIter:  # the next batch: the loader's host work, not the step's
        def __init__(self, it):
            self.it = it

        def __next__(self):
            with syncs.pause():
                batch = next(self.it)
            watched["micro_steps"] += syncs.recording
            return batch

    step = trainer._step

    def recorded_step(it, window):
        log_step = (run.state.step + 1) % run.cfg.train.log_every == 0
        if log_step or run.state.step == 0:
            return step(it, window)
        with syncs:
            return step(PausedIter(it), window)
    trainer._step = recorded_step
    try:
        trainer.fit()
    finally:
        trainer.close()
    return watched


def main(data: str, out_dir: str, report: str, objectives: list[str]) -> None:
    ds = load_ds_config("ds_configs/zero3_cpu.json")
    results = {}
    for name in objectives:
        preset = "clip" if name == "siglip" else name
        cfg = load_config("clip_tiny_synthetic", [
            f"objective.preset={preset}",
            *(["objective.contrastive=siglip"] if name == "siglip" else []),
            "objective.mask_distill.prototypes=64", "objective.local_global.prototypes=64",
            "objective.local_global.local_crops=2",
            f"data.train_shards={data}/train/shard-{{000000..000001}}.tar",
            f"data.tokenizer={data}/spm.model", f"eval.shards={data}/eval/shard-000000.tar",
            f"eval.classes={data}/eval/classes.json", "data.workers=0", "data.shuffle_buffer=16",
            "train.micro_batch_size=4",
            f"train.grad_accum_steps={ACCUM}", f"train.steps={STEPS}",
            f"train.log_every={STEPS}", "train.ckpt_every=0", "train.tensorboard=false",
            f"train.output_dir={out_dir}/{name.replace('+', '_')}"])
        syncs = HostSyncs()
        watched = watch(build_run(cfg, ds), syncs)
        results[name] = {"events": syncs.events, "summary": syncs.summary(), **watched}
    with open(report, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(","))

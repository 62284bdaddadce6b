"""Train a small GPT-2-shaped model with the Hugging Face Trainer and DiLoCo, 4 workers on a LocalSwarm.

    bash scripts/setup.sh dev                    # or: pip install -e '.[hf]'
    .venv/bin/python examples/hf_trainer.py      # 1 to 2 minutes on 2 CPU cores
    .venv/bin/python examples/hf_trainer.py --algorithm streaming --steps 600 --resume

Each worker is a `LowcommTrainer` of its own (its model copy, data shard and
output folder) running ``Trainer.train()`` in a thread of one `LocalSwarm`;
the Trainer's own loop, AdamW, cosine schedule and checkpoints, with DiLoCo
as the outer optimizer. The model is GPT-2's architecture at toy size built
from a config (nothing downloaded), the data the built-in text corpus (the
Python standard library's sources, byte by byte). It prints worker 0's loss
per logging step with the outer rounds and bytes moved so far, then every
worker's bytes and the held-out loss. Checkpoints go to
``runs/hf_trainer/worker<r>/checkpoint-<step>``, the outer state in
``lowcomm_state.safetensors`` + ``.json``; ``--resume`` continues from the
last one (raise ``--steps`` to train further).
"""

from __future__ import annotations

import argparse
import time

from transformers import PrinterCallback, TrainerCallback, TrainingArguments
from transformers.utils import logging as hf_logging

from lowcomm import LocalSwarm
from lowcomm.integrations.transformers import LowcommTrainer, TokenBlocks, gpt2_config, make_model
from lowcomm.sim.report import format_bytes


class PrintLoss(TrainerCallback):
    """One line per logging step: ``step N: loss X, lr Y, outer rounds R, sent S, received B``."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            print(f"step {state.global_step:4d}: loss {logs['loss']:.4f}, lr {logs['learning_rate']:.2e}, "
                  f"outer rounds {logs['lowcomm/outer_rounds']}, sent {format_bytes(logs['lowcomm/bytes_sent'])}, "
                  f"received {format_bytes(logs['lowcomm/bytes_received'])}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per worker")
    p.add_argument("--algorithm", default="diloco", help="diloco, streaming, noloco, sparseloco, ddp or dgc")
    p.add_argument("--sync-every", type=int, default=20, help="H: optimizer steps between outer syncs")
    p.add_argument("--batch-size", type=int, default=16, help="blocks per worker per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--block-size", type=int, default=64, help="bytes per block (the model's context)")
    p.add_argument("--lr", type=float, default=3e-3, help="inner AdamW learning rate")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CPU too)")
    p.add_argument("--output-dir", default="runs/hf_trainer")
    p.add_argument("--resume", action="store_true", help="continue from each worker's last checkpoint")
    a = p.parse_args()
    hf_logging.disable_progress_bar()

    swarm = LocalSwarm(a.workers)
    trainers = []
    for rank in range(a.workers):  # built here, not in the threads: the Trainer sets process-wide state
        args = TrainingArguments(
            output_dir=f"{a.output_dir}/worker{rank}", max_steps=a.steps, per_device_train_batch_size=a.batch_size,
            gradient_accumulation_steps=a.grad_accum, learning_rate=a.lr, lr_scheduler_type="cosine",
            warmup_steps=max(a.steps // 20, 1), weight_decay=0.0, bf16=a.bf16, use_cpu=True,
            seed=0, data_seed=rank,  # each worker its own data order, from a generator of its own
            logging_steps=a.sync_every, save_steps=max(a.steps // 2, 1), save_total_limit=2,
            prediction_loss_only=True, per_device_eval_batch_size=64, report_to="none", disable_tqdm=True)
        trainer = LowcommTrainer(
            model=make_model(0, gpt2_config(n_positions=a.block_size)), args=args,
            train_dataset=TokenBlocks(a.block_size, rank=rank, workers=a.workers),
            eval_dataset=TokenBlocks(a.block_size, split="validation", limit=256),
            averager=swarm.averager(rank), algorithm=a.algorithm, outer_options={"sync_every": a.sync_every})
        trainer.remove_callback(PrinterCallback)
        if rank == 0:
            trainer.add_callback(PrintLoss())
        trainers.append(trainer)

    print(f"{a.workers} workers, {a.algorithm}, H={a.sync_every}, "
          f"{sum(p.numel() for p in trainers[0].model.parameters()):,} parameters; worker 0:")
    t0 = time.monotonic()
    swarm.run(lambda rank, _: trainers[rank].train(resume_from_checkpoint=a.resume or None))
    print(f"trained in {time.monotonic() - t0:.1f} s")
    for rank, t in enumerate(trainers):
        s, eval_loss = t.outer.stats, t.evaluate()["eval_loss"]
        print(f"worker {rank}: {s.inner_steps} steps, {s.outer_rounds} outer rounds, "
              f"sent {format_bytes(s.bytes_sent)}, received {format_bytes(s.bytes_received)}, "
              f"held-out loss {eval_loss:.4f}")
    print(f"checkpoints: {a.output_dir}/worker*/checkpoint-*")


if __name__ == "__main__":
    main()

"""LowcommTrainer: the Hugging Face Trainer with DiLoCo, 2 workers on a LocalSwarm;
the outer state in the Trainer's checkpoints and a bitwise resume."""

import copy
import shutil

import pytest
import torch

pytest.importorskip("transformers", reason="needs the hf extra: pip install 'lowcomm[hf]'")
pytest.importorskip("accelerate", reason="needs the hf extra: pip install 'lowcomm[hf]'")

from transformers import TrainerCallback, TrainingArguments  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from lowcomm import LocalSwarm  # noqa: E402
from lowcomm.checkpoint import CheckpointError, load_state  # noqa: E402
from lowcomm.integrations.transformers import (  # noqa: E402
    RNG_NAME, STATE_NAME, LowcommTrainer, TokenBlocks, gpt2_config, make_model,
)
from lowcomm.tasks import load_task  # noqa: E402

hf_logging.disable_progress_bar()

WORKERS, STEPS, SAVE_AT, H, BLOCK = 2, 24, 12, 4, 32


class Snapshot(TrainerCallback):
    """Copies of the optimizer's and scheduler's state at the end of step ``at``
    (before the Trainer saves its checkpoint) and right after a resume's load."""

    def __init__(self, at: int):
        self.at, self.saved, self.loaded = at, None, None

    def on_step_end(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        if state.global_step == self.at:
            self.saved = copy.deepcopy({"optimizer": optimizer.state_dict(), "scheduler": lr_scheduler.state_dict()})

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        self.loaded = copy.deepcopy({"optimizer": optimizer.state_dict(), "scheduler": lr_scheduler.state_dict()})


def trainers(root, swarm, **overrides):
    out = []
    for rank in range(WORKERS):
        settings = dict(output_dir=str(root / f"worker{rank}"), max_steps=STEPS, per_device_train_batch_size=8,
                        learning_rate=3e-3, lr_scheduler_type="cosine", warmup_steps=2, logging_steps=4,
                        save_steps=SAVE_AT, report_to="none", disable_tqdm=True, seed=0, data_seed=rank, use_cpu=True)
        trainer = LowcommTrainer(model=make_model(0, gpt2_config(n_positions=BLOCK)),
                                 args=TrainingArguments(**{**settings, **overrides}),
                                 train_dataset=TokenBlocks(BLOCK, rank=rank, workers=WORKERS),
                                 averager=swarm.averager(rank), outer_options={"sync_every": H},
                                 callbacks=[Snapshot(SAVE_AT)])
        out.append(trainer)
    return out


def snapshot(trainer) -> Snapshot:
    return next(c for c in trainer.callback_handler.callbacks if isinstance(c, Snapshot))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One run of STEPS steps that checkpoints at SAVE_AT, then a run resumed from that checkpoint."""
    root = tmp_path_factory.mktemp("hf")
    swarm = LocalSwarm(WORKERS)
    full = trainers(root / "full", swarm)
    swarm.run(lambda rank, _: full[rank].train())
    swarm = LocalSwarm(WORKERS)
    resumed = trainers(root / "resumed", swarm)
    swarm.run(lambda rank, _: resumed[rank].train(
        resume_from_checkpoint=str(root / "full" / f"worker{rank}" / f"checkpoint-{SAVE_AT}")))
    return root, full, resumed


def assert_same(a, b, where="state"):
    """Equal trees: tensors torch.equal with the same dtype, lists and tuples alike."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_loss_falls_and_outer_rounds_happen(runs):
    _, full, _ = runs
    for t in full:
        losses = [h["loss"] for h in t.state.log_history if "loss" in h]
        assert len(losses) == STEPS // 4
        assert losses[-1] < losses[0] - 1.0, losses
        assert t.outer.stats.inner_steps == STEPS and t.outer.stats.outer_rounds == STEPS // H
        assert t.outer.stats.last_group_size == WORKERS
        # the Trainer's scheduler sets the inner optimizer's learning rate (cosine, down to ~0 at the end)
        assert t.outer.param_groups is t.outer.inner.param_groups
        assert t.outer.inner.param_groups[0]["lr"] == t.lr_scheduler.get_last_lr()[0] < 1e-4
        last = t.state.log_history[-1]
        assert last["lowcomm/outer_rounds"] == STEPS // H and last["lowcomm/bytes_sent"] == t.outer.stats.bytes_sent > 0
    # after the last round every worker holds the global weights
    assert all(torch.equal(a, b) for a, b in zip(full[0].model.parameters(), full[1].model.parameters()))


def test_checkpoint_holds_the_outer_state_as_safetensors_and_json(runs):
    root, full, _ = runs
    for rank, t in enumerate(full):
        folder = root / "full" / f"worker{rank}" / f"checkpoint-{SAVE_AT}"
        names = {p.name for p in folder.iterdir()}
        assert {f"{STATE_NAME}.safetensors", f"{STATE_NAME}.json", f"{RNG_NAME}.safetensors", f"{RNG_NAME}.json",
                "model.safetensors", "trainer_state.json"} <= names
        assert not names & {"optimizer.pt", "scheduler.pt", "rng_state.pth"}  # the Trainer's pickled files
        state, meta = load_state(folder / STATE_NAME)
        assert meta == {"optimizer": "DiLoCo"}
        assert state["optimizer"]["step"] == SAVE_AT and state["optimizer"]["rounds"] == [SAVE_AT // H]
        assert_same(snapshot(t).saved, state)


def test_resume_restores_the_outer_state_and_continues_bitwise(runs):
    _, full, resumed = runs
    for a, b in zip(full, resumed):
        assert b.outer.param_groups is b.outer.inner.param_groups
        assert_same(snapshot(a).saved, snapshot(b).loaded)  # inner state, phi, momentum, counters, scheduler
        assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))
        assert_same(a.outer.global_params, b.outer.global_params)
        final = [t.outer.state_dict() for t in (a, b)]
        for state in final:
            del state["stats"]["wait_s"]  # seconds blocked on the swarm: a clock, not state
        assert_same(*final, "final")
        after = [[h["loss"] for h in t.state.log_history if "loss" in h and h["step"] > SAVE_AT] for t in (a, b)]
        assert after[0] == after[1] and len(after[0]) == (STEPS - SAVE_AT) // 4


def test_gradient_accumulation_and_bf16_step_every_worker(tmp_path):
    # accelerate's per-process GradientState would skip steps of Trainers in other threads
    swarm = LocalSwarm(WORKERS)
    ts = trainers(tmp_path, swarm, max_steps=8, gradient_accumulation_steps=3, bf16=True, save_strategy="no",
                  per_device_train_batch_size=4)
    swarm.run(lambda rank, _: ts[rank].train())
    for t in ts:
        assert t.accelerator.mixed_precision == "bf16"
        assert t.outer.stats.inner_steps == t.state.global_step == 8 and t.outer.stats.outer_rounds == 8 // H
    assert all(torch.equal(a, b) for a, b in zip(ts[0].model.parameters(), ts[1].model.parameters()))


def test_a_checkpoint_without_outer_state_is_refused(runs, tmp_path):
    root, _, _ = runs
    folder = tmp_path / "plain"
    shutil.copytree(root / "full" / "worker0" / f"checkpoint-{SAVE_AT}", folder)
    for suffix in (".safetensors", ".json"):
        (folder / STATE_NAME).with_suffix(suffix).unlink()
    t = trainers(tmp_path / "again", LocalSwarm(WORKERS))[0]
    with pytest.raises(CheckpointError, match="not written by LowcommTrainer"):
        t.train(resume_from_checkpoint=str(folder))


def test_unknown_outer_option_names_the_ones_it_takes(tmp_path):
    with pytest.raises(ValueError, match="does not take fragments; its outer_options are .*sync_every"):
        LowcommTrainer(model=make_model(0), args=TrainingArguments(output_dir=str(tmp_path), report_to="none"),
                       averager=LocalSwarm(1).averager(0), algorithm="diloco", outer_options={"fragments": 2})


def test_token_blocks_shard_the_corpus():
    a, b = (TokenBlocks(BLOCK, rank=r, workers=2) for r in range(2))
    whole = TokenBlocks(BLOCK)
    assert torch.equal(a[3]["input_ids"], whole[6]["input_ids"])
    assert torch.equal(b[3]["input_ids"], whole[7]["input_ids"])
    assert a[0]["input_ids"].dtype == torch.int64 and a[0]["input_ids"].shape == (BLOCK,)
    assert len(TokenBlocks(BLOCK, split="validation", limit=5)) == 5
    with pytest.raises(ValueError, match="rank=2"):
        TokenBlocks(BLOCK, rank=2, workers=2)


def test_join_task_trains_the_same_model():
    task = load_task("lowcomm.integrations.transformers.gpt2:task", batch_size=4)
    model = task.make_model(0)
    assert all(torch.equal(p, q) for p, q in zip(model.lm.parameters(), make_model(0, gpt2_config()).parameters()))
    x, y = next(task.batches(0, 1, 0))
    logits = model(x)
    assert logits.shape == (*x.shape, 256)
    assert abs(task.loss(model, (x, y)).item() - torch.log(torch.tensor(256.0)).item()) < 0.1

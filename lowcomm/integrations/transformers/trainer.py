"""`LowcommTrainer`: the Hugging Face `Trainer`, with an outer optimizer around its own.

The Trainer keeps everything it does: its loop, its inner optimizer (from
``args.optim``, ``learning_rate``, ``weight_decay``, betas ... or the one passed
in ``optimizers=``), its LR scheduler, gradient accumulation, gradient
clipping, mixed precision, logging and checkpoints. lowcomm adds three things:

- **The outer optimizer.** `LowcommTrainer.create_optimizer` builds the inner
  optimizer as the Trainer would and wraps it in the outer algorithm named by
  ``algorithm`` (any of `lowcomm.optimizers.registry.ALGORITHMS`: ``diloco``,
  ``streaming``, ``noloco``, ``sparseloco``, ``ddp``, ``dgc``) with
  ``outer_options`` (``sync_every`` and the algorithm's constructor
  arguments; unset ones take the same defaults as ``lowcomm join``). An outer
  optimizer's ``param_groups`` are the inner one's, so the Trainer's LR
  scheduler, which it builds on this optimizer, sets the inner learning rate.
- **Checkpoints.** Each checkpoint folder gets ``lowcomm_state.safetensors``
  + ``.json`` (`lowcomm.checkpoint.save_state`: checksummed, written
  atomically, nothing pickled) in place of the Trainer's ``optimizer.pt`` and
  ``scheduler.pt``: the outer optimizer's full ``state_dict()`` (inner
  optimizer state, global weights phi, outer momentum, step and round
  counters, error-feedback residuals, fragments in flight) and the LR
  scheduler's; and ``lowcomm_rng.*`` (Python's, numpy's and torch's global
  generators) in place of ``rng_state.pth`` (whose numpy state
  ``torch.load(weights_only=True)`` refuses under numpy 2 with transformers
  5.24, so a plain Trainer could not resume here at all).
  ``train(resume_from_checkpoint=...)`` restores them, so a resumed run
  continues bitwise where the saved one was (the Trainer restores the
  weights, its step counter and the data order). The Trainer's other files
  stay as it writes them (``model.safetensors``, ``trainer_state.json``, and
  ``training_args.bin``, a pickle of the arguments it never reads back).
- **Logs.** Every log record gets ``lowcomm/outer_rounds``,
  ``lowcomm/bytes_sent`` and ``lowcomm/bytes_received`` (wire bytes since the
  run began, restored on resume).

How the Trainer's features meet the outer step:

- *Gradient accumulation*: the Trainer calls ``step()`` once per
  ``gradient_accumulation_steps`` micro-batches, so ``sync_every`` (H) counts
  optimizer steps, as it counts ``global_step``.
- *Mixed precision*: ``bf16=True`` (and ``fp16=True``) autocast the forward
  pass, on CPU too (tested); weights, inner state and the outer step stay
  fp32. With ``fp16=True`` on a GPU, accelerate's GradScaler calls
  ``step()`` only when the gradients are finite, so a skipped step does not
  count toward H (not run here: the build machine has no GPU).
- *accelerate's optimizer wrapper*: ``accelerate`` wraps the optimizer in an
  ``AcceleratedOptimizer`` that steps only when its ``GradientState`` says
  gradients are in sync. That state is one per process, shared by every
  Trainer in it; with several Trainers in one process (`LocalSwarm` threads)
  and gradient accumulation, one worker's micro-step would turn another's
  real step into a no-op. The Trainer only calls ``step()`` on sync steps
  anyway, so without a GradScaler (everything but fp16) `LowcommTrainer`
  steps the outer optimizer directly. fp16 keeps the wrapper: do not combine
  fp16, gradient accumulation and several Trainers in one process.

A Trainer is one worker: one process (or one `LocalSwarm` thread), not
DeepSpeed, FSDP or a ``torchrun`` group (`LowcommTrainer` refuses those).
Several Trainers in one process share torch's global random generator, so
for runs that repeat exactly give each a ``data_seed`` and use a model
without dropout (as `examples/hf_trainer.py` and the model of
`lowcomm.integrations.transformers.gpt2` do).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from accelerate.optimizer import AcceleratedOptimizer
from transformers import Trainer

from lowcomm.averaging import Averager
from lowcomm.checkpoint import CheckpointError, load_state, save_state
from lowcomm.optimizers.base import OuterOptimizer
from lowcomm.optimizers.registry import get_algorithm

#: The outer state's file name in a checkpoint folder, without suffix (``.safetensors`` and ``.json``).
STATE_NAME = "lowcomm_state"
#: The global random generators' states, beside it.
RNG_NAME = "lowcomm_rng"

log = logging.getLogger(__name__)


class LowcommTrainer(Trainer):
    """A `transformers.Trainer` whose optimizer is a lowcomm outer optimizer
    (see the module docstring).

    Args:
        *args, **kwargs: what `Trainer` takes.
        averager: the network: ``LocalSwarm(n).averager(rank)`` for workers in
            one process, a `lowcomm.p2p.Swarm` for real peers.
        algorithm: the outer algorithm's name (``lowcomm.optimizers.registry``) ["diloco"].
        outer_options: ``sync_every`` (H, optimizer steps between syncs [20, as
            ``lowcomm join``]) and the algorithm's other settings, e.g.
            ``{"sync_every": 100, "outer_lr": 0.7, "compressor": "int8"}``.
    """

    def __init__(self, *args, averager: Averager, algorithm: str = "diloco",
                 outer_options: Mapping[str, Any] | None = None, **kwargs):
        spec = get_algorithm(algorithm)
        unknown = spec.ignored(outer_options or {})
        if unknown:
            takes = sorted({*spec.options, *(("sync_every",) if spec.periodic else ())})
            raise ValueError(f"algorithm {algorithm!r} does not take {', '.join(unknown)}; "
                             f"its outer_options are {', '.join(takes) or 'none'}")
        self.outer_settings = spec.settings(outer_options)
        self.averager = averager
        super().__init__(*args, **kwargs)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled or self.args.world_size > 1:
            raise ValueError("LowcommTrainer trains one worker per process; it does not run under DeepSpeed, FSDP "
                             "or torchrun with several processes. Start one Trainer per worker, each with its "
                             "own averager")

    @property
    def outer(self) -> OuterOptimizer:
        """The outer optimizer (built when training starts)."""
        opt = self._outer_or_none()
        if opt is None:
            raise RuntimeError("the outer optimizer is built when training starts: call train() "
                               "(or create_optimizer()) first")
        return opt

    def _outer_or_none(self) -> OuterOptimizer | None:
        opt = self.optimizer.optimizer if isinstance(self.optimizer, AcceleratedOptimizer) else self.optimizer
        return opt if isinstance(opt, OuterOptimizer) else None

    def create_optimizer(self, model=None):
        """The Trainer's optimizer (built from ``args`` as usual, or the one given in
        ``optimizers=``) as the inner optimizer of the outer algorithm."""
        if isinstance(self.optimizer, OuterOptimizer):
            return self.optimizer
        inner = super().create_optimizer() if model is None else super().create_optimizer(model)  # no model: 5.0
        opt_model = self.model if model is None else model
        ours = {id(p) for group in inner.param_groups for p in group["params"]}
        named = [(name, p) for name, p in opt_model.named_parameters() if id(p) in ours]
        self.optimizer = get_algorithm(self.outer_settings.algorithm).build(self.outer_settings, named, inner,
                                                                            self.averager)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """The Trainer's LR scheduler, on the unwrapped outer optimizer (see `_unwrap_optimizer`)."""
        self._unwrap_optimizer()
        return super().create_scheduler(num_training_steps, optimizer)

    def training_step(self, *args, **kwargs):
        """The Trainer's training step, after `_unwrap_optimizer` (for Trainers that
        wrap the optimizer after building the scheduler)."""
        self._unwrap_optimizer()
        return super().training_step(*args, **kwargs)

    def _unwrap_optimizer(self) -> None:
        """Step the outer optimizer directly rather than through accelerate's wrapper
        where no GradScaler needs the wrapper (see the module docstring)."""
        opt = self.optimizer
        if isinstance(opt, AcceleratedOptimizer) and isinstance(opt.optimizer, OuterOptimizer) and opt.scaler is None:
            self.optimizer = opt.optimizer

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """Write the outer optimizer's and the LR scheduler's state as ``STATE_NAME``
        (safetensors + JSON) into the checkpoint folder."""
        if not self.args.should_save:
            return
        state = {"optimizer": self.outer.state_dict(), "scheduler": self.lr_scheduler.state_dict()}
        try:
            save_state(Path(output_dir) / STATE_NAME, state, meta={"optimizer": type(self.outer).__name__})
        except TypeError as e:
            raise CheckpointError(f"cannot write the state of {type(self.lr_scheduler).__name__} as safetensors + "
                                  f"JSON ({e}); use one of the Trainer's lr_scheduler_type schedules or a scheduler "
                                  "whose state_dict() holds only numbers, strings, lists and tensors") from None

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Restore what `_save_optimizer_and_scheduler` wrote; a checkpoint without it
        is refused (resuming without the outer state would silently start the
        outer algorithm over)."""
        if checkpoint is None:
            return
        path = Path(checkpoint) / STATE_NAME
        if not path.with_suffix(".json").exists():
            raise CheckpointError(f"{checkpoint} has no {STATE_NAME}.json: it was not written by LowcommTrainer, "
                                  "or with save_only_model=True. Resume from a LowcommTrainer checkpoint, or train "
                                  "without resume_from_checkpoint")
        state, meta = load_state(path)
        if meta.get("optimizer") != type(self.outer).__name__:
            raise CheckpointError(f"{path} holds the state of {meta.get('optimizer')}, this Trainer trains with "
                                  f"{type(self.outer).__name__}; build it with the algorithm of the saved run")
        self.outer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["scheduler"])

    def _save_rng_state(self, output_dir: str) -> None:
        """The global generators' states as ``RNG_NAME`` (safetensors + JSON), in place of
        the Trainer's pickled ``rng_state.pth``."""
        save_state(Path(output_dir) / RNG_NAME, rng_state())

    def _load_rng_state(self, checkpoint: str | None) -> None:
        """Restore what `_save_rng_state` wrote (process-wide: see the module docstring)."""
        if checkpoint is None:
            return
        path = Path(checkpoint) / RNG_NAME
        if not path.with_suffix(".json").exists():
            log.warning("%s has no %s.json: the random generators start from the seed, so dropout and "
                        "anything else drawing from them will not repeat the saved run", checkpoint, RNG_NAME)
            return
        set_rng_state(load_state(path)[0])

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The Trainer's log record, with the outer optimizer's rounds and wire bytes."""
        opt = self._outer_or_none()
        if opt is not None:
            stats = opt.stats
            logs = {**logs, "lowcomm/outer_rounds": stats.outer_rounds, "lowcomm/bytes_sent": stats.bytes_sent,
                    "lowcomm/bytes_received": stats.bytes_received}
        super().log(logs, start_time)


def rng_state() -> dict:
    """Python's, numpy's and torch's global generators (and CUDA's, where present), as a
    state `lowcomm.checkpoint.save_state` writes."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "mt": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                       "has_gauss": has_gauss, "cached_gaussian": cached},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned."""
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["mt"].tolist()), py["gauss"]))
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

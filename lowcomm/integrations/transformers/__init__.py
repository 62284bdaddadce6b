"""lowcomm inside the Hugging Face `Trainer` (``pip install 'lowcomm[hf]'``).

    from lowcomm.integrations.transformers import LowcommTrainer
    trainer = LowcommTrainer(model=model, args=args, train_dataset=data,
                             averager=swarm.averager(rank),        # or a lowcomm.p2p.Swarm
                             algorithm="diloco", outer_options={"sync_every": 50})
    trainer.train()
    trainer.train(resume_from_checkpoint=True)                    # outer state restored too

`LowcommTrainer` (`trainer.py`) wraps the Trainer's own optimizer in an outer
one and keeps the outer state in the Trainer's checkpoints; `gpt2.py` is a
GPT-2-shaped model on lowcomm's built-in text corpus, built from a config with
no download, as a torch Dataset for the Trainer and as a `lowcomm join` task
(``--task lowcomm.integrations.transformers.gpt2:task``).
"""

try:
    import accelerate  # noqa: F401
    import transformers  # noqa: F401
except ImportError as e:  # the extra is optional; say how to get it
    raise ImportError(f"lowcomm.integrations.transformers needs transformers and accelerate ({e}): "
                      "pip install 'lowcomm[hf]'") from e

from lowcomm.integrations.transformers.gpt2 import TokenBlocks, gpt2_config, make_model, task
from lowcomm.integrations.transformers.trainer import RNG_NAME, STATE_NAME, LowcommTrainer

__all__ = ["RNG_NAME", "STATE_NAME", "LowcommTrainer", "TokenBlocks", "gpt2_config", "make_model", "task"]

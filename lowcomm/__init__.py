"""lowcomm: train one model across many machines joined by slow, unreliable links.

    from lowcomm import DiLoCo, LocalSwarm
    swarm = LocalSwarm(4)
    opt = DiLoCo(model.parameters(), inner=torch.optim.AdamW(model.parameters()),
                 averager=swarm.averager(rank), sync_every=100)
"""

__version__ = "0.1.0"

_EXPORTS = {
    "DiLoCo": "lowcomm.optimizers", "StreamingDiLoCo": "lowcomm.optimizers", "NoLoCo": "lowcomm.optimizers",
    "SparseLoCo": "lowcomm.optimizers",
    "DataParallel": "lowcomm.optimizers", "CompressedDataParallel": "lowcomm.optimizers",
    "LocalSwarm": "lowcomm.sim", "get_compressor": "lowcomm.compressors", "ErrorFeedback": "lowcomm.compressors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    # imported on first use, so `lowcomm --version` does not load torch
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lowcomm' has no attribute {name!r}")

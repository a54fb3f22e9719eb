"""raybind's model library. Heavy submodules (torch, open_clip) load lazily on first attribute access,
so `import models.decode` in a data worker does not pay for the model code."""

import importlib as _importlib

_LAZY_EXPORTS = {
    "ModelConfig": "models.config", "TowerConfig": "models.config", "VideoTowerConfig": "models.config",
    "available_models": "models.config",
    "BindingModel": "models.binding", "BindingOutput": "models.binding", "split_batch": "models.binding",
    "ContrastiveLoss": "models.losses", "LossOutput": "models.losses", "pair_name": "models.losses",
    "LateFusion": "models.fusion", "AttentionFusion": "models.fusion", "BottleneckFusion": "models.fusion",
    "save_model": "models.checkpoint", "load_model": "models.checkpoint",
    "ConfigMismatchError": "models.checkpoint",
}


def __getattr__(name: str):
    module = _LAZY_EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    return getattr(_importlib.import_module(module), name)


def __dir__():
    return sorted(list(globals()) + list(_LAZY_EXPORTS))

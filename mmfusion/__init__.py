__version__ = "0.1.0"


def train(*args, **kwargs):
    "`mmfusion.train(config_or_path, overrides=(), resume=None)`: see `mmfusion.training.train` (imported on first call)"
    from .training import train as _train
    return _train(*args, **kwargs)

__version__ = "0.1.0"


def train(*args, **kwargs):
    "`mmfusion.train(config_or_path, overrides=(), resume=None)`: a run of any kind; see `mmfusion.runs.train` (imported on first call)"
    from .runs import train as _train
    return _train(*args, **kwargs)

"""What every config starts from: the typed settings' defaults (train/settings.py) as an
ml_collections ConfigDict, so that a config file and `--config.GROUP.FIELD=VALUE` override them
and `Settings.from_config` validates the result once, before anything runs."""
from train.settings import default_config


def base():
    return default_config()

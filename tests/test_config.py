"""Config: defaults, TOML round trip, --set overrides and the one-line errors."""

import pytest

from scalelab.config import Config, diff, from_dict, load_config, save_config
from scalelab.errors import ConfigError


def test_defaults_validate():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.data.name == "mnist1d" and cfg.train.batch_size > 0


def test_overrides_coerce_types():
    cfg = load_config(None, ["train.batch_size=512", "recipe.base_lr=0.4", "recipe.nesterov=true",
                             "recipe.milestones=3,6", "recipe.schedule=step", "model.norm=ghost",
                             "model.ghost_batch=64"])
    assert cfg.train.batch_size == 512 and isinstance(cfg.train.batch_size, int)
    assert cfg.recipe.base_lr == 0.4 and cfg.recipe.nesterov is True
    assert cfg.recipe.milestones == [3.0, 6.0]


def test_toml_round_trip_and_replay(tmp_path):
    cfg = load_config(None, ["recipe.optimizer=lamb", "train.epochs=2.5", "recipe.betas=[0.8, 0.99]"])
    save_config(cfg, tmp_path / "config.toml")
    assert load_config(tmp_path / "config.toml") == cfg
    assert from_dict(cfg.to_dict()) == cfg
    # --set on top of a file wins
    again = load_config(tmp_path / "config.toml", ["train.epochs=4"])
    assert again.train.epochs == 4.0 and again.recipe.optimizer == "lamb"
    assert diff(cfg, again) == ["train.epochs"]


@pytest.mark.parametrize("override, message", [
    ("train.batchsize=3", "unknown config key 'train.batchsize'; keys of [train]: name, batch_size"),
    ("trian.epochs=3", "unknown config section 'trian'; known: data, model, recipe, train, parallel"),
    ("train.batch_size=abc", "train.batch_size: expected an integer, got 'abc'"),
    ("train.batch_size=0", "train.batch_size: 0 is out of range; allowed: >= 1"),
    ("recipe.base_lr=0", "recipe.base_lr: 0.0 is out of range; allowed: > 0.0"),
    ("recipe.base_lr=nan", "recipe.base_lr: nan is not a finite number"),
    ("train.target_acc=1.5", "train.target_acc: 1.5 is out of range; allowed: <= 1.0"),
    ("recipe.optimizer=adam", "recipe.optimizer: 'adam' is not allowed; choose one of: sgd, lars, lamb"),
    ("recipe.nesterov=maybe", "recipe.nesterov: expected true or false, got 'maybe'"),
    ("epochs=3", "--set 'epochs=3': expected section.key=value"),
    ("train.batch_size=100", None),  # fine on its own
])
def test_bad_overrides_name_the_key(override, message):
    if message is None:
        load_config(None, [override])
        return
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="not divisible by parallel.emulate_workers"):
        load_config(None, ["train.batch_size=100", "parallel.emulate_workers=3"])
    with pytest.raises(ConfigError, match="ghost_batch: 48 must divide the per-worker batch 128"):
        load_config(None, ["train.batch_size=256", "parallel.emulate_workers=2", "model.norm=ghost",
                           "model.ghost_batch=48"])
    with pytest.raises(ConfigError, match="step schedule needs"):
        load_config(None, ["recipe.schedule=step"])
    with pytest.raises(ConfigError, match="dgc does the momentum itself .* not 'sgd' with precondition='kfac'"):
        load_config(None, ["compress.method=dgc", "recipe.precondition=kfac"])
    load_config(None, ["compress.method=dgc"])  # momentum SGD, the paper's optimizer


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nbatch_size = 3\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(bad)
    wrong = tmp_path / "wrong.toml"
    wrong.write_text("[train]\nbatch_size = 'big'\n")
    with pytest.raises(ConfigError, match=r"wrong.toml: train.batch_size: expected an integer"):
        load_config(wrong)
    flat = tmp_path / "flat.toml"
    flat.write_text("epochs = 3\n")
    with pytest.raises(ConfigError, match="top-level key 'epochs' must be a \\[section\\]"):
        load_config(flat)

import dataclasses

import pytest

from onerec.config import PRESET_DIR, ConfigError, load_config, to_dict


@pytest.mark.parametrize("preset", ["debug", "small", "full"])
def test_every_preset_loads_and_is_frozen(preset):
    cfg = load_config(preset)
    assert cfg.preset == preset
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.d_model = 1  # type: ignore[misc]


def test_presets_scale_up():
    debug, small, full = (load_config(p) for p in ("debug", "small", "full"))
    assert debug.model.d_model < small.model.d_model < full.model.d_model
    assert debug.data.max_users > 0 and full.data.max_users == 0


def test_overrides_parse_yaml_values():
    cfg = load_config("debug", ["model.d_model=256", "model.n_heads=4", "data.live_fraction=0.5",
                                "model.arch=v1", "kafka.user_events.partitions=8"])
    assert cfg.model.d_model == 256 and cfg.model.n_heads == 4
    assert cfg.data.live_fraction == 0.5 and cfg.model.arch == "v1"
    assert cfg.kafka.user_events.partitions == 8
    assert to_dict(cfg)["model"]["d_model"] == 256


def test_int_is_accepted_for_float_fields():
    assert load_config("debug", ["stack.startup_timeout_s=5"]).stack.startup_timeout_s == 5.0


@pytest.mark.parametrize("override, names", [
    ("model.d_modl=3", "model.d_modl"),
    ("modle.d_model=3", "modle"),
    ("model.d_model=abc", "model.d_model"),
    ("model.d_model=true", "model.d_model"),
    ("model.d_model=1.5", "model.d_model"),
    ("model.d_model=33", "model.d_model"),          # not divisible by n_heads=2
    ("stack.kafka_port=80", "stack.kafka_port"),
    ("model.arch=v3", "model.arch"),
    ("data.live_fraction=1.5", "data.live_fraction"),
    ("data.dataset=netflix", "data.dataset"),
    ("kafka.dlq.partitions=0", "kafka.dlq.partitions"),
    ("kafka.dlq.name=bad topic", "kafka.dlq.name"),
    ("model.top_k_experts=5", "model.top_k_experts"),
    ("model.item_embedding=false", "model.item_attributes"),     # debug uses attributes and the dense head
    ("model.dense_loss_weight=-1", "model.dense_loss_weight"),
    ("model.dense_loss_weight=0", "model.dense_score_weight"),   # a weight for a head that is not there
    ("serving.gil_switch_ms=0", "serving.gil_switch_ms"),
    ("serving.pin_cpus=true", "serving.pin_cpus"),               # debug: model_threads 0 (torch's default)
    ("model", "model"),
])
def test_bad_overrides_name_the_key(override, names):
    with pytest.raises(ConfigError) as err:
        load_config("debug", [override])
    assert names in str(err.value)


def test_unknown_key_in_a_file_suggests_the_right_one(tmp_path):
    text = (PRESET_DIR / "debug.yaml").read_text().replace("  d_model:", "  d_modle:")
    path = tmp_path / "typo.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"model\.d_modle': unknown key \(did you mean 'model\.d_model'\?\)"):
        load_config(str(path))


def test_missing_key_and_unknown_preset(tmp_path):
    text = (PRESET_DIR / "debug.yaml").read_text().replace("  dropout: 0.0\n", "")
    path = tmp_path / "short.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"model\.dropout': missing"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="presets: debug, full, small"):
        load_config("nope")


def test_data_root_from_environment(monkeypatch, tmp_path):
    cfg = load_config("debug")
    assert cfg.data.root_path().name == "data"
    monkeypatch.setenv("ONEREC_DATA_ROOT", str(tmp_path))
    assert cfg.data.root_path() == tmp_path

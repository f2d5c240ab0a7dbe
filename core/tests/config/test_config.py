import pytest
import yaml

from vlp_core.clip import METHOD, ClipConfig
from vlp_core.config import RunConfig, apply_overrides, dump_yaml, from_dict, to_dict


def test_override_coerces_by_type():
    cfg = METHOD.preset("demo")
    apply_overrides(cfg, ["optim.lr=3e-4", "train.steps=7", "data.resampled=true", "loss.kind=siglip",
                          "model.vision.pool=avg"])
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
    assert cfg.data.resampled is True
    assert cfg.loss.kind == "siglip"
    assert cfg.model.vision.pool == "avg"


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", "did you mean 'lr'"),
        ("trian.steps=1", "did you mean 'train'"),
        ("train.steps=abc", "expects int"),
        ("train.steps=1.5", "expects an integer"),
        ("loss.kind=cosine", "must be one of"),
        ("data.resampled=maybe", "expects a boolean"),
        ("train.steps", "key=value"),
        ("optim.lr.x=1", "is a value, not a section"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    cfg = METHOD.preset("demo")
    with pytest.raises(ValueError, match=message):
        apply_overrides(cfg, [override])


def test_yaml_round_trip_equals_original():
    cfg = METHOD.preset("demo")
    apply_overrides(cfg, ["optim.lr=1e-2", "loss.kind=siglip"])
    text = dump_yaml(cfg)
    fresh = METHOD.preset("smoke")
    from_dict(fresh, yaml.safe_load(text))
    assert to_dict(fresh) == to_dict(cfg)


def test_yaml_unknown_key_is_an_error():
    cfg = METHOD.preset("demo")
    with pytest.raises(ValueError, match="unknown config key 'train.stepz'.*did you mean 'steps'"):
        from_dict(cfg, {"train": {"stepz": 3}})


def test_unknown_preset_suggests():
    with pytest.raises(ValueError, match="did you mean 'demo'"):
        METHOD.preset("dmeo")


def test_validate_rejects_indivisible_batch():
    cfg = METHOD.preset("demo")
    apply_overrides(cfg, ["train.batch_size=10", "train.accum_steps=3"])
    with pytest.raises(ValueError, match="not divisible"):
        cfg.validate()


def test_every_preset_validates():
    for name in METHOD.presets:
        cfg = METHOD.preset(name)
        cfg.validate()
        assert isinstance(cfg.loss, ClipConfig) and isinstance(cfg, RunConfig)

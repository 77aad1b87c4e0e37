"""Typed config sections: unknown keys, types, ranges and choices are errors that say what is
valid; method hyperparameters and run configs are checked the same way."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import pytest

from adapters.config import RunConfigError, load_run_config
from adapters.methods import METHODS, AETConfig, DeepClusterConfig, SeLaConfig, SimCLRConfig
from adapters.schema import SchemaError, Section, UnknownKeyError, at_least, check_value, one_of
from tests.helpers import REPO


@dataclass(frozen=True)
class Probe(Section):
    label: ClassVar[str] = "eval.linear"
    layer: str = "conv5"
    epochs: int = field(default=10, metadata=at_least(1))
    recipe: str = field(default="standardized", metadata=one_of("standardized", "reglog"))
    scale: tuple[float, float] = (0.8, 1.2)
    limit: int | None = None


def test_section_checks_keys_types_ranges_and_choices():
    p = Probe.from_any({"epochs": 3, "scale": [1, 2]})
    assert p == Probe(epochs=3, scale=(1.0, 2.0))  # ints pass for floats, lists for tuples
    assert p.to_dict() == {"layer": "conv5", "epochs": 3, "recipe": "standardized",
                           "scale": [1.0, 2.0], "limit": None}
    assert Probe.from_any(p, epochs=4).epochs == 4
    with pytest.raises(UnknownKeyError, match=r"unknown key\(s\) \['epoch'\] in eval.lin; "
                                              r"valid ones: layer, epochs, recipe, scale, limit"):
        Probe.from_any({"epoch": 3}, where="eval.lin")
    for bad, match in [({"epochs": 0}, r"eval.linear.epochs=0 must be >= 1"),
                       ({"recipe": "x"}, r"recipe='x' must be one of 'standardized', 'reglog'"),
                       ({"scale": [1]}, r"scale expects tuple\[float, float\]"),
                       ({"epochs": True}, r"epochs expects int, got True"),
                       ({"limit": "a"}, r"limit expects int \| None")]:
        with pytest.raises(SchemaError, match=match):
            Probe.from_any(bad)


def test_unknown_key_is_also_a_type_error():
    assert issubclass(UnknownKeyError, TypeError)  # as a dataclass's own unexpected keyword
    with pytest.raises(UnknownKeyError, match=r"unknown hyperparameter\(s\) \['ncl'\] .*valid "
                                              "ones: hc, k"):
        SeLaConfig.from_any({"ncl": 10})


@pytest.mark.parametrize("cls, bad, match", [
    (SeLaConfig, {"lamb": 0}, "lamb=0.0 must be a finite number > 0"),
    (SeLaConfig, {"label_pass": "noisy"}, "label_pass='noisy' must be one of 'clean', "),
    (DeepClusterConfig, {"kmeans_backend": "sklearn"}, "one of 'auto', 'torch', 'faiss'"),
    (DeepClusterConfig, {"pca_epsilon": 1.0}, r"pca_epsilon=1.0 must be in \[0, 1\)"),
    (AETConfig, {"scale": [1.2, 0.8]}, "0 < low <= high"),
    (SimCLRConfig, {"hidden_dim": 0}, "hidden_dim=0 must be >= 1"),
])
def test_method_configs_check_ranges_and_choices(cls, bad, match):
    with pytest.raises(SchemaError, match=match):
        cls.from_any(bad)


def test_run_config_names_come_from_the_registries():
    with pytest.raises(RunConfigError, match="methods: " + ", ".join(METHODS)):
        load_run_config({"method": {"name": "moco"}})
    with pytest.raises(RunConfigError, match="unknown backbone 'vit'; valid names: alexnet, "
                                             "alexnet_cifar, nin, resnet18_cifar"):
        load_run_config({"method": {"name": "sela"}, "backbone": {"name": "vit"}})
    with pytest.raises(RunConfigError, match="takes no argument.*depth.*it takes: width"):
        load_run_config({"method": {"name": "sela"}, "backbone": {"name": "alexnet_cifar",
                                                                  "depth": 3}})
    with pytest.raises(RunConfigError, match="unknown hyperparameter.*'ncl'.*method 'sela'"):
        load_run_config({"method": {"name": "sela", "ncl": 10}})


@pytest.mark.parametrize("override, match", [
    ("eval.linear={layer: conv5, epoch: 3}", r"unknown key\(s\) \['epoch'\] in eval.linear"),
    ("eval.knn.k=many", "eval.knn.k expects int"),
    ("eval.nonlinear={epochs: 3}", "eval.nonlinear needs 'layer'"),
    ("data.augment=[simclr, jitter]", "preset 'jitter' is unknown; presets: none, crop_flip"),
    ("train.epochs=-1", "train.epochs=-1 must be >= 0"),
    ("recon.layer=3", "recon.layer expects"),
])
def test_run_config_sections_are_checked(override, match):
    with pytest.raises(RunConfigError, match=match):
        load_run_config({"method": {"name": "sela"}}, [override])


def test_plain_form_keeps_what_was_written():
    cfg = load_run_config({"method": {"name": "sela", "lamb": 10},
                           "eval": {"knn": {"layers": ["fc7"]},
                                    "linear": {"layer": "conv5", "epochs": 2}},
                           "recon": {"weight": 0.5}})
    plain = cfg.to_dict()
    assert plain["method"] == {"name": "sela", "lamb": 10}  # no defaults added to open sections
    assert plain["eval"]["knn"] == {"layers": ["fc7"], "k": 200, "temperature": 0.1}
    assert plain["eval"]["linear"] == {"layer": "conv5", "epochs": 2}
    assert plain["recon"] == {"weight": 0.5} and plain["train"]["milestones"] == []
    assert cfg.method.config.lamb == 10.0 and cfg.method.config.hc == 10  # typed, defaulted
    assert load_run_config(plain).to_dict() == plain


def test_eval_sections_have_the_protocols_real_keywords():
    """The typed eval sections hold exactly the keyword arguments of the protocols' functions
    (besides the layer key), so a config key is valid iff the function takes it."""
    from adapters.config import ProbeConfig, protocol_keywords

    for kind, section in ProbeConfig.SECTIONS.items():
        layer_key = ProbeConfig.PROTOCOLS[kind][1]
        assert set(section.keys()) - {layer_key} == set(protocol_keywords(kind)), kind


@pytest.mark.parametrize("override, match", [
    ("eval.knn.tempreature=0.5", r"unknown key\(s\) \['tempreature'\] in eval.knn; valid ones: "
                                 r"layers, pool, k, temperature, num_classes, chunk_size"),
    ("eval.knn.k=0", r"eval.knn.k=0 must be >= 1"),
    ("eval.knn.temperature=0", r"eval.knn.temperature=0.0 must be a finite number > 0"),
    ("eval.knn.pool=mean", r"eval.knn.pool='mean' must be one of 'none', 'flatten', 'avg'"),
    ("eval.knn.layers=[]", r"eval.knn.layers is empty"),
    ("eval.knn.layers=[conv5, conv5]", r"names \['conv5'\] twice"),
    ("eval.linear={layer: conv5, recipe: mae}", r"recipe='mae' must be one of 'standardized', "
                                                 r"'reglog'"),
    ("eval.linear={layer: conv5, val_fraction: 1}", r"val_fraction=1.0 must be in \(0, 1\)"),
    ("eval.linear={layer: conv5, weight_decay: [0.1, -1]}", r"weight_decay=\[0.1, -1.0\] must "
                                                             r"be >= 0"),
    ("eval.linear={layer: conv5, weight_decay: []}", r"needs at least one value"),
    ("eval.linear={layer: conv5, lr_schedule: cosine}", r"lr_schedule='cosine' must be one of "
                                                         r"'plateau', 'deepcluster'"),
    ("eval.nonlinear={layer: conv2, batch_size: 1}", r"eval.nonlinear.batch_size=1 must be >= 2"),
    ("eval.nonlinear={layer: conv2, milestones: [0]}", r"milestones=\[0\] must be epochs >= 1"),
    ("train.device=gpu", r"train.device='gpu' is not a device; use auto, cpu, cuda"),
    ("train.milestones=[0, 10]", r"train.milestones=\[0, 10\] must be epochs >= 1"),
    ("data.per_class=0", r"data.per_class=0 must be >= 1"),
    ("data.batch_size=0", r"data.batch_size=0 must be >= 1"),
    ("data.download=yes please", r"data.download expects bool"),
    ("data.augment=[{preset: simclr, bogus: 1}]", r"unknown field\(s\) \['bogus'\]; valid ones: "
                                                  r"preset, crop,"),
    ("data.augment=[{preset: simclr, scale: [2, 1]}]", r"scale must satisfy 0 < min <= max"),
    ("run.overwrite=true", None),
])
def test_every_value_is_checked_before_training(override, match):
    overrides = [override, "run.resume=true"] if override.startswith("run.") else [override]
    match = match or "run.resume and run.overwrite exclude each other"
    with pytest.raises(RunConfigError, match=match):
        load_run_config({"method": {"name": "sela"}}, overrides)


def test_download_is_a_data_key_that_resume_ignores():
    from adapters.config import config_diff

    a = load_run_config({"method": {"name": "sela"}})
    b = load_run_config({"method": {"name": "sela"}}, ["data.download=true"])
    assert b.data.download is True and b.to_dict()["data"]["download"] is True
    assert config_diff(a, b) == []
    old = a.to_dict()
    del old["data"]["download"]  # a checkpoint written before the key existed
    assert config_diff(old, b) == []


def test_yaml_syntax_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method:\n  name: sela\n  k: [1, 2\n")
    with pytest.raises(RunConfigError, match=r"bad.yaml is not valid YAML: .* at line \d+, "
                                             r"column \d+"):
        load_run_config(bad)
    with pytest.raises(RunConfigError,
                       match=r"override 'train.epochs=\[1': the value is not valid YAML"):
        load_run_config({"method": {"name": "sela"}}, ["train.epochs=[1"])
    with pytest.raises(RunConfigError, match="is a folder"):
        load_run_config(tmp_path)


def test_a_number_yaml_read_as_text_gets_the_spelling_that_fixes_it():
    with pytest.raises(SchemaError, match=r"lr expects float, got '1e-3' \(str\). YAML reads "
                                          r"'1e-3' as text; write 1.0e-3"):
        check_value("1e-3", float, "lr")
    with pytest.raises(SchemaError, match=r"\(str\)\.$"):  # no hint for plain text
        check_value("fast", float, "lr")


@pytest.mark.parametrize("images, ok", [(0, True), (None, True), (2, True), (1, False),
                                        (-1, False)])
def test_bn_recalibration_needs_two_images_or_none(tmp_path, images, ok):
    from adapters.config import EvalConfig

    if ok:
        assert EvalConfig.from_any({"bn_recalibration_images": images}).bn_recalibration_images \
            == images
    else:
        with pytest.raises(SchemaError, match=r"must be 0 or null \(off\), or at least 2"):
            EvalConfig.from_any({"bn_recalibration_images": images})


@pytest.mark.parametrize("overrides, expected", [
    (["train.milestones=[1]"], ["train.milestones [1] are read by train.lr_schedule=step only"]),
    (["train.lr_schedule=step"], ["train.lr_schedule=step without train.milestones keeps"]),
    (["train.lr_schedule=step", "train.milestones=[1, 3, 4]"],
     ["train.milestones [3, 4] are at or after train.epochs=3"]),
    (["run.stop_after_epoch=3"], ["run.stop_after_epoch=3 is not before train.epochs=3"]),
    (["run.stop_after_epoch=1", "run.save_checkpoints=false"],
     ["run.stop_after_epoch=1 with run.save_checkpoints=false leaves no checkpoint"]),
    (["eval.nonlinear={layer: conv5, epochs: 4, milestones: [2, 4]}"],
     ["eval.nonlinear.milestones [4] are at or after eval.nonlinear.epochs=4"]),
    # what can take effect, and a run with no epochs (the untrained reference)
    (["train.lr_schedule=step", "train.milestones=[1, 2]", "run.stop_after_epoch=2"], []),
    (["train.lr_schedule=cosine", "eval.nonlinear={layer: conv5, epochs: 4}"], []),
    (["train.epochs=0", "train.milestones=[160]", "run.stop_after_epoch=5"], []),
])
def test_settings_that_cannot_take_effect_are_named(overrides, expected):
    cfg = load_run_config({"method": {"name": "supervised"}, "train": {"epochs": 3}}, overrides)
    found = cfg.ineffective()
    assert len(found) == len(expected)
    assert all(f.startswith(e) for f, e in zip(found, expected))


@pytest.mark.parametrize("key, value", [("lr", ".inf"), ("momentum", ".inf"),
                                        ("weight_decay", ".nan")])
def test_a_number_with_a_range_must_be_finite(key, value):
    """``.inf`` passed ``>= 0`` and failed only at the first step; NaN said ``>= 0`` too."""
    with pytest.raises(RunConfigError, match=rf"train.{key}=(inf|nan) must be a finite number "
                                             r"\(>= 0"):
        load_run_config(REPO / "benchmarks/configs/smoke/sela.yaml", [f"train.{key}={value}"])

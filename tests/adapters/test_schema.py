"""Typed config sections: unknown keys, types, ranges and choices are errors that say what is
valid; method hyperparameters and run configs are checked the same way."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import pytest

from adapters.config import RunConfigError, load_run_config
from adapters.methods import METHODS, AETConfig, DeepClusterConfig, SeLaConfig, SimCLRConfig
from adapters.schema import SchemaError, Section, UnknownKeyError, at_least, one_of


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
    with pytest.raises(TypeError):
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

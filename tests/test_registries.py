"""Registries are the single source of names: config validation accepts exactly what each registry
holds and its error lists the registry's names; the planner takes every method."""

import pytest

from distributed import REPO
from mtpeft.config import load_config
from mtpeft.data.schedule import SAMPLERS
from mtpeft.errors import ConfigError
from mtpeft.kernels.bottleneck_adapter_reference import ACTIVATIONS
from mtpeft.profile.planner import parse_peft
from mtpeft.tasks.formats import FORMATS
from mtpeft.tasks.kinds import KINDS
from mtpeft.trainer.weighting import WEIGHTINGS
from mtpeft.tuners.registry import METHODS

DEMO = REPO / "configs" / "demo.yaml"
REGISTRIES = {"peft.method": METHODS, "sampler.kind": SAMPLERS, "weighting.kind": WEIGHTINGS,
              "peft.adapter_activation": ACTIVATIONS}


@pytest.mark.parametrize("key", list(REGISTRIES))
def test_config_accepts_every_registered_name_and_lists_them_on_a_typo(key):
    needs = {"static": ["weighting.weights={defect: 1, clone: 1, search: 1, codegen: 1}"]}  # checked at load
    for name in REGISTRIES[key]:
        section, field = key.split(".")
        assert getattr(getattr(load_config(DEMO, [f"{key}={name}", *needs.get(name, [])]), section), field) == name
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, [f"{key}=no_such_name"])
    assert f"{key} must be one of {', '.join(REGISTRIES[key])}" in str(err.value)


def test_every_format_gives_a_registered_kind():
    assert {f.kind for f in FORMATS.values()} <= set(KINDS)
    assert set(KINDS) <= {f.kind for f in FORMATS.values()}  # no kind without a dataset format


def test_planner_takes_every_method():
    for name in METHODS:
        spec = parse_peft(name)
        assert spec.method == ("lora" if name == "mtl_lora" else name)


def test_planner_defaults_are_the_trainers():
    """``plan --peft METHOD`` without options plans what ``mtpeft train`` builds with ``peft.method``
    alone: the same rank, alpha, virtual tokens and bottleneck (read here from a config, not from the
    settings classes the planner reads)."""
    for name, option, key in (("lora", "r", "r"), ("lora", "alpha", "alpha"), ("prompt", "n", "num_virtual_tokens"),
                              ("prefix", "n", "num_virtual_tokens"), ("serial_adapter", "bottleneck", "bottleneck"),
                              ("parallel_adapter", "bottleneck", "bottleneck")):
        trained = getattr(load_config(DEMO, [f"peft={{method: {name}}}"]).peft.settings(), key)
        assert parse_peft(name).get(option) == trained, (name, option)

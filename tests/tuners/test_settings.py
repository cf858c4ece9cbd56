"""Each PEFT method has its own settings dataclass, registered beside its tuner; the flat ``peft:``
section users write is built from those classes, and each class checks its own keys."""

import dataclasses
from dataclasses import dataclass

import pytest

from distributed import REPO
from mtpeft.config import PeftConfig, load_config
from mtpeft.errors import ConfigError
from mtpeft.tuners import registry
from mtpeft.tuners.adapters import AdapterSettings
from mtpeft.tuners.ia3 import IA3Settings
from mtpeft.tuners.lora import LoraSettings, LoraTuner
from mtpeft.tuners.settings import MethodSettings, positive, settings_fields

DEMO = REPO / "configs" / "demo.yaml"


def test_every_method_registers_a_settings_dataclass_and_the_section_is_their_keys():
    keys = {"method"}
    for name, method in registry.METHODS.items():
        assert dataclasses.is_dataclass(method.settings) and issubclass(method.settings, MethodSettings), name
        keys |= set(registry.method_keys(name))
    assert {f.name for f in dataclasses.fields(PeftConfig)} == keys
    assert registry.method_keys("serial_adapter") == ("bottleneck", "adapter_activation", "adapter_scaling")
    assert registry.method_keys("ia3") == ("ia3_target_modules", "ia3_feedforward_modules")


@pytest.mark.parametrize("method,cls,expected", [
    ("lora", LoraSettings, {"r": 4, "alpha": 32.0, "dropout": 0.05}),
    ("mtl_lora", LoraSettings, {"r": 4}),
    ("serial_adapter", AdapterSettings, {"bottleneck": 8, "activation": "gelu", "scaling": 1.0}),
    ("ia3", IA3Settings, {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}),
])
def test_the_chosen_method_reads_its_settings_from_the_flat_section(method, cls, expected):
    cfg = load_config(DEMO, [f"peft.method={method}", "peft.r=4", "peft.bottleneck=8",
                             "peft.adapter_activation=gelu", "peft.dropout=0.05"])
    settings = cfg.peft.settings()
    assert type(settings) is cls
    assert {k: getattr(settings, k) for k in expected} == expected
    assert cfg.to_dict()["peft"]["bottleneck"] == 8  # the section keeps every key, as config.yaml always had


@pytest.mark.parametrize("override,message", [
    ("peft.r=0", "peft.r must be positive, got 0"),
    ("peft.dropout=1.0", "peft.dropout must be in [0, 1), got 1.0"),
    ("peft.bottleneck=-1", "peft.bottleneck must be positive, got -1"),
    ("peft.adapter_activation=tanh", "peft.adapter_activation must be one of relu, gelu, gelu_tanh, silu, got 'tanh'"),
    ("peft.adapter_scaling=.inf", "peft.adapter_scaling must be a finite number, got inf"),
    ("peft.ia3_feedforward_modules=[o_proj]", "peft.ia3_feedforward_modules ['o_proj'] are not in"),
    ("peft.prefix_hidden=0", "peft.prefix_hidden must be positive, got 0"),
    ("peft.num_virtual_tokens=0", "peft.num_virtual_tokens must be positive, got 0"),
])
def test_each_settings_class_checks_its_keys_with_the_file_named(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, [override])
    assert str(err.value).startswith(f"{DEMO}: ") and message in str(err.value)


def test_a_key_no_method_reads_is_an_unknown_key_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown config key peft.bottlenek; did you mean peft.bottleneck\?"):
        load_config(DEMO, ["peft.bottlenek=4"])


@dataclass
class _DoraSettings(MethodSettings):
    r: int = 16
    magnitude_lr: float = 0.1

    def check(self) -> None:
        positive("magnitude_lr", self.magnitude_lr)


def test_a_new_method_is_one_registry_line_and_its_keys_become_valid_yaml(monkeypatch):
    monkeypatch.setitem(registry.METHODS, "dora", registry.Method(LoraTuner, _DoraSettings))
    cfg = load_config(DEMO, ["peft.method=dora", "peft.magnitude_lr=0.5"])
    assert cfg.peft.settings() == _DoraSettings(r=16, magnitude_lr=0.5)
    with pytest.raises(ConfigError, match="peft.magnitude_lr must be positive"):
        load_config(DEMO, ["peft.magnitude_lr=0"])
    monkeypatch.undo()
    assert registry.peft_section_class() is PeftConfig  # the registry's own section is back


def test_methods_sharing_a_key_must_agree_on_its_default(monkeypatch):
    @dataclass
    class Clash(MethodSettings):
        r: int = 8

    monkeypatch.setitem(registry.METHODS, "clash", registry.Method(LoraTuner, Clash))
    with pytest.raises(TypeError, match="peft.r: methods disagree"):
        registry.peft_section_class()


def test_settings_fields_name_the_yaml_keys():
    assert list(settings_fields(AdapterSettings)) == ["bottleneck", "adapter_activation", "adapter_scaling"]


def test_keys_the_chosen_method_does_not_read_are_named_with_their_readers():
    """LoRA's dropout on a serial adapter changes nothing: a notice names it (not an error: a config may
    hold every method's keys to switch with --set peft.method=...). Defaults are never named."""
    from mtpeft.config import load_config
    from mtpeft.tuners.registry import unread_settings

    def unread(*sets):
        return unread_settings(load_config("demo", list(sets)).peft)

    assert unread() == {} and unread("peft.method=serial_adapter") == {}  # the demo's LoRA keys are defaults
    assert unread("peft.method=serial_adapter", "peft.dropout=0.1") == {"dropout": ["lora", "mtl_lora"]}
    assert unread("peft.method=prefix", "peft.bottleneck=8", "peft.r=4") == {
        "r": ["lora", "mtl_lora"], "bottleneck": ["serial_adapter", "parallel_adapter"]}
    assert unread("peft.method=mtl_lora", "peft.r=8", "peft.dropout=0.1") == {}  # MTL-LoRA reads LoRA's keys

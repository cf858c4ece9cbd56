"""The T5 prefix reaches the encoder's self-attentions through a carrier each injected model owns:
no class attribute carries it, so two models in one process never read each other's prefix."""

import torch

from tiny_backbones import tiny_backbone
from mtpeft.config import PeftConfig, RunConfig, TaskConfig
from mtpeft.trainer.build import assemble
from mtpeft.tuners.prefix import PrefixCarrier, T5PrefixAttention


def _model():
    cfg = RunConfig(peft=PeftConfig(method="prefix", num_virtual_tokens=3),
                    tasks=[TaskConfig(name="defect", kind="classify", head_dropout=0.0)])
    return assemble(tiny_backbone("t5"), cfg).eval()


def test_each_t5_prefix_model_has_its_own_carrier():
    first, second = _model(), _model()
    assert first.input_module.carrier is not second.input_module.carrier
    attentions = [m for m in first.backbone.modules() if isinstance(m, T5PrefixAttention)]
    assert attentions and all(a.carrier is first.input_module.carrier for a in attentions)
    ids = torch.randint(3, first.backbone.config.vocab_size, (2, 5))
    with torch.no_grad():
        first.backbone_inputs(ids, torch.ones_like(ids))
    assert first.input_module.carrier.tokens == 3 and first.input_module.carrier.cache is not None
    assert second.input_module.carrier.cache is None and second.input_module.carrier.tokens == 0
    assert "cache" not in vars(PrefixCarrier) and "tokens" not in vars(PrefixCarrier)

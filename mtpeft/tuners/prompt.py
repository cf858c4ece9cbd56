"""Prompt tuning shared by all tasks: ``num_virtual_tokens`` learned embeddings before every input.

The backbone gets ``inputs_embeds = [prompt; embed(input_ids)]`` and an attention mask extended by
ones; the virtual positions are stripped from its outputs (``virtual``) before pooling and before the
generation loss. The prompt starts as the embeddings of random vocabulary tokens (Lester et al.).
Exported as HF peft's PROMPT_TUNING (``prompt_embeddings [P, hidden]``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from mtpeft.tuners.base import InputModule, Tuner, check_virtual_positions, peft_task_type
from mtpeft.tuners.gather import gathered
from mtpeft.tuners.settings import MethodSettings, positive


@dataclass
class PromptSettings(MethodSettings):
    """``peft.num_virtual_tokens``: the learned tokens put before every input."""

    num_virtual_tokens: int = 20

    def check(self) -> None:
        positive("num_virtual_tokens", self.num_virtual_tokens)


def decoder_positions(mask: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Positions that skip padding, so a left-padded row reads like an unpadded one."""
    return (offset + mask.long().cumsum(-1) - 1).clamp_min(0)


class PromptInput(InputModule):
    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.virtual = init.shape[0]
        self.embedding = nn.Embedding(init.shape[0], init.shape[1], _weight=init.clone())  # zero.Init-safe

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, embed: nn.Module,
                decoder: bool) -> dict:
        words = embed(input_ids)
        b = input_ids.shape[0]
        index = torch.arange(self.virtual, device=input_ids.device)
        prompt = self.embedding(index).unsqueeze(0).expand(b, -1, -1).to(words.dtype)
        mask = torch.cat([attention_mask.new_ones(b, self.virtual), attention_mask], dim=1)
        out = {"inputs_embeds": torch.cat([prompt, words], dim=1), "attention_mask": mask}
        if decoder:
            out["position_ids"] = decoder_positions(mask)
        return out


class PromptTuner(Tuner):
    name = "prompt"
    hf_peft = True

    def check(self, model_config, gradient_checkpointing: bool, max_seq_len: int = 0) -> None:
        check_virtual_positions(model_config, self.settings.num_virtual_tokens, max_seq_len)

    def inject(self, backbone: nn.Module) -> PromptInput:
        table = backbone.get_input_embeddings().weight
        with gathered([table]):
            rows = torch.randint(0, table.shape[0], (self.settings.num_virtual_tokens,))
            init = table.detach()[rows].float().clone()
        self.token_dim = init.shape[1]  # the parameter's own shape is a ZeRO-3 partition later
        return PromptInput(init)

    def named_tensors(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return {"prompt_embeddings": model.input_module.embedding.weight}

    def peft_config(self, model: nn.Module, base_model_name_or_path: str):
        from peft import PromptTuningConfig

        cfg = model.backbone.config
        return PromptTuningConfig(num_virtual_tokens=self.settings.num_virtual_tokens,
                                  token_dim=self.token_dim,
                                  num_transformer_submodules=1, num_attention_heads=cfg.num_attention_heads,
                                  num_layers=cfg.num_hidden_layers, prompt_tuning_init="RANDOM",
                                  task_type=peft_task_type(model), base_model_name_or_path=base_model_name_or_path)

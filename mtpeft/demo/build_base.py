"""Build the demo's tiny Llama-architecture base model offline: a BPE tokenizer trained on a code
corpus, then a short causal-LM pretraining on that corpus.

The committed checkpoint in ``mtpeft/assets/demo/base_model`` came from this script; rebuild it with

    python -m mtpeft.demo.build_base --out mtpeft/assets/demo/base_model --seconds 150
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from mtpeft.demo.synth_tasks import code_corpus

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<sep>"]


def train_tokenizer(corpus: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", sep_token="<sep>")


def tiny_llama_config(vocab_size: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       rms_norm_eps=1e-5, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
                       eos_token_id=2)


def _batches(ids: list[int], seq: int, batch: int, gen: torch.Generator):
    data = torch.tensor(ids)
    n = (len(data) - 1) // seq
    while True:
        for chunk in torch.randperm(n, generator=gen).split(batch):
            x = torch.stack([data[i * seq:(i + 1) * seq] for i in chunk.tolist()])
            yield x


def build(out: Path, seconds: float, vocab_size: int = 2048, seq: int = 128, batch: int = 16,
          seed: int = 0, max_steps: int = 100000) -> dict:
    torch.manual_seed(seed)
    corpus = code_corpus()
    tokenizer = train_tokenizer(corpus, vocab_size)
    model = LlamaForCausalLM(tiny_llama_config(len(tokenizer)))
    stream: list[int] = []
    for doc in corpus:
        stream += [tokenizer.bos_token_id] + tokenizer(doc)["input_ids"] + [tokenizer.eos_token_id]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    start, step, loss = time.time(), 0, float("nan")
    for step, x in enumerate(_batches(stream, seq, batch, gen), 1):
        lr = 3e-3 * min(1.0, step / 100)
        for g in opt.param_groups:
            g["lr"] = lr
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if step % 100 == 0:
            print(f"step {step} loss {loss.item():.3f} ppl {math.exp(loss.item()):.1f}", flush=True)
        if time.time() - start > seconds or step >= max_steps:
            break
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return {"steps": step, "loss": float(loss), "tokens": len(stream), "params": sum(p.numel() for p in model.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="mtpeft/assets/demo/base_model")
    parser.add_argument("--seconds", type=float, default=150)
    parser.add_argument("--max-steps", type=int, default=100000)
    args = parser.parse_args()
    print(build(Path(args.out), args.seconds, max_steps=args.max_steps))


if __name__ == "__main__":
    main()

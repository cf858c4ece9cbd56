"""The task kinds: how examples of each kind are encoded, batched, trained on and scored."""

from __future__ import annotations

from mtpeft.config import TaskConfig, TrainConfig
from mtpeft.tasks.classification import Classify, PairClassify
from mtpeft.tasks.clustering import Cluster
from mtpeft.tasks.generation import Generate
from mtpeft.tasks.program_synthesis import ProgramSynthesis
from mtpeft.tasks.retrieval import Retrieve


def make_kind(task: TaskConfig, train: TrainConfig):
    if task.kind == "classify":
        return Classify()
    if task.kind == "pair_classify":
        return PairClassify()
    if task.kind == "cluster":
        return Cluster(temperature=train.retrieval_temperature)
    if task.kind == "retrieve":
        return Retrieve(temperature=train.retrieval_temperature)
    if task.kind == "generate":
        return Generate(max_new_tokens=task.max_new_tokens)
    if task.kind == "program_synthesis":
        return ProgramSynthesis(max_new_tokens=task.max_new_tokens, seed=train.seed)
    raise ValueError(task.kind)  # config validation names the key before we get here

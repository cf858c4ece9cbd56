"""The task kinds: how examples of each kind are encoded, batched, trained on and scored.

``KINDS`` is the only list of kind names: config validation reads it, and ``make_kind`` builds a
task's kind object from its ``tasks[i]`` and ``train`` sections.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mtpeft.tasks.classification import Classify, PairClassify
from mtpeft.tasks.clustering import Cluster
from mtpeft.tasks.generation import Generate
from mtpeft.tasks.program_synthesis import ProgramSynthesis
from mtpeft.tasks.retrieval import Retrieve

if TYPE_CHECKING:
    from mtpeft.config import TaskConfig, TrainConfig

KINDS = {
    Classify.name: lambda task, train: Classify(),
    PairClassify.name: lambda task, train: PairClassify(),
    Cluster.name: lambda task, train: Cluster(temperature=train.retrieval_temperature),
    Retrieve.name: lambda task, train: Retrieve(temperature=train.retrieval_temperature),
    Generate.name: lambda task, train: Generate(max_new_tokens=task.max_new_tokens),
    ProgramSynthesis.name: lambda task, train: ProgramSynthesis(max_new_tokens=task.max_new_tokens, seed=train.seed),
}
TASK_KINDS = tuple(KINDS)


def make_kind(task: TaskConfig, train: TrainConfig):
    return KINDS[task.kind](task, train)  # config validation names the key before an unknown kind gets here

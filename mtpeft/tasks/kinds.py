"""The task kinds registry: the only list of kind names. Config validation reads it, and
``make_kind`` builds a task's kind object from its ``tasks[i]`` and ``train`` sections.

A new kind is a ``TaskKind`` subclass in its own file (``tasks/task_kind.py`` says what it must
answer) plus one line here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mtpeft.tasks.classification import Classify, PairClassify
from mtpeft.tasks.clustering import Cluster
from mtpeft.tasks.generation import Generate
from mtpeft.tasks.program_synthesis import ProgramSynthesis
from mtpeft.tasks.retrieval import Retrieve
from mtpeft.tasks.task_kind import TaskKind

if TYPE_CHECKING:
    from mtpeft.config import TaskConfig, TrainConfig

KINDS: dict[str, type[TaskKind]] = {
    Classify.name: Classify,
    PairClassify.name: PairClassify,
    Cluster.name: Cluster,
    Retrieve.name: Retrieve,
    Generate.name: Generate,
    ProgramSynthesis.name: ProgramSynthesis,
}


def make_kind(task: TaskConfig, train: TrainConfig) -> TaskKind:
    return KINDS[task.kind].from_config(task, train)  # config validation names an unknown kind first

"""What the studio's routers share: the workspace and the services on it."""

from __future__ import annotations

from dataclasses import dataclass

from cflowad.line.served import ServedModels
from cflowad.studio.jobs import TrainingQueue
from cflowad.studio.live import LiveSources
from cflowad.studio.review import ModelReview
from cflowad.studio.runs import ScoringRuns
from cflowad.studio.workspace import Workspace

__all__ = ["Studio"]


@dataclass(frozen=True)
class Studio:
    """One studio's parts, as :func:`cflowad.studio.app.create_studio` builds them."""

    workspace: Workspace
    host: ServedModels  # the models served, and the compute pool they score on
    queue: TrainingQueue
    runs: ScoringRuns
    review: ModelReview
    live: LiveSources
    csrf: str  # the page's token, which the state carries

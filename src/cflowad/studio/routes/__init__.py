"""The studio's API, one router a view of the page (``state``: what every view reads)."""

from cflowad.studio.routes import feedback, live, models, review, state, threshold

__all__ = ["VIEWS"]

# in the order the page's tabs show them
VIEWS = (state, models, review, threshold, feedback, live)

"""cflowad: CFLOW-AD unsupervised anomaly detection with localization."""

__version__ = "0.1.0"

from cflowad.config import Config as Config
from cflowad.errors import UserError as UserError
from cflowad.model import CFlowAD as CFlowAD
from cflowad.model import Prediction as Prediction

__all__ = ["CFlowAD", "Config", "Prediction", "UserError", "__version__"]

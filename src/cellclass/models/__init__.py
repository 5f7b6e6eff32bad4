"""Models: one registry for pixel baselines, LeNet-5 and every timm backbone.

>>> from cellclass.models import create_model
>>> net = create_model("resnet18", in_chans=4, heads={"particle": 3, "dose": 4})
>>> logits = net(images)  # {"particle": (N, 3), "dose": (N, 4)}  # doctest: +SKIP

Networks are ``torch.nn.Module`` objects returning a dict of logits per task; baselines
are scikit-learn style estimators whose ``predict_proba`` returns a dict of
probabilities per task. Both carry ``name`` and ``config`` (``create_model(**config)``
rebuilds the architecture).
"""

from cellclass.data.spec import TASK_TYPES

# baselines and lenet register their models with the registry when imported
from cellclass.models.baselines import (
    LogRegBaseline,
    MLPBaseline,
    PixelBaseline,
    SVMBaseline,
)
from cellclass.models.lenet import LeNet5
from cellclass.models.network import MultiHeadNetwork
from cellclass.models.registry import (
    ModelInfo,
    count_parameters,
    create_model,
    is_baseline,
    is_model,
    list_models,
    model_info,
    register_model,
)
from cellclass.models.timm_backbone import TimmNetwork

__all__ = [
    "TASK_TYPES",
    "LeNet5",
    "LogRegBaseline",
    "MLPBaseline",
    "ModelInfo",
    "MultiHeadNetwork",
    "PixelBaseline",
    "SVMBaseline",
    "TimmNetwork",
    "count_parameters",
    "create_model",
    "is_baseline",
    "is_model",
    "list_models",
    "model_info",
    "register_model",
]

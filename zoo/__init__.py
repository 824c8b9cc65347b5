"""The mdeq model zoo: named architectures per task, pretrained weights with model cards.

>>> import zoo
>>> zoo.list_models(details=True)
>>> model = zoo.create("mdeq_digits", pretrained=True)
>>> zoo.card("mdeq_digits")["metrics"]
"""

from zoo.registry import ZooEntry, card, create, entry, list_models, register_model, register_pretrained
from zoo.weights import WeightsError, load_weights, read_tensors, save_weights, sha256_of
from zoo import architectures  # noqa: F401,E402  (registers the architectures and pretrained entries)
from zoo.timm_models import register_all as _register_with_timm  # noqa: E402

_register_with_timm(list_models())

__all__ = [
    "WeightsError",
    "ZooEntry",
    "card",
    "create",
    "entry",
    "list_models",
    "load_weights",
    "read_tensors",
    "register_model",
    "register_pretrained",
    "save_weights",
    "sha256_of",
]

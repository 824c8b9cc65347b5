"""The mdeq model zoo: named architectures per task, pretrained weights with typed model cards.

>>> import zoo
>>> zoo.list_models(details=True)
>>> model = zoo.create("mdeq_digits", pretrained=True)
>>> zoo.card("mdeq_digits").metrics.test_accuracy
"""

from zoo.card import CardError, ModelCard, read_card, write_card
from zoo.registry import UnknownModelError, ZooEntry, card, create, entry, list_models, register_model
from zoo.weights import WeightsError, load_weights, read_tensors, save_weights, sha256_of
from zoo import architectures  # noqa: F401,E402  (declares the models and their shipped weights)

if "timm" in __import__("sys").modules:  # else mdeq.timm_hook registers them when timm is imported
    from zoo.timm_models import register_all as _register_with_timm

    _register_with_timm()

__all__ = [
    "CardError",
    "ModelCard",
    "UnknownModelError",
    "WeightsError",
    "ZooEntry",
    "card",
    "create",
    "entry",
    "list_models",
    "load_weights",
    "read_card",
    "read_tensors",
    "register_model",
    "save_weights",
    "sha256_of",
    "write_card",
]

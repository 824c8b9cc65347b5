"""The mdeq model zoo: named architectures per task (models and weights land with issue #5).

>>> import zoo
>>> zoo.list_models()
"""

from zoo.registry import create, list_models, register_model
from zoo import architectures  # noqa: F401  (registers the architectures)

__all__ = ["create", "list_models", "register_model"]

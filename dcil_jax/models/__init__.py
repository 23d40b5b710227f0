"""Plain Flax linen models: nothing DCIL-specific inside (the library lifts them from outside)."""

from dcil_jax.models.resnet_cifar import ResNetCifar, resnet20, resnet32, resnet56
from dcil_jax.models.small_cnn import SmallCNN

MODELS = {"resnet20": resnet20, "resnet32": resnet32, "resnet56": resnet56, "small_cnn": SmallCNN}


def create_model(name: str, num_classes: int, **kwargs):
  """A model by name, e.g. ``create_model("resnet20", 10)``."""
  if name not in MODELS:
    raise ValueError(f"Unknown model {name!r}; expected one of {sorted(MODELS)}.")
  return MODELS[name](num_classes=num_classes, **kwargs)


__all__ = ["MODELS", "ResNetCifar", "SmallCNN", "create_model", "resnet20", "resnet32", "resnet56"]

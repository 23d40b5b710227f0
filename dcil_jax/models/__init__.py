"""Plain Flax linen models: nothing DCIL-specific inside (the library lifts them from outside)."""

from dcil_jax.models.mnist1d import MNIST1DCNN, ResNet1D
from dcil_jax.models.resnet_cifar import ResNetCifar, resnet8, resnet20, resnet32, resnet56
from dcil_jax.models.resnet_imagenet import ResNet, resnet18, resnet50, resnet_tiny
from dcil_jax.models.small_cnn import SmallCNN
from dcil_jax.models.vgg import VGG, vgg16
from dcil_jax.models.wrn import WideResNet, wrn28_2

MODELS = {
  "resnet8": resnet8,
  "resnet20": resnet20,
  "resnet32": resnet32,
  "resnet56": resnet56,
  "wrn28_2": wrn28_2,
  "vgg16": vgg16,
  "resnet18": resnet18,
  "resnet50": resnet50,
  "resnet_tiny": resnet_tiny,
  "small_cnn": SmallCNN,
  "mnist1d_cnn": MNIST1DCNN,
  "resnet1d": ResNet1D,
}


def create_model(name: str, num_classes: int, **kwargs):
  """A model by name, e.g. ``create_model("resnet20", 10)``."""
  if name not in MODELS:
    raise ValueError(f"Unknown model {name!r}; expected one of {sorted(MODELS)}.")
  return MODELS[name](num_classes=num_classes, **kwargs)


__all__ = [
  "MNIST1DCNN",
  "MODELS",
  "VGG",
  "ResNet",
  "ResNet1D",
  "ResNetCifar",
  "SmallCNN",
  "WideResNet",
  "create_model",
  "resnet8",
  "resnet18",
  "resnet20",
  "resnet32",
  "resnet50",
  "resnet56",
  "resnet_tiny",
  "vgg16",
  "wrn28_2",
]

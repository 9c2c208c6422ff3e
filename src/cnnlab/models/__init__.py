"""The model zoo: importing this package registers every model family."""

from cnnlab.models import (  # noqa: F401
    alexnet,
    convnet,
    densenet,
    detection,
    fcn,
    googlenet,
    resnet,
    vgg,
)

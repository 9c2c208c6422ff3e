"""The model zoo: importing this package registers every model family."""

from cnnlab.models import alexnet, convnet, densenet, googlenet, resnet, vgg  # noqa: F401

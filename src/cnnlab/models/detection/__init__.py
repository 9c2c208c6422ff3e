"""The detectors, one file per family as the notes name them (rcnn, sppnet, fast_rcnn,
faster_rcnn, yolov1) over shared parts: ``contract`` (``Detector``, ``DetectLimits``) and
``roi_heads`` (the R-CNN family's heads). Importing this package registers every detector."""

from cnnlab.models.detection import (  # noqa: F401
    fast_rcnn,
    faster_rcnn,
    rcnn,
    sppnet,
    yolov1,
)
from cnnlab.models.detection.contract import (
    EVAL_LIMITS,
    PREDICT_LIMITS,
    DetectLimits,
    Detector,
    graph_decoder,
)

__all__ = ["EVAL_LIMITS", "PREDICT_LIMITS", "DetectLimits", "Detector", "graph_decoder"]

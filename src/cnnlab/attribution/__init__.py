"""Attribution maps of any model (``cnnlab.attribution.maps``). This file names the methods
only, without importing torch, so the command line's parser can offer them."""

CAM_METHODS = ("gradcam", "gradcam++", "scorecam", "eigencam")
PIXEL_METHODS = ("ig", "occlusion", "saliency")
METHODS = CAM_METHODS + PIXEL_METHODS
__all__ = ["CAM_METHODS", "METHODS", "PIXEL_METHODS"]

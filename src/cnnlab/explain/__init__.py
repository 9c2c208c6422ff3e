"""Explain a run's predictions (``cnnlab explain``) and check that the explanations mean
something (``cnnlab explain --audit``); ``cnnlab.attribution`` computes the maps.

- ``predictions``: ``explain`` and ``explain_files``, the entry points for any run.
- ``inputs``: what every explanation starts from (the run, its layer, the model's input and
  where that input lies in the image, ``View``).
- ``class_maps``: a classifier's class or a segmenter's class region, one map per image.
- ``box_maps``: a detector's boxes, one map per box.
- ``sanity_checks``: cascading randomisation, rank correlation, deletion and insertion.
- ``audit``: those checks run over a run's images, and their table.
"""

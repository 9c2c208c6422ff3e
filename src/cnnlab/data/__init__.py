"""Image data: the one image lister and reader, the one split, each task's data sets and
transforms, checking and cleaning, and the built-in data (digits, shapes).

Importing this package imports no scikit-learn (``write_digits`` does, when called).
"""

"""cnnlab's version, in a module of its own so that anything may import it without the
package's lazy public names (``cnnlab/__init__.py``)."""

__version__ = "0.1.0"

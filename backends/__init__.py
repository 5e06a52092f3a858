"""Built-in layerctl backends (installed as layerctl.backends): tiny, tiny-xl, sd15, sdxl.

A third-party package adds a backend by exposing a layerctl.backends.base.Backend
subclass under the entry-point group "layerctl.backends".
"""

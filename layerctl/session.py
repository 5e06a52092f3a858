"""The Session: loads each model once and sends every request to its pipeline.

One request goes down one way: ``Session.gen(req)`` picks the pipeline for the request's mode
(text -> RGBA, layers, editing) and hands it the session's :class:`ModelCache`; the pipeline
checks its inputs, takes the model kit it needs, denoises, decodes and writes its files.
"""

from __future__ import annotations

from layerctl.errors import LayerctlError
from layerctl.models.kit import ModelCache
from layerctl.outputs import OutputRecord


class Session:
    """Loads each base model once; swaps layer weights between jobs (restoring the originals)."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.models = ModelCache(quiet)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self.models.close()

    # ------------------------------------------------------------ jobs
    def gen(self, req) -> list[OutputRecord]:
        """`layerctl gen`: every mode of a GenRequest."""
        try:
            mode = req.mode()
        except ValueError as exc:
            raise LayerctlError(str(exc)) from None
        self.models.precheck(req, mode)  # e.g. layer modes or --negative on FLUX.1: refused before loading
        if mode != "rgba":
            from layerctl.pipelines.layers import gen_layers

            return gen_layers(self.models, req, mode)
        if req.init or req.mask or req.hires or req.controlnet:
            from layerctl.pipelines.edit import gen_edit

            return gen_edit(self.models, req)
        from layerctl.pipelines.rgba import gen_rgba

        return gen_rgba(self.models, req)

    def decompose(self, req) -> list[OutputRecord]:
        """`layerctl decompose`: the unknown layers of a picture."""
        from layerctl.pipelines.layers import decompose

        self.models.precheck(req, "decompose")
        return decompose(self.models, req)

    def upscale(self, req) -> list[OutputRecord]:
        """`layerctl upscale`: an RGBA image at a larger size with a full-size alpha."""
        from layerctl.pipelines.edit import upscale

        self.models.precheck(req)
        return upscale(self.models, req)

    # ------------------------------------------------------------ conveniences (tests, benchmarks)
    def model(self, opts):
        """The loaded base model for these options (loads it on first use)."""
        return self.models.kit(opts).model

    def clear_weights(self, model) -> None:
        """Restore `model`'s UNet to its original weights."""
        kit = self.models.kit_of(model)
        if kit is not None:
            kit.clear_weights()

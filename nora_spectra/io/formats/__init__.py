"""One module per checkpoint format; each defines ``FORMAT`` (see :mod:`nora_spectra.io.registry`).

The registry imports every module here (names starting with ``_`` excepted), in name order.
"""

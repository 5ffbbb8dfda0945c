"""The method of the paper: the configuration, the frozen encoder, the conditional
flows and the Gaussian decoder, the exportable scoring network, calibration and
training by eq. (7.2). Imports :mod:`cflowad.common` and :mod:`cflowad.data`.

The package map and what each package may import: docs/architecture.md.
"""

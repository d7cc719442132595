"""The fit on PyTorch tensors (a GPU, or the CPU): the starts and local fits of thousands of spectra advanced
together.

Optional: it needs ``torch``, which nothing else in the package does. :func:`device_fitter` wraps a
:class:`~astra_thepayne.core.fitting.PayneFitter`; the result rows are made by the same code as the numpy engine's.
"""
from .torch_fit import DEFAULT_DEVICE_BATCH, DeviceFitter, device_fitter, parse_device

__all__ = ["DEFAULT_DEVICE_BATCH", "DeviceFitter", "device_fitter", "parse_device"]

"""Training Payne networks: grids of labelled spectra, the numpy/torch trainer, and the demo network's toy model.

* :mod:`.grid` - the GRID file layouts (.npz, FITS) and their validation;
* :mod:`.trainer` - :func:`train_network` (numpy backend always, PyTorch when installed);
* :mod:`.toy_lines` - the toy line model behind the bundled demonstration network;
* :mod:`.make_demo` - ``python -m astra_thepayne.training.make_demo`` regenerates that network.

Nothing here imports PyTorch until the torch backend is used.

"""
# No imports here: `python -m astra_thepayne.training.make_demo` must set the BLAS thread variables before numpy
# loads, and this file runs first.
__all__ = ["grid", "trainer", "toy_lines", "make_demo"]

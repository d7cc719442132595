"""Training Payne networks: grids of labelled spectra, the numpy/torch trainer, and the demo network's toy model.

* :mod:`.grid` - the GRID file layouts (.npz, FITS) and their validation;
* :mod:`.trainer` - :func:`train_network` (numpy backend always, PyTorch when installed);
* :mod:`.toy_lines` - the toy line model behind the bundled demonstration network;
* :mod:`.make_demo` - ``python -m astra_thepayne.training.make_demo`` regenerates that network.

Nothing here imports PyTorch until the torch backend is used.
"""
from .grid import GridError, TrainingGrid, load_grid, save_grid, validate_grid
from .trainer import TrainingError, TrainingResult, train_network

__all__ = ["GridError", "TrainingGrid", "load_grid", "save_grid", "validate_grid", "TrainingError", "TrainingResult",
           "train_network"]

"""What the tests of the device engine share: PyTorch (a module importing this is skipped without it), the devices
to run on (a GPU only where there is one), and spectra drawn from the ragged line network."""
import numpy as np
import pytest

from astra_thepayne.core.synthetic import synthetic_spectrum

torch = pytest.importorskip("torch", reason="the device engine needs PyTorch (pip install torch)")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="no CUDA device here (GPU test)"))]


def draw(network, n, v_tolerance, seed):
    """``n`` spectra of ``network``: labels uniform over the box, S/N 30-200, velocities uniform within
    ``v_tolerance`` (none at 0)."""
    rng = np.random.default_rng(seed)
    truths = network.unscale(rng.uniform(-0.48, 0.48, (n, network.n_labels)))
    velocities = rng.uniform(-v_tolerance, v_tolerance, n) if v_tolerance else np.zeros(n)
    return [synthetic_spectrum(network, t, snr=rng.uniform(30, 200), v_rel=v, rng=rng)
            for t, v in zip(truths, velocities, strict=True)]

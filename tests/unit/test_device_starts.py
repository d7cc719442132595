"""The global start on a PyTorch device (``astra_thepayne.accel.torch_starts``) against the numpy engine's: the same
starts, velocities and moved continua for a whole batch, and each step (the continuum's clipping, the spline shift)
equal to its numpy counterpart; on the CPU always and on a GPU when there is one."""
import numpy as np
import pytest
from _device_engine import DEVICES, draw, torch  # skips this module without PyTorch

from astra_thepayne.accel import device_fitter
from astra_thepayne.core.continuum import ContinuumBasis
from astra_thepayne.core.fitting import PayneFitter
from astra_thepayne.core.problem import Shift
from astra_thepayne.core.synthetic import line_network
from astra_thepayne.core.wavelength import apstar_wavelength


@pytest.fixture(scope="module")
def network():
    return line_network()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("v_tolerance", [0.0, 10.0])
@pytest.mark.parametrize("normalised", [False, True], ids=["prepared-without-continuum", "normalised-on-cpu"])
def test_the_device_finds_the_numpy_engines_starts(network, device, v_tolerance, normalised):
    """From spectra prepared as a device run's workers prepare them (no continuum: the device fits the first one
    too) or normalised on the CPU: the numpy engine's starts, and the arrays its local fits would start from."""
    spectra = draw(network, 24, v_tolerance, seed=41)
    fitter = PayneFitter(network, v_rad_tolerance=v_tolerance)
    expected = fitter._layer.run([fitter.candidates(s) for s in spectra])
    starts = device_fitter(fitter, device)._device_starts()
    found = starts.find([fitter.checked_preparation(s, normalise=normalised) for s in spectra])
    moved = 0
    for i, (spectrum, candidates) in enumerate(zip(spectra, expected, strict=True)):
        # the bank's float32 products may order two members that tie to rounding differently; none do here
        np.testing.assert_allclose(found.starts[i], [c.start for c in candidates], rtol=0, atol=1e-9)
        reference = candidates[0]
        np.testing.assert_allclose(found.prepared[i].continuum, reference.prepared.continuum, rtol=1e-10,
                                   equal_nan=True)
        np.testing.assert_allclose(found.y[i].cpu().numpy(), reference.y, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(found.weight[i].cpu().numpy(), reference.weight, rtol=1e-10, atol=1e-12)
        assert found.n_used[i] == reference.n_used
        setup = fitter.candidates_at(spectrum, found.prepared[i], found.starts[i], found.y[i], found.weight[i],
                                     found.region_counts[i], found.n_used[i])
        assert [list(c.design_columns) for c in setup] == [list(c.design_columns) for c in candidates]
        moved += not np.allclose(found.prepared[i].continuum, fitter.prepare(spectrum).continuum, rtol=1e-10,
                                 equal_nan=True)
    if v_tolerance:  # the continuum pixels moved with the star for the stars more than half a pixel away
        assert 5 < moved < len(spectra)
    else:
        assert moved == 0


@pytest.mark.parametrize("device", DEVICES)
def test_the_continuum_is_clipped_as_in_numpy(network, device):
    """Cosmic rays on continuum pixels (clipped away), a region left with too few pixels (no continuum), and
    masks moved by different shifts per row."""
    fitter = PayneFitter(network, v_rad_tolerance=10.0)
    starts = device_fitter(fitter, device)._device_starts()
    basis = ContinuumBasis(apstar_wavelength(), fitter.continuum_degree)
    rng = np.random.default_rng(3)
    size = len(fitter.continuum_pixels)
    flux = 1000 * (1 + 0.1 * np.sin(np.arange(size) / 900))[None, :] * (1 + 0.01 * rng.standard_normal((6, size)))
    ivar = np.full((6, size), 1e-2)
    flux[1, rng.choice(size, 300, replace=False)] += 80  # cosmic rays, 8 sigma
    flux[2, 500:700] *= 0.94  # a dip of 6 sigma that clipping removes round by round
    ivar[3, basis.pixels[basis.slices[1]]] = 0  # the second region has no usable pixel
    ivar[4, basis.pixels[basis.slices[0]][12:]] = 0  # the first keeps fewer pixels than its polynomial needs
    shifts = np.array([0, 1, -2, 3, -1, 2])
    device_values = starts._continuum(torch.as_tensor(flux, device=starts.device),
                                      torch.as_tensor(ivar, device=starts.device),
                                      starts._roll_mask(torch.as_tensor(shifts, device=starts.device))).cpu().numpy()
    for row, shift in enumerate(shifts):
        expected = basis.fit(flux[row], ivar[row], np.roll(fitter.continuum_pixels, shift))
        np.testing.assert_allclose(device_values[row], expected, rtol=1e-10, equal_nan=True)
    assert np.isnan(device_values[3, basis.pixels[basis.slices[1]]]).all()
    assert np.isnan(device_values[4, basis.pixels[basis.slices[0]]]).all()
    assert np.isfinite(device_values[1, basis.pixels]).sum() > 0.6 * len(basis.pixels)


@pytest.mark.parametrize("device", DEVICES)
def test_the_spline_shift_is_numpys(network, device):
    fitter = PayneFitter(network, v_rad_tolerance=10.0)
    engine = device_fitter(fitter, device)
    shifts_network = engine._device_network()
    rng = np.random.default_rng(5)
    values = rng.standard_normal((3, network.n_pixels))
    coefficients = Shift.coefficients(values.T, fitter._segments).T
    tensor = torch.as_tensor(np.ascontiguousarray(coefficients), device=engine.device)
    for shift in (-2.44, -1.25, -0.5, 0.125, 0.75, 1.5, 2.44):
        moved = shifts_network.shifted_by(tensor, shift).cpu().numpy()
        expected = [Shift(fitter._segments, shift).apply_to_coefficients(row) for row in coefficients]
        np.testing.assert_allclose(moved, expected, rtol=0, atol=1e-10)  # sums in another order


@pytest.mark.parametrize("device", DEVICES)
def test_the_jacobians_shift_is_numpys(network, device):
    """The solver moves each member's Jacobian columns by its own shift in one correlation per chip
    (``_shift_rows``): the same as numpy's spline shift of every column, members with opposite and zero shifts
    in one stack."""
    fitter = PayneFitter(network, v_rad_tolerance=10.0)
    engine = device_fitter(fitter, device)
    solver = engine._device_network()
    rng = np.random.default_rng(6)
    shifts = np.array([-2.44, -1.0, -0.3, 0.0, 0.6, 1.75, 2.44])
    coefficients = rng.standard_normal((len(shifts), 3, network.n_pixels)).astype(np.float32)
    shift = torch.as_tensor(shifts, device=engine.device)
    weights, _, _ = solver._taps(shift)
    moved = solver._shift_rows(torch.as_tensor(coefficients, device=engine.device), weights.float(),
                               torch.floor(shift).long()).cpu().numpy()
    for member, value in enumerate(shifts):
        expected = Shift(fitter._segments, value).apply_to_coefficients(coefficients[member].T.astype(float)).T
        np.testing.assert_allclose(moved[member], expected, rtol=0, atol=2e-5)  # float32 sums
    # the gather per tap (the other method, kept to time both on a GPU) moves them alike
    gathered = solver._gather_rows(torch.as_tensor(coefficients, device=engine.device), weights.float(),
                                   torch.floor(shift).long()).cpu().numpy()
    np.testing.assert_allclose(gathered, moved, rtol=0, atol=2e-5)


def test_a_device_failure_while_finding_starts_falls_back_to_the_cpu(network, monkeypatch):
    spectra = draw(network, 6, 10.0, seed=42)
    fitter = PayneFitter(network, v_rad_tolerance=10.0)
    engine = device_fitter(fitter, "cpu")
    expected = engine.fit_batch(spectra)

    def broken(prepared):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(engine._device_starts(), "find", broken)
    results = engine.fit_batch(spectra)
    assert [r.chi2 for r in results] == pytest.approx([r.chi2 for r in expected], abs=1e-6)

"""The batched fit on PyTorch (``astra_thepayne.accel``) against the numpy engine, on the CPU always and on a GPU
when there is one: the same labels (within 0.02 sigma where both reach the same minimum), errors, flags and
failures, on the line network, whose chi2 surface is ragged like a physical network's."""
import time

import numpy as np
import pytest
from _device_engine import DEVICES, torch  # skips this module without PyTorch
from _device_engine import draw as _draw

from astra_thepayne.accel import DeviceFitter, device_fitter, parse_device
from astra_thepayne.core.fitting import PayneFitter
from astra_thepayne.core.spectrum import Spectrum
from astra_thepayne.core.synthetic import line_network
from astra_thepayne.errors import ConfigurationError


@pytest.fixture(scope="module")
def network():
    return line_network()


def _compare(reference, results):
    """Per spectrum: chi2 difference (device - numpy), and the largest label difference in sigma."""
    chi2 = np.array([r.chi2 - q.chi2 for r, q in zip(results, reference, strict=True)])
    labels = np.array([np.max(np.abs(r.labels - q.labels) / q.raw_e) for r, q in zip(results, reference, strict=True)])
    return chi2, labels


@pytest.fixture(scope="module")
def without_velocity(network):
    spectra = _draw(network, 12, 0.0, seed=21)
    fitter = PayneFitter(network)
    return fitter, spectra, list(fitter.fit_many(spectra))


@pytest.fixture(scope="module")
def with_velocity(network):
    spectra = _draw(network, 24, 10.0, seed=22)
    fitter = PayneFitter(network, v_rad_tolerance=10.0)
    return fitter, spectra, list(fitter.fit_many(spectra))


def _check_agreement(reference, results, share):
    """At least ``share`` of the spectra get the numpy engine's labels within 0.02 sigma, or a lower chi2 (where
    the numpy engine stopped on a kink short of the minimum, or in a wrong basin); every other one ends in an
    adjacent local minimum of the ragged surface (chi2 higher by less than 2). Returns which agree."""
    chi2, labels = _compare(reference, results)
    same, lower = labels < 0.02, chi2 < -0.01
    assert (same | lower).mean() >= share, (labels, chi2)
    assert np.all(chi2[~(same | lower)] < 2.0), chi2
    for r, q in zip(results, reference, strict=True):
        assert r.success and r.result_flags == q.result_flags and r.at_bound_flags == q.at_bound_flags
        assert r.dof == q.dof
    return same


@pytest.mark.parametrize("device", DEVICES)
def test_same_results_without_velocity(without_velocity, device):
    fitter, spectra, reference = without_velocity
    results = list(device_fitter(fitter, device).fit_many(spectra))
    same = _check_agreement(reference, results, share=0.9)
    for r, q in (pair for pair, agree in zip(zip(results, reference, strict=True), same, strict=True) if agree):
        np.testing.assert_allclose(r.raw_e, q.raw_e, rtol=0.02)
        np.testing.assert_allclose(r.covariance, q.covariance, rtol=0.05, atol=1e-3 * np.max(np.abs(q.covariance)))
        np.testing.assert_allclose(r.continuum, q.continuum, rtol=1e-3, equal_nan=True)
        np.testing.assert_allclose(r.rectified_model_flux, q.rectified_model_flux, atol=2e-3, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
def test_same_results_with_velocity(with_velocity, device):
    fitter, spectra, reference = with_velocity
    results = list(device_fitter(fitter, device).fit_many(spectra))
    same = _check_agreement(reference, results, share=0.85)
    v_sigma = np.array([abs(r.v_rel - q.v_rel) / q.e_v_rel for r, q in zip(results, reference, strict=True)])
    assert np.all(v_sigma[same] < 0.02), v_sigma[same]
    np.testing.assert_allclose([r.e_v_rel for r in results], [q.e_v_rel for q in reference], rtol=0.05)


def test_worker_processes_prepare_the_same_fits(with_velocity):
    fitter, spectra, _ = with_velocity
    device = device_fitter(fitter, "cpu", batch_size=8)
    alone = list(device.fit_many(spectra[:10]))
    with device.workers(2):
        pooled = list(device.fit_many(spectra[:10], processes=2))
    assert [r.chi2 for r in pooled] == pytest.approx([r.chi2 for r in alone], abs=1e-6)


class _SlowToRead:
    """A spectrum that takes 1.5 s to read (a slow file system), read by the worker that prepares it."""

    label = "slow to read"

    def __init__(self, spectrum):
        self.spectrum = spectrum

    def read(self):
        time.sleep(1.5)
        return self.spectrum


@pytest.mark.slow
def test_a_rows_time_includes_the_workers_reading_and_starts(with_velocity):
    """As in one process, where a batch's time includes reading and the starts: a row fitted with worker
    processes is timed with the worker's time on it too, not with its share of the device's time alone (which is
    a fraction of a second here)."""
    fitter, spectra, _ = with_velocity
    device = device_fitter(fitter, "cpu", batch_size=8)
    with device.workers(2):
        results = list(device.fit_many([_SlowToRead(s) for s in spectra[:3]], processes=2))
    assert all(r.success for r in results)
    assert all(r.seconds >= 1.5 for r in results), [r.seconds for r in results]


def test_a_bad_spectrum_does_not_stop_the_batch(network, without_velocity):
    fitter, spectra, reference = without_velocity
    good = spectra[0]
    nan_flux = Spectrum(good.wavelength, np.full_like(good.flux, np.nan), good.ivar, obj="all NaN")
    masked = Spectrum(good.wavelength, good.flux, np.zeros_like(good.ivar), obj="no weight")
    short = Spectrum(good.wavelength[:1000], good.flux[:1000], good.ivar[:1000], obj="cut short")
    batch = [nan_flux, good, masked, short, spectra[1]]
    results = device_fitter(fitter, "cpu").fit_batch(batch)
    expected = fitter.fit_batch(batch)
    assert [r.success for r in results] == [False, True, False, False, True]
    for r, q in zip(results, expected, strict=True):
        assert r.result_flags == q.result_flags
        assert r.message == q.message
    assert results[1].chi2 == pytest.approx(reference[0].chi2, abs=0.05)


def test_device_names_are_validated():
    assert parse_device("CUDA:1") == "cuda:1"
    for bad in ("gpu", "cuda:x", "cpu; rm -rf /", "cuda:123", ""):
        with pytest.raises(ConfigurationError):
            parse_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here")
def test_a_missing_gpu_is_a_clear_error(network):
    with pytest.raises(ConfigurationError, match="no CUDA device"):
        DeviceFitter(PayneFitter(network), "cuda")


def test_load_fitter_with_a_device_keeps_the_setup():
    from astra_thepayne.pipeline.task import load_fitter

    fitter = load_fitter("demo", device="cpu")
    assert isinstance(fitter, DeviceFitter)
    assert fitter.emulator.is_demo and "engine: torch on cpu" in fitter.setup


def test_a_device_failure_halves_the_batch_until_only_the_culprit_fails(without_velocity, monkeypatch):
    """A batch the device cannot fit (out of memory, a member that breaks a kernel) is fitted in halves: the other
    spectra still get their fits, and only the one that fails alone becomes a failure row."""
    fitter, spectra, reference = without_velocity
    engine = device_fitter(fitter, "cpu")
    network = engine._device_network()
    solve = network.solve
    culprit = engine.prepare(spectra[2]).flux

    def fragile(candidates, *args):  # fails on any batch that holds the culprit
        if any(np.array_equal(c.prepared.flux, culprit) for c in candidates):
            raise RuntimeError("CUDA out of memory (simulated)")
        return solve(candidates, *args)

    monkeypatch.setattr(network, "solve", fragile)
    results = engine.fit_batch(spectra[:5])
    assert [r.success for r in results] == [True, True, False, True, True]
    assert "device fit failed: RuntimeError: CUDA out of memory" in results[2].message
    assert results[2].result_flags & 1
    for r, q in zip(results[:2] + results[3:], reference[:2] + reference[3:5], strict=True):
        assert abs(r.chi2 - q.chi2) < 2.0


def test_a_fit_out_of_iterations_is_a_failure_as_in_the_numpy_engine(without_velocity, monkeypatch):
    import astra_thepayne.accel.torch_fit as torch_fit

    fitter, spectra, _ = without_velocity
    monkeypatch.setattr(torch_fit, "_MAX_ITERATIONS", 1)
    results = device_fitter(fitter, "cpu").fit_batch(spectra[:3])
    assert not any(r.success for r in results)
    assert all("no convergence after 1 iterations" in r.message and r.result_flags & 1 for r in results)


def test_the_device_tries_further_starts_only_where_the_first_two_disagree(network):
    """As the numpy engine: every spectrum's first two starts in one stack, then the third (and fourth) only for
    the spectra whose starts have not reached the same floor; the line network is ragged enough to need them."""
    from astra_thepayne.core.fitting import floor_confirmed

    spectra = _draw(network, 16, 0.0, seed=31)
    fitter = PayneFitter(network)
    device = device_fitter(fitter, "cpu", batch_size=16)
    solver, phases = device._device_network(), []
    real = solver.solve

    def recording(candidates, groups):
        outcome = real(candidates, groups)
        phases.append((list(groups), [float(c) for c in outcome.member_chi2]))
        return outcome

    solver.solve = recording
    results = device.fit_batch(spectra)
    assert all(r.success for r in results)
    groups, chi2 = phases[0]
    assert groups == sorted(list(range(len(spectra))) * 2)  # two starts of every spectrum
    disagree = [g for g in range(len(spectra)) if not floor_confirmed(chi2[2 * g:2 * g + 2])]
    assert 0 < len(disagree) < len(spectra)
    assert len(phases) >= 2 and len(set(phases[1][0])) == len(disagree) == len(phases[1][0])  # one more start each
    assert sum(len(g) for g, _ in phases) < 4 * len(spectra)

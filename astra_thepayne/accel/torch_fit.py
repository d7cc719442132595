"""The local fits of a batch of spectra as tensor operations on one PyTorch device, every spectrum in lockstep.

The numpy engine (:mod:`astra_thepayne.core.fitting`) prepares each spectrum, finds its starts (the model bank and
the velocity scan) and makes its result row. This engine prepares spectra with the same code (on the CPU, in worker
processes when there are some: :meth:`PayneFitter.checked_preparation`), finds the starts of the whole batch on the
device (:mod:`.torch_starts`, the same steps as the numpy engine's), makes rows with the same code
(:meth:`PayneFitter.result`), and replaces the local solver, which is where nearly all the arithmetic is. Every
start of every spectrum of a batch is one member of a stack; one iteration is a few batched matrix products for
the whole stack, and no Python runs per spectrum per iteration.

The problem is the numpy engine's: residuals ``w (c S_v(f(x)) - y)`` with ``f`` the network, ``S_v`` the Doppler
shift (a B-spline of degree :data:`~astra_thepayne.core.problem.SHIFT_DEGREE` in each chip) and ``c = 1 + D g`` the
continuum correction, within the same bounds, and solved the same way in part: the continuum coefficients ``g``
are solved for exactly at every point (a 5 x 5 system per chip region, batched), so chi2 is a function of the
labels and velocity alone and the matrix of the solver is the Schur complement over ``g`` (whose inverse is the
covariance marginalised over the continuum). It differs in the local solver:

- Levenberg's damped Gauss-Newton with the exact Jacobian at every accepted point: on a device the exact Jacobian
  ``W2 (da/dx)`` of a thousand spectra is one batched product, so the numpy engine's approximate matrices buy
  nothing. A trial point costs chi2 alone; the Jacobian is made only where the step is accepted. Parameters on a
  bound that the gradient pushes outward are held there (an active set); steps are clipped into the box. A member
  ends when a full Gauss-Newton step would lower chi2 by less than a tenth of the numpy engine's tolerance, or
  when its damping says it sits on a kink of the network (no step lowers chi2).
- The shift has no banded solves at run time: the spline coefficients of the output layer, ``A^-1 W2`` and
  ``A^-1 b2`` per chip, are computed once, and the shifted flux and Jacobian are ``degree + 1`` gathers of them.
- Each start it tries is fitted to the end and the lowest chi2 wins (the numpy engine stops each start early and
  finishes the best). It tries the starts as the numpy engine does: the first two of every spectrum in one stack,
  then the next start of each spectrum whose starts have not yet agreed, one start per phase, at most four.

On the ragged chi2 surface of a physical network, two solvers from one start can end in different local minima:
the engines agree within 0.02 sigma for most spectra, not all (docs/scaling.md, "Fitting on a GPU", gives the
figures of ``benchmarks/device_fit.py``).

float32 for the network's products as in the numpy engine; residuals, chi2, the normal matrices and the covariance
in float64.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import deque

import numpy as np

from ..config import parse_device
from ..core.emulator import LEAKY_SLOPE
from ..core.fitting import BATCH_SIZE, Candidate, PayneFitter, batches, floor_confirmed
from ..core.problem import SHIFT_DEGREE, Shift, bspline_kernel
from ..core.result import FitResult
from ..core.wavelength import APSTAR_CDELT1, SPEED_OF_LIGHT_KMS
from ..errors import ConfigurationError

__all__ = ["DEFAULT_DEVICE_BATCH", "DeviceFitter", "device_fitter", "parse_device"]

log = logging.getLogger(__name__)

#: Spectra fitted together on the device by default, per device type: on a GPU the stack must be large for the
#: products to run at matrix speed; on a CPU a stack larger than the caches is slower per spectrum (kurucz5, one
#: thread: 70 ms per spectrum in batches of 16, 77 ms in batches of 64; benchmarks/device_fit.py).
DEFAULT_DEVICE_BATCH = {"cpu": 16, "cuda": 2048}
_MAX_ITERATIONS = 200
_INITIAL_DAMPING = 1e-3  # relative to the mean diagonal of J^T J: the first step is nearly Gauss-Newton
_MAX_DAMPING = 1e12  # relative damping at which a member is taken to sit on a kink: steps no longer lower chi2
_AT_BOUND_MARGIN = 1e-9


def _torch():
    try:
        import torch
    except ImportError:
        raise ConfigurationError("a --device other than numpy needs PyTorch: pip install torch") from None
    return torch


def device_fitter(fitter: PayneFitter, device: str, batch_size: int | None = None) -> DeviceFitter:
    """A :class:`DeviceFitter` on ``device`` for ``fitter`` (raises :class:`ConfigurationError` when the device
    is not there)."""
    return DeviceFitter(fitter, device, batch_size)


class DeviceFitter:
    """A :class:`~astra_thepayne.core.fitting.PayneFitter` whose local fits run in batches on a PyTorch device.

    It answers what the pipeline asks of a fitter (:meth:`fit`, :meth:`fit_batch`, :meth:`fit_many`,
    :meth:`workers`; anything else is the wrapped fitter's), with the same rows. ``processes > 1`` in
    :meth:`fit_many` prepares spectra and finds their starts in worker processes while the device fits; those
    workers also read files, given instead of a spectrum anything with a ``read()`` method that returns one (the
    pipeline's :class:`~astra_thepayne.pipeline.task.SpectrumAddress`).
    """

    #: the pipeline may hand :meth:`fit_many` file addresses (``read()``) for its workers to read
    reads_in_workers = True

    def __init__(self, fitter: PayneFitter, device: str = "cpu", batch_size: int | None = None):
        torch = _torch()
        self.fitter = fitter
        self.device_name = parse_device(device)
        if self.device_name.startswith("cuda"):
            if not torch.cuda.is_available():
                raise ConfigurationError(f"device {self.device_name}: PyTorch sees no CUDA device here")
            index = int(self.device_name.split(":")[1]) if ":" in self.device_name else 0
            if index >= torch.cuda.device_count():
                raise ConfigurationError(f"device {self.device_name}: only {torch.cuda.device_count()} CUDA "
                                         f"device(s) here")
        self.device = torch.device(self.device_name)
        kind = self.device.type
        self.batch_size = int(batch_size or DEFAULT_DEVICE_BATCH.get(kind, 64))
        if self.batch_size < 1:
            raise ConfigurationError(f"device batch size must be at least 1, not {batch_size}")
        self._network = self._starts = None
        self.setup = getattr(fitter, "setup", "") + f"; engine: torch on {self.device_name}"
        self.engine = f"torch:{self.device.type}"  # stored with each row (results may differ by device type)

    def __getattr__(self, name):  # the wrapped fitter's settings and helpers (emulator, prepare, ...)
        if name == "fitter":
            raise AttributeError(name)
        return getattr(self.fitter, name)

    def __getstate__(self):
        raise TypeError("a DeviceFitter stays in its process; worker processes get the numpy fitter")

    # -- the interface of PayneFitter ---------------------------------------------------------------------------
    def fit(self, spectrum, initial_labels=None) -> FitResult:
        return self.fit_batch([spectrum], initial_labels)[0]

    def fit_batch(self, spectra, initial_labels=None) -> list[FitResult]:
        """Fit spectra together: starts found here (the model bank's scores on the device), local fits on the
        device. Each result's ``seconds`` is its share of the batch's time."""
        start = time.perf_counter()
        if initial_labels is None:
            setups = self._setups(spectra, [_prepared(self.fitter, s) for s in spectra])
        else:  # one start at the given labels: the numpy engine's code, with the bank's scores on the device
            setups = self.fitter._layer.run([_setup(self.fitter, s, initial_labels) for s in spectra],
                                            serve=self._serve_bank)
        return _timed(self._fit_setups(spectra, setups), start)

    def _setups(self, spectra, prepared):
        """Per spectrum, its candidates (:class:`~astra_thepayne.core.fitting.Candidate`) or a failure result,
        from its :meth:`PayneFitter.checked_preparation` (a prepared spectrum or a failure): the starts of the
        whole batch found on the device (:mod:`.torch_starts`), on the CPU should the device fail."""
        fitter = self.fitter
        setups = list(prepared)
        todo = [i for i, p in enumerate(prepared) if not isinstance(p, FitResult)]
        if not todo:
            return setups
        try:
            found = self._device_starts().find([prepared[i] for i in todo])
        except Exception as exc:  # out of device memory, say: the numpy engine's starts, one spectrum at a time
            log.warning("finding the starts of %d spectra on the device failed (%s: %s); finding them on the CPU",
                        len(todo), type(exc).__name__, exc)
            found = fitter._layer.run([fitter.candidates_of_prepared(spectra[i], _normalised(fitter, prepared[i]))
                                       for i in todo])
            for i, setup in zip(todo, found, strict=True):
                setups[i] = setup
            return setups
        for k, i in enumerate(todo):
            setups[i] = fitter.candidates_at(spectra[i], found.prepared[k], found.starts[k], found.y[k],
                                             found.weight[k], found.region_counts[k], found.n_used[k])
        return setups

    @contextlib.contextmanager
    def workers(self, processes):
        """Worker processes that prepare spectra for every :meth:`fit_many` inside the block."""
        with self.fitter.workers(processes):
            yield self

    def fit_many(self, spectra, processes=1, initial_labels=None, batch_size=None):
        """Fit spectra in order, ``batch_size`` (default :attr:`batch_size`) at a time on the device. With
        ``processes > 1``, worker processes prepare the spectra and find their starts (in chunks of
        :data:`~astra_thepayne.core.fitting.BATCH_SIZE`, at most two per worker waiting, so memory stays flat
        however many spectra there are) while the device fits the batch before."""
        batch_size = int(batch_size or self.batch_size)
        if processes <= 1:
            for batch in batches(spectra, batch_size):
                yield from self.fit_batch(batch, initial_labels)
            return
        with self.fitter.workers(processes):
            pool = self.fitter._pool
            waiting = deque()
            ready_spectra, ready_setups, ready_seconds = [], [], []
            chunks = batches(spectra, min(BATCH_SIZE, batch_size))
            exhausted = False
            while True:
                while not exhausted and len(waiting) < 2 * processes:
                    chunk = next(chunks, None)
                    if chunk is None:
                        exhausted = True
                        break
                    waiting.append((chunk, pool.apply_async(_prepared_in_worker, ((chunk, initial_labels),))))
                if not waiting:
                    break
                chunk, pending = waiting.popleft()
                setups, seconds = pending.get()
                ready_spectra += chunk
                ready_setups += setups
                ready_seconds += [seconds] * len(chunk)
                if len(ready_spectra) >= batch_size or (exhausted and not waiting):
                    start = time.perf_counter()
                    if initial_labels is None:  # the workers prepared the spectra: the starts are found here
                        ready_setups = self._setups(ready_spectra, ready_setups)
                    results = _timed(self._fit_setups(ready_spectra, ready_setups), start)
                    for result, seconds in zip(results, ready_seconds, strict=True):
                        result.seconds += seconds  # the worker's time on it, as fit_batch's time includes it
                    ready_spectra, ready_setups, ready_seconds = [], [], []
                    yield from results

    # -- the batch on the device --------------------------------------------------------------------------------
    def _serve_bank(self, kind, arrays):
        """Products for the starts' requests: the model bank's scores on the device, the rest as numpy does."""
        if kind != "bank":
            return None
        return list(self._device_network().bank_scores(np.stack(arrays)))

    def _device_starts(self):
        if self._starts is None:
            from .torch_starts import DeviceStarts

            self._starts = DeviceStarts(self.fitter, self._device_network())
        return self._starts

    def _device_network(self):
        if self._network is None:
            self._network = _DeviceNetwork(self.fitter, self.device)
        return self._network

    def _fit_setups(self, spectra, setups):
        """Results for spectra whose setups (a list of :class:`Candidate`, or a failure result) are known."""
        fitter = self.fitter
        results = [setup if isinstance(setup, FitResult) else
                   None if setup else fitter._failure(spectra[i], "no starting point for the fit", float("nan"))
                   for i, setup in enumerate(setups)]
        if all(result is not None for result in results):
            return results
        try:
            best, unfinished = self._solve_in_phases({i: setup for i, setup in enumerate(setups) if results[i] is None})
        except Exception as exc:  # the device failed (out of memory, say): halve the batch, down to one spectrum
            if len(spectra) > 1:
                log.warning("device fit of %d spectra failed (%s: %s); fitting them in two halves", len(spectra),
                            type(exc).__name__, exc)
                half = len(spectra) // 2
                return (self._fit_setups(spectra[:half], setups[:half])
                        + self._fit_setups(spectra[half:], setups[half:]))
            log.exception("device fit of %s failed", getattr(spectra[0], "label", "a spectrum"))
            return [fitter._failure(spectra[0], f"device fit failed: {type(exc).__name__}: {exc}",
                                    _snr(setups[0]))]
        for i in (i for i, result in enumerate(results) if result is None):
            try:
                if i not in best:
                    if unfinished.get(i):  # as in the numpy engine, a start out of iterations is no answer
                        raise _NoConvergence(f"optimiser stopped: no convergence after {_MAX_ITERATIONS} iterations")
                    raise FloatingPointError("chi2 is not finite at any start")
                outcome, w, candidate = best[i]
                results[i] = fitter.result(outcome.x[w], outcome.chi2[w], outcome.normal_matrix[w], candidate.n_used,
                                           outcome.n_design[w], outcome.correction[w], outcome.rectified[w],
                                           candidate.prepared, outcome.n_iterations[w])
            except Exception as exc:  # one spectrum's surprise never stops the batch
                results[i] = fitter._failure(spectra[i], f"{type(exc).__name__}: {exc}", _snr(setups[i]))
        return results

    def _solve_in_phases(self, setups):
        """Fit the starts of each spectrum (``setups``: index -> its candidates) as the numpy engine tries them:
        the first two of every spectrum together, then, one phase per start, the next start of the spectra whose
        starts have not yet agreed (:func:`~astra_thepayne.core.fitting.floor_confirmed` on their chi2). Returns,
        per spectrum, ``(outcome, winner's index in it, candidate)`` of its lowest finished start, and whether a
        start of it ran out of iterations."""
        network = self._device_network()
        best, unfinished, floors = {}, {}, {i: [] for i in setups}
        tried = {i: 0 for i in setups}
        batch = {i: 2 for i in setups}  # starts to try in this phase
        while batch:
            members = [(i, candidate) for i, n in batch.items() for candidate in setups[i][tried[i]:tried[i] + n]]
            fitted = sorted({i for i, _ in members})
            group_of = {i: g for g, i in enumerate(fitted)}
            outcome = network.solve([candidate for _, candidate in members], [group_of[i] for i, _ in members])
            winners = iter(range(int(np.count_nonzero(outcome.best >= 0))))
            for m, (i, _) in enumerate(members):
                floors[i].append(float(outcome.member_chi2[m]))
            for g, i in enumerate(fitted):
                tried[i] += batch[i]
                unfinished[i] = unfinished.get(i, False) or bool(outcome.unfinished[g])
                if outcome.best[g] >= 0:
                    w = next(winners)
                    if i not in best or outcome.chi2[w] < best[i][0].chi2[best[i][1]]:
                        best[i] = (outcome, w, members[outcome.best[g]][1])
            batch = {i: 1 for i in fitted if tried[i] < len(setups[i]) and not floor_confirmed(floors[i])}
        return best, unfinished


def _timed(results, start):
    """``results``, each timed by its share of the time since ``start`` (``FitResult.seconds``)."""
    share = (time.perf_counter() - start) / max(len(results), 1)
    for result in results:
        result.seconds = share
    return results


class _NoConvergence(RuntimeError):
    pass


def _snr(setup):
    return setup[0].prepared.snr if setup else float("nan")


class _Outcome:
    """Per spectrum (group): ``best`` (its winning candidate, -1 for none) and ``unfinished`` (a start ran out of
    iterations); per candidate, ``member_chi2`` (infinite where it did not finish); per winner, in the order of the
    spectra that have one: scaled parameters (labels, velocity), chi2, continuum coefficients fitted, profiled
    normal matrix, correction and rectified flux on the model pixels, iterations (numpy arrays)."""

    def __init__(self, **arrays):
        self.__dict__.update(arrays)


class _DeviceNetwork:
    """The network, the continuum basis and the shift's tables as tensors on one device, and the batched solver."""

    def __init__(self, fitter: PayneFitter, device):
        torch = _torch()
        self.torch, self.device = torch, device
        emulator = fitter.emulator
        self.k = emulator.n_labels
        self.fit_v = fitter.v_scale is not None
        self.v_scale = fitter.v_scale or 0.0
        self.tolerance = 0.1 * fitter.opt_tolerance
        self.segments = tuple(map(tuple, fitter._segments))

        def f32(a):
            return torch.as_tensor(np.ascontiguousarray(a, dtype=np.float32), device=device)

        def f64(a):
            return torch.as_tensor(np.ascontiguousarray(a, dtype=np.float64), device=device)

        w0, w1, w2 = emulator.weights
        b0, b1, b2 = emulator.biases
        self.w0, self.b0, self.w1, self.b1 = f32(w0), f32(b0), f32(w1), f32(b1)
        if self.fit_v:
            # the output layer's spline coefficients: a shifted flux is then a few gathers of W2' a + b2'
            w2 = Shift.coefficients(np.asarray(w2, dtype=np.float64), self.segments)
            b2 = Shift.coefficients(np.asarray(b2, dtype=np.float64), self.segments)
            signs, knots, offsets = bspline_kernel(SHIFT_DEGREE)
            self.signs, self.knots = f64(signs), f64(knots)
            self.offsets = f64(offsets)
            n_pixels = len(b2)
            lower, upper = np.zeros(n_pixels, dtype=np.int64), np.zeros(n_pixels, dtype=np.int64)
            for start, stop in self.segments:
                lower[start:stop], upper[start:stop] = start, stop - 1
            self.pixel = torch.arange(n_pixels, device=device)
            self.lower = torch.as_tensor(lower, device=device)
            self.upper = torch.as_tensor(upper, device=device)
            self.tap_offsets = torch.as_tensor(np.array(offsets, dtype=np.int64), device=device)
        self.w2, self.b2 = f32(w2), f64(b2)
        self.w2_t = self.w2.T.contiguous()
        #: how the solver moves the Jacobian's columns with each member's velocity: "correlation" (one depthwise
        #: correlation per chip) or "gather" (a gather per tap, as up to 0.6.0), kept so that one GPU run can time
        #: both (``benchmarks/device_fit.py --shift-methods``); they agree to float32 rounding
        self.shift_method = "correlation"
        self.design = f64(fitter._layer.design)
        self.regions = [(rows, torch.as_tensor(np.asarray(columns), device=device), f64(basis), f64(outer))
                        for rows, columns, basis, outer in fitter._layer.design_regions()]
        self.leaky = LEAKY_SLOPE
        self.bank = None
        self._fitter = fitter

    # -- the model bank -----------------------------------------------------------------------------------------
    def bank_scores(self, stacked):
        """The bank's scores of ``stacked`` ``(B, 2, P)`` requests (``w^2 y`` and ``w^2``), as
        :meth:`ModelBank.scores`."""
        torch = self.torch
        if self.bank is None:
            bank = self._fitter._bank()
            self.bank = (torch.as_tensor(np.array(bank.flux), device=self.device),
                         torch.as_tensor(np.asarray(bank.flux_squared), device=self.device))
        data = torch.as_tensor(np.ascontiguousarray(stacked, dtype=np.float32), device=self.device)
        return self.bank_scores_on_device(data[:, 0], data[:, 1], *self.bank).cpu().numpy()

    def bank_scores_on_device(self, weighted_flux, weight_squared, flux, squared):
        """:meth:`ModelBank.scores` of float32 tensors ``w^2 y`` and ``w^2`` ``(B, P)`` against a bank's flux and
        its squares: ``(B, size)`` in float64."""
        torch = self.torch
        total = torch.zeros((len(weighted_flux), flux.shape[0]), dtype=torch.float64, device=self.device)
        for start, stop in self.segments:
            cross = (weighted_flux[:, start:stop] @ flux[:, start:stop].T).double()
            norm = (weight_squared[:, start:stop] @ squared[:, start:stop].T).double()
            total += torch.where(norm > 0, cross**2 / torch.where(norm > 0, norm, 1.0), 0.0)
        return total

    # -- the model ----------------------------------------------------------------------------------------------
    def _taps(self, shift, derivative=False):
        """For rows moved by ``shift`` pixels ``(N,)``: the B-spline weights of their taps ``(N, taps)``, their
        derivatives with respect to the shift (None unless ``derivative``), and the pixel each tap offset is
        counted from ``(N, P)`` (:class:`~astra_thepayne.core.problem.Shift`)."""
        whole = self.torch.floor(shift)
        at = -(shift - whole)[:, None] - self.offsets  # (N, taps): point minus coefficient position
        slopes = -self._bspline(at, derivative=True) if derivative else None
        return self._bspline(at), slopes, self.pixel[None, :] - whole.long()[:, None]

    def _shift_rows(self, rows, weights, whole):
        """Rows ``(N, C, P)`` of spline coefficients moved by each member's shift: ``whole`` ``(N,)`` pixels and the
        taps' ``weights`` ``(N, taps)`` of its fraction (:meth:`_taps`), clamped at each chip's ends as
        :class:`~astra_thepayne.core.problem.Shift` clamps. One depthwise correlation per chip, each member's taps
        placed in a kernel that spans every member's whole shift: the rows are read once, where a gather per tap
        read them once per tap."""
        torch = self.torch
        from torch.nn import functional

        n_members, channels, _ = rows.shape
        offsets = self.tap_offsets  # from the highest down
        low, high = int(offsets.min()), int(offsets.max())
        reach = int(whole.abs().max()) if n_members else 0
        # kernel position j reads the pixel at p + j - (reach - low): tap t of member n sits at off_t - whole_n
        position = offsets[None, :] - whole[:, None] + (reach - low)
        kernel = torch.zeros((n_members, high - low + 1 + 2 * reach), dtype=rows.dtype, device=self.device)
        kernel.scatter_(1, position, weights)
        kernel = kernel.repeat_interleave(channels, 0)[:, None, :]  # (N C, 1, length): one per row
        out = torch.empty_like(rows)
        for start, stop in self.segments:
            padded = functional.pad(rows[:, :, start:stop], (reach - low, reach + high), mode="replicate")
            out[:, :, start:stop] = functional.conv1d(padded.reshape(1, n_members * channels, -1), kernel,
                                                      groups=n_members * channels).reshape(n_members, channels, -1)
        return out

    def _gather_rows(self, rows, weights, whole):
        """:meth:`_shift_rows` by one gather along the pixels per tap."""
        torch = self.torch
        n_members, channels, n_pixels = rows.shape
        base = self.pixel[None, :] - whole[:, None]
        out = torch.zeros_like(rows)
        for t in range(len(self.tap_offsets)):
            index = torch_clamp(torch, base + self.tap_offsets[t], self.lower, self.upper)
            out += weights[:, t, None, None] * torch.gather(rows, 2, index[:, None, :].expand(-1, channels, -1))
        return out

    def shifted_by(self, coefficients, shift: float):
        """Rows of values whose spline coefficients are ``coefficients`` ``(N, P)``, all moved by ``shift`` pixels
        (:meth:`Shift.apply_to_coefficients`)."""
        torch = self.torch
        shifts = torch.full((len(coefficients),), float(shift), dtype=torch.float64, device=self.device)
        weights, _, _ = self._taps(shifts)
        return self._shift_rows(coefficients[:, None, :], weights.to(coefficients.dtype),
                                torch.floor(shifts).long())[:, 0]

    def _bspline(self, x, derivative=False):
        power = SHIFT_DEGREE - 1 if derivative else SHIFT_DEGREE
        shifted = (x[..., None] + self.knots).clamp(min=0.0)
        return (self.signs * shifted**power).sum(-1) / math.factorial(power)

    def _state(self, theta, weight, y, regions, double=False, jacobian=True):
        """chi2 ``(N,)``, gradient ``J^T r`` ``(N, n)``, normal matrix ``J^T J`` ``(N, n, n)`` (float64), rectified
        flux and continuum correction ``(N, P)`` at ``theta``; ``regions`` ``(N, R)`` says which chip regions'
        continuum coefficients each member fits. The label columns of ``J`` are float32, as the numpy engine's
        products, unless ``double`` (for the covariance at the end); the normal matrix is assembled by blocks, the
        continuum's region by region, without forming the mostly-zero continuum columns. ``jacobian=False``: chi2
        alone (a trial point, which the solver may reject), about a third of the work."""
        torch = self.torch
        k = self.k
        x = theta[:, :k].float()
        z0 = x @ self.w0.T + self.b0
        s0 = torch.where(z0 > 0, 1.0, self.leaky)
        z1 = (s0 * z0) @ self.w1.T + self.b1
        s1 = torch.where(z1 > 0, 1.0, self.leaky)
        if jacobian:
            hidden_jacobian = s1[:, :, None] * torch.matmul(self.w1, s0[:, :, None] * self.w0)  # (N, H, K)
        values = ((s1 * z1) @ self.w2.T).double() + self.b2  # (N, P): flux, or its spline coefficients
        # the label columns of the Jacobian, pixels last (N, K, P) float32: the shift is then a correlation along
        # contiguous rows, and the products below run on contiguous matrices
        products = torch.matmul(hidden_jacobian.transpose(1, 2), self.w2_t) if jacobian else None
        if self.fit_v:
            v = theta[:, k] * self.v_scale
            shift = torch.log10(1.0 + v / SPEED_OF_LIGHT_KMS) / APSTAR_CDELT1
            weights, slopes, base = self._taps(shift, derivative=True)
            flux, d_flux = torch.zeros_like(values), torch.zeros_like(values)
            n_members, n_pixels = values.shape
            first_row = (torch.arange(n_members, device=self.device) * n_pixels)[:, None]
            value_rows = values.reshape(-1)
            for t in range(len(self.tap_offsets)):
                index = torch_clamp(torch, base + self.tap_offsets[t], self.lower, self.upper) + first_row
                gathered = value_rows[index]
                flux += weights[:, t, None] * gathered
                if jacobian:
                    d_flux += slopes[:, t, None] * gathered
            if jacobian:
                move = self._shift_rows if self.shift_method == "correlation" else self._gather_rows
                products = move(products, weights.float(), torch.floor(shift).long())
            d_shift = self.v_scale / (math.log(10) * APSTAR_CDELT1 * (SPEED_OF_LIGHT_KMS + v))
        else:
            flux = values
        n_members, n = theta.shape
        float64 = torch.float64
        weighted_flux, weighted_y = weight * flux, weight * y
        # the continuum coefficients at their best for these labels, region by region (variable projection: the
        # numpy engine's PayneProblem), a (N, 5, 5) solve per region
        g = torch.zeros((n_members, self.design.shape[1]), dtype=float64, device=self.device)
        solved = []
        for r, (rows, design_columns, basis, outer) in enumerate(self.regions):
            on = regions[:, r]
            wf = weighted_flux[:, rows]
            m = len(design_columns)
            eye = torch.eye(m, dtype=float64, device=self.device)
            block = ((wf * wf) @ outer).reshape(n_members, m, m)
            scale = torch.diagonal(block, dim1=1, dim2=2).mean(1)
            block = block + (1e-12 * torch.where(scale != 0, scale, 1.0))[:, None, None] * eye
            block = torch.where(on[:, None, None], block, eye)  # a region not fitted keeps its correction at 1
            side = torch.where(on[:, None], (wf * (weighted_y[:, rows] - wf)) @ basis, 0.0)
            g[:, design_columns] = torch.linalg.solve(block, side)
            solved.append((rows, basis, block, on))
        correction = 1.0 + g @ self.design.T
        residuals = weighted_flux * correction - weighted_y
        chi2 = (residuals * residuals).sum(1)
        if not jacobian:
            return chi2
        dtype = float64 if double else torch.float32
        label_weight = weight * correction
        labels_t = products.to(dtype) * label_weight.to(dtype)[:, None, :]  # (N, K, P): d r / d x, transposed
        matrix = torch.zeros((n_members, n, n), dtype=float64, device=self.device)
        gradient = torch.zeros((n_members, n), dtype=float64, device=self.device)
        matrix[:, :k, :k] = (labels_t @ labels_t.transpose(1, 2)).double()
        # the gradient of chi2 over the labels alone: that over g is zero, g being at its best
        gradient[:, :k] = (labels_t @ residuals.to(dtype)[:, :, None])[..., 0].double()
        if self.fit_v:
            velocity = label_weight * d_flux * d_shift[:, None]  # (N, P): d r / d (scaled velocity)
            cross = (labels_t @ velocity.to(dtype)[:, :, None])[..., 0].double()
            matrix[:, :k, k], matrix[:, k, :k] = cross, cross
            matrix[:, k, k] = (velocity * velocity).sum(1)
            gradient[:, k] = (velocity * residuals).sum(1)
        # the matrix with the continuum coefficients profiled out: minus B C^-1 B^T per region (C is block
        # diagonal by region)
        for rows, basis, block, on in solved:
            continuum = weighted_flux[:, rows, None] * basis * on[:, None, None].double()  # d r / d g (N, rows, m)
            cross = torch.empty((n_members, n, basis.shape[1]), dtype=float64, device=self.device)
            cross[:, :k] = (labels_t[:, :, rows] @ continuum.to(dtype)).double()
            if self.fit_v:
                cross[:, k] = (velocity[:, rows, None] * continuum).sum(1)
            matrix -= cross @ torch.linalg.solve(block, cross.transpose(1, 2))
        return chi2, gradient, matrix, flux, correction

    # -- the solver ---------------------------------------------------------------------------------------------
    def solve(self, candidates: list[Candidate], groups) -> _Outcome:
        """Fit every candidate from its start (see the module docstring) and return, per group (the starts of one
        spectrum: ``groups[m]`` is candidate ``m``'s, 0 to G-1), the finished start with the lowest chi2, with its
        covariance; ``best[g]`` is -1 where there is none (``unfinished[g]``: a start ran out of iterations)."""
        torch = self.torch
        device = self.device
        n_members = len(candidates)
        q = self.design.shape[1]
        weight, y = (_stacked(torch, [getattr(c, name) for c in candidates], device) for name in ("weight", "y"))
        fitted = np.zeros((n_members, q), dtype=bool)
        for m, c in enumerate(candidates):
            if c.design_columns is not None:
                fitted[m, c.design_columns] = True
        in_region = [fitted[:, columns.cpu().numpy()].all(1) for _, columns, _, _ in self.regions]
        regions = torch.as_tensor(np.stack(in_region, 1) if in_region else np.zeros((n_members, 0), dtype=bool),
                                  device=device)
        n_design = sum(region * len(columns) for region, (_, columns, _, _) in zip(in_region, self.regions,
                                                                                  strict=True))
        n = self.k + int(self.fit_v)
        theta = torch.as_tensor(np.stack([c.start for c in candidates]), dtype=torch.float64, device=device)
        theta = theta.clamp(-0.5 + 1e-10, 0.5 - 1e-10)
        lower, upper = -0.5, 0.5

        def state(t, index, double=False, jacobian=True):
            return self._state(t, weight[index], y[index], regions[index], double, jacobian)

        everyone = torch.arange(n_members, device=device)
        chi2, gradient, matrix, flux, correction = state(theta, everyone)
        damping = torch.full((n_members,), _INITIAL_DAMPING, dtype=torch.float64, device=device)
        growth = torch.full((n_members,), 2.0, dtype=torch.float64, device=device)
        iterations = torch.ones(n_members, dtype=torch.long, device=device)
        active = torch.isfinite(chi2)
        eye = torch.eye(n, dtype=torch.float64, device=device)
        for _ in range(_MAX_ITERATIONS):
            index = torch.nonzero(active)[:, 0]
            if len(index) == 0:
                break
            t, g, a = theta[index], gradient[index], matrix[index]
            # held: a bound the descent direction points through
            held = ((t <= lower + _AT_BOUND_MARGIN) & (g > 0)) | ((t >= upper - _AT_BOUND_MARGIN) & (g < 0))
            free = (~held).double()
            g = g * free
            a = a * free[:, :, None] * free[:, None, :] + torch.diag_embed(held.double())
            scale = torch.diagonal(a, dim1=1, dim2=2).mean(1, keepdim=True).clamp(min=1e-300)
            # the Gauss-Newton decrement: what a full undamped step would lower chi2 by
            newton, info = _cholesky_solve(torch, a + 1e-12 * scale[:, :, None] * eye, g)
            decrement = torch.where(info == 0, (g * newton).sum(1), math.inf)
            converged = decrement < self.tolerance
            if converged.any():
                active[index[converged]] = False
                going = ~converged
                index, t, g, a, free, scale = (v[going] for v in (index, t, g, a, free, scale))
                if len(index) == 0:
                    break
            # Levenberg's damping, the same in every direction (the labels are scaled to one box, as the numpy
            # engine's trust region is a ball in them); Marquardt's diag(J^T J) crept along the kinks of the network
            step_matrix = a + (damping[index, None] * scale)[:, :, None] * eye
            step, info = _cholesky_solve(torch, step_matrix, -g)
            step = torch.where((info == 0)[:, None], step * free, 0.0)
            trial = (t + step).clamp(lower + _AT_BOUND_MARGIN / 2, upper - _AT_BOUND_MARGIN / 2)
            moved = trial - t
            predicted = -((g * moved).sum(1) + 0.5 * (moved * (a @ moved[:, :, None])[..., 0]).sum(1))
            t_chi2 = state(trial, index, jacobian=False)
            iterations[index] += 1
            decrease = 0.5 * (chi2[index] - t_chi2)
            accept = torch.isfinite(t_chi2) & (decrease > 0)
            ratio = decrease / predicted.clamp(min=1e-300)
            update = index[accept]
            if len(update):
                theta[update] = trial[accept]
                chi2[update], gradient[update], matrix[update], flux[update], correction[update] = state(
                    theta[update], update)
            # Nielsen's damping rule: shrink by up to 3 after a good step, grow geometrically after failures
            shrink = torch.clamp(1 - (2 * ratio - 1) ** 3, min=1 / 3)
            damping[index] = torch.where(accept, damping[index] * shrink, damping[index] * growth[index])
            growth[index] = torch.where(accept, 2.0, growth[index] * 2.0)
            active[index[damping[index] > _MAX_DAMPING]] = False
        # per spectrum, the finished start of lowest chi2; only those get the covariance, in float64 throughout (the
        # profiled matrix, whose inverse is marginalised over the continuum)
        groups = torch.as_tensor(np.asarray(groups), device=device)
        n_groups = int(groups.max()) + 1
        usable = ~active & torch.isfinite(chi2)
        ranked = torch.where(usable, chi2, math.inf)
        lowest = torch.full((n_groups,), math.inf, dtype=torch.float64, device=device).scatter_reduce(
            0, groups, ranked, reduce="amin")
        winner = usable & (ranked == lowest[groups])
        best = torch.full((n_groups,), -1, dtype=torch.long, device=device)
        best[groups[winner]] = torch.nonzero(winner)[:, 0]  # on a tie, one of them
        unfinished = torch.zeros(n_groups, dtype=torch.bool, device=device)
        unfinished[groups[active]] = True
        chosen = best[best >= 0]
        matrix = flux = correction = None
        if len(chosen):
            _, _, matrix, flux, correction = state(theta[chosen], chosen, double=True)
        n_design = np.asarray(n_design, dtype=int) if len(self.regions) else np.zeros(n_members, int)
        chosen = chosen.cpu().numpy()
        return _Outcome(best=best.cpu().numpy(), unfinished=unfinished.cpu().numpy(), member_chi2=ranked.cpu().numpy(),
                        x=theta[chosen].cpu().numpy(),
                        chi2=chi2[chosen].cpu().numpy(), n_design=n_design[chosen],
                        normal_matrix=None if matrix is None else matrix.cpu().numpy(),
                        correction=None if correction is None else correction.cpu().numpy(),
                        rectified=None if flux is None else flux.cpu().numpy(),
                        n_iterations=iterations[chosen].cpu().numpy())


def torch_clamp(torch, index, lower, upper):
    """``index`` clamped between per-pixel bounds (a chip's first and last pixel)."""
    return torch.maximum(torch.minimum(index, upper), lower)


def _cholesky_solve(torch, matrix, rhs):
    """``matrix^-1 rhs`` for a stack of symmetric positive matrices, and per member 0 or the failure's info."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    return torch.cholesky_solve(rhs[:, :, None], factor)[..., 0], info


def _read(fitter, element):
    """A spectrum, or a file address (``read()``) read here: an unreadable one is a failure result, as the
    pipeline makes for a file it cannot read."""
    if hasattr(element, "read"):
        try:
            return element.read()
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}"
            log.warning("%s: cannot fit: %s", element.label, message)
            return FitResult.failure(fitter.emulator.label_names, message)
    return element


def _prepared(fitter, element):
    """:meth:`PayneFitter.checked_preparation` of a spectrum or a file address (a failure result for either),
    without the continuum, which the device fits."""
    spectrum = _read(fitter, element)
    return spectrum if isinstance(spectrum, FitResult) else fitter.checked_preparation(spectrum, normalise=False)


def _normalised(fitter, prepared):
    return prepared if prepared.norm_flux is not None else fitter.normalised(prepared)


def _stacked(torch, rows, device):
    """Rows (numpy arrays, or tensors the device's starts left there) as one float64 tensor on ``device``."""
    if all(isinstance(row, torch.Tensor) for row in rows):
        return torch.stack(rows).to(device=device, dtype=torch.float64)
    return torch.as_tensor(np.stack([row.cpu().numpy() if isinstance(row, torch.Tensor) else row for row in rows]),
                           dtype=torch.float64, device=device)


def _setup(fitter, element, initial_labels):
    """:meth:`PayneFitter.candidates` of a spectrum or a file address, all on the CPU (a generator of requests)."""
    spectrum = _read(fitter, element)
    if isinstance(spectrum, FitResult):
        return spectrum
    return (yield from fitter.candidates(spectrum, initial_labels))


def _prepared_in_worker(args):
    """What a worker process does for a chunk of spectra, and its seconds per spectrum (reading, preparing), which
    belong to each row's time as much as its share of the device's: each spectrum's
    :meth:`PayneFitter.checked_preparation`, or, with given initial labels, its whole setup on the CPU."""
    from ..core import fitting

    batch, initial_labels = args
    fitter = fitting._WORKER_FITTER
    start = time.perf_counter()
    if initial_labels is None:
        done = [_prepared(fitter, element) for element in batch]
    else:
        done = fitter._layer.run([_setup(fitter, element, initial_labels) for element in batch])
    return done, (time.perf_counter() - start) / max(len(batch), 1)

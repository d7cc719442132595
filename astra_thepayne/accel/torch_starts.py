"""The global start of a batch of spectra on one PyTorch device: the numpy engine's starts, every spectrum at once.

The numpy engine finds each fit's starts one spectrum at a time (:meth:`PayneFitter.candidates`): the model bank
matched to the spectrum, a chi2 scan over velocities against the best match, the continuum fitted again with its
pixels moved with the star, the bank matched again in the star's rest frame and the velocity scanned again against
the new best match. Here each of those steps, and the first continuum before them, is a few tensor operations over
the whole batch, from the spectra as :meth:`PayneFitter.checked_preparation` leaves them with ``normalise=False``
(the work a CPU does per file: resampling, masks, pixel weights). The same steps in the same order with the same
numbers, in float64 where the numpy engine uses it (the bank's products are float32 in both): a spectrum gets the
numpy engine's starts unless two bank members or two trial shifts tie to rounding.

The normalised spectra stay on the device for the solver; what comes back per spectrum is its continuum (for its
row), its starts and its pixel counts, from which the CPU chooses the continuum-correction columns
(:meth:`PayneFitter.candidates_at`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from ..core.fitting import DISTINCT_STARTS, TOP_MATCHES, PayneFitter
from ..core.problem import pixel_shift
from ..core.wavelength import APSTAR_CDELT1, SPEED_OF_LIGHT_KMS

__all__ = ["DeviceStarts", "FoundStarts"]


@dataclass
class FoundStarts:
    """The starts of a batch: per spectrum, the spectrum prepared for its fits (its continuum, moved with the star,
    on the CPU; the normalised arrays stay on the device) and its scaled starting parameters ``(n, K [+ 1])``, best
    match first; for the batch, the normalised flux and weights on the model pixels ``(B, P)`` (tensors on the
    device, for its solver), and per spectrum the pixels with weight in each continuum region ``(B, R)`` and in all
    (numpy)."""

    prepared: list
    starts: list
    y: object
    weight: object
    region_counts: np.ndarray
    n_used: np.ndarray


class DeviceStarts:
    """The model bank, its members' spline coefficients and the continuum basis as tensors, beside a
    :class:`~astra_thepayne.accel.torch_fit._DeviceNetwork` whose shift tables it shares."""

    def __init__(self, fitter: PayneFitter, network):
        torch = network.torch
        self.torch, self.device, self.network, self.fitter = torch, network.device, network, fitter
        device = self.device

        def f64(a):
            return torch.as_tensor(np.ascontiguousarray(a, dtype=np.float64), device=device)

        bank = fitter._bank()
        self.points = f64(bank.points)
        if network.bank is None:  # one copy on the device, shared with the scores of the numpy engine's requests
            network.bank = (torch.as_tensor(np.array(bank.flux, dtype=np.float32), device=device),
                            torch.as_tensor(np.asarray(bank.flux_squared, dtype=np.float32), device=device))
        self.flux, self.flux_squared = network.bank
        self.segments = network.segments
        self.fit_v = network.fit_v
        self.model_to_apstar = torch.as_tensor(fitter.model_to_apstar, device=device)
        self.edge = f64(fitter._edge_weight()) if self.fit_v else None
        if self.fit_v:
            from ..core.problem import Shift

            # every member's spline coefficients, as the numpy engine makes them for the members it scans against
            coefficients = Shift.coefficients(np.asarray(bank.flux, dtype=np.float64).T, self.segments)
            self.coefficients = f64(coefficients.T)
            self.limit = float(pixel_shift(fitter.v_rad_tolerance))
        basis = fitter._continuum_basis
        self.n_terms = basis.n_terms
        self.basis_pixels = torch.as_tensor(basis.pixels, device=device)
        self.basis = f64(basis.basis)
        self.products = f64(basis.products)
        self.slices = basis.slices
        self.continuum_pixels = torch.as_tensor(fitter.continuum_pixels, device=device)
        self.on_model = torch.as_tensor(fitter._on_model, device=device)
        self.error_floor = float(fitter.pixel_weights.error_floor)

    # -- the steps ----------------------------------------------------------------------------------------------
    def find(self, prepared_spectra) -> FoundStarts:
        """The starts of a batch of prepared spectra (:meth:`PayneFitter.checked_preparation`; a continuum fitted on
        the CPU, if any, is replaced by the one fitted here), as :meth:`PayneFitter._global_start` and
        :meth:`PayneFitter.candidates` make them; see :class:`FoundStarts`."""
        torch = self.torch
        flux = self._upload([p.flux for p in prepared_spectra])
        ivar = self._upload([p.ivar for p in prepared_spectra])
        no_shift = torch.zeros(len(prepared_spectra), dtype=torch.long, device=self.device)
        first = self._normalise(flux, ivar, no_shift)
        y, weight = self._data(*first[1:])
        chosen = self._bank_match(y, weight)
        prepared = first
        if self.fit_v:
            v = self._velocity_scan(chosen[:, 0], y, weight)
            shift = torch.round(self._pixel_shift(v)).long()
            prepared = self._moved(flux, ivar, first, first, shift, no_shift)
            y, weight = self._data(*prepared[1:])
            chosen = self._bank_match(self._roll(y, -shift), self._roll(weight, -shift))
            v = self._velocity_scan(chosen[:, 0], y, weight)
            # the fits start with this velocity, from the spectrum prepared for it (numpy: _moved with it)
            final = torch.round(self._pixel_shift(v)).long()
            prepared = self._moved(flux, ivar, first, prepared, final, shift)
            y, weight = self._data(*prepared[1:])
            v_scaled = (v / (2.0 * self.fitter.v_rad_tolerance)).cpu().numpy()
        continuum = prepared[0].cpu().numpy()
        points = self.points[chosen.clamp(min=0)].cpu().numpy()  # (B, n_starts, K), one copy for the batch
        found = (chosen >= 0).cpu().numpy()
        spectra, starts = [], []
        for i, p in enumerate(prepared_spectra):
            spectra.append(replace(p, continuum=continuum[i], norm_flux=None, norm_ivar=None))
            mine = points[i][found[i]]
            starts.append(np.column_stack([mine, np.full(len(mine), v_scaled[i])]) if self.fit_v else mine)
        used = weight > 0
        regions = self.fitter._layer.design_regions()
        counts = (torch.stack([used[:, rows].sum(1) for rows, _, _, _ in regions], 1) if regions
                  else torch.zeros((len(used), 0), dtype=torch.long, device=self.device))
        return FoundStarts(spectra, starts, y, weight, counts.cpu().numpy(), used.sum(1).cpu().numpy())

    def _upload(self, arrays):
        return self.torch.as_tensor(np.stack(arrays), dtype=self.torch.float64, device=self.device)

    def _data(self, norm_flux, norm_ivar):
        """:meth:`PayneFitter._data` of a batch: flux and weights on the model pixels."""
        y = norm_flux[:, self.model_to_apstar]
        weight = norm_ivar[:, self.model_to_apstar].sqrt()
        if self.fit_v:
            weight = weight * self.edge
        return y, weight

    def _bank_match(self, y, weight):
        """Indices ``(B, n_starts)`` of each spectrum's best bank members at least ``DISTINCT_STARTS`` apart (scaled),
        best first, -1 where fewer were found among the best ``TOP_MATCHES`` (:meth:`PayneFitter._bank_match`)."""
        torch = self.torch
        w2 = weight * weight
        scores = self.network.bank_scores_on_device((w2 * y).float(), w2.float(), self.flux, self.flux_squared)
        top = torch.topk(scores, min(TOP_MATCHES, scores.shape[1]), dim=1).indices  # best first
        n_starts = self.fitter.n_starts
        chosen = torch.full((len(y), n_starts), -1, dtype=torch.long, device=self.device)
        chosen_points = torch.full((len(y), n_starts, self.points.shape[1]), math.inf, dtype=torch.float64,
                                   device=self.device)
        count = torch.zeros(len(y), dtype=torch.long, device=self.device)
        rows = torch.arange(len(y), device=self.device)
        for j in range(top.shape[1]):
            point = self.points[top[:, j]]
            distance = ((point[:, None, :] - chosen_points) ** 2).sum(-1).sqrt()  # inf to an empty slot
            take = (count < n_starts) & (distance > DISTINCT_STARTS).all(1)
            slot = count.clamp(max=n_starts - 1)
            chosen[rows[take], slot[take]] = top[take, j]
            chosen_points[rows[take], slot[take]] = point[take]
            count += take.long()
            if bool((count >= n_starts).all()):
                break
        return chosen

    def _roll(self, values, shift):
        """Each row moved by its own whole number of pixels within each chip segment, zeros entering at the ends
        (:meth:`PayneFitter._roll`)."""
        torch = self.torch
        out = torch.zeros_like(values)
        pixel = torch.arange(values.shape[1], device=self.device)
        for start, stop in self.segments:
            source = pixel[None, start:stop] - shift[:, None]
            inside = (source >= start) & (source < stop)
            gathered = torch.gather(values, 1, source.clamp(start, stop - 1))
            out[:, start:stop] = torch.where(inside, gathered, 0.0)
        return out

    def _pixel_shift(self, v):
        return self.torch.log10(1.0 + v / SPEED_OF_LIGHT_KMS) / APSTAR_CDELT1

    def _velocity_scan(self, members, y, weight):
        """Per spectrum, the velocity (km/s) that best matches bank member ``members[b]``, as
        :meth:`PayneFitter._velocity_scan`: chi2 on whole-pixel shifts and the limits, then quarter pixels around
        the best, then the vertex of a parabola."""
        torch = self.torch
        limit = self.limit
        w2 = weight * weight
        templates = (self.flux[members].double(), self.coefficients[members])
        whole = np.arange(-np.floor(limit), np.floor(limit) + 1)
        trials = np.unique(np.clip(np.concatenate([whole, [-limit, limit]]), -limit, limit))
        trials = torch.as_tensor(trials, dtype=torch.float64, device=self.device)
        values = self._scan_chi2(templates, y, w2, trials.expand(len(y), -1))
        best = trials[torch.argmin(values, 1)]
        steps = torch.arange(-1.0, 1.01, 0.25, dtype=torch.float64, device=self.device)
        fine = (best[:, None] + steps).clamp(-limit, limit)
        fine_values = self._scan_chi2(templates, y, w2, fine)
        i = torch.argmin(fine_values, 1)
        rows = torch.arange(len(y), device=self.device)
        shift = fine[rows, i]
        inner = (i > 0) & (i < len(steps) - 1)
        a = fine_values[rows, (i - 1).clamp(min=0)]
        b = fine_values[rows, i]
        c = fine_values[rows, (i + 1).clamp(max=len(steps) - 1)]
        curvature = a - 2 * b + c
        vertex = inner & (curvature > 0)
        shift = torch.where(vertex, shift + 0.125 * (a - c) / torch.where(vertex, curvature, 1.0), shift)
        shift = shift.clamp(-limit, limit)
        return SPEED_OF_LIGHT_KMS * (10.0 ** (shift * APSTAR_CDELT1) - 1.0)

    def _scan_chi2(self, templates, y, w2, shifts):
        """chi2 ``(B, T)`` of each spectrum's template moved by each of its ``shifts`` ``(B, T)`` against the
        data, each chip's level at its best, up to a constant: minus the sum over chips of
        ``(sum w^2 m y)^2 / sum w^2 m^2``. The shifts of a scan take few distinct values, so the template rows are
        moved value by value: a whole-pixel shift moves the flux itself (as the numpy engine does), any other
        interpolates with the spline's taps."""
        torch = self.torch
        flux, coefficients = templates
        values = torch.zeros(shifts.shape, dtype=torch.float64, device=self.device)
        distinct, inverse = torch.unique(shifts, return_inverse=True)
        for j, shift in enumerate(distinct.tolist()):
            rows, column = torch.nonzero(inverse == j, as_tuple=True)
            if shift == int(shift):
                model = self._roll(flux[rows], torch.full((len(rows),), int(shift), device=self.device))
            else:
                model = self.network.shifted_by(coefficients[rows], shift)
            wy, w = w2[rows] * y[rows], w2[rows]
            for start, stop in self.segments:
                m = model[:, start:stop]
                mm = (w[:, start:stop] * m * m).sum(1)
                md = (wy[:, start:stop] * m).sum(1)
                values[rows, column] -= torch.where(mm > 0, md * md / torch.where(mm > 0, mm, 1.0), 0.0)
        return values

    def _moved(self, flux, ivar, first, prepared, shift, previous):
        """The continuum, normalised flux and ivar of each row with its continuum pixels moved by ``shift`` whole
        pixels: ``prepared`` (those at ``previous``) where the shift is the same, ``first`` (no shift) where it is 0,
        fitted again otherwise (:meth:`PayneFitter._moved`, which keeps each shift's)."""
        back, again = (shift != previous) & (shift == 0), (shift != previous) & (shift != 0)
        if not (back.any() or again.any()):
            return prepared
        out = [array.clone() for array in prepared]
        if back.any():
            for array, kept in zip(out, first, strict=True):
                array[back] = kept[back]
        if again.any():
            for array, new in zip(out, self._normalise(flux[again], ivar[again], shift[again]), strict=True):
                array[again] = new
        return out

    def _normalise(self, flux, ivar, shift):
        """Continuum, normalised flux and ivar with the continuum pixels moved by ``shift`` whole pixels
        (:meth:`PayneFitter._normalisation`)."""
        torch = self.torch
        continuum = self._continuum(flux, ivar, self._roll_mask(shift))
        continuum[:, ~self.on_model] = math.nan
        usable = self.on_model & torch.isfinite(continuum) & (continuum > 0) & (ivar > 0)
        norm_flux = torch.where(usable, flux / torch.where(usable, continuum, 1.0), 0.0)
        norm_ivar = torch.where(usable, ivar * continuum * continuum, 0.0)
        if self.error_floor > 0:
            norm_ivar = norm_ivar.clamp(max=1.0 / self.error_floor**2)
        return [continuum, norm_flux, norm_ivar]

    def _roll_mask(self, shift):
        """The continuum-pixel mask moved by each row's shift over the whole grid (``np.roll``)."""
        size = len(self.continuum_pixels)
        source = (self.torch.arange(size, device=self.device)[None, :] - shift[:, None]) % size
        return self.continuum_pixels[source]

    def _continuum(self, flux, ivar, mask, n_clip=3, clip_sigma=3.0):
        """:meth:`ContinuumBasis.fit` of a batch: an inverse-variance weighted polynomial per region on the
        continuum pixels, with the same rounds of sigma clipping, each row stopping where the numpy code stops."""
        torch = self.torch
        n = self.n_terms
        rows = len(flux)
        continuum = torch.full_like(flux, math.nan)
        pixels = self.basis_pixels
        f, w = flux[:, pixels], ivar[:, pixels]
        usable = mask[:, pixels] & (w > 0) & torch.isfinite(f)
        f = torch.where(usable, f, 0.0)
        sigma_weight = torch.where(usable, w, 0.0).sqrt()
        for part in self.slices:
            basis, products = self.basis[part], self.products[part]
            use = usable[:, part]
            running = torch.ones(rows, dtype=torch.bool, device=self.device)
            solved = torch.zeros(rows, dtype=torch.bool, device=self.device)
            model = torch.zeros((rows, basis.shape[0]), dtype=torch.float64, device=self.device)
            for _ in range(n_clip + 1):
                few = use.sum(1) < 3 * n
                solved &= ~(running & few)
                running &= ~few
                if not running.any():
                    break
                weights = torch.where(use, w[:, part], 0.0)
                matrix = (weights @ products).reshape(rows, n, n)
                side = (weights * f[:, part]) @ basis
                matrix = torch.where(running[:, None, None], matrix, torch.eye(n, dtype=torch.float64,
                                                                                  device=self.device))
                coefficients, info = torch.linalg.solve_ex(matrix, side)
                singular = running & (info != 0)
                solved &= ~singular
                running &= ~singular
                fitted = coefficients @ basis.T
                model = torch.where(running[:, None], fitted, model)
                solved |= running
                keep = use & ((f[:, part] - fitted) * sigma_weight[:, part]).abs().lt(clip_sigma)
                stop = (keep == use).all(1) | (keep.sum(1) < 3 * n)
                running &= ~stop
                use = torch.where(running[:, None], keep, use)
            region = pixels[part]
            continuum[:, region] = torch.where(solved[:, None], model, math.nan)
        return continuum

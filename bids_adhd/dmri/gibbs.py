"""Gibbs unringing: DIPY's ``gibbs_removal`` (Kellner et al. 2016, Neto
Henriques 2018), vectorised over slices.

DIPY runs its 1-D sub-voxel-shift search one 2-D slice at a time (for each
slice: 2 axes x 45 shifts x 2 signs of small FFTs);
here the same operations run on stacks of slices at once (batched
``scipy.fft`` along the last axis), and stacks are shared between ``nprocs``
threads (the FFTs and the numpy kernels release the GIL).

Two modes (``unring(..., exact=...)``):

* ``exact=True``: DIPY's complex FFTs, the same floating point operations in
  the same order and types: the same result as
  ``dipy.denoise.gibbs.gibbs_removal`` with ``num_processes=1``, bit for bit
  (tested on float32 and float64 input).
* ``exact=False`` (default): real FFTs (``rfft``/``irfft``, half the
  transform length, no complex modulus; see :class:`_Shifter` for why this
  is the same quantity, the Nyquist bin of an even length included), and 49
  shifted images per line instead of 90: a negative shift ``-s`` is the
  positive shift ``1 - s`` read one sample later (exact for the trigonometric
  interpolant; :func:`_unring_1d_paired`). Only the rounding differs, and
  where two shifts' total variations are within rounding of each other the
  other shift can win. Each image updates one best-so-far instead of two
  (:func:`_unring_1d_paired`) and the left total variation is the right
  one read ``n_points`` samples earlier (:class:`_TV0`). Measured against
  DIPY on simulated demo data (``bids_adhd simulate --seed 31 --size demo``,
  sub-01's raw series, slices 28-31 of volumes 0, 8, 16, 24, float32): max
  abs difference 5.5e-4 of the data range, median 1.4e-8, 0.12 % of voxels
  above 1e-5 of the range (0.11 % before those two changes), none above
  1e-3; float64 input: ~1e-15 of the range on the test phantom. Less CPU
  time than ``exact=True``
  (measured: ``docs/preprocessing.md``, the Gibbs section).

Exactly what is reproduced, per 2-D slice (see ``dipy/denoise/gibbs.py``):

* ``_gibbs_removal_1d`` along each in-plane axis: total variation ``TV =
  min(sum_{n<n_points} |x[i+n]-x[i+n+1]|, sum_{n<n_points} |x[i-n]-x[i-n-1]|)``
  with circular wrap, summed in DIPY's order; shifts ``s`` in
  ``linspace(0.02, 0.9, 45)`` applied as ``|ifft(fft(x) exp(±2πi k s))|``;
  the lowest TV per voxel wins for each sign (strict ``>`` update, as DIPY);
  the two winners are interpolated back to the grid.
* ``_gibbs_removal_2d``: the two 1-D corrected images are combined in
  k-space with DIPY's ``_weights`` (G0, G1), ``|ifft2(fftshift(F1) G1 +
  fftshift(F0) G0)|`` (the combination runs in complex128 as in DIPY, because
  the weights are float64).

Computation type: float32/complex64 for float32 (and integer) input,
float64/complex128 for float64 input, as DIPY. Integer input is first cast to
float32 (DIPY would write intermediate float results back into the integer
array); the output is float32 for integer input, otherwise the input dtype.
"""
from __future__ import annotations

import contextlib

import numpy as np
import scipy.fft as _fft

from ._parallel import resolve_nprocs, single_threaded_blas, thread_map

__all__ = ["unring"]

# slices per work item: ~ (64*64) * 48 complex64 = 1.5 MB per array, so the
# dozen working arrays of one item stay in the shared L3 cache.
_TARGET_ELEMENTS = 64 * 64 * 48


def _weights(shape):
    """DIPY's ``_weights``: k-space weights of the two 1-D corrections."""
    G0 = np.zeros(shape)
    G1 = np.zeros(shape)
    k0 = np.linspace(-np.pi, np.pi, num=shape[0])
    k1 = np.linspace(-np.pi, np.pi, num=shape[1])
    K1, K0 = np.meshgrid(k1[1:-1], k0[1:-1])
    cosk0 = 1.0 + np.cos(K0)
    cosk1 = 1.0 + np.cos(K1)
    G1[1:-1, 1:-1] = cosk0 / (cosk0 + cosk1)
    G0[1:-1, 1:-1] = cosk1 / (cosk0 + cosk1)
    G1[1:-1, 0] = G1[1:-1, -1] = 1
    G1[0, 0] = G1[-1, -1] = G1[0, -1] = G1[-1, 0] = 1 / 2
    G0[0, 1:-1] = G0[-1, 1:-1] = 1
    G0[0, 0] = G0[-1, -1] = G0[0, -1] = G0[-1, 0] = 1 / 2
    return G0, G1


class _TV:
    """min of DIPY's right/left total variation along the last axis (circular).

    With ``d[j] = |x[j] - x[j+1]|`` (circular), DIPY's right sum is
    ``((d[i] + d[i+1]) + d[i+2]) + ...`` and its left sum ``((|x[i]-x[i-1]| +
    |x[i-1]-x[i-2]|) + ...)``; ``|x[i-n] - x[i-n-1]|`` equals ``d[i-n-1]`` bit
    for bit (IEEE subtraction is antisymmetric), so both sums are formed from
    ``d`` in DIPY's order. For ``n_points = 3`` the shared pair sum ``q[k] =
    d[k] + d[k+1]`` gives ``ptv[i] = q[i] + d[i+2]`` and ``ntv[i] = q[i-2] +
    d[i-3]`` (addition is commutative, so the bits are DIPY's); these run as
    contiguous whole-array operations with the few wrapped columns fixed
    afterwards. Buffers are allocated once per stack.
    """

    def __init__(self, shape, dtype, n_points):
        self.P = n_points
        self.N = N = shape[-1]
        self.fast = n_points == 3 and N >= 4
        self.d = np.empty(shape, dtype)
        self.ptv = np.empty(shape, dtype)
        self.ntv = np.empty(shape, dtype)
        self.q = np.empty(shape, dtype) if self.fast else None

    def __call__(self, x, out=None):
        N, d, ptv, ntv = self.N, self.d, self.ptv, self.ntv
        if out is None:
            out = np.empty_like(ptv)
        if not self.fast:
            return self._generic(x, out)
        xf, df, qf, pf, nf = (a.reshape(-1) for a in (x, d, self.q, ptv, ntv))
        q = self.q
        np.subtract(xf[:-1], xf[1:], out=df[:-1])
        np.subtract(x[..., N - 1], x[..., 0], out=d[..., N - 1])
        np.abs(df, out=df)
        np.add(df[:-1], df[1:], out=qf[:-1])
        np.add(d[..., N - 1], d[..., 0], out=q[..., N - 1])
        np.add(qf[:-2], df[2:], out=pf[:-2])                     # (d[i] + d[i+1]) + d[i+2]
        np.add(q[..., N - 2], d[..., 0], out=ptv[..., N - 2])
        np.add(q[..., N - 1], d[..., 1], out=ptv[..., N - 1])
        np.add(qf[1:-2], df[:-3], out=nf[3:])                    # (d[i-2] + d[i-1]) + d[i-3]
        np.add(q[..., N - 2], d[..., N - 3], out=ntv[..., 0])
        np.add(q[..., N - 1], d[..., N - 2], out=ntv[..., 1])
        np.add(q[..., 0], d[..., N - 1], out=ntv[..., 2])
        return np.minimum(ptv, ntv, out=out)

    def _generic(self, x, out):
        P, N = self.P, self.N
        d = np.abs(x - np.roll(x, -1, axis=-1))
        dp = np.concatenate((d[..., N - P:], d, d[..., :P]), axis=-1)   # dp[P + j] = d[j mod N]
        ptv, ntv = self.ptv, self.ntv
        np.copyto(ptv, dp[..., P:P + N])
        np.copyto(ntv, dp[..., P - 1:P - 1 + N])
        for n in range(1, P):
            ptv += dp[..., P + n:P + n + N]
            ntv += dp[..., P - 1 - n:P - 1 - n + N]
        return np.minimum(ptv, ntv, out=out)


class _TV0:
    """:class:`_TV` for lines along axis 0 of an (N, lines) array (the real-FFT search only): every
    operation, the circular wrap included, runs on whole contiguous rows.

    The left sum is the right sum ``n_points`` samples earlier: ``ntv[i] = d[i-1] + ... +
    d[i-P] = ptv[i-P]`` (circular), so it is not summed again; only its addition order
    differs from DIPY's (``ptv[i-3] = (d[i-3] + d[i-2]) + d[i-1]``, DIPY ``(d[i-1] + d[i-2]) +
    d[i-3]``), i.e. rounding, which the real-FFT mode already allows.
    """

    def __init__(self, shape, dtype, n_points):
        self.P, self.N = n_points, shape[0]
        self.d, self.q, self.ptv = (np.empty(shape, dtype) for _ in range(3))

    def __call__(self, x, out=None):
        d, q, p, P = self.d, self.q, self.ptv, self.P
        out = np.empty_like(p) if out is None else out
        np.subtract(x[:-1], x[1:], out=d[:-1])
        np.subtract(x[-1], x[0], out=d[-1])
        np.abs(d, out=d)
        if P != 3 or self.N < 4:
            np.copyto(p, d)
            for k in range(1, P):
                p += np.roll(d, -k, axis=0)
        else:
            np.add(d[:-1], d[1:], out=q[:-1])
            np.add(d[-1], d[0], out=q[-1])
            np.add(q[:-2], d[2:], out=p[:-2])                       # (d[i] + d[i+1]) + d[i+2]
            np.add(q[-2], d[0], out=p[-2])
            np.add(q[-1], d[1], out=p[-1])
        P %= self.N
        np.minimum(p[P:], p[:self.N - P], out=out[P:])               # min(ptv[i], ptv[i - P])
        np.minimum(p[:P], p[self.N - P:], out=out[:P])
        return out


def _select(dst, src, m):
    """``dst[m] = src[m]`` as bit operations (``m``: all-ones/zero unsigned mask)."""
    di = dst.view(m.dtype)
    t = np.bitwise_xor(di, src.view(m.dtype))
    np.bitwise_and(t, m, out=t)
    np.bitwise_xor(di, t, out=di)


class _Shifter:
    """``|ifft(fft(x) exp(k s))|`` of a stack of real lines, for one shift ``s`` at a time.

    ``exact=True``: DIPY's complex FFTs (bit for bit). ``exact=False``: real
    FFTs (half the transform length and no complex modulus). ``fft(x)`` of a
    real line is Hermitian and the phase ramp ``exp(k s)`` keeps it so, except
    at the Nyquist bin of an even length, where DIPY's ``k = -i pi`` turns the
    real ``c[N/2]`` into ``a + i b``. Then ``ifft(y)[n] = irfft(y)[n] + i (b /
    N) (-1)^n`` exactly (``irfft`` uses the real part ``a``), so the modulus is
    ``sqrt(irfft(y)^2 + (b / N)^2)``: the same quantity, rounded differently.
    """

    def __init__(self, xs, exact, axis=-1):
        self.exact, self.axis = exact, axis
        self.N = N = xs.shape[axis]
        k = _fft.fftfreq(N, 1 / (2.0j * np.pi))
        if exact:
            self.c = _fft.fft(xs, axis=axis)
        else:
            self.c = _fft.rfft(xs, axis=axis)
            k = k[:self.c.shape[axis]]                 # DIPY's k; Nyquist bin: -i pi
        self.k = k.astype(self.c.dtype, copy=False)
        if axis == 0:                                  # lines along axis 0 (the (N, lines) layout)
            self.k = self.k[:, None]
        self.prod = np.empty_like(self.c)
        self.nyq = (not exact) and N % 2 == 0
        self.dtype = np.result_type(np.abs(self.c[..., :1]))

    def transform(self, ks, sign):
        """``ifft(c e)`` (exact) or ``(irfft(c e), (b / N)^2 per line or None)``."""
        np.multiply(self.c, np.exp(ks) if sign > 0 else np.exp(-ks), out=self.prod)
        if self.exact:
            return _fft.ifft(self.prod, axis=self.axis, overwrite_x=True), None
        r = _fft.irfft(self.prod, n=self.N, axis=self.axis)
        if not self.nyq:
            return r, None
        b = (self.prod[-1] if self.axis == 0 else self.prod[..., -1]).imag / self.N
        return r, b * b

    def __call__(self, ks, sign, out):
        r, b2 = self.transform(ks, sign)
        if b2 is None:
            return np.abs(r, out=out)
        np.multiply(r, r, out=out)
        out += b2[None, :] if self.axis == 0 else b2[..., None]
        return np.sqrt(out, out=out)


def _unring_1d(x, n_points, exact=True):
    """DIPY ``_gibbs_removal_1d(x, axis=1)`` for a stack ``x`` (..., lines, N).

    DIPY's masked updates ``isp[tvp > tvs] = img[...]; sp[...] = s; tvp[...] =
    tvs[...]`` are done as ``tvp = minimum(tvp, tvs)``, a bitwise select for
    ``isp`` and, for ``sp``, the 1-based index of the last improving shift
    (``uint8``; the shifts are visited in increasing order, so that index is a
    running maximum), turned into the shift value (bit for bit DIPY's ``s``)
    at the end. Identical results for finite data with ``exact``; non-finite
    input takes DIPY's path.
    """
    dtype_float = np.promote_types(x.real.dtype, np.float32)
    ssamp = np.linspace(0.02, 0.9, num=45, dtype=dtype_float)
    if not exact and x.dtype == dtype_float and np.isfinite(x).all():
        # (N, lines) layout: every operation, the circular wraps included, on contiguous rows
        xt = np.ascontiguousarray(x.reshape(-1, x.shape[-1]).T)
        tvf0 = _TV0(xt.shape, xt.dtype, n_points)
        out = _unring_1d_paired(xt, tvf0, tvf0(xt), _Shifter(xt, False, axis=0), ssamp)
        return np.ascontiguousarray(out.T).reshape(x.shape)
    xs = x.copy()
    tvf = _TV(xs.shape, xs.dtype, n_points)
    tvp = tvf(xs)
    tvn = tvp.copy()
    isp = xs.copy()
    isn = xs.copy()
    shifter = _Shifter(xs, exact)
    img = np.empty(xs.shape, dtype=shifter.dtype)
    tvs = np.empty_like(tvp)
    mask = np.empty(xs.shape, dtype=bool)
    fast = bool(np.isfinite(xs).all()) and img.dtype == xs.dtype == dtype_float
    if fast:
        uint = np.dtype(f"u{xs.dtype.itemsize}")
        mbits = np.empty(xs.shape, dtype=uint)
        jp = np.zeros(xs.shape, dtype=np.uint8)         # 0: no shift, j: ssamp[j - 1]
        jn = np.zeros(xs.shape, dtype=np.uint8)
        j8 = np.empty(xs.shape, dtype=np.uint8)
        m8 = mask.view(np.uint8)
        track = (jp, jn)
    else:
        sp = np.zeros(xs.shape, dtype=dtype_float)
        sn = np.zeros(xs.shape, dtype=dtype_float)
        track = (sp, sn)
    for j, s in enumerate(ssamp, 1):
        ks = shifter.k * s
        for sign, iss, ss, tv in ((1, isp, track[0], tvp), (-1, isn, track[1], tvn)):
            shifter(ks, sign, img)
            tvf(img, out=tvs)
            np.greater(tv, tvs, out=mask)
            if fast:
                np.multiply(m8, j, out=j8)
                np.maximum(ss, j8, out=ss)
                np.copyto(mbits, mask)
                np.negative(mbits, out=mbits)            # 1 -> all ones
                _select(iss, img, mbits)
                np.minimum(tv, tvs, out=tv)
            else:
                np.copyto(iss, img, where=mask)
                np.copyto(ss, s, where=mask)
                np.copyto(tv, tvs, where=mask)
    if fast:
        table = np.concatenate((np.zeros(1, dtype=dtype_float), ssamp))
        sp = table[jp]
        sn = table[jn]
    return _interpolate(xs, isp, isn, sp, sn)


class _Best:
    """Best-so-far image, total variation and shift code of one search branch (numpy, in place)."""

    def __init__(self, tv, img):
        self.tv, self.img = tv, img
        self.code = np.zeros(tv.shape, np.uint8)
        self.mask = np.empty(tv.shape, bool)
        self.bits = np.empty(tv.shape, np.dtype(f"u{tv.dtype.itemsize}"))
        self.c8 = np.empty(tv.shape, np.uint8)

    def update(self, img, tvs, code, strict):
        """Where ``tvs`` < (strict) or <= the best TV: take ``img``; keep the largest ``code`` (running max)."""
        (np.less if strict else np.less_equal)(tvs, self.tv, out=self.mask)
        m8 = self.mask.view(np.uint8)
        np.multiply(m8, code, out=self.c8)
        np.maximum(self.code, self.c8, out=self.code)
        np.copyto(self.bits, self.mask)
        np.negative(self.bits, out=self.bits)
        _select(self.img, img, self.bits)
        np.minimum(self.tv, tvs, out=self.tv)


def _unring_1d_paired(xs, tvf, tv0, shifter, ssamp):
    """The ``exact=False`` search with 49 shifted images per line instead of DIPY's 90; lines along axis 0.

    The band-limited (trigonometric) interpolant satisfies ``x(n - s) = x((n -
    1) + (1 - s))`` exactly, also for DIPY's Nyquist phase (``e^{-i pi (1 -
    s)} (-1)^(n-1) = e^{i pi s} (-1)^n``), and the circular total variation
    is shift-equivariant; so the negative shift ``s_j`` (``0.02 j``) is the
    positive shift ``1 - s_j`` = ``s_{50-j}`` read one sample later. Image ``i``
    (1..49: ``s_1..s_45``, then ``1 - s_4..1 - s_1``) serves the positive branch
    for ``i <= 45`` and the negative shift ``j = 50 - i`` for ``i >= 5``; the
    negative branch is kept in the shifted frame and rolled back at the end.

    DIPY's choice is the first minimum in increasing ``s`` and no shift on a
    tie; for the negative branch that is the *last* minimum in increasing
    ``i``. Images 5..45 serve both branches, so their best-so-far is tracked
    once (``mid``, first minimum), beside images 1..4 (positive only, after no
    shift) and 46..49 (negative only, last minimum): 49 updates instead of 90.
    The positive branch then equals DIPY's strict scan exactly; the negative
    one takes the first instead of the last of two *exactly* equal totals
    within 5..45, i.e. the other equally good shift. ``1 - s_j`` and
    ``s_{50-j}`` differ by float rounding only.
    """
    n = len(ssamp)                                   # 45
    head = _Best(tv0.copy(), xs.copy())               # no shift, then images 1..4
    mid = _Best(np.full_like(tv0, np.inf), np.empty_like(xs))
    tail = _Best(np.full_like(tv0, np.inf), np.empty_like(xs))
    img = np.empty_like(xs)
    tvs = np.empty_like(tv0)
    extra = [1 - ssamp[j - 1] for j in range(49 - n, 0, -1)]          # 1 - s_j, j = 4..1
    for i, u in enumerate(list(ssamp) + extra, 1):
        shifter(shifter.k * u, 1, img)
        tvf(img, out=tvs)
        if i <= 49 - n:
            head.update(img, tvs, i, strict=True)
        elif i <= n:
            mid.update(img, tvs, i, strict=True)
        else:
            tail.update(img, tvs, i, strict=False)
    table = np.concatenate((np.zeros(1, dtype=ssamp.dtype), ssamp))
    pos_mid = mid.tv < head.tv                                      # strict: the earlier image wins ties
    isp = np.where(pos_mid, mid.img, head.img)
    sp = table[np.where(pos_mid, mid.code, head.code)]
    neg_tail = tail.tv <= mid.tv                                    # the later image wins ties
    neg_tv = np.where(neg_tail, tail.tv, mid.tv)
    i_neg = np.where(neg_tail, tail.code, mid.code).astype(np.intp)
    take = neg_tv < np.roll(tv0, -1, axis=0)                        # strictly better than no shift
    sn = np.roll(np.where(take, table[50 - i_neg], 0), 1, axis=0).astype(ssamp.dtype)
    neg_img = np.where(neg_tail, tail.img, mid.img)
    isn = np.where(np.roll(take, 1, axis=0), np.roll(neg_img, 1, axis=0), xs)
    return _interpolate(xs, isp, isn, sp, sn)


def _interpolate(xs, isp, isn, sp, sn):
    """DIPY's final step: interpolate the two best-shifted images back to the grid."""
    tot = sp + sn
    with np.errstate(divide="ignore", invalid="ignore"):
        val = (isp - isn) / tot * sn + isn
    np.copyto(xs, val, where=tot != 0)
    return xs


def _unring_stack(stack, n_points, G0, G1, exact=True):
    """DIPY ``_gibbs_removal_2d`` for every slice of ``stack`` (S, A, B)."""
    img_c1 = _unring_1d(stack, n_points, exact)
    img_c0 = _unring_1d(np.ascontiguousarray(stack.transpose(0, 2, 1)), n_points, exact).transpose(0, 2, 1)
    axes = (-2, -1)
    C1 = _fft.fft2(img_c1, axes=axes)
    C0 = _fft.fft2(img_c0, axes=axes)
    comb = _fft.fftshift(C1, axes=axes) * G1 + _fft.fftshift(C0, axes=axes) * G0
    return np.abs(_fft.ifft2(comb, axes=axes))


def _tv_torch(x, P):
    """:class:`_TV` on a torch tensor: ``min`` of the right and left circular sums, same summation order."""
    import torch

    d = torch.abs(x - torch.roll(x, -1, dims=-1))
    ptv = d.clone()
    ntv = torch.roll(d, 1, dims=-1)
    for n in range(1, P):
        ptv += torch.roll(d, -n, dims=-1)
        ntv += torch.roll(d, n + 1, dims=-1)
    return torch.minimum(ptv, ntv)


def _unring_1d_torch(t, n_points):
    """``_unring_1d(exact=False)`` on a torch tensor (any device): real FFTs, the same search and update."""
    import torch

    N = t.shape[-1]
    ssamp = np.linspace(0.02, 0.9, num=45, dtype=np.promote_types(np.dtype(str(t.dtype)[6:]), np.float32))
    c = torch.fft.rfft(t, dim=-1)
    k = torch.from_numpy(_fft.fftfreq(N, 1 / (2.0j * np.pi))[:c.shape[-1]]).to(c.dtype).to(t.device)
    tvp = _tv_torch(t, n_points)
    best = [[tvp, t, torch.zeros(t.shape, dtype=torch.uint8, device=t.device)],
            [tvp.clone(), t, torch.zeros(t.shape, dtype=torch.uint8, device=t.device)]]
    for j, s in enumerate(ssamp, 1):
        ks = k * float(s)
        for sign, b in zip((1, -1), best):
            prod = c * torch.exp(ks if sign > 0 else -ks)
            r = torch.fft.irfft(prod, n=N, dim=-1)
            if N % 2 == 0:                              # Nyquist term, as _Shifter
                nyq = prod[..., -1].imag / N
                img = torch.sqrt(r * r + (nyq * nyq)[..., None])
            else:
                img = torch.abs(r)
            tvs = _tv_torch(img, n_points)
            m = b[0] > tvs
            b[1] = torch.where(m, img, b[1])
            b[2] = torch.where(m, torch.full_like(b[2], j), b[2])
            b[0] = torch.minimum(b[0], tvs)
    table = torch.from_numpy(np.concatenate((np.zeros(1, ssamp.dtype), ssamp))).to(t.device)
    sp, sn = table[best[0][2].long()], table[best[1][2].long()]
    isp, isn = best[0][1], best[1][1]
    tot = sp + sn
    val = (isp - isn) / tot * sn + isn
    return torch.where(tot != 0, val, t)


def _unring_stack_torch(stack, n_points, G0, G1, device):
    """:func:`_unring_stack` (real-FFT mode) with torch on ``device``; numpy in and out."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(stack)).to(device)
    img_c1 = _unring_1d_torch(t, n_points)
    img_c0 = _unring_1d_torch(t.transpose(1, 2).contiguous(), n_points).transpose(1, 2)
    dims = (-2, -1)
    C1 = torch.fft.fftshift(torch.fft.fft2(img_c1, dim=dims), dim=dims)
    C0 = torch.fft.fftshift(torch.fft.fft2(img_c0, dim=dims), dim=dims)
    g0, g1 = (torch.from_numpy(g).to(device) for g in (G0, G1))
    return torch.abs(torch.fft.ifft2(C1 * g1 + C0 * g0, dim=dims)).cpu().numpy()


def _resolve_device(device, exact):
    """None: "cuda" when torch sees a CUDA device, else the numpy path ("numpy"); exact=True: numpy.

    Without torch already imported and without an NVIDIA device node, torch is not imported just
    to look (its import costs over a second of CPU in a fresh process, e.g. a Nipype node:
    ``benchmarks/results/code_timings.md``).
    """
    import os
    import sys

    if exact or device == "numpy":
        return "numpy"
    if device is None:
        if "torch" not in sys.modules and not os.path.exists("/dev/nvidia0"):
            return "numpy"
        try:
            import torch
        except ImportError:                             # pragma: no cover - torch is a dependency
            return "numpy"
        return "cuda" if torch.cuda.is_available() else "numpy"
    return str(device)


def unring(data, slice_axis=2, n_points=3, nprocs=1, *, exact=False, device=None, slices_per_item=None):
    """Suppress Gibbs ringing slice by slice; same result as DIPY's ``gibbs_removal``.

    Parameters
    ----------
    data : ndarray (X, Y), (X, Y, Z) or (X, Y, Z, N)
        Image(s); the last axis of a 4-D array is the volume axis.
    slice_axis : int
        Axis (0, 1 or 2) along which the slices were acquired.
    n_points : int
        Neighbours used for the local total variation (DIPY default 3).
    nprocs : int
        Worker threads (each with single-threaded BLAS); ``None``/0: all CPUs.
    exact : bool
        True: DIPY's complex FFTs, bit for bit DIPY's result. False (default):
        real FFTs, the same quantity rounded differently (the module
        docstring has the measured difference).
    device : None | "numpy" | torch device string
        Where the real-FFT search runs. None (default): on the GPU when torch
        sees CUDA, else the numpy path; "cpu", "cuda", ...: torch on that
        device (the same operations; FFT libraries differ, so the result
        agrees with the numpy path within float rounding, tested on the
        torch CPU device). ``exact=True`` always runs the numpy path.
    slices_per_item : int, optional
        Slices per work item (default: about 200k voxels per item).

    Returns
    -------
    ndarray, same shape; float32 for integer input, else the input dtype.
    The input is not modified.
    """
    arr = np.asarray(data)
    nd = arr.ndim
    if nd > 4 or nd < 2:
        raise ValueError("Data have to be a 4D, 3D or 2D matrix")
    if slice_axis not in (0, 1, 2):
        raise ValueError("slice_axis must be 0, 1 or 2")
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32)
    # a (S0, S1, A, B) view of the slices (no copy: a contiguous copy of the whole series was one
    # more copy of the data, 730 MB at HBN size); work items gather their slices from it and
    # write their results straight into the output, in the input's layout
    out = np.empty(arr.shape, dtype=arr.dtype)
    src, dst = _slice_view(arr, slice_axis), _slice_view(out, slice_axis)
    n1 = src.shape[1]
    n_slices = src.shape[0] * n1
    shape2 = src.shape[-2:]
    G0, G1 = _weights(shape2)
    device = _resolve_device(device, exact)

    def gather(i0, i1):
        return np.stack([src[i // n1, i % n1] for i in range(i0, i1)])

    def scatter(i0, res):
        for k, r in enumerate(res):
            dst[(i0 + k) // n1, (i0 + k) % n1] = r

    if device != "numpy":
        # one stack of ~256 slices at a time on the device (vectorised there)
        per = slices_per_item or max(1, 2**22 // int(np.prod(shape2)))
        with single_threaded_blas() if device == "cpu" else contextlib.nullcontext():
            for i0 in range(0, n_slices, per):
                scatter(i0, _unring_stack_torch(gather(i0, min(n_slices, i0 + per)), n_points, G0, G1, device))
        return out
    per = slices_per_item or max(1, _TARGET_ELEMENTS // int(np.prod(shape2)))
    nprocs = resolve_nprocs(nprocs)
    # at least a few items per worker so that the threads stay busy to the end
    per = max(1, min(per, -(-n_slices // (4 * nprocs)) if nprocs > 1 else per))

    def work(i0):
        scatter(i0, _unring_stack(gather(i0, min(n_slices, i0 + per)), n_points, G0, G1, exact))

    with single_threaded_blas():
        thread_map(work, list(range(0, n_slices, per)), nprocs)
    return out


def _slice_view(arr, slice_axis):
    """(S0, S1, A, B) view of 2-, 3- or 4-D ``arr``: slice index along ``slice_axis``, volume, in-plane."""
    if arr.ndim == 2:
        return arr[None, None]
    if arr.ndim == 3:
        return np.moveaxis(arr, slice_axis, 0)[:, None]
    return np.moveaxis(arr, (slice_axis, 3), (0, 1))

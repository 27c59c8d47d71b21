"""Counter-based random numbers for the compartmental network: every spike's uniform number is a pure function of
(network seed, epoch, phase, example position, time step, layer, neuron), so a network draws the same spikes alone,
in any population, at any batch composition and on any device (up to the floating-point order of the potentials).

    key = member_key(seed, epoch, phase)                  # a Python int per network and phase (mix of the three)
    ex = example_keys(key, positions)                     # (..., B) int64: one per example position in the epoch
    base = step_keys(ex, t0, Ts)                          # (..., Ts, B) int64: one per time step t0 .. t0 + Ts - 1
    lam, n = spike_counts(x, base.view(-1, 1), neuron_offsets(layer, n_neurons), lmax, from_potential=True)

The generator: SplitMix64's finaliser (Steele, Lea & Flood 2014; the constants of Stafford's "Mix13") applied to a
64-bit counter at each stage, key_(k+1) = mix(key_k + (c + 1) G) with G = 0x9E3779B97F4A7C15 (the golden ratio's
Weyl increment) and c the stage's counter (epoch, phase, position, step, then (layer << 32) + neuron). All of it is
torch int64 arithmetic (products wrap modulo 2^64; a logical right shift is an arithmetic one masked), vectorised;
the uniform is the top 24 bits times 2^-24 (float32) or the top 53 bits times 2^-53 (float64), in [0, 1). On the
CPU a small C kernel (native_uniforms, built with the system's C compiler where there is one) computes the same
integers, so the same numbers, with vectorised 64-bit products.
Spike counts are Poisson by inverse CDF of that one uniform: N >= k iff u > F(k - 1; lambda).
"""
import math
import os

import torch

from utils import compartmental_native as native

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15      # Weyl increment between counters
MIX1, MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB   # SplitMix64's finaliser multipliers
PHASES = {"forward": 0, "target": 1, "test": 2}
FUSE = os.environ.get("BIODL_COMPILE", "1") != "0"   # sample with one torch.compile'd kernel (BIODL_COMPILE=0: eager)
FUSE_MIN = 2 ** 16    # ... from this many neuron-steps on (smaller ones stay eager)
FUSE_K = 6            # thresholds tested densely (P(N >= 6) < 1e-7 at rate 0.2; the exact tail after)


def signed(v):
    """A 64-bit unsigned Python int as the int64 with the same bits."""
    v &= MASK64
    return v - (1 << 64) if v >= 1 << 63 else v


def _srl(z, k):
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def mix(z):
    """SplitMix64's finaliser on int64 tensors (bijective on 64-bit words)."""
    z = (z ^ _srl(z, 30)) * signed(MIX1)
    z = (z ^ _srl(z, 27)) * signed(MIX2)
    return z ^ _srl(z, 31)


def mix_int(z):
    """mix on a Python int (the same bits)."""
    z &= MASK64
    z = ((z ^ (z >> 30)) * MIX1) & MASK64
    z = ((z ^ (z >> 27)) * MIX2) & MASK64
    return z ^ (z >> 31)


def member_key(seed, epoch, phase):
    """The key of one network's phase ("forward", "target", "test") in one epoch, as an int64 value."""
    k = mix_int(int(seed) + GOLDEN)
    k = mix_int(k + (int(epoch) + 1) * GOLDEN)
    return signed(mix_int(k + (PHASES[phase] + 1) * GOLDEN))


def example_keys(keys, positions):
    """keys (..., 1) int64 (one per member) and positions (..., B) int64 (each example's place in the epoch's order,
    or in the tested X) -> (..., B) keys."""
    return mix(keys + (positions + 1) * signed(GOLDEN))


def step_keys(ex, t0, Ts):
    """(..., B) example keys -> (..., Ts, B) keys of the time steps t0 .. t0 + Ts - 1 of the phase."""
    t = torch.arange(t0 + 1, t0 + Ts + 1, device=ex.device, dtype=torch.int64).view(-1, 1)
    return mix(ex.unsqueeze(-2) + t * signed(GOLDEN))


def neuron_offsets(layer, idx):
    """(1, n) int64 counters of the neurons `idx` (int64 tensor, or a count n for 0 .. n-1) of a layer (0: input)."""
    if isinstance(idx, int):
        idx = torch.arange(idx, dtype=torch.int64)
    return (((layer << 32) + idx + 1) * signed(GOLDEN)).view(1, -1)


def unit(z, dtype):
    """The uniform in [0, 1) of each 64-bit word: its top 24 (float32) or 53 (float64) bits."""
    bits = 53 if dtype == torch.float64 else 24
    return _srl(z, 64 - bits).to(dtype) * (2.0 ** -bits)


def uniforms(base, offs, dtype):
    """The uniforms of (base + offs) (broadcast), e.g. base (R, 1) step keys and offs (1, n) neuron offsets."""
    return unit(mix(base + offs), dtype)


def _thresholds(x, u, lmax, from_potential: bool):
    """Rates lambda = lmax sigmoid(x) (or x) and Poisson counts from the uniforms u, the first FUSE_K inverse-CDF
    thresholds sum_{j<k} e^-lambda lambda^j / j! tested in one element-wise pass; also the largest count."""
    lam = torch.sigmoid(x) * lmax if from_potential else x
    term = torch.exp(-lam)
    cdf = term
    n = (u > cdf).to(u.dtype)
    for k in range(1, FUSE_K):
        term = term * lam / k
        cdf = cdf + term
        n = n + (u > cdf).to(u.dtype)
    return lam, n, n.amax()


def _counts(x, base, offs, lmax, from_potential: bool, f64: bool):
    """_thresholds of the keyed uniforms of (base + offs), computed in the same pass."""
    return _thresholds(x, unit(mix(base + offs), torch.float64 if f64 else torch.float32), lmax, from_potential)


_fused = {}   # (device type, kernel) -> compiled _counts / _thresholds, or None where compiling failed

# The keyed uniforms in C (the same integers, so the same numbers, as `uniforms`): utils/compartmental_native.py;
# without a compiler (or with BIODL_COMPILE=0) the torch ops compute them.
NATIVE = FUSE


def native_uniforms(base, offs, shape, dtype):
    """uniforms(base, offs, dtype) broadcast to `shape` from the C kernel, or None where it does not apply (no
    library, not on the CPU, or offsets that differ between rows)."""
    if not NATIVE or base.device.type != "cpu" or base.dtype != torch.int64 or offs.dtype != torch.int64 or \
            dtype not in (torch.float32, torch.float64) or not len(shape):
        return None
    lib = native.library()
    if lib is None:
        return None
    n = shape[-1]
    R = math.prod(shape[:-1])
    b = base.expand(shape).reshape(R, n)
    o = offs.expand(shape).reshape(R, n)
    if R > 1 and o.stride(0) != 0 or n > 1 and (o.stride(1) != 1 or b.stride(1) not in (0, 1)):
        return None
    out = torch.empty(shape, dtype=dtype)
    if R and n:
        lib.keyed_uniforms(b.data_ptr(), b.stride(0), b.stride(1) if n > 1 else 0, o.data_ptr(), R, n,
                           out.data_ptr(), int(dtype == torch.float64))
    return out


def _tail(n, lam, base, offs, k):
    """Counts n (2-d) known to be >= k where n == k: add one while u > F(k; lambda), F(k; l) = e^-l sum_{j<=k}
    l^j / j!, with the uniforms recomputed from the keys at those places only."""
    r, c = (n >= k).nonzero(as_tuple=True)
    if not r.numel():
        return
    shape = n.shape
    l = lam.expand(shape)[r, c]
    v = unit(mix(base.expand(shape)[r, c] + offs.expand(shape)[r, c]), n.dtype) * torch.exp(l)
    term = l ** k / math.factorial(k)
    s = sum(l ** j / math.factorial(j) for j in range(k + 1))
    while True:
        hit = v > s
        if not bool(hit.any()) or k > 200:
            break
        r, c, v, l, term, s = r[hit], c[hit], v[hit], l[hit], term[hit], s[hit]
        n[r, c] += 1
        k += 1
        term = term * l / k
        s = s + term


def spike_counts(x, base, offs, lmax, from_potential):
    """(lambda, Poisson counts), 2-d, for potentials x (lambda = lmax sigmoid(x)) or rates x, (R or 1, n), with the
    uniforms of the keys base (R, 1 or n) + offs (1, n); lmax a number or (R, 1). (Any broadcastable shapes of
    another rank work alike: counts of the broadcast shape.) One compiled kernel for large
    tensors where torch.compile works (the same integers, so the same uniforms, as the eager ops)."""
    shape = torch.broadcast_shapes(x.shape, base.shape, offs.shape)
    f64 = x.dtype == torch.float64
    u = native_uniforms(base, offs, shape, x.dtype)
    kind = x.device.type
    if u is None:                                        # the uniforms inside the kernel
        kernel, key, args = _counts, (kind, "counts"), (x, base, offs, lmax, from_potential, f64)
    else:                                                # the uniforms from C, the thresholds in the kernel
        kernel, key, args = _thresholds, (kind, "thresholds"), (x, u, lmax, from_potential)
    eager = kernel
    if FUSE and math.prod(shape) >= FUSE_MIN and _fused.get(key, 0) is not None:
        if key not in _fused:
            try:
                _fused[key] = torch.compile(eager, dynamic=True)
            except Exception:                            # no compiler / backend: stay eager from now on
                _fused[key] = None
        kernel = _fused[key] or eager
    try:
        lam, n, top = kernel(*args)
    except Exception:
        if kernel is eager:
            raise
        _fused[key] = None
        lam, n, top = eager(*args)
    if top >= FUSE_K:                                    # the rare counts >= FUSE_K: exact series from there
        if n.dim() == 2:
            _tail(n, lam, base, offs, FUSE_K)
        else:                                            # broadcast shapes of any rank: as 2-d rows
            flat = lambda v: v.expand(shape).reshape(-1, shape[-1])   # noqa: E731
            n2 = n.view(-1, shape[-1])
            _tail(n2, flat(lam), flat(base), flat(offs), FUSE_K)
    return lam, n

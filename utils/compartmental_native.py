"""The compartmental network's C kernels on the CPU, built once per machine with the system's C compiler (`cc -O3
-march=native`) into a cache folder and loaded with ctypes; where no compiler works (or BIODL_COMPILE=0) `library()`
is None and the torch ops compute the same quantities.

* keyed_uniforms: the counter-based uniforms of utils/compartmental_random.py, the same integers, so the same numbers
  (torch's int64 product is not vectorised on AVX2; C compilers build it from 32-bit ones).
* layer_segment: one layer over a segment of Ts steps, every step of an (example, neuron) chain in one pass: the PSP
  as the kernel's band over the projected input U (Eq. 2), the soma C = dec C + k_B (PSP + b) + k_I I0 (Eqs. 5-7, the
  reference's soma_coefficients), the rate lambda = lambda_max sigmoid(C) (Eq. 4) and the Poisson count of the keyed
  uniform by inverse CDF. Its exponentials are a range-reduced polynomial (a few units in the last place, so a count
  can differ from the torch ops' where a uniform falls within that of a threshold: the spikes agree in distribution,
  and a network's spikes still do not depend on its population or batch).
* row_sums: the window sums of a segment's rows, acc += sum_r w_r V_r in row order (as the torch ops add them).
* input_segment: the input layer over a segment: the active inputs' Poisson counts, W S of every row (a block of
  outputs at a time, so that the weights' columns stay in the cache), the input PSP's window mean and the events
  kept as the next segment's history.
Both split their examples between torch's threads (torch.get_num_threads()), with the same numbers for any split.
"""
import ctypes
import functools
import os

import torch

ENABLED = os.environ.get("BIODL_COMPILE", "1") != "0"

_SRC = r"""
#include <stdint.h>
#include <string.h>
static inline uint64_t mix(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}
static inline float unit_f(uint64_t z) { return (float)(int32_t)(z >> 40) * 0x1p-24f; }
static inline double unit_d(uint64_t z) {
    return ((double)(int32_t)(z >> 35) * 16777216.0 + (double)(int32_t)((z >> 11) & 0xFFFFFF)) * 0x1p-53;
}
/* out[r, c] = unit(mix(base[r sr + c sc] + offs[c])), r < R, c < n, sc 0 or 1; float (top 24 bits) or double
   (top 53 bits, as two exact int32 parts) */
void keyed_uniforms(const int64_t* base, int64_t sr, int64_t sc, const int64_t* offs, int64_t R, int64_t n,
                    void* out, int f64) {
    const uint64_t* o = (const uint64_t*)offs;
    for (int64_t r = 0; r < R; r++) {
        const uint64_t* b = (const uint64_t*)(base + r * sr);
        if (f64) {
            double* y = (double*)out + r * n;
            if (sc == 0) { uint64_t b0 = b[0]; for (int64_t c = 0; c < n; c++) y[c] = unit_d(mix(b0 + o[c])); }
            else for (int64_t c = 0; c < n; c++) y[c] = unit_d(mix(b[c] + o[c]));
        } else {
            float* y = (float*)out + r * n;
            if (sc == 0) { uint64_t b0 = b[0]; for (int64_t c = 0; c < n; c++) y[c] = unit_f(mix(b0 + o[c])); }
            else for (int64_t c = 0; c < n; c++) y[c] = unit_f(mix(b[c] + o[c]));
        }
    }
}
/* e^x: x = n ln2 + r, |r| <= ln2 / 2, e^r by its Taylor polynomial (Horner), times 2^n from the exponent bits;
   x clamped to the normal range, NaN stays NaN */
static inline float exp_f(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float t = x * 1.44269504088896341f + 12582912.0f, fn = t - 12582912.0f;
    int32_t ni; memcpy(&ni, &t, 4); ni -= 0x4B400000;
    float r = x - fn * 0.693359375f - fn * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f; p = p * r + 8.3334519073e-3f; p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f; p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = (ni + 127) << 23; float s; memcpy(&s, &bits, 4);
    return p * s;
}
static inline double exp_d(double x) {
    x = x < -708.0 ? -708.0 : (x > 709.0 ? 709.0 : x);
    double t = x * 1.4426950408889634074 + 6755399441055744.0, fn = t - 6755399441055744.0;
    int64_t ni; memcpy(&ni, &t, 8); ni -= 0x4338000000000000LL;
    double r = x - fn * 6.93145751953125e-1 - fn * 1.42860682030941723212e-6;
    double p = 1.0 / 6227020800.0;                                   /* 1/13! */
    static const double inv[13] = {1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0, 1.0 / 362880.0,
                                   1.0 / 40320.0, 1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0,
                                   0.5, 1.0, 1.0};
    for (int k = 0; k < 13; k++) p = p * r + inv[k];
    int64_t bits = (ni + 1023) << 52; double s; memcpy(&s, &bits, 8);
    return p * s;
}
#define LAYER_SEGMENT(NAME, T, EXP, UNIT)                                                                        \
void NAME(int64_t P, int64_t Ts, int64_t B, int64_t n, int64_t mem, int64_t b0, int64_t b1,                      \
          const T* U, const T* kap, const T* bias, const T* kB, const T* dec, const T* drive_I, T* C, T* Cseg,    \
          const T* lmax, const int64_t* base, const int64_t* offs, T* spk, int64_t spk_p, int64_t spk_r0,         \
          T* lam, int64_t lam_p, int64_t lam_r0, T* work) {                                                      \
    int64_t rows = mem + Ts;                                                                                     \
    T* acc = work; T* rate = work + n; T* e0 = work + 2 * n; T* u = work + 3 * n;                                 \
    for (int64_t p = 0; p < P; p++) for (int64_t b = b0; b < b1; b++) {                                           \
        T* c = C + (p * B + b) * n;                                                                               \
        const T* kp = kap + p * mem; const T* bp = bias + p * n;                                                 \
        const T* dI = drive_I ? drive_I + (p * B + b) * n : 0;                                                   \
        T g = kB[p], d = dec ? dec[p] : (T)0, lm = lmax[p];                                                      \
        for (int64_t t = 0; t < Ts; t++) {                                                                       \
            const T* u0 = U + ((p * rows + mem + t) * B + b) * n;                                                \
            for (int64_t j = 0; j < n; j++) acc[j] = u0[j] * kp[0];                                              \
            for (int64_t k = 1; k < mem; k++) {                                                                  \
                const T* uk = U + ((p * rows + mem + t - k) * B + b) * n; T kk = kp[k];                         \
                for (int64_t j = 0; j < n; j++) acc[j] += uk[j] * kk;                                            \
            }                                                                                                    \
            T* cs = Cseg + ((p * Ts + t) * B + b) * n;                                                           \
            for (int64_t j = 0; j < n; j++) {                                                                    \
                T v = (acc[j] + bp[j]) * g;                                                                      \
                if (dI) v += dI[j];                                                                              \
                if (dec) v += c[j] * d;                                                                          \
                c[j] = v; cs[j] = v;                                                                             \
            }                                                                                                    \
            if (!spk && !lam) continue;                                                                          \
            for (int64_t j = 0; j < n; j++) rate[j] = lm / ((T)1 + EXP(-c[j]));                                  \
            if (lam) memcpy(lam + p * lam_p + ((lam_r0 + t) * B + b) * n, rate, n * sizeof(T));                  \
            if (!spk) continue;                                                                                  \
            const uint64_t k0 = (uint64_t)base[(p * Ts + t) * B + b]; const uint64_t* o = (const uint64_t*)offs; \
            for (int64_t j = 0; j < n; j++) { e0[j] = EXP(-rate[j]); u[j] = UNIT(mix(k0 + o[j])); }              \
            T* s = spk + p * spk_p + ((spk_r0 + t) * B + b) * n;                                                 \
            int any = 0;                         /* N >= k iff u > F(k - 1; lambda): the first 4 branch-free */  \
            for (int64_t j = 0; j < n; j++) {                                                                    \
                T l = rate[j], uu = u[j], term = e0[j], cdf = term, cnt = (T)(uu > cdf);                         \
                term = term * l; cdf = cdf + term; cnt += (T)(uu > cdf);                                         \
                term = term * l * (T)0.5; cdf = cdf + term; cnt += (T)(uu > cdf);                                \
                term = term * l * (T)(1.0 / 3.0); cdf = cdf + term; cnt += (T)(uu > cdf);                        \
                s[j] = cnt; any |= cnt == (T)4;                                                                  \
            }                                                                                                    \
            if (any) for (int64_t j = 0; j < n; j++) if (s[j] == (T)4) {     /* the rare rest: term by term */  \
                T term = e0[j], cdf = term, l = rate[j];                                                         \
                int k = 0;                                                                                       \
                while (u[j] > cdf && k < 1000) { k++; term = term * l / (T)k; cdf = cdf + term; }                \
                s[j] = (T)k;                                                                                     \
            }                                                                                                    \
        }                                                                                                        \
    }                                                                                                            \
}
LAYER_SEGMENT(layer_segment_f, float, exp_f, unit_f)
LAYER_SEGMENT(layer_segment_d, double, exp_d, unit_d)
/* The input layer over a segment: U (P, mem + Ts, B, n1) = W S of every row, from the history events (rows
   [0, mem)) and the Poisson counts of the active inputs (CSR per example p B + b: pix, their rates lam, e^-lam
   e0 and counters off) drawn from the keys base (P, Ts, B); in_mean[ex n0 + i] += count w_in[p, row] (w_in may
   be 0); the events of the rows >= keep_from kept (row - shift) into k_*, at most cap. Returns the kept count,
   or -1 past cap. Example after example, so that its active inputs' weight rows stay in the cache. */
#define INPUT_SEGMENT(NAME, T, UNIT)                                                                             \
int64_t NAME(int64_t P, int64_t B, int64_t n0, int64_t n1, int64_t Ts, int64_t mem, int64_t b0, int64_t b1,     \
             const int64_t* act_ptr,                                                                             \
             const int64_t* pix, const T* lam, const T* e0, const int64_t* off, const int64_t* base,             \
             const T* W0t, int64_t nh, const int64_t* h_t, const int64_t* h_x, const int64_t* h_i, const T* h_v, \
             T* U, const T* w_in, T* in_mean, int64_t keep_from, int64_t shift, int64_t cap, int64_t* k_t,        \
             int64_t* k_x, int64_t* k_i, T* k_v, int64_t* row_ptr, int32_t* ev_i, T* ev_v) {                     \
    int64_t rows = mem + Ts, kept = 0;                                                                           \
    for (int64_t p = 0; p < P; p++) for (int64_t r = 0; r < mem; r++)   /* the history rows of examples b0..b1 */ \
        memset(U + ((p * rows + r) * B + b0) * n1, 0, (size_t)((b1 - b0) * n1) * sizeof(T));                     \
    for (int64_t e = 0; e < nh; e++) {                                                                           \
        int64_t p = h_x[e] / B, b = h_x[e] % B, r = h_t[e];                                                      \
        if (b < b0 || b >= b1) continue;                                                                         \
        T v = h_v[e];                                                                                            \
        T* u = U + ((p * rows + r) * B + b) * n1; const T* w = W0t + (p * n0 + h_i[e]) * n1;                     \
        for (int64_t j = 0; j < n1; j++) u[j] += v * w[j];                                                       \
        if (in_mean) in_mean[h_x[e] * n0 + h_i[e]] += v * w_in[p * rows + r];                                    \
        if (r >= keep_from) {                                                                                    \
            if (kept >= cap) return -1;                                                                          \
            k_t[kept] = r - shift; k_x[kept] = h_x[e]; k_i[kept] = h_i[e]; k_v[kept] = v; kept++;                 \
        }                                                                                                        \
    }                                                                                                            \
    int64_t nev = 0;                                      /* the new rows' events: (input, count), by row */   \
    for (int64_t p = 0; p < P; p++) for (int64_t b = b0; b < b1; b++) for (int64_t t = 0; t < Ts; t++) {          \
        int64_t ex = p * B + b, r = mem + t;                                                                     \
        const uint64_t key = (uint64_t)base[(p * Ts + t) * B + b];                                               \
        row_ptr[2 * ((p * B + b) * Ts + t)] = nev;                                                               \
        for (int64_t a = act_ptr[ex]; a < act_ptr[ex + 1]; a++) {                                                \
            T uu = UNIT(mix(key + (uint64_t)off[a])), term = e0[a], cdf = term, l = lam[a];                      \
            if (!(uu > cdf)) continue;                   /* N >= k iff u > F(k - 1; lambda) */                   \
            int k = 0;                                                                                           \
            while (uu > cdf && k < 1000) { k++; term = term * l / (T)k; cdf = cdf + term; }                      \
            T v = (T)k;                                                                                          \
            ev_i[nev] = pix[a]; ev_v[nev] = v; nev++;                                                            \
            if (in_mean) in_mean[ex * n0 + pix[a]] += v * w_in[p * rows + r];                                     \
            if (r >= keep_from) {                                                                                \
                if (kept >= cap) return -1;                                                                      \
                k_t[kept] = r - shift; k_x[kept] = ex; k_i[kept] = pix[a]; k_v[kept] = v; kept++;                \
            }                                                                                                    \
        }                                                                                                        \
        row_ptr[2 * ((p * B + b) * Ts + t) + 1] = nev;                                                           \
    }                                                                                                            \
    typedef T V __attribute__((vector_size(64)));                                                               \
    enum { L = 64 / sizeof(T) };                          /* W S of each new row, 4 L outputs at a time: the   */ \
    int64_t j0 = 0;                                       /* weights' column block stays in the cache          */ \
    for (; j0 + 4 * L <= n1; j0 += 4 * L)                                                                        \
        for (int64_t p = 0; p < P; p++) for (int64_t b = b0; b < b1; b++) for (int64_t t = 0; t < Ts; t++) {      \
            int64_t q = (p * B + b) * Ts + t;                                                                    \
            V a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, w0, w1, w2, w3;                                            \
            for (int64_t e = row_ptr[2 * q]; e < row_ptr[2 * q + 1]; e++) {                                      \
                const T* w = W0t + (p * n0 + ev_i[e]) * n1 + j0; T v = ev_v[e];                                  \
                memcpy(&w0, w, 64); memcpy(&w1, w + L, 64); memcpy(&w2, w + 2 * L, 64); memcpy(&w3, w + 3 * L, 64); \
                a0 += v * w0; a1 += v * w1; a2 += v * w2; a3 += v * w3;                                          \
            }                                                                                                    \
            T* u = U + ((p * rows + mem + t) * B + b) * n1 + j0;                                                 \
            memcpy(u, &a0, 64); memcpy(u + L, &a1, 64); memcpy(u + 2 * L, &a2, 64); memcpy(u + 3 * L, &a3, 64);  \
        }                                                                                                        \
    for (int64_t p = 0; p < P; p++) for (int64_t b = b0; b < b1; b++) for (int64_t t = 0; t < Ts; t++) {          \
        int64_t q = (p * B + b) * Ts + t;                                                                        \
        T* u = U + ((p * rows + mem + t) * B + b) * n1;                                                          \
        for (int64_t j = j0; j < n1; j++) u[j] = 0;                                                              \
        for (int64_t e = row_ptr[2 * q]; e < row_ptr[2 * q + 1]; e++) {                                          \
            const T* w = W0t + (p * n0 + ev_i[e]) * n1; T v = ev_v[e];                                           \
            for (int64_t j = j0; j < n1; j++) u[j] += v * w[j];                                                  \
        }                                                                                                        \
    }                                                                                                            \
    return kept;                                                                                                 \
}
INPUT_SEGMENT(input_segment_f, float, unit_f)
INPUT_SEGMENT(input_segment_d, double, unit_d)
/* acc[p, x] += w[p, r] src[p, r, x] for the rows r of nonzero weight, in row order, x in [x0, x1): the window
   sums of a segment's signals (PSPs, C, lambda) */
#define ROW_SUMS(NAME, T)                                                                                        \
void NAME(int64_t P, int64_t R, int64_t X, int64_t x0, int64_t x1, const T* src, int64_t sp, int64_t sr,        \
          const T* w, T* acc) {                                                                                  \
    for (int64_t p = 0; p < P; p++) {                                                                            \
        T* a = acc + p * X;                                                                                      \
        for (int64_t r = 0; r < R; r++) {                                                                        \
            T c = w[p * R + r];                                                                                  \
            if (c == (T)0) continue;                                                                             \
            const T* v = src + p * sp + r * sr;                                                                  \
            for (int64_t x = x0; x < x1; x++) a[x] += v[x] * c;                                                  \
        }                                                                                                        \
    }                                                                                                            \
}
ROW_SUMS(row_sums_f, float)
ROW_SUMS(row_sums_d, double)
double exp_of_d(double x) { return exp_d(x); }
float exp_of_f(float x) { return exp_f(x); }
"""
_lib = {}   # "lib" -> the loaded library, or None where building or loading failed


def library():
    """The C library (built on first use), or None: no compiler, no write access, or disabled."""
    if "lib" in _lib:
        return _lib["lib"]
    lib = None
    try:
        lib = _build() if ENABLED else None
    except Exception:                                    # no compiler, no write access, no ctypes: the torch ops
        lib = None
    _lib["lib"] = lib
    return lib


def _build():
    import hashlib
    import platform
    import shutil
    import subprocess
    import tempfile
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if not cc:
        return None
    flags = ["-O3", "-march=native", "-fPIC", "-shared"]
    tag = hashlib.sha256("\0".join([_SRC, cc, *flags, platform.node(), platform.machine()]).encode()).hexdigest()[:16]
    folder = os.path.join(tempfile.gettempdir(), f"biodl-native-{os.getuid()}")
    os.makedirs(folder, exist_ok=True)
    so = os.path.join(folder, f"compartmental-{tag}.so")
    if not os.path.exists(so):
        src = os.path.join(folder, f"compartmental-{tag}-{os.getpid()}.c")
        with open(src, "w") as f:
            f.write(_SRC)
        subprocess.run([cc, *flags, src, "-o", so + f".{os.getpid()}"], check=True, capture_output=True, timeout=60)
        os.replace(so + f".{os.getpid()}", so)
        os.remove(src)
    lib = ctypes.CDLL(so)
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.keyed_uniforms.argtypes = [ptr, i64, i64, ptr, i64, i64, ptr, ctypes.c_int]
    lib.keyed_uniforms.restype = None
    for name in ("layer_segment_f", "layer_segment_d"):
        fn = getattr(lib, name)
        fn.argtypes = [i64] * 7 + [ptr] * 12 + [i64, i64, ptr, i64, i64, ptr]
        fn.restype = None
    for name in ("input_segment_f", "input_segment_d"):
        fn = getattr(lib, name)
        fn.argtypes = [i64] * 8 + [ptr] * 7 + [i64] + [ptr] * 7 + [i64] * 3 + [ptr] * 7
        fn.restype = i64
    for name in ("row_sums_f", "row_sums_d"):
        fn = getattr(lib, name)
        fn.argtypes = [i64] * 5 + [ptr, i64, i64, ptr, ptr]
        fn.restype = None
    lib.exp_of_d.argtypes, lib.exp_of_d.restype = [ctypes.c_double], ctypes.c_double
    lib.exp_of_f.argtypes, lib.exp_of_f.restype = [ctypes.c_float], ctypes.c_float
    return lib


def _ptr(t):
    return None if t is None else t.data_ptr()


_pool = {}   # (process, threads) -> a ThreadPoolExecutor (ctypes releases the GIL: the calls run side by side)
SPLIT_MIN = 200_000   # neuron-steps per thread at least, else one call


def _chunks(B, work):
    """The example ranges [b0, b1) the kernel's calls take: one per torch thread (torch.get_num_threads()) when
    there are `work` neuron-steps enough to pay for it (else one). Each range writes its own examples' rows
    only, so the numbers do not depend on the split."""
    k = max(1, min(torch.get_num_threads(), B, work // SPLIT_MIN))
    return [(B * i // k, B * (i + 1) // k) for i in range(k)]


def _run(calls):
    """Run the zero-argument callables (one per range) side by side; their results in order."""
    if len(calls) == 1:
        return [calls[0]()]
    key = (os.getpid(), len(calls))                      # (a forked child starts its own threads)
    if key not in _pool:
        from concurrent.futures import ThreadPoolExecutor
        _pool[key] = ThreadPoolExecutor(len(calls))
    return list(_pool[key].map(lambda f: f(), calls))


def scratch(store, name, shape, dtype):
    """A tensor of `shape` reused from store[name] (a dict the caller keeps) when large enough: fresh large
    tensors are fresh pages from the system, and faulting them in cost as much as the kernels' work."""
    n = 1
    for d in shape:
        n *= int(d)
    buf = store.get(name)
    if buf is None or buf.numel() < n or buf.dtype != dtype:
        buf = store[name] = torch.empty(max(n, 1), dtype=dtype)
    return buf[:n].view(*shape)


def layer_segment(U, soma, C, draws, spikes, lam, drive_I=None, out=None):
    """One layer over a segment in C (see the module docstring), or None where it does not apply (no library, not
    on the CPU, not float32 / float64). U (P, mem + Ts, B, n) the projected input (rows [0, mem): history); soma
    (kap (P, mem), bias (P, n), kB, dec, lmax (P,) each; dec None: no conductances, C = the drive); C (P, B, n) the
    soma before, updated to after the last step; draws (base (P, Ts, B), offs (n,)) int64 keys and counters, or
    None (no spikes); spikes, lam: (buffer (P, rows, B, n), its first row) to write the counts and rates into, or
    None; drive_I (P, B, n) the teaching drive or None; out: (P, Ts, B, n) to write C into (default: a new tensor).
    Returns C of every step, (P, Ts, B, n)."""
    lib = library()
    if lib is None or U.device.type != "cpu" or U.dtype not in (torch.float32, torch.float64):
        return None
    kap, bias, kB, dec, lmax = soma
    base, offs = draws if draws is not None else (None, None)
    P, rows, B, n = U.shape
    mem = kap.shape[1]
    Ts = rows - mem
    dt = U.dtype
    cont = lambda t: None if t is None else t.to(dt).contiguous()   # noqa: E731
    U, kap, bias, kB, dec, drive_I, lmax = (cont(t) for t in (U, kap, bias, kB, dec, drive_I, lmax))
    if base is not None:
        base, offs = base.contiguous(), offs.contiguous()
    for buf in (spikes, lam):
        if buf is not None and (not buf[0].is_contiguous() or buf[0].dtype != dt or buf[0].shape[2:] != (B, n)):
            return None
    if not C.is_contiguous():
        return None
    Cseg = torch.empty(P, Ts, B, n, dtype=dt) if out is None else out
    spk, spk_r0 = spikes if spikes is not None else (None, 0)
    lm, lam_r0 = lam if lam is not None else (None, 0)
    fn = lib.layer_segment_d if dt == torch.float64 else lib.layer_segment_f

    def call(b0, b1):                                    # examples b0 .. b1 - 1: their own rows, their own work
        work = torch.empty(4 * n, dtype=dt)
        fn(P, Ts, B, n, mem, b0, b1, _ptr(U), _ptr(kap), _ptr(bias), _ptr(kB), _ptr(dec), _ptr(drive_I), _ptr(C),
           _ptr(Cseg), _ptr(lmax), _ptr(base), _ptr(offs) if base is not None else None, _ptr(spk),
           0 if spk is None else spk.stride(0), spk_r0, _ptr(lm), 0 if lm is None else lm.stride(0), lam_r0,
           _ptr(work))
    _run([functools.partial(call, b0, b1) for b0, b1 in _chunks(B, P * Ts * B * n)])
    return Cseg


def input_events(x, lmax):
    """The active inputs of x (P, B, n0) for input_segment: (CSR offsets per example (P B + 1), their input
    indices, rates lambda = lmax x, e^-lambda, counters), member-major; None where the kernel does not apply."""
    if library() is None or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return None
    from utils.compartmental_random import neuron_offsets
    P, B, n0 = x.shape
    p, b, i = x.nonzero(as_tuple=True)
    lam = (x[p, b, i] * lmax.view(-1)[p]).contiguous()
    ptr = torch.zeros(P * B + 1, dtype=torch.int64)
    ptr[1:] = torch.bincount(p * B + b, minlength=P * B).cumsum(0)
    return ptr, i.contiguous(), lam, torch.exp(-lam), neuron_offsets(0, i).view(-1).contiguous()


def input_segment(events, base, W0t, hist, shape, mean, keep, store=None):
    """The input layer over a segment in C (see the kernel's comment): events from input_events, base (P, Ts, B)
    keys, W0t (P n0, n1), hist the history events (row, example, input, value), shape (P, mem, Ts, B, n0, n1),
    mean (w_in (P, mem + Ts), in_mean (P B n0) added into) or None, keep (keep_from, shift); store: a dict whose
    tensors are reused from call to call (scratch). Returns (U (P, mem + Ts, B, n1), the kept events)."""
    P, mem, Ts, B, n0, n1 = shape
    (w_in, in_mean), (keep_from, shift) = mean or (None, None), keep
    ptr, pix, lam, e0, off = events
    dt = lam.dtype
    ht, hx, hi, hv = (h.contiguous() for h in hist)
    hv = hv.to(dt)
    cap = len(ht) + len(pix) * max(0, mem + Ts - keep_from)
    store = {} if store is None else store
    U = scratch(store, "U0", (P, mem + Ts, B, n1), dt)
    w = None if w_in is None else w_in.to(dt).contiguous()
    most = P * B * Ts * (int((ptr[1:] - ptr[:-1]).max()) if len(pix) else 0)   # events at most (pages: as used)
    row_ptr = scratch(store, "row_ptr", (2 * P * B * Ts,), torch.int64)
    base = base.contiguous()
    fn = library().input_segment_d if dt == torch.float64 else library().input_segment_f

    def call(c, b0, b1):                                 # examples b0 .. b1 of every member: their own rows, events
        kept = [scratch(store, ("kept", c, k), (cap,), torch.int64) for k in range(3)] + \
            [scratch(store, ("kept_v", c), (cap,), dt)]
        ev_i, ev_v = scratch(store, ("ev_i", c), (most,), torch.int32), scratch(store, ("ev_v", c), (most,), dt)
        k = fn(P, B, n0, n1, Ts, mem, b0, b1, _ptr(ptr), _ptr(pix), _ptr(lam), _ptr(e0), _ptr(off), _ptr(base),
               _ptr(W0t), len(ht), _ptr(ht), _ptr(hx), _ptr(hi), _ptr(hv), _ptr(U), _ptr(w),
               None if w is None else _ptr(in_mean), keep_from, shift, cap, *(_ptr(t) for t in kept),
               _ptr(row_ptr), _ptr(ev_i), _ptr(ev_v))
        if k < 0:
            raise RuntimeError("input_segment: more kept events than its bound (a bug)")
        return [t[:k] for t in kept]
    parts = _run([functools.partial(call, c, b0, b1) for c, (b0, b1) in enumerate(_chunks(B, P * Ts * B * n1))])
    return U, tuple(torch.cat([part[k] for part in parts]) for k in range(4))


def row_sums(acc, src, w):
    """acc (P, ...) += sum_r w[:, r] src[:, r] over the rows r < w.shape[1] of nonzero weight, in row order, in C;
    False (nothing done) where the kernel does not apply: no library, not the CPU, other dtypes, or a row of src
    (src[p, r]) that is not one contiguous block of acc[p]'s shape."""
    lib = library()
    if lib is None or acc.device.type != "cpu" or acc.dtype not in (torch.float32, torch.float64) or \
            src.dtype != acc.dtype or not acc.is_contiguous():
        return False
    P, R = w.shape
    if src.shape[0] != P or src.shape[1] < R or src.shape[2:] != acc.shape[1:] or not src[0, 0].is_contiguous():
        return False
    X = acc[0].numel()
    w = w.to(acc.dtype).contiguous()
    fn = lib.row_sums_d if acc.dtype == torch.float64 else lib.row_sums_f
    sp, sr = src.stride(0), src.stride(1)
    _run([functools.partial(fn, P, R, X, x0, x1, _ptr(src), sp, sr, _ptr(w), _ptr(acc))
          for x0, x1 in _chunks(X, P * R * X)])
    return True

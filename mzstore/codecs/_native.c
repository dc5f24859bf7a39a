/*
 * mzstore's native codec core: the hot loops of the lossless and quantized
 * codecs, one pass each over cache-sized data, with the GIL released.
 *
 * The numpy code in lossless.py, quant.py and floats.py is the reference:
 * every function here gives the same bytes (tests/test_native.py checks it
 * on random shapes and payloads). Entry points take and write buffers
 * (the buffer protocol): no numpy C API, no torch, only Python.h.
 *
 * zstd stays in python-zstandard (which releases the GIL too); this file
 * does what numpy did around it: plane split and merge with the one-bit
 * rotation, the exponent-pair coder, the nibble split of int8 codes, and
 * int8/int4/fp8 expansion to f32/bf16 (f16 targets keep numpy's cast, which
 * may use the CPU's F16C).
 *
 * Build flags (setup.py): -O3 -ffp-contract=off, so x*s and (x-z)*s round
 * exactly as numpy's two f32 operations do (no fused multiply-add).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <math.h>
#include <string.h>

/* ---- buffers ---------------------------------------------------------- */

typedef struct {
    Py_buffer view;
    int held;
} Buf;

static int get_buf(PyObject *obj, Buf *b, int writable, const char *what) {
    b->held = 0;
    if (PyObject_GetBuffer(obj, &b->view, (writable ? PyBUF_WRITABLE : 0) | PyBUF_C_CONTIGUOUS) < 0) {
        PyErr_Format(PyExc_TypeError, "%s: a contiguous%s buffer is needed", what, writable ? " writable" : "");
        return -1;
    }
    b->held = 1;
    return 0;
}

static void rel(Buf *b) {
    if (b->held) {
        PyBuffer_Release(&b->view);
        b->held = 0;
    }
}

/* The buffers of objs[0..n), n = strlen(modes): modes[i] is 'r' (read) or 'w' (writable). On failure
 * the ones already taken are released and -1 returned with the exception set. */
static int get_bufs(PyObject *const *objs, Buf *bufs, const char *modes, const char *what) {
    int n = (int)strlen(modes);
    for (int i = 0; i < n; i++) bufs[i].held = 0;
    for (int i = 0; i < n; i++) {
        if (get_buf(objs[i], &bufs[i], modes[i] == 'w', what) < 0) {
            for (int j = 0; j < i; j++) rel(&bufs[j]);
            return -1;
        }
    }
    return 0;
}

static void rel_all(Buf *bufs, int n) {
    for (int i = 0; i < n; i++) rel(&bufs[i]);
}

#define LEN(b) ((b).view.len)
#define PTR(b) ((b).view.buf)

/* Unaligned little-endian loads and stores (x86-64 and arm64 are little-endian; memcpy compiles to one move). */
static inline uint16_t ld16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t ld32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline void st16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }
static inline void st32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static inline float ldf(const uint8_t *p) { float v; memcpy(&v, p, 4); return v; }

#if PY_BIG_ENDIAN
#error "mzstore's native core assumes a little-endian machine"
#endif

/* The loops below are compiled three times on x86-64 (x86-64-v4 with AVX-512, AVX2, and baseline SSE2)
 * and the loader picks the one the CPU runs (GCC/clang function multiversioning). No FMA in any:
 * results stay bit-exact (tests/test_native.py builds the AVX2 and baseline variants alone and checks
 * them against numpy too). The AVX-512 variant (GCC 11 and later) expands int8 to bf16 in 1.4 ms per
 * 16 MiB chunk, 2.0 with AVX2. */
#if defined(__x86_64__) && defined(__has_attribute)
#if __has_attribute(target_clones) && !defined(MZSTORE_NO_CLONES)
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 /* GCC 11 named the x86-64-v4 level */
#define HOT __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define HOT __attribute__((target_clones("avx2", "default")))
#endif
#endif
#endif
#ifndef HOT
#define HOT
#endif

/* ---- byte planes ------------------------------------------------------ */

HOT static void k_split(const uint8_t *restrict src, Py_ssize_t n, int k, int rotate, uint8_t *restrict dst) {
    if (k == 2) {
        uint8_t *p0 = dst, *p1 = dst + n;
        for (Py_ssize_t j = 0; j < n; j++) {
            uint16_t w = ld16(src + 2 * j);
            if (rotate) w = (uint16_t)((w << 1) | (w >> 15));
            p0[j] = (uint8_t)w;
            p1[j] = (uint8_t)(w >> 8);
        }
    } else if (k == 4) {
        uint8_t *p0 = dst, *p1 = dst + n, *p2 = dst + 2 * n, *p3 = dst + 3 * n;
        for (Py_ssize_t j = 0; j < n; j++) {
            uint32_t w = ld32(src + 4 * j);
            if (rotate) w = (w << 1) | (w >> 31);
            p0[j] = (uint8_t)w;
            p1[j] = (uint8_t)(w >> 8);
            p2[j] = (uint8_t)(w >> 16);
            p3[j] = (uint8_t)(w >> 24);
        }
    } else {
        for (Py_ssize_t j = 0; j < n; j++) {
            uint64_t w;
            memcpy(&w, src + 8 * j, 8);
            if (rotate) w = (w << 1) | (w >> 63);
            for (int i = 0; i < 8; i++) dst[i * n + j] = (uint8_t)(w >> (8 * i));
        }
    }
}

HOT static void k_merge(const uint8_t *const *q, Py_ssize_t n, int k, int rotate, uint8_t *restrict out) {
    if (k == 2) {
        const uint8_t *restrict q0 = q[0], *restrict q1 = q[1];
        for (Py_ssize_t j = 0; j < n; j++) {
            uint16_t w = (uint16_t)(q0[j] | (q1[j] << 8));
            if (rotate) w = (uint16_t)((w >> 1) | (w << 15));
            st16(out + 2 * j, w);
        }
    } else if (k == 4) {
        const uint8_t *restrict q0 = q[0], *restrict q1 = q[1], *restrict q2 = q[2], *restrict q3 = q[3];
        for (Py_ssize_t j = 0; j < n; j++) {
            uint32_t w = (uint32_t)q0[j] | ((uint32_t)q1[j] << 8) | ((uint32_t)q2[j] << 16) | ((uint32_t)q3[j] << 24);
            if (rotate) w = (w >> 1) | (w << 31);
            st32(out + 4 * j, w);
        }
    } else {
        for (Py_ssize_t j = 0; j < n; j++) {
            uint64_t w = 0;
            for (int i = 0; i < 8; i++) w |= (uint64_t)q[i][j] << (8 * i);
            if (rotate) w = (w >> 1) | (w << 63);
            memcpy(out + 8 * j, &w, 8);
        }
    }
}

/* split_planes(src, k, rotate, dst): dst[i*n + j] = byte i of word j (rotated left by one bit if rotate). */
static PyObject *split_planes(PyObject *self, PyObject *args) {
    PyObject *so, *dobj;
    int k, rotate;
    if (!PyArg_ParseTuple(args, "OipO", &so, &k, &rotate, &dobj)) return NULL;
    if (k != 2 && k != 4 && k != 8) return PyErr_Format(PyExc_ValueError, "word size %d", k);
    Buf s, d;
    if (get_buf(so, &s, 0, "split_planes source") < 0) return NULL;
    if (get_buf(dobj, &d, 1, "split_planes destination") < 0) { rel(&s); return NULL; }
    if (LEN(s) % k || LEN(d) != LEN(s)) {
        rel(&s); rel(&d);
        return PyErr_Format(PyExc_ValueError, "split_planes: %zd bytes into %zd, word %d", LEN(s), LEN(d), k);
    }
    Py_ssize_t n = LEN(s) / k;
    Py_BEGIN_ALLOW_THREADS
    k_split(PTR(s), n, k, rotate, PTR(d));
    Py_END_ALLOW_THREADS
    rel(&s); rel(&d);
    Py_RETURN_NONE;
}

/* merge_planes(planes, rotate, out): the inverse; planes is a sequence of k buffers of n bytes, out n*k bytes. */
static PyObject *merge_planes(PyObject *self, PyObject *args) {
    PyObject *seq, *oo;
    int rotate;
    if (!PyArg_ParseTuple(args, "OpO", &seq, &rotate, &oo)) return NULL;
    PyObject *fast = PySequence_Fast(seq, "merge_planes: planes must be a sequence");
    if (!fast) return NULL;
    Py_ssize_t k = PySequence_Fast_GET_SIZE(fast);
    if (k != 2 && k != 4 && k != 8) { Py_DECREF(fast); return PyErr_Format(PyExc_ValueError, "%zd planes", k); }
    Buf p[8], o;
    Py_ssize_t got = 0;
    PyObject *ret = NULL;
    o.held = 0;
    for (; got < k; got++)
        if (get_buf(PySequence_Fast_GET_ITEM(fast, got), &p[got], 0, "merge_planes plane") < 0) goto done;
    if (get_buf(oo, &o, 1, "merge_planes destination") < 0) goto done;
    Py_ssize_t n = LEN(p[0]);
    for (Py_ssize_t i = 1; i < k; i++)
        if (LEN(p[i]) != n) { PyErr_SetString(PyExc_ValueError, "merge_planes: planes differ in length"); goto done; }
    if (LEN(o) != n * k) { PyErr_SetString(PyExc_ValueError, "merge_planes: destination has the wrong length"); goto done; }
    {
        uint8_t *out = PTR(o);
        const uint8_t *q[8];
        for (Py_ssize_t i = 0; i < k; i++) q[i] = PTR(p[i]);
        Py_BEGIN_ALLOW_THREADS
        k_merge(q, n, (int)k, rotate, out);
        Py_END_ALLOW_THREADS
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    for (Py_ssize_t i = 0; i < got; i++) rel(&p[i]);
    rel(&o);
    Py_DECREF(fast);
    return ret;
}

/* ---- nibble-split codes ----------------------------------------------- */

/* int8 codes of Gaussian-like weights: the low nibble is close to uniform, all the entropy is in the high
 * one. quant.py stores such codes as two half-length planes: high = the high nibbles of codes 2j and 2j+1
 * in one byte (zstd-coded: half as many Huffman symbols), low = their low nibbles packed alike (raw).
 * An odd count pads the last byte's second nibble with 0 (the decoder ignores it). */
HOT static void k_split_nibbles(const uint8_t *restrict c, Py_ssize_t n, uint8_t *restrict hi, uint8_t *restrict lo) {
    Py_ssize_t j = 0;
    for (; 2 * j + 1 < n; j++) {
        uint8_t a = c[2 * j], b = c[2 * j + 1];
        hi[j] = (uint8_t)((a & 0xF0) | (b >> 4));
        lo[j] = (uint8_t)((a << 4) | (b & 0x0F));
    }
    if (n % 2) {
        hi[j] = (uint8_t)(c[n - 1] & 0xF0);
        lo[j] = (uint8_t)(c[n - 1] << 4);
    }
}

HOT static void k_merge_nibbles(const uint8_t *restrict hi, const uint8_t *restrict lo, Py_ssize_t n,
                                uint8_t *restrict out) {
    Py_ssize_t j = 0;
    for (; 2 * j + 1 < n; j++) {
        uint16_t w = (uint16_t)((hi[j] & 0xF0) | (lo[j] >> 4)) | (uint16_t)(((hi[j] << 4) | (lo[j] & 0x0F)) << 8);
        st16(out + 2 * j, w);
    }
    if (n % 2) out[n - 1] = (uint8_t)((hi[j] & 0xF0) | (lo[j] >> 4));
}

/* split_nibbles(codes, high, low) and merge_nibbles(high, low, codes): high and low hold (n + 1) / 2 bytes. */
static PyObject *nibbles(PyObject *args, int merge) {
    PyObject *co, *ho, *lo;
    if (merge ? !PyArg_ParseTuple(args, "OOO", &ho, &lo, &co) : !PyArg_ParseTuple(args, "OOO", &co, &ho, &lo))
        return NULL;
    PyObject *objs[] = {co, ho, lo};
    Buf b[3];
    if (get_bufs(objs, b, merge ? "wrr" : "rww", merge ? "merge_nibbles" : "split_nibbles") < 0) return NULL;
    Py_ssize_t n = LEN(b[0]), half = (n + 1) / 2;
    if (LEN(b[1]) != half || LEN(b[2]) != half) {
        rel_all(b, 3);
        return PyErr_Format(PyExc_ValueError, "nibbles: %zd codes need halves of %zd bytes", n, half);
    }
    Py_BEGIN_ALLOW_THREADS
    if (merge) k_merge_nibbles(PTR(b[1]), PTR(b[2]), n, PTR(b[0]));
    else k_split_nibbles(PTR(b[0]), n, PTR(b[1]), PTR(b[2]));
    Py_END_ALLOW_THREADS
    rel_all(b, 3);
    Py_RETURN_NONE;
}

static PyObject *split_nibbles(PyObject *self, PyObject *args) { return nibbles(args, 0); }
static PyObject *merge_nibbles(PyObject *self, PyObject *args) { return nibbles(args, 1); }

/* ---- ECSQ codes --------------------------------------------------------- */

/* numpy's ECSQ quantizer over normalized values x: q = clip(rint(x * inv), -limit, limit),
 * z = zigzag(q) (0, -1, 1, -2 ... -> 0, 1, 2, 3 ...), codes[i] = z & 255, high[i] = z >> 8, and the
 * histogram numpy's two bincounts give: count[z] += 1 and total[z] += (double)x[i], in the order of i
 * (so the sums are numpy's, bit for bit). Returns the largest z. */
HOT static int32_t k_ecsq(const float *restrict x, Py_ssize_t n, float inv, float limit, uint8_t *restrict codes,
                          uint8_t *restrict high, int64_t *restrict count, double *restrict total) {
    int32_t zmax = 0;
    /* The codes first, then the histogram from them: in one loop, the scattered read-modify-writes of
     * the histogram next to the stores of the codes kept it at 8 ns a value; in two, 1 ns. */
    for (Py_ssize_t i = 0; i < n; i++) {
        float v = rintf(x[i] * inv);
        v = v >= -limit ? v : -limit; /* NaN too: the caller refuses NaN, and no index may leave the bins */
        v = v > limit ? limit : v;
        int32_t q = (int32_t)v;
        int32_t z = q >= 0 ? 2 * q : -2 * q - 1;
        codes[i] = (uint8_t)z;
        high[i] = (uint8_t)(z >> 8);
        zmax = z > zmax ? z : zmax;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        int32_t z = codes[i] | high[i] << 8;
        count[z] += 1;
        total[z] += (double)x[i];
    }
    return zmax;
}

/* ecsq_codes(x, inv, limit, codes, high, count, total) -> the largest code. x: f32 values; count (int64)
 * and total (f64) hold at least 2 * limit + 1 bins, zeroed by the caller. */
static PyObject *ecsq_codes(PyObject *self, PyObject *args) {
    PyObject *xo, *co, *ho, *no, *to;
    float inv, limit;
    if (!PyArg_ParseTuple(args, "OffOOOO", &xo, &inv, &limit, &co, &ho, &no, &to)) return NULL;
    PyObject *objs[] = {xo, co, ho, no, to}, *ret = NULL;
    Buf b[5];
    if (get_bufs(objs, b, "rwwww", "ecsq_codes (x, codes, high, count, total)") < 0) return NULL;
    Py_ssize_t n = LEN(b[0]) / 4;
    if (!(limit >= 0 && limit <= 32767 && limit == floorf(limit)) || !isfinite(inv)) {
        PyErr_SetString(PyExc_ValueError, "ecsq_codes: bad step or limit");
        goto done;
    }
    Py_ssize_t bins = 2 * (Py_ssize_t)limit + 1;
    if (LEN(b[0]) % 4 || LEN(b[1]) != n || LEN(b[2]) != n || LEN(b[3]) < 8 * bins || LEN(b[4]) < 8 * bins) {
        PyErr_SetString(PyExc_ValueError, "ecsq_codes: buffers have the wrong lengths");
        goto done;
    }
    {
        const float *x = PTR(b[0]);
        int32_t zmax;
        Py_BEGIN_ALLOW_THREADS
        zmax = k_ecsq(x, n, inv, limit, PTR(b[1]), PTR(b[2]), PTR(b[3]), PTR(b[4]));
        Py_END_ALLOW_THREADS
        ret = PyLong_FromLong(zmax);
    }
done:
    rel_all(b, 5);
    return ret;
}

/* ---- the exponent-pair coder ------------------------------------------ */

/* pair_histogram(plane, counts): counts (65536 little-endian u32... u64) of the pairs (plane[2p] << 8) | plane[2p+1];
 * an odd plane's last byte pairs with itself (as the encoder pads it). */
static PyObject *pair_histogram(PyObject *self, PyObject *args) {
    PyObject *po, *co;
    if (!PyArg_ParseTuple(args, "OO", &po, &co)) return NULL;
    Buf p, c;
    if (get_buf(po, &p, 0, "pair_histogram plane") < 0) return NULL;
    if (get_buf(co, &c, 1, "pair_histogram counts") < 0) { rel(&p); return NULL; }
    if (LEN(c) != 65536 * 8) { rel(&p); rel(&c); return PyErr_Format(PyExc_ValueError, "counts must be 65536 u64"); }
    const uint8_t *b = PTR(p);
    Py_ssize_t n = LEN(p);
    uint64_t *cnt = PTR(c);
    Py_BEGIN_ALLOW_THREADS
    memset(cnt, 0, 65536 * 8);
    Py_ssize_t j = 0;
    for (; j + 1 < n; j += 2) cnt[(b[j] << 8) | b[j + 1]]++;
    if (j < n) cnt[(b[j] << 8) | b[j]]++;
    Py_END_ALLOW_THREADS
    rel(&p); rel(&c);
    Py_RETURN_NONE;
}

/* ranks[q] = lut[pair q] for npairs whole pairs; the escaped pair values (rank 255) go to esc in order. */
HOT static Py_ssize_t k_pair_ranks(const uint8_t *restrict b, Py_ssize_t npairs, const uint8_t *restrict lut,
                                   uint8_t *restrict ranks, uint8_t *restrict esc) {
    Py_ssize_t ne = 0, q = 0;
    /* Four pairs per step: one 8-byte load, four table loads, one 4-byte store; escapes are rare. */
    for (; q + 4 <= npairs; q += 4) {
        uint64_t w;
        memcpy(&w, b + 2 * q, 8);
        uint16_t v0 = (uint16_t)(((w & 0xff) << 8) | ((w >> 8) & 0xff));
        uint16_t v1 = (uint16_t)((((w >> 16) & 0xff) << 8) | ((w >> 24) & 0xff));
        uint16_t v2 = (uint16_t)((((w >> 32) & 0xff) << 8) | ((w >> 40) & 0xff));
        uint16_t v3 = (uint16_t)((((w >> 48) & 0xff) << 8) | (w >> 56));
        uint32_t r = (uint32_t)lut[v0] | (uint32_t)lut[v1] << 8 | (uint32_t)lut[v2] << 16 | (uint32_t)lut[v3] << 24;
        st32(ranks + q, r);
        if (__builtin_expect(((r & 0x7f7f7f7fu) + 0x01010101u) & r & 0x80808080u, 0)) {  /* a byte is 255 */
            if ((r & 0xff) == 0xff) st16(esc + 2 * ne++, v0);
            if ((r >> 8 & 0xff) == 0xff) st16(esc + 2 * ne++, v1);
            if ((r >> 16 & 0xff) == 0xff) st16(esc + 2 * ne++, v2);
            if ((r >> 24) == 0xff) st16(esc + 2 * ne++, v3);
        }
    }
    for (; q < npairs; q++) {
        uint16_t v = (uint16_t)((b[2 * q] << 8) | b[2 * q + 1]);
        uint8_t rk = lut[v];
        ranks[q] = rk;
        if (rk == 255) st16(esc + 2 * ne++, v);
    }
    return ne;
}

/* pair_ranks(plane, lut, ranks, escapes) -> number of escapes.
 * ranks[p] = lut[pair p] (one byte; 255 = escaped), escapes gets the escaped pair values in order (u16);
 * an odd plane's last byte makes a pair with itself. */
static PyObject *pair_ranks(PyObject *self, PyObject *args) {
    PyObject *po, *lo, *ro, *eo;
    if (!PyArg_ParseTuple(args, "OOOO", &po, &lo, &ro, &eo)) return NULL;
    PyObject *objs[] = {po, lo, ro, eo}, *ret = NULL;
    Buf b[4];
    if (get_bufs(objs, b, "rrww", "pair_ranks (plane, lut, ranks, escapes)") < 0) return NULL;
    Buf p = b[0], l = b[1], r = b[2], e = b[3];
    Py_ssize_t n = LEN(p), npairs = (n + 1) / 2;
    if (LEN(l) != 65536 || LEN(r) != npairs || LEN(e) < 2 * npairs) {
        PyErr_SetString(PyExc_ValueError, "pair_ranks: buffers have the wrong lengths");
        goto done;
    }
    {
        const uint8_t *b = PTR(p), *lut = PTR(l);
        uint8_t *ranks = PTR(r), *esc = PTR(e);
        Py_ssize_t ne = 0, whole = n / 2;
        Py_BEGIN_ALLOW_THREADS
        ne = k_pair_ranks(b, whole, lut, ranks, esc);
        if (npairs > whole) {
            uint16_t v = (uint16_t)((b[n - 1] << 8) | b[n - 1]);
            ranks[whole] = lut[v];
            if (lut[v] == 255) st16(esc + 2 * ne++, v);
        }
        Py_END_ALLOW_THREADS
        ret = PyLong_FromSsize_t(ne);
    }
done:
    rel_all(b, 4);
    return ret;
}

/* The number of ranks 255, and in *bad whether a rank lies in [ntable, 255): (uint8)(v - ntable) < 255 - ntable.
 * Counted in blocks of 128 with byte-wide counters, so the loop runs on whole vectors. */
HOT static Py_ssize_t k_escapes(const uint8_t *restrict ranks, Py_ssize_t n, int ntable, int *bad_out) {
    const uint8_t nt = (uint8_t)ntable, span = (uint8_t)(255 - ntable);
    Py_ssize_t esc = 0, i = 0;
    uint8_t bad = 0;
    for (; i + 128 <= n; i += 128) {
        uint8_t c8 = 0, b8 = 0;
        for (int j = 0; j < 128; j++) {
            uint8_t v = ranks[i + j];
            c8 += v == 255;
            b8 |= (uint8_t)(v - nt) < span;
        }
        esc += c8;
        bad |= b8;
    }
    for (; i < n; i++) {
        uint8_t v = ranks[i];
        esc += v == 255;
        bad |= (uint8_t)(v - nt) < span;
    }
    *bad_out = bad != 0;
    return esc;
}

/* pair_escapes(ranks, ntable) -> the number of escaped pairs (rank 255), or -1 if a rank is outside the table. */
static PyObject *pair_escapes(PyObject *self, PyObject *args) {
    PyObject *ro;
    int ntable;
    if (!PyArg_ParseTuple(args, "Oi", &ro, &ntable)) return NULL;
    if (ntable < 0 || ntable > 255) return PyErr_Format(PyExc_ValueError, "pair table of %d entries", ntable);
    Buf r;
    if (get_buf(ro, &r, 0, "pair_escapes ranks") < 0) return NULL;
    const uint8_t *ranks = PTR(r);
    Py_ssize_t n = LEN(r), esc = 0;
    int bad = 0;
    Py_BEGIN_ALLOW_THREADS
    esc = k_escapes(ranks, n, ntable, &bad);
    Py_END_ALLOW_THREADS
    rel(&r);
    return PyLong_FromSsize_t(bad ? -1 : esc);
}

/* Shared argument checks of the two pair decoders: table is 256 u16, escapes holds exactly the escaped pairs. */
static int pairs_args(Buf *r, Buf *t, Buf *e, Py_ssize_t n) {
    if (LEN(*t) != 512) { PyErr_SetString(PyExc_ValueError, "pair table must be 256 u16"); return -1; }
    if (LEN(*r) != (n + 1) / 2) { PyErr_SetString(PyExc_ValueError, "ranks do not cover the plane"); return -1; }
    if (LEN(*e) % 2) { PyErr_SetString(PyExc_ValueError, "escapes hold a partial pair"); return -1; }
    return 0;
}

/* pairs_to_plane(ranks, table, escapes, plane) -> escapes used.
 * plane[2p], plane[2p+1] = the two bytes (big-endian) of pair p: table[rank], or the next escape for rank 255. */
static PyObject *pairs_to_plane(PyObject *self, PyObject *args) {
    PyObject *ro, *to, *eo, *oo;
    if (!PyArg_ParseTuple(args, "OOOO", &ro, &to, &eo, &oo)) return NULL;
    PyObject *objs[] = {ro, to, eo, oo}, *ret = NULL;
    Buf b[4];
    if (get_bufs(objs, b, "rrrw", "pairs_to_plane (ranks, table, escapes, plane)") < 0) return NULL;
    Buf r = b[0], t = b[1], e = b[2], o = b[3];
    if (pairs_args(&r, &t, &e, LEN(o)) < 0) goto done;
    {
        const uint8_t *ranks = PTR(r), *tb = PTR(t), *esc = PTR(e);
        uint8_t *out = PTR(o);
        Py_ssize_t n = LEN(o), npairs = LEN(r), nesc = LEN(e) / 2, used = 0;
        uint16_t table[256];
        for (int i = 0; i < 256; i++) table[i] = ld16(tb + 2 * i);
        Py_BEGIN_ALLOW_THREADS
        Py_ssize_t full = n / 2;
        for (Py_ssize_t q = 0; q < npairs; q++) {
            uint8_t rk = ranks[q];
            uint16_t v = table[rk];
            if (rk == 255 && used < nesc) v = ld16(esc + 2 * used++);
            if (q < full) {
                out[2 * q] = (uint8_t)(v >> 8);
                out[2 * q + 1] = (uint8_t)v;
            } else {
                out[2 * q] = (uint8_t)(v >> 8);
            }
        }
        Py_END_ALLOW_THREADS
        ret = PyLong_FromSsize_t(used);
    }
done:
    rel_all(b, 4);
    return ret;
}

/* Words per block of pairs_to_half (even): 128 KiB of output, which stays in L2 between its two loops. */
#define HALF_BLOCK (64 * 1024)

/* The loops of pairs_to_half; returns the escapes used. Block by block: first one table lookup per
 * pair writes both words' exponent bits (eight ranks per load; eight without an escape take no branch
 * per pair), then a vector loop ors every word's mantissa bits in. */
static inline uint32_t spread_of(uint32_t v) { return ((v >> 8) << 7) | ((v & 255) << 23); }

HOT static Py_ssize_t k_half(const uint8_t *restrict ranks, Py_ssize_t npairs, const uint32_t *restrict spread,
                             const uint8_t *restrict tb, const uint8_t *restrict esc, Py_ssize_t nesc,
                             const uint8_t *restrict low, Py_ssize_t n, uint8_t *restrict out) {
    Py_ssize_t used = 0, full = n / 2;
    uint16_t *w16 = (uint16_t *)out;
    for (Py_ssize_t b0 = 0; b0 < n; b0 += HALF_BLOCK) {
        Py_ssize_t b1 = b0 + HALF_BLOCK < n ? b0 + HALF_BLOCK : n;
        Py_ssize_t q = b0 / 2, q1 = b1 / 2 < full ? b1 / 2 : full;
        for (; q + 8 <= q1; q += 8) {
            uint64_t r8;
            memcpy(&r8, ranks + q, 8);
            uint64_t x = ~r8; /* a zero byte of x is a rank 255 */
            if (((x - 0x0101010101010101ull) & ~x & 0x8080808080808080ull) == 0) {
                for (int k = 0; k < 8; k++) st32(out + 4 * (q + k), spread[(r8 >> (8 * k)) & 255]);
                continue;
            }
            for (int k = 0; k < 8; k++) {
                uint8_t rk = ranks[q + k];
                st32(out + 4 * (q + k), rk == 255 && used < nesc ? spread_of(ld16(esc + 2 * used++)) : spread[rk]);
            }
        }
        for (; q < q1; q++) {
            uint8_t rk = ranks[q];
            st32(out + 4 * q, rk == 255 && used < nesc ? spread_of(ld16(esc + 2 * used++)) : spread[rk]);
        }
        for (Py_ssize_t j = b0; j < 2 * q1; j++) { /* the odd last word is done below */
            uint16_t m = low[j];
            w16[j] |= (uint16_t)((m >> 1) | ((m & 1) << 15));
        }
    }
    if (npairs > full) { /* odd n: the last word's pair has a padding second half */
        uint8_t rk = ranks[full];
        uint32_t v = ld16(tb + 2 * rk);
        if (rk == 255 && used < nesc) v = ld16(esc + 2 * used++);
        uint32_t m = low[n - 1];
        w16[n - 1] = (uint16_t)(((v >> 8) << 7) | (m >> 1) | ((m & 1) << 15));
    }
    return used;
}

/* pairs_to_half(ranks, table, escapes, low, out) -> escapes used.
 * A rotated 2-byte float chunk (bf16, f16) whose exponent plane is pair-coded: word j is the rotated
 * (e << 8) | m turned back, e << 7 | m >> 1 | (m & 1) << 15, with e from pair j/2 and m = low[j]. */
static PyObject *pairs_to_half(PyObject *self, PyObject *args) {
    PyObject *ro, *to, *eo, *lo, *oo;
    if (!PyArg_ParseTuple(args, "OOOOO", &ro, &to, &eo, &lo, &oo)) return NULL;
    PyObject *objs[] = {ro, to, eo, lo, oo}, *ret = NULL;
    Buf b[5];
    if (get_bufs(objs, b, "rrrrw", "pairs_to_half (ranks, table, escapes, low, words)") < 0) return NULL;
    Buf r = b[0], t = b[1], e = b[2], l = b[3], o = b[4];
    if (LEN(o) % 2 || LEN(l) != LEN(o) / 2) { PyErr_SetString(PyExc_ValueError, "low plane and words differ"); goto done; }
    if (pairs_args(&r, &t, &e, LEN(l)) < 0) goto done;
    {
        const uint8_t *ranks = PTR(r), *tb = PTR(t), *esc = PTR(e), *low = PTR(l);
        uint8_t *out = PTR(o);
        Py_ssize_t n = LEN(l), npairs = LEN(r), nesc = LEN(e) / 2, used = 0;
        uint32_t spread[256];
        for (int i = 0; i < 256; i++) {
            uint32_t v = ld16(tb + 2 * i);
            spread[i] = spread_of(v);
        }
        Py_BEGIN_ALLOW_THREADS
        used = k_half(ranks, npairs, spread, tb, esc, nesc, low, n, out);
        Py_END_ALLOW_THREADS
        ret = PyLong_FromSsize_t(used);
    }
done:
    rel_all(b, 5);
    return ret;
}

/* ---- quantized chunks: codes x scale, cast to the tensor's dtype -------- */

enum { OUT_F32 = 0, OUT_BF16 = 1 };
enum { Q_INT8 = 0, Q_FP8 = 1, Q_INT4 = 2, Q_ECSQ = 3 };

/* f32 -> bf16, round to nearest even; a NaN becomes the quiet NaN of its sign (floats.f32_to_bf16_into). */
static inline uint16_t to_bf16(float y) {
    uint32_t u;
    memcpy(&u, &y, 4);
    uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    uint32_t nan = ((u >> 16) & 0x8000u) | 0x7FC0u;
    return (uint16_t)((u & 0x7FFFFFFFu) > 0x7F800000u ? nan : rounded); /* a select: the loop stays vectorized */
}

/* One row of codes into f32 or bf16; separate functions with plain arguments, so every loop vectorizes. */
static inline void row_int8(const int8_t *restrict codes, float scale, Py_ssize_t cols, uint8_t *restrict out, int fmt) {
    if (fmt == OUT_BF16)
        for (Py_ssize_t j = 0; j < cols; j++) st16(out + 2 * j, to_bf16((float)codes[j] * scale));
    else
        for (Py_ssize_t j = 0; j < cols; j++) {
            float y = (float)codes[j] * scale;
            memcpy(out + 4 * j, &y, 4);
        }
}

static inline void row_fp8(const uint8_t *restrict codes, const float *restrict table, float scale, Py_ssize_t cols,
                    uint8_t *restrict out, int fmt) {
    if (fmt == OUT_BF16)
        for (Py_ssize_t j = 0; j < cols; j++) st16(out + 2 * j, to_bf16(table[codes[j]] * scale));
    else
        for (Py_ssize_t j = 0; j < cols; j++) {
            float y = table[codes[j]] * scale;
            memcpy(out + 4 * j, &y, 4);
        }
}

static inline void span_int4(const uint8_t *restrict codes, float zero, float scale, Py_ssize_t cols, uint8_t *restrict out,
                      int fmt) {
    if (fmt == OUT_BF16)
        for (Py_ssize_t j = 0; j < cols; j++) st16(out + 2 * j, to_bf16(((float)codes[j] - zero) * scale));
    else
        for (Py_ssize_t j = 0; j < cols; j++) {
            float y = ((float)codes[j] - zero) * scale;
            memcpy(out + 4 * j, &y, 4);
        }
}

/* ECSQ: the table value of each zigzag code (low byte, plus the high byte's page when there is one) times the
 * row's scale. */
static inline void row_ecsq(const uint8_t *restrict lo, const uint8_t *restrict hi, const float *restrict table,
                            float scale, Py_ssize_t cols, uint8_t *restrict out, int fmt) {
    if (hi) {
        if (fmt == OUT_BF16)
            for (Py_ssize_t j = 0; j < cols; j++) st16(out + 2 * j, to_bf16(table[lo[j] | (hi[j] << 8)] * scale));
        else
            for (Py_ssize_t j = 0; j < cols; j++) {
                float y = table[lo[j] | (hi[j] << 8)] * scale;
                memcpy(out + 4 * j, &y, 4);
            }
    } else if (fmt == OUT_BF16) {
        for (Py_ssize_t j = 0; j < cols; j++) st16(out + 2 * j, to_bf16(table[lo[j]] * scale));
    } else {
        for (Py_ssize_t j = 0; j < cols; j++) {
            float y = table[lo[j]] * scale;
            memcpy(out + 4 * j, &y, 4);
        }
    }
}

HOT static void expand_rows(int method, const uint8_t *codes, const uint8_t *scales, const uint8_t *zeros,
                        const float *table, Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t group, uint8_t *out,
                        int fmt) {
    Py_ssize_t width = fmt == OUT_BF16 ? 2 : 4;
    Py_ssize_t groups = method == Q_INT4 ? (cols + group - 1) / group : 1;
    for (Py_ssize_t r = 0; r < rows; r++) {
        const uint8_t *cr = codes + r * cols;
        uint8_t *orow = out + width * r * cols;
        if (method == Q_INT8) {
            row_int8((const int8_t *)cr, ldf(scales + 4 * r), cols, orow, fmt);
        } else if (method == Q_ECSQ) {
            row_ecsq(cr, zeros ? zeros + r * cols : NULL, table, ldf(scales + 4 * r), cols, orow, fmt);
        } else if (method == Q_FP8) {
            row_fp8(cr, table, ldf(scales + 4 * r), cols, orow, fmt);
        } else {
            for (Py_ssize_t g = 0; g < groups; g++) {
                Py_ssize_t j0 = g * group, j1 = j0 + group < cols ? j0 + group : cols;
                span_int4(cr + j0, (float)zeros[r * groups + g], ldf(scales + 4 * (r * groups + g)), j1 - j0,
                          orow + width * j0, fmt);
            }
        }
    }
}

/* expand(method, codes, scales, zeros, table, rows, cols, group, out, fmt)
 *   int8: y = (float)(int8)code * scale[row]
 *   fp8:  y = table[code] * scale[row]                     (table: the 256 e4m3 values as f32)
 *   int4: y = ((float)code - (float)zero[row, g]) * scale[row, g],  g = col / group
 *   ecsq: y = table[code | high << 8] * scale[row]          (zeros: the high plane or empty; table: f32 pages)
 * then y is cast to f32 or bf16 into out. */
static PyObject *expand(PyObject *self, PyObject *args) {
    PyObject *co, *so, *zo, *to, *oo;
    int method, fmt;
    Py_ssize_t rows, cols, group;
    if (!PyArg_ParseTuple(args, "iOOOOnnnOi", &method, &co, &so, &zo, &to, &rows, &cols, &group, &oo, &fmt))
        return NULL;
    PyObject *objs[] = {co, so, zo, to, oo}, *ret = NULL;
    Buf b[5];
    if (get_bufs(objs, b, "rrrrw", "expand (codes, scales, zeros, table, out)") < 0) return NULL;
    Buf c = b[0], s = b[1], z = b[2], t = b[3], o = b[4];
    if (rows < 0 || cols < 0 || (method == Q_INT4 && group <= 0) || (fmt != OUT_F32 && fmt != OUT_BF16) ||
        method < Q_INT8 || method > Q_ECSQ) {
        PyErr_SetString(PyExc_ValueError, "expand: bad shape, method or format");
        goto done;
    }
    Py_ssize_t groups = method == Q_INT4 ? (cols + group - 1) / group : 1;
    Py_ssize_t width = fmt == OUT_BF16 ? 2 : 4;
    /* ECSQ: zeros is the high byte plane (empty when there is none), table the f32 values of 256 codes per page. */
    int ecsq_high = method == Q_ECSQ && LEN(z) > 0;
    Py_ssize_t pages = LEN(t) / 1024;
    if ((cols && rows > PY_SSIZE_T_MAX / cols / 4) || LEN(c) != rows * cols || LEN(s) != 4 * rows * groups ||
        LEN(o) != width * rows * cols || (method == Q_INT4 && LEN(z) != rows * groups) ||
        (method == Q_FP8 && LEN(t) != 1024) ||
        (method == Q_ECSQ && (LEN(t) % 1024 || pages < 1 || pages > 256 || (ecsq_high ? LEN(z) != rows * cols : pages != 1)))) {
        PyErr_SetString(PyExc_ValueError, "expand: buffers do not match the shape");
        goto done;
    }
    if (ecsq_high) {
        const uint8_t *hb = PTR(z);
        uint8_t top = 0;
        for (Py_ssize_t i = 0; i < LEN(z); i++) top = hb[i] > top ? hb[i] : top;
        if (LEN(z) && top >= pages) {
            PyErr_SetString(PyExc_ValueError, "expand: an ecsq code is beyond its table");
            goto done;
        }
    }
    {
        const uint8_t *tb = PTR(t);
        float fp8[256], *table = fp8;
        if (method == Q_FP8)
            for (int i = 0; i < 256; i++) table[i] = ldf(tb + 4 * i);
        if (method == Q_ECSQ) {
            table = PyMem_RawMalloc((size_t)LEN(t));
            if (!table) {
                PyErr_NoMemory();
                goto done;
            }
            memcpy(table, tb, (size_t)LEN(t));
        }
        Py_BEGIN_ALLOW_THREADS
        expand_rows(method, PTR(c), PTR(s), ecsq_high || method == Q_INT4 ? PTR(z) : NULL, table, rows, cols, group,
                    PTR(o), fmt);
        Py_END_ALLOW_THREADS
        if (table != fp8) PyMem_RawFree(table);
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    rel_all(b, 5);
    return ret;
}

/* ---- int4 encode: the per-group scale and zero-point search ------------- */

/* numpy's pairwise sum of n f32 values (FLOAT_pairwise_sum with stride 1): the order of additions of
 * add.reduce along a contiguous axis, so these sums round exactly as quant.py's .sum(axis=-1). */
static float pw_sum(const float *a, Py_ssize_t n) {
    if (n < 8) {
        float res = 0.f;
        for (Py_ssize_t i = 0; i < n; i++) res += a[i];
        return res;
    }
    if (n <= 128) {
        float r[8];
        Py_ssize_t i;
        for (int j = 0; j < 8; j++) r[j] = a[j];
        for (i = 8; i < n - (n % 8); i += 8)
            for (int j = 0; j < 8; j++) r[j] += a[i + j];
        float res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for (; i < n; i++) res += a[i];
        return res;
    }
    Py_ssize_t n2 = n / 2;
    n2 -= n2 % 8;
    return pw_sum(a, n2) + pw_sum(a + n2, n - n2);
}

/* f32 -> f16 -> f32, round to nearest even (numpy's astype(float16)): overflow to inf, f16 subnormals kept. */
static float f16_round(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t sign = u & 0x80000000u, a = u & 0x7FFFFFFFu;
    if (a >= 0x7F800000u) return f;                       /* inf, NaN */
    if (a >= 0x477FF000u) a = 0x7F800000u;                /* >= 65520 rounds to inf */
    else if (a >= 0x38800000u) {                          /* normal f16: keep 10 mantissa bits */
        uint32_t q = a >> 13, rem = a & 0x1FFFu;
        if (rem > 0x1000u || (rem == 0x1000u && (q & 1u))) q++;
        a = q << 13;
    } else if (a < 0x00800000u) a = 0;                    /* f32 subnormal or zero */
    else {                                                /* f16 subnormal: a multiple of 2^-24 */
        uint32_t e = a >> 23, m = (a & 0x7FFFFFu) | 0x800000u, shift = 126 - e;
        uint32_t q = shift > 31 ? 0 : m >> shift;
        if (shift <= 31) {
            uint32_t rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1);
            if (rem > half || (rem == half && (q & 1u))) q++;
        }
        float v = (float)q * 5.9604644775390625e-08f;     /* q * 2^-24, exact */
        memcpy(&a, &v, 4);
    }
    u = sign | a;
    memcpy(&f, &u, 4);
    return f;
}

static inline float clip15(float v) { return v < 0.f ? 0.f : (v > 15.f ? 15.f : v); }

/* quant._f16_scale / _f32_scale */
static inline float round_scale(float s, int f16) {
    if (!f16) return s;
    float r = f16_round(s);
    return (r > 0.f && r <= 3.4028234663852886e38f) ? r : 6.103515625e-05f;
}

/* quant._int4_params.error: codes q of one group for (scale, zero), and the sum of squared errors. */
static float group_error(const float *restrict g, const float *restrict wf, Py_ssize_t n, float s, float z,
                         float *restrict q, float *restrict t) {
    for (Py_ssize_t i = 0; i < n; i++) {
        float c = clip15(rintf(g[i] / s) + z);
        float e = (c - z) * s - g[i];
        q[i] = c;
        t[i] = e * e * wf[i];
    }
    return pw_sum(t, n);
}

/* One row-group (n values, padded with 0 / weight 0): quant._int4_params step for step. */
HOT static void k_int4_group(const float *restrict g, const float *restrict wf, Py_ssize_t n, const float *search,
                             Py_ssize_t nsearch, int refine, int f16, float *work, float *scale_out, float *zero_out,
                             float *codes) {
    float *q = work, *qn = work + n, *t = work + 2 * n, *d = work + 3 * n;
    float mn = INFINITY, mx = -INFINITY;
    for (Py_ssize_t i = 0; i < n; i++)
        if (wf[i] != 0.f) {
            if (g[i] < mn) mn = g[i];
            if (g[i] > mx) mx = g[i];
        }
    float lo = mn < 0.f ? mn : 0.f, hi = mx > 0.f ? mx : 0.f;
    float best_err = INFINITY, best_s = 1.f, best_z = 0.f;
    for (Py_ssize_t k = 0; k < nsearch; k++) {
        float a = search[k], ha = hi * a, la = lo * a;
        float s = (ha - la) / 15.f;
        s = round_scale(s > 0.f ? s : 1.f, f16);
        float z = clip15(rintf(-la / s));
        float err = group_error(g, wf, n, s, z, q, t);
        if (err < best_err) {
            best_err = err;
            best_s = s;
            best_z = z;
        }
    }
    group_error(g, wf, n, best_s, best_z, q, t);
    for (int step = 0; step < refine; step++) {
        for (Py_ssize_t i = 0; i < n; i++) d[i] = (q[i] - best_z) * wf[i];
        for (Py_ssize_t i = 0; i < n; i++) t[i] = d[i] * d[i];
        float den = pw_sum(t, n);
        for (Py_ssize_t i = 0; i < n; i++) t[i] = g[i] * d[i];
        float fit = pw_sum(t, n) / (den > 0.f ? den : 1.f);
        float s = round_scale((den > 0.f && fit > 0.f) ? fit : best_s, f16);
        for (Py_ssize_t i = 0; i < n; i++) t[i] = (q[i] * s - g[i]) * wf[i];
        float num = pw_sum(t, n), wsum = pw_sum(wf, n);
        float z = clip15(rintf(num / (wsum < 1.f ? 1.f : wsum) / s));
        float err = group_error(g, wf, n, s, z, qn, t);
        if (err < best_err) {
            best_err = err;
            best_s = s;
            best_z = z;
            float *swap = q;
            q = qn;
            qn = swap;
        }
    }
    *scale_out = best_s;
    *zero_out = best_z;
    memcpy(codes, q, (size_t)n * sizeof(float));
}

/* int4_params(x, mask, rows, cols, group, search, refine, f16, scales, zeros, codes)
 * quant._int4_params and _int4_codes: x is rows x cols f32 (pruned entries already 0), mask rows x cols
 * bytes (0 = pruned) or empty; search the clip factors as f32. Writes scales (f32, rows x groups),
 * zeros (u8, rows x groups) and codes (u8, rows x cols). */
static PyObject *int4_params(PyObject *self, PyObject *args) {
    PyObject *xo, *mo, *so, *sco, *zo, *co;
    Py_ssize_t rows, cols, group;
    int refine, f16;
    if (!PyArg_ParseTuple(args, "OOnnnOiiOOO", &xo, &mo, &rows, &cols, &group, &so, &refine, &f16, &sco, &zo, &co))
        return NULL;
    PyObject *objs[] = {xo, mo, so, sco, zo, co}, *ret = NULL;
    Buf b[6];
    if (get_bufs(objs, b, "rrrwww", "int4_params (x, mask, search, scales, zeros, codes)") < 0) return NULL;
    float *work = NULL;
    if (rows < 0 || cols < 0 || group <= 0 || group > 4096 || refine < 0 || (cols && rows > PY_SSIZE_T_MAX / cols / 4)) {
        PyErr_SetString(PyExc_ValueError, "int4_params: bad shape");
        goto done;
    }
    Py_ssize_t groups = (cols + group - 1) / group;
    if (LEN(b[0]) != 4 * rows * cols || (LEN(b[1]) && LEN(b[1]) != rows * cols) || LEN(b[2]) % 4 ||
        LEN(b[3]) != 4 * rows * groups || LEN(b[4]) != rows * groups || LEN(b[5]) != rows * cols) {
        PyErr_SetString(PyExc_ValueError, "int4_params: buffers do not match the shape");
        goto done;
    }
    work = PyMem_RawMalloc((size_t)group * 7 * sizeof(float));
    if (!work) {
        PyErr_NoMemory();
        goto done;
    }
    {
        const uint8_t *xb = PTR(b[0]), *mask = LEN(b[1]) ? PTR(b[1]) : NULL;
        const float *search = PTR(b[2]);
        Py_ssize_t nsearch = LEN(b[2]) / 4;
        uint8_t *scales = PTR(b[3]), *zeros = PTR(b[4]), *codes = PTR(b[5]);
        Py_BEGIN_ALLOW_THREADS
        float *g = work + 4 * group, *wf = work + 5 * group, *q = work + 6 * group;
        for (Py_ssize_t r = 0; r < rows; r++)
            for (Py_ssize_t k = 0; k < groups; k++) {
                Py_ssize_t c0 = k * group, m = cols - c0 < group ? cols - c0 : group;
                const uint8_t *src = xb + 4 * (r * cols + c0);
                for (Py_ssize_t i = 0; i < group; i++) {
                    g[i] = i < m ? ldf(src + 4 * i) : 0.f;
                    wf[i] = i < m && (!mask || mask[r * cols + c0 + i]) ? 1.f : 0.f;
                }
                float s, z;
                k_int4_group(g, wf, group, search, nsearch, refine, f16, work, &s, &z, q);
                memcpy(scales + 4 * (r * groups + k), &s, 4);
                zeros[r * groups + k] = (uint8_t)z;
                for (Py_ssize_t i = 0; i < m; i++) codes[r * cols + c0 + i] = (uint8_t)q[i];
            }
        Py_END_ALLOW_THREADS
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    PyMem_RawFree(work);
    rel_all(b, 6);
    return ret;
}

/* ---- the module ------------------------------------------------------- */

static PyMethodDef methods[] = {
    {"split_planes", split_planes, METH_VARARGS, "split_planes(src, k, rotate, dst): words into k byte planes"},
    {"merge_planes", merge_planes, METH_VARARGS, "merge_planes(planes, rotate, out): k byte planes into words"},
    {"pair_histogram", pair_histogram, METH_VARARGS, "pair_histogram(plane, counts): counts of byte pairs"},
    {"pair_ranks", pair_ranks, METH_VARARGS, "pair_ranks(plane, lut, ranks, escapes) -> escapes written"},
    {"pair_escapes", pair_escapes, METH_VARARGS, "pair_escapes(ranks, ntable) -> escaped pairs, -1 if a rank is bad"},
    {"pairs_to_plane", pairs_to_plane, METH_VARARGS, "pairs_to_plane(ranks, table, escapes, plane) -> escapes used"},
    {"pairs_to_half", pairs_to_half, METH_VARARGS, "pairs_to_half(ranks, table, escapes, low, words) -> escapes used"},
    {"split_nibbles", split_nibbles, METH_VARARGS, "split_nibbles(codes, high, low): codes into nibble halves"},
    {"merge_nibbles", merge_nibbles, METH_VARARGS, "merge_nibbles(high, low, codes): the inverse"},
    {"ecsq_codes", ecsq_codes, METH_VARARGS, "ecsq_codes(x, inv, limit, codes, high, count, total) -> largest code"},
    {"expand", expand, METH_VARARGS, "expand(method, codes, scales, zeros, table, rows, cols, group, out, fmt)"},
    {"int4_params", int4_params, METH_VARARGS,
     "int4_params(x, mask, rows, cols, group, search, refine, f16, scales, zeros, codes): int4 encode"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_native", "mzstore's native codec core (see mzstore/codecs/native.py)", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native(void) {
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddIntConstant(m, "ABI", 5) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}

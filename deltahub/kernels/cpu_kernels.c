/* Fused CPU kernels: apply a resident delta layout to a weight in place, in one pass.
 *
 * Compiled on first use by deltahub/kernels/native.py (cc -O3 -march=native -ffp-contract=off), loaded with
 * ctypes; the torch paths in apply.py are the fallback. Semantics are those of kernels/reference.py:
 * w <- round_W(w_c + t) with t = c(alpha) * Delta in the compute type c (float, or double for fp64), rounded
 * once into the weight's type. -ffp-contract=off keeps the compiler from fusing the product into the sum
 * (an FMA would round once where the reference rounds twice).
 *
 * Each function handles rows [r0, r1) (elements [i0, i1) for dense) so Python can split the work across
 * threads; ctypes releases the GIL during the call. ``w`` points at row ``wr0`` of the destination (0 for
 * an apply; r0 when decoding a block of rows into a buffer for a matmul).
 */
#include <stdint.h>
#include <string.h>

enum { DT_F32 = 0, DT_F64 = 1, DT_F16 = 2, DT_BF16 = 3, DT_I8 = 4, DT_U16 = 5, DT_I32 = 6 };

static inline float ld_f32(const float *p, int64_t i) { return p[i]; }
static inline void st_f32(float *p, int64_t i, float v) { p[i] = v; }
static inline double ld_f64(const double *p, int64_t i) { return p[i]; }
static inline void st_f64(double *p, int64_t i, double v) { p[i] = v; }
static inline float ld_f16(const _Float16 *p, int64_t i) { return (float)p[i]; }
static inline void st_f16(_Float16 *p, int64_t i, float v) { p[i] = (_Float16)v; }
static inline float ld_bf16(const uint16_t *p, int64_t i) {
    uint32_t u = (uint32_t)p[i] << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline void st_bf16(uint16_t *p, int64_t i, float v) {
    /* round to nearest even, as torch's c10::BFloat16; NaN stays NaN. Branch-free so loops vectorize. */
    uint32_t u;
    memcpy(&u, &v, 4);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const uint32_t quiet = (u >> 16) | 0x40u;
    p[i] = (uint16_t)(((u & 0x7fffffffu) > 0x7f800000u) ? quiet : rounded);
}
/* double-precision weights keep double compute; fp32 stores from double round once */
static inline void st_f32d(float *p, int64_t i, double v) { p[i] = (float)v; }
static inline double ld_f32d(const float *p, int64_t i) { return (double)p[i]; }

/* ---------------------------------------------------------------- Codes: b bit planes + codebook */
/* One byte of every plane covers 8 columns: the inner loop over those 8 is branch-free (selects, table
 * reads from a 256-entry table in L1) so the compiler vectorizes it. */
#define DEFINE_CODES(SUF, WT, LD, ST, CT)                                                                              \
    static void codes_##SUF(WT *w, int64_t wr0, int64_t rows, int64_t cols, int64_t r0, int64_t r1,                    \
                            const uint8_t *planes, int bits, const float *book, int64_t book_rows,                     \
                            double alpha) {                                                                            \
        const int64_t rb = (cols + 7) / 8, whole = cols / 8, plane_stride = rows * rb;                                 \
        const int ncode = 1 << bits;                                                                                   \
        CT table[256];                                                                                                 \
        for (int64_t r = r0; r < r1; ++r) {                                                                            \
            if (r == r0 || book_rows != 1) {                                                                           \
                const float *cb = book + (book_rows == 1 ? 0 : r) * ncode;                                             \
                for (int c = 0; c < ncode; ++c) table[c] = (CT)cb[c] * (CT)alpha;                                      \
            }                                                                                                          \
            WT *wr = w + (r - wr0) * cols;                                                                             \
            const uint8_t *p0 = planes + r * rb;                                                                       \
            if (bits == 1) {                                                                                           \
                const CT t0 = table[0], t1 = table[1];                                                                 \
                for (int64_t b = 0; b < whole; ++b) {                                                                  \
                    const unsigned byte = p0[b];                                                                       \
                    WT *wp = wr + 8 * b;                                                                               \
                    for (int j = 0; j < 8; ++j) ST(wp, j, LD(wp, j) + (((byte >> j) & 1u) ? t1 : t0));                 \
                }                                                                                                      \
                for (int64_t c = 8 * whole; c < cols; ++c)                                                             \
                    ST(wr, c, LD(wr, c) + (((p0[c >> 3] >> (c & 7)) & 1u) ? t1 : t0));                                 \
                continue;                                                                                              \
            }                                                                                                          \
            for (int64_t b = 0; b < rb; ++b) {                                                                         \
                unsigned code[8] = {0, 0, 0, 0, 0, 0, 0, 0};                                                           \
                for (int p = 0; p < bits; ++p) {                                                                       \
                    const unsigned byte = p0[p * plane_stride + b];                                                    \
                    for (int j = 0; j < 8; ++j) code[j] |= ((byte >> j) & 1u) << p;                                    \
                }                                                                                                      \
                CT v[8];                                                                                               \
                for (int j = 0; j < 8; ++j) v[j] = table[0];                                                           \
                for (int c = 1; c < ncode; ++c) /* a select per level beats a gather: it vectorizes */                 \
                    for (int j = 0; j < 8; ++j) v[j] = code[j] == (unsigned)c ? table[c] : v[j];                       \
                WT *wp = wr + 8 * b;                                                                                   \
                if (b < whole) {                                                                                       \
                    for (int j = 0; j < 8; ++j) ST(wp, j, LD(wp, j) + v[j]);                                           \
                } else {                                                                                               \
                    for (int j = 0; j < (int)(cols - 8 * b); ++j) ST(wp, j, LD(wp, j) + v[j]);                         \
                }                                                                                                      \
            }                                                                                                          \
        }                                                                                                              \
    }

/* ------------------------------------------------- TernaryMask: mask plane + sign stream + row prefix */
/* 64 columns at a time: the kept entries of a 64-bit mask word are consecutive in the sign stream, so the
 * next popcount(m) sign bits, deposited onto the set bits of m (pdep), give every column its sign. The
 * 64-lane loop is then branch-free and vectorizes; untouched columns add +0 exactly as the reference. */
static inline uint64_t load_bits(const uint8_t *s, int64_t nbytes, int64_t k) {
    /* the 64 bits of the stream starting at bit k (zeros past its end) */
    const int64_t b = k >> 3;
    const int sh = (int)(k & 7);
    uint64_t lo = 0, hi = 0;
    if (b + 9 <= nbytes) { /* constant-size copies compile to plain loads */
        memcpy(&lo, s + b, 8);
        hi = s[b + 8];
    } else {
        for (int64_t i = b; i < nbytes && i < b + 8; ++i) lo |= (uint64_t)s[i] << (8 * (i - b));
        if (b + 8 < nbytes) hi = s[b + 8];
    }
    return sh ? (lo >> sh) | (hi << (64 - sh)) : lo;
}
static inline uint64_t load_word(const uint8_t *p, int64_t nbytes) {
    uint64_t v = 0;
    if (nbytes >= 8) {
        memcpy(&v, p, 8);
        return v;
    }
    for (int64_t i = 0; i < nbytes; ++i) v |= (uint64_t)p[i] << (8 * i);
    return v;
}
#if defined(__BMI2__)
#include <immintrin.h>
static inline uint64_t deposit(uint64_t bits, uint64_t mask) { return _pdep_u64(bits, mask); }
#else
static inline uint64_t deposit(uint64_t bits, uint64_t mask) {
    uint64_t out = 0;
    for (uint64_t m = mask; m; m &= m - 1, bits >>= 1) out |= (bits & 1u) ? (m & -m) : 0;
    return out;
}
#endif
#define DEFINE_MASK(SUF, WT, LD, ST, CT)                                                                               \
    static void mask_##SUF(WT *w, int64_t wr0, int64_t cols, int64_t r0, int64_t r1, const uint8_t *mask,              \
                           const uint8_t *signs, int64_t sign_bytes, const int64_t *row_ptr, double scale,             \
                           double alpha) {                                                                             \
        const int64_t rb = (cols + 7) / 8;                                                                             \
        const CT t = (CT)(float)scale * (CT)alpha; /* Delta = +-fp32(scale), exact; then one product */                \
        const CT zero = 0;                                                                                             \
        for (int64_t r = r0; r < r1; ++r) {                                                                            \
            WT *wr = w + (r - wr0) * cols;                                                                             \
            const uint8_t *mr = mask + r * rb;                                                                         \
            int64_t k = row_ptr[r];                                                                                    \
            for (int64_t c0 = 0; c0 < cols; c0 += 64) {                                                                \
                const uint64_t m = load_word(mr + c0 / 8, rb - c0 / 8);                                                \
                if (!m) continue;                                                                                      \
                const uint64_t neg = deposit(load_bits(signs, sign_bytes, k), m);                                      \
                k += __builtin_popcountll(m);                                                                          \
                WT *wp = wr + c0;                                                                                      \
                const int n = cols - c0 < 64 ? (int)(cols - c0) : 64;                                                  \
                for (int q = 0; q < (n + 7) / 8; ++q) { /* 8 columns a step: 32-bit lanes vectorize */                 \
                    const unsigned mb = (unsigned)(m >> (8 * q)) & 0xffu, nb = (unsigned)(neg >> (8 * q)) & 0xffu;     \
                    if (!mb) continue;                                                                                 \
                    WT *wq = wp + 8 * q;                                                                               \
                    if (8 * q + 8 <= n) {                                                                              \
                        for (int j = 0; j < 8; ++j)                                                                    \
                            ST(wq, j, LD(wq, j) + (((mb >> j) & 1u) ? (((nb >> j) & 1u) ? -t : t) : zero));            \
                    } else {                                                                                           \
                        for (int j = 0; j < n - 8 * q; ++j)                                                            \
                            ST(wq, j, LD(wq, j) + (((mb >> j) & 1u) ? (((nb >> j) & 1u) ? -t : t) : zero));            \
                    }                                                                                                  \
                }                                                                                                      \
            }                                                                                                          \
        }                                                                                                              \
    }

/* ----------------------------------------------------------------- SparseRows: CSR, 16/32-bit columns */
#define DEFINE_CSR(SUF, WT, LD, ST, CT, VSUF, VT, VLD)                                                                 \
    static void csr_##SUF##_##VSUF(WT *w, int64_t wr0, int64_t cols, int64_t r0, int64_t r1, const int64_t *row_ptr,   \
                                   const void *colidx, int col16, const VT *values, double scale,                      \
                                   double alpha) {                                                                     \
        const float s = (float)scale;                                                                                  \
        const uint16_t *c16 = (const uint16_t *)colidx;                                                                \
        const int32_t *c32 = (const int32_t *)colidx;                                                                  \
        for (int64_t r = r0; r < r1; ++r) {                                                                            \
            WT *wr = w + (r - wr0) * cols;                                                                             \
            for (int64_t k = row_ptr[r]; k < row_ptr[r + 1]; ++k) {                                                    \
                const int64_t c = col16 ? (int64_t)c16[k] : (int64_t)c32[k];                                           \
                const float d = VLD(values, k) * s; /* Delta in fp32, as the layout computes it */                     \
                ST(wr, c, LD(wr, c) + (CT)d * (CT)alpha);                                                              \
            }                                                                                                          \
        }                                                                                                              \
    }

/* ---------------------------------------------------------------------------- Dense: one fused pass */
#define DEFINE_DENSE(SUF, WT, LD, ST, CT, DSUF, DT, DLD)                                                               \
    static void dense_##SUF##_##DSUF(WT *w, const DT *d, int64_t i0, int64_t i1, double alpha) {                       \
        const CT a = (CT)alpha;                                                                                        \
        if (alpha == 1.0) {                                                                                            \
            for (int64_t i = i0; i < i1; ++i) ST(w, i, LD(w, i) + (CT)DLD(d, i));                                      \
        } else {                                                                                                       \
            for (int64_t i = i0; i < i1; ++i) ST(w, i, LD(w, i) + (CT)DLD(d, i) * a);                                  \
        }                                                                                                              \
    }

static inline float ld_i8(const int8_t *p, int64_t i) { return (float)p[i]; }

#define FOR_WEIGHTS(M) M(f32, float, ld_f32, st_f32, float) M(f64, double, ld_f64, st_f64, double)                     \
    M(f16, _Float16, ld_f16, st_f16, float) M(bf16, uint16_t, ld_bf16, st_bf16, float)
FOR_WEIGHTS(DEFINE_CODES)
FOR_WEIGHTS(DEFINE_MASK)

#define CSR_FOR_VALUES(SUF, WT, LD, ST, CT) DEFINE_CSR(SUF, WT, LD, ST, CT, f32, float, ld_f32)                        \
    DEFINE_CSR(SUF, WT, LD, ST, CT, f16, _Float16, ld_f16) DEFINE_CSR(SUF, WT, LD, ST, CT, bf16, uint16_t, ld_bf16)    \
    DEFINE_CSR(SUF, WT, LD, ST, CT, i8, int8_t, ld_i8)
FOR_WEIGHTS(CSR_FOR_VALUES)

/* Dense deltas: fp64 values make the compute double, whatever the weight (fp32 weights, exact deltas). */
#define DENSE_FOR_DELTAS(SUF, WT, LD, ST, CT) DEFINE_DENSE(SUF, WT, LD, ST, CT, f32, float, ld_f32)                    \
    DEFINE_DENSE(SUF, WT, LD, ST, CT, f16, _Float16, ld_f16) DEFINE_DENSE(SUF, WT, LD, ST, CT, bf16, uint16_t, ld_bf16)
FOR_WEIGHTS(DENSE_FOR_DELTAS)
DEFINE_DENSE(f32, float, ld_f32d, st_f32d, double, f64, double, ld_f64)
DEFINE_DENSE(f64, double, ld_f64, st_f64, double, f64, double, ld_f64)

/* ------------------------------------------------------------------------------------ AVX-512 paths */
/* 16 fp32 lanes per step for fp32/fp16/bf16 weights (fp64 weights take the portable loops). A plane's two
 * bytes are the lane mask of 16 columns, a 16-entry codebook is one register (permutexvar), and the mask
 * kernel adds and stores only the kept lanes, so columns outside the mask are never written. */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define HAVE_AVX512 1
static inline __m512 v_ld(int wdt, const void *p, __mmask16 k) {
    if (wdt == DT_F32) return _mm512_maskz_loadu_ps(k, p);
    const __m256i h = _mm256_maskz_loadu_epi16(k, p);
    if (wdt == DT_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
static inline void v_st(int wdt, void *p, __mmask16 k, __m512 v) {
    if (wdt == DT_F32) { _mm512_mask_storeu_ps(p, k, v); return; }
    __m256i h;
    if (wdt == DT_F16) {
        h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else { /* bf16: round to nearest even, NaN kept quiet (st_bf16 above, 16 lanes at once) */
        const __m512i u = _mm512_castps_si512(v);
        const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), odd), 16);
        const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
        h = _mm512_cvtepi32_epi16(r);
    }
    _mm256_mask_storeu_epi16(p, k, h);
}
static inline __mmask16 lane_mask(int64_t n) { return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1u); }
static inline unsigned load16(const uint8_t *p, int64_t avail) { return avail >= 2 ? p[0] | (unsigned)p[1] << 8 : p[0]; }

static int codes_avx512(void *w, int64_t wr0, int wdt, int64_t rows, int64_t cols, int64_t r0, int64_t r1,
                        const uint8_t *planes, int bits, const float *book, int64_t book_rows, double alpha) {
    const int64_t rb = (cols + 7) / 8, stride = rows * rb, es = wdt == DT_F32 ? 4 : 2;
    float table[16] = {0};
    for (int64_t r = r0; r < r1; ++r) {
        if (r == r0 || book_rows != 1) {
            const float *cb = book + (book_rows == 1 ? 0 : r) * (1 << bits);
            for (int c = 0; c < 1 << bits; ++c) table[c] = cb[c] * (float)alpha;
        }
        const __m512 t = _mm512_loadu_ps(table);
        char *wr = (char *)w + (r - wr0) * cols * es;
        const uint8_t *p0 = planes + r * rb;
        for (int64_t c0 = 0; c0 < cols; c0 += 16) {
            __m512i code = _mm512_setzero_si512();
            for (int p = 0; p < bits; ++p)
                code = _mm512_mask_or_epi32(code, (__mmask16)load16(p0 + p * stride + c0 / 8, rb - c0 / 8), code,
                                            _mm512_set1_epi32(1 << p));
            const __mmask16 k = lane_mask(cols - c0);
            void *wp = wr + c0 * es;
            v_st(wdt, wp, k, _mm512_add_ps(v_ld(wdt, wp, k), _mm512_permutexvar_ps(code, t)));
        }
    }
    return 0;
}

static int mask_avx512(void *w, int64_t wr0, int wdt, int64_t cols, int64_t r0, int64_t r1, const uint8_t *mask,
                       const uint8_t *signs, int64_t sign_bytes, const int64_t *row_ptr, double scale, double alpha) {
    const int64_t rb = (cols + 7) / 8, es = wdt == DT_F32 ? 4 : 2;
    const float tv = (float)scale * (float)alpha;
    const __m512 plus = _mm512_set1_ps(tv), minus = _mm512_set1_ps(-tv);
    for (int64_t r = r0; r < r1; ++r) {
        char *wr = (char *)w + (r - wr0) * cols * es;
        const uint8_t *mr = mask + r * rb;
        int64_t k = row_ptr[r];
        for (int64_t c0 = 0; c0 < cols; c0 += 64) {
            const uint64_t m = load_word(mr + c0 / 8, rb - c0 / 8);
            if (!m) continue;
            const uint64_t neg = deposit(load_bits(signs, sign_bytes, k), m);
            k += __builtin_popcountll(m);
            for (int q = 0; q < 4; ++q) {
                const __mmask16 kept = (__mmask16)(m >> (16 * q));
                if (!kept) continue;
                void *wp = wr + (c0 + 16 * q) * es;
                const __m512 v = _mm512_mask_blend_ps((__mmask16)(neg >> (16 * q)), plus, minus);
                v_st(wdt, wp, kept, _mm512_add_ps(v_ld(wdt, wp, kept), v));
            }
        }
    }
    return 0;
}
#endif

/* ----------------------------------------------------------------------- out-of-place: dst = src + a·D */
/* With a source (a clean copy W0 of the weight), each block of rows is copied from it and then updated in
 * place while still in L1/L2: one pass over memory for a hot-swap W <- W0 + alpha·Delta, instead of a copy
 * pass and an apply pass. 16 rows of 4096 fp32 = 256 KB. */
enum { BLOCK_ROWS = 16 };
static int64_t elem_size(int wdt) { return wdt == DT_F64 ? 8 : wdt == DT_F32 ? 4 : 2; }
static void copy_rows(void *w, const void *src, int wdt, int64_t wr0, int64_t cols, int64_t a, int64_t b) {
    const int64_t es = elem_size(wdt);
    memcpy((char *)w + (a - wr0) * cols * es, (const char *)src + (a - wr0) * cols * es, (size_t)((b - a) * cols * es));
}
#define BLOCKED(SRC, R0, R1, BODY)                                                                                     \
    for (int64_t b0 = (R0); b0 < (R1); b0 += BLOCK_ROWS) {                                                             \
        const int64_t b1 = b0 + BLOCK_ROWS < (R1) ? b0 + BLOCK_ROWS : (R1);                                            \
        if (SRC) copy_rows(w, SRC, wdt, wr0, cols, b0, b1);                                                             \
        BODY;                                                                                                          \
    }

/* ------------------------------------------------------------------------------- exported entries */
#define DISPATCH_W(WDT, CALL)                                                                                          \
    switch (WDT) {                                                                                                     \
        case DT_F32: CALL(f32, float); return 0;                                                                       \
        case DT_F64: CALL(f64, double); return 0;                                                                      \
        case DT_F16: CALL(f16, _Float16); return 0;                                                                    \
        case DT_BF16: CALL(bf16, uint16_t); return 0;                                                                  \
        default: return -1;                                                                                            \
    }

static int codes_rows(void *w, int64_t wr0, int wdt, int64_t rows, int64_t cols, int64_t r0, int64_t r1,
                      const uint8_t *planes, int bits, const float *book, int64_t book_rows, double alpha) {
#ifdef HAVE_AVX512
    if (bits <= 4 && wdt != DT_F64) return codes_avx512(w, wr0, wdt, rows, cols, r0, r1, planes, bits, book, book_rows, alpha);
#endif
#define CALL_CODES(S, T) codes_##S((T *)w, wr0, rows, cols, r0, r1, planes, bits, book, book_rows, alpha)
    DISPATCH_W(wdt, CALL_CODES)
}

int dh_apply_codes(void *w, const void *src, int64_t wr0, int wdt, int64_t rows, int64_t cols, int64_t r0, int64_t r1,
                   const uint8_t *planes, int bits, const float *book, int64_t book_rows, double alpha) {
    if (bits < 1 || bits > 8 || elem_size(wdt) == 0) return -2;
    int rc = 0;
    BLOCKED(src, r0, r1, rc |= codes_rows(w, wr0, wdt, rows, cols, b0, b1, planes, bits, book, book_rows, alpha))
    return rc;
}

static int mask_rows(void *w, int64_t wr0, int wdt, int64_t cols, int64_t r0, int64_t r1, const uint8_t *mask,
                     const uint8_t *signs, int64_t sign_bytes, const int64_t *row_ptr, double scale, double alpha) {
#ifdef HAVE_AVX512
    if (wdt != DT_F64) return mask_avx512(w, wr0, wdt, cols, r0, r1, mask, signs, sign_bytes, row_ptr, scale, alpha);
#endif
#define CALL_MASK(S, T) mask_##S((T *)w, wr0, cols, r0, r1, mask, signs, sign_bytes, row_ptr, scale, alpha)
    DISPATCH_W(wdt, CALL_MASK)
}

int dh_apply_mask(void *w, const void *src, int64_t wr0, int wdt, int64_t cols, int64_t r0, int64_t r1,
                  const uint8_t *mask, const uint8_t *signs, int64_t sign_bytes, const int64_t *row_ptr, double scale,
                  double alpha) {
    int rc = 0;
    BLOCKED(src, r0, r1, rc |= mask_rows(w, wr0, wdt, cols, b0, b1, mask, signs, sign_bytes, row_ptr, scale, alpha))
    return rc;
}

static int csr_rows(void *w, int64_t wr0, int wdt, int64_t cols, int64_t r0, int64_t r1, const int64_t *row_ptr,
                    const void *colidx, int cdt, const void *values, int vdt, double scale, double alpha) {
    if (cdt != DT_U16 && cdt != DT_I32) return -2;
    const int col16 = cdt == DT_U16;
#define CSR_V(S, T, VS, VT) csr_##S##_##VS((T *)w, wr0, cols, r0, r1, row_ptr, colidx, col16, (const VT *)values, scale, alpha)
#define CALL_CSR(S, T)                                                                                                 \
    switch (vdt) {                                                                                                     \
        case DT_F32: CSR_V(S, T, f32, float); break;                                                                   \
        case DT_F16: CSR_V(S, T, f16, _Float16); break;                                                                \
        case DT_BF16: CSR_V(S, T, bf16, uint16_t); break;                                                              \
        case DT_I8: CSR_V(S, T, i8, int8_t); break;                                                                    \
        default: return -2;                                                                                            \
    }
    DISPATCH_W(wdt, CALL_CSR)
}

int dh_apply_csr(void *w, const void *src, int64_t wr0, int wdt, int64_t cols, int64_t r0, int64_t r1,
                 const int64_t *row_ptr, const void *colidx, int cdt, const void *values, int vdt, double scale,
                 double alpha) {
    int rc = 0;
    BLOCKED(src, r0, r1, rc |= csr_rows(w, wr0, wdt, cols, b0, b1, row_ptr, colidx, cdt, values, vdt, scale, alpha))
    return rc;
}

static int dense_range(void *w, int wdt, const void *d, int ddt, int64_t i0, int64_t i1, double alpha) {
    if (ddt == DT_F64) {
        if (wdt == DT_F32) { dense_f32_f64((float *)w, (const double *)d, i0, i1, alpha); return 0; }
        if (wdt == DT_F64) { dense_f64_f64((double *)w, (const double *)d, i0, i1, alpha); return 0; }
        return -2; /* fp16/bf16 weights with fp64 deltas: the torch path handles them */
    }
#define D_V(S, T, DS, DT_) dense_##S##_##DS((T *)w, (const DT_ *)d, i0, i1, alpha)
#define CALL_DENSE(S, T)                                                                                               \
    switch (ddt) {                                                                                                     \
        case DT_F32: D_V(S, T, f32, float); break;                                                                     \
        case DT_F16: D_V(S, T, f16, _Float16); break;                                                                  \
        case DT_BF16: D_V(S, T, bf16, uint16_t); break;                                                                \
        default: return -2;                                                                                            \
    }
    DISPATCH_W(wdt, CALL_DENSE)
}

int dh_apply_dense(void *w, const void *src, int wdt, const void *d, int ddt, int64_t i0, int64_t i1, double alpha) {
    const int64_t wr0 = 0, cols = 1; /* elements as rows of one column, blocks of 64 K elements */
    int rc = 0;
    for (int64_t b0 = i0; b0 < i1; b0 += 65536) {
        const int64_t b1 = b0 + 65536 < i1 ? b0 + 65536 : i1;
        if (src) copy_rows(w, src, wdt, wr0, cols, b0, b1);
        rc |= dense_range(w, wdt, d, ddt, b0, b1, alpha);
    }
    return rc;
}

int dh_abi_version(void) { return 4; }

/* Fused CPU kernel of the Gated CNN block's token mixer (kernels/native.py compiles it at first use).

   mo_gate_dwconv: for every pixel of a channels-last [B, H, W, *] map, in place on the activated gate g,
       g[..., :ni]       *= id                                   (the identity channels)
       g[..., ni:ni+cc]  *= bias + depthwise_conv_kxk(c)         (the conv channels; zero padding k/2, stride 1)
   which `_gated_onednn` (kernels/cpu.py) does in three passes: the conv into a new map, then two products.
   One pass here: the conv's output never goes to memory. Sums are float32 whatever the storage (float32 or
   bfloat16, rounded to nearest even once, at the store).

   Plain C with GCC/Clang vector extensions, so the compiler picks the instructions for the CPU it compiles on
   (-march=native); OpenMP threads over image rows, in the OpenMP runtime torch has loaded. */
#include <stdint.h>
#include <string.h>

#define VL 16 /* float32 lanes per vector: one AVX-512 register, two AVX2 ones */
typedef float vf __attribute__((vector_size(VL * 4)));
typedef uint32_t vu __attribute__((vector_size(VL * 4)));
typedef int32_t vi __attribute__((vector_size(VL * 4)));
typedef uint16_t vh __attribute__((vector_size(VL * 2)));

static inline vf ld_f32(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void st_f32(float *p, vf v) { memcpy(p, &v, sizeof v); }
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

static inline vf ld_bf16(const uint16_t *p) {
#if defined(__AVX512F__) /* one widening load; the generic form below compiles to two halves */
    return (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16);
#else
    vh h; memcpy(&h, p, sizeof h);
    vu u = __builtin_convertvector(h, vu) << 16;
    vf v; memcpy(&v, &u, sizeof v); return v;
#endif
}
static inline void st_bf16(uint16_t *p, vf v) {
#if defined(__AVX512BF16__) && defined(__AVX512VL__) /* the instruction rounds the same way, NaN included */
    __m256bh h = _mm512_cvtneps_pbh((__m512)v);
    memcpy(p, &h, sizeof h);
#else
    vu u; memcpy(&u, &v, sizeof u);
    vu nan = (vu)(v != v);                               /* NaN stays a quiet NaN; the rest rounds to nearest even */
    u = ((u + 0x7fffu + ((u >> 16) & 1u)) & ~nan) | (0x7fc00000u & nan);
    vh h = __builtin_convertvector(u >> 16, vh); memcpy(p, &h, sizeof h);
#endif
}
static inline float s_ld_bf16(const uint16_t *p) { uint32_t u = (uint32_t)*p << 16; float f; memcpy(&f, &u, 4); return f; }
static inline void s_st_bf16(uint16_t *p, float f) {
    uint32_t u; memcpy(&u, &f, 4);
    *p = f != f ? 0x7fc0 : (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* element (pixel, channel) of a map whose pixel rows are `stride` elements apart */
#define AT(base, pix, stride, ch) ((base) + (int64_t)(pix) * (stride) + (ch))

static inline __attribute__((always_inline)) vf vload(int bf, const void *p, int64_t i) {
    return bf ? ld_bf16((const uint16_t *)p + i) : ld_f32((const float *)p + i);
}
static inline __attribute__((always_inline)) void vstore(int bf, void *p, int64_t i, vf v) {
    if (bf) st_bf16((uint16_t *)p + i, v); else st_f32((float *)p + i, v);
}
static inline __attribute__((always_inline)) float sload(int bf, const void *p, int64_t i) {
    return bf ? s_ld_bf16((const uint16_t *)p + i) : ((const float *)p)[i];
}
static inline __attribute__((always_inline)) void sstore(int bf, void *p, int64_t i, float v) {
    if (bf) s_st_bf16((uint16_t *)p + i, v); else ((float *)p)[i] = v;
}

#define NB_MAX 8
#define K_MAX 7

/* NB output pixels w0..w0+NB-1 of row (b, h), channels ch..ch+VL-1: each input vector is loaded once per kernel
   row and used by every output it reaches; the K weights of the kernel row stay in registers. */
static inline __attribute__((always_inline)) void conv_block(
    int bf, const int K, const int NB, const int inside, void *g, int64_t gs, const void *c, int64_t cs,
    const float *w, const float *bias, int H, int W, int ni, int cc, int b, int h, int w0, int ch)
{
    const int P = K / 2;
    vf acc[NB_MAX]; /* fixed sizes, no variable-length arrays: unrolled, they live in registers */
    vf b0 = bias ? ld_f32(bias + ch) : (vf){0};
#pragma GCC unroll 16
    for (int j = 0; j < NB; j++) acc[j] = b0;
    for (int kh = 0; kh < K; kh++) {
        int ih = h + kh - P;
        if (ih < 0 || ih >= H) continue;
        int64_t row = ((int64_t)b * H + ih) * W;
        vf wk[K_MAX];
#pragma GCC unroll 16
        for (int kw = 0; kw < K; kw++) wk[kw] = ld_f32(w + (int64_t)(kh * K + kw) * cc + ch);
#pragma GCC unroll 32
        for (int t = 0; t < NB + K - 1; t++) {
            int iw = w0 - P + t;
            if (!inside && (iw < 0 || iw >= W)) continue;  /* `inside`: the caller checked every column */
            vf x = vload(bf, c, (row + iw) * cs + ch);
#pragma GCC unroll 16
            for (int j = 0; j < NB; j++) {
                int kw = t - j;
                if (kw >= 0 && kw < K) acc[j] += x * wk[kw];
            }
        }
    }
    int64_t out = ((int64_t)b * H + h) * W + w0;
#pragma GCC unroll 16
    for (int j = 0; j < NB; j++) {
        int64_t at = (out + j) * gs + ni + ch;
        vstore(bf, g, at, vload(bf, g, at) * acc[j]);
    }
}

/* the same for one pixel and one channel (channel counts that are not a multiple of VL) */
static inline __attribute__((always_inline)) void conv_scalar(
    int bf, int K, void *g, int64_t gs, const void *c, int64_t cs, const float *w, const float *bias,
    int H, int W, int ni, int cc, int b, int h, int x0, int ch)
{
    const int P = K / 2;
    float acc = bias ? bias[ch] : 0.f;
    for (int kh = 0; kh < K; kh++) {
        int ih = h + kh - P;
        if (ih < 0 || ih >= H) continue;
        for (int kw = 0; kw < K; kw++) {
            int iw = x0 + kw - P;
            if (iw < 0 || iw >= W) continue;
            acc += sload(bf, c, (((int64_t)b * H + ih) * W + iw) * cs + ch) * w[(int64_t)(kh * K + kw) * cc + ch];
        }
    }
    int64_t at = (((int64_t)b * H + h) * W + x0) * gs + ni + ch;
    sstore(bf, g, at, sload(bf, g, at) * acc);
}

static inline __attribute__((always_inline)) void gate_row(
    int bf, const int K, void *g, int64_t gs, const void *id, int64_t is, const void *c, int64_t cs,
    const float *w, const float *bias, int H, int W, int ni, int cc, int b, int h)
{
    const int P = K / 2;
    int vec = cc - cc % VL;
    /* the row in nearly equal blocks of at most NB_MAX pixels (14 = 7 + 7, not 8 + 6 x 1): wide blocks reuse
       each loaded input vector more */
    int nblk = (W + NB_MAX - 1) / NB_MAX, w0 = 0;
    for (int blk = 0; blk < nblk; blk++) {
        int nb = W / nblk + (blk < W % nblk);
        int inside = w0 >= P && w0 + nb - 1 + P < W;
        for (int ch = 0; ch < vec; ch += VL) {
#define BLOCK(N)                                                                                                  \
    case N:                                                                                                       \
        if (inside) conv_block(bf, K, N, 1, g, gs, c, cs, w, bias, H, W, ni, cc, b, h, w0, ch);                 \
        else conv_block(bf, K, N, 0, g, gs, c, cs, w, bias, H, W, ni, cc, b, h, w0, ch);                        \
        break;
            switch (nb) { BLOCK(1) BLOCK(2) BLOCK(3) BLOCK(4) BLOCK(5) BLOCK(6) BLOCK(7) BLOCK(8) }
#undef BLOCK
        }
        w0 += nb;
    }
    for (int x0 = 0; x0 < W && vec < cc; x0++)
        for (int ch = vec; ch < cc; ch++) conv_scalar(bf, K, g, gs, c, cs, w, bias, H, W, ni, cc, b, h, x0, ch);
    if (ni == 0) return;
    int ivec = ni - ni % VL;
    for (int x0 = 0; x0 < W; x0++) {
        int64_t pix = ((int64_t)b * H + h) * W + x0;
        int ch = 0;
        for (; ch < ivec; ch += VL)
            vstore(bf, g, pix * gs + ch, vload(bf, g, pix * gs + ch) * vload(bf, id, pix * is + ch));
        for (; ch < ni; ch++) sstore(bf, g, pix * gs + ch, sload(bf, g, pix * gs + ch) * sload(bf, id, pix * is + ch));
    }
}

/* one function per storage type, so that `bf` is a constant inside the OpenMP region (outlined before inlining) */
#define GATE_ALL(NAME, BF)                                                                                       \
    static void NAME(void *g, int64_t gs, const void *id, int64_t is, const void *c, int64_t cs, const float *w,   \
                     const float *bias, int B, int H, int W, int ni, int cc, int k, int threads)                 \
    {                                                                                                            \
        _Pragma("omp parallel for schedule(static) num_threads(threads) if (threads > 1)")                       \
        for (int r = 0; r < B * H; r++) {                                                                        \
            int b = r / H, h = r % H;                                                                            \
            if (k == 7) gate_row(BF, 7, g, gs, id, is, c, cs, w, bias, H, W, ni, cc, b, h);                       \
            else { /* other kernel sizes: correct, not fast */                                                   \
                for (int x0 = 0; x0 < W; x0++)                                                                   \
                    for (int ch = 0; ch < cc; ch++)                                                              \
                        conv_scalar(BF, k, g, gs, c, cs, w, bias, H, W, ni, cc, b, h, x0, ch);                  \
                gate_row(BF, 1, g, gs, id, is, c, cs, w, bias, H, W, ni, 0, b, h);                              \
            }                                                                                                    \
        }                                                                                                        \
    }
GATE_ALL(gate_all_f32, 0)
GATE_ALL(gate_all_bf16, 1)

/* bf16 != 0: g, id and c hold bfloat16; else float32. Strides (between pixels) in elements; w is [k, k, cc]
   float32; bias float32 or NULL; id NULL when ni is 0. `threads`: torch's thread count (the caller's OpenMP
   setting is per thread, and a thread torch never ran a parallel region in has the default). */
void mo_gate_dwconv(int bf16, void *g, int64_t gs, const void *id, int64_t is, const void *c, int64_t cs,
                    const float *w, const float *bias, int B, int H, int W, int ni, int cc, int k, int threads)
{
    if (bf16) gate_all_bf16(g, gs, id, is, c, cs, w, bias, B, H, W, ni, cc, k, threads);
    else gate_all_f32(g, gs, id, is, c, cs, w, bias, B, H, W, ni, cc, k, threads);
}

/* ---- Vector math: broadcast, exp, the exact GELU ---------------------------------------------------------------- */

/* every lane `a`. Written as a list, not `(vf){0} + a`: that form makes GCC add 0 in a scalar register and then
   broadcast the register (a shuffle-port instruction that competes with the second FMA unit of Intel's AVX-512
   cores: the matmul ran at half oneDNN's speed on an Ice Lake Xeon); this one becomes the FMA's broadcast operand */
static inline vf splat(float a) { return (vf){a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a}; }
_Static_assert(VL == 16, "splat lists VL lanes");
static inline vf as_f(vi v) { vf f; memcpy(&f, &v, sizeof f); return f; }
static inline vi as_i(vf f) { vi v; memcpy(&v, &f, sizeof v); return v; }

/* exp(x) for x <= 0 (below -87 taken as -87, exp ~ 1.6e-38): 2^n * e^r, n = round(x / ln 2), |r| <= ln 2 / 2, e^r
   by its Taylor polynomial to r^6 (relative error below 3e-7) */
static inline vf exp_nonpos(vf x) {
    vi low = x < -87.f;
    x = as_f((as_i(x) & ~low) | (as_i(splat(-87.f)) & low));
    vf n = x * 1.44269504088896341f + 12582912.f; /* 1.5 * 2^23: the sum's low bits are round(x / ln 2) */
    vi ni = as_i(n) - 0x4B400000;
    n -= 12582912.f;
    vf r = x - n * 0.693145751953125f - n * 1.428606765330187e-6f; /* ln 2 in two parts */
    vf p = splat(1.f / 720);
    p = p * r + 1.f / 120; p = p * r + 1.f / 24; p = p * r + 1.f / 6; p = p * r + 0.5f; p = p * r + 1.f; p = p * r + 1.f;
    return p * as_f((ni + 127) << 23);
}

/* 1 / d for d >= 1: on AVX-512 the 14-bit estimate and one Newton step (error below 1e-7 relative, against a
   division that issues once per 10 cycles on Intel cores); elsewhere the division */
static inline vf recip(vf d) {
#if defined(__AVX512F__)
    vf r = (vf)_mm512_rcp14_ps((__m512)d);
    return r * (2.f - d * r);
#else
    return 1.f / d;
#endif
}

/* exact GELU, x * Phi(x) = (x + |x| erf(|x| / sqrt 2)) / 2, erf by Abramowitz & Stegun 7.1.26 (absolute error below
   1.5e-7; torch's and oneDNN's exact GELU within float rounding of it) */
static inline vf gelu_erf(vf v) {
    vf a = as_f(as_i(v) & 0x7fffffff);
    vi small = a < 10.f; /* erf(z) rounds to 1 from 10 / sqrt 2 on: capped there, no inf below (NaN: v carries it) */
    vf z = as_f((as_i(a) & small) | (as_i(splat(10.f)) & ~small)) * 0.70710678118654752f;
    vf t = recip(1.f + 0.3275911f * z);
    vf q = splat(1.061405429f);
    q = q * t - 1.453152027f; q = q * t + 1.421413741f; q = q * t - 0.284496736f; q = q * t + 0.254829592f;
    vf erf = 1.f - q * t * exp_nonpos(-z * z);
    return 0.5f * (v + a * erf);
}

/* ---- LayerNorm over the last dimension ----------------------------------------------------------------------------

   mo_layer_norm: y[r, :] = (x[r, :] - mean) / sqrt(var + eps) * w + b for `rows` rows of C channels; x's rows are
   `xs` elements apart, y's are contiguous. float32 mean and variance (two passes over the row, from a float32 copy
   in registers or L1), whatever the storage; bf16 output rounded once. torch's bf16 LayerNorm is slow on rows shorter
   than a few vectors (24 and 48 channels: femto's stem and first stage), its float32 one is not. gelu != 0: the
   exact GELU of each normalised value before the store (the stem's norm and activation in one pass). */

#define C_MAX 4096 /* longer rows: the caller uses torch's */

/* the first n < VL elements at p[i], the other lanes 0; and the store of the first n lanes */
static inline __attribute__((always_inline)) vf load_part(int bf, const void *p, int64_t i, int n) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
    __mmask16 m = (__mmask16)((1u << n) - 1);
    if (bf) return (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, (const uint16_t *)p + i)), 16);
    return (vf)_mm512_maskz_loadu_ps(m, (const float *)p + i);
#else
    union { float f[VL]; uint16_t h[VL]; } tmp;
    memset(&tmp, 0, sizeof tmp);
    memcpy(&tmp, (const char *)p + i * (bf ? 2 : 4), (size_t)n * (bf ? 2 : 4));
    return bf ? ld_bf16(tmp.h) : ld_f32(tmp.f);
#endif
}
static inline __attribute__((always_inline)) void store_part(int bf, void *p, int64_t i, int n, vf v) {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__) && defined(__AVX512VL__)
    __mmask16 m = (__mmask16)((1u << n) - 1);
    if (bf) _mm256_mask_storeu_epi16((uint16_t *)p + i, m, (__m256i)_mm512_cvtneps_pbh((__m512)v));
    else _mm512_mask_storeu_ps((float *)p + i, m, (__m512)v);
#else
    union { float f[VL]; uint16_t h[VL]; } tmp;
    if (bf) st_bf16(tmp.h, v); else st_f32(tmp.f, v);
    memcpy((char *)p + i * (bf ? 2 : 4), &tmp, (size_t)n * (bf ? 2 : 4));
#endif
}
static inline float hsum(vf v) {
#if defined(__AVX512F__)
    return _mm512_reduce_add_ps((__m512)v);
#else
    float s = 0.f;
    for (int l = 0; l < VL; l++) s += v[l];
    return s;
#endif
}

static inline __attribute__((always_inline)) void norm_row(int bf, int gelu, const void *x, void *y, const float *w,
                                                           const float *b, int C, float eps, float *buf)
{
    int nv = (C + VL - 1) / VL, full = C / VL, rest = C - full * VL;
    vf sum = (vf){0};
    for (int v = 0; v < full; v++) {
        vf t = vload(bf, x, (int64_t)v * VL);
        st_f32(buf + v * VL, t);
        sum += t;
    }
    if (rest) { /* the last partial vector, zero-filled: no read past the row */
        vf t = load_part(bf, x, (int64_t)full * VL, rest);
        st_f32(buf + full * VL, t);
        sum += t;
    }
    float mean = hsum(sum) / (float)C;
    vf sq = (vf){0};
    for (int v = 0; v < nv; v++) {
        vf d = ld_f32(buf + v * VL) - mean;
        if (v == full) { /* pad lanes hold 0, not the mean: leave them out */
            vi lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
            d = (vf)((vi)d & (lane < rest));
        }
        sq += d * d;
    }
    float var = hsum(sq);
    float rstd = 1.f / __builtin_sqrtf(var / (float)C + eps);
    for (int v = 0; v < full; v++) {
        vf t = (ld_f32(buf + v * VL) - mean) * rstd * ld_f32(w + v * VL);
        if (b) t += ld_f32(b + v * VL);
        if (gelu) t = gelu_erf(t);
        vstore(bf, y, (int64_t)v * VL, t);
    }
    if (rest) {
        vf t = (ld_f32(buf + full * VL) - mean) * rstd * load_part(0, w, (int64_t)full * VL, rest);
        if (b) t += load_part(0, b, (int64_t)full * VL, rest);
        if (gelu) t = gelu_erf(t);
        store_part(bf, y, (int64_t)full * VL, rest, t);
    }
}

#define NORM_ALL(NAME, BF, GELU)                                                                                 \
    static void NAME(const void *x, int64_t xs, void *y, const float *w, const float *b, int64_t rows, int C,    \
                     float eps, int threads)                                                                     \
    {                                                                                                            \
        _Pragma("omp parallel num_threads(threads) if (threads > 1)")                                            \
        {                                                                                                        \
            float buf[C_MAX + VL] __attribute__((aligned(64)));                                                  \
            _Pragma("omp for schedule(static)")                                                                  \
            for (int64_t r = 0; r < rows; r++)                                                                   \
                norm_row(BF, GELU, (const char *)x + r * xs * ((BF) ? 2 : 4), (char *)y + r * C * ((BF) ? 2 : 4), \
                         w, b, C, eps, buf);                                                                     \
        }                                                                                                        \
    }
NORM_ALL(norm_all_f32, 0, 0)
NORM_ALL(norm_all_bf16, 1, 0)
NORM_ALL(norm_gelu_all_f32, 0, 1)
NORM_ALL(norm_gelu_all_bf16, 1, 1)

/* bf16 != 0: x and y hold bfloat16, else float32; w and b float32 (b may be NULL); C <= C_MAX. */
void mo_layer_norm(int bf16, int gelu, const void *x, int64_t xs, void *y, const float *w, const float *b,
                   int64_t rows, int C, float eps, int threads)
{
    if (gelu) {
        if (bf16) norm_gelu_all_bf16(x, xs, y, w, b, rows, C, eps, threads);
        else norm_gelu_all_f32(x, xs, y, w, b, rows, C, eps, threads);
    } else {
        if (bf16) norm_all_bf16(x, xs, y, w, b, rows, C, eps, threads);
        else norm_all_f32(x, xs, y, w, b, rows, C, eps, threads);
    }
}

/* ---- Linear: y = x @ W^T + bias (+ res) ------------------------------------------------------------------------------

   mo_linear: the block's matmuls without a library call's fixed cost (oneDNN's is 15-25 us a call here, whatever the
   size). W comes packed by the caller (kernels/native.py `pack_linear`) in panels of NR = 32 output columns,
   zero-padded: float32 [panels][K][32]; bfloat16 [panels][K/2][32][2], pairs of k, the operand layout of
   AVX512-BF16's dot product. bias: float32, padded to panels * 32 (zeros without one). x: M rows `xs` elements
   apart, each K contiguous; res (or NULL) and y: rows `rs` and `ys` apart, N contiguous. float32 sums, a bf16 store
   rounded once. A tile is MR <= 12 rows by one panel: 24 vector accumulators, each weight vector loaded once per k
   and used by every row of the tile. */

#define NR 32
#define MR_MAX 12

static inline __attribute__((always_inline)) void lin_tile(
    int bf, const int MR, const int NV, int gelu, const void *x, int64_t xs, const void *wp, int64_t K,
    const float *bias, const void *res, int64_t rs, void *y, int64_t ys, int ncols)
{
    vf acc[MR_MAX][2];
#pragma GCC unroll 12
    for (int r = 0; r < MR; r++) { acc[r][0] = (vf){0}; acc[r][1] = (vf){0}; }
    if (!bf) {
        const float *xp = (const float *)x, *bp = (const float *)wp;
        for (int64_t k = 0; k < K; k++) {
            vf w0 = ld_f32(bp + k * NR), w1 = NV == 2 ? ld_f32(bp + k * NR + VL) : w0;
#pragma GCC unroll 12
            for (int r = 0; r < MR; r++) {
                vf a = splat(xp[r * xs + k]);
                acc[r][0] += a * w0;
                if (NV == 2) acc[r][1] += a * w1;
            }
        }
    } else {
        const uint16_t *xp = (const uint16_t *)x, *bp = (const uint16_t *)wp;
#if defined(__AVX512BF16__)
        for (int64_t k2 = 0; k2 < K / 2; k2++) {
            __m512bh w0 = (__m512bh)_mm512_loadu_si512(bp + k2 * 2 * NR);
            __m512bh w1 = (__m512bh)_mm512_loadu_si512(bp + k2 * 2 * NR + 2 * VL);
#pragma GCC unroll 12
            for (int r = 0; r < MR; r++) {
                int32_t pair;
                memcpy(&pair, xp + r * xs + 2 * k2, 4);
                __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
                acc[r][0] = (vf)_mm512_dpbf16_ps((__m512)acc[r][0], a, w0);
                if (NV == 2) acc[r][1] = (vf)_mm512_dpbf16_ps((__m512)acc[r][1], a, w1);
            }
        }
#else /* the same pairs widened to float32: bf16 -> f32 is a shift */
        for (int64_t k2 = 0; k2 < K / 2; k2++) {
            vu u0, u1;
            memcpy(&u0, bp + k2 * 2 * NR, sizeof u0);
            memcpy(&u1, bp + k2 * 2 * NR + 2 * VL, sizeof u1);
            vu e0 = u0 << 16, o0 = u0 & 0xffff0000u, e1 = u1 << 16, o1 = u1 & 0xffff0000u;
            vf we0, wo0, we1, wo1;
            memcpy(&we0, &e0, sizeof we0); memcpy(&wo0, &o0, sizeof wo0);
            memcpy(&we1, &e1, sizeof we1); memcpy(&wo1, &o1, sizeof wo1);
#pragma GCC unroll 12
            for (int r = 0; r < MR; r++) {
                vf a0 = splat(s_ld_bf16(xp + r * xs + 2 * k2)), a1 = splat(s_ld_bf16(xp + r * xs + 2 * k2 + 1));
                acc[r][0] += a0 * we0 + a1 * wo0;
                if (NV == 2) acc[r][1] += a0 * we1 + a1 * wo1;
            }
        }
#endif
    }
    int n0 = ncols < VL ? ncols : VL, n1 = ncols - n0; /* columns in the first and second vector */
    vf b0 = ld_f32(bias), b1 = ld_f32(bias + VL);        /* added after the sum, as BLAS and oneDNN do */
#pragma GCC unroll 12
    for (int r = 0; r < MR; r++) {
        acc[r][0] += b0;
        acc[r][1] += b1;
        if (gelu) { acc[r][0] = gelu_erf(acc[r][0]); if (NV == 2) acc[r][1] = gelu_erf(acc[r][1]); }
        if (NV == 2 && ncols == NR) {
            if (res) { acc[r][0] += vload(bf, res, r * rs); acc[r][1] += vload(bf, res, r * rs + VL); }
            vstore(bf, y, r * ys, acc[r][0]);
            vstore(bf, y, r * ys + VL, acc[r][1]);
            continue;
        }
        if (res) acc[r][0] += load_part(bf, res, r * rs, n0);
        if (n0 == VL) vstore(bf, y, r * ys, acc[r][0]); else store_part(bf, y, r * ys, n0, acc[r][0]);
        if (NV == 2 && n1 > 0) {
            if (res) acc[r][1] += load_part(bf, res, r * rs + VL, n1);
            store_part(bf, y, r * ys + VL, n1, acc[r][1]);
        }
    }
}

#define LIN_ALL(NAME, BF)                                                                                        \
    static void NAME(int gelu, const void *x, int64_t xs, const void *wp, const float *bias, const void *res,     \
                     int64_t rs, void *y, int64_t ys, int64_t M, int64_t K, int64_t N, int threads)              \
    {                                                                                                            \
        const int es = (BF) ? 2 : 4;                                                                             \
        int64_t panels = (N + NR - 1) / NR, blocks = (M + MR_MAX - 1) / MR_MAX;                                  \
        _Pragma("omp parallel for collapse(2) schedule(static) num_threads(threads) if (threads > 1)")           \
        for (int64_t p = 0; p < panels; p++) {                                                                   \
            for (int64_t rb = 0; rb < blocks; rb++) {                                                            \
                int64_t r0 = rb * MR_MAX, c0 = p * NR;                                                           \
                int rows = (int)(M - r0 < MR_MAX ? M - r0 : MR_MAX), ncols = (int)(N - c0 < NR ? N - c0 : NR);   \
                const char *xp = (const char *)x + r0 * xs * es;                                                 \
                const char *bp = (const char *)wp + p * K * NR * es;                                            \
                const char *rp = res ? (const char *)res + (r0 * rs + c0) * es : NULL;                           \
                char *yp = (char *)y + (r0 * ys + c0) * es;                                                      \
                int nv = ncols > VL ? 2 : 1;                                                                     \
                switch (rows * 2 + nv - 1) {                                                                     \
                    TILES(BF)                                                                                    \
                }                                                                                                \
            }                                                                                                    \
        }                                                                                                        \
    }
#define TILE(BF, R, V)                                                                                           \
    case R * 2 + V - 1: lin_tile(BF, R, V, gelu, xp, xs, bp, K, bias + c0, rp, rs, yp, ys, ncols); break;
#define TILES(BF)                                                                                                \
    TILE(BF, 1, 1) TILE(BF, 1, 2) TILE(BF, 2, 1) TILE(BF, 2, 2) TILE(BF, 3, 1) TILE(BF, 3, 2) TILE(BF, 4, 1)    \
    TILE(BF, 4, 2) TILE(BF, 5, 1) TILE(BF, 5, 2) TILE(BF, 6, 1) TILE(BF, 6, 2) TILE(BF, 7, 1) TILE(BF, 7, 2)    \
    TILE(BF, 8, 1) TILE(BF, 8, 2) TILE(BF, 9, 1) TILE(BF, 9, 2) TILE(BF, 10, 1) TILE(BF, 10, 2)                 \
    TILE(BF, 11, 1) TILE(BF, 11, 2) TILE(BF, 12, 1) TILE(BF, 12, 2)
LIN_ALL(lin_all_f32, 0)
LIN_ALL(lin_all_bf16, 1)

/* bf16 != 0: x, W, res and y hold bfloat16 (K even), else float32; see the section's comment for the layouts.
   gelu != 0: the exact GELU of x @ W^T + bias (before res, which the block's gate matmul has none of). */
void mo_linear(int bf16, int gelu, const void *x, int64_t xs, const void *wp, const float *bias, const void *res,
               int64_t rs, void *y, int64_t ys, int64_t M, int64_t K, int64_t N, int threads)
{
    if (gelu) {
        if (bf16) lin_all_bf16(1, x, xs, wp, bias, res, rs, y, ys, M, K, N, threads);
        else lin_all_f32(1, x, xs, wp, bias, res, rs, y, ys, M, K, N, threads);
    } else {
        if (bf16) lin_all_bf16(0, x, xs, wp, bias, res, rs, y, ys, M, K, N, threads);
        else lin_all_f32(0, x, xs, wp, bias, res, rs, y, ys, M, K, N, threads);
    }
}

/* ---- a whole block in one call ----------------------------------------------------------------------------------
   The Gated CNN block whose activation is the exact GELU and whose fc2 adds the residual (no LayerScale, no drop
   path), as kernels/cpu.py's `_gated_native` computes it step by step, with the same calls in the same order (so
   the same bits), without a return to Python between them:
       xn = layer_norm(x);  g = gelu(xn @ Wg^T + bg);  ic = xn @ Wic^T + bic;
       g[..., :ni] *= ic[..., :ni];  g[..., ni:] *= dwconv(ic[..., ni:]);  y = x + g @ W2^T + b2
   x, y: [B, H, W, C] contiguous (y must not be x); ws: rows * (C + 2 * hidden) elements of x's dtype (xn, g, ic);
   the weights packed by `native.pack_linear` (fc1's gate rows, its identity-and-conv rows, fc2), the norm's and the
   conv's ([k, k, cc]) as float32. */
void mo_block(int bf16, const void *x, void *y, void *ws, const float *nw, const float *nb, float eps,
              const void *wg, const float *bg, const void *wic, const float *bic, const float *cw, const float *cb,
              const void *w2, const float *b2, int B, int H, int W, int C, int hidden, int cc, int k, int threads)
{
    const int64_t rows = (int64_t)B * H * W;
    const int64_t es = bf16 ? 2 : 4, ni = hidden - cc;
    char *xn = ws, *g = xn + rows * C * es, *ic = g + rows * hidden * es;
    mo_layer_norm(bf16, 0, x, C, xn, nw, nb, rows, C, eps, threads);
    mo_linear(bf16, 1, xn, C, wg, bg, NULL, 0, g, hidden, rows, C, hidden, threads);
    mo_linear(bf16, 0, xn, C, wic, bic, NULL, 0, ic, hidden, rows, C, hidden, threads);
    mo_gate_dwconv(bf16, g, hidden, ic, hidden, ic + ni * es, hidden, cw, cb, B, H, W, (int)ni, cc, k, threads);
    mo_linear(bf16, 0, g, hidden, w2, b2, x, C, y, C, rows, hidden, C, threads);
}

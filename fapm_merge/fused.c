/* The fused FAPM pass over one slice of a (W_pre, W_ft) pair: score, classify against the
 * bracket [lo, hi], and write what is kept, in one loop per element.
 *
 * The torch path (fapm_merge/kernel.py, _FapmScorer.of and _scan) makes about twenty passes
 * over float32 buffers per slice; this makes one. Every element goes through exactly the
 * float32 operations of that path, in the same order, each rounded on its own (built with
 * -ffp-contract=off and no fast-math, so no fused multiply-add), hence bit-identical scores:
 *
 *     b = float(W_pre); change = |float(W_ft) - b|
 *     factor = max((1 / |b|) * neg_mean + 1, lowest float32)     (neg_mean: float32(-mean))
 *     score = factor * change
 *
 * Elements with score > hi are kept; those with lo <= score <= hi are candidates, returned
 * with their flat indices in ascending order for the exact selection in Python.
 *
 * No Python or torch headers: built with the system's C compiler on first use and loaded
 * with ctypes (fapm_merge/native.py), which releases the GIL, so slices run on threads.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 2048 /* scores of one block stay in L1 between the two loops */

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
/* one build for every x86-64 CPU, with an AVX2 version picked at load time */
#define VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define VECTOR_CLONES
#endif

static inline float from_bf16(uint16_t bits) {
    uint32_t wide = (uint32_t)bits << 16;
    float value;
    memcpy(&value, &wide, sizeof value);
    return value;
}

static inline float from_f32(float value) { return value; }

/* Scores of one block into `scores`, the kept elements into `out` (or `keep`), and a 0/1
 * flag per element into `inside` (lo <= score <= hi); returns the number kept, and clears
 * *finite on a NaN or infinite |dW|. No branch: the compiler vectorizes it. */
#define SCORE_BLOCK(NAME, T, LOAD)                                                          \
    VECTOR_CLONES static int64_t NAME(const T *base, const T *ft, int64_t m, float neg_mean, \
                                      float lo, float hi, T *out, uint8_t *keep,            \
                                      float *scores, uint8_t *inside, int32_t *finite) {    \
        int64_t kept = 0;                                                                   \
        int32_t ok = 1;                                                                     \
        for (int64_t i = 0; i < m; i++) {                                                   \
            float b = LOAD(base[i]);                                                        \
            float change = fabsf(LOAD(ft[i]) - b);                                          \
            float factor = 1.0f / fabsf(b);                                                 \
            factor = factor * neg_mean;                                                     \
            factor = factor + 1.0f;                                                         \
            factor = factor < -FLT_MAX ? -FLT_MAX : factor;                                 \
            float score = factor * change;                                                  \
            ok &= change <= FLT_MAX; /* false for NaN and inf */                            \
            int32_t above = score > hi;                                                     \
            kept += above;                                                                  \
            scores[i] = score;                                                              \
            inside[i] = (uint8_t)((score >= lo) & !above);                                  \
            if (out) out[i] = above ? ft[i] : base[i];                                      \
            else keep[i] = (uint8_t)above;                                                  \
        }                                                                                   \
        *finite &= ok;                                                                      \
        return kept;                                                                        \
    }

SCORE_BLOCK(score_block_bf16, uint16_t, from_bf16)
SCORE_BLOCK(score_block_f32, float, from_f32)

/* The flagged elements of one block, in ascending order, into values / indices. Candidates
 * are rare (about 1% of a tensor), so the flags are read eight at a time and a word with
 * none is skipped; a branch per element would cost more than scoring it. */
static int64_t collect(const float *scores, const uint8_t *inside, int64_t m, int64_t first,
                       float *values, int64_t *indices) {
    int64_t count = 0;
#if defined(__GNUC__) && defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    for (int64_t w = 0; w < m; w += 8) {
        uint64_t word;
        memcpy(&word, inside + w, sizeof word);
        while (word) { /* lowest set byte first: the lowest index (little-endian) */
            int64_t i = w + __builtin_ctzll(word) / 8;
            values[count] = scores[i];
            indices[count++] = first + i;
            word &= word - 1;
        }
    }
#else
    for (int64_t i = 0; i < m; i++) {
        values[count] = scores[i];
        indices[count] = first + i;
        count += inside[i];
    }
#endif
    return count;
}

/* One slice of n elements starting at flat index `offset`. dtype: 0 bfloat16, 1 float32.
 * `out` (same dtype, may be NULL) gets where(kept, W_ft, W_pre); otherwise `keep` gets the
 * kept flags (0/1). `values` / `indices` (room for n each) get the candidates. Returns the
 * number of candidates; *above gets the number kept, *finite 0 if |dW| is not finite. */
int64_t fapm_fused_slice(const void *base, const void *ft, int32_t dtype, int64_t n,
                         float neg_mean, float lo, float hi, void *out, uint8_t *keep,
                         float *values, int64_t *indices, int64_t offset, int64_t *above,
                         int32_t *finite) {
    float scores[BLOCK];
    uint8_t inside[BLOCK + 8]; /* 8 spare flags, always 0, so the scan reads whole words */
    int64_t count = 0, kept = 0;
    *finite = 1;
    for (int64_t start = 0; start < n; start += BLOCK) {
        int64_t m = n - start < BLOCK ? n - start : BLOCK;
        uint8_t *keep_block = keep ? keep + start : NULL;
        if (dtype == 0) {
            const uint16_t *b = (const uint16_t *)base + start, *f = (const uint16_t *)ft + start;
            uint16_t *o = out ? (uint16_t *)out + start : NULL;
            kept += score_block_bf16(b, f, m, neg_mean, lo, hi, o, keep_block, scores, inside,
                                     finite);
        } else {
            const float *b = (const float *)base + start, *f = (const float *)ft + start;
            float *o = out ? (float *)out + start : NULL;
            kept += score_block_f32(b, f, m, neg_mean, lo, hi, o, keep_block, scores, inside,
                                    finite);
        }
        memset(inside + m, 0, 8);
        count += collect(scores, inside, m, offset + start, values + count, indices + count);
    }
    *above = kept;
    return count;
}

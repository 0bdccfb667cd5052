/* fast_elem.h — the per-element math of nora_fast, shared by the CPU (fast_cpu.c) and CUDA (fast_cuda.cu) code.
 *
 * Every function here is NORA_HD: `__host__ __device__` under nvcc, `static inline` in C. The CPU loops and the
 * CUDA kernels differ only in how they walk (b, v) / (b, t, d); what happens to one element is written once.
 *
 *   select:  nf_penalize (transformers' RepetitionPenaltyLogitsProcessor in float32)
 *            nf_allowed  (automaton: the id's bytes continue the pending char and exactly T*D coefficients stay
 *                         reachable: reach[total - done - adv[q, v], nxt[q, v]])
 *            nf_best_*   (argmax with NaN detection; ties to the lowest key = model id / row; mergeable, so a
 *                         CUDA reduction over chunks gives the same answer as one sequential scan)
 *   margin:  nf_top2_* / nf_scan_gap (top-2 gap of the penalised scores over all rows and over the allowed ids:
 *                         multi-token decoding's tie guard, CPU only)
 *   decode:  nf_decode_seq (ids -> bytes -> strict UTF-8 (Unicode 15, table 3-7) -> code points + min_token)
 *            nf_action     (one (t, d): sum_k basis[t, k] * coeff[k, d] / scale in float64, then the program)
 */
#ifndef NORA_FAST_ELEM_H
#define NORA_FAST_ELEM_H

#include <math.h>
#include <stdint.h>

#include "nora_fast.h"

#if defined(__CUDACC__)
#define NORA_HD __host__ __device__ __forceinline__
#elif defined(NORA_CUDA_SHIM)
#define NORA_HD static inline
#else
#define NORA_HD static inline
#endif

#define NF_KEY_NONE INT32_MAX

/* Raw pointers (host or device) and sizes: what one kernel/loop needs. Passed by value to CUDA kernels. */
typedef struct {
  int32_t V, N, min_token, alphabet_max, T, D, Q, n_rows, total;
  double scale;
  const int32_t* offsets;     /* (V+1,) */
  const uint8_t* bytes;       /* (N,) */
  const int32_t* adv;         /* (Q, V) */
  const int32_t* nxt;         /* (Q, V) */
  const uint8_t* reach;       /* (total+1, Q) */
  const int32_t* head_ids;    /* (n_rows,) */
  const int32_t* action_rows; /* (V,) */
  const double* basis;        /* (T, T) DCT-III */
  const int32_t* prog_start;  /* (n_programs,) first op of each program */
  const int32_t* prog_len;    /* (n_programs,) */
  const nora_fast_op* ops;
  int32_t n_programs;
} nf_view;

/* ---- selection ------------------------------------------------------------------------------------------ */
NORA_HD float nf_penalize(float logit, int seen, float penalty) {
  /* torch: score = where(score < 0, score * penalty, score / penalty) on float32 */
  if (!seen) return logit;
  return logit < 0.0f ? logit * penalty : logit / penalty;
}

NORA_HD int nf_state_ok(const nf_view* v, int32_t done, int32_t pending) {
  return done >= 0 && done <= v->total && pending >= 0 && pending < v->Q;
}

/* 1 iff FAST id `id` may follow state (done, pending); the state must be nf_state_ok. */
NORA_HD int nf_allowed(const nf_view* v, int32_t done, int32_t pending, int32_t id) {
  int64_t k = (int64_t)pending * v->V + id;
  int32_t next = v->nxt[k];
  if (next >= v->Q || next < 0) return 0;
  int32_t rest = v->total - done - v->adv[k];
  if (rest < 0) return 0;
  return v->reach[(int64_t)rest * v->Q + next] != 0;
}

typedef struct {
  float score;   /* best score so far (-inf before any) */
  int32_t key;   /* its tie key (lower wins among equal scores) */
  int32_t index; /* its index (FAST id or row), -1 before any */
  int32_t count; /* candidates pushed */
  int32_t nan;   /* 1 if any candidate was NaN (numpy's max would be NaN) */
} nf_best;

NORA_HD nf_best nf_best_init(void) {
  nf_best b;
  b.score = -INFINITY;
  b.key = NF_KEY_NONE;
  b.index = -1;
  b.count = 0;
  b.nan = 0;
  return b;
}

NORA_HD int nf_better(float score, int32_t key, float best, int32_t best_key) {
  return score > best || (score == best && key < best_key);
}

NORA_HD void nf_best_push(nf_best* b, float score, int32_t key, int32_t index) {
  b->count += 1;
  if (isnan(score)) {
    b->nan = 1;
  } else if (nf_better(score, key, b->score, b->key)) {
    b->score = score;
    b->key = key;
    b->index = index;
  }
}

NORA_HD void nf_best_merge(nf_best* b, const nf_best* o) {
  b->count += o->count;
  b->nan |= o->nan;
  if (o->index >= 0 && nf_better(o->score, o->key, b->score, b->key)) {
    b->score = o->score;
    b->key = o->key;
    b->index = o->index;
  }
}

/* numpy: best = scores.max(); raise unless isfinite(best) */
NORA_HD int nf_best_finite(const nf_best* b) {
  return !b->nan && b->index >= 0 && isfinite(b->score);
}

/* Scan FAST ids [lo, hi) of one row: allowed ids only, penalised scores, ties to the lowest action row. */
NORA_HD void nf_scan_allowed(const nf_view* v, const float* logits, const uint8_t* seen, float penalty,
                             int32_t done, int32_t pending, int32_t lo, int32_t hi, nf_best* b) {
  for (int32_t id = lo; id < hi; ++id) {
    if (!nf_allowed(v, done, pending, id)) continue;
    int32_t row = v->action_rows[id];
    float s = nf_penalize(logits[row], seen ? seen[row] : 0, penalty);
    nf_best_push(b, s, row, id);
  }
}

/* Scan rows [lo, hi) of one row's logits: the model's own top choice, ties to the lowest model id. */
NORA_HD void nf_scan_top(const nf_view* v, const float* logits, const uint8_t* seen, float penalty, int32_t lo,
                         int32_t hi, nf_best* b) {
  for (int32_t row = lo; row < hi; ++row) {
    float s = nf_penalize(logits[row], seen ? seen[row] : 0, penalty);
    nf_best_push(b, s, v->head_ids[row], row);
  }
}

/* Final status of one row from its two scans (top: NULL when not requested), python's order of checks. */
NORA_HD int32_t nf_select_status(const nf_best* top, const nf_best* allowed) {
  if (top && !nf_best_finite(top)) return NORA_FAST_SEL_TOP_NOT_FINITE;
  if (allowed->count == 0) return NORA_FAST_SEL_NO_ALLOWED;
  if (!nf_best_finite(allowed)) return NORA_FAST_SEL_NOT_FINITE;
  return NORA_FAST_SEL_OK;
}

/* ---- margin (multi-token decoding's tie guard; nora_edge/multitoken.py check_margin) --------------------- */
/* The two largest of a stream of float32 scores, as numpy's np.partition(values, n - 2)[-2:] gives them: a NaN
 * anywhere makes the gap NaN (numpy sorts NaN last), fewer than 2 values make it +inf. */
typedef struct {
  float first, second; /* largest, second largest (duplicates count: two equal maxima give gap 0) */
  int32_t count;
  int32_t nan;
} nf_top2;

NORA_HD nf_top2 nf_top2_init(void) {
  nf_top2 t;
  t.first = -INFINITY;
  t.second = -INFINITY;
  t.count = 0;
  t.nan = 0;
  return t;
}

NORA_HD void nf_top2_push(nf_top2* t, float s) {
  t->count += 1;
  if (isnan(s)) {
    t->nan = 1;
  } else if (s > t->first) {
    t->second = t->first;
    t->first = s;
  } else if (s > t->second) {
    t->second = s;
  } /* else s is -inf or below second; second starting at -inf keeps [x, -inf] -> +inf, [-inf, -inf] -> NaN */
}

/* |first - second| in float32 (numpy subtracts the two np.float32 values); NaN / +inf as described above. */
NORA_HD float nf_top2_gap(const nf_top2* t) {
  if (t->count < 2) return INFINITY;
  if (t->nan) return NAN;
  return t->first - t->second; /* first >= second: >= 0, or NaN for inf - inf / -inf - -inf */
}

/* Top-2 of one row's penalised scores over every head row (a) and over the FAST ids the automaton allows (b). */
NORA_HD void nf_scan_gap(const nf_view* v, const float* logits, const uint8_t* seen, float penalty, int32_t done,
                         int32_t pending, nf_top2* all_rows, nf_top2* allowed) {
  for (int32_t row = 0; row < v->n_rows; ++row)
    nf_top2_push(all_rows, nf_penalize(logits[row], seen ? seen[row] : 0, penalty));
  for (int32_t id = 0; id < v->V; ++id) {
    if (!nf_allowed(v, done, pending, id)) continue;
    int32_t row = v->action_rows[id];
    nf_top2_push(allowed, nf_penalize(logits[row], seen ? seen[row] : 0, penalty));
  }
}

/* ---- decode ----------------------------------------------------------------------------------------------- */
/* Strict UTF-8 (well-formed sequences of Unicode table 3-7: no overlongs, surrogates or > U+10FFFF). */
typedef struct {
  int32_t need;  /* continuation bytes still expected */
  int32_t cp;    /* code point being built */
  int32_t lower; /* allowed range of the next continuation byte */
  int32_t upper;
} nf_utf8;

/* Feed one byte: 1 = a char completed (*cp set), 0 = need more, -1 = invalid. */
NORA_HD int nf_utf8_step(nf_utf8* u, uint32_t byte, int32_t* cp) {
  if (u->need == 0) {
    if (byte < 0x80) {
      *cp = (int32_t)byte;
      return 1;
    }
    u->lower = 0x80;
    u->upper = 0xBF;
    if (byte >= 0xC2 && byte <= 0xDF) {
      u->need = 1;
      u->cp = (int32_t)(byte & 0x1F);
    } else if (byte >= 0xE0 && byte <= 0xEF) {
      u->need = 2;
      u->cp = (int32_t)(byte & 0x0F);
      if (byte == 0xE0) u->lower = 0xA0;
      if (byte == 0xED) u->upper = 0x9F;
    } else if (byte >= 0xF0 && byte <= 0xF4) {
      u->need = 3;
      u->cp = (int32_t)(byte & 0x07);
      if (byte == 0xF0) u->lower = 0x90;
      if (byte == 0xF4) u->upper = 0x8F;
    } else {
      return -1;
    }
    return 0;
  }
  if ((int32_t)byte < u->lower || (int32_t)byte > u->upper) return -1;
  u->lower = 0x80;
  u->upper = 0xBF;
  u->cp = (u->cp << 6) | (int32_t)(byte & 0x3F);
  if (--u->need == 0) {
    *cp = u->cp;
    return 1;
  }
  return 0;
}

/* Decode one id sequence into integer coefficients (written only when the status is OK and coeffs != NULL).
 * Checks in nora_edge's order: every id in range; the whole byte string strict UTF-8; every code point inside
 * the alphabet; exactly T*D of them. *error_pos: index of the id holding the first problem (-1 if none/count). */
NORA_HD int32_t nf_decode_seq(const nf_view* v, const int32_t* ids, int32_t length, int32_t* coeffs,
                              int32_t* error_pos) {
  *error_pos = -1;
  for (int32_t i = 0; i < length; ++i) {
    if (ids[i] < 0 || ids[i] >= v->V) {
      *error_pos = i;
      return NORA_FAST_SEQ_ID_OUT_OF_RANGE;
    }
  }
  nf_utf8 u;
  u.need = 0;
  u.cp = 0;
  u.lower = 0x80;
  u.upper = 0xBF;
  int32_t count = 0, char_id = 0, alpha_pos = -1;
  for (int32_t i = 0; i < length; ++i) {
    int32_t lo = v->offsets[ids[i]], hi = v->offsets[ids[i] + 1];
    for (int32_t k = lo; k < hi; ++k) {
      if (u.need == 0) char_id = i; /* the id holding the char's first byte */
      int32_t cp = 0;
      int r = nf_utf8_step(&u, v->bytes[k], &cp);
      if (r < 0) {
        *error_pos = char_id;
        return NORA_FAST_SEQ_INVALID_UTF8;
      }
      if (r == 1) {
        if (cp > v->alphabet_max) {
          if (alpha_pos < 0) alpha_pos = char_id;
        } else if (coeffs && count < v->total) {
          coeffs[count] = cp + v->min_token; /* in int32: checked at context creation */
        }
        count += 1;
      }
    }
  }
  if (u.need != 0) {
    *error_pos = char_id;
    return NORA_FAST_SEQ_INVALID_UTF8;
  }
  if (alpha_pos >= 0) {
    *error_pos = alpha_pos;
    return NORA_FAST_SEQ_COEFF_OUT_OF_RANGE;
  }
  if (count != v->total) return NORA_FAST_SEQ_WRONG_COUNT;
  return NORA_FAST_SEQ_OK;
}

NORA_HD double nf_apply_op(const nora_fast_op* op, double x) {
  switch (op->code) {
    case NORA_FAST_OP_RANGE:
      return 0.5 * (x + 1.0) * (op->b - op->a) + op->a;
    case NORA_FAST_OP_AFFINE:
      return x * op->a + op->b;
    case NORA_FAST_OP_SCALE:
      return x * op->a;
    default: /* NORA_FAST_OP_SIGN */
      return x > 0.0 ? 1.0 : (x < 0.0 ? -1.0 : (x == 0.0 ? 0.0 : x));
  }
}

/* Action (t, d) of one sequence from its (T*D,) integer coefficients: float64 iDCT, then program (-1: none). */
NORA_HD double nf_action(const nf_view* v, const int32_t* coeffs, int32_t t, int32_t d, int32_t program) {
  double acc = 0.0;
  for (int32_t k = 0; k < v->T; ++k) {
    acc += v->basis[t * v->T + k] * ((double)coeffs[k * v->D + d] / v->scale);
  }
  if (program >= 0) {
    const nora_fast_op* ops = v->ops + v->prog_start[program];
    for (int32_t i = 0; i < v->prog_len[program]; ++i) {
      if (ops[i].dim == d) acc = nf_apply_op(&ops[i], acc);
    }
  }
  return acc;
}

#endif /* NORA_FAST_ELEM_H */

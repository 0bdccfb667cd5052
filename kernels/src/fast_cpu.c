/* fast_cpu.c — the CPU implementation of nora_fast_select / nora_fast_decode (host pointers).
 *
 * select: for each row b: check the state, scan every head row for the model's top choice (optional), scan the
 *   allowed FAST ids (penalised scores, ties to the lowest head row), status in nora-edge's order, advance the
 *   automaton and mark the chosen row as seen.
 * decode: for each sequence b: nf_decode_seq (ids -> strict UTF-8 -> integer coefficients, status) then every
 *   (t, d) through nf_action (float64 iDCT + post-processing program) -> float32; a failed sequence gets NaN.
 * admissible / gap (since 1.2, multi-token decoding): walk proposed ids through the automaton (nf_allowed, the
 *   select path's test); the top-2 gaps of one row's penalised scores (nf_scan_gap).
 * The per-element code is fast_elem.h, shared with the CUDA kernels.
 */
#include <stdlib.h>
#include <string.h>

#include "fast_ctx.h"

static int check_common(const nora_fast_ctx* ctx, int batch, const char* fn) {
  if (!ctx) return nf_fail(NORA_FAST_E_ARGUMENT, "%s: NULL context", fn);
  if (batch < 0) return nf_fail(NORA_FAST_E_ARGUMENT, "%s: batch %d < 0", fn, batch);
  return NORA_FAST_OK;
}

int nora_fast_select(const nora_fast_ctx* ctx, int batch, const float* logits, int64_t row_stride, uint8_t* seen,
                     float penalty, int32_t* done, int32_t* pending, int32_t* out_id, int32_t* out_top,
                     int32_t* status) {
  int rc = check_common(ctx, batch, "nora_fast_select");
  if (rc) return rc;
  const nf_view* v = &ctx->host;
  if (batch > 0 && (!logits || !done || !pending || !out_id || !status))
    return nf_fail(NORA_FAST_E_ARGUMENT, "nora_fast_select: NULL logits, done, pending, out_id or status");
  if (row_stride < v->n_rows)
    return nf_fail(NORA_FAST_E_ARGUMENT, "nora_fast_select: row_stride %lld < the head's %d rows",
                   (long long)row_stride, v->n_rows);
  if (!(penalty > 0.0f)) return nf_fail(NORA_FAST_E_ARGUMENT, "nora_fast_select: penalty %g must be > 0", penalty);
  int penalise = seen != NULL && penalty != 1.0f;
  int failed = 0;
  for (int b = 0; b < batch; ++b) {
    const float* row_logits = logits + (int64_t)b * row_stride;
    uint8_t* row_seen = penalise ? seen + (int64_t)b * row_stride : NULL;
    out_id[b] = -1;
    if (out_top) out_top[b] = -1;
    if (!nf_state_ok(v, done[b], pending[b])) {
      status[b] = NORA_FAST_SEL_BAD_STATE;
      ++failed;
      continue;
    }
    nf_best top = nf_best_init(), allowed = nf_best_init();
    if (out_top) {
      nf_scan_top(v, row_logits, row_seen, penalty, 0, v->n_rows, &top);
      out_top[b] = top.index;
    }
    nf_scan_allowed(v, row_logits, row_seen, penalty, done[b], pending[b], 0, v->V, &allowed);
    status[b] = nf_select_status(out_top ? &top : NULL, &allowed);
    if (status[b] != NORA_FAST_SEL_OK) {
      ++failed;
      continue;
    }
    int32_t id = allowed.index;
    int64_t k = (int64_t)pending[b] * v->V + id;
    out_id[b] = id;
    done[b] += v->adv[k];
    pending[b] = v->nxt[k];
    if (row_seen) row_seen[v->action_rows[id]] = 1;
  }
  if (failed) return nf_fail(NORA_FAST_E_ROWS, "nora_fast_select: %d of %d rows failed (see status)", failed, batch);
  nf_ok();
  return NORA_FAST_OK;
}

/* decode into float32 (actions) or float64 (actions64) outputs; `name` names the public call in messages */
static int decode_into(const nora_fast_ctx* ctx, int batch, const int32_t* ids, int64_t id_stride,
                       const int32_t* lengths, int program, float* actions, double* actions64, int32_t* coeffs,
                       int32_t* status, int32_t* error_pos, const char* name) {
  int rc = check_common(ctx, batch, name);
  if (rc) return rc;
  const nf_view* v = &ctx->host;
  if (batch > 0 && (!ids || !lengths || !status))
    return nf_fail(NORA_FAST_E_ARGUMENT, "%s: NULL ids, lengths or status", name);
  if (program < -1 || program >= v->n_programs)
    return nf_fail(NORA_FAST_E_ARGUMENT, "%s: program %d outside [-1, %d)", name, program, v->n_programs);
  for (int b = 0; b < batch; ++b)
    if (lengths[b] < 0 || lengths[b] > id_stride)
      return nf_fail(NORA_FAST_E_ARGUMENT, "%s: lengths[%d] = %d outside [0, id_stride %lld]", name, b,
                     lengths[b], (long long)id_stride);
  int32_t total = v->total;
  int32_t* tmp = (int32_t*)malloc((size_t)total * sizeof(int32_t));
  if (!tmp) return nf_fail(NORA_FAST_E_NO_MEMORY, "%s: out of memory", name);
  int failed = 0;
  for (int b = 0; b < batch; ++b) {
    int32_t pos = -1;
    int32_t st = nf_decode_seq(v, ids + (int64_t)b * id_stride, lengths[b], tmp, &pos);
    float* act = actions ? actions + (int64_t)b * total : NULL;
    double* act64 = actions64 ? actions64 + (int64_t)b * total : NULL;
    if (st == NORA_FAST_SEQ_OK && (act || act64)) {
      for (int32_t t = 0; t < v->T && st == NORA_FAST_SEQ_OK; ++t) {
        for (int32_t d = 0; d < v->D; ++d) {
          double x = nf_action(v, tmp, t, d, program);
          if (act) {
            float xf = (float)x;
            act[t * v->D + d] = xf;
            if (!isfinite(xf)) st = NORA_FAST_SEQ_NOT_FINITE;
          } else {
            act64[t * v->D + d] = x;
            if (!isfinite(x)) st = NORA_FAST_SEQ_NOT_FINITE;
          }
        }
      }
    }
    if (st != NORA_FAST_SEQ_OK) {
      ++failed;
      if (act)
        for (int32_t i = 0; i < total; ++i) act[i] = NAN;
      if (act64)
        for (int32_t i = 0; i < total; ++i) act64[i] = NAN;
    }
    if (coeffs) {
      int32_t* c = coeffs + (int64_t)b * total;
      if (st == NORA_FAST_SEQ_OK) memcpy(c, tmp, (size_t)total * sizeof(int32_t));
      else memset(c, 0, (size_t)total * sizeof(int32_t));
    }
    status[b] = st;
    if (error_pos) error_pos[b] = pos;
  }
  free(tmp);
  if (failed)
    return nf_fail(NORA_FAST_E_ROWS, "%s: %d of %d sequences failed (see status)", name, failed, batch);
  nf_ok();
  return NORA_FAST_OK;
}

int nora_fast_decode(const nora_fast_ctx* ctx, int batch, const int32_t* ids, int64_t id_stride,
                     const int32_t* lengths, int program, float* actions, int32_t* coeffs, int32_t* status,
                     int32_t* error_pos) {
  return decode_into(ctx, batch, ids, id_stride, lengths, program, actions, NULL, coeffs, status, error_pos,
                     "nora_fast_decode");
}

int nora_fast_decode_f64(const nora_fast_ctx* ctx, int batch, const int32_t* ids, int64_t id_stride,
                         const int32_t* lengths, int program, double* actions, int32_t* coeffs, int32_t* status,
                         int32_t* error_pos) {
  return decode_into(ctx, batch, ids, id_stride, lengths, program, NULL, actions, coeffs, status, error_pos,
                     "nora_fast_decode_f64");
}

int nora_fast_admissible(const nora_fast_ctx* ctx, int32_t done, int32_t pending, const int32_t* ids, int n,
                         int32_t* out_count, int32_t* out_done, int32_t* out_pending) {
  if (!ctx || !out_count || n < 0 || (n > 0 && !ids))
    return nf_fail(NORA_FAST_E_ARGUMENT, "nora_fast_admissible: NULL ctx / out_count / ids or n %d < 0", n);
  const nf_view* v = &ctx->host;
  if (!nf_state_ok(v, done, pending))
    return nf_fail(NORA_FAST_E_ARGUMENT, "nora_fast_admissible: state (%d, %d) outside the automaton", done,
                   pending);
  int32_t keep = 0;
  for (; keep < n; ++keep) {
    int32_t id = ids[keep];
    if ((done == v->total && pending == 0) || id < 0 || id >= v->V || !nf_allowed(v, done, pending, id)) break;
    int64_t k = (int64_t)pending * v->V + id;
    done += v->adv[k];
    pending = v->nxt[k];
  }
  *out_count = keep;
  if (out_done) *out_done = done;
  if (out_pending) *out_pending = pending;
  nf_ok();
  return NORA_FAST_OK;
}

int nora_fast_gap(const nora_fast_ctx* ctx, const float* logits, const uint8_t* seen, float penalty, int32_t done,
                  int32_t pending, float* gap_all, float* gap_allowed) {
  if (!ctx || !logits || !gap_all || !gap_allowed)
    return nf_fail(NORA_FAST_E_ARGUMENT, "nora_fast_gap: NULL ctx, logits, gap_all or gap_allowed");
  if (!(penalty > 0.0f)) return nf_fail(NORA_FAST_E_ARGUMENT, "nora_fast_gap: penalty %g must be > 0", penalty);
  const nf_view* v = &ctx->host;
  if (!nf_state_ok(v, done, pending))
    return nf_fail(NORA_FAST_E_ARGUMENT, "nora_fast_gap: state (%d, %d) outside the automaton", done, pending);
  nf_top2 all_rows = nf_top2_init(), allowed = nf_top2_init();
  nf_scan_gap(v, logits, penalty != 1.0f ? seen : NULL, penalty, done, pending, &all_rows, &allowed);
  *gap_all = nf_top2_gap(&all_rows);
  *gap_allowed = nf_top2_gap(&allowed);
  nf_ok();
  return NORA_FAST_OK;
}

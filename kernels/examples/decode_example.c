/* decode_example.c — firmware-style use of libnora_fast: constrained selection step by step, then decode.
 *
 *   decode_example <native_dir> <logits.f32> [unnorm_key]
 *
 * Data flow: codec/native/ --nora_fast_ctx_open--> context; <logits.f32> holds (steps, n_rows) little-endian
 * float32 action-head logits, one row per decode step (what the decoder graph would produce) --nora_fast_select
 * from the start state (done 0, pending 0), one row per step, until exactly T*D coefficients are complete-->
 * FAST ids --nora_fast_decode (program of unnorm_key; without a key: the only program, or normalized actions
 * when the bundle has none)--> (T, D) actions.
 * The file must hold enough rows: running out before the chunk completes is an error (no padding).
 * Output: "ids N: i0 i1 ...", "status NAME", then T lines "t a0 a1 ..." (%.9g). Exit 0 on success.
 */
#include <stdio.h>
#include <stdlib.h>

#include "nora_fast.h"

static int fail(const char* what, int rc) {
  fprintf(stderr, "decode_example: %s failed (error %d): %s\n", what, rc, nora_fast_last_error());
  return 1;
}

int main(int argc, char** argv) {
  if (argc < 3 || argc > 4) {
    fprintf(stderr, "usage: %s <native_dir> <logits.f32> [unnorm_key]\n", argv[0]);
    return 2;
  }
  nora_fast_ctx* ctx = NULL;
  int rc = nora_fast_ctx_open(argv[1], &ctx);
  if (rc != NORA_FAST_OK) return fail("nora_fast_ctx_open", rc);
  nora_fast_info info;
  rc = nora_fast_ctx_info(ctx, &info);
  if (rc != NORA_FAST_OK) {
    nora_fast_ctx_free(ctx);
    return fail("nora_fast_ctx_info", rc);
  }
  int program = -1, err = NORA_FAST_OK;
  if (argc == 4 || info.n_programs > 0) {
    program = nora_fast_program(ctx, argc == 4 ? argv[3] : NULL, &err);
    if (program < 0) {
      nora_fast_ctx_free(ctx);
      return fail("nora_fast_program", err);
    }
  }
  int32_t total = info.time_horizon * info.action_dim;
  float* row = (float*)malloc((size_t)info.n_rows * sizeof(float));
  int32_t* ids = (int32_t*)malloc((size_t)info.max_ids * sizeof(int32_t));
  float* actions = (float*)malloc((size_t)total * sizeof(float));
  FILE* f = fopen(argv[2], "rb");
  int status = 1;
  if (!row || !ids || !actions || !f) {
    fprintf(stderr, "decode_example: %s\n", f ? "out of memory" : "cannot open the logits file");
    goto done;
  }
  int32_t done_coeffs = 0, pending = 0, n = 0;
  while (!(done_coeffs == total && pending == 0)) {
    if (n >= info.max_ids) {
      fprintf(stderr, "decode_example: no complete chunk within %d ids\n", info.max_ids);
      goto done;
    }
    if (fread(row, sizeof(float), (size_t)info.n_rows, f) != (size_t)info.n_rows) {
      fprintf(stderr, "decode_example: the logits file ran out after %d rows, before the chunk completed"
              " (%d of %d coefficients)\n", n, done_coeffs, total);
      goto done;
    }
    int32_t id = -1, sel = -1;
    rc = nora_fast_select(ctx, 1, row, info.n_rows, NULL, 1.0f, &done_coeffs, &pending, &id, NULL, &sel);
    if (rc != NORA_FAST_OK) {
      fprintf(stderr, "decode_example: step %d: status %s\n", n, nora_fast_sel_status_name(sel));
      fail("nora_fast_select", rc);
      goto done;
    }
    ids[n++] = id;
  }
  int32_t length = n, seq_status = -1, error_pos = -1;
  rc = nora_fast_decode(ctx, 1, ids, n, &length, program, actions, NULL, &seq_status, &error_pos);
  printf("ids %d:", n);
  for (int32_t i = 0; i < n; ++i) printf(" %d", ids[i]);
  printf("\nstatus %s\n", nora_fast_seq_status_name(seq_status));
  if (rc != NORA_FAST_OK) {
    fprintf(stderr, "decode_example: error position %d\n", error_pos);
    fail("nora_fast_decode", rc);
    goto done;
  }
  for (int32_t t = 0; t < info.time_horizon; ++t) {
    printf("%d", t);
    for (int32_t d = 0; d < info.action_dim; ++d) printf(" %.9g", (double)actions[t * info.action_dim + d]);
    printf("\n");
  }
  status = 0;
done:
  if (f) fclose(f);
  free(row);
  free(ids);
  free(actions);
  nora_fast_ctx_free(ctx);
  return status;
}

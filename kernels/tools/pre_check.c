/* pre_check.c — run nora_edge_preprocess on raw RGB frames and write the float32 pixel values; then the API
 * misuse checks. Built plain (`make -C kernels check-edge`) and under ASan + UBSan (`make -C kernels asan-edge`).
 *
 *   pre_check [cases.txt] [--frames-only]
 *
 * cases.txt (written by tests/kernels/test_edge_preprocess.py), one frame per line:
 *   <name> <rgb_path> <height> <width> <stride> <out_height> <out_width> <out_path>
 * The rgb file holds exactly (height - 1) * stride + width * 3 bytes (the last row has no padding) and is read
 * into a buffer of exactly that size, and `out` is exactly nora_edge_pixel_values_size() floats, so a read or
 * write one byte out of bounds is an AddressSanitizer report. Spec: NORA's (patch 14, temporal 2, merge 2, CLIP
 * mean/std) at out_height x out_width. The values go to <out_path> (little-endian float32, (gh*gw, 1176)); the
 * test compares them bitwise with numpy and Pillow + transformers.
 *
 * Output: "PASS|FAIL pre <name> <floats>" per frame, "PASS|FAIL misuse api <checks>", "PASS|FAIL total <count>"
 * (frames + misuse checks). Exit status 0 only when everything passed. --frames-only skips the misuse checks
 * (callgrind counts of nora_edge_preprocess on the frames alone: bench/edge_preprocess_bench.py).
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nora_edge.h"

#define LINE_LEN 8192
#define SENTINEL 0x7fc0dead /* a NaN bit pattern the library never writes */

static int n_failed = 0;

static nora_edge_image_spec nora_spec(int32_t h, int32_t w) {
    nora_edge_image_spec s = {h, w, 14, 2, 2, {0.48145466f, 0.4578275f, 0.40821073f},
                              {0.26862954f, 0.26130258f, 0.27577711f}};
    return s;
}

/* Read exactly `size` bytes of `path` into a buffer of exactly that size (NULL on any mismatch). */
static uint8_t *read_exact(const char *path, size_t size) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        return NULL;
    }
    uint8_t *buf = malloc(size ? size : 1);
    size_t got = buf ? fread(buf, 1, size, f) : 0;
    int extra = fgetc(f) != EOF;
    fclose(f);
    if (!buf || got != size || extra) {
        free(buf);
        return NULL;
    }
    return buf;
}

static int run_case(const char *line) {
    char name[256], rgb_path[4000], out_path[4000];
    long h, w, oh, ow;
    unsigned long long stride;
    if (sscanf(line, "%255s %3999s %ld %ld %llu %ld %ld %3999s", name, rgb_path, &h, &w, &stride, &oh, &ow,
               out_path) != 8 || h < 1 || w < 1 || stride < (unsigned long long)w * 3) {
        printf("FAIL pre bad-line 0 (%s)\n", line);
        return 0;
    }
    const size_t size = (size_t)(h - 1) * (size_t)stride + (size_t)w * 3;
    uint8_t *rgb = read_exact(rgb_path, size);
    nora_edge_image_spec spec = nora_spec((int32_t)oh, (int32_t)ow);
    const size_t n = nora_edge_pixel_values_size(&spec);
    float *out = n ? malloc(n * sizeof *out) : NULL;
    int64_t grid[3] = {-1, -1, -1};
    int ok = 0;
    if (!rgb) {
        printf("FAIL pre %s 0 (cannot read %zu bytes from %s)\n", name, size, rgb_path);
    } else if (!out) {
        printf("FAIL pre %s 0 (size %zu: %s)\n", name, n, nora_edge_last_error());
    } else {
        nora_edge_status st =
            nora_edge_preprocess(rgb, (int32_t)h, (int32_t)w, (size_t)stride, &spec, out, n, grid);
        FILE *f = st == NORA_EDGE_OK ? fopen(out_path, "wb") : NULL;
        if (st != NORA_EDGE_OK) {
            printf("FAIL pre %s 0 (status %d: %s)\n", name, (int)st, nora_edge_last_error());
        } else if (grid[0] != 1 || grid[1] != oh / 14 || grid[2] != ow / 14) {
            printf("FAIL pre %s 0 (grid %lld %lld %lld)\n", name, (long long)grid[0], (long long)grid[1],
                   (long long)grid[2]);
        } else if (!f || fwrite(out, sizeof *out, n, f) != n) {
            printf("FAIL pre %s 0 (cannot write %s)\n", name, out_path);
        } else {
            printf("PASS pre %s %zu\n", name, n);
            ok = 1;
        }
        if (f) {
            fclose(f);
        }
    }
    free(out);
    free(rgb);
    return ok;
}

/* One misuse call: status must be `want`, the message must contain `needle`, out and grid untouched. */
static int expect(const char *what, nora_edge_status got, nora_edge_status want, const char *needle,
                  const float *out, size_t n, const int64_t *grid) {
    const char *msg = nora_edge_last_error();
    int clean = 1;
    for (size_t i = 0; out && i < n; i++) {
        uint32_t bits;
        memcpy(&bits, &out[i], sizeof bits);
        clean &= bits == SENTINEL;
    }
    clean &= !grid || (grid[0] == -7 && grid[1] == -7 && grid[2] == -7);
    if (got != want || !msg || !strstr(msg, needle) || !clean) {
        printf("FAIL misuse %s (status %d, want %d; message '%s', want '%s'; outputs %s)\n", what, (int)got,
               (int)want, msg ? msg : "(null)", needle, clean ? "untouched" : "WRITTEN");
        return 0;
    }
    return 1;
}

static int misuse(void) {
    enum { H = 30, W = 20 };
    static uint8_t rgb[H * W * 3];
    const nora_edge_image_spec good = nora_spec(56, 28);
    const size_t n = nora_edge_pixel_values_size(&good);
    float *out = malloc((n + 1) * sizeof *out);
    int64_t grid[3];
    int passed = 0, total = 0;
    if (!out || n != 3 * 2 * 56 * 28) {
        printf("FAIL misuse size (%zu)\n", n);
        free(out);
        return -1;
    }
#define RESET()                                       \
    do {                                              \
        uint32_t s_ = SENTINEL;                       \
        for (size_t i_ = 0; i_ <= n; i_++) {          \
            memcpy(&out[i_], &s_, sizeof s_);         \
        }                                             \
        grid[0] = grid[1] = grid[2] = -7;             \
    } while (0)
#define CHECK(what, call, needle)                                                         \
    do {                                                                                  \
        RESET();                                                                          \
        total++;                                                                          \
        passed += expect(what, call, NORA_EDGE_ERR_INPUT, needle, out, n + 1, grid);      \
    } while (0)
    CHECK("rgb-null", nora_edge_preprocess(NULL, H, W, W * 3, &good, out, n, grid), "rgb is NULL");
    CHECK("out-null", nora_edge_preprocess(rgb, H, W, W * 3, &good, NULL, n, grid), "out is NULL");
    CHECK("spec-null", nora_edge_preprocess(rgb, H, W, W * 3, NULL, out, n, grid), "spec is NULL");
    CHECK("height-0", nora_edge_preprocess(rgb, 0, W, W * 3, &good, out, n, grid), "frame 0 x 20");
    CHECK("height-neg", nora_edge_preprocess(rgb, -5, W, W * 3, &good, out, n, grid), "frame -5 x 20");
    CHECK("width-0", nora_edge_preprocess(rgb, H, 0, W * 3, &good, out, n, grid), "frame 30 x 0");
    CHECK("height-huge", nora_edge_preprocess(rgb, 16385, W, W * 3, &good, out, n, grid), "frame 16385 x 20");
    CHECK("width-huge", nora_edge_preprocess(rgb, H, 1 << 30, (size_t)3 << 30, &good, out, n, grid),
          "frame 30 x 1073741824");
    CHECK("stride-short", nora_edge_preprocess(rgb, H, W, W * 3 - 1, &good, out, n, grid), "stride 59 < width");
    CHECK("stride-overflow", nora_edge_preprocess(rgb, H, W, SIZE_MAX / 2, &good, out, n, grid),
          "overflows size_t");
    CHECK("out-short", nora_edge_preprocess(rgb, H, W, W * 3, &good, out, n - 1, grid), "out_len 9407 < 9408");
    CHECK("out-zero", nora_edge_preprocess(rgb, H, W, W * 3, &good, out, 0, grid), "out_len 0 < 9408");
    const struct {
        const char *what, *needle;
        int field;
        float value;
    } bad[] = {
        {"patch-0", "spec.patch_size = 0", 0, 0},
        {"patch-neg", "spec.patch_size = -14", 0, -14},
        {"merge-0", "spec.merge_size = 0", 1, 0},
        {"temporal-0", "spec.temporal_patch_size = 0", 2, 0},
        {"temporal-huge", "spec.temporal_patch_size = 65", 2, 65},
        {"height-spec-0", "spec.height = 0", 3, 0},
        {"height-spec-odd", "spec.height x spec.width = 50 x 28", 3, 50},
        {"width-spec-huge", "spec.width = 16400", 4, 16400},
        {"width-spec-odd", "multiples of patch_size * merge_size = 28", 4, 14},
        {"mean-nan", "spec.mean[1] = nan", 5, NAN},
        {"mean-inf", "spec.mean[1] = inf", 5, INFINITY},
        {"std-0", "spec.std[2] = 0", 6, 0},
        {"std-nan", "spec.std[2] = nan", 6, NAN},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        nora_edge_image_spec s = good;
        switch (bad[i].field) {
            case 0: s.patch_size = (int32_t)bad[i].value; break;
            case 1: s.merge_size = (int32_t)bad[i].value; break;
            case 2: s.temporal_patch_size = (int32_t)bad[i].value; break;
            case 3: s.height = (int32_t)bad[i].value; break;
            case 4: s.width = (int32_t)bad[i].value; break;
            case 5: s.mean[1] = bad[i].value; break;
            default: s.std[2] = bad[i].value; break;
        }
        CHECK(bad[i].what, nora_edge_preprocess(rgb, H, W, W * 3, &s, out, n, grid), bad[i].needle);
        total++;
        if (nora_edge_pixel_values_size(&s) == 0 && strstr(nora_edge_last_error(), bad[i].needle)) {
            passed++;
        } else {
            printf("FAIL misuse size-%s (%s)\n", bad[i].what, nora_edge_last_error());
        }
    }
    total++;
    if (nora_edge_pixel_values_size(NULL) == 0 && strstr(nora_edge_last_error(), "spec is NULL")) {
        passed++;
    } else {
        printf("FAIL misuse size-null\n");
    }
    /* a good call after the failures: OK, exactly n floats written, the sentinel after them intact, grid set */
    RESET();
    total++;
    nora_edge_status st = nora_edge_preprocess(rgb, H, W, W * 3, &good, out, n, grid);
    uint32_t tail;
    memcpy(&tail, &out[n], sizeof tail);
    if (st == NORA_EDGE_OK && tail == SENTINEL && grid[0] == 1 && grid[1] == 4 && grid[2] == 2 && isfinite(out[0]) &&
        isfinite(out[n - 1])) {
        passed++;
    } else {
        printf("FAIL misuse good-call (status %d: %s)\n", (int)st, nora_edge_last_error());
    }
    /* grid_thw may be NULL */
    total++;
    if (nora_edge_preprocess(rgb, H, W, W * 3, &good, out, n, NULL) == NORA_EDGE_OK) {
        passed++;
    } else {
        printf("FAIL misuse grid-null\n");
    }
#undef CHECK
#undef RESET
    free(out);
    printf("%s misuse api %d\n", passed == total ? "PASS" : "FAIL", passed);
    return passed == total ? passed : -1;
}

int main(int argc, char **argv) {
    long count = 0;
    int frames_only = argc == 3 && strcmp(argv[2], "--frames-only") == 0;
    if (argc > 3 || (argc == 3 && !frames_only)) {
        fprintf(stderr, "usage: %s [cases.txt] [--frames-only]\n", argv[0]);
        return 2;
    }
    if (argc >= 2 && argv[1][0]) {
        FILE *f = fopen(argv[1], "r");
        char line[LINE_LEN];
        if (!f) {
            printf("FAIL cases %s 0 (cannot open)\n", argv[1]);
            return 1;
        }
        while (fgets(line, sizeof line, f)) {
            line[strcspn(line, "\r\n")] = '\0';
            if (!line[0]) {
                continue;
            }
            if (run_case(line)) {
                count++;
            } else {
                n_failed++;
            }
        }
        fclose(f);
    }
    int m = frames_only ? 0 : misuse();
    if (m < 0) {
        n_failed++;
    } else {
        count += m;
    }
    printf("%s total %ld\n", n_failed ? "FAIL" : "PASS", n_failed ? (long)n_failed : count);
    return n_failed ? 1 : 0;
}

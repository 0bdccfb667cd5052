/* run_bundle.c — firmware-style use of libnora_edge (include/nora_edge.h): one camera frame + one instruction
 * through a bundle, printed as one JSON object. C11, no Python.
 *
 *   run_bundle BUNDLE_DIR IMAGE [--instruction TEXT] [--unnorm-key KEY] [--threads N] [--verify] [--flag]
 *              [--ort PATH] [--dump-rgb OUT.ppm] [--multi-token] [--max-draft N] [--tie-margin X]
 *              [--gate-rate X] [--adaptive-draft] [--repeat N]
 *
 * Data flow: IMAGE (binary PPM "P6" with maxval 255, comments allowed; or PNG through libpng, any 8-bit or lower
 * color type converted to RGB the way Pillow's Image.convert("RGB") does: palette -> its RGB entries, gray -> R=G=B,
 * alpha / tRNS transparency dropped, never composited) --> (H, W, 3) uint8 frame --nora_policy_create (bundle dir;
 * onnxruntime from --ort or $NORA_EDGE_ONNXRUNTIME) + nora_policy_step--> (T, D) float64 actions, the generated
 * ids and their classes --> stdout:
 *   {"actions": [[a00, ...], ...], "token_ids": [...], "token_classes": ["model", ...], "flagged": false,
 *    "timings_ms": {"preprocess": ..., ..., "total": ...}, "decoding": {"mode": "plain", "decoder_calls": ...,
 *    "verify_calls": ..., "proposed": ..., "accepted": ..., "fallback": false}, "onnxruntime": "1.x.y"}
 * Numbers are printed with %.17g, so the float64 values round-trip exactly.
 * Options: --instruction (default "pick up the red block"), --unnorm-key (default: the bundle's only key),
 * --threads (intra-op threads per graph, default 0 = onnxruntime's choice), --verify (sha256 of every bundle file),
 * --flag (hand out a chunk holding repaired / forced_continue tokens, flagged, instead of refusing it), --ort
 * (libonnxruntime.so.1.x path), --dump-rgb (write the decoded frame as a P6 PPM and exit 0 without loading the
 * bundle: checks the image decoding alone), --multi-token (NORA_EDGE_DECODE_MULTI_TOKEN: drafts from earlier chunks
 * verified several per decoder call, the same ids; needs a bundle exported with --multi-token), --max-draft
 * (its most drafts per call, 1..32, default 6), --tie-margin (its tie guard in logit units, default 1e-3, negative:
 * off; a huge value re-decodes every drafted chunk plainly, which the "fallback" field reports), --gate-rate and
 * --adaptive-draft (nora_policy_options.gate_rate / adaptive_draft: fewer, shorter verify calls on a CPU host),
 * --repeat (run the chunk N times on one policy, default 1, and print the last: with --multi-token the later chunks
 * draft from the earlier ones).
 * Exit status: 0 success; 1 a library call failed ("run_bundle: <status name>: <nora_edge_last_error()>" on
 * stderr); 2 bad usage or an image that cannot be read ("run_bundle: <IMAGE>: <problem>").
 * PNG reading follows the libpng 1.6 manual (http://www.libpng.org/pub/png/libpng-manual.txt, "Transformations
 * you can do"); PPM per netpbm's spec (https://netpbm.sourceforge.net/doc/ppm.html).
 */
#include <png.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nora_edge.h"

#define MAX_PIXELS ((size_t)1 << 26) /* 64 Mpixel: a guard against a corrupt header's absurd size */

typedef struct image {
    uint8_t *rgb; /* (height, width, 3), rows packed */
    int32_t height, width;
} image;

typedef struct args {
    const char *bundle, *image, *instruction, *unnorm_key, *ort, *dump_rgb;
    int32_t threads, max_draft, repeat;
    int verify, flag, multi_token;
    double tie_margin, gate_rate;
    int adaptive_draft;
} args;

static const char *status_name(nora_edge_status s) {
    switch (s) {
    case NORA_EDGE_OK: return "NORA_EDGE_OK";
    case NORA_EDGE_ERR_INPUT: return "NORA_EDGE_ERR_INPUT";
    case NORA_EDGE_ERR_BUNDLE: return "NORA_EDGE_ERR_BUNDLE";
    case NORA_EDGE_ERR_DETOKENIZE: return "NORA_EDGE_ERR_DETOKENIZE";
    case NORA_EDGE_ERR_FORCED: return "NORA_EDGE_ERR_FORCED";
    case NORA_EDGE_ERR_UNSUPPORTED: return "NORA_EDGE_ERR_UNSUPPORTED";
    case NORA_EDGE_ERR_RUNTIME: return "NORA_EDGE_ERR_RUNTIME";
    case NORA_EDGE_ERR_NOMEM: return "NORA_EDGE_ERR_NOMEM";
    }
    return "NORA_EDGE_ERR_UNKNOWN";
}

static const char *class_name(int32_t c) {
    switch (c) {
    case NORA_EDGE_TOKEN_MODEL: return "model";
    case NORA_EDGE_TOKEN_REPAIRED: return "repaired";
    case NORA_EDGE_TOKEN_FORCED: return "forced_continue";
    }
    return "unknown";
}

static int usage(const char *msg) {
    if (msg) {
        fprintf(stderr, "run_bundle: %s\n", msg);
    }
    fprintf(stderr, "usage: run_bundle BUNDLE_DIR IMAGE [--instruction TEXT] [--unnorm-key KEY] [--threads N] "
                    "[--verify] [--flag] [--ort PATH] [--dump-rgb OUT.ppm] [--multi-token] [--max-draft N] "
                    "[--tie-margin X] [--gate-rate X] [--adaptive-draft] [--repeat N]\n");
    return 2;
}

/* ------------------------------------------------------------------------------------------------ PPM (P6) */

/* Skip whitespace and '#' comments (to the end of the line) in a PPM header. */
static size_t ppm_skip(const uint8_t *buf, size_t n, size_t i) {
    while (i < n) {
        if (buf[i] == '#') {
            while (i < n && buf[i] != '\n' && buf[i] != '\r') {
                i++;
            }
        } else if (buf[i] == ' ' || buf[i] == '\t' || buf[i] == '\n' || buf[i] == '\r' || buf[i] == '\v' ||
                   buf[i] == '\f') {
            i++;
        } else {
            break;
        }
    }
    return i;
}

/* A decimal header field; -1 when absent or over 2^30. */
static long ppm_number(const uint8_t *buf, size_t n, size_t *i) {
    *i = ppm_skip(buf, n, *i);
    long v = 0;
    size_t start = *i;
    while (*i < n && buf[*i] >= '0' && buf[*i] <= '9') {
        v = v * 10 + (buf[*i] - '0');
        if (v > (1L << 30)) {
            return -1;
        }
        (*i)++;
    }
    return *i == start ? -1 : v;
}

static int read_ppm(const uint8_t *buf, size_t n, image *img, char *msg, size_t msg_len) {
    size_t i = 2;
    long w = ppm_number(buf, n, &i), h = w < 0 ? -1 : ppm_number(buf, n, &i);
    long maxval = h < 0 ? -1 : ppm_number(buf, n, &i);
    if (w < 0 || h < 0 || maxval < 0) {
        snprintf(msg, msg_len, "bad PPM header (expected P6 <width> <height> <maxval>)");
        return -1;
    }
    if (maxval != 255) {
        snprintf(msg, msg_len, "PPM maxval %ld is not supported (8-bit only: 255)", maxval);
        return -1;
    }
    if (w == 0 || h == 0 || (size_t)w * (size_t)h > MAX_PIXELS) {
        snprintf(msg, msg_len, "PPM size %ldx%ld is out of range", w, h);
        return -1;
    }
    /* exactly one whitespace byte separates maxval from the raster */
    if (i >= n || !(buf[i] == ' ' || buf[i] == '\t' || buf[i] == '\n' || buf[i] == '\r')) {
        snprintf(msg, msg_len, "PPM header does not end with a whitespace byte after maxval");
        return -1;
    }
    i++;
    size_t need = (size_t)w * (size_t)h * 3;
    if (n - i < need) {
        snprintf(msg, msg_len, "truncated PPM: %zu bytes of pixel data for %ldx%ld, expected %zu", n - i, w, h,
                 need);
        return -1;
    }
    img->rgb = malloc(need);
    if (!img->rgb) {
        snprintf(msg, msg_len, "out of memory");
        return -1;
    }
    memcpy(img->rgb, buf + i, need);
    img->width = (int32_t)w;
    img->height = (int32_t)h;
    return 0;
}

/* ------------------------------------------------------------------------------------------------ PNG */

typedef struct png_job {
    const uint8_t *data; /* the whole file */
    size_t size, pos;
    png_bytep *rows;
    char msg[256];
} png_job;

static void png_fail(png_structp png, png_const_charp what) {
    png_job *job = png_get_error_ptr(png);
    snprintf(job->msg, sizeof job->msg, "PNG: %s", what);
    png_longjmp(png, 1);
}

static void png_quiet(png_structp png, png_const_charp what) {
    (void)png;
    (void)what; /* warnings (e.g. a bad CRC in an ancillary chunk) do not stop the decode */
}

static void png_read_mem(png_structp png, png_bytep out, size_t len) {
    png_job *job = png_get_io_ptr(png);
    if (job->size - job->pos < len) {
        png_error(png, "truncated file");
    }
    memcpy(out, job->data + job->pos, len);
    job->pos += len;
}

/* Decode into img->rgb. job and img live in the caller's frame, so nothing setjmp must preserve is a local. */
static int read_png(png_job *job, image *img) {
    png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, job, png_fail, png_quiet);
    if (!png) {
        snprintf(job->msg, sizeof job->msg, "out of memory");
        return -1;
    }
    png_infop info = png_create_info_struct(png);
    if (!info) {
        png_destroy_read_struct(&png, NULL, NULL);
        snprintf(job->msg, sizeof job->msg, "out of memory");
        return -1;
    }
    if (setjmp(png_jmpbuf(png))) {
        png_destroy_read_struct(&png, &info, NULL);
        free(job->rows);
        job->rows = NULL;
        free(img->rgb);
        img->rgb = NULL;
        return -1;
    }
    png_set_read_fn(png, job, png_read_mem);
    png_read_info(png, info);
    png_uint_32 w = png_get_image_width(png, info), h = png_get_image_height(png, info);
    int depth = png_get_bit_depth(png, info), type = png_get_color_type(png, info);
    if (depth > 8) {
        png_error(png, "16-bit PNG is not supported (8-bit or lower only)");
    }
    if ((size_t)w * (size_t)h > MAX_PIXELS) {
        png_error(png, "image size is out of range");
    }
    /* Pillow's convert("RGB"): palette -> RGB entries; gray (1/2/4 bits scaled to 8) -> R=G=B; alpha and tRNS
     * transparency dropped (not composited on a background). */
    if (type == PNG_COLOR_TYPE_PALETTE) {
        png_set_palette_to_rgb(png);
    }
    if (type == PNG_COLOR_TYPE_GRAY && depth < 8) {
        png_set_expand_gray_1_2_4_to_8(png);
    }
    if ((type & PNG_COLOR_MASK_ALPHA) || png_get_valid(png, info, PNG_INFO_tRNS)) {
        png_set_strip_alpha(png);
    }
    if (type == PNG_COLOR_TYPE_GRAY || type == PNG_COLOR_TYPE_GRAY_ALPHA) {
        png_set_gray_to_rgb(png);
    }
    png_set_interlace_handling(png);
    png_read_update_info(png, info);
    if (png_get_channels(png, info) != 3 || png_get_bit_depth(png, info) != 8 ||
        png_get_rowbytes(png, info) != (size_t)w * 3) {
        png_error(png, "unsupported color layout after conversion to RGB");
    }
    img->rgb = malloc((size_t)w * h * 3);
    job->rows = malloc(sizeof(png_bytep) * h);
    if (!img->rgb || !job->rows) {
        png_error(png, "out of memory");
    }
    for (png_uint_32 y = 0; y < h; y++) {
        job->rows[y] = img->rgb + (size_t)y * w * 3;
    }
    png_read_image(png, job->rows);
    png_read_end(png, NULL);
    png_destroy_read_struct(&png, &info, NULL);
    free(job->rows);
    job->rows = NULL;
    img->width = (int32_t)w;
    img->height = (int32_t)h;
    return 0;
}

/* ------------------------------------------------------------------------------------------------ image file */

static uint8_t *read_file(const char *path, size_t *size, char *msg, size_t msg_len) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(msg, msg_len, "cannot open the file");
        return NULL;
    }
    size_t cap = 1 << 16, n = 0;
    uint8_t *buf = malloc(cap);
    while (buf) {
        n += fread(buf + n, 1, cap - n, f);
        if (n < cap) {
            break;
        }
        uint8_t *bigger = cap > ((size_t)1 << 30) ? NULL : realloc(buf, cap * 2);
        if (!bigger) {
            free(buf);
            buf = NULL;
            break;
        }
        buf = bigger;
        cap *= 2;
    }
    int err = ferror(f);
    fclose(f);
    if (!buf || err) {
        snprintf(msg, msg_len, buf ? "read error" : "out of memory or file over 1 GiB");
        free(buf);
        return NULL;
    }
    *size = n;
    return buf;
}

static int load_image(const char *path, image *img) {
    char msg[256] = "";
    size_t n = 0;
    uint8_t *buf = read_file(path, &n, msg, sizeof msg);
    int rc = -1;
    if (buf) {
        static const uint8_t png_sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
        if (n >= 2 && buf[0] == 'P' && buf[1] == '6') {
            rc = read_ppm(buf, n, img, msg, sizeof msg);
        } else if (n >= 8 && memcmp(buf, png_sig, 8) == 0) {
            png_job job = {buf, n, 0, NULL, ""};
            rc = read_png(&job, img);
            memcpy(msg, job.msg, sizeof msg);
        } else {
            snprintf(msg, sizeof msg, "not a binary PPM (P6) or a PNG file");
        }
        free(buf);
    }
    if (rc != 0) {
        fprintf(stderr, "run_bundle: %s: %s\n", path, msg);
    }
    return rc;
}

static int dump_rgb(const char *path, const image *img) {
    FILE *f = fopen(path, "wb");
    size_t n = (size_t)img->width * (size_t)img->height * 3;
    int ok = f && fprintf(f, "P6\n%d %d\n255\n", img->width, img->height) > 0 && fwrite(img->rgb, 1, n, f) == n;
    if (f && fclose(f) != 0) {
        ok = 0;
    }
    if (!ok) {
        fprintf(stderr, "run_bundle: %s: cannot write the frame\n", path);
        return 2;
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------------ output */

static void print_json_string(const char *s) {
    putchar('"');
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            printf("\\%c", c);
        } else if (c < 0x20) {
            printf("\\u%04x", c);
        } else {
            putchar(c);
        }
    }
    putchar('"');
}

static void print_result(const nora_policy_info *pi, const double *actions, const int64_t *ids,
                         const int32_t *classes, const nora_chunk_info *ci, int multi_token) {
    printf("{\"actions\": [");
    for (int32_t t = 0; t < pi->time_horizon; t++) {
        printf(t ? ", [" : "[");
        for (int32_t d = 0; d < pi->action_dim; d++) {
            printf(d ? ", %.17g" : "%.17g", actions[(size_t)t * (size_t)pi->action_dim + (size_t)d]);
        }
        printf("]");
    }
    printf("], \"token_ids\": [");
    for (int32_t k = 0; k < ci->num_tokens; k++) {
        printf(k ? ", %lld" : "%lld", (long long)ids[k]);
    }
    printf("], \"token_classes\": [");
    for (int32_t k = 0; k < ci->num_tokens; k++) {
        printf(k ? ", \"%s\"" : "\"%s\"", class_name(classes[k]));
    }
    printf("], \"flagged\": %s, \"timings_ms\": {", ci->flagged ? "true" : "false");
    printf("\"preprocess\": %.17g, \"vision\": %.17g, \"prefill\": %.17g, \"decode\": %.17g, ",
           ci->preprocess_s * 1e3, ci->vision_s * 1e3, ci->prefill_s * 1e3, ci->decode_s * 1e3);
    printf("\"detokenize\": %.17g, \"total\": %.17g, \"decode_step_min\": %.17g, \"decode_step_max\": %.17g}, ",
           ci->detokenize_s * 1e3, ci->total_s * 1e3, ci->decode_step_min_s * 1e3, ci->decode_step_max_s * 1e3);
    printf("\"decoding\": {\"mode\": \"%s\", \"decoder_calls\": %d, \"verify_calls\": %d, \"proposed\": %d, "
           "\"accepted\": %d, \"fallback\": %s}, ", multi_token ? "multi-token" : "plain", ci->decoder_calls,
           ci->verify_calls, ci->proposed, ci->accepted, ci->fallback ? "true" : "false");
    printf("\"onnxruntime\": ");
    print_json_string(pi->onnxruntime_version);
    printf("}\n");
}

/* ------------------------------------------------------------------------------------------------ main */

static int parse_args(int argc, char **argv, args *a) {
    int positional = 0;
    for (int i = 1; i < argc; i++) {
        const char *s = argv[i];
        int has_value = i + 1 < argc;
        if (strcmp(s, "--verify") == 0) {
            a->verify = 1;
        } else if (strcmp(s, "--flag") == 0) {
            a->flag = 1;
        } else if (strcmp(s, "--multi-token") == 0) {
            a->multi_token = 1;
        } else if (strcmp(s, "--adaptive-draft") == 0) {
            a->adaptive_draft = 1;
        } else if (strcmp(s, "--tie-margin") == 0 || strcmp(s, "--gate-rate") == 0) {
            const char *v = has_value ? argv[++i] : "";
            char *end = NULL;
            double x = strtod(v, &end); /* the library checks the value and names the field */
            if (s[2] == 't') {
                a->tie_margin = x;
            } else {
                a->gate_rate = x;
            }
            if (!*v || *end) {
                fprintf(stderr, "run_bundle: %s must be a number, got '%s'\n", s, v);
                return -1;
            }
        } else if (strcmp(s, "--max-draft") == 0 || strcmp(s, "--repeat") == 0) {
            const char *v = has_value ? argv[++i] : "";
            char *end = NULL;
            long n = strtol(v, &end, 10);
            if (!*v || *end || n < 1 || n > 1000000) {
                fprintf(stderr, "run_bundle: %s must be an integer >= 1, got '%s'\n", s, v);
                return -1;
            }
            if (s[2] == 'm') {
                a->max_draft = (int32_t)n; /* the library checks the range and names the field */
            } else {
                a->repeat = (int32_t)n;
            }
        } else if (strcmp(s, "--instruction") == 0 || strcmp(s, "--unnorm-key") == 0 ||
                   strcmp(s, "--threads") == 0 || strcmp(s, "--ort") == 0 || strcmp(s, "--dump-rgb") == 0) {
            if (!has_value) {
                fprintf(stderr, "run_bundle: %s needs a value\n", s);
                return -1;
            }
            const char *v = argv[++i];
            if (strcmp(s, "--instruction") == 0) {
                a->instruction = v;
            } else if (strcmp(s, "--unnorm-key") == 0) {
                a->unnorm_key = v;
            } else if (strcmp(s, "--ort") == 0) {
                a->ort = v;
            } else if (strcmp(s, "--dump-rgb") == 0) {
                a->dump_rgb = v;
            } else {
                char *end = NULL;
                long t = strtol(v, &end, 10);
                if (!*v || *end || t < 0 || t > 1024) {
                    fprintf(stderr, "run_bundle: --threads must be an integer in [0, 1024], got '%s'\n", v);
                    return -1;
                }
                a->threads = (int32_t)t;
            }
        } else if (s[0] == '-' && s[1] == '-') {
            fprintf(stderr, "run_bundle: unknown option '%s'\n", s);
            return -1;
        } else if (positional == 0) {
            a->bundle = s;
            positional++;
        } else if (positional == 1) {
            a->image = s;
            positional++;
        } else {
            fprintf(stderr, "run_bundle: unexpected argument '%s'\n", s);
            return -1;
        }
    }
    if (positional != 2) {
        fprintf(stderr, "run_bundle: BUNDLE_DIR and IMAGE are required\n");
        return -1;
    }
    return 0;
}

static int fail(nora_edge_status s) {
    fprintf(stderr, "run_bundle: %s: %s\n", status_name(s), nora_edge_last_error());
    return 1;
}

int main(int argc, char **argv) {
    args a = {NULL, NULL, "pick up the red block", NULL, NULL, NULL, 0, 6, 1, 0, 0, 0, 1e-3, 0.0, 0};
    if (parse_args(argc, argv, &a) != 0) {
        return usage(NULL);
    }
    image img = {NULL, 0, 0};
    if (load_image(a.image, &img) != 0) {
        return 2;
    }
    if (a.dump_rgb) {
        int rc = dump_rgb(a.dump_rgb, &img);
        free(img.rgb);
        return rc;
    }

    nora_policy_options opt;
    nora_policy_options_init(&opt);
    opt.onnxruntime_path = a.ort;
    opt.threads = a.threads;
    opt.verify_hashes = a.verify;
    opt.forced_tokens = a.flag ? NORA_EDGE_FORCED_FLAG : NORA_EDGE_FORCED_REFUSE;
    opt.decoding = a.multi_token ? NORA_EDGE_DECODE_MULTI_TOKEN : NORA_EDGE_DECODE_PLAIN;
    opt.max_draft = a.max_draft;
    opt.tie_margin = a.tie_margin;
    opt.gate_rate = a.gate_rate;
    opt.adaptive_draft = a.adaptive_draft;

    int rc = 1;
    nora_policy *policy = NULL;
    double *actions = NULL;
    int64_t *ids = NULL;
    int32_t *classes = NULL;
    nora_policy_info pi;
    memset(&pi, 0, sizeof pi);
    pi.struct_size = sizeof pi;
    nora_chunk_info ci;
    memset(&ci, 0, sizeof ci);
    ci.struct_size = sizeof ci;

    nora_edge_status s = nora_policy_create(a.bundle, &opt, &policy);
    if (s == NORA_EDGE_OK) {
        s = nora_policy_get_info(policy, &pi);
    }
    if (s != NORA_EDGE_OK) {
        rc = fail(s);
        goto done;
    }
    size_t n_actions = (size_t)pi.time_horizon * (size_t)pi.action_dim;
    size_t n_tokens = (size_t)pi.max_tokens;
    actions = malloc(n_actions * sizeof *actions);
    ids = malloc(n_tokens * sizeof *ids);
    classes = malloc(n_tokens * sizeof *classes);
    if (!actions || !ids || !classes) {
        fprintf(stderr, "run_bundle: NORA_EDGE_ERR_NOMEM: out of memory for a (%d, %d) chunk\n",
                pi.time_horizon, pi.action_dim);
        goto done;
    }
    for (int32_t k = 0; k < a.repeat; k++) {
        s = nora_policy_step(policy, img.rgb, img.height, img.width, (size_t)img.width * 3, a.instruction,
                             a.unnorm_key, actions, n_actions, ids, classes, n_tokens, &ci);
        if (s != NORA_EDGE_OK) {
            rc = fail(s);
            goto done;
        }
    }
    print_result(&pi, actions, ids, classes, &ci, a.multi_token);
    rc = fflush(stdout) == 0 ? 0 : 1;

done:
    if (policy) {
        nora_policy_destroy(policy);
    }
    free(actions);
    free(ids);
    free(classes);
    free(img.rgb);
    return rc;
}

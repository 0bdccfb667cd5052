/* nora_edge.h: libnora_edge, NORA's runtime for firmware (C ABI over C/C++ inside; no Python).
 *
 * Data flow (one chunk):
 *   RGB frame (H, W, 3) uint8 --nora_edge_preprocess (Pillow-exact bicubic to the bundle's size, rescale,
 *   CLIP normalize, patchify)--> pixel_values (patches, 3*2*14*14) float32 --vision graph--> image embeddings
 *   instruction (UTF-8) --byte-level BPE (the bundle's tokenizer.json)--> prompt ids with image pads
 *   --decoder graph (onnxruntime C API, loaded at run time; the constant prompt prefix prefilled once)-->
 *   constrained greedy loop through libnora_fast (nora_fast.h; plain: one decoder call per token, or multi-token:
 *   drafts from earlier chunks and the bundle's drafts.json verified several per decoder call, the same ids) -->
 *   (T, D) float64 actions + token classes.
 *
 * Version: NORA_EDGE_ABI_MAJOR.NORA_EDGE_ABI_MINOR. A minor bump only adds functions or option fields at the
 * end of a struct (callers set .struct_size); a major bump breaks the ABI.
 *
 * Errors: every call returns a nora_edge_status; NORA_EDGE_OK is 0. The message of the last failure on the
 * calling thread is nora_edge_last_error() (valid until the thread's next call). A failed call leaves a policy
 * usable and never returns an action the model did not produce.
 */
#ifndef NORA_EDGE_H
#define NORA_EDGE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define NORA_EDGE_ABI_MAJOR 0
#define NORA_EDGE_ABI_MINOR 5

#if defined(__GNUC__)
#define NORA_EDGE_API __attribute__((visibility("default")))
#else
#define NORA_EDGE_API
#endif

/* Status codes. They mirror the Python runtime's exceptions (nora_edge/errors.py). */
typedef enum nora_edge_status {
    NORA_EDGE_OK = 0,
    NORA_EDGE_ERR_INPUT = 1,          /* InputError: NULL pointer, bad size, empty instruction, unknown key */
    NORA_EDGE_ERR_BUNDLE = 2,         /* BundleError: missing / corrupt / tampered bundle file, bad manifest */
    NORA_EDGE_ERR_DETOKENIZE = 3,     /* DetokenizationError: the chunk's tokens do not decode */
    NORA_EDGE_ERR_FORCED = 4,         /* ForcedTokenError: the chunk needed forced tokens the options forbid */
    NORA_EDGE_ERR_UNSUPPORTED = 5,    /* a character or feature this build cannot handle exactly */
    NORA_EDGE_ERR_RUNTIME = 6,        /* onnxruntime or the system failed (message names the call) */
    NORA_EDGE_ERR_NOMEM = 7,          /* allocation failed */
} nora_edge_status;

/* The message of the calling thread's last failed call ("" if none). */
NORA_EDGE_API const char *nora_edge_last_error(void);

/* ---------------------------------------------------------------- preprocessing (no onnxruntime needed) */

/* Image preprocessing parameters, as the bundle manifest's "image" section gives them. */
typedef struct nora_edge_image_spec {
    int32_t height, width;            /* resize target (224, 224), multiples of patch_size * merge_size */
    int32_t patch_size;               /* 14 */
    int32_t temporal_patch_size;      /* 2 */
    int32_t merge_size;               /* 2 */
    float mean[3], std[3];            /* CLIP mean / std */
} nora_edge_image_spec;

/* Number of float32 values nora_edge_preprocess writes for a spec: (t*gh*gw) * (3*tp*p*p); 0 on a bad spec. */
NORA_EDGE_API size_t nora_edge_pixel_values_size(const nora_edge_image_spec *spec);

/* RGB frame (height, width, 3) uint8, row stride `stride` bytes (>= width*3) -> pixel_values float32, in the
 * exact order and rounding of the Python runtime (nora_edge/preprocess.py; bit-exact with Pillow's bicubic
 * resize and Qwen2VLImageProcessor). `out_len` is the capacity of `out` in floats. grid_thw (3,) may be NULL. */
NORA_EDGE_API nora_edge_status nora_edge_preprocess(const uint8_t *rgb, int32_t height, int32_t width,
                                                   size_t stride, const nora_edge_image_spec *spec,
                                                   float *out, size_t out_len, int64_t grid_thw[3]);


/* ---------------------------------------------------------------- policy (needs onnxruntime at run time) */

/* A loaded bundle: graphs, tokenizer, prompt prefix KV, codec. Calls on one policy are serialized by its own
 * lock; separate policies run in parallel. */
typedef struct nora_policy nora_policy;

/* What a chunk holding tokens the model did not choose does (nora_edge.chunk.ForcedTokenRule). */
typedef enum nora_edge_forced_mode {
    NORA_EDGE_FORCED_REFUSE = 0,      /* NORA_EDGE_ERR_FORCED for a forced_continue token or > max_repaired */
    NORA_EDGE_FORCED_FLAG = 1,        /* hand the chunk out; nora_chunk_info.flagged and the classes say so */
} nora_edge_forced_mode;

/* Class of each generated token (nora_edge.generate.TOKEN_CLASSES). */
typedef enum nora_edge_token_class {
    NORA_EDGE_TOKEN_MODEL = 0,        /* the model's own top choice */
    NORA_EDGE_TOKEN_REPAIRED = 1,     /* the automaton replaced a top choice that could not decode */
    NORA_EDGE_TOKEN_FORCED = 2,       /* the model chose to end; the chunk was not complete (forced_continue) */
} nora_edge_token_class;

/* Where the graphs run (ABI 0.3). The GPU providers need an onnxruntime built with them (on a Jetson: the
 * onnxruntime-gpu wheel for its JetPack); one without them fails nora_policy_create with NORA_EDGE_ERR_UNSUPPORTED
 * naming the providers it has. Nodes a provider lacks run on the CPU (TENSORRT: TensorRT, then CUDA, then CPU). */
typedef enum nora_edge_provider {
    NORA_EDGE_PROVIDER_CPU = 0,
    NORA_EDGE_PROVIDER_CUDA = 1,      /* onnxruntime's CUDAExecutionProvider on device_id */
    NORA_EDGE_PROVIDER_TENSORRT = 2,  /* onnxruntime's TensorrtExecutionProvider (+ CUDA fallback) on device_id */
} nora_edge_provider;

/* How the greedy loop calls the decoder (ABI 0.4; bundle_drafts 0.5; nora_edge/multitoken.py, the Python runtime's
 * decoding="multi-token"). With the tie guard on (tie_margin >= 0) both give the same ids whenever a verify call's
 * logits differ from the sequential steps' by less than tie_margin / 2 (nora_policy_options.tie_margin). */
typedef enum nora_edge_decoding {
    NORA_EDGE_DECODE_PLAIN = 0,       /* one decoder call per generated token */
    NORA_EDGE_DECODE_MULTI_TOKEN = 1, /* lossless multi-token decoding: up to max_draft ids proposed by an n-gram
                                       * table of this policy's earlier chunks (per instruction, then policy-wide),
                                       * seeded at create from the bundle's drafts.json when it ships one (the
                                       * model's own chunks on calibration frames, `export --multi-token
                                       * --calibration`; nora_policy_options.bundle_drafts), cut by the FAST
                                       * automaton, verified in ONE decoder call reading its logits_all output;
                                       * the greedy choice at every position is kept (the agreeing prefix + one
                                       * token), so the ids are the plain loop's (above). Needs a bundle exported
                                       * with `nora-edge export --multi-token` (decoder output logits_all); the
                                       * draft table lives as long as the policy. */
} nora_edge_decoding;

#define NORA_EDGE_MAX_DRAFT_LIMIT 32

typedef struct nora_policy_options {
    size_t struct_size;               /* sizeof(nora_policy_options): set by nora_policy_options_init */
    const char *onnxruntime_path;     /* libonnxruntime.so.1.x to load; NULL: $NORA_EDGE_ONNXRUNTIME */
    int32_t threads;                  /* intra-op threads per graph; 0 = onnxruntime's default */
    int32_t verify_hashes;            /* 1: sha256 of every bundle file at create (sizes are always checked) */
    int32_t forced_tokens;            /* nora_edge_forced_mode (default REFUSE) */
    int32_t max_repaired;             /* repaired tokens a chunk may hold under REFUSE (default 0) */
    /* ABI 0.3 (a caller built against 0.2 passes the smaller struct_size and gets the defaults) */
    int32_t provider;                 /* nora_edge_provider (default CPU) */
    int32_t device_id;                /* GPU ordinal for CUDA / TENSORRT (default 0) */
    const char *trt_cache_dir;        /* TENSORRT: directory for built engines (NULL: rebuild at every create) */
    int32_t trt_fp16;                 /* TENSORRT: 1 lets TensorRT pick fp16 kernels (default 0: fp32) */
    /* ABI 0.4 (a caller built against 0.2 / 0.3 passes its smaller struct_size and gets the defaults) */
    int32_t decoding;                 /* nora_edge_decoding (default PLAIN) */
    int32_t max_draft;                /* MULTI_TOKEN: most ids proposed per decoder call, 1 .. 32 (default 6) */
    double tie_margin;                /* MULTI_TOKEN: tie guard in logit units (default 1e-3). Once a verify call's
                                       * logits were used, every choice must win by >= tie_margin (top-2 gap of the
                                       * penalised scores over all rows and over the allowed ids), else the chunk
                                       * is re-decoded by the plain loop from the prefill (nora_chunk_info.fallback):
                                       * the ids then equal the plain loop's whenever the verify call's logits differ
                                       * from the sequential ones by less than tie_margin / 2. A negative value turns
                                       * the guard off (faster, but a near tie may then pick another id than the
                                       * plain loop); NaN or infinite: NORA_EDGE_ERR_INPUT. */
    double gate_rate;                 /* MULTI_TOKEN: stop drafting for an instruction whose recent drafts were
                                       * accepted at a rate below this (decayed x0.8 per chunk, over >= 8 drafts;
                                       * every 4th gated chunk still drafts), in [0, 1]; 0 (default) = never */
    int32_t adaptive_draft;           /* MULTI_TOKEN: 1 = after a partly rejected call the next proposes at most
                                       * 2x the accepted count (>= 1), back to max_draft after a fully accepted one;
                                       * 0 (default) = always max_draft. Gate and adaptive K trade decoder calls for
                                       * shorter calls: worth it where a call's cost grows with its length (a
                                       * compute-bound CPU host; the Python runtime's CPU_HOST settings: 0.2, 1),
                                       * not where decode streams the weights once per call (Jetson, GPU). */
    /* ABI 0.5 (a caller built against 0.2 .. 0.4 passes its smaller struct_size and gets the default). The 0.4
     * struct ends in 4 bytes of tail padding on LP64 and ARM EABI (sizeof 88 / 72), which a 0.4 caller's
     * struct_size covers: reserved0 takes them, so bundle_drafts lies beyond every 0.4 struct_size. */
    int32_t reserved0;                /* ignored (whatever a 0.4 caller's padding held) */
    int32_t bundle_drafts;            /* MULTI_TOKEN: 1 (default) = seed the draft table from the bundle's
                                       * drafts.json when its manifest lists one (a malformed file is then
                                       * NORA_EDGE_ERR_BUNDLE naming it and chunks[i]), so the first chunk already
                                       * has proposals; 0 = start empty (proposals only from this policy's own
                                       * chunks). nora_edge.multitoken.MultiTokenConfig.bundle_drafts. */
} nora_policy_options;

/* Defaults: onnxruntime from $NORA_EDGE_ONNXRUNTIME, threads 0, verify_hashes 0, REFUSE, max_repaired 0, CPU,
 * device 0, no engine cache, trt_fp16 0, PLAIN decoding, max_draft 6, tie_margin 1e-3, gate_rate 0, adaptive_draft 0,
 * bundle_drafts 1 (nora_edge.multitoken.MultiTokenConfig's defaults). */
NORA_EDGE_API void nora_policy_options_init(nora_policy_options *options);

typedef struct nora_policy_info {
    size_t struct_size;               /* caller sets sizeof(nora_policy_info) */
    int32_t time_horizon, action_dim; /* T, D of a chunk */
    int32_t max_tokens;               /* capacity a step's token arrays need: 4*T*D + 1 */
    int32_t num_unnorm_keys;          /* keys the bundle's norm stats hold */
    int32_t prefix_tokens;            /* prompt prefix prefilled at create */
    int32_t max_len;                  /* KV slots of the decoder graph */
    char onnxruntime_version[32];
} nora_policy_info;

/* What one step did. Timings in seconds (wall clock). */
typedef struct nora_chunk_info {
    size_t struct_size;               /* caller sets sizeof(nora_chunk_info) */
    int32_t num_tokens;               /* generated ids (written to token_ids / token_classes) */
    int32_t class_counts[3];          /* per nora_edge_token_class */
    int32_t flagged;                  /* 1 when a token was not the model's own choice */
    int32_t prompt_tokens;            /* S */
    double preprocess_s, vision_s, prefill_s, decode_s, detokenize_s, total_s;
    double decode_step_min_s, decode_step_max_s;  /* per decoder call after the prefill (verify calls included) */
    /* ABI 0.4 (filled when struct_size is sizeof this struct; a 0.3 caller's smaller struct_size is accepted) */
    int32_t decoder_calls;            /* decoder calls after the prefill: plain steps + verify calls */
    int32_t verify_calls;             /* MULTI_TOKEN: calls on several new tokens (logits_all) */
    int32_t proposed, accepted;       /* MULTI_TOKEN: drafts fed to verify calls / drafts equal to the greedy
                                       * choice */
    int32_t fallback;                 /* MULTI_TOKEN: 1 when a near tie re-decoded the chunk with the plain loop
                                       * (the counts include both runs) */
} nora_chunk_info;

/* Load and verify a bundle (manifest, sizes, optionally sha256), open both graphs, prefill the prompt prefix.
 * options may be NULL (defaults). The decoder must be a fixed-buffer graph (`export --decoder-graph fused`, or
 * the TensorRT flavor's static KV) and the vision graph specialised to one grid: NORA_EDGE_ERR_UNSUPPORTED
 * otherwise. A bad option value is NORA_EDGE_ERR_INPUT naming the field; MULTI_TOKEN on a decoder without the
 * logits_all output is NORA_EDGE_ERR_BUNDLE (re-export with --multi-token), and so is (MULTI_TOKEN with
 * bundle_drafts) a drafts.json that is not valid JSON of format "nora-edge-drafts/1" with a list of chunks, each
 * a string instruction and int ids in [0, vocab) (the message names the file and chunks[i]); a manifest "drafts"
 * section that does not name file "drafts.json" is NORA_EDGE_ERR_BUNDLE for every decoding. *out is NULL on
 * failure. */
NORA_EDGE_API nora_edge_status nora_policy_create(const char *bundle_dir, const nora_policy_options *options,
                                                  nora_policy **out);
NORA_EDGE_API void nora_policy_destroy(nora_policy *policy);
NORA_EDGE_API nora_edge_status nora_policy_get_info(const nora_policy *policy, nora_policy_info *info);

/* One chunk (NoraPolicy.run_chunk): RGB frame (height, width, 3) uint8 with row stride `stride` bytes, UTF-8
 * instruction, unnorm key (NULL: the only key) -> actions (T, D) float64 in robot units, row-major.
 * token_ids / token_classes (capacity tokens_len, >= nora_policy_info.max_tokens; both may be NULL) receive the
 * generated Qwen ids and their nora_edge_token_class; info (may be NULL) the counts and timings.
 * On any failure `actions` is left untouched; a chunk refused under NORA_EDGE_FORCED_REFUSE returns
 * NORA_EDGE_ERR_FORCED with the ids, classes and info filled in. */
NORA_EDGE_API nora_edge_status nora_policy_step(nora_policy *policy, const uint8_t *rgb, int32_t height,
                                                int32_t width, size_t stride, const char *instruction,
                                                const char *unnorm_key, double *actions, size_t actions_len,
                                                int64_t *token_ids, int32_t *token_classes, size_t tokens_len,
                                                nora_chunk_info *info);

/* NoraPolicy.select_action: the next (D,) action from the queue, refilled with a new chunk when empty. The queue
 * is dropped when the instruction or unnorm key changes; *new_chunk (may be NULL) is 1 when this call ran the
 * model. On failure the queue is empty and `action` untouched. */
NORA_EDGE_API nora_edge_status nora_policy_select_action(nora_policy *policy, const uint8_t *rgb, int32_t height,
                                                         int32_t width, size_t stride, const char *instruction,
                                                         const char *unnorm_key, double *action,
                                                         size_t action_len, int32_t *new_chunk);

/* Forget queued actions (episode start). The multi-token draft table is kept: earlier episodes are what the next
 * one drafts from (NoraPolicy.reset). */
NORA_EDGE_API nora_edge_status nora_policy_reset(nora_policy *policy);

#ifdef __cplusplus
}
#endif

#endif /* NORA_EDGE_H */

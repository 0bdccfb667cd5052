/* bundle.h: libnora_edge's bundle reader (internal C++17 API; the C ABI's policy object will wrap it).
 *
 * Data flow: <dir>/manifest.json --nlohmann::ordered_json (file order kept, so "the first bad file" is
 * Python's)--> schema_version / required sections (nora_edge/bundle.py Bundle.load) --> every listed file:
 * present, size (always), sha256 (verify_hashes; sha256.c, 4 MiB chunks), no unlisted regular file, no symlink
 * (bundle.py verify_files / list_files) --> typed sections (bundle_specs.py *.from_json, policy.py
 * NoraPolicy.load / check_bundle_consistency / _vision_params, preprocess.py ImageSpec.from_manifest +
 * c_path_unsupported) --> Bundle (plain structs) --> Npy::open(embeddings.npy) checked against
 * components.embeddings (dtype, shape) --> Npy::gather_f32 (rows -> float32; float16 widened exactly).
 *
 * Errors: BundleError, a C++ exception carrying the nora_edge.h status; the C ABI layer converts it with
 * nora_edge_priv_fail(e.status(), "%s", e.what()). NORA_EDGE_ERR_BUNDLE: a missing / resized / tampered /
 * unlisted file or a missing / ill-typed manifest field (the message names the file or 'section.field', in
 * bundle.py's wording), a "drafts" section that is not an object naming file "drafts.json" (multitoken.py
 * seed_from's check, made here for every decoding); NORA_EDGE_ERR_UNSUPPORTED: a valid image section the C
 * preprocessing cannot reproduce (a second smart_resize, rescale_factor != 1/255: the Python runtime falls back to
 * numpy there); NORA_EDGE_ERR_INPUT: a row id outside the table in gather_f32.
 */
#ifndef NORA_EDGE_BUNDLE_H
#define NORA_EDGE_BUNDLE_H

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "nora_edge.h"

namespace nora_edge {

class BundleError : public std::runtime_error {
   public:
    BundleError(nora_edge_status status, const std::string &message)
        : std::runtime_error(message), status_(status) {}
    nora_edge_status status() const noexcept { return status_; }

   private:
    nora_edge_status status_;
};

/* One graph input / output; a named dimension ("batch") has dim -1 and its name in dim_names. */
struct TensorInfo {
    std::string name, dtype;
    std::vector<int64_t> dims;
    std::vector<std::string> dim_names;  /* "" for a fixed dimension */
};

struct ComponentInfo {
    std::string file;                     /* relative to the bundle */
    std::vector<std::string> data_files;
    std::string precision;
    std::vector<TensorInfo> inputs, outputs;
};

struct BundlePrompt {
    std::vector<int64_t> prefix_ids, suffix_ids;
    int64_t image_pad_id = 0, vision_start_id = 0, vision_end_id = 0;
    std::string tokenizer;                /* tokenizer.json, relative */
    int64_t spatial_merge_size = 0;       /* components.vision.meta (what PromptBuilder gets) */
    int64_t max_instruction_tokens = 512; /* prompt.max_instruction_tokens, default 512 */
    /* ids an instruction must not contain beyond tokenizer.json's added tokens (the tokenizer knows those):
     * image pad, vision end, the action ids [actions.base, base + count), + prompt.forbidden_ids if listed */
    std::vector<int64_t> forbidden_ids;
    int64_t forbidden_range_begin = 0, forbidden_range_end = 0;
};

struct ImageInfo {
    nora_edge_image_spec spec;            /* height/width = the output size after both smart_resizes */
    int64_t resized_height = 0, resized_width = 0, min_pixels = 0, max_pixels = 0;
    double rescale_factor = 0;
    int64_t grid_thw[3] = {0, 0, 0};
};

struct VisionInfo : ComponentInfo {
    int64_t patch_size = 0, spatial_merge_size = 0, window_size = 0;
    bool fixed_grid = false;
    int64_t grid_thw[3] = {0, 0, 0};      /* meta.grid_thw when specialised */
};

struct DecoderInfo : ComponentInfo {
    int64_t num_layers = 0, num_kv_heads = 0, head_dim = 0, hidden_size = 0;
    std::string kv_cache;                 /* meta.kv_cache: "" (absent: dynamic KV), "static", "shared" */
    int64_t max_len = -1, num_rows = -1;  /* -1 = absent */
    std::string graph;                    /* meta.graph ("" absent, "fused") */
};

struct EmbeddingsInfo {
    std::string file, dtype;
    std::vector<int64_t> shape;
};

struct ActionsInfo {
    int64_t base = 0, count = 0;
    std::string head;
    std::vector<int64_t> head_rows;       /* expanded [start, stop) ranges */
    std::vector<int64_t> end_ids;
};

struct GenerationInfo {
    std::vector<int64_t> eos_token_ids;
    bool has_repetition_penalty = false;
    double repetition_penalty = 1.0;
    int64_t max_new_tokens = -1, max_length = -1, pad_token_id = -1;  /* -1 = null / absent */
};

struct CodecInfo {
    double scale = 0;
    int64_t min_token = 0, vocab_size = 0, time_horizon = 0, action_dim = 0;
    std::string byte_table, tokenizer, processor_config, native;  /* native "" = not listed */
};

struct PostStep {
    std::string op, key;                  /* key "" = none / null */
    std::string mode;                     /* unnormalize's mode ("q01_q99", ...); "" when absent */
};

struct Bundle {
    std::string dir;                      /* as given, trailing '/' removed */
    int64_t schema_version = 0;
    BundlePrompt prompt;
    ImageInfo image;
    VisionInfo vision;
    DecoderInfo decoder;
    EmbeddingsInfo embeddings;
    ActionsInfo actions;
    GenerationInfo generation;
    CodecInfo codec;
    std::vector<std::string> norm_stats_keys;  /* sorted */
    std::vector<PostStep> postprocess;         /* manifest order; absent = NORA's default q01_q99 */
    /* the manifest's optional "drafts" section's file, relative ("drafts.json", the multi-token draft table's
     * seed; export --multi-token --calibration); "" when the section is absent, null or {} */
    std::string drafts;

    /* Read, verify and parse `dir` (sizes always; sha256 when verify_hashes). Throws BundleError. */
    static Bundle load(const std::string &dir, bool verify_hashes);
    /* dir + "/" + rel */
    std::string path(const std::string &rel) const;
};

/* A read-only .npy table (2-D, C order, little-endian float16 or float32), memory-mapped. */
class Npy {
   public:
    /* Open and check the header against the manifest's dtype ("float16" / "float32") and shape. */
    static Npy open(const std::string &path, const std::string &dtype, const std::vector<int64_t> &shape);
    Npy(Npy &&other) noexcept;
    Npy &operator=(Npy &&other) noexcept;
    Npy(const Npy &) = delete;
    Npy &operator=(const Npy &) = delete;
    ~Npy();

    int64_t rows() const { return rows_; }
    int64_t cols() const { return cols_; }
    size_t itemsize() const { return itemsize_; }
    /* out (n, cols) float32 = table[ids[i]]; float16 widened exactly (numpy's npy_halfbits_to_floatbits).
     * Throws BundleError(NORA_EDGE_ERR_INPUT) naming an id outside [0, rows). */
    void gather_f32(const int64_t *ids, size_t n, float *out) const;

   private:
    Npy() = default;
    void *map_ = nullptr;
    size_t map_len_ = 0;
    const unsigned char *data_ = nullptr;
    int64_t rows_ = 0, cols_ = 0;
    size_t itemsize_ = 0;
};

/* float16 bits -> float32 bits, exact (subnormals, inf; NaN payload shifted like numpy's scalar path). */
uint32_t half_to_float_bits(uint16_t h);

}  // namespace nora_edge

#endif /* NORA_EDGE_BUNDLE_H */

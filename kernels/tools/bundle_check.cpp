// bundle_check: load a bundle with libnora_edge's reader (src/edge/bundle.h) and print it, for the tests.
//
//   bundle_check [--hash] BUNDLE_DIR [--rows ID...]   the parsed bundle as one JSON object on stdout (with
//                                                     --rows: "rows_bits", the gathered float32 rows as uint32
//                                                     bit patterns), or `ERR <status> <message>` (exit 1)
//   bundle_check --sha256 FILE...                     one line per file: hex sha256 (src/edge/sha256.c)
//   bundle_check --half-table                         65536 lines: float32 bits (hex) of every float16 pattern
// Without --hash only presence and sizes are verified (Bundle.load(verify=False)); a malformed command line
// exits 2.
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "edge/bundle.h"
#include "edge/sha256.h"

using nora_edge::Bundle;
using nora_edge::BundleError;
using json = nlohmann::ordered_json;

namespace {

json tensors(const std::vector<nora_edge::TensorInfo> &ts) {
    json out = json::array();
    for (const auto &t : ts) {
        json shape = json::array();
        for (size_t i = 0; i < t.dims.size(); i++) shape.push_back(t.dims[i] < 0 ? json(t.dim_names[i]) : json(t.dims[i]));
        out.push_back({{"name", t.name}, {"dtype", t.dtype}, {"shape", shape}});
    }
    return out;
}

json component(const nora_edge::ComponentInfo &c) {
    return {{"file", c.file},           {"data_files", c.data_files}, {"precision", c.precision},
            {"inputs", tensors(c.inputs)}, {"outputs", tensors(c.outputs)}};
}

json opt(int64_t v) { return v < 0 ? json(nullptr) : json(v); }
json str_or_null(const std::string &s) { return s.empty() ? json(nullptr) : json(s); }

json to_json(const Bundle &b) {
    const auto &im = b.image;
    json post = json::array();
    for (const auto &s : b.postprocess) post.push_back({{"op", s.op}, {"key", str_or_null(s.key)}});
    json vision = component(b.vision);
    vision["patch_size"] = b.vision.patch_size;
    vision["spatial_merge_size"] = b.vision.spatial_merge_size;
    vision["window_size"] = b.vision.window_size;
    vision["grid_thw"] = b.vision.fixed_grid ? json(std::vector<int64_t>(b.vision.grid_thw, b.vision.grid_thw + 3))
                                             : json(nullptr);
    json decoder = component(b.decoder);
    decoder["num_layers"] = b.decoder.num_layers;
    decoder["num_kv_heads"] = b.decoder.num_kv_heads;
    decoder["head_dim"] = b.decoder.head_dim;
    decoder["hidden_size"] = b.decoder.hidden_size;
    decoder["kv_cache"] = str_or_null(b.decoder.kv_cache);
    decoder["max_len"] = opt(b.decoder.max_len);
    decoder["num_rows"] = opt(b.decoder.num_rows);
    decoder["graph"] = str_or_null(b.decoder.graph);
    return {
        {"dir", b.dir},
        {"schema_version", b.schema_version},
        {"prompt",
         {{"prefix_ids", b.prompt.prefix_ids},
          {"image_pad_id", b.prompt.image_pad_id},
          {"vision_start_id", b.prompt.vision_start_id},
          {"vision_end_id", b.prompt.vision_end_id},
          {"suffix_ids", b.prompt.suffix_ids},
          {"tokenizer", b.prompt.tokenizer},
          {"spatial_merge_size", b.prompt.spatial_merge_size},
          {"max_instruction_tokens", b.prompt.max_instruction_tokens},
          {"forbidden_ids", b.prompt.forbidden_ids},
          {"forbidden_range", {b.prompt.forbidden_range_begin, b.prompt.forbidden_range_end}}}},
        {"image",
         {{"height", im.spec.height},
          {"width", im.spec.width},
          {"patch_size", im.spec.patch_size},
          {"temporal_patch_size", im.spec.temporal_patch_size},
          {"merge_size", im.spec.merge_size},
          {"mean", std::vector<float>(im.spec.mean, im.spec.mean + 3)},
          {"std", std::vector<float>(im.spec.std, im.spec.std + 3)},
          {"resized_height", im.resized_height},
          {"resized_width", im.resized_width},
          {"min_pixels", im.min_pixels},
          {"max_pixels", im.max_pixels},
          {"rescale_factor", im.rescale_factor},
          {"grid_thw", std::vector<int64_t>(im.grid_thw, im.grid_thw + 3)},
          {"pixel_values_size", nora_edge_pixel_values_size(&im.spec)}}},
        {"vision", vision},
        {"decoder", decoder},
        {"embeddings", {{"file", b.embeddings.file}, {"dtype", b.embeddings.dtype}, {"shape", b.embeddings.shape}}},
        {"actions",
         {{"base", b.actions.base},
          {"count", b.actions.count},
          {"head", b.actions.head},
          {"head_rows", b.actions.head_rows},
          {"end_ids", b.actions.end_ids}}},
        {"generation",
         {{"eos_token_ids", b.generation.eos_token_ids},
          {"repetition_penalty", b.generation.has_repetition_penalty ? json(b.generation.repetition_penalty)
                                                                      : json(nullptr)},
          {"max_new_tokens", opt(b.generation.max_new_tokens)},
          {"max_length", opt(b.generation.max_length)},
          {"pad_token_id", opt(b.generation.pad_token_id)}}},
        {"codec",
         {{"scale", b.codec.scale},
          {"min_token", b.codec.min_token},
          {"vocab_size", b.codec.vocab_size},
          {"time_horizon", b.codec.time_horizon},
          {"action_dim", b.codec.action_dim},
          {"byte_table", b.codec.byte_table},
          {"tokenizer", b.codec.tokenizer},
          {"processor_config", b.codec.processor_config},
          {"native", str_or_null(b.codec.native)}}},
        {"norm_stats_keys", b.norm_stats_keys},
        {"postprocess", post},
    };
}

int usage() {
    std::fprintf(stderr, "usage: bundle_check [--hash] DIR [--rows ID...] | --sha256 FILE... | --half-table\n");
    return 2;
}

}  // namespace

int main(int argc, char **argv) {
    if (argc < 2) return usage();
    if (std::strcmp(argv[1], "--sha256") == 0) {
        for (int i = 2; i < argc; i++) {
            char hex[65];
            if (nora_edge_priv_sha256_file(argv[i], hex) != 0) {
                std::printf("ERR %s\n", std::strerror(errno));
                continue;
            }
            std::printf("%s\n", hex);
        }
        return 0;
    }
    if (std::strcmp(argv[1], "--half-table") == 0) {
        for (uint32_t h = 0; h < 65536; h++) std::printf("%08" PRIx32 "\n", nora_edge::half_to_float_bits(static_cast<uint16_t>(h)));
        return 0;
    }
    int i = 1;
    bool hash = false;
    if (std::strcmp(argv[i], "--hash") == 0) hash = true, i++;
    if (i >= argc) return usage();
    const std::string dir = argv[i++];
    std::vector<int64_t> ids;
    if (i < argc) {
        if (std::strcmp(argv[i++], "--rows") != 0) return usage();
        for (; i < argc; i++) {
            char *end = nullptr;
            long long v = std::strtoll(argv[i], &end, 10);
            if (!*argv[i] || *end) return usage();
            ids.push_back(v);
        }
    }
    try {
        Bundle b = Bundle::load(dir, hash);
        json out = to_json(b);
        if (!ids.empty()) {
            nora_edge::Npy table = nora_edge::Npy::open(b.path(b.embeddings.file), b.embeddings.dtype, b.embeddings.shape);
            std::vector<float> rows(ids.size() * static_cast<size_t>(table.cols()));
            table.gather_f32(ids.data(), ids.size(), rows.data());
            json bits = json::array();
            for (size_t r = 0; r < ids.size(); r++) {
                std::vector<uint32_t> row(static_cast<size_t>(table.cols()));
                std::memcpy(row.data(), rows.data() + r * row.size(), row.size() * 4);
                bits.push_back(row);
            }
            out["rows_bits"] = bits;
        }
        std::printf("%s\n", out.dump().c_str());
    } catch (const BundleError &e) {
        std::printf("ERR %d %s\n", static_cast<int>(e.status()), e.what());
        return 1;
    }
    return 0;
}

/* policy.cpp: nora_edge.h's policy object: create (NoraPolicy.load), info, select_action's queue, reset,
 * destroy. The chunk itself is policy_step.cpp. Every C entry point catches the internal C++ exceptions and
 * returns their status with the message in nora_edge_last_error(); nothing throws across the C ABI.
 */
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>

#include "edge/edge_error.h"
#include "edge/policy_impl.h"

namespace nora_edge {
namespace {

[[noreturn]] void fail(nora_edge_status status, const std::string &msg) { throw BundleError(status, msg); }

KvLayout kv_layout(const Bundle &b) {
    const std::string &kv = b.decoder.kv_cache;
    if (kv == "shared") return KvLayout::Shared;
    if (kv == "static") return KvLayout::Static;
    fail(NORA_EDGE_ERR_UNSUPPORTED,
         b.dir + ": the decoder graph keeps a growing KV cache (components.decoder.meta.kv_cache " +
             (kv.empty() ? std::string("absent") : "'" + kv + "'") +
             "); libnora_edge runs fixed-buffer graphs: export with --decoder-graph fused (onnxruntime) or "
             "--target tensorrt");
}

const TensorInfo *find_input(const ComponentInfo &c, const std::string &name) {
    for (const auto &t : c.inputs)
        if (t.name == name) return &t;
    return nullptr;
}

PromptBuilder make_prompt(const Bundle &b, const Tokenizer &tok) {
    PromptPieces pc;
    pc.prefix_ids = b.prompt.prefix_ids;
    pc.suffix_ids = b.prompt.suffix_ids;
    pc.image_pad_id = b.prompt.image_pad_id;
    pc.vision_end_id = b.prompt.vision_end_id;
    pc.spatial_merge_size = b.prompt.spatial_merge_size;
    pc.max_instruction_tokens = b.prompt.max_instruction_tokens;
    /* NoraPolicy.load: the tokenizer's added tokens + the action range (the builder adds pad and vision end) */
    for (int32_t id : tok.added_ids()) pc.forbidden_ids.push_back(id);
    for (int64_t id = b.actions.base; id < b.actions.base + b.actions.count; id++) pc.forbidden_ids.push_back(id);
    try {
        return PromptBuilder(std::move(pc));
    } catch (const PromptError &e) {
        fail(e.status(), e.what());
    }
}

void check_shapes(PolicyState &st) {
    const Bundle &b = st.bundle;
    if (!b.vision.fixed_grid)
        fail(NORA_EDGE_ERR_UNSUPPORTED, b.dir + ": the vision graph takes a dynamic grid (host index tensors); "
                                                "libnora_edge runs a graph specialised to one grid (the default export)");
    for (int i = 0; i < 3; i++)
        if (b.vision.grid_thw[i] != b.image.grid_thw[i])
            fail(NORA_EDGE_ERR_BUNDLE, "manifest.json: the vision graph is specialised to another grid than the "
                                       "image section gives");
    st.vision_patches = b.image.grid_thw[0] * b.image.grid_thw[1] * b.image.grid_thw[2];
    const size_t n = nora_edge_pixel_values_size(&b.image.spec);
    if (n == 0 || st.vision_patches <= 0 || n % (size_t)st.vision_patches)
        fail(NORA_EDGE_ERR_BUNDLE, "manifest.json: image section gives no valid pixel_values size");
    st.vision_features = (int64_t)(n / (size_t)st.vision_patches);
    const int64_t m = b.vision.spatial_merge_size;
    st.image_tokens = m > 0 ? st.vision_patches / (m * m) : 0;
    const DecoderInfo &d = b.decoder;
    st.layers = d.num_layers, st.kv_heads = d.num_kv_heads, st.head_dim = d.head_dim, st.hidden = d.hidden_size;
    st.max_len = d.max_len;
    st.head_rows = b.actions.head_rows;
    st.rows = (int64_t)st.head_rows.size();
    if (st.max_len < 1 || st.layers < 1 || st.kv_heads < 1 || st.head_dim < 1 || st.hidden < 1 || st.rows < 1 ||
        st.image_tokens < 1)
        fail(NORA_EDGE_ERR_BUNDLE, "manifest.json: decoder meta lacks max_len / num_layers / num_kv_heads / "
                                   "head_dim / hidden_size, or the head has no rows");
    if (d.num_rows >= 0 && d.num_rows != st.rows)
        fail(NORA_EDGE_ERR_BUNDLE, "manifest.json: components.decoder.meta.num_rows " + std::to_string(d.num_rows) +
                                       " != the action head's " + std::to_string(st.rows) + " rows");
    if (st.embeddings.cols() != st.hidden)
        fail(NORA_EDGE_ERR_BUNDLE, "manifest.json: embeddings width " + std::to_string(st.embeddings.cols()) +
                                       " != decoder hidden_size " + std::to_string(st.hidden));
    const char *pos_input = st.layout == KvLayout::Shared ? "attention_mask" : "cache_position";
    for (const char *name : {"inputs_embeds", "position_ids", pos_input})
        if (!find_input(d, name))
            fail(NORA_EDGE_ERR_BUNDLE, std::string("manifest.json: the decoder graph has no input '") + name + "'");
    for (int64_t l = 0; l < st.layers; l++)
        for (const char *kind : {"key", "value"}) {
            st.kv_in_names.push_back("past_key_values." + std::to_string(l) + "." + kind);
            st.kv_out_names.push_back("present." + std::to_string(l) + "." + kind);
            if (!find_input(d, st.kv_in_names.back()))
                fail(NORA_EDGE_ERR_BUNDLE, "manifest.json: the decoder graph has no input '" + st.kv_in_names.back() + "'");
        }
}

void open_codec(PolicyState &st) {
    const Bundle &b = st.bundle;
    if (b.codec.native.empty())
        fail(NORA_EDGE_ERR_BUNDLE, b.dir + ": the manifest lists no codec/native/ tables (re-export the bundle)");
    std::string dir = b.path(b.codec.native);
    const size_t slash = dir.rfind('/');
    if (dir.size() > 4 && dir.compare(dir.size() - 4, 4, ".txt") == 0 && slash != std::string::npos)
        dir = dir.substr(0, slash);  /* the manifest names native.txt; the context reads its directory */
    nora_fast_ctx *ctx = nullptr;
    if (nora_fast_ctx_open(dir.c_str(), &ctx) != NORA_FAST_OK)
        fail(NORA_EDGE_ERR_BUNDLE, std::string("codec/native: ") + nora_fast_last_error());
    st.fast.reset(ctx);
    nora_fast_info fi{};
    nora_fast_ctx_info(ctx, &fi);
    if (fi.n_rows != st.rows || fi.vocab_size != b.actions.count || fi.time_horizon != b.codec.time_horizon ||
        fi.action_dim != b.codec.action_dim)
        fail(NORA_EDGE_ERR_BUNDLE, "codec/native: (n_rows, V, T, D) of the tables disagree with the manifest");
    st.horizon = fi.time_horizon, st.action_dim = fi.action_dim, st.max_tokens = fi.max_ids;
    st.action_rows.assign((size_t)fi.vocab_size, -1);
    for (int64_t r = 0; r < st.rows; r++) {
        const int64_t k = st.head_rows[(size_t)r] - b.actions.base;
        if (k >= 0 && k < fi.vocab_size) st.action_rows[(size_t)k] = (int32_t)r;
    }
    if (std::count(st.action_rows.begin(), st.action_rows.end(), -1))
        fail(NORA_EDGE_ERR_BUNDLE, "manifest.json: the decoder head lacks rows for some action ids");
}

// NORA_EDGE_ERR_UNSUPPORTED unless the loaded onnxruntime offers the provider (and the ones it falls back to)
static void check_provider(nora_ort *ort, int32_t provider) {
    if (provider == NORA_EDGE_PROVIDER_CPU) return;
    const char *need[2] = {"CUDAExecutionProvider", provider == NORA_EDGE_PROVIDER_TENSORRT ? "TensorrtExecutionProvider"
                                                                                            : nullptr};
    char have[512] = "";
    for (const char *name : need) {
        if (!name) continue;
        int found = nora_ort_has_provider(ort, name, have, sizeof have);
        if (found == 0)
            fail(NORA_EDGE_ERR_UNSUPPORTED, std::string("this onnxruntime (") + nora_ort_version(ort) + ") has no " +
                                                name + " (it has: " + have +
                                                "); a GPU needs an onnxruntime built with it, e.g. the onnxruntime-gpu "
                                                "wheel for the Jetson's JetPack");
        if (found < 0) fail(NORA_EDGE_ERR_RUNTIME, "onnxruntime cannot list its execution providers");
    }
}

void open_graphs(PolicyState &st) {
    const char *lib = st.options.onnxruntime_path ? st.options.onnxruntime_path : std::getenv("NORA_EDGE_ONNXRUNTIME");
    if (!lib || !*lib)
        fail(NORA_EDGE_ERR_INPUT, "no onnxruntime library: set nora_policy_options.onnxruntime_path or "
                                  "$NORA_EDGE_ONNXRUNTIME (the pip wheel's onnxruntime/capi/libonnxruntime.so.1.*)");
    char err[1024] = "";
    nora_ort *ort = nullptr;
    if (nora_ort_open(lib, &ort, err, sizeof err)) fail(NORA_EDGE_ERR_RUNTIME, err);
    st.ort.reset(ort);
    const nora_policy_options &o = st.options;
    check_provider(ort, o.provider);
    const nora_graph_options gopt = {o.threads, o.provider, o.device_id, o.trt_cache_dir, o.trt_fp16};
    // a GPU provider that fails to start (no device, driver mismatch) is the system's failure, not the bundle's
    const nora_edge_status open_fail = o.provider == NORA_EDGE_PROVIDER_CPU ? NORA_EDGE_ERR_BUNDLE : NORA_EDGE_ERR_RUNTIME;
    nora_graph *g = nullptr;
    if (nora_graph_open_ex(ort, st.bundle.path(st.bundle.vision.file).c_str(), &gopt, &g, err, sizeof err))
        fail(open_fail, err);
    st.vision.reset(g);
    g = nullptr;
    if (nora_graph_open_ex(ort, st.bundle.path(st.bundle.decoder.file).c_str(), &gopt, &g, err, sizeof err))
        fail(open_fail, err);
    st.decoder.reset(g);
}

void allocate(PolicyState &st) {
    const size_t L = (size_t)st.max_len;
    st.kv.assign((size_t)(2 * st.layers) * kv_buffer_stride(st), 0.0f);
    st.pixels.resize((size_t)(st.vision_patches * st.vision_features));
    st.image_embeds.resize((size_t)(st.image_tokens * st.hidden));
    st.embeds.resize(L * (size_t)st.hidden);
    st.logits.resize((size_t)st.rows);
    st.ids.resize(L), st.positions.resize(3 * L), st.step_positions.resize(3 * L);
    st.ones.assign(L, 1), st.cache_position.resize(L), st.sorted_prompt.resize(L);
    st.seen.resize((size_t)st.rows), st.seen_prompt.resize((size_t)st.rows);
    const size_t T = (size_t)st.max_tokens;
    st.out_ids.resize(T), st.top_ids.resize(T), st.classes.resize(T), st.fast_ids.resize(T);
    st.chunk.resize((size_t)(st.horizon * st.action_dim));
    st.queue.resize(st.chunk.size());
}

/* NoraPolicy._prefill_prefix: the constant prefix (system turn .. <|vision_start|>) into KV slots [0, P) */
void prefill_prefix(PolicyState &st) {
    const std::vector<int64_t> &pre = st.bundle.prompt.prefix_ids;
    const int64_t P = (int64_t)pre.size();
    if (P < 1 || P >= st.max_len)
        fail(NORA_EDGE_ERR_BUNDLE, "manifest.json: the prompt prefix (" + std::to_string(P) +
                                       " tokens) does not fit the decoder's max_len " + std::to_string(st.max_len));
    st.embeddings.gather_f32(pre.data(), pre.size(), st.embeds.data());
    for (int64_t a = 0; a < 3; a++)
        for (int64_t i = 0; i < P; i++) st.positions[(size_t)(a * P + i)] = i;
    decoder_forward(st, 0, P, st.positions.data());
    st.prefix_len = P;
}

}  // namespace
}  // namespace nora_edge

using namespace nora_edge;

extern "C" {

NORA_EDGE_API void nora_policy_options_init(nora_policy_options *o) {
    if (!o) return;
    std::memset(o, 0, sizeof *o);
    o->struct_size = sizeof *o;
    o->forced_tokens = NORA_EDGE_FORCED_REFUSE;
    o->decoding = NORA_EDGE_DECODE_PLAIN;
    o->max_draft = 6;  /* nora_edge/multitoken.py DEFAULT_MAX_DRAFT */
    o->tie_margin = 1e-3;  /* DEFAULT_TIE_MARGIN */
    o->gate_rate = 0.0;    /* MultiTokenConfig defaults: no gate, fixed K */
    o->adaptive_draft = 0;
    o->bundle_drafts = 1;  /* MultiTokenConfig.bundle_drafts */
}

NORA_EDGE_API nora_edge_status nora_policy_create(const char *bundle_dir, const nora_policy_options *options,
                                                  nora_policy **out) {
    if (!out) return nora_edge_priv_fail(NORA_EDGE_ERR_INPUT, "nora_policy_create: NULL out");
    *out = nullptr;
    if (!bundle_dir || !*bundle_dir) return nora_edge_priv_fail(NORA_EDGE_ERR_INPUT, "nora_policy_create: no bundle_dir");
    nora_policy_options opts;
    nora_policy_options_init(&opts);
    if (options) {
        if (options->struct_size < offsetof(nora_policy_options, max_repaired) + sizeof(int32_t) ||
            options->struct_size > sizeof opts)
            return nora_edge_priv_fail(NORA_EDGE_ERR_INPUT, "nora_policy_create: options.struct_size %zu (call "
                                       "nora_policy_options_init)", options->struct_size);
        std::memcpy(&opts, options, options->struct_size);  // an older caller's smaller struct: the rest defaults
        opts.struct_size = sizeof opts;
    }
    if (opts.provider < NORA_EDGE_PROVIDER_CPU || opts.provider > NORA_EDGE_PROVIDER_TENSORRT)
        return nora_edge_priv_fail(NORA_EDGE_ERR_INPUT, "provider must be NORA_EDGE_PROVIDER_CPU, _CUDA or _TENSORRT, "
                                   "got %d", opts.provider);
    if (opts.device_id < 0)
        return nora_edge_priv_fail(NORA_EDGE_ERR_INPUT, "device_id must be >= 0, got %d", opts.device_id);
    if (opts.threads < 0)
        return nora_edge_priv_fail(NORA_EDGE_ERR_INPUT, "threads must be >= 0, got %d", opts.threads);
    if (opts.forced_tokens != NORA_EDGE_FORCED_REFUSE && opts.forced_tokens != NORA_EDGE_FORCED_FLAG)
        return nora_edge_priv_fail(NORA_EDGE_ERR_INPUT, "forced_tokens must be NORA_EDGE_FORCED_REFUSE or "
                                   "NORA_EDGE_FORCED_FLAG, got %d", opts.forced_tokens);
    if (opts.max_repaired < 0)
        return nora_edge_priv_fail(NORA_EDGE_ERR_INPUT, "max_repaired must be >= 0, got %d", opts.max_repaired);
    if (opts.decoding != NORA_EDGE_DECODE_PLAIN && opts.decoding != NORA_EDGE_DECODE_MULTI_TOKEN)
        return nora_edge_priv_fail(NORA_EDGE_ERR_INPUT, "decoding must be NORA_EDGE_DECODE_PLAIN or "
                                   "NORA_EDGE_DECODE_MULTI_TOKEN, got %d", opts.decoding);
    if (opts.max_draft < 1 || opts.max_draft > NORA_EDGE_MAX_DRAFT_LIMIT)
        return nora_edge_priv_fail(NORA_EDGE_ERR_INPUT, "max_draft must be in [1, %d], got %d",
                                   NORA_EDGE_MAX_DRAFT_LIMIT, opts.max_draft);
    if (!std::isfinite(opts.tie_margin))
        return nora_edge_priv_fail(NORA_EDGE_ERR_INPUT, "tie_margin must be a finite number (negative: guard off), "
                                   "got %g", opts.tie_margin);
    if (!(opts.gate_rate >= 0.0 && opts.gate_rate <= 1.0))
        return nora_edge_priv_fail(NORA_EDGE_ERR_INPUT, "gate_rate must be a number in [0, 1] (0: no gate), got %g",
                                   opts.gate_rate);
    if (opts.adaptive_draft != 0 && opts.adaptive_draft != 1)
        return nora_edge_priv_fail(NORA_EDGE_ERR_INPUT, "adaptive_draft must be 0 or 1, got %d", opts.adaptive_draft);
    if (opts.bundle_drafts != 0 && opts.bundle_drafts != 1)
        return nora_edge_priv_fail(NORA_EDGE_ERR_INPUT, "bundle_drafts must be 0 or 1, got %d", opts.bundle_drafts);
    std::unique_ptr<PolicyState> state;
    nora_edge_status rc = guarded("nora_policy_create", [&] {
        Bundle b = Bundle::load(bundle_dir, opts.verify_hashes != 0);
        Npy emb = Npy::open(b.path(b.embeddings.file), b.embeddings.dtype, b.embeddings.shape);
        Tokenizer tok = [&] {
            try {
                return Tokenizer::load(b.path(b.prompt.tokenizer));
            } catch (const TokenizerError &e) {
                throw BundleError(e.status(), e.what());
            }
        }();
        PromptBuilder pb = make_prompt(b, tok);
        state = std::make_unique<PolicyState>(std::move(b), std::move(emb), std::move(tok), std::move(pb));
        PolicyState &st = *state;
        st.options = opts;
        st.layout = kv_layout(st.bundle);
        check_shapes(st);
        open_codec(st);
        open_graphs(st);
        allocate(st);
        bind_decode_step(st);
        if (opts.decoding == NORA_EDGE_DECODE_MULTI_TOKEN) bind_verify(st);  /* multitoken.cpp */
        if (opts.decoding == NORA_EDGE_DECODE_MULTI_TOKEN && opts.bundle_drafts && !st.bundle.drafts.empty()) {
            try {  /* MultiTokenDecoding.seed_from: the draft table starts with the bundle's calibration chunks */
                st.draft_table.seed(st.bundle.path(st.bundle.drafts), st.embeddings.rows());
            } catch (const DraftsError &e) {
                fail(NORA_EDGE_ERR_BUNDLE, e.what());
            }
        }
        prefill_prefix(st);
    });
    if (rc != NORA_EDGE_OK) return rc;
    nora_policy *p = new (std::nothrow) nora_policy;
    if (!p) return nora_edge_priv_fail(NORA_EDGE_ERR_NOMEM, "nora_policy_create: out of memory");
    p->state = std::move(state);
    *out = p;
    return NORA_EDGE_OK;
}

NORA_EDGE_API void nora_policy_destroy(nora_policy *policy) { delete policy; }

NORA_EDGE_API nora_edge_status nora_policy_get_info(const nora_policy *policy, nora_policy_info *info) {
    if (!policy || !info) return nora_edge_priv_fail(NORA_EDGE_ERR_INPUT, "nora_policy_get_info: NULL argument");
    if (info->struct_size != sizeof *info)
        return nora_edge_priv_fail(NORA_EDGE_ERR_INPUT, "nora_policy_get_info: info.struct_size %zu != %zu",
                                   info->struct_size, sizeof *info);
    const PolicyState &st = *policy->state;
    info->time_horizon = st.horizon;
    info->action_dim = st.action_dim;
    info->max_tokens = st.max_tokens;
    info->num_unnorm_keys = (int32_t)st.bundle.norm_stats_keys.size();
    info->prefix_tokens = (int32_t)st.prefix_len;
    info->max_len = (int32_t)st.max_len;
    std::snprintf(info->onnxruntime_version, sizeof info->onnxruntime_version, "%s", nora_ort_version(st.ort.get()));
    return NORA_EDGE_OK;
}

NORA_EDGE_API nora_edge_status nora_policy_reset(nora_policy *policy) {
    if (!policy) return nora_edge_priv_fail(NORA_EDGE_ERR_INPUT, "nora_policy_reset: NULL policy");
    PolicyState &st = *policy->state;
    std::lock_guard<std::mutex> hold(st.lock);
    st.queue_next = st.queue_rows = 0;
    st.queue_has_key = false;
    return NORA_EDGE_OK;
}

}  // extern "C"

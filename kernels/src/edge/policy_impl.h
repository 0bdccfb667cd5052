/* policy_impl.h: the nora_policy object behind nora_edge.h's policy calls (internal C++17).
 *
 * Data flow of create (nora_edge/policy.py NoraPolicy.load): Bundle::load (bundle.h: manifest, sizes, optional
 * sha256) -> fixed-buffer decoder and fixed-grid vision graph required -> Npy embeddings (memory-mapped),
 * Tokenizer, PromptBuilder (forbidden ids: the tokenizer's added tokens + the action range, as Python) ->
 * onnxruntime (dlopen) sessions for both graphs -> libnora_fast context from codec/native/ -> every buffer a
 * chunk needs allocated once (KV (2 * layers, kv_heads, max_len, head_dim), embeddings (max_len, H), logits,
 * ids, positions, masks; with multi-token decoding also the verify call's logits_all (max_draft + 1, rows), its
 * binding and values per S) -> the prompt prefix prefilled into KV slots [0, P).
 * A step (policy_step.cpp, the decode loops in greedy.cpp / multitoken.cpp) then only writes into these buffers.
 */
#ifndef NORA_EDGE_POLICY_IMPL_H
#define NORA_EDGE_POLICY_IMPL_H

#include <cstdint>
#include <memory>
#include <new>
#include <mutex>
#include <string>
#include <vector>

#include "edge/bundle.h"
#include "edge/drafts.h"
#include "edge/edge_error.h"
#include "edge/prompt.h"
#include "edge/tokenizer.h"
#include "nora_edge.h"
#include "nora_fast.h"
extern "C" {
#include "ort/ort_run.h"  /* a C header without extern "C" guards */
}

namespace nora_edge {

/* 64-byte aligned storage for the buffers onnxruntime reads and writes (its own allocator aligns to 64; the
 * decoder's KV in malloc'd memory, 16 bytes past a page start, ran its decode step ~3% slower) */
template <class T>
struct Aligned64 {
    using value_type = T;
    Aligned64() = default;
    template <class U>
    Aligned64(const Aligned64<U> &) noexcept {}
    T *allocate(std::size_t n) {
        if (n > (std::size_t)-1 / sizeof(T) - 64) throw std::bad_alloc();
        void *p = ::operator new(n * sizeof(T), std::align_val_t(64));
        return static_cast<T *>(p);
    }
    void deallocate(T *p, std::size_t) noexcept { ::operator delete(p, std::align_val_t(64)); }
    template <class U>
    bool operator==(const Aligned64<U> &) const noexcept { return true; }
    template <class U>
    bool operator!=(const Aligned64<U> &) const noexcept { return false; }
};
template <class T>
using AVec = std::vector<T, Aligned64<T>>;

/* Decoder KV layouts (components.decoder.meta.kv_cache; nora_edge/static_kv.py) */
enum class KvLayout { Shared, Static };

struct OrtDeleter {
    void operator()(nora_ort *p) const { nora_ort_close(p); }
};
struct GraphDeleter {
    void operator()(nora_graph *p) const { nora_graph_close(p); }
};
struct ValueDeleter {
    void operator()(nora_value *p) const { nora_value_free(p); }
};
struct BindingDeleter {
    void operator()(nora_binding *p) const { nora_binding_free(p); }
};
using Value = std::unique_ptr<nora_value, ValueDeleter>;
struct FastDeleter {
    void operator()(nora_fast_ctx *p) const { nora_fast_ctx_free(p); }
};

struct PolicyState {
    Bundle bundle;
    Npy embeddings;
    Tokenizer tokenizer;
    PromptBuilder prompt;
    nora_policy_options options{};
    std::unique_ptr<nora_ort, OrtDeleter> ort;
    std::unique_ptr<nora_graph, GraphDeleter> vision, decoder;
    std::unique_ptr<nora_fast_ctx, FastDeleter> fast;
    KvLayout layout = KvLayout::Shared;

    /* shapes */
    int64_t layers = 0, kv_heads = 0, head_dim = 0, hidden = 0, max_len = 0, rows = 0;
    int64_t vision_patches = 0, vision_features = 0, image_tokens = 0;
    int32_t horizon = 0, action_dim = 0, max_tokens = 0;
    int64_t prefix_len = 0;
    std::vector<int64_t> head_rows;      /* (rows,) Qwen id of each logit row */
    std::vector<int32_t> action_rows;    /* (V,) logit row of FAST id k (= base + k) */
    std::vector<std::string> kv_in_names, kv_out_names;  /* (2 * layers,) key, value per layer */

    /* buffers, allocated once */
    AVec<float> kv;               /* (2 * layers, kv_heads, max_len, head_dim) */
    AVec<float> pixels;           /* (patches, features) */
    AVec<float> image_embeds;     /* (image_tokens, hidden) */
    AVec<float> embeds;           /* (max_len, hidden) */
    AVec<float> logits;           /* (rows,) */
    AVec<int64_t> ids, positions; /* (max_len,), (3, max_len) */
    AVec<int64_t> step_positions; /* (3, max_len): a graph call's (3, 1, S) position input */
    AVec<int64_t> ones;           /* (max_len,) attention mask of ones */
    AVec<int64_t> cache_position; /* (max_len,) static layout's slots */
    std::vector<int64_t> sorted_prompt;  /* (max_len,) for the repetition-penalty marks */
    std::vector<uint8_t> seen;           /* (rows,) */
    std::vector<uint8_t> seen_prompt;    /* (rows,) the prompt's marks: a decode loop starts from them */
    std::vector<int64_t> out_ids, top_ids;  /* (max_tokens,) */
    std::vector<int32_t> classes, fast_ids; /* (max_tokens,) */
    std::vector<double> chunk;           /* (T, D) the last step's actions before they are handed out */

    /* the decode step's binding, made once (bind_decode_step): KV and logits bound for good; per token only the
     * attention mask of the new length (one value per length, made at create) is rebound. Declared after the
     * graphs and buffers it refers to, so it is destroyed first. */
    std::vector<Value> kv_values, mask_values;
    Value logits_value, step_embeds_value, step_pos_value, step_cpos_value;
    std::unique_ptr<nora_binding, BindingDeleter> step_binding;

    /* multi-token decoding (options.decoding == NORA_EDGE_DECODE_MULTI_TOKEN; multitoken.cpp): the verify call's
     * binding (KV in place as the step's; per call the S-sized values below and the mask of the new length are
     * rebound), its buffers and the draft table. Values indexed by S - 1, S = 1 .. max_draft + 1. */
    AVec<float> first_logits;            /* (rows,) the prefill's logits, kept for the fallback */
    AVec<float> logits_all;              /* (max_draft + 1, rows) */
    std::vector<int64_t> drafts;         /* (max_draft,) Qwen ids proposed */
    std::vector<int64_t> embeds_ids;     /* (max_draft + 1,) a verify call's ids: pending, d1 .. dn */
    std::vector<int32_t> draft_fast;     /* (max_draft,) the same as FAST ids (-1 outside the action range) */
    std::vector<Value> verify_embeds_values, verify_pos_values, verify_logits_values, verify_cpos_values;
    std::unique_ptr<nora_binding, BindingDeleter> verify_binding;
    DraftTable draft_table;              /* lives as long as the policy (nora_policy_reset keeps it) */

    /* select_action queue (NoraPolicy._queue) */
    std::vector<double> queue;           /* (T, D) */
    int32_t queue_next = 0, queue_rows = 0;
    bool queue_has_key = false, queue_key_null = false;
    std::string queue_instruction, queue_key;

    std::mutex lock;

    PolicyState(Bundle b, Npy e, Tokenizer t, PromptBuilder p)
        : bundle(std::move(b)), embeddings(std::move(e)), tokenizer(std::move(t)), prompt(std::move(p)) {}
};

/* Floats between the starts of two KV buffers in PolicyState::kv: one buffer plus 64 bytes times an odd count, so
 * the 2 * layers buffers (each a multiple of 4 KiB) do not all start at the same offset modulo 4 KiB. */
inline size_t kv_buffer_stride(const PolicyState &st) {
    return (size_t)(st.kv_heads * st.max_len * st.head_dim) + 16 * 3;
}

/* Run the decoder graph on `s` new tokens whose embeddings are embeds[0 : s) and whose positions are
 * positions (3, s) row-major, written at KV slots [length, length + s); logits land in state.logits.
 * Throws BundleError(NORA_EDGE_ERR_RUNTIME) naming the onnxruntime call, (INPUT) on KV overflow. */
void decoder_forward(PolicyState &st, int64_t length, int64_t s, const int64_t *positions);

/* Create the decode step's values and binding (after every buffer has its final size). Throws BundleError. */
void bind_decode_step(PolicyState &st);

/* One decoder call for the generated token whose embedding is in embeds[0] and positions in step_positions[0:3],
 * written at KV slot `index`, through the persistent binding (no allocation in this library). */
void decoder_step(PolicyState &st, int64_t index);

/* Multi-token decoding's buffers, values and verify binding (multitoken.cpp; after bind_decode_step).
 * Throws BundleError: NORA_EDGE_ERR_BUNDLE when the decoder graph has no logits_all output. */
void bind_verify(PolicyState &st);

/* The verify call: `s` new tokens (embeddings embeds[0 : s), positions step_positions (3, s)) written at KV slots
 * [length, length + s); logits of every new position into logits_all (s, rows). No allocation in this library. */
void decoder_verify(PolicyState &st, int64_t length, int64_t s);

/* Run body() and turn the internal exceptions into the nora_edge.h status and thread message (`what` names the C
 * call in runtime / memory messages): the one place nothing throws across the C ABI. */
template <class Body>
nora_edge_status guarded(const char *what, Body &&body) {
    try {
        body();
        return NORA_EDGE_OK;
    } catch (const BundleError &e) {
        return nora_edge_priv_fail(e.status(), "%s", e.what());
    } catch (const PromptError &e) {
        return nora_edge_priv_fail(e.status(), "%s", e.what());
    } catch (const TokenizerError &e) {
        return nora_edge_priv_fail(e.status(), "%s", e.what());
    } catch (const std::bad_alloc &) {
        return nora_edge_priv_fail(NORA_EDGE_ERR_NOMEM, "%s: out of memory", what);
    } catch (const std::exception &e) {
        return nora_edge_priv_fail(NORA_EDGE_ERR_RUNTIME, "%s: %s", what, e.what());
    }
}

/* One chunk into st.chunk / out_ids / classes (policy_step.cpp). Throws BundleError with the status. */
struct StepResult {
    int32_t num_tokens = 0;
    int32_t class_counts[3] = {0, 0, 0};
    int64_t prompt_tokens = 0;
    double preprocess_s = 0, vision_s = 0, prefill_s = 0, decode_s = 0, detokenize_s = 0, total_s = 0;
    double step_min_s = 0, step_max_s = 0;
    int32_t decoder_calls = 0, verify_calls = 0, proposed = 0, accepted = 0;  /* nora_chunk_info (ABI 0.4) */
    bool fallback = false;
    bool refused = false;                /* the REFUSE rule refused it: message in `why` */
    std::string why;
};
StepResult run_chunk(PolicyState &st, const uint8_t *rgb, int32_t height, int32_t width, size_t stride,
                     const char *instruction, const char *unnorm_key);

}  // namespace nora_edge

struct nora_policy {
    std::unique_ptr<nora_edge::PolicyState> state;
};

#endif /* NORA_EDGE_POLICY_IMPL_H */

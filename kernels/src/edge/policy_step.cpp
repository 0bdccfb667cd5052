/* policy_step.cpp: one chunk of the nora_policy object (nora_edge/policy.py NoraPolicy._run_chunk, same order of
 * checks and steps):
 *   unnorm key -> post program (Chain.stats_for's rules) -> instruction ids (PromptBuilder.instruction_ids) ->
 *   RGB frame --nora_edge_preprocess--> pixel_values --vision graph--> image embeddings (n, H) ->
 *   prompt ids + mrope positions (PromptBuilder.build_into) -> prefill of tokens [P, S) after the prefix KV, the
 *   image run's rows replaced by the vision output (generate.prefill) -> constrained greedy loop (decode.h:
 *   plain, generate.greedy, one decoder step per token at slot `index`; or multi-token, nora_edge/multitoken.py,
 *   drafts verified several per decoder call, the same ids) -> FAST ids (the action range) ->
 *   nora_fast_decode_f64 (strict decode, float64 DCT-III, the bundle's post chain) -> (T, D) float64 ->
 *   forced-token rule (chunk.check_forced_tokens).
 * Hot path: everything lives in PolicyState's buffers, allocated at create; a token rebinds the attention mask of
 * its length (values made at create) on a binding made at create and runs it: no allocation in this library
 * (onnxruntime's Run works in its own arena). The prefill binds per chunk (nora_graph_run).
 */
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <string>

#include "edge/decode.h"
#include "edge/edge_error.h"
#include "edge/policy_impl.h"
#include "onnxruntime_c_api.h"

namespace nora_edge {
namespace {

using Clock = std::chrono::steady_clock;
double seconds(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

[[noreturn]] void fail(nora_edge_status status, const std::string &msg) { throw BundleError(status, msg); }

std::string keys_text(const std::vector<std::string> &keys) {
    std::string s = "[";
    for (size_t i = 0; i < keys.size(); i++) s += (i ? ", " : "") + py_repr(keys[i]);
    return s + "]";
}

/* postprocess.Chain.stats_for + native.program_key: the libnora_fast program serving this call */
int resolve_program(const PolicyState &st, const char *unnorm_key) {
    const Bundle &b = st.bundle;
    const PostStep *un = nullptr;
    for (const auto &s : b.postprocess)
        if (s.op == "unnormalize") un = &s;
    const bool caller_keyed = !un || (un->mode == "q01_q99" && un->key.empty());  /* absent: NORA's default */
    const std::vector<std::string> &keys = b.norm_stats_keys;
    if (caller_keyed) {
        if (!unnorm_key) {
            if (keys.size() != 1)
                fail(NORA_EDGE_ERR_INPUT, "unnorm_key is required: the bundle has " + std::to_string(keys.size()) +
                                              " keys " + keys_text(keys));
            unnorm_key = keys[0].c_str();
        } else if (!std::binary_search(keys.begin(), keys.end(), std::string(unnorm_key))) {
            fail(NORA_EDGE_ERR_INPUT, "unknown unnorm_key " + py_repr(unnorm_key) + "; the bundle has " + keys_text(keys));
        }
        int err = 0;
        const int p = nora_fast_program(st.fast.get(), unnorm_key, &err);
        if (p < 0) fail(NORA_EDGE_ERR_BUNDLE, "codec/native: no post program for unnorm key " + py_repr(unnorm_key));
        return p;
    }
    if (unnorm_key && un->key != unnorm_key)
        fail(NORA_EDGE_ERR_INPUT, "unnorm_key " + py_repr(unnorm_key) + " given, but the bundle's chain fixes its "
                                  "statistics (unnormalize " + un->mode + (un->key.empty() ? "" : " with " + py_repr(un->key)) +
                                  "); pass unnorm_key=NULL");
    int err = 0;
    const int p = nora_fast_program(st.fast.get(), nullptr, &err);
    if (p < 0) fail(NORA_EDGE_ERR_BUNDLE, "codec/native: the fixed chain has no single post program");
    return p;
}

nora_tensor tensor(const char *name, void *data, int elem, const int64_t *shape, size_t ndim) {
    return nora_tensor{name, data, elem, shape, ndim};
}

void run_vision(PolicyState &st) {
    const int64_t in_shape[2] = {st.vision_patches, st.vision_features};
    const int64_t out_shape[2] = {st.image_tokens, st.hidden};
    const nora_tensor in = tensor("pixel_values", st.pixels.data(), ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, in_shape, 2);
    const nora_tensor out =
        tensor("image_embeds", st.image_embeds.data(), ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, out_shape, 2);
    char err[1024] = "";
    if (nora_graph_run(st.vision.get(), &in, 1, &out, 1, err, sizeof err)) fail(NORA_EDGE_ERR_RUNTIME, err);
}

/* chunk.first_violation + check_forced_tokens' message */
bool refused(const PolicyState &st, int32_t n, const int32_t counts[3], std::string &why) {
    int32_t repaired = 0;
    for (int32_t i = 0; i < n; i++) {
        std::string reason;
        if (st.classes[(size_t)i] == NORA_EDGE_TOKEN_FORCED) {
            reason = "the model chose to end the chunk here (forced_continue)";
        } else if (st.classes[(size_t)i] == NORA_EDGE_TOKEN_REPAIRED && ++repaired > st.options.max_repaired) {
            reason = "repaired token number " + std::to_string(repaired) +
                     " (max_repaired=" + std::to_string(st.options.max_repaired) + ")";
        }
        if (reason.empty()) continue;
        why = "chunk refused at step " + std::to_string(i) + " of " + std::to_string(n) + ": " + reason +
              "; token classes {'model': " + std::to_string(counts[0]) + ", 'repaired': " +
              std::to_string(counts[1]) + ", 'forced_continue': " + std::to_string(counts[2]) +
              "}; the model's top choice there was id " + std::to_string(st.top_ids[(size_t)i]) +
              ", the automaton emitted " + std::to_string(st.out_ids[(size_t)i]) +
              " (create the policy with forced_tokens = NORA_EDGE_FORCED_FLAG to receive such chunks flagged)";
        return true;
    }
    return false;
}

}  // namespace

void decoder_forward(PolicyState &st, int64_t length, int64_t s, const int64_t *positions) {
    if (s < 1 || length < 0 || length + s > st.max_len)
        fail(NORA_EDGE_ERR_INPUT, "KV cache overflow: " + std::to_string(length) + " tokens held + " +
                                      std::to_string(s) + " new > max_len " + std::to_string(st.max_len) +
                                      " slots of the decoder graph");
    const size_t L = (size_t)st.layers;
    const int64_t emb_shape[3] = {1, s, st.hidden}, pos_shape[3] = {3, 1, s};
    const int64_t mask_shape[2] = {1, length + s}, cpos_shape[1] = {s};
    const int64_t kv_shape[4] = {1, st.kv_heads, st.max_len, st.head_dim}, logit_shape[2] = {1, st.rows};
    const size_t kv_stride = kv_buffer_stride(st);
    nora_tensor in[3 + 2 * 64], out[1 + 2 * 64];
    if (L > 64) fail(NORA_EDGE_ERR_UNSUPPORTED, "decoder graphs with more than 64 layers");
    in[0] = tensor("inputs_embeds", st.embeds.data(), ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, emb_shape, 3);
    in[1] = tensor("position_ids", const_cast<int64_t *>(positions), ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, pos_shape, 3);
    if (st.layout == KvLayout::Shared) {
        in[2] = tensor("attention_mask", st.ones.data(), ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, mask_shape, 2);
    } else {
        for (int64_t i = 0; i < s; i++) st.cache_position[(size_t)i] = length + i;
        in[2] = tensor("cache_position", st.cache_position.data(), ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, cpos_shape, 1);
    }
    out[0] = tensor("logits", st.logits.data(), ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, logit_shape, 2);
    for (size_t j = 0; j < 2 * L; j++) {  /* past and present on the same buffer: written in place */
        float *buf = st.kv.data() + j * kv_stride;
        in[3 + j] = tensor(st.kv_in_names[j].c_str(), buf, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, kv_shape, 4);
        out[1 + j] = tensor(st.kv_out_names[j].c_str(), buf, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, kv_shape, 4);
    }
    char err[1024] = "";
    if (nora_graph_run(st.decoder.get(), in, 3 + 2 * L, out, 1 + 2 * L, err, sizeof err))
        fail(NORA_EDGE_ERR_RUNTIME, err);
}

void bind_decode_step(PolicyState &st) {
    char err[1024] = "";
    auto make = [&](const char *name, void *data, int elem, const int64_t *shape, size_t ndim) {
        const nora_tensor t = tensor(name, data, elem, shape, ndim);
        nora_value *v = nullptr;
        if (nora_value_create(st.ort.get(), &t, &v, err, sizeof err)) fail(NORA_EDGE_ERR_RUNTIME, err);
        return Value(v);
    };
    const int64_t kv_shape[4] = {1, st.kv_heads, st.max_len, st.head_dim}, logit_shape[2] = {1, st.rows};
    const int64_t emb_shape[3] = {1, 1, st.hidden}, pos_shape[3] = {3, 1, 1}, one[1] = {1};
    const int F = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, I = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
    const size_t stride = kv_buffer_stride(st);
    for (size_t j = 0; j < st.kv_in_names.size(); j++)
        st.kv_values.push_back(make(st.kv_in_names[j].c_str(), st.kv.data() + j * stride, F, kv_shape, 4));
    st.logits_value = make("logits", st.logits.data(), F, logit_shape, 2);
    st.step_embeds_value = make("inputs_embeds", st.embeds.data(), F, emb_shape, 3);
    st.step_pos_value = make("position_ids", st.step_positions.data(), I, pos_shape, 3);
    if (st.layout == KvLayout::Shared) {
        for (int64_t k = 1; k <= st.max_len; k++) {  /* (1, k) masks of ones, one per cache length */
            const int64_t shape[2] = {1, k};
            st.mask_values.push_back(make("attention_mask", st.ones.data(), I, shape, 2));
        }
    } else {
        st.step_cpos_value = make("cache_position", st.cache_position.data(), I, one, 1);
    }
    nora_binding *b = nullptr;
    if (nora_binding_create(st.decoder.get(), &b, err, sizeof err)) fail(NORA_EDGE_ERR_RUNTIME, err);
    st.step_binding.reset(b);
    int rc = nora_binding_input(b, "inputs_embeds", st.step_embeds_value.get(), err, sizeof err) ||
             nora_binding_input(b, "position_ids", st.step_pos_value.get(), err, sizeof err) ||
             nora_binding_output(b, "logits", st.logits_value.get(), err, sizeof err);
    if (!rc && st.layout == KvLayout::Static)
        rc = nora_binding_input(b, "cache_position", st.step_cpos_value.get(), err, sizeof err);
    for (size_t j = 0; !rc && j < st.kv_values.size(); j++)  /* past and present on the same buffer */
        rc = nora_binding_input(b, st.kv_in_names[j].c_str(), st.kv_values[j].get(), err, sizeof err) ||
             nora_binding_output(b, st.kv_out_names[j].c_str(), st.kv_values[j].get(), err, sizeof err);
    if (rc) fail(NORA_EDGE_ERR_RUNTIME, err);
}

void decoder_step(PolicyState &st, int64_t index) {
    if (index < 0 || index + 1 > st.max_len)
        fail(NORA_EDGE_ERR_INPUT, "KV cache overflow: " + std::to_string(index) + " tokens held + 1 new > max_len " +
                                      std::to_string(st.max_len) + " slots of the decoder graph");
    char err[1024] = "";
    int rc = 0;
    if (st.layout == KvLayout::Shared)
        rc = nora_binding_input(st.step_binding.get(), "attention_mask", st.mask_values[(size_t)index].get(), err,
                                sizeof err);
    else
        st.cache_position[0] = index;
    if (!rc) rc = nora_binding_run(st.step_binding.get(), err, sizeof err);
    if (rc) fail(NORA_EDGE_ERR_RUNTIME, err);
}

StepResult run_chunk(PolicyState &st, const uint8_t *rgb, int32_t height, int32_t width, size_t stride,
                     const char *instruction, const char *unnorm_key) {
    StepResult r;
    const Clock::time_point t0 = Clock::now();
    const int program = resolve_program(st, unnorm_key);  /* InputError before any graph runs */
    if (!instruction) fail(NORA_EDGE_ERR_INPUT, "instruction is NULL");
    const std::vector<int32_t> instr = st.prompt.instruction_ids(st.tokenizer, instruction);
    int64_t grid[3] = {0, 0, 0};
    nora_edge_status rc = nora_edge_preprocess(rgb, height, width, stride, &st.bundle.image.spec, st.pixels.data(),
                                               st.pixels.size(), grid);
    if (rc != NORA_EDGE_OK) fail(rc, nora_edge_last_error());
    const Clock::time_point t1 = Clock::now();
    run_vision(st);
    const Clock::time_point t2 = Clock::now();
    const PromptInfo pi = st.prompt.build_into(instr, grid, 1, st.ids.data(), st.positions.data(),
                                               (size_t)st.max_len, instruction);
    const int64_t S = (int64_t)pi.length, P = st.prefix_len;
    if (pi.num_image_tokens != st.image_tokens)
        fail(NORA_EDGE_ERR_BUNDLE, "vision graph returned " + std::to_string(st.image_tokens) +
                                       " embeddings, the prompt holds " + std::to_string(pi.num_image_tokens));
    if (pi.image_start != P) fail(NORA_EDGE_ERR_BUNDLE, "the prompt's image run does not start after the prefix");
    /* prefill [P, S): text rows from the table, the image run's rows from the vision graph */
    const int64_t n = S - P;
    st.embeddings.gather_f32(st.ids.data() + P, (size_t)n, st.embeds.data());
    std::memcpy(st.embeds.data(), st.image_embeds.data(), st.image_embeds.size() * sizeof(float));
    for (int64_t a = 0; a < 3; a++)
        std::memcpy(st.step_positions.data() + a * n, st.positions.data() + a * S + P, (size_t)n * sizeof(int64_t));
    decoder_forward(st, P, n, st.step_positions.data());
    const Clock::time_point t3 = Clock::now();

    /* greedy (generate.greedy, constrained): seen = np.isin(head rows, prompt ids) */
    std::copy(st.ids.begin(), st.ids.begin() + S, st.sorted_prompt.begin());
    std::sort(st.sorted_prompt.begin(), st.sorted_prompt.begin() + S);
    for (int64_t row = 0; row < st.rows; row++)
        st.seen_prompt[(size_t)row] = std::binary_search(st.sorted_prompt.begin(), st.sorted_prompt.begin() + S,
                                                         st.head_rows[(size_t)row]);
    Selector sel(st);
    sel.reset();
    if (st.options.decoding == NORA_EDGE_DECODE_MULTI_TOKEN)
        multitoken_loop(st, sel, S, pi.rope_delta, instruction, r);  /* decode.h */
    else
        greedy_loop(st, sel, st.logits.data(), S, pi.rope_delta, r);
    int32_t count = sel.count();
    std::memcpy(r.class_counts, sel.class_counts(), sizeof r.class_counts);
    const Clock::time_point t4 = Clock::now();
    int32_t seq_status = 0, error_pos = -1;
    if (nora_fast_decode_f64(st.fast.get(), 1, st.fast_ids.data(), count, &count, program, st.chunk.data(), nullptr,
                             &seq_status, &error_pos) != NORA_FAST_OK)
        fail(NORA_EDGE_ERR_DETOKENIZE, std::string("codec: decode status '") +
                                           nora_fast_seq_status_name(seq_status) + "' (" + nora_fast_last_error() + ")");
    const Clock::time_point t5 = Clock::now();
    r.num_tokens = count;
    r.prompt_tokens = S;
    r.preprocess_s = seconds(t0, t1), r.vision_s = seconds(t1, t2), r.prefill_s = seconds(t2, t3);
    r.decode_s = seconds(t3, t4), r.detokenize_s = seconds(t4, t5), r.total_s = seconds(t0, t5);
    if (st.options.forced_tokens == NORA_EDGE_FORCED_REFUSE) r.refused = refused(st, count, r.class_counts, r.why);
    return r;
}

}  // namespace nora_edge

using namespace nora_edge;

namespace {

nora_edge_status step_locked(PolicyState &st, const uint8_t *rgb, int32_t height, int32_t width, size_t stride,
                             const char *instruction, const char *unnorm_key, StepResult &r) {
    const nora_edge_status rc = guarded("nora_policy_step", [&] {
        r = run_chunk(st, rgb, height, width, stride, instruction, unnorm_key);
    });
    if (rc != NORA_EDGE_OK) return rc;
    return r.refused ? nora_edge_priv_fail(NORA_EDGE_ERR_FORCED, "%s", r.why.c_str()) : NORA_EDGE_OK;
}

}  // namespace

extern "C" {

NORA_EDGE_API nora_edge_status nora_policy_step(nora_policy *policy, const uint8_t *rgb, int32_t height,
                                                int32_t width, size_t stride, const char *instruction,
                                                const char *unnorm_key, double *actions, size_t actions_len,
                                                int64_t *token_ids, int32_t *token_classes, size_t tokens_len,
                                                nora_chunk_info *info) {
    if (!policy || !actions)
        return nora_edge_priv_fail(NORA_EDGE_ERR_INPUT, "nora_policy_step: NULL %s", policy ? "actions" : "policy");
    PolicyState &st = *policy->state;
    const size_t want = st.chunk.size();
    if (actions_len < want)
        return nora_edge_priv_fail(NORA_EDGE_ERR_INPUT, "nora_policy_step: actions_len %zu < T*D = %zu",
                                   actions_len, want);
    if ((token_ids || token_classes) && tokens_len < (size_t)st.max_tokens)
        return nora_edge_priv_fail(NORA_EDGE_ERR_INPUT, "nora_policy_step: tokens_len %zu < max_tokens %d",
                                   tokens_len, st.max_tokens);
    const size_t info_v03 = offsetof(nora_chunk_info, decoder_calls);  /* a caller built against ABI 0.3 */
    if (info && info->struct_size != sizeof *info && info->struct_size != info_v03)
        return nora_edge_priv_fail(NORA_EDGE_ERR_INPUT, "nora_policy_step: info.struct_size %zu is neither %zu "
                                   "(ABI 0.4) nor %zu (ABI 0.3)", info->struct_size, sizeof *info, info_v03);
    std::lock_guard<std::mutex> hold(st.lock);
    StepResult r;
    const nora_edge_status rc = step_locked(st, rgb, height, width, stride, instruction, unnorm_key, r);
    if (rc != NORA_EDGE_OK && rc != NORA_EDGE_ERR_FORCED) return rc;
    for (int32_t i = 0; i < r.num_tokens; i++) {
        if (token_ids) token_ids[i] = st.out_ids[(size_t)i];
        if (token_classes) token_classes[i] = st.classes[(size_t)i];
    }
    if (info) {
        info->num_tokens = r.num_tokens;
        std::memcpy(info->class_counts, r.class_counts, sizeof r.class_counts);
        info->flagged = r.class_counts[1] + r.class_counts[2] > 0;
        info->prompt_tokens = (int32_t)r.prompt_tokens;
        info->preprocess_s = r.preprocess_s, info->vision_s = r.vision_s, info->prefill_s = r.prefill_s;
        info->decode_s = r.decode_s, info->detokenize_s = r.detokenize_s, info->total_s = r.total_s;
        info->decode_step_min_s = r.step_min_s, info->decode_step_max_s = r.step_max_s;
        if (info->struct_size == sizeof *info) {  /* ABI 0.4 */
            info->decoder_calls = r.decoder_calls, info->verify_calls = r.verify_calls;
            info->proposed = r.proposed, info->accepted = r.accepted, info->fallback = r.fallback;
        }
    }
    if (rc == NORA_EDGE_OK) std::memcpy(actions, st.chunk.data(), want * sizeof(double));
    return rc;
}

NORA_EDGE_API nora_edge_status nora_policy_select_action(nora_policy *policy, const uint8_t *rgb, int32_t height,
                                                         int32_t width, size_t stride, const char *instruction,
                                                         const char *unnorm_key, double *action,
                                                         size_t action_len, int32_t *new_chunk) {
    if (new_chunk) *new_chunk = 0;
    if (!policy || !action || !instruction)
        return nora_edge_priv_fail(NORA_EDGE_ERR_INPUT, "nora_policy_select_action: NULL %s",
                                   !policy ? "policy" : !action ? "action" : "instruction");
    PolicyState &st = *policy->state;
    if (action_len < (size_t)st.action_dim)
        return nora_edge_priv_fail(NORA_EDGE_ERR_INPUT, "nora_policy_select_action: action_len %zu < D = %d",
                                   action_len, st.action_dim);
    /* validate_image on every call, as NoraPolicy.select_action */
    if (!rgb || height < 1 || width < 1 || stride < (size_t)width * 3)
        return nora_edge_priv_fail(NORA_EDGE_ERR_INPUT, "nora_policy_select_action: bad frame (rgb %s, %d x %d, "
                                   "stride %zu)", rgb ? "set" : "NULL", height, width, stride);
    std::lock_guard<std::mutex> hold(st.lock);
    const bool same = st.queue_has_key && st.queue_instruction == instruction &&
                      st.queue_key_null == (unnorm_key == nullptr) && (!unnorm_key || st.queue_key == unnorm_key);
    if (!same) st.queue_next = st.queue_rows = 0;
    if (st.queue_next >= st.queue_rows) {
        st.queue_next = st.queue_rows = 0;
        st.queue_has_key = false;
        StepResult r;
        const nora_edge_status rc = step_locked(st, rgb, height, width, stride, instruction, unnorm_key, r);
        if (rc != NORA_EDGE_OK) return rc;
        std::copy(st.chunk.begin(), st.chunk.end(), st.queue.begin());
        st.queue_rows = st.horizon;
        st.queue_has_key = true;
        st.queue_instruction = instruction;
        st.queue_key_null = unnorm_key == nullptr;
        st.queue_key = unnorm_key ? unnorm_key : "";
        if (new_chunk) *new_chunk = 1;
    }
    std::memcpy(action, st.queue.data() + (size_t)st.queue_next * (size_t)st.action_dim,
                (size_t)st.action_dim * sizeof(double));
    st.queue_next++;
    return NORA_EDGE_OK;
}

}  // extern "C"

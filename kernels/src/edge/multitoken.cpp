/* multitoken.cpp: lossless multi-token decoding in libnora_edge, the port of nora_edge/multitoken.py
 * (multitoken_greedy, MultiTokenDecoding.generate) for the fixed-buffer decoders (fused "shared" / "static" KV).
 *
 * Data flow per chunk (decode.h): gate (DraftTable::enabled, per instruction, when gate_rate > 0) -> first token
 * from the prefill's logits -> loop until the chunk is complete:
 *   DraftTable::propose(tokens so far, k) -> Selector::admissible (cut where the automaton refuses) -> d1..dn
 *   n == 0: one plain decoder step (the sequential graph call), choose on its logits;
 *   n > 0:  ONE verify call on [pending, d1..dn] (S = n + 1 positions at KV slots [index, index + S)) reading the
 *           decoder's logits_all (S, rows) -> choose position by position: a choice equal to d_{i+1} accepts it,
 *           the first that differs (or the choice after dn) is the bonus token -> index += 1 + accepted (with fixed
 *           KV buffers the rollback is only the held length: rejected rows lie above it, are never attended
 *           (attention mask / cache_position of the held length) and the next call overwrites them);
 *           k = max_draft, or with adaptive_draft: max_draft after a fully accepted call, else
 *           min(max_draft, max(1, 2 * accepted)).
 *   tie guard (tie_margin >= 0): from the first verify call on, every choice must win by >= tie_margin
 *   (Selector::margin_ok) or the chunk is re-decoded by the plain loop from the prefill (first_logits, the
 *   prompt's seen marks; the KV held length back to the prompt) and counted as a fallback.
 * -> DraftTable::observe(instruction, ids); record(proposed, accepted) when the gate was open.
 * One addition to Python: drafts are cut so that a verify call never writes past the decoder's max_len KV slots
 * (where Python's fixed-buffer decoder would raise CacheOverflowError); it changes nothing below that bound.
 * The verify call runs through a binding made at create: per call the inputs_embeds / position_ids /
 * logits_all values of its S and the attention mask of the new length (or cache_position) are rebound.
 */
#include <algorithm>
#include <cstring>
#include <string>

#include "edge/decode.h"
#include "onnxruntime_c_api.h"

namespace nora_edge {
namespace {

[[noreturn]] void fail(nora_edge_status status, const std::string &msg) { throw BundleError(status, msg); }

constexpr const char *kLogitsAll = "logits_all";

/* One attempt at the chunk; false on a near tie (the caller falls back). */
bool attempt(PolicyState &st, Selector &sel, const DraftTable::Table *own, bool drafting, int64_t index,
             int64_t rope_delta, StepResult &r) {
    const nora_policy_options &o = st.options;
    const bool guard = o.tie_margin >= 0;
    const int max_draft = o.max_draft;
    const int64_t rows = st.rows;
    bool drifted = false;
    int k = max_draft;
    int64_t token = sel.choose(st.first_logits.data());
    while (!sel.stopped()) {
        int n = drafting ? st.draft_table.propose(own, st.out_ids.data(), sel.count(), k, st.drafts.data()) : 0;
        n = std::min<int64_t>(n, st.max_len - index - 1);  /* never past the KV slots (the plain loop's bound) */
        if (n > 0) n = sel.admissible(st.drafts.data(), n);
        if (n == 0) {
            plain_step(st, token, index, rope_delta, r);
            if (drifted && guard && !sel.margin_ok(st.logits.data(), o.tie_margin)) return false;
            token = sel.choose(st.logits.data());
            index++;
            continue;
        }
        const int64_t s = n + 1;
        const CallTimer timer;
        st.embeds_ids[0] = token;
        std::copy(st.drafts.begin(), st.drafts.begin() + n, st.embeds_ids.begin() + 1);
        st.embeddings.gather_f32(st.embeds_ids.data(), (size_t)s, st.embeds.data());
        if (decode_positions(index, rope_delta, (size_t)s, st.step_positions.data(), st.step_positions.size()) !=
            NORA_EDGE_OK)
            fail(NORA_EDGE_ERR_INPUT, "decode position overflow");
        decoder_verify(st, index, s);
        timer.done(r);
        r.verify_calls++;
        r.proposed += n;
        drifted = true;
        int accepted = 0;
        for (int64_t i = 0; i < s; i++) {
            const float *row = st.logits_all.data() + i * rows;
            if (guard && !sel.margin_ok(row, o.tie_margin)) return false;
            token = sel.choose(row);
            if (i < n && token == st.embeds_ids[(size_t)(i + 1)]) {
                accepted++;  /* the draft was the greedy choice */
                if (!sel.stopped()) continue;
            }
            break;  /* the bonus token (a choice no draft matched), or the chunk is complete */
        }
        r.accepted += accepted;
        if (o.adaptive_draft) k = accepted == n ? max_draft : std::min(max_draft, std::max(1, 2 * accepted));
        index += 1 + accepted;  /* KV held: pending + accepted drafts */
    }
    return true;
}

}  // namespace

void bind_verify(PolicyState &st) {
    const DecoderInfo &d = st.bundle.decoder;
    if (std::none_of(d.outputs.begin(), d.outputs.end(), [](const TensorInfo &t) { return t.name == kLogitsAll; }))
        fail(NORA_EDGE_ERR_BUNDLE, st.bundle.dir + ": the decoder graph has no output 'logits_all' "
                                   "(components.decoder.outputs): multi-token decoding needs a bundle exported with "
                                   "`nora-edge export --multi-token` (export_bundle(..., multi_token=True))");
    const int64_t S = (int64_t)st.options.max_draft + 1;
    st.first_logits.resize((size_t)st.rows);
    st.logits_all.resize((size_t)(S * st.rows));
    st.drafts.resize((size_t)st.options.max_draft);
    st.draft_fast.resize((size_t)st.options.max_draft);
    st.embeds_ids.resize((size_t)S);
    char err[1024] = "";
    auto make = [&](const char *name, void *data, int elem, const int64_t *shape, size_t ndim) {
        const nora_tensor t{name, data, elem, shape, ndim};
        nora_value *v = nullptr;
        if (nora_value_create(st.ort.get(), &t, &v, err, sizeof err)) fail(NORA_EDGE_ERR_RUNTIME, err);
        return Value(v);
    };
    const int F = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, I = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
    for (int64_t s = 1; s <= S; s++) {
        const int64_t emb[3] = {1, s, st.hidden}, pos[3] = {3, 1, s}, lg[3] = {1, s, st.rows}, cpos[1] = {s};
        st.verify_embeds_values.push_back(make("inputs_embeds", st.embeds.data(), F, emb, 3));
        st.verify_pos_values.push_back(make("position_ids", st.step_positions.data(), I, pos, 3));
        st.verify_logits_values.push_back(make(kLogitsAll, st.logits_all.data(), F, lg, 3));
        if (st.layout == KvLayout::Static)
            st.verify_cpos_values.push_back(make("cache_position", st.cache_position.data(), I, cpos, 1));
    }
    nora_binding *b = nullptr;
    if (nora_binding_create(st.decoder.get(), &b, err, sizeof err)) fail(NORA_EDGE_ERR_RUNTIME, err);
    st.verify_binding.reset(b);
    int rc = 0;
    for (size_t j = 0; !rc && j < st.kv_values.size(); j++)  /* past and present on the same buffer */
        rc = nora_binding_input(b, st.kv_in_names[j].c_str(), st.kv_values[j].get(), err, sizeof err) ||
             nora_binding_output(b, st.kv_out_names[j].c_str(), st.kv_values[j].get(), err, sizeof err);
    if (rc) fail(NORA_EDGE_ERR_RUNTIME, err);
}

void decoder_verify(PolicyState &st, int64_t length, int64_t s) {
    if (s < 1 || (size_t)s > st.verify_embeds_values.size() || length < 0 || length + s > st.max_len)
        fail(NORA_EDGE_ERR_INPUT, "KV cache overflow: " + std::to_string(length) + " tokens held + " +
                                      std::to_string(s) + " new > max_len " + std::to_string(st.max_len) +
                                      " slots of the decoder graph");
    nora_binding *b = st.verify_binding.get();
    const size_t i = (size_t)(s - 1);
    char err[1024] = "";
    int rc = nora_binding_input(b, "inputs_embeds", st.verify_embeds_values[i].get(), err, sizeof err) ||
             nora_binding_input(b, "position_ids", st.verify_pos_values[i].get(), err, sizeof err) ||
             nora_binding_output(b, kLogitsAll, st.verify_logits_values[i].get(), err, sizeof err);
    if (!rc && st.layout == KvLayout::Shared) {
        rc = nora_binding_input(b, "attention_mask", st.mask_values[(size_t)(length + s - 1)].get(), err, sizeof err);
    } else if (!rc) {
        for (int64_t j = 0; j < s; j++) st.cache_position[(size_t)j] = length + j;
        rc = nora_binding_input(b, "cache_position", st.verify_cpos_values[i].get(), err, sizeof err);
    }
    if (!rc) rc = nora_binding_run(b, err, sizeof err);
    if (rc) fail(NORA_EDGE_ERR_RUNTIME, err);
}

void multitoken_loop(PolicyState &st, Selector &sel, int64_t index, int64_t rope_delta,
                     const std::string &instruction, StepResult &r) {
    DraftTable &table = st.draft_table;
    const double gate = st.options.gate_rate;
    const bool on = gate > 0 ? table.enabled(instruction, gate) : true;  /* MultiTokenDecoding.generate */
    std::copy(st.logits.begin(), st.logits.end(), st.first_logits.begin());
    sel.reset();
    if (!attempt(st, sel, table.own(instruction), on, index, rope_delta, r)) {
        r.fallback = true;  /* a near tie: the plain loop from the prefill (KV held length back to the prompt) */
        sel.reset();
        greedy_loop(st, sel, st.first_logits.data(), index, rope_delta, r);
    }
    table.observe(instruction, st.out_ids.data(), sel.count());
    if (on) table.record(instruction, r.proposed, r.accepted);
}

}  // namespace nora_edge

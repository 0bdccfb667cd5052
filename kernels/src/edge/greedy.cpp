/* greedy.cpp: the per-position selection (Selector, nora_edge/generate.py GreedySelector in constrained mode) and
 * the plain sequential loop (generate.greedy), shared by plain and multi-token decoding (decode.h).
 * Per token: one nora_fast_select call on the logits row, the chosen row marked as seen, one decoder step
 * through the persistent binding; nothing is allocated.
 */
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>

#include "edge/decode.h"

namespace nora_edge {
namespace {

[[noreturn]] void fail(nora_edge_status status, const std::string &msg) { throw BundleError(status, msg); }

}  // namespace

Selector::Selector(PolicyState &st)
    : st_(st),
      penalise_(st.bundle.generation.has_repetition_penalty && st.bundle.generation.repetition_penalty != 1.0),
      penalty_(penalise_ ? (float)st.bundle.generation.repetition_penalty : 1.0f),
      total_(st.horizon * st.action_dim),
      limit_(st.max_tokens) {}

void Selector::reset() {
    std::copy(st_.seen_prompt.begin(), st_.seen_prompt.end(), st_.seen.begin());
    done_ = pending_ = count_ = 0;
    counts_[0] = counts_[1] = counts_[2] = 0;
    stopped_ = false;
}

int64_t Selector::choose(const float *logits) {
    PolicyState &st = st_;
    int32_t fid = -1, top = -1, status = 0;
    if (nora_fast_select(st.fast.get(), 1, logits, st.rows, penalise_ ? st.seen.data() : nullptr, penalty_, &done_,
                         &pending_, &fid, &top, &status) != NORA_FAST_OK)
        fail(NORA_EDGE_ERR_DETOKENIZE, std::string("constrained decoding: selection status '") +
                                           nora_fast_sel_status_name(status) + "' after " + std::to_string(count_) +
                                           " tokens (" + nora_fast_last_error() + ")");
    const int32_t row = st.action_rows[(size_t)fid];
    const int64_t token = st.head_rows[(size_t)row], top_id = st.head_rows[(size_t)top];
    const std::vector<int64_t> &eos = st.bundle.generation.eos_token_ids;
    int32_t cls = NORA_EDGE_TOKEN_MODEL;
    if (row != top)
        cls = std::find(eos.begin(), eos.end(), top_id) != eos.end() ? NORA_EDGE_TOKEN_FORCED
                                                                      : NORA_EDGE_TOKEN_REPAIRED;
    const size_t i = (size_t)count_;
    st.out_ids[i] = token, st.top_ids[i] = top_id, st.classes[i] = cls;
    st.fast_ids[i] = fid;  /* every generated id is in the action range (constrained) */
    counts_[cls]++;
    count_++;
    if (done_ == total_ && pending_ == 0) {
        stopped_ = true;
    } else if (count_ >= limit_) {
        fail(NORA_EDGE_ERR_DETOKENIZE, "constrained decoding did not complete within " + std::to_string(limit_) +
                                           " tokens");
    }
    return token;
}

bool Selector::margin_ok(const float *logits, double tie_margin) const {
    float gap_all = 0, gap_allowed = 0;
    if (nora_fast_gap(st_.fast.get(), logits, penalise_ ? st_.seen.data() : nullptr, penalty_, done_, pending_,
                      &gap_all, &gap_allowed) != NORA_FAST_OK)
        fail(NORA_EDGE_ERR_DETOKENIZE, std::string("multi-token tie check: ") + nora_fast_last_error());
    double gap = gap_all;  /* Python's min(gap_all, gap_allowed): the second only when strictly smaller */
    if ((double)gap_allowed < gap) gap = gap_allowed;
    return gap >= tie_margin;  /* NaN: false */
}

int Selector::admissible(const int64_t *drafts, int n) const {
    const int64_t base = st_.bundle.actions.base, V = (int64_t)st_.action_rows.size();
    for (int i = 0; i < n; i++) {
        const int64_t f = drafts[i] - base;
        st_.draft_fast[(size_t)i] = f >= 0 && f < V ? (int32_t)f : -1;  /* -1: outside, the walk stops there */
    }
    int32_t keep = 0;
    if (nora_fast_admissible(st_.fast.get(), done_, pending_, st_.draft_fast.data(), n, &keep, nullptr, nullptr) !=
        NORA_FAST_OK)
        fail(NORA_EDGE_ERR_DETOKENIZE, std::string("multi-token drafts: ") + nora_fast_last_error());
    return keep;
}

void plain_step(PolicyState &st, int64_t token, int64_t index, int64_t rope_delta, StepResult &r) {
    const CallTimer timer;
    st.embeddings.gather_f32(&token, 1, st.embeds.data());
    if (decode_positions(index, rope_delta, 1, st.step_positions.data(), 3) != NORA_EDGE_OK)
        fail(NORA_EDGE_ERR_INPUT, "decode position overflow");
    decoder_step(st, index);
    timer.done(r);
}

void greedy_loop(PolicyState &st, Selector &sel, const float *first, int64_t index, int64_t rope_delta,
                 StepResult &r) {
    int64_t token = sel.choose(first);
    while (!sel.stopped()) {
        plain_step(st, token, index, rope_delta, r);
        token = sel.choose(st.logits.data());
        index++;
    }
}

}  // namespace nora_edge

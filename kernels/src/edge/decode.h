/* decode.h: the constrained greedy decode loops of one chunk (internal C++17), after the prefill.
 *
 * Data flow: prefill logits (rows,) --Selector::choose (nora_edge/generate.py GreedySelector: libnora_fast's
 * nora_fast_select = repetition penalty, the model's own top row, masked argmax, lowest-id ties, automaton
 * advance; token class; stop when the chunk holds exactly T*D coefficients; DETOKENIZE past max_tokens)--> token
 *   plain (greedy.cpp, generate.greedy): one decoder step per token (decoder_step) -> logits -> choose ...
 *   multi-token (multitoken.cpp, nora_edge/multitoken.py multitoken_greedy): DraftTable proposals cut by the
 *     automaton (Selector::admissible) -> one verify call on [pending, d1..dK] -> logits_all (S, rows) -> choose
 *     position by position, accept the agreeing prefix + one bonus token, KV held length back to the kept tokens;
 *     tie guard (Selector::margin_ok) with fallback to the plain loop from the prefill.
 * Both write st.out_ids / top_ids / classes / fast_ids and the counters of StepResult.
 */
#ifndef NORA_EDGE_DECODE_H
#define NORA_EDGE_DECODE_H

#include <chrono>
#include <cstdint>
#include <string>

#include "edge/policy_impl.h"

namespace nora_edge {

class Selector {
  public:
    explicit Selector(PolicyState &st);

    /* Start state: seen = the prompt's marks (st.seen_prompt), nothing generated, counts zero. */
    void reset();

    /* Choose the next token from raw logits (rows,) and record it (id, top id, class, FAST id); sets stopped()
     * once the chunk is complete. Throws BundleError(NORA_EDGE_ERR_DETOKENIZE) as the plain loop always did. */
    int64_t choose(const float *logits);

    /* Whether the coming choice on `logits` wins by >= tie_margin: min(top-2 gap over all rows, over the allowed
     * ids) of the penalised scores, compared as nora_edge/multitoken.py check_margin (NaN fails). */
    bool margin_ok(const float *logits, double tie_margin) const;

    /* How many of the Qwen ids drafts[0 : n) the automaton accepts from the current state (drafts.admissible);
     * st.draft_fast receives their FAST ids. */
    int admissible(const int64_t *drafts, int n) const;

    bool stopped() const { return stopped_; }
    int32_t count() const { return count_; }
    const int32_t *class_counts() const { return counts_; }

  private:
    PolicyState &st_;
    bool penalise_;
    float penalty_;
    int32_t done_ = 0, pending_ = 0, count_ = 0, total_, limit_;
    int32_t counts_[3] = {0, 0, 0};
    bool stopped_ = false;
};

/* Wall time of decoder calls into StepResult (decoder_calls, step min / max). */
struct CallTimer {
    using Clock = std::chrono::steady_clock;
    Clock::time_point t0 = Clock::now();
    void done(StepResult &r) const {
        const double s = std::chrono::duration<double>(Clock::now() - t0).count();
        if (r.decoder_calls == 0 || s < r.step_min_s) r.step_min_s = s;
        if (r.decoder_calls == 0 || s > r.step_max_s) r.step_max_s = s;
        r.decoder_calls++;
    }
};

/* generate.greedy: the plain loop from `first` (rows,) with the KV holding `index` tokens (the prompt). */
/* One plain decoder step: ``token`` at slot ``index`` (embedding, mrope position, the bound step), timed into ``r``;
 * its logits land in st.logits */
void plain_step(PolicyState &st, int64_t token, int64_t index, int64_t rope_delta, StepResult &r);

void greedy_loop(PolicyState &st, Selector &sel, const float *first, int64_t index, int64_t rope_delta,
                 StepResult &r);

/* multitoken.MultiTokenDecoding.generate from st.logits (the prefill's): gate, decode (with fallback), then the
 * draft table observes the ids and records the chunk's acceptance. */
void multitoken_loop(PolicyState &st, Selector &sel, int64_t index, int64_t rope_delta,
                     const std::string &instruction, StepResult &r);

}  // namespace nora_edge

#endif /* NORA_EDGE_DECODE_H */

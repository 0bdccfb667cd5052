/* drafts.h: where multi-token proposals come from (internal C++17): an n-gram index of earlier chunks' generated
 * ids, the port of nora_edge/drafts.py DraftTable (lookup only: nothing here decides a token; a wrong draft costs
 * a decoder row, never an action).
 *
 * Data flow: the bundle's drafts.json when it ships one (the model's own ids on calibration frames, written by
 * `nora-edge export --multi-token --calibration`; export/draft_file.py) --seed (read_drafts' checks, then observe
 * per chunk in file order)--> and then every finished chunk's generated Qwen ids --observe--> every n-gram
 * (n = 1 .. kMaxSuffix) maps to the up to kMaxContinuation ids that followed it (earliest occurrence in the chunk
 * wins, a later chunk overwrites), in the instruction's own table and in the policy-wide one --propose(own table,
 * tokens so far, k)--> the continuation of the longest suffix found, own table before the policy-wide one at each
 * length, cut to k ids.
 * Acceptance gate (record / enabled): per instruction, decayed (x0.8 per chunk) proposed / accepted counts; when
 * fewer than min_rate (the caller's gate_rate) of >= 8 decayed drafts were accepted the instruction decodes
 * plainly, except every probe_every-th chunk.
 * Memory: propose and enabled allocate nothing; observe (once per chunk, after its tokens are decided) inserts
 * into hash maps, each cleared when it holds more than max_entries n-grams (Python's bound); seed (once, at
 * nora_policy_create) holds the parsed file while it observes.
 */
#ifndef NORA_EDGE_DRAFTS_H
#define NORA_EDGE_DRAFTS_H

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <unordered_map>

namespace nora_edge {

/* A bundle's drafts.json that cannot seed a table (nora_edge/drafts.py read_drafts' BundleError; the policy
 * reports it as NORA_EDGE_ERR_BUNDLE). Its own type, so the table builds without the C ABI header. */
class DraftsError : public std::runtime_error {
  public:
    using std::runtime_error::runtime_error;
};

class DraftTable {
  public:
    static constexpr int kMaxSuffix = 4;          /* DraftTable(max_suffix=4) */
    static constexpr int kMaxContinuation = 16;   /* DraftTable.MAX_CONTINUATION */
    static constexpr size_t kMaxEntries = 1 << 16;
    static constexpr int64_t kProbeEvery = 4;

    struct Gram {
        int32_t n = 0;
        int32_t ids[kMaxSuffix] = {0, 0, 0, 0};
        bool operator==(const Gram &o) const noexcept {
            if (n != o.n) return false;
            for (int32_t i = 0; i < n; i++)
                if (ids[i] != o.ids[i]) return false;
            return true;
        }
    };
    struct GramHash {
        size_t operator()(const Gram &g) const noexcept;
    };
    struct Cont {
        int32_t n = 0;
        int32_t ids[kMaxContinuation] = {};
    };
    using Table = std::unordered_map<Gram, Cont, GramHash>;

    /* The instruction's own table (nullptr when it has none yet): look it up once per chunk for propose. */
    const Table *own(const std::string &key) const;

    /* Up to k ids expected after out[0 : n) (the generated ids so far, the pending one included) into drafts;
     * returns how many. */
    int propose(const Table *own, const int64_t *out, int n, int k, int64_t *drafts) const;

    /* Record a finished chunk's generated ids under `key` (and policy-wide). */
    void observe(const std::string &key, const int64_t *ids, int n);

    /* drafts.json's "format" (nora_edge/drafts.py DRAFTS_FORMAT) */
    static constexpr const char *kFormat = "nora-edge-drafts/1";

    /* Seed from a bundle's drafts.json, {"format": kFormat, "chunks": [{"instruction": str, "ids": [int]}, ...]}
     * (nora_edge/drafts.py read_drafts + DraftTable.seed): the whole file is checked first (readable JSON, the
     * format, "chunks" a list, chunks[i] a string instruction and a list of int ids in [0, vocab_size)), then
     * every chunk is observe()d in file order, so the table equals Python's seeded one. Returns the chunks
     * seeded. Throws DraftsError naming the file (and chunks[i]); the table is unchanged then. */
    int64_t seed(const std::string &path, int64_t vocab_size);

    /* Account one chunk's drafts for enabled(). */
    void record(const std::string &key, int64_t proposed, int64_t accepted);

    /* Whether the instruction's chunks draft at acceptance rate min_rate (counts a gated chunk, so every
     * probe_every-th drafts again). */
    bool enabled(const std::string &key, double min_rate);

  private:
    struct Rate {
        double proposed = 0, accepted = 0;
        int64_t gated = 0;
    };
    static void insert(Table &table, const int64_t *seq, int n);
    std::unordered_map<std::string, Table> by_key_;
    Table any_;
    std::unordered_map<std::string, Rate> rate_;
};

}  // namespace nora_edge

#endif /* NORA_EDGE_DRAFTS_H */

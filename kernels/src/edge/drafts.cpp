/* drafts.cpp: the n-gram draft table of multi-token decoding (drafts.h; nora_edge/drafts.py DraftTable, the same
 * proposals for the same history: longest suffix first, the instruction's own table before the policy-wide one
 * at each length, within a chunk the earliest occurrence, a later chunk overwriting an earlier one).
 */
#include "edge/drafts.h"

#include <algorithm>

namespace nora_edge {

size_t DraftTable::GramHash::operator()(const Gram &g) const noexcept {
    uint64_t h = 0xcbf29ce484222325ull ^ (uint64_t)g.n;  /* FNV-1a over (n, ids) */
    for (int32_t i = 0; i < g.n; i++) {
        h ^= (uint64_t)(uint32_t)g.ids[i];
        h *= 0x100000001b3ull;
    }
    return (size_t)(h ^ (h >> 29));
}

const DraftTable::Table *DraftTable::own(const std::string &key) const {
    const auto it = by_key_.find(key);
    return it == by_key_.end() ? nullptr : &it->second;
}

int DraftTable::propose(const Table *own, const int64_t *out, int n, int k, int64_t *drafts) const {
    if (k < 1) return 0;
    Gram g;
    for (int m = std::min(kMaxSuffix, n); m > 0; m--) {  /* longest suffix first */
        g.n = m;
        for (int i = 0; i < m; i++) g.ids[i] = (int32_t)out[n - m + i];
        for (const Table *table : {own, &any_}) {
            if (!table) continue;
            const auto it = table->find(g);
            if (it == table->end() || it->second.n == 0) continue;
            const int c = std::min(k, (int)it->second.n);
            for (int i = 0; i < c; i++) drafts[i] = it->second.ids[i];
            return c;
        }
    }
    return 0;
}

void DraftTable::insert(Table &table, const int64_t *seq, int n) {
    if (table.size() > kMaxEntries) table.clear();  /* a bounded process-long memory, as Python */
    for (int m = 1; m <= kMaxSuffix; m++) {
        for (int j = n - m - 1; j >= 0; j--) {  /* earliest occurrence written last: it wins */
            Gram g;
            g.n = m;
            for (int i = 0; i < m; i++) g.ids[i] = (int32_t)seq[j + i];
            Cont &c = table[g];
            c.n = std::min(kMaxContinuation, n - (j + m));
            for (int i = 0; i < c.n; i++) c.ids[i] = (int32_t)seq[j + m + i];
        }
    }
}

void DraftTable::observe(const std::string &key, const int64_t *ids, int n) {
    insert(by_key_[key], ids, n);
    insert(any_, ids, n);
}

void DraftTable::record(const std::string &key, int64_t proposed, int64_t accepted) {
    Rate &r = rate_[key];
    r.proposed = 0.8 * r.proposed + (double)proposed;
    r.accepted = 0.8 * r.accepted + (double)accepted;
}

bool DraftTable::enabled(const std::string &key, double min_rate) {
    const auto it = rate_.find(key);
    if (it == rate_.end()) return true;
    Rate &r = it->second;
    if (r.proposed < 8 || r.accepted >= min_rate * r.proposed) return true;
    r.gated += 1;
    return r.gated % kProbeEvery == 0;
}

}  // namespace nora_edge

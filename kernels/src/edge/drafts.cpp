/* drafts.cpp: the n-gram draft table of multi-token decoding (drafts.h; nora_edge/drafts.py DraftTable, the same
 * proposals for the same history: longest suffix first, the instruction's own table before the policy-wide one
 * at each length, within a chunk the earliest occurrence, a later chunk overwriting an earlier one) and its seed
 * from a bundle's drafts.json (read_drafts' checks, in its wording; JSON: nlohmann/json,
 * https://json.nlohmann.me/api/basic_json/parse/, as the bundle reader).
 */
#include "edge/drafts.h"

#include <algorithm>
#include <climits>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <utility>
#include <vector>

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

namespace {

using json = nlohmann::json;

/* Python's repr / type name of a JSON value, for read_drafts' "got ..." (cut at 80 chars) */
std::string py_repr(const json &v) {
    std::string s = v.is_null() ? "None"
                    : v.is_boolean() ? (v.get<bool>() ? "True" : "False")
                    : v.is_string() ? "'" + v.get<std::string>() + "'"
                                    : v.dump();
    return s.size() > 80 ? s.substr(0, 80) : s;
}
const char *py_type(const json &v) {
    switch (v.type()) {
        case json::value_t::null: return "NoneType";
        case json::value_t::boolean: return "bool";
        case json::value_t::string: return "str";
        case json::value_t::array: return "list";
        case json::value_t::object: return "dict";
        case json::value_t::number_float: return "float";
        default: return "int";
    }
}

}  // namespace

int64_t DraftTable::seed(const std::string &path, int64_t vocab_size) {
    auto fail = [&](const std::string &msg) { throw DraftsError(path + ": " + msg); };
    json doc;
    {
        std::ifstream f(path, std::ios::binary);
        if (!f) fail("unreadable draft file (cannot open it)");
        std::ostringstream text;
        text << f.rdbuf();
        if (f.bad()) fail("unreadable draft file (read error)");
        try {
            doc = json::parse(text.str());  /* strict UTF-8 in strings, as Python's utf-8 decode */
        } catch (const json::exception &e) {
            fail(std::string("unreadable draft file (") + e.what() + ")");
        }
    }
    const json *format = doc.is_object() && doc.contains("format") ? &doc.at("format") : nullptr;
    if (!format || !format->is_string() || format->get<std::string>() != kFormat)
        fail(std::string("format must be '") + kFormat + "', got " +
             (doc.is_object() ? (format ? py_repr(*format) : "None") : "'" + std::string(py_type(doc)) + "'"));
    if (!doc.contains("chunks") || !doc.at("chunks").is_array()) fail("'chunks' must be a list");
    const json &chunks = doc.at("chunks");
    std::vector<std::pair<std::string, std::vector<int64_t>>> parsed;
    parsed.reserve(chunks.size());
    for (size_t i = 0; i < chunks.size(); i++) {
        const json &c = chunks[i];
        const std::string at = "chunks[" + std::to_string(i) + "]";
        const json *text = c.is_object() && c.contains("instruction") ? &c.at("instruction") : nullptr;
        const json *ids = c.is_object() && c.contains("ids") ? &c.at("ids") : nullptr;
        bool ok = text && text->is_string() && ids && ids->is_array();
        for (size_t j = 0; ok && j < ids->size(); j++) {  /* an int >= 0: no bool, no float (Python's type(x) is int) */
            const json &x = (*ids)[j];
            ok = x.is_number_unsigned() || (x.is_number_integer() && x.get<int64_t>() >= 0);
        }
        if (!ok) fail(at + " needs a string 'instruction' and a list of int ids >= 0");
        uint64_t top = 0;
        for (const json &x : *ids) top = std::max(top, x.get<uint64_t>());
        if (!ids->empty() && top >= (uint64_t)vocab_size)
            fail(at + " holds id " + std::to_string(top) + " >= vocab size " + std::to_string(vocab_size));
        if (ids->size() > (size_t)INT_MAX) fail(at + " holds more than INT_MAX ids");
        std::vector<int64_t> v;
        v.reserve(ids->size());
        for (const json &x : *ids) v.push_back(x.get<int64_t>());
        parsed.emplace_back(text->get<std::string>(), std::move(v));
    }
    for (const auto &c : parsed) observe(c.first, c.second.data(), (int)c.second.size());  /* DraftTable.seed */
    return (int64_t)parsed.size();
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

// tokenizer.cpp: encode (validation, added-token split, NFC, split regex, byte-level BPE); see tokenizer.h.
// Loading tokenizer.json is tokenizer_load.cpp.
//
// Reference behaviour is HF tokenizers (github.com/huggingface/tokenizers, tokenizers/src):
//   tokenizer/added_vocabulary.rs  extract_and_normalize: split the raw text on the non-normalized added
//                                  tokens (aho-corasick, MatchKind::LeftmostLongest), normalize the rest, split
//                                  that on the normalized added tokens (whose contents are normalized too)
//   pre_tokenizers/split.rs        Split(Regex, Isolated): every match and every gap is its own piece
//   pre_tokenizers/byte_level.rs   bytes_char(): GPT-2's byte -> printable character table
//   models/bpe/word.rs             merge_all: a min-heap of (rank, position); stale entries are skipped
//   models/bpe/model.rs            ignore_merges: a word found whole in the vocab is one token
// The split regex is Qwen2's (transformers' Qwen2Tokenizer PRETOKENIZE_REGEX). HF compiles it with Oniguruma,
// where \s is Unicode White_Space; PCRE2's \s (even with PCRE2_UCP) differs on a few characters, so the PCRE2
// form spells it \p{White_Space} (PCRE2 >= 10.40 knows binary properties; pcre2pattern(3), "Unicode character
// properties").
#include <utf8proc.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <queue>

#include "edge/tokenizer_impl.h"

namespace nora_edge {
namespace detail {

std::string hex_cp(uint32_t cp) {
    char buf[16];
    std::snprintf(buf, sizeof buf, "U+%04X", static_cast<unsigned>(cp));
    return buf;
}

void compile(Code &dst, const char *pattern) {
    int err = 0;
    PCRE2_SIZE off = 0;
    dst.code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern), PCRE2_ZERO_TERMINATED,
                             PCRE2_UTF | PCRE2_UCP, &err, &off, nullptr);
    if (!dst.code) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(err, msg, sizeof msg);
        throw TokenizerError(NORA_EDGE_ERR_RUNTIME, std::string("tokenizer: pcre2_compile failed at offset ") +
                                                        std::to_string(off) + ": " +
                                                        reinterpret_cast<const char *>(msg));
    }
}

std::string nfc(std::string_view s) {
    if (s.empty()) return std::string();
    utf8proc_uint8_t *out = nullptr;
    utf8proc_ssize_t n =
        utf8proc_map(reinterpret_cast<const utf8proc_uint8_t *>(s.data()), static_cast<utf8proc_ssize_t>(s.size()),
                     &out, static_cast<utf8proc_option_t>(UTF8PROC_STABLE | UTF8PROC_COMPOSE));
    if (n < 0) {
        if (n == UTF8PROC_ERROR_NOMEM) throw TokenizerError(NORA_EDGE_ERR_NOMEM, "tokenizer: out of memory (NFC)");
        throw TokenizerError(NORA_EDGE_ERR_INPUT,
                             std::string("tokenizer: NFC normalization failed: ") + utf8proc_errmsg(n));
    }
    std::string r(reinterpret_cast<const char *>(out), static_cast<size_t>(n));
    std::free(out);
    return r;
}

}  // namespace detail

namespace {

using detail::hex_cp;
using detail::nfc;
using detail::MatchData;
using detail::Trie;

// Characters whose NFC differs between Unicode 14 (utf8proc) and the reference: HF tokenizers normalizes with
// the unicode-normalization-alignments crate, whose tables predate Unicode 10, so these marks (canonical
// combining class != 0) are not reordered there and these pairs (U+11935 U+11930 -> U+11938) are not
// composed. All were added in Unicode 10-14; they are refused. Derived by probing tokenizers 0.23's NFC against
// Python 3.11's unicodedata (Unicode 14.0) over every mark and canonical pair; the test re-derives and compares.
constexpr uint32_t kNfcMismatch[][2] = {
    {0x07FD, 0x07FD}, {0x0898, 0x089F}, {0x08CA, 0x08D3}, {0x09FE, 0x09FE}, {0x0C3C, 0x0C3C}, {0x0D3B, 0x0D3C},
    {0x0EBA, 0x0EBA}, {0x1715, 0x1715}, {0x1ABF, 0x1ACE}, {0x1DF6, 0x1DFA}, {0xA82C, 0xA82C},
    {0x10D24, 0x10D27}, {0x10EAB, 0x10EAC}, {0x10F46, 0x10F50}, {0x10F82, 0x10F85}, {0x11070, 0x11070},
    {0x1133B, 0x1133B}, {0x1145E, 0x1145E}, {0x11839, 0x1183A}, {0x11930, 0x11930}, {0x11935, 0x11935},
    {0x11938, 0x11938}, {0x1193D, 0x1193E}, {0x11943, 0x11943}, {0x119E0, 0x119E0}, {0x11A34, 0x11A34},
    {0x11A47, 0x11A47}, {0x11A99, 0x11A99}, {0x11D42, 0x11D42}, {0x11D44, 0x11D45}, {0x11D97, 0x11D97},
    {0x16FF0, 0x16FF1}, {0x1E130, 0x1E136}, {0x1E2AE, 0x1E2AE}, {0x1E2EC, 0x1E2EF},
};

bool nfc_mismatch(uint32_t cp) {
    for (const auto &r : kNfcMismatch)
        if (cp >= r[0] && cp <= r[1]) return true;
    return false;
}

// Strict UTF-8 (Unicode 15 table 3-7: no overlongs, no surrogates, <= U+10FFFF). Returns the offset of the
// first bad byte, or npos.
size_t invalid_utf8_offset(std::string_view s) {
    const auto *p = reinterpret_cast<const unsigned char *>(s.data());
    size_t n = s.size(), i = 0;
    while (i < n) {
        unsigned c = p[i];
        size_t len;
        unsigned lo = 0x80, hi = 0xBF;
        if (c < 0x80) {
            ++i;
            continue;
        } else if (c >= 0xC2 && c <= 0xDF) {
            len = 2;
        } else if (c >= 0xE0 && c <= 0xEF) {
            len = 3;
            if (c == 0xE0) lo = 0xA0;
            if (c == 0xED) hi = 0x9F;
        } else if (c >= 0xF0 && c <= 0xF4) {
            len = 4;
            if (c == 0xF0) lo = 0x90;
            if (c == 0xF4) hi = 0x8F;
        } else {
            return i;
        }
        for (size_t k = 1; k < len; ++k) {
            if (i + k >= n) return i;
            unsigned d = p[i + k];
            if (k == 1 ? (d < lo || d > hi) : (d < 0x80 || d > 0xBF)) return i;
        }
        i += len;
    }
    return std::string_view::npos;
}

}  // namespace

// models/bpe/word.rs merge_all: symbols in a linked list, a min-heap of (rank, position, new id); a popped entry
// is applied only if its pair is still adjacent and still the same merge.
void Tokenizer::Impl::bpe(std::string_view word, std::vector<int32_t> &out) const {
    if (word.empty()) return;
    if (ignore_merges) {
        auto it = word_vocab.find(std::string(word));
        if (it != word_vocab.end()) {
            out.push_back(it->second);
            return;
        }
    }
    const int n = static_cast<int>(word.size());
    std::vector<int32_t> sym(n), prev(n), next(n);
    for (int i = 0; i < n; ++i) {
        sym[i] = byte_id[static_cast<unsigned char>(word[i])];
        prev[i] = i - 1;
        next[i] = i + 1 < n ? i + 1 : -1;
    }
    struct Entry {
        int32_t rank, pos, id;
        bool operator>(const Entry &o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
    };
    std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>> heap;
    auto lookup = [this](int32_t a, int32_t b) -> const std::pair<int32_t, int32_t> * {
        auto it = merges.find((static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b));
        return it == merges.end() ? nullptr : &it->second;
    };
    for (int i = 0; i + 1 < n; ++i)
        if (auto m = lookup(sym[i], sym[i + 1])) heap.push({m->first, i, m->second});
    std::vector<char> alive(n, 1);
    while (!heap.empty()) {
        Entry e = heap.top();
        heap.pop();
        if (!alive[e.pos] || next[e.pos] < 0) continue;
        int r = next[e.pos];
        auto m = lookup(sym[e.pos], sym[r]);
        if (!m || m->first != e.rank || m->second != e.id) continue;  // stale
        sym[e.pos] = e.id;
        alive[r] = 0;
        next[e.pos] = next[r];
        if (next[r] >= 0) prev[next[r]] = e.pos;
        if (prev[e.pos] >= 0)
            if (auto pm = lookup(sym[prev[e.pos]], sym[e.pos])) heap.push({pm->first, prev[e.pos], pm->second});
        if (next[e.pos] >= 0)
            if (auto nm = lookup(sym[e.pos], sym[next[e.pos]])) heap.push({nm->first, e.pos, nm->second});
    }
    for (int i = 0; i >= 0; i = next[i]) out.push_back(sym[i]);
}

// Split(Regex, Isolated): matches and the gaps between them are words, in order; empty matches are skipped.
void Tokenizer::Impl::pretokenize_and_bpe(std::string_view text, std::vector<int32_t> &out) const {
    if (text.empty()) return;
    MatchData md(split.code);
    const auto *subject = reinterpret_cast<PCRE2_SPTR>(text.data());
    size_t pos = 0, emitted = 0;
    while (pos <= text.size()) {
        int rc = pcre2_match(split.code, subject, text.size(), pos, PCRE2_NO_UTF_CHECK, md.md, nullptr);
        if (rc == PCRE2_ERROR_NOMATCH) break;
        if (rc < 0) {
            PCRE2_UCHAR msg[256];
            pcre2_get_error_message(rc, msg, sizeof msg);
            throw TokenizerError(NORA_EDGE_ERR_RUNTIME,
                                 std::string("tokenizer: pcre2_match failed: ") + reinterpret_cast<char *>(msg));
        }
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md.md);
        size_t s = ov[0], e = ov[1];
        if (e == s) {  // empty match (the Qwen2 pattern has none): step over one character
            pos = s + 1;
            while (pos < text.size() && (static_cast<unsigned char>(text[pos]) & 0xC0) == 0x80) ++pos;
            continue;
        }
        if (s > emitted) bpe(text.substr(emitted, s - emitted), out);
        bpe(text.substr(s, e - s), out);
        emitted = pos = e;
    }
    if (emitted < text.size()) bpe(text.substr(emitted), out);
}

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::Tokenizer(Tokenizer &&) noexcept = default;
Tokenizer &Tokenizer::operator=(Tokenizer &&) noexcept = default;
Tokenizer::~Tokenizer() = default;

std::string Tokenizer::unicode_version() {
    char buf[64] = {0};
    if (pcre2_config(PCRE2_CONFIG_UNICODE_VERSION, buf) < 0) return "unknown";
    return buf;
}

std::vector<int32_t> Tokenizer::encode(std::string_view utf8) const {
    const Impl &t = *impl_;
    size_t bad = invalid_utf8_offset(utf8);
    if (bad != std::string_view::npos) {
        char buf[96];
        std::snprintf(buf, sizeof buf, "instruction is not valid UTF-8: byte 0x%02X at offset %zu",
                      static_cast<unsigned>(static_cast<unsigned char>(utf8[bad])), bad);
        throw TokenizerError(NORA_EDGE_ERR_INPUT, buf);
    }
    std::vector<int32_t> out;
    if (utf8.empty()) return out;
    {  // a character PCRE2 does not assign may be a letter/number/space in the reference's newer tables
        MatchData md(t.unassigned.code);
        int rc = pcre2_match(t.unassigned.code, reinterpret_cast<PCRE2_SPTR>(utf8.data()), utf8.size(), 0,
                             PCRE2_NO_UTF_CHECK, md.md, nullptr);
        if (rc >= 0) {
            size_t at = pcre2_get_ovector_pointer(md.md)[0];
            utf8proc_int32_t cp = 0;
            utf8proc_iterate(reinterpret_cast<const utf8proc_uint8_t *>(utf8.data() + at),
                             static_cast<utf8proc_ssize_t>(utf8.size() - at), &cp);
            throw TokenizerError(NORA_EDGE_ERR_UNSUPPORTED,
                                 "instruction character " + hex_cp(static_cast<uint32_t>(cp)) + " at byte " +
                                     std::to_string(at) + " is unassigned in this build's Unicode " +
                                     unicode_version() + " tables (PCRE2); its tokenization cannot be "
                                     "reproduced exactly, so it is refused");
        }
        if (rc != PCRE2_ERROR_NOMATCH)
            throw TokenizerError(NORA_EDGE_ERR_RUNTIME, "tokenizer: pcre2_match failed (" + std::to_string(rc) + ")");
    }
    for (size_t i = 0; i < utf8.size();) {  // marks the reference's older NFC tables treat differently
        utf8proc_int32_t cp = 0;
        utf8proc_ssize_t len = utf8proc_iterate(reinterpret_cast<const utf8proc_uint8_t *>(utf8.data() + i),
                                                static_cast<utf8proc_ssize_t>(utf8.size() - i), &cp);
        if (cp >= 0x07FD && nfc_mismatch(static_cast<uint32_t>(cp)))
            throw TokenizerError(NORA_EDGE_ERR_UNSUPPORTED,
                                 "instruction character " + hex_cp(static_cast<uint32_t>(cp)) + " at byte " +
                                     std::to_string(i) + " is normalized differently by the reference tokenizer's "
                                     "pre-Unicode-10 NFC tables; its tokenization cannot be reproduced exactly, "
                                     "so it is refused");
        i += static_cast<size_t>(len > 0 ? len : 1);
    }
    // split_with_indices over one trie; `rest` receives the text between matches
    auto split = [&out](const Trie &trie, std::string_view s, auto &&rest) {
        size_t start = 0, i = 0;
        while (i < s.size()) {
            size_t len = 0;
            int32_t id = -1;
            if (!trie.empty() && trie.longest_at(s, i, len, id)) {
                if (i > start) rest(s.substr(start, i - start));
                out.push_back(id);
                i += len;
                start = i;
            } else {
                ++i;
            }
        }
        if (start < s.size()) rest(s.substr(start));
    };
    split(t.raw_added, utf8, [&](std::string_view piece) {
        std::string normalized = nfc(piece);
        split(t.normalized_added, normalized, [&](std::string_view p) { t.pretokenize_and_bpe(p, out); });
    });
    return out;
}

bool Tokenizer::is_added(int32_t id) const {
    return std::binary_search(impl_->added.begin(), impl_->added.end(), id);
}

const std::vector<int32_t> &Tokenizer::added_ids() const { return impl_->added; }

}  // namespace nora_edge

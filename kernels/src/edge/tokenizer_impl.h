// tokenizer_impl.h: internals shared by tokenizer.cpp (encode) and tokenizer_load.cpp (tokenizer.json);
// not installed, not part of any ABI.
#ifndef NORA_EDGE_TOKENIZER_IMPL_H
#define NORA_EDGE_TOKENIZER_IMPL_H

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "edge/tokenizer.h"

namespace nora_edge {
namespace detail {

struct Code {  // owns a compiled PCRE2 pattern
    pcre2_code *code = nullptr;
    Code() = default;
    Code(const Code &) = delete;
    Code &operator=(const Code &) = delete;
    ~Code() { pcre2_code_free(code); }
};

struct MatchData {
    pcre2_match_data *md;
    explicit MatchData(const pcre2_code *code) : md(pcre2_match_data_create_from_pattern(code, nullptr)) {
        if (!md) throw TokenizerError(NORA_EDGE_ERR_NOMEM, "tokenizer: out of memory (pcre2 match data)");
    }
    MatchData(const MatchData &) = delete;
    MatchData &operator=(const MatchData &) = delete;
    ~MatchData() { pcre2_match_data_free(md); }
};

// Compile `pattern` with PCRE2_UTF | PCRE2_UCP (RUNTIME error on failure).
void compile(Code &dst, const char *pattern);
// NFC of valid UTF-8 (utf8proc_map, length-based: NUL is an ordinary character).
std::string nfc(std::string_view s);
// "U+XXXX"
std::string hex_cp(uint32_t cp);

// A byte trie of added-token contents; match() is leftmost-longest like aho-corasick's LeftmostLongest.
struct Trie {
    std::unordered_map<uint64_t, int32_t> edges;  // (node << 8 | byte) -> child
    std::vector<int32_t> token;                   // node -> added-token id, or -1
    Trie() : token(1, -1) {}
    bool empty() const { return token.size() == 1; }
    // Returns false if `content` was already present with another id.
    bool insert(const std::string &content, int32_t id) {
        int32_t node = 0;
        for (unsigned char c : content) {
            uint64_t key = (static_cast<uint64_t>(node) << 8) | c;
            auto it = edges.find(key);
            if (it == edges.end()) {
                token.push_back(-1);
                it = edges.emplace(key, static_cast<int32_t>(token.size() - 1)).first;
            }
            node = it->second;
        }
        if (token[node] >= 0 && token[node] != id) return false;
        token[node] = id;
        return true;
    }
    // Longest token starting at text[i]: sets len/id, returns true if one exists.
    bool longest_at(std::string_view text, size_t i, size_t &len, int32_t &id) const {
        int32_t node = 0;
        bool found = false;
        for (size_t k = i; k < text.size(); ++k) {
            auto it = edges.find((static_cast<uint64_t>(node) << 8) | static_cast<unsigned char>(text[k]));
            if (it == edges.end()) break;
            node = it->second;
            if (token[node] >= 0) {
                found = true;
                len = k + 1 - i;
                id = token[node];
            }
        }
        return found;
    }
};

}  // namespace detail

struct Tokenizer::Impl {
    detail::Code split;              // Qwen2 split regex (PCRE2 form)
    detail::Code unassigned;         // \p{Cn}: characters PCRE2's tables do not assign
    detail::Trie raw_added, normalized_added;
    std::vector<int32_t> added;      // ascending
    int32_t byte_id[256];            // vocab id of each byte's byte-level character
    std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges;  // (left << 32 | right) -> (rank, id)
    bool ignore_merges = false;
    std::unordered_map<std::string, int32_t> word_vocab;  // raw bytes -> id, only when ignore_merges

    void bpe(std::string_view word, std::vector<int32_t> &out) const;
    void pretokenize_and_bpe(std::string_view text, std::vector<int32_t> &out) const;
};

}  // namespace nora_edge

#endif /* NORA_EDGE_TOKENIZER_IMPL_H */

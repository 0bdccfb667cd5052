/* tokenizer.h: libnora_edge's instruction tokenizer (internal C++17 API; the C ABI wraps it).
 *
 * Data flow (Tokenizer::encode, the same steps and order as HF `tokenizers` Tokenizer::encode(text,
 * add_special_tokens=False) on the bundle's tokenizer.json):
 *   UTF-8 bytes --strict validation (Unicode table 3-7)--> --refuse characters PCRE2's tables do not know, and
 *   the 101 Unicode 10-14 marks/composites HF's older NFC tables normalize differently (tokenizer.cpp)-->
 *   --split on the added tokens with normalized=false (leftmost-longest, raw text)-->
 *   other pieces --NFC (utf8proc)--> --split on the added tokens with normalized=true-->
 *   other pieces --Qwen2 split regex (PCRE2, "Isolated")--> words --bytes--> byte-level BPE (merge ranks)--> ids
 *
 * Only the configuration the bundles ship is implemented: model BPE over the 256 byte-level symbols (no
 * dropout, no unk token, no prefix/suffix, no byte fallback; ignore_merges either way), normalizer NFC,
 * pre_tokenizer Sequence[Split(Qwen2 regex, Isolated), ByteLevel(add_prefix_space=false, use_regex=false)],
 * post_processor null or ByteLevel, no truncation, no padding, added tokens without lstrip/rstrip/single_word.
 * Anything else is refused at load (NORA_EDGE_ERR_BUNDLE, naming the JSON field) rather than approximated.
 *
 * Errors are TokenizerError carrying the nora_edge.h status: NORA_EDGE_ERR_BUNDLE (bad or unsupported
 * tokenizer.json), NORA_EDGE_ERR_INPUT (invalid UTF-8), NORA_EDGE_ERR_UNSUPPORTED (a character that is
 * unassigned in PCRE2's Unicode tables, whose regex classes could differ from the reference's newer tables),
 * NORA_EDGE_ERR_NOMEM. Sources: tokenizer_load.cpp (tokenizer.json), tokenizer.cpp (encode). A Tokenizer is immutable after load: encode() is const and thread-safe, and keeps no
 * cache between calls.
 */
#ifndef NORA_EDGE_TOKENIZER_H
#define NORA_EDGE_TOKENIZER_H

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "nora_edge.h"

namespace nora_edge {

/* A failure with the status code nora_edge.h returns for it; what() is the message. */
class TokenizerError : public std::runtime_error {
   public:
    TokenizerError(nora_edge_status status, const std::string &message)
        : std::runtime_error(message), status_(status) {}
    nora_edge_status status() const noexcept { return status_; }

   private:
    nora_edge_status status_;
};

class Tokenizer {
   public:
    /* Read and check a tokenizer.json file. Throws TokenizerError (BUNDLE: unreadable, malformed or
     * unsupported; the message names the path and the field). */
    static Tokenizer load(const std::string &path);
    /* The same from the file's text; `origin` names it in messages. */
    static Tokenizer from_json(std::string_view json_text, const std::string &origin);

    Tokenizer(Tokenizer &&) noexcept;
    Tokenizer &operator=(Tokenizer &&) noexcept;
    ~Tokenizer();

    /* Ids of `utf8` (no special tokens added), equal to HF tokenizers' encode(text, add_special_tokens=False).
     * Throws TokenizerError: INPUT (invalid UTF-8, with the byte offset), UNSUPPORTED (a character PCRE2's
     * Unicode tables do not assign, with its code point), NOMEM. */
    std::vector<int32_t> encode(std::string_view utf8) const;

    /* True iff `id` is one of tokenizer.json's added_tokens (the ids an instruction must not contain). */
    bool is_added(int32_t id) const;
    /* The added tokens' ids, ascending. */
    const std::vector<int32_t> &added_ids() const;
    /* PCRE2's Unicode version (e.g. "14.0.0"): characters unassigned in it are refused. */
    static std::string unicode_version();

   private:
    struct Impl;
    explicit Tokenizer(std::unique_ptr<Impl> impl);
    std::unique_ptr<Impl> impl_;
};

}  // namespace nora_edge

#endif /* NORA_EDGE_TOKENIZER_H */

// tokenizer_load.cpp: tokenizer.json -> Tokenizer::Impl, refusing every configuration tokenizer.cpp does not
// reproduce exactly (BUNDLE errors name the JSON field). JSON: nlohmann/json (Debian nlohmann-json3-dev,
// header-only; strict RFC 8259 parser that rejects ill-formed UTF-8 and unpaired \u surrogates).
// Field meanings follow HF tokenizers' serialization (tokenizers/src/models/bpe/serialization.rs,
// tokenizer/serialization.rs, pre_tokenizers/split.rs, pre_tokenizers/byte_level.rs).
#include <algorithm>
#include <array>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include <utf8proc.h>

#include "edge/tokenizer_impl.h"

namespace nora_edge {
namespace {

using json = nlohmann::json;
using detail::compile;
using detail::nfc;

// The pattern tokenizer.json must hold (export/text_tokenizer.py QWEN2_SPLIT_REGEX, Qwen2.5's own) ...
constexpr const char *kQwen2Regex =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
// ... and the same pattern for PCRE2: \s -> \p{White_Space}, \S -> \P{White_Space}.
constexpr const char *kQwen2RegexPcre2 =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\p{White_Space}\\p{L}\\p{N}]+"
    "[\\r\\n]*|\\p{White_Space}*[\\r\\n]+|\\p{White_Space}+(?!\\P{White_Space})|\\p{White_Space}+";

[[noreturn]] void bundle_error(const std::string &origin, const std::string &what) {
    throw TokenizerError(NORA_EDGE_ERR_BUNDLE, origin + ": " + what);
}

// GPT-2's bytes_to_unicode: printable Latin-1 bytes map to themselves, the other 68 to U+0100.. in byte order.
std::string byte_char_utf8(int b) {
    static const std::array<int, 256> table = [] {
        std::array<int, 256> t{};
        int n = 0;
        for (int i = 0; i < 256; ++i) {
            bool keep = (i >= 0x21 && i <= 0x7E) || (i >= 0xA1 && i <= 0xAC) || (i >= 0xAE && i <= 0xFF);
            t[i] = keep ? i : 256 + n++;
        }
        return t;
    }();
    utf8proc_uint8_t out[4];
    utf8proc_ssize_t len = utf8proc_encode_char(table[b], out);
    return std::string(reinterpret_cast<const char *>(out), static_cast<size_t>(len));
}

const json &field(const json &obj, const char *key, const std::string &origin, const std::string &path) {
    auto it = obj.find(key);
    if (it == obj.end()) bundle_error(origin, "missing field " + path + "." + key);
    return *it;
}

bool get_bool(const json &obj, const char *key, const std::string &origin, const std::string &path) {
    const json &v = field(obj, key, origin, path);
    if (!v.is_boolean()) bundle_error(origin, path + "." + key + " must be a boolean, got " + v.dump());
    return v.get<bool>();
}

void require(bool ok, const std::string &origin, const std::string &path, const json &got, const char *want) {
    if (!ok) bundle_error(origin, path + " is " + got.dump() + "; this tokenizer implements only " + want);
}

bool null_or_empty_string(const json &v) { return v.is_null() || (v.is_string() && v.get<std::string>().empty()); }

}  // namespace

Tokenizer Tokenizer::load(const std::string &path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) bundle_error(path, "cannot open the tokenizer file");
    std::ostringstream ss;
    ss << f.rdbuf();
    if (!f && !f.eof()) bundle_error(path, "cannot read the tokenizer file");
    return from_json(ss.str(), path);
}

Tokenizer Tokenizer::from_json(std::string_view text, const std::string &origin) {
    json root;
    try {
        root = json::parse(text.begin(), text.end());
    } catch (const json::exception &e) {
        bundle_error(origin, std::string("not valid JSON (") + e.what() + ")");
    }
    if (!root.is_object()) bundle_error(origin, "top level is not a JSON object");
    auto impl = std::make_unique<Impl>();
    try {
        for (const char *k : {"truncation", "padding"})
            require(field(root, k, origin, "").is_null(), origin, k, root[k], "null");
        const json &post = field(root, "post_processor", origin, "");
        require(post.is_null() || (post.is_object() && post.value("type", "") == "ByteLevel"), origin,
                "post_processor", post, "null or ByteLevel (ids unchanged without added special tokens)");
        const json &norm = field(root, "normalizer", origin, "");
        require(norm.is_object() && norm.value("type", "") == "NFC", origin, "normalizer", norm, "{\"type\": \"NFC\"}");

        // pre_tokenizer: Sequence[Split(Qwen2 regex, Isolated, invert false), ByteLevel(no prefix, no regex)]
        const json &pre = field(root, "pre_tokenizer", origin, "");
        const char *want_pre = "Sequence[Split(Regex=Qwen2 pattern, Isolated), ByteLevel(add_prefix_space=false, "
                               "use_regex=false)]";
        require(pre.is_object() && pre.value("type", "") == "Sequence" && pre.contains("pretokenizers") &&
                    pre["pretokenizers"].is_array() && pre["pretokenizers"].size() == 2,
                origin, "pre_tokenizer", pre, want_pre);
        const json &sp = pre["pretokenizers"][0];
        require(sp.is_object() && sp.value("type", "") == "Split", origin, "pre_tokenizer.pretokenizers[0].type",
                sp.is_object() ? sp.value("type", json()) : sp, "Split");
        const json &pat = field(sp, "pattern", origin, "pre_tokenizer.pretokenizers[0]");
        require(pat.is_object() && pat.contains("Regex") && pat["Regex"].is_string() &&
                    pat["Regex"].get<std::string>() == kQwen2Regex,
                origin, "pre_tokenizer.pretokenizers[0].pattern", pat, "{\"Regex\": <Qwen2's split pattern>}");
        const json &beh = field(sp, "behavior", origin, "pre_tokenizer.pretokenizers[0]");
        require(beh == "Isolated", origin, "pre_tokenizer.pretokenizers[0].behavior", beh, "\"Isolated\"");
        require(!get_bool(sp, "invert", origin, "pre_tokenizer.pretokenizers[0]"), origin,
                "pre_tokenizer.pretokenizers[0].invert", true, "false");
        const json &bl = pre["pretokenizers"][1];
        require(bl.is_object() && bl.value("type", "") == "ByteLevel", origin, "pre_tokenizer.pretokenizers[1].type",
                bl.is_object() ? bl.value("type", json()) : bl, "ByteLevel");
        for (const char *k : {"add_prefix_space", "use_regex"})
            require(!get_bool(bl, k, origin, "pre_tokenizer.pretokenizers[1]"), origin,
                    std::string("pre_tokenizer.pretokenizers[1].") + k, true, "false");

        // model: byte-level BPE
        const json &model = field(root, "model", origin, "");
        require(model.is_object() && model.value("type", "") == "BPE", origin, "model.type",
                model.is_object() ? model.value("type", json()) : model, "\"BPE\"");
        for (const char *k : {"dropout", "unk_token"})
            require(field(model, k, origin, "model").is_null(), origin, std::string("model.") + k, model[k], "null");
        for (const char *k : {"continuing_subword_prefix", "end_of_word_suffix"})
            require(null_or_empty_string(field(model, k, origin, "model")), origin, std::string("model.") + k,
                    model[k], "null or \"\"");
        if (model.contains("byte_fallback"))
            require(!get_bool(model, "byte_fallback", origin, "model"), origin, "model.byte_fallback", true, "false");
        impl->ignore_merges = model.contains("ignore_merges") && get_bool(model, "ignore_merges", origin, "model");

        const json &vocab = field(model, "vocab", origin, "model");
        if (!vocab.is_object()) bundle_error(origin, "model.vocab is not an object");
        std::unordered_map<std::string, int32_t> v;  // byte-level token string -> id
        std::unordered_map<int32_t, std::string> seen;
        v.reserve(vocab.size());
        for (auto it = vocab.begin(); it != vocab.end(); ++it) {
            const json &id = it.value();
            if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > INT32_MAX)
                bundle_error(origin, "model.vocab[" + json(it.key()).dump() + "] is " + id.dump() +
                                         ", not an id in [0, 2^31)");
            int32_t i = static_cast<int32_t>(id.get<int64_t>());
            auto [s, fresh] = seen.emplace(i, it.key());
            if (!fresh)
                bundle_error(origin, "model.vocab: id " + std::to_string(i) + " is given to both " +
                                         json(s->second).dump() + " and " + json(it.key()).dump());
            v.emplace(it.key(), i);
        }
        std::unordered_map<std::string, int> char_byte;  // byte-level character -> byte
        for (int b = 0; b < 256; ++b) {
            std::string c = byte_char_utf8(b);
            char_byte.emplace(c, b);
            auto it = v.find(c);
            if (it == v.end()) {
                char hx[8];
                std::snprintf(hx, sizeof hx, "0x%02X", b);
                bundle_error(origin, std::string("model.vocab has no entry for byte ") + hx + " (" + json(c).dump() +
                                         "): not a byte-level BPE vocabulary");
            }
            impl->byte_id[b] = it->second;
        }
        if (impl->ignore_merges) {  // whole-word lookup by raw bytes; keys that are not byte-level strings drop
            for (const auto &[tok, id] : v) {
                std::string raw;
                bool ok = true;
                for (size_t p = 0; p < tok.size() && ok;) {
                    size_t len = 1;
                    unsigned char c0 = static_cast<unsigned char>(tok[p]);
                    len = c0 < 0x80 ? 1 : c0 < 0xE0 ? 2 : c0 < 0xF0 ? 3 : 4;
                    auto cb = char_byte.find(tok.substr(p, len));
                    if (cb == char_byte.end()) ok = false;
                    else raw.push_back(static_cast<char>(cb->second));
                    p += len;
                }
                if (ok) impl->word_vocab.emplace(std::move(raw), id);
            }
        }

        const json &merges = field(model, "merges", origin, "model");
        if (!merges.is_array()) bundle_error(origin, "model.merges is not an array");
        impl->merges.reserve(merges.size());
        for (size_t r = 0; r < merges.size(); ++r) {
            const json &m = merges[r];
            std::string a, b, where = "model.merges[" + std::to_string(r) + "]";
            if (m.is_string()) {  // "a b": exactly one space (models/bpe/serialization.rs)
                std::string s = m.get<std::string>();
                size_t sp1 = s.find(' ');
                if (sp1 == std::string::npos || s.find(' ', sp1 + 1) != std::string::npos)
                    bundle_error(origin, where + " is " + m.dump() + ", not two tokens separated by one space");
                a = s.substr(0, sp1);
                b = s.substr(sp1 + 1);
            } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
                a = m[0].get<std::string>();
                b = m[1].get<std::string>();
            } else {
                bundle_error(origin, where + " is " + m.dump() + ", not a pair of tokens");
            }
            auto ia = v.find(a), ib = v.find(b), iab = v.find(a + b);
            if (ia == v.end() || ib == v.end() || iab == v.end())
                bundle_error(origin, where + " " + m.dump() + ": " +
                                         json(ia == v.end() ? a : ib == v.end() ? b : a + b).dump() +
                                         " is not in model.vocab");
            uint64_t key = (static_cast<uint64_t>(static_cast<uint32_t>(ia->second)) << 32) |
                           static_cast<uint32_t>(ib->second);
            if (!impl->merges.emplace(key, std::make_pair(static_cast<int32_t>(r), iab->second)).second)
                bundle_error(origin, where + " " + m.dump() + " repeats an earlier merge");
        }

        // added tokens: matched in the raw text (normalized=false) or in the NFC text (normalized=true)
        const json &added = field(root, "added_tokens", origin, "");
        if (!added.is_array()) bundle_error(origin, "added_tokens is not an array");
        for (size_t k = 0; k < added.size(); ++k) {
            const json &t = added[k];
            std::string where = "added_tokens[" + std::to_string(k) + "]";
            if (!t.is_object()) bundle_error(origin, where + " is not an object");
            const json &id = field(t, "id", origin, where);
            const json &content = field(t, "content", origin, where);
            if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > INT32_MAX)
                bundle_error(origin, where + ".id is " + id.dump() + ", not an id in [0, 2^31)");
            if (!content.is_string() || content.get<std::string>().empty())
                bundle_error(origin, where + ".content is " + content.dump() + ", not a non-empty string");
            for (const char *f : {"lstrip", "rstrip", "single_word"})
                require(!get_bool(t, f, origin, where), origin, where + "." + f, true, "false");
            get_bool(t, "special", origin, where);  // matched either way (encode_special_tokens is off)
            int32_t i = static_cast<int32_t>(id.get<int64_t>());
            bool normalized = get_bool(t, "normalized", origin, where);
            std::string c = normalized ? nfc(content.get<std::string>()) : content.get<std::string>();
            if (!(normalized ? impl->normalized_added : impl->raw_added).insert(c, i))
                bundle_error(origin, where + ": content " + content.dump() + " already has another id");
            impl->added.push_back(i);
        }
        std::sort(impl->added.begin(), impl->added.end());
        impl->added.erase(std::unique(impl->added.begin(), impl->added.end()), impl->added.end());
    } catch (const json::exception &e) {
        bundle_error(origin, std::string("unexpected JSON structure (") + e.what() + ")");
    }
    compile(impl->split, kQwen2RegexPcre2);
    compile(impl->unassigned, "\\p{Cn}");
    return Tokenizer(std::move(impl));
}

}  // namespace nora_edge
